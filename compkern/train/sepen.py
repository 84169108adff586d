"""Separate-and-Enhance (Bao et al., SIGGRAPH 2024) on a diffusers ``UNet2DConditionModel``.

Three pieces:

* Attention capture: ``capture_cross_attention(unet, resolution)`` installs ``CaptureAttnProcessor``
  on the cross-attention (``attn2``) layers that run at ``resolution`` x ``resolution`` and leaves
  every other layer's processor untouched. The capture processor computes the attention once
  (``softmax(Q K^T / sqrt(d))`` through ``Attention.get_attention_scores``, the same math as
  diffusers' ``AttnProcessor``), uses the probabilities for its output and hands them to
  ``compkern.ops.AttentionAccumulator`` (which keeps references, not copies, under autograd and
  folds layers into a running fp32 sum without it). On exit the original processors come back.
* ``token_indices``: object-token positions of a prompt, by word, through the tokenizer.
* ``SepEnFinetuner``: the compositional finetuning. Each step samples t, runs the UNet on the
  training prompts under capture, computes ``ops.attention_losses`` (Separate, Enhance) on the
  aggregated maps, adds the normalization loss (plain denoising loss on cached samples that the
  frozen model generated) and updates ``attn2.to_k`` only. Built on ``compkern.train.Trainer``
  (tqdm, atomic checkpoints of the to_k weights + optimizer, resume, metrics.json).
* ``SepEnGuidance``: the test-time variant (no weight change): the same losses guide the sample
  during the first steps of reverse diffusion, Attend-and-Excite style (see its docstring).

Public code facts followed here (github.com/adobe/SeperateAndEnhance, src/train_individual.py):
the attention-loss inputs are noised *random* latents (x0 ~ N(0, I), all t in [0, T)); only
parameters whose name contains ``attn2.to_k`` train; Separate weight 1.0, Enhance weight 0.5 by
default; the normalization term is off for single pairs. Where this module differs: the
normalization term is a denoising loss on frozen-model samples (the paper's description) rather
than the code's distillation to a frozen copy on random latents, and the maps are normalized as
Attend-and-Excite does (``ops.attention_losses(normalize="softmax")``, tokens [1, end-of-text)).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from compkern.data import shapes
from compkern.models.detector import OUTCOMES, ShapeDetector, score_samples
from compkern.models.shapes import UNET_CONFIG, build_components
from compkern.models.unet import SDComponents
from compkern.ops import combine_eps
from compkern.ops.attention import AttentionAccumulator, attention_losses
from compkern.train.loop import Trainer, ema_update
from compkern.utils.checkpoint import atomic_save, atomic_write_json, load

# ------------------------------------------------------------------------------------------------
# attention capture
# ------------------------------------------------------------------------------------------------


class AttentionStore:
    """Where the capture processors put the probabilities of one forward pass.

    ``maps()`` -> (B, P, N), the mean over captured layers and heads (ops.aggregate_attention);
    ``reset()`` before each forward pass (``capture_cross_attention`` resets on entry)."""

    def __init__(self, resolution: int, backend: str = "auto"):
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        self.resolution, self.backend = resolution, backend
        self.acc: AttentionAccumulator | None = None
        self.layers_seen = 0

    def reset(self) -> None:
        self.acc = None
        self.layers_seen = 0

    def add(self, probs: torch.Tensor, batch_size: int) -> None:
        """probs (batch_size * heads, P, N) of one layer."""
        if probs.shape[-2] != self.resolution ** 2:
            raise ValueError(f"a capture processor at resolution {self.resolution} got {probs.shape[-2]} pixels; "
                             f"the input size differs from unet.config.sample_size (pick the resolution for it)")
        if self.acc is None:
            self.acc = AttentionAccumulator(batch_size, self.resolution, backend=self.backend)
        elif self.acc.batch_size != batch_size:
            raise ValueError(f"batch size changed from {self.acc.batch_size} to {batch_size} without reset()")
        self.acc.add(probs)
        self.layers_seen += 1

    def maps(self) -> torch.Tensor:
        if self.acc is None:
            raise ValueError("no cross-attention layer was captured: run the UNet inside capture_cross_attention")
        return self.acc.mean()


class CaptureAttnProcessor:
    """An attention processor (diffusers' processor API) that computes the attention itself and
    passes the probabilities (B*heads, P, N) to an AttentionStore. Math as diffusers' AttnProcessor."""

    def __init__(self, store: AttentionStore):
        self.store = store

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        seq = hidden_states.shape[1] if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, P, N)
        self.store.add(probs, batch_size)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet, resolution: int) -> list[str]:
    """Processor names (as in ``unet.attn_processors``) of the attn2 layers that run at
    ``resolution`` x ``resolution`` for an input of ``unet.config.sample_size``."""
    size = unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    n = len(unet.config.block_out_channels)
    names = []
    for name in unet.attn_processors:
        if ".attn2." not in name:
            continue
        part, idx = name.split(".")[0], name.split(".")[1]
        if part == "down_blocks":
            level = int(idx)
        elif part == "up_blocks":
            level = n - 1 - int(idx)
        elif part == "mid_block":
            level = n - 1
        else:
            continue
        if size // (2 ** level) == resolution:
            names.append(name)
    return names


