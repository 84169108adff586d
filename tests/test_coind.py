"""CoInD: the loss against a direct computation, the CI term of an independent model, JSD on
analytic pmfs, trainer resume, the colored digits data and the metrics' plumbing."""
import math

import pytest
import torch
from torch import nn

from compkern.data.digits import ColoredDigits, check_support_cover, partial_support
from compkern.models.attribute_unet import AttributeMLP, AttributeUNet
from compkern.models.schedule import NoiseSchedule
from compkern.train.coind import (CoInDTrainer, ci_conditions, coind_loss, compose_conditions, compose_sample,
                                  conformity_score, draw_keep, draw_pairs, implicit_classifier, jsd,
                                  symmetrized_kl)

SCHED = NoiseSchedule.ddpm_linear(100)


def _inputs(B=6, A=3, D=2, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_values = [3, 4, 2][:A]
    labels = torch.stack([torch.randint(0, n, (B,), generator=g) for n in n_values], 1)
    null = torch.tensor(n_values)
    return dict(x0=torch.randn(B, D, generator=g), labels=labels, null=null, noise=torch.randn(B, D, generator=g),
                t=torch.randint(0, 100, (B,), generator=g), keep=draw_keep((B, A), 0.4, "independent", g),
                pairs=draw_pairs(b, A, g)), n_values


def _direct(model, x0, labels, null, noise, t, keep, pairs, lam):
    """The objective written out term by term: separate model calls, a Python loop over samples."""
    x_t = SCHED.add_noise(x0, noise, t)
    cond = torch.where(keep, labels, null.expand_as(labels))
    diffusion = ((model(x_t, t, cond) - noise) ** 2).mean()
    res, guide_sum, guide_n = [], torch.zeros(len(null)), torch.zeros(len(null))
    for s in range(len(pairs)):
        i, j = pairs[s].tolist()
        xs, ts = x_t[s:s + 1], t[s:s + 1]

        def eps(keep_attrs):
            c = null.clone()
            for a in keep_attrs:
                c[a] = labels[s, a]
            return model(xs, ts, c[None])

        e_null, e_i, e_j, e_ij = eps([]), eps([i]), eps([j]), eps([i, j])
        res.append((e_i + e_j - e_null - e_ij) ** 2)
        for a, e in ((i, e_i), (j, e_j)):
            guide_sum[a] += ((e - e_null) ** 2).mean()
            guide_n[a] += 1
    ci = torch.cat(res).mean()
    return diffusion + lam * ci, diffusion, ci, (guide_sum / guide_n.clamp_min(1)).sqrt()


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_loss_equals_direct_computation(lam):
    inp, n_values = _inputs()
    model = AttributeMLP(n_values, dim=2, hidden=16, depth=2)
    out = coind_loss(model, SCHED, **inp, lam=lam)
    loss, diffusion, ci, guide = _direct(model, **inp, lam=lam)
    torch.testing.assert_close(out["diffusion"], diffusion.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["ci"], ci.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["guide"], guide.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], loss if lam > 0 else diffusion, rtol=1e-5, atol=1e-6)
    assert float(ci.detach()) > 0  # a generic network is not conditionally independent
    # gradients agree too: the CI rows of the batched call feed the loss only when lam > 0
    g_batched = torch.autograd.grad(out["loss"], list(model.parameters()))
    g_direct = torch.autograd.grad(loss if lam > 0 else diffusion, list(model.parameters()))
    for a, b in zip(g_batched, g_direct):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_loss_on_image_model_is_one_forward_call():
    torch.manual_seed(0)
    model = AttributeUNet([3, 2], channels=[8, 16], attention=True, heads=2, groups=4)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    B, b = 5, 2
    g = torch.Generator().manual_seed(1)
    labels = torch.stack([torch.randint(0, 3, (B,), generator=g), torch.randint(0, 2, (B,), generator=g)], 1)
    x0 = torch.randn(B, 3, 8, 8, generator=g)
    out = coind_loss(model, SCHED, x0, labels, model.null, noise=torch.randn(B, 3, 8, 8, generator=g),
                     t=torch.randint(0, 100, (B,), generator=g), keep=torch.ones(B, 2, dtype=torch.bool),
                     pairs=draw_pairs(b, 2, g), lam=1.0)
    assert calls == [B + 4 * b]  # denoising rows + condition-major CI rows in one batch
    assert torch.isfinite(out["loss"])


