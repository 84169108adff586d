"""CoInD: conditional-independence training for compositional diffusion (Gaudi et al., ICLR 2025).

A model conditioned on A attributes (cond (N, A) int64, id ``null[a]`` = attribute a dropped) is
trained with the denoising loss plus lambda times the conditional-independence (CI) term

    || eps(x_t, c_i) + eps(x_t, c_j) - eps(x_t, null) - eps(x_t, c_i, c_j) ||^2

(attributes i != j drawn per sample, every other attribute set to its null token). If the
model's conditionals factorize, p(x | c_i, c_j) p(x) = p(x | c_i) p(x | c_j), the term is zero;
the composed sampler (``compose_sample``: eps(null) + sum_a w_a (eps(c_a) - eps(null))) then
targets the right joint even for combinations never seen in training.

One model call per step: the B denoising rows (conditions masked per ``masking``) and the four
CI rows of a sub-batch of ``ci_batch`` samples, condition-major (null, c_i, c_j, c_ij) x b, go
through the network as one batch. A vanilla run (lambda = 0) evaluates the CI rows in a separate
no-grad call, only to log the same guards.

Metrics:
- ``jsd``: Jensen-Shannon divergence (natural log, in [0, ln 2]) between a joint pmf over two
  attributes and the product of marginals. ``implicit_classifier`` gets both from the model
  itself (Li et al. 2023, "Your diffusion model is secretly a zero-shot classifier"): the
  denoising error of every joint label and every single-attribute label at 5 timesteps evenly
  spaced in [0.3 T, 0.6 T] ([300, 600] for T = 1000), one shared noise per (image, timestep),
  standardized across labels per timestep, summed over timesteps, softmax(-error). The public
  CoInD code (coind/metrics.py) computes 0.5 (KL(P||Q) + KL(Q||P)) (a symmetrized KL, unbounded)
  under the name JSD; ``jsd`` is the Jensen-Shannon divergence proper, and
  ``symmetrized_kl`` is provided to compare with that code.
- ``conformity_score``: the fraction of generated images whose every attribute, as predicted by
  classifiers trained on real images, equals the requested value.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from diffusers import ModelMixin
from torch import nn
from torch.nn import functional as F

from compkern.data.digits import ColoredDigits
from compkern.models.attribute_unet import AttributeUNet
from compkern.models.classifier import AttributeClassifier
from compkern.models.base import EpsModel, config_dict, evaluate_conditions
from compkern.models.schedule import NoiseSchedule
from compkern.samplers import ComposedEps, ddim_sample
from compkern.train.loop import Trainer, ema_update, load_exported
from compkern.utils.checkpoint import atomic_save, load

Masking = Literal["independent", "joint", "none"]


# ----------------------------------------------------------------------------------------------
# conditions
# ----------------------------------------------------------------------------------------------
def _check_labels(labels: torch.Tensor, null: torch.Tensor, name: str = "labels") -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.dim() != 2:
        raise TypeError(f"{name} must be an int64 tensor (N, A), got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    if labels.shape[1] != len(null):
        raise ValueError(f"{name} must have A = {len(null)} columns (one per attribute), got {tuple(labels.shape)}")


def mask_labels(labels: torch.Tensor, null: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """labels (N, A), keep (N, A) bool -> labels with dropped attributes set to their null id."""
    return torch.where(keep, labels, null.to(labels.device).expand_as(labels))


def draw_keep(shape: tuple[int, int], p_drop: float, masking: Masking, generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-free dropout mask (N, A) bool, True = attribute kept.

    independent: each attribute dropped with probability p_drop on its own (the baselines' mode);
    joint: all attributes of a sample dropped together with probability p_drop; none: keep all."""
    N, A = shape
    if masking == "independent":
        return torch.rand(N, A, generator=generator) >= p_drop
    if masking == "joint":
        return (torch.rand(N, 1, generator=generator) >= p_drop).expand(N, A).clone()
    if masking == "none":
        return torch.ones(N, A, dtype=torch.bool)
    raise ValueError(f"masking must be 'independent', 'joint' or 'none', got {masking!r}")