@contextlib.contextmanager
def capture_cross_attention(unet, resolution: int, store: AttentionStore | None = None,
                            backend: str = "auto") -> Iterator[AttentionStore]:
    """Context manager: capture processors on the attn2 layers at ``resolution``; yields the
    AttentionStore (reset); restores the original processors on exit, also after an error."""
    names = cross_attention_layers(unet, resolution)
    if not names:
        raise ValueError(f"the UNet has no cross-attention layer at resolution {resolution} "
                         f"(sample_size {unet.config.sample_size}, {len(unet.config.block_out_channels)} levels)")
    store = store or AttentionStore(resolution, backend)
    store.reset()
    original = dict(unet.attn_processors)
    capture = CaptureAttnProcessor(store)
    # set_attn_processor pops from the dict it is given: always pass a fresh dict
    unet.set_attn_processor({n: (capture if n in names else p) for n, p in original.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(original))


# ------------------------------------------------------------------------------------------------
# token selection
# ------------------------------------------------------------------------------------------------

def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)


def token_indices(tokenizer, prompt: str, words: Sequence[str]) -> torch.Tensor:
    """Positions (K,) int64 of ``words`` in the tokenized ``prompt`` (start token = position 0, the
    numbering of the text encoder's output). A word split into several tokens gives its last
    token (which has seen the whole word under CLIP's causal mask). Raises ValueError when a word
    is not in the tokenizer's vocabulary (it maps to the unknown token) or not in the prompt."""
    if isinstance(words, str):
        words = [words]
    if not words:
        raise ValueError("words must name at least one word of the prompt")
    ids = _prompt_ids(tokenizer, prompt)
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(tokenizer.all_special_ids)
    out = []
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"words must be non-empty strings, got {word!r}")
        w_ids = [i for i in tokenizer(word.strip(), add_special_tokens=False).input_ids if i not in special or i == unk]
        if not w_ids or (unk is not None and unk in w_ids):
            raise ValueError(f"word {word!r} is not in the tokenizer's vocabulary (it tokenizes to the unknown "
                             f"token {tokenizer.unk_token!r}); choose a word the text encoder knows")
        for s in range(len(ids) - len(w_ids) + 1):
            if ids[s:s + len(w_ids)] == w_ids:
                out.append(s + len(w_ids) - 1)
                break
        else:
            raise ValueError(f"word {word!r} does not occur in the prompt {prompt!r} (tokens {ids})")
    if len(set(out)) != len(out):
        raise ValueError(f"words {list(words)} map to repeated token positions {out}")
    return torch.tensor(out, dtype=torch.int64)


def text_end_index(tokenizer, prompt: str) -> int:
    """Index of the prompt's end-of-text token (Attend-and-Excite's normalize_eot ``last_idx``):
    the maps are renormalized over tokens [1, text_end)."""
    return len(_prompt_ids(tokenizer, prompt)) - 1


@dataclass
class PromptSpec:
    """A training / guidance prompt: its encoder states (L, D), object token positions (K,),
    and the end-of-text index for the map normalization."""

    prompt: str
    states: torch.Tensor
    tokens: torch.Tensor
    text_end: int

    @classmethod
    def build(cls, prompt: str, words: Sequence[str], tokenizer, encode) -> "PromptSpec":
        """``encode(list[str]) -> (B, L, D)`` (e.g. SDComponents.encode)."""
        return cls(prompt, encode([prompt])[0], token_indices(tokenizer, prompt, words), text_end_index(tokenizer, prompt))