class _AdditiveModel(nn.Module):
    """eps = f(x, t) + sum_a g_a(x, t, c_a), g_a(null) = 0: conditionally independent by construction."""

    def __init__(self, n_values, dim=2):
        super().__init__()
        self.null = torch.tensor(n_values)
        self.f = nn.Linear(dim + 1, dim)
        self.g = nn.ModuleList(nn.Embedding(n + 1, dim) for n in n_values)
        self.h = nn.Linear(dim, dim)

    def forward(self, x, t, cond):
        out = self.f(torch.cat([x, t[:, None].float() / 100], 1))
        for a, emb in enumerate(self.g):
            v = emb(cond[:, a]) * (cond[:, a] != self.null[a]).float()[:, None]
            out = out + v * torch.tanh(self.h(x))  # nonlinear in x, additive across attributes
        return out


def test_ci_term_zero_for_independent_model():
    inp, n_values = _inputs(B=8, b=8)
    model = _AdditiveModel(n_values)
    out = coind_loss(model, SCHED, **inp, lam=1.0)
    assert float(out["ci"]) < 1e-12
    assert float(out["guide"].min()) > 1e-4  # the attributes do act on eps: not a trivial zero
    assert float(out["diffusion"]) > 0


def test_jsd_analytic_pmfs():
    p1, p2 = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.6, 0.4])
    indep = p1[:, None] * p2[None]
    assert abs(float(jsd(indep))) < 1e-7
    assert abs(float(jsd(indep, indep.clone()))) < 1e-7
    diag = torch.tensor([[0.5, 0.0], [0.0, 0.5]])  # perfectly dependent; product = uniform 0.25
    expected = 0.75 * math.log(4 / 3)
    assert abs(float(jsd(diag)) - expected) < 1e-6
    # symmetric, bounded by ln 2 (reached on disjoint supports), batched over leading axes
    a, b = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert abs(float(jsd(a, b)) - math.log(2)) < 1e-6
    batch = torch.stack([indep, torch.tensor([[0.3, 0.1], [0.0, 0.2], [0.3, 0.1]])])
    out = jsd(batch)
    assert out.shape == (2,) and abs(float(out[0])) < 1e-7 and float(out[1]) > 0
    q = torch.softmax(torch.randn(3, 2).flatten(), 0).reshape(3, 2)
    torch.testing.assert_close(jsd(batch[1], q), jsd(q, batch[1]))
    # the public code's symmetrized KL is a different (unbounded) quantity
    assert float(symmetrized_kl(diag, torch.full((2, 2), 0.25))) > float(jsd(diag))
    with pytest.raises(ValueError, match="product"):
        jsd(indep, torch.ones(2, 2) / 4)


def test_trainer_resume_equals_uninterrupted(tmp_path):
    seen = torch.tensor([[0, 0], [0, 1], [1, 0]])

    def data_fn(b, g):
        z = seen[torch.randint(0, 3, (b,), generator=g)]
        return z.float() + 0.1 * torch.randn(b, 2, generator=g), z

    def make(out):
        torch.manual_seed(0)
        model = AttributeMLP([2, 2], dim=2, hidden=16, depth=1)
        return CoInDTrainer(model, SCHED, data_fn, model.null, out, lam=1.0, batch=16, ci_batch=4, save_every=2,
                            log_every=2, ema=0.9, progress=False)

    full = make(tmp_path / "a")
    full.fit(6)
    first = make(tmp_path / "b")
    first.fit(4)  # interrupted at a log/save boundary (the shared Trainer logs a partial row at the end of a fit)
    resumed = make(tmp_path / "b")  # a fresh process would do exactly this
    assert resumed.step == 4
    resumed.fit(6)
    for name in ("model", "ema_model"):
        sa, sb = getattr(full, name).state_dict(), getattr(resumed, name).state_dict()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert full.trainer.history == resumed.trainer.history
    assert set(full.trainer.history[-1]) >= {"loss", "diffusion", "ci", "guide_0", "guide_1"}
    with pytest.raises(ValueError, match="made with other settings"):
        torch.manual_seed(0)
        m = AttributeMLP([2, 2], dim=2, hidden=16, depth=1)
        CoInDTrainer(m, SCHED, data_fn, m.null, tmp_path / "a", lam=2.0, batch=16, ci_batch=4, progress=False)