def draw_pairs(n: int, num_attributes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2) int64: two distinct attributes (i, j) per sample, uniformly."""
    if num_attributes < 2:
        raise ValueError(f"the CI term needs at least 2 attributes, got {num_attributes}")
    return torch.argsort(torch.rand(n, num_attributes, generator=generator), dim=1)[:, :2]


def ci_conditions(labels: torch.Tensor, null: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """labels (b, A), pairs (b, 2) -> condition-major (4, b, A): null, c_i only, c_j only, c_i and c_j."""
    b, A = labels.shape
    if pairs.shape != (b, 2):
        raise ValueError(f"pairs must be (b, 2) = ({b}, 2), got {tuple(pairs.shape)}")
    base = null.to(labels.device).expand(b, A)
    onehot_i = F.one_hot(pairs[:, 0], A).bool()
    onehot_j = F.one_hot(pairs[:, 1], A).bool()
    return torch.stack([base.clone(), torch.where(onehot_i, labels, base), torch.where(onehot_j, labels, base),
                        torch.where(onehot_i | onehot_j, labels, base)])


def compose_conditions(query: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """query (B, A) (null id = attribute not requested) -> condition-major (A+1, B, A): the null
    row, then one row per attribute holding only that attribute."""
    B, A = query.shape
    base = null.to(query.device).expand(B, A)
    rows = [base.clone()]
    for a in range(A):
        rows.append(torch.where(F.one_hot(torch.full((B,), a, device=query.device), A).bool(), query, base))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------
def coind_loss(model: EpsModel, schedule: NoiseSchedule, x0: torch.Tensor, labels: torch.Tensor, null: torch.Tensor,
               *, noise: torch.Tensor, t: torch.Tensor, keep: torch.Tensor, pairs: torch.Tensor,
               lam: float) -> dict[str, torch.Tensor]:
    """The CoInD objective for one batch, all randomness given.

    x0 (B, *S), labels (B, A) int64, null (A,), noise (B, *S), t (B,) int64, keep (B, A) bool
    (dropout for the denoising term), pairs (b, 2) (the CI term uses the first b samples).
    Returns loss = diffusion + lam * ci, diffusion (mean squared error), ci (mean over the b
    samples and the elements of S of the squared CI residual), guide (A,) (detached): per
    attribute, the RMS of eps(c_a) - eps(null) over the CI rows that hold attribute a."""
    _check_labels(labels, null)
    B, A = labels.shape
    if x0.shape[0] != B or noise.shape != x0.shape or t.shape != (B,) or keep.shape != (B, A):
        raise ValueError(f"x0 (B, *S), noise (B, *S), t (B,), keep (B, A) must agree with labels (B={B}, A={A}); got "
                         f"{tuple(x0.shape)}, {tuple(noise.shape)}, {tuple(t.shape)}, {tuple(keep.shape)}")
    b = pairs.shape[0]
    if not 1 <= b <= B:
        raise ValueError(f"pairs must hold 1 <= b <= B = {B} rows, got {b}")
    x_t = schedule.add_noise(x0, noise, t)
    cond = mask_labels(labels, null, keep)
    ci_cond = ci_conditions(labels[:b], null, pairs)  # (4, b, A)
    ci_x = x_t[:b].unsqueeze(0).expand(4, *x_t[:b].shape).reshape(4 * b, *x_t.shape[1:])
    ci_t = t[:b].repeat(4)
    if lam > 0:  # one forward call: B denoising rows + 4 x b CI rows (condition-major)
        out = model(torch.cat([x_t, ci_x]), torch.cat([t, ci_t]), torch.cat([cond, ci_cond.reshape(4 * b, A)]))
        eps, ci_eps = out[:B], out[B:].reshape(4, b, *x_t.shape[1:])
    else:  # vanilla: the CI rows only for the logs
        eps = model(x_t, t, cond)
        with torch.no_grad():
            ci_eps = model(ci_x, ci_t, ci_cond.reshape(4 * b, A)).reshape(4, b, *x_t.shape[1:])
    diffusion = F.mse_loss(eps, noise)
    e_null, e_i, e_j, e_ij = ci_eps.unbind(0)
    ci = (e_i + e_j - e_null - e_ij).pow(2).mean()
    loss = diffusion + lam * ci if lam > 0 else diffusion
    with torch.no_grad():
        dims = tuple(range(1, x_t.dim()))
        g = torch.cat([(e_i - e_null).pow(2).mean(dims), (e_j - e_null).pow(2).mean(dims)]).float()
        which = torch.cat([pairs[:, 0], pairs[:, 1]]).to(g.device)
        sums = torch.zeros(A, device=g.device).index_add_(0, which, g)
        counts = torch.zeros(A, device=g.device).index_add_(0, which, torch.ones_like(g))
        guide = (sums / counts.clamp_min(1)).sqrt()
    return {"loss": loss, "diffusion": diffusion.detach(), "ci": ci.detach(), "guide": guide}


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------
DataFn = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class CoInDTrainer:
    """Trains a multi-attribute eps-model with the CoInD objective on the shared ``Trainer``.

    ``data_fn(batch, generator) -> (x0 (batch, *S), labels (batch, A) int64)``. lam = 0 is the
    vanilla baseline (same dropout, same guards). State (model, EMA copy, AdamW, RNG) lives in
    ``out_dir``; rerunning with the same out_dir resumes. ``metrics.json`` logs loss, diffusion,
    ci and guide_<a> (per-attribute guidance strength, |eps(c_a) - eps(null)| RMS)."""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, data_fn: DataFn, null: torch.Tensor,
                 out_dir: str | Path, *, lam: float = 1.0, p_drop: float = 0.2, masking: Masking = "independent",
                 batch: int = 64, ci_batch: int = 16, lr: float = 5e-4, weight_decay: float = 0.0,
                 ema: float = 0.999, seed: int = 0, save_every: int = 500, log_every: int = 50,
                 config: dict | None = None, progress: bool = True):
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if not 0 <= p_drop < 1:
            raise ValueError(f"p_drop must lie in [0, 1), got {p_drop}")
        if not 1 <= ci_batch <= batch:
            raise ValueError(f"ci_batch must lie in [1, batch={batch}], got {ci_batch}")
        draw_keep((1, len(null)), p_drop, masking)  # validates masking
        self.model, self.schedule, self.data_fn = model, schedule, data_fn
        self.null = torch.as_tensor(null, dtype=torch.long)
        self.lam, self.p_drop, self.masking, self.batch, self.ci_batch = lam, p_drop, masking, batch, ci_batch
        self.ema_decay = ema
        self.ema_model = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        cfg = dict(config or {}, lam=lam, p_drop=p_drop, masking=masking, batch=batch, ci_batch=ci_batch, lr=lr,
                   weight_decay=weight_decay, ema=ema)
        self.trainer = Trainer(out_dir, {"model": model, "ema": self.ema_model}, opt, self._step, config=cfg, seed=seed,
                               save_every=save_every, log_every=log_every, desc=f"coind lam={lam:g}", progress=progress,
                               export=self.ema_model if isinstance(self.ema_model, ModelMixin) else None)

    @property
    def step(self) -> int:
        return self.trainer.step

    def _step(self, step: int, gen: torch.Generator) -> dict:
        x0, labels = self.data_fn(self.batch, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, self.schedule.num_steps, (self.batch,), generator=gen)
        keep = draw_keep(tuple(labels.shape), self.p_drop, self.masking, gen)
        pairs = draw_pairs(self.ci_batch, labels.shape[1], gen)
        if self.ema_decay > 0:  # EMA of the weights as they stand before this step's update
            ema_update(self.ema_model, self.model, self.ema_decay)
        out = coind_loss(self.model, self.schedule, x0, labels, self.null, noise=noise, t=t, keep=keep, pairs=pairs,
                         lam=self.lam)
        guide = out.pop("guide")
        return {**out, **{f"guide_{a}": float(g) for a, g in enumerate(guide)}}

    def fit(self, num_steps: int) -> list[dict[str, float]]:
        """Train to ``num_steps`` total steps; returns the metrics history."""
        hist = self.trainer.fit(num_steps)
        self.ema_model.eval()
        return hist


# ----------------------------------------------------------------------------------------------
# compositional sampling
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def compose_sample(model: EpsModel, schedule: NoiseSchedule, query: torch.Tensor, null: torch.Tensor,
                   weights: float | Sequence[float] | torch.Tensor, shape: Sequence[int], *,
                   mode: Literal["compose", "joint"] = "compose", num_steps: int = 50,
                   generator: torch.Generator | None = None, chunk_size: int | None = None,
                   clip_x0: float | None = 1.0) -> torch.Tensor:
    """Sample x0 (B, *shape) for query (B, A) int64 (null id = attribute not requested).

    compose: eps(null) + sum_a w_a (eps(c_a) - eps(null)) over the requested attributes
    (Composable Diffusion), weights a float, (A,) or (B, A); joint: classifier-free guidance on the
    full query, eps(null) + w (eps(c) - eps(null)), weights a float. DDIM with ``num_steps``."""
    null = torch.as_tensor(null, dtype=torch.long)
    _check_labels(query, null, "query")
    B, A = query.shape
    w = torch.as_tensor(weights, dtype=torch.float32)
    if mode == "compose":
        conds = compose_conditions(query, null)
        w = w.expand(A) if w.dim() == 0 else w
        if tuple(w.shape) not in ((A,), (B, A)):
            raise ValueError(f"weights must be a float, (A,) = ({A},) or (B, A) = ({B}, {A}), got {tuple(w.shape)}")
        w = w.expand(B, A) * (query != null).float()  # attributes not requested get weight 0
    elif mode == "joint":
        if w.dim() != 0:
            raise ValueError("joint mode takes one float guidance weight")
        conds = torch.stack([null.expand(B, A).clone(), query])
        w = w.reshape(1)
    else:
        raise ValueError(f"mode must be 'compose' or 'joint', got {mode!r}")
    eps_fn = ComposedEps(model, conds, w, chunk_size=chunk_size)
    x_T = torch.randn(B, *shape, generator=generator)
    return ddim_sample(eps_fn, x_T, schedule, num_steps=num_steps, clip_x0=clip_x0, generator=generator)


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
def _outer_marginals(joint: torch.Tensor) -> torch.Tensor:
    return joint.sum(-1, keepdim=True) * joint.sum(-2, keepdim=True)


def jsd(joint: torch.Tensor, product: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between joint (..., n1, n2) and product
    (..., n1, n2), default the outer product of the joint's own marginals. Both are pmfs over the
    last two axes. Returns (...)."""
    if not isinstance(joint, torch.Tensor) or joint.dim() < 2:
        raise TypeError("joint must be a tensor (..., n1, n2)")
    p = joint.double()
    q = _outer_marginals(p) if product is None else product.double()
    if q.shape != p.shape:
        raise ValueError(f"product must have the joint's shape {tuple(p.shape)}, got {tuple(q.shape)}")
    if not (torch.isfinite(p).all() and torch.isfinite(q).all()) or bool((p < 0).any() or (q < 0).any()):
        raise ValueError("joint and product must be finite and non-negative")
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log(a.clamp_min(eps)) - torch.log(b.clamp_min(eps))), torch.zeros_like(a)).sum((-1, -2))

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).to(joint.dtype)