def prompt_losses(maps: torch.Tensor, specs: Sequence[PromptSpec], *, sigma: float = 0.5, kernel_size: int = 3,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """maps (B, P, N) for rows whose prompts are ``specs`` (B) -> (sep (B,), en (B,)), through
    ops.attention_losses with per-row token indices (rows must share K) and per-row text_end."""
    if maps.shape[0] != len(specs):
        raise ValueError(f"maps has {maps.shape[0]} rows but {len(specs)} prompt specs were given")
    ks = {len(s.tokens) for s in specs}
    if len(ks) != 1:
        raise ValueError(f"all prompts of a batch must name the same number of objects, got {sorted(ks)}")
    tokens = torch.stack([s.tokens for s in specs]).to(maps.device)
    end = torch.tensor([s.text_end for s in specs], dtype=torch.int64, device=maps.device)
    return attention_losses(maps, tokens, sigma=sigma, kernel_size=kernel_size, text_end=end, backend=backend)


# ------------------------------------------------------------------------------------------------
# the finetuner
# ------------------------------------------------------------------------------------------------

def trainable_to_k(unet) -> dict[str, torch.nn.Module]:
    """The attn2.to_k Linear modules of every cross-attention layer, by module name."""
    mods = {n: m for n, m in unet.named_modules() if n.endswith("attn2.to_k")}
    if not mods:
        raise ValueError("the UNet has no attn2.to_k modules (not a UNet2DConditionModel with cross-attention?)")
    return mods


@dataclass
class SepEnConfig:
    """Finetuning options. Defaults follow the public SepEn code for one pair (200 steps, Separate
    1.0, Enhance 0.5, normalization 0, t over the whole schedule); ``w_norm`` 0.5 is the paper's
    setting at scale. ``t_min``/``t_max`` bound the t of the attention-loss inputs: on the pixel-space
    shapes world only t >= 600 helped (benchmarks/RESULTS.md, Separate-and-Enhance)."""

    steps: int = 200
    batch: int = 8
    lr: float = 2e-4
    w_sep: float = 1.0
    w_en: float = 0.5
    w_norm: float = 0.0
    norm_batch: int = 8
    resolution: int = 16
    sigma: float = 0.5
    kernel_size: int = 3
    t_min: int = 0
    t_max: int | None = None  # None: the schedule's last step
    grad_clip: float | None = 1.0
    save_every: int = 50
    backend: str = "auto"
    extra: dict = field(default_factory=dict)


class SepEnFinetuner:
    """Finetunes ``eps_model.unet``'s attn2.to_k weights (everything else frozen) with the
    Separate / Enhance losses on ``specs`` (+ ``w_norm`` x the denoising loss on ``norm_x0`` (M, C,
    H, W) with encoder states ``norm_states`` (M, L, D): samples of the frozen model).

    The attention losses see noised random latents x0 ~ N(0, I), as the public code, or with
    ``prompt_x0`` (P, M, C, H, W) noised samples of each prompt of ``specs`` (P = len(specs), e.g.
    M frozen-model samples per prompt), which keeps the UNet's inputs in distribution where the data
    are far from Gaussian (pixel space).

    ``fit()`` runs (or resumes) the Trainer in ``out_dir`` and returns the history; rows hold
    loss, sep, en, norm (means over the logging window). ``save_pretrained(path)`` writes the
    finetuned UNet (diffusers format)."""

    def __init__(self, eps_model, specs: Sequence[PromptSpec], out_dir: str | os.PathLike,
                 config: SepEnConfig | None = None, *, norm_x0: torch.Tensor | None = None,
                 norm_states: torch.Tensor | None = None, prompt_x0: torch.Tensor | None = None, seed: int = 0,
                 progress: bool = True):
        self.model, self.cfg = eps_model, config or SepEnConfig()
        self.specs = list(specs)
        if not self.specs:
            raise ValueError("specs must hold at least one prompt")
        C = eps_model.unet.config.in_channels
        if prompt_x0 is not None and (not isinstance(prompt_x0, torch.Tensor) or prompt_x0.dim() != 5
                                      or prompt_x0.shape[0] != len(self.specs) or prompt_x0.shape[2] != C):
            raise ValueError(f"prompt_x0 must be a (P={len(self.specs)}, M, C={C}, H, W) tensor of samples per prompt, "
                             f"got {getattr(prompt_x0, 'shape', type(prompt_x0))}")
        self.prompt_x0 = prompt_x0
        if self.cfg.w_norm > 0 and (norm_x0 is None or norm_states is None):
            raise ValueError("w_norm > 0 needs norm_x0 (M, C, H, W) and norm_states (M, L, D): frozen-model samples")
        if norm_x0 is not None and (norm_states is None or len(norm_x0) != len(norm_states)):
            raise ValueError("norm_x0 and norm_states must both be given, with the same length M")
        self.norm_x0, self.norm_states = norm_x0, norm_states
        unet = eps_model.unet
        unet.requires_grad_(False)
        self.to_k = trainable_to_k(unet)
        params = []
        for m in self.to_k.values():
            m.requires_grad_(True)
            params += list(m.parameters())
        self.params = params
        holder = torch.nn.ModuleDict({n.replace(".", "__"): m for n, m in self.to_k.items()})  # shares the weights
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)
        self.store = AttentionStore(self.cfg.resolution, self.cfg.backend)
        cfg = asdict(self.cfg)
        cfg.pop("steps")  # a target, not part of the run's identity: a resume may extend it
        cfg["prompts"] = [s.prompt for s in self.specs]
        cfg["tokens"] = [s.tokens.tolist() for s in self.specs]
        cfg["latents"] = "random" if prompt_x0 is None else "prompt_x0"
        self.trainer = Trainer(out_dir, {"to_k": holder}, opt, self._step, config=cfg, seed=seed,
                               save_every=self.cfg.save_every, log_every=10, grad_clip=self.cfg.grad_clip,
                               desc="sepen finetune", progress=progress)

    def _step(self, step: int, g: torch.Generator) -> dict:
        cfg, model = self.cfg, self.model
        schedule = model.schedule
        unet = model.unet
        unet.train()
        p = next(unet.parameters())
        idx = torch.randint(0, len(self.specs), (cfg.batch,), generator=g)
        specs = [self.specs[int(i)] for i in idx]
        states = torch.stack([s.states for s in specs]).to(p.device, p.dtype)
        C = unet.config.in_channels
        size = unet.config.sample_size
        H, W = (size, size) if isinstance(size, int) else tuple(size)
        t_max = schedule.num_steps - 1 if cfg.t_max is None else cfg.t_max
        t = torch.randint(cfg.t_min, t_max + 1, (cfg.batch,), generator=g)
        if self.prompt_x0 is None:
            x0 = torch.randn(cfg.batch, C, H, W, generator=g)  # random latents, as the public code
        else:
            x0 = self.prompt_x0[idx, torch.randint(0, self.prompt_x0.shape[1], (cfg.batch,), generator=g)].float()
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t).to(p.device, p.dtype)
        with capture_cross_attention(unet, cfg.resolution, self.store):
            model.raw(x_t, t.to(p.device), states)
            maps = self.store.maps()
        sep, en = prompt_losses(maps, specs, sigma=cfg.sigma, kernel_size=cfg.kernel_size, backend=cfg.backend)
        loss = cfg.w_sep * sep.mean() + cfg.w_en * en.mean()
        out = {"sep": float(sep.detach().mean()), "en": float(en.detach().mean())}
        if cfg.w_norm > 0:
            j = torch.randint(0, len(self.norm_x0), (cfg.norm_batch,), generator=g)
            nx0 = self.norm_x0[j]
            noise = torch.randn(nx0.shape, generator=g)
            nt, _ = schedule.sample_t(cfg.norm_batch, generator=g)
            nxt = schedule.add_noise(nx0, noise, nt)
            pred = model.raw(nxt.to(p.device, p.dtype), nt.to(p.device), self.norm_states[j].to(p.device, p.dtype))
            norm = torch.nn.functional.mse_loss(pred.float(), model.target(nx0, noise, nt).to(p.device).float())
            loss = loss + cfg.w_norm * norm
            out["norm"] = float(norm.detach())
        out["loss"] = loss
        return out

    @property
    def step(self) -> int:
        return self.trainer.step

    def fit(self, steps: int | None = None) -> list[dict]:
        hist = self.trainer.fit(self.cfg.steps if steps is None else steps)
        self.model.unet.eval()
        return hist

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The finetuned UNet in diffusers format (config.json + weights)."""
        self.model.unet.save_pretrained(os.fspath(path))


@torch.no_grad()
def cache_frozen_samples(sample_fn, states: torch.Tensor, n_per_prompt: int, *, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalization data: ``sample_fn(states (n, L, D)) -> x0 (n, C, H, W)`` (the frozen model's
    sampler) for every prompt of ``states`` (P, L, D) -> (x0 (P*n, C, H, W), states (P*n, L, D))."""
    rows = states.repeat_interleave(n_per_prompt, 0)
    xs = [sample_fn(rows[i:i + chunk]) for i in range(0, len(rows), chunk)]
    return torch.cat(xs), rows