def test_conditions_layout():
    labels = torch.tensor([[1, 2, 0], [0, 3, 1]])
    null = torch.tensor([3, 4, 2])
    c = ci_conditions(labels, null, torch.tensor([[0, 2], [1, 0]]))
    assert c.shape == (4, 2, 3)
    assert c[0].tolist() == [[3, 4, 2], [3, 4, 2]]
    assert c[1].tolist() == [[1, 4, 2], [3, 3, 2]]
    assert c[2].tolist() == [[3, 4, 0], [0, 4, 2]]
    assert c[3].tolist() == [[1, 4, 0], [0, 3, 2]]
    q = compose_conditions(torch.tensor([[1, 4, 0]]), null)
    assert q[:, 0].tolist() == [[3, 4, 2], [1, 4, 2], [3, 4, 2], [3, 4, 0]]
    keep = draw_keep((1000, 2), 0.3, "joint", torch.Generator().manual_seed(0))
    assert bool((keep[:, 0] == keep[:, 1]).all()) and 0.2 < float((~keep[:, 0]).float().mean()) < 0.4
    with pytest.raises(ValueError, match="masking"):
        draw_keep((2, 2), 0.1, "both")


def test_compose_sample_and_metrics_plumbing():
    torch.manual_seed(0)
    model = AttributeUNet([2, 3], channels=[8], attention=False, groups=4).eval()
    q = torch.tensor([[0, 1], [1, 3]])  # second row: color not requested
    x = compose_sample(model, SCHED, q, model.null, [2.0, 1.5], (3, 8, 8), num_steps=4,
                       generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="weights"):
        compose_sample(model, SCHED, q, model.null, [1.0, 1.0, 1.0], (3, 8, 8), num_steps=2)
    with pytest.raises(TypeError, match="query"):
        compose_sample(model, SCHED, q.float(), model.null, 1.0, (3, 8, 8), num_steps=2)
    joint, m1, m2 = implicit_classifier(model, SCHED, torch.randn(4, 3, 8, 8), [2, 3], model.null,
                                       generator=torch.Generator().manual_seed(0))
    assert joint.shape == (4, 2, 3) and m1.shape == (4, 2) and m2.shape == (4, 3)
    torch.testing.assert_close(joint.sum((1, 2)), torch.ones(4))

    class Oracle(nn.Module):  # "classifies" by reading the label planted in pixel (0, 0)
        def forward(self, x):
            return [nn.functional.one_hot(x[:, a, 0, 0].long(), n).float() for a, n in enumerate((2, 3))]

    labels = torch.tensor([[0, 1], [1, 2], [1, 0], [0, 0]])
    imgs = torch.zeros(4, 3, 8, 8)
    imgs[:, 0, 0, 0], imgs[:, 1, 0, 0] = labels[:, 0].float(), labels[:, 1].float()
    wrong = labels.clone()
    wrong[0, 1] = 2
    cs, acc = conformity_score(Oracle(), imgs, wrong)
    assert cs == 0.75 and acc == [1.0, 0.75]
    imgs[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        conformity_score(Oracle(), imgs, labels)


def test_colored_digits():
    m = partial_support(5, 5)
    assert int(m.sum()) == 9 and int((~m).sum()) == 16 and bool(m[4, 4]) and bool(m[0, 1]) and not m[0, 2]
    bad = m.clone()
    bad[:, 0] = False
    with pytest.raises(ValueError, match="colors \\[0\\]"):
        check_support_cover(bad)
    data = ColoredDigits(size=8, support="partial", split="train")
    x, y = data.sample(256, torch.Generator().manual_seed(0))
    assert x.shape == (256, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert bool(data.support[y[:, 0], y[:, 1]].all())
    test = ColoredDigits(size=16, support="partial", split="test")
    assert len(set(test.digit.tolist())) == 5 and len(test.digit) + len(data.digit) > 850
    imgs = test.render(test.unseen(), torch.Generator().manual_seed(0))
    assert imgs.shape == (16, 3, 16, 16)
    with pytest.raises(ValueError, match="size"):
        ColoredDigits(size=12)