def symmetrized_kl(joint: torch.Tensor, product: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """0.5 (KL(joint || product) + KL(product || joint)): what the public CoInD code reports as JSD."""
    p, q = joint.double().clamp_min(eps), product.double().clamp_min(eps)
    return (0.5 * ((p - q) * (p.log() - q.log())).sum((-1, -2))).to(joint.dtype)


@torch.no_grad()
def implicit_classifier(model: EpsModel, schedule: NoiseSchedule, x0: torch.Tensor, n_values: Sequence[int],
                        null: torch.Tensor, *, num_timesteps: int = 5, t_range: tuple[float, float] = (0.3, 0.6),
                        generator: torch.Generator | None = None, chunk_size: int | None = 4096
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The diffusion model as a classifier of two attributes. x0 (N, *S) ->
    joint (N, n1, n2), marginal_1 (N, n1), marginal_2 (N, n2) (softmax of the negated,
    per-timestep standardized, timestep-summed denoising errors). Labels are evaluated as one
    condition-major batch per timestep via ``evaluate_conditions``."""
    n1, n2 = (int(n) for n in n_values)
    null = torch.as_tensor(null, dtype=torch.long)
    if len(null) != 2:
        raise ValueError("implicit_classifier handles exactly 2 attributes")
    jd, jc = torch.meshgrid(torch.arange(n1), torch.arange(n2), indexing="ij")
    labels = torch.cat([torch.stack([jd.flatten(), jc.flatten()], 1),
                        torch.stack([torch.arange(n1), torch.full((n1,), int(null[1]))], 1),
                        torch.stack([torch.full((n2,), int(null[0])), torch.arange(n2)], 1)])  # (L, 2)
    L, N = len(labels), x0.shape[0]
    T = schedule.num_steps
    ts = torch.linspace(t_range[0] * T, t_range[1] * T, num_timesteps).long().clamp(0, T - 1)
    conds = labels[:, None, :].expand(L, N, 2).to(x0.device)
    score = torch.zeros(L, N, dtype=torch.float64, device=x0.device)
    dims = tuple(range(2, x0.dim() + 1))
    for t in ts.tolist():
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        tt = torch.full((N,), t, dtype=torch.long, device=x0.device)
        x_t = schedule.add_noise(x0, noise, tt)
        preds = evaluate_conditions(model, x_t, tt, conds, chunk_size=chunk_size)  # (L, N, *S)
        err = (preds - noise.unsqueeze(0)).pow(2).mean(dims).double()  # (L, N)
        score += (err - err.mean(0)) / err.std(0).clamp_min(1e-12)
    logits = -score.T  # (N, L)
    joint = F.softmax(logits[:, :n1 * n2], dim=1).reshape(N, n1, n2)
    return joint.float(), F.softmax(logits[:, n1 * n2:n1 * n2 + n1], 1).float(), F.softmax(logits[:, n1 * n2 + n1:], 1).float()


def implicit_jsd(model: EpsModel, schedule: NoiseSchedule, x0: torch.Tensor, labels: torch.Tensor,
                 n_values: Sequence[int], null: torch.Tensor, **kw) -> dict[str, float]:
    """Mean over images x0 (N, *S) of jsd(model joint, product of the model's marginals), plus
    the public code's symmetrized KL and the implicit classifier's accuracy against labels (N, 2)."""
    joint, m1, m2 = implicit_classifier(model, schedule, x0, n_values, null, **kw)
    prod = m1[:, :, None] * m2[:, None, :]
    pred_joint = joint.flatten(1).argmax(1)
    n2 = int(n_values[1])
    return {"jsd": float(jsd(joint, prod).mean()), "symmetrized_kl": float(symmetrized_kl(joint, prod).mean()),
            "acc_marginal_0": float((m1.argmax(1) == labels[:, 0]).float().mean()),
            "acc_marginal_1": float((m2.argmax(1) == labels[:, 1]).float().mean()),
            "acc_joint": float((pred_joint == labels[:, 0] * n2 + labels[:, 1]).float().mean())}


def train_attribute_classifier(data_fn: DataFn, n_values: Sequence[int], *, steps: int = 1500, batch: int = 128,
                               lr: float = 2e-3, seed: int = 0, noise_std: float = 0.05,
                               progress: bool = False) -> AttributeClassifier:
    """Fit an AttributeClassifier on real images from data_fn (light Gaussian noise augmentation)."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    x, _ = data_fn(2, gen)
    clf = AttributeClassifier(n_values, in_channels=x.shape[1])
    opt = torch.optim.AdamW(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(steps), desc="classifier", disable=not progress):
        x, y = data_fn(batch, gen)
        x = x + noise_std * torch.randn(x.shape, generator=gen)
        loss = sum(F.cross_entropy(lo, y[:, a]) for a, lo in enumerate(clf(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return clf.eval()


@torch.no_grad()
def conformity_score(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     batch_size: int = 1024) -> tuple[float, list[float]]:
    """images (N, C, H, W), labels (N, A) -> (fraction with every attribute predicted right,
    per-attribute accuracies [A]). Classifier returns a list of A logits (N, n_a)."""
    if images.shape[0] != labels.shape[0] or labels.dim() != 2:
        raise ValueError(f"labels must be (N, A) with N = images.shape[0] = {images.shape[0]}, got {tuple(labels.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images hold NaN or inf")
    preds = torch.cat([torch.stack([lo.argmax(1) for lo in classifier(images[s:s + batch_size])], 1)
                       for s in range(0, len(images), batch_size)])
    ok = preds == labels.to(preds.device)
    return float(ok.all(1).float().mean()), ok.float().mean(0).tolist()


# ----------------------------------------------------------------------------------------------
# colored digits (compkern.data.digits): the run folder of `compkern coind train`
# ----------------------------------------------------------------------------------------------
def coind_schedule() -> NoiseSchedule:
    """The noise schedule of every CoInD model: DDPM linear, 1000 steps."""
    return NoiseSchedule.ddpm_linear(1000)


def build_digits_model(cfg: dict) -> AttributeUNet:
    """The colored-digits AttributeUNet of a run config {"digits", "colors", "channels", "attention", ...}."""
    return AttributeUNet([cfg["digits"], cfg["colors"]], channels=cfg["channels"], attention=cfg["attention"])


def load_run(run: str | Path) -> tuple[AttributeUNet, dict]:
    """(EMA model in eval mode, config) from a `compkern coind train` folder (its exported model/)."""
    return load_exported(run, AttributeUNet)


def load_or_train_classifier(path: str, cfg: dict) -> tuple[AttributeClassifier, dict]:
    """The attribute classifier of a digits config, read from ``path`` (``{size}`` filled in from
    cfg) or trained on real full-support images and saved there; returns (classifier in eval
    mode, its test {"cs", "acc"})."""
    path = Path(path.format(size=cfg["size"]))
    full = ColoredDigits(size=cfg["size"], n_digits=cfg["digits"], n_colors=cfg["colors"], support="full", split="train")
    if path.exists():
        st = load(path)
        clf = AttributeClassifier(**st["config"])
        clf.load_state_dict(st["state"])
        return clf.eval(), st["test_acc"]
    with torch.enable_grad():
        clf = train_attribute_classifier(full.sample, full.n_values, steps=1500, progress=False)
    test = ColoredDigits(size=cfg["size"], n_digits=cfg["digits"], n_colors=cfg["colors"], support="full", split="test")
    g = torch.Generator().manual_seed(99)
    labels = torch.cartesian_prod(torch.arange(cfg["digits"]), torch.arange(cfg["colors"])).repeat(40, 1)
    cs, acc = conformity_score(clf, test.render(labels, g), labels)
    atomic_save({"config": config_dict(clf), "state": clf.state_dict(), "test_acc": {"cs": cs, "acc": acc}}, path)
    return clf, {"cs": cs, "acc": acc}