# ------------------------------------------------------------------------------------------------
# test-time variant
# ------------------------------------------------------------------------------------------------

def cfg_combine(eps: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance through ``compkern.ops.combine_eps``: eps (2B, *S), the unconditional
    rows first, then the conditional ones -> (B, *S) = eps_u + guidance_scale (eps_c - eps_u)."""
    if eps.shape[0] % 2:
        raise ValueError(f"eps must stack (uncond, cond) rows: (2B, *S), got {tuple(eps.shape)}")
    w = torch.tensor([float(guidance_scale)], dtype=torch.float32, device=eps.device)
    return combine_eps(eps.view(2, eps.shape[0] // 2, *eps.shape[1:]), w)


class SepEnGuidance:
    """eps_fn(x_t, t) for compkern.samplers.ddim_sample / ddpm_sample: classifier-free guidance
    plus, while t >= ``t_stop``, the Separate / Enhance losses as guidance (SepEn TTA).

    Attend-and-Excite updates the latent, z_t <- z_t - alpha_t grad L(z_t), then predicts eps at
    z_t. Here the same gradient enters through eps: eps <- eps + alpha_t sqrt(1 - abar_t) grad L
    (classifier guidance with L as the energy), which moves x_{t-1} along -grad L inside the shared
    samplers, with no sampler of its own. alpha_t = step_size * sqrt(scale), scale falling linearly
    from 1 to 0.5 over the guided steps (A&E's schedule). The maps come from the conditional rows
    of the same CFG forward pass (one forward, one backward per guided step).

    cond (B, L, D), uncond (B, L, D); specs: B PromptSpecs (object tokens per row)."""

    def __init__(self, eps_model, cond: torch.Tensor, uncond: torch.Tensor, specs: Sequence[PromptSpec], *,
                 guidance_scale: float = 3.0, step_size: float = 1.0, t_stop: int = 500, w_sep: float = 1.0,
                 w_en: float = 0.5, resolution: int = 16, sigma: float = 0.5, kernel_size: int = 3,
                 normalize_grad: bool = False, backend: str = "auto"):
        if cond.shape != uncond.shape or cond.shape[0] != len(specs):
            raise ValueError(f"cond and uncond must both be (B, L, D) with B = len(specs) = {len(specs)}, "
                             f"got {tuple(cond.shape)} and {tuple(uncond.shape)}")
        self.model, self.cond, self.uncond, self.specs = eps_model, cond, uncond, list(specs)
        self.guidance_scale, self.step_size, self.t_stop = guidance_scale, step_size, t_stop
        self.w_sep, self.w_en = w_sep, w_en
        self.resolution, self.sigma, self.kernel_size, self.backend = resolution, sigma, kernel_size, backend
        self.normalize_grad = normalize_grad
        self.store = AttentionStore(resolution, backend)
        self.history: list[dict] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        t2 = torch.cat([t, t])
        states = torch.cat([self.uncond, self.cond]).to(x.device, x.dtype)
        tt = int(t[0])
        if tt < self.t_stop or self.step_size == 0:
            with torch.no_grad():
                eps = self.model(torch.cat([x, x]), t2, states)
            return cfg_combine(eps, self.guidance_scale)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            with capture_cross_attention(self.model.unet, self.resolution, self.store):
                eps = self.model(torch.cat([xg, xg]), t2, states)
                maps = self.store.maps()[B:]
            sep, en = prompt_losses(maps, self.specs, sigma=self.sigma, kernel_size=self.kernel_size, backend=self.backend)
            loss = self.w_sep * sep.sum() + self.w_en * en.sum()
            (grad,) = torch.autograd.grad(loss, xg)
        if self.normalize_grad:
            grad = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        frac = (self.model.schedule.num_steps - 1 - tt) / max(1, self.model.schedule.num_steps - 1 - self.t_stop)
        alpha = self.step_size * math.sqrt(1.0 - 0.5 * min(1.0, max(0.0, frac)))
        eps = cfg_combine(eps.detach(), self.guidance_scale)
        s = self.model.schedule.sqrt_one_minus_abar(t, x)
        self.history.append({"t": tt, "sep": float(sep.detach().mean()), "en": float(en.detach().mean())})
        return eps + alpha * s * grad


# ------------------------------------------------------------------------------------------------
# SepEn on the shapes world (compkern.data.shapes): base training, run folder, sampling, scoring,
# finetuning; the `compkern sepen` subcommand is their argument parsing
# ------------------------------------------------------------------------------------------------

class CaptionCache:
    """Encoder states of a fixed set of captions, computed once (the text encoder is frozen)."""

    def __init__(self, parts: SDComponents, captions: list[str]):
        self.index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        self.states = parts.encode(list(self.index))

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in captions if c not in self.index]
        if missing:
            raise KeyError(f"captions not in the cache: {missing[:3]}")
        return self.states[torch.tensor([self.index[c] for c in captions])]


def train_base(parts: SDComponents, world: shapes.ShapesWorld, out_dir: Path, *, steps: int, batch: int = 32,
               lr: float = 1e-3, cond_drop: float = 0.1, ema_decay: float = 0.999, seed: int = 0,
               save_every: int = 250, progress: bool = True) -> SDComponents:
    """Denoising training of parts.unet on world.sample_batch (caption dropout ``cond_drop``); keeps
    an EMA copy, resumes from out_dir, and writes the EMA model with save_pretrained to out_dir/model."""
    import copy

    unet = parts.unet
    unet.requires_grad_(True)
    ema = copy.deepcopy(unet).requires_grad_(False)
    eps_model = parts.eps_model()
    schedule = eps_model.schedule
    cache = CaptionCache(parts, world.all_captions())
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)

    def step_fn(step: int, g: torch.Generator) -> dict:
        x0, objs = world.sample_batch(batch, g)
        caps = [world.caption(o) if float(torch.rand((), generator=g)) >= cond_drop else "" for o in objs]
        cond = cache(caps)
        t, _ = schedule.sample_t(batch, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = schedule.add_noise(x0, noise, t)
        pred = eps_model.raw(x_t, t, cond)
        loss = torch.nn.functional.mse_loss(pred, eps_model.target(x0, noise, t))
        if step > 0:  # warmed-up decay: min(decay, (1 + step) / (10 + step))
            ema_update(ema, unet, min(ema_decay, (1 + step) / (10 + step)))
        return {"loss": loss}

    config = {"kind": "sepen-base", "batch": batch, "lr": lr, "cond_drop": cond_drop,
              "ema_decay": ema_decay, "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet.config.items()
                                                if k in UNET_CONFIG},
              **world.to_dict()}
    trainer = Trainer(out_dir, {"unet": unet, "ema": ema}, opt, step_fn, config=config, seed=seed,
                      save_every=save_every, log_every=50, desc="sepen base", progress=progress)
    trainer.fit(steps)
    out = SDComponents(unet=ema, scheduler=parts.scheduler, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer)
    out.save_pretrained(out_dir / "model")
    return out


def export_base(out: Path, world: shapes.ShapesWorld) -> Path:
    """Writes the EMA weights of the latest base checkpoint (out/base/checkpoint.pt) as the
    Stable-Diffusion-style folder out/base/model; returns its path."""
    parts = build_components(naming=world.naming)
    state = load(out / "base" / "checkpoint.pt")
    parts.unet.load_state_dict(state["modules"]["ema"])
    SDComponents(unet=parts.unet, scheduler=parts.scheduler, text_encoder=parts.text_encoder,
                 tokenizer=parts.tokenizer).save_pretrained(out / "base" / "model")
    atomic_write_json({"step": state["step"]}, out / "base" / "model" / "step.json")
    return out / "base" / "model"


# -- sampling, scoring, finetuning -------------------------------------------------------------

def load_model(out: str | Path, model: str) -> SDComponents:
    """'base' (or 'tta') -> out/base/model; 'ft:<name>' (or a bare name) -> out/finetune-<name>/model."""
    out = Path(out)
    if model in ("base", "tta"):
        path = out / "base" / "model"
    else:
        path = out / f"finetune-{model.split(':', 1)[-1]}" / "model"
    if not path.exists():
        raise ValueError(f"model {model!r}: {path} does not exist (run `compkern sepen train` / `finetune` first)")
    return SDComponents.from_pretrained(path)


def load_detector(out: Path) -> ShapeDetector:
    """The detector of a `compkern sepen train` folder (out/detector.pt), in eval mode."""
    path = out / "detector.pt"
    if not path.exists():
        raise ValueError(f"{path} does not exist: run `compkern sepen train --what detector`")
    det = ShapeDetector()
    det.load_state_dict(load(path)["state_dict"])
    return det.eval()


def load_world(out: Path, default: shapes.ShapesWorld) -> shapes.ShapesWorld:
    """The world a run folder was trained on (out/world.json), else ``default`` (older runs)."""
    path = out / "world.json"
    return shapes.ShapesWorld(**json.loads(path.read_text())) if path.exists() else default


def prompt_specs(parts: SDComponents, world: shapes.ShapesWorld, prompts: list[tuple[int, ...]]) -> list[PromptSpec]:
    """One PromptSpec (caption states and object-token indices) per prompt of the world."""
    return [PromptSpec.build(world.caption(p), world.object_tokens(p), parts.tokenizer, parts.encode) for p in prompts]


@torch.no_grad()
def sample(parts: SDComponents, world: shapes.ShapesWorld, prompts: list[tuple[int, ...]], *, n: int, seed: int, steps: int = 50,
           guidance: float = 3.0, clip_x0: float | None = 1.0, eta: float = 1.0, tta: dict | None = None,
           chunk: int = 256, backend: str = "auto", progress: bool = False) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """n samples per prompt with classifier-free guidance and ancestral DDPM (eta = 1) or DDIM
    (eta = 0); ``tta``: SepEnGuidance options (step_size, t_stop, w_sep, w_en) to guide with the
    attention losses. Returns (images (len(prompts) * n, 3, 16, 16), prompt of each row)."""
    from compkern.samplers import ddim_sample

    model = parts.eps_model()
    rows = [p for p in prompts for _ in range(n)]
    cache = CaptionCache(parts, [""] + [world.caption(p) for p in prompts])
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(len(rows), 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, generator=g)
    out = []
    for s in range(0, len(rows), chunk):
        part = rows[s:s + chunk]
        cond = cache([world.caption(p) for p in part])
        uncond = cache([""] * len(part))
        if tta is None:
            def eps_fn(x, t, cond=cond, uncond=uncond):
                e = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))
                return cfg_combine(e, guidance)
        else:
            eps_fn = SepEnGuidance(model, cond, uncond, prompt_specs(parts, world, part), guidance_scale=guidance,
                                   resolution=8, backend=backend, **tta)
        out.append(ddim_sample(eps_fn, x_T[s:s + chunk], model.schedule, num_steps=steps, eta=eta, clip_x0=clip_x0,
                               generator=g, progress=progress))
    return torch.cat(out).clamp(-1, 1), rows


def success_rates(det: ShapeDetector, world: shapes.ShapesWorld, images: torch.Tensor, rows: list[tuple[int, ...]]) -> dict:
    """Mean outcome rates of images (B, 3, 16, 16) drawn for prompts ``rows`` (B object tuples), as
    judged by ``det``: {"success", "missing", "swapped_or_duplicated", "n", "detected_by_position"
    (detection rate of the 1st, 2nd, ... object named), "per_prompt" (success per caption)}."""
    r = score_samples(det, images, rows)
    res = {k: float(r[k].float().mean()) for k in OUTCOMES}
    res["n"] = len(rows)
    # which prompt object was drawn: detection rate of the 1st, 2nd, ... object named (over the
    # rows whose prompt names that many objects)
    named = torch.tensor([len(p) for p in rows]).unsqueeze(1) > torch.arange(r["detected"].shape[1])
    res["detected_by_position"] = (r["detected"].sum(0) / named.sum(0)).tolist()
    per = {}
    for i, p in enumerate(rows):
        per.setdefault(world.caption(p), []).append(bool(r["success"][i]))
    res["per_prompt"] = {k: sum(v) / len(v) for k, v in per.items()}
    return res


PROMPT_SETS = {"heldout": lambda w: w.held_out_prompts(), "seen": lambda w: w.seen_prompts(),
               "single": lambda w: w.singles()}


def frozen_samples(parts: SDComponents, world: shapes.ShapesWorld, prompts: list[tuple[int, ...]], path: Path, *,
                   n: int = 8, seed: int, steps: int = 50) -> tuple[torch.Tensor, list[str]]:
    """n samples of each prompt from the model as it is now (len(prompts) * n, 3, H, W), prompt-major,
    and their captions; computed once and cached at ``path``."""
    if not path.exists():
        imgs, rows = sample(parts, world, prompts, n=n, seed=seed, steps=steps)
        atomic_save({"x0": imgs, "captions": [world.caption(r) for r in rows]}, path)
    d = load(path)
    return d["x0"], d["captions"]


def finetune(parts: SDComponents, world: shapes.ShapesWorld, out_dir: Path, *, steps: int, lr: float, w_sep: float,
             w_en: float, w_norm: float, batch: int = 8, seed: int = 0, prompt_set: str = "heldout", t_min: int = 0,
             latents: str = "random", backend: str = "auto", progress: bool = True) -> list[dict]:
    """SepEn finetuning of parts.unet (attn2.to_k) on the prompts of ``prompt_set``; the
    normalization data are 8 frozen-model samples of each single-object prompt (cached in
    out_dir/norm.pt). ``latents``: the attention losses see noised random latents ("random", the
    public code) or 8 frozen-model samples of each training prompt ("samples", cached in
    out_dir/prompt_x0.pt). Saves the SD folder with the finetuned UNet to out_dir/model."""
    if latents not in ("random", "samples"):
        raise ValueError(f"latents must be 'random' or 'samples', got {latents!r}")
    prompts = PROMPT_SETS[prompt_set](world)
    specs = prompt_specs(parts, world, prompts)
    norm_x0 = norm_states = None
    if w_norm > 0:
        norm_x0, captions = frozen_samples(parts, world, world.singles(), out_dir / "norm.pt", seed=seed + 777)
        norm_states = CaptionCache(parts, captions)(captions)
    prompt_x0 = None
    if latents == "samples":
        x0, _ = frozen_samples(parts, world, prompts, out_dir / "prompt_x0.pt", seed=seed + 778)
        prompt_x0 = x0.view(len(prompts), -1, *x0.shape[1:])
    cfg = SepEnConfig(steps=steps, batch=batch, lr=lr, w_sep=w_sep, w_en=w_en, w_norm=w_norm, resolution=8, t_min=t_min,
                      save_every=50, backend=backend, extra={"prompt_set": prompt_set})
    ft = SepEnFinetuner(parts.eps_model(), specs, out_dir, cfg, norm_x0=norm_x0, norm_states=norm_states,
                        prompt_x0=prompt_x0, seed=seed, progress=progress)
    hist = ft.fit()
    SDComponents(unet=parts.unet, scheduler=parts.scheduler, text_encoder=parts.text_encoder,
                 tokenizer=parts.tokenizer).save_pretrained(out_dir / "model")
    return hist


@torch.no_grad()
def noun_maps(parts: SDComponents, world: shapes.ShapesWorld, images: torch.Tensor, rows: list[tuple[int, ...]], *, t: int = 300, seed: int = 0,
              backend: str = "auto") -> torch.Tensor:
    """Cross-attention maps (B, K, 8, 8) of each prompt's nouns on its own samples noised to t
    (softmax-normalized over the text tokens as attention_losses sees them)."""
    model = parts.eps_model()
    specs = prompt_specs(parts, world, rows)
    g = torch.Generator().manual_seed(seed)
    tt = torch.full((len(rows),), t, dtype=torch.long)
    x_t = model.schedule.add_noise(images, torch.randn(images.shape, generator=g), tt)
    states = torch.stack([s.states for s in specs])
    with capture_cross_attention(model.unet, 8, backend=backend) as store:
        model(x_t, tt, states)
        maps = store.maps()  # (B, 64, N)
    out = []
    for b, s in enumerate(specs):
        a = torch.softmax(100 * maps[b, :, 1:s.text_end], -1)
        out.append(a[:, s.tokens - 1].T.reshape(-1, 8, 8))
    return torch.stack(out)
