"""The default target of the image lift maps ('auto'): which target each expression gets, and
that its NOT can both fail and pass on synthetic records whose answer is known."""
from __future__ import annotations

import pytest
import torch

from compkern.models.schedule import NoiseSchedule
from compkern.pipelines import accept, cached_lift_maps, parse_composition
from compkern.pipelines.lift_maps import resolve_target
from compkern.samplers.composed import StepRecord


@pytest.mark.parametrize("text, target", [
    ("a cat AND a dog", "joint"),  # a pure AND: the public code's full prompt
    ("a cat AND a dog AND a bird", "joint"),
    ("a cat", "noise"),  # its joint would be the component itself: a lift that cannot fail
    ("a cat AND NOT a dog", "noise"),
    ("a cat AND a dog AND NOT a bird", "noise"),  # "a cat and a dog" cannot see the bird (test below)
    ("a cat OR a dog", "noise"),
    ("a cat AND (a dog OR a bird)", "noise"),
])
def test_auto_target_by_expression(text, target):
    comp = parse_composition(text)
    assert resolve_target("auto", comp.expression.required(), comp.K) == target
    assert resolve_target("joint", None, comp.K) == "joint"  # an explicit target is kept
    with pytest.raises(ValueError, match="required"):
        resolve_target("auto", None, comp.K)


def _record(b_drawn: bool, *, seed: int = 0) -> tuple[StepRecord, torch.Tensor, NoiseSchedule]:
    """A's signal in the left half; B's in the right half when ``b_drawn``, else nowhere (its
    prediction is the null's). Rows: [null, A, B]."""
    sched = NoiseSchedule.cosine(1000)
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = 1, 4, 8, 8
    x0 = torch.randn(B, C, H, W, generator=g)
    left = torch.zeros(1, 1, 1, W, dtype=torch.bool)
    left[..., : W // 2] = True
    rec = StepRecord()
    for t in range(950, 0, -50):
        noise = torch.randn(B, C, H, W, generator=g)
        x_t = sched.add_noise(x0, noise, torch.full((B,), t))
        e0 = noise + torch.randn(B, C, H, W, generator=g)
        eA = torch.where(left, noise, e0)
        eB = torch.where(left, e0, noise) if b_drawn else e0
        rec.x_t.append(x_t)
        rec.t.append(torch.full((B,), t))
        rec.preds.append(torch.stack([e0, eA, eB]))
    return rec, x0, sched


@pytest.mark.parametrize("b_drawn", [True, False])
def test_not_fails_and_passes_at_the_defaults(b_drawn):
    comp = parse_composition("a A AND NOT a B")
    rec, x0, sched = _record(b_drawn)
    maps = cached_lift_maps(rec, torch.tensor(comp.signs), required=comp.expression.required(), latents=x0,
                            schedule=sched)
    assert maps.targets == ("noise", "noise")
    assert bool(accept(comp, maps)[0]) is (not b_drawn)


def test_lift_auto_caches_a_pure_and_and_samples_fixed_trials_otherwise():
    from compkern.pipelines.generate import resolve_lift

    assert resolve_lift(parse_composition("a cat AND a dog"), "auto", "auto") == "cached"  # joint target
    assert resolve_lift(parse_composition("a cat AND NOT a dog"), "auto", "auto") == "public"  # noise target
    assert resolve_lift(parse_composition("a cat OR a dog"), "auto", "auto") == "public"
    assert resolve_lift(parse_composition("a cat AND a dog AND NOT a bird"), "auto", "auto") == "public"
    assert resolve_lift(parse_composition("a cat AND NOT a dog"), "auto", "joint") == "cached"
    assert resolve_lift(parse_composition("a cat AND a dog"), "fresh", "auto") == "fresh"


def test_record_every_default_follows_the_target():
    from compkern.pipelines.generate import record_every_default

    assert record_every_default(parse_composition("a cat AND a dog"), "auto") == 2  # joint: half the steps do
    assert record_every_default(parse_composition("a cat AND NOT a dog"), "auto") == 1  # noise: every step
    assert record_every_default(parse_composition("a cat AND NOT a dog"), "joint") == 2


def _record3(c_drawn: bool, *, seed: int = 0) -> tuple[StepRecord, torch.Tensor, NoiseSchedule]:
    """A's signal in columns 0-3, B's in 4-7, C's in 8-11 when ``c_drawn`` (else its prediction is
    the null's). Rows: [null, A, B, C, joint "A and B"]: the joint caption explains A and B only."""
    sched = NoiseSchedule.cosine(1000)
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = 1, 4, 12, 12
    x0 = torch.randn(B, C, H, W, generator=g)
    cols = torch.arange(W).view(1, 1, 1, W)
    region = [(cols >= 4 * k) & (cols < 4 * k + 4) for k in range(3)]
    rec = StepRecord()
    for t in range(950, 0, -50):
        noise = torch.randn(B, C, H, W, generator=g)
        e0 = noise + torch.randn(B, C, H, W, generator=g)
        eA, eB = (torch.where(r, noise, e0) for r in region[:2])
        eC = torch.where(region[2], noise, e0) if c_drawn else e0
        rec.x_t.append(sched.add_noise(x0, noise, torch.full((B,), t)))
        rec.t.append(torch.full((B,), t))
        rec.preds.append(torch.stack([e0, eA, eB, eC, torch.where(region[0] | region[1], noise, e0)]))
    return rec, x0, sched


@pytest.mark.parametrize("c_drawn", [True, False])
def test_a_and_b_and_not_c_fails_where_c_is_drawn_at_the_defaults(c_drawn):
    """The default target of a three-term NOT must see C: the joint caption "A and B" does not
    explain C, so C's lift against it is <= 0 wherever C is drawn (a NOT that could never fail)."""
    comp = parse_composition("a A AND a B AND NOT a C")
    rec, x0, sched = _record3(c_drawn)
    maps = cached_lift_maps(rec, torch.tensor(comp.signs), required=comp.expression.required(), latents=x0,
                            schedule=sched, joint_row=4)
    assert maps.targets == ("noise",) * 3 and bool(accept(comp, maps)[0]) is (not c_drawn)
    # the joint caption as target for every term would accept NOT C with C drawn
    joint = cached_lift_maps(rec, torch.tensor(comp.signs), target="joint", joint_row=4)
    assert bool(accept(comp, joint)[0])


class _KnownPipe:
    """A stand-in pipeline whose predictions are known: it recovers the true noise of x_t from
    the clean image x0 and predicts it exactly where a row's object is drawn (its region), the
    null's prediction (noise + a fixed offset field) elsewhere. Rows: [null, one per region]."""

    def __init__(self, x0, regions):
        self.schedule, self.x0, self.regions = NoiseSchedule.cosine(1000), x0, regions
        self.offset = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(1))

    def predict(self, x_t, t, embeddings, chunk_size=None):
        ab = self.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        x0 = self.x0.repeat(x_t.shape[0] // self.x0.shape[0], 1, 1, 1)
        noise = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        e0 = noise + self.offset
        return torch.stack([e0] + [torch.where(r, noise, e0) for r in self.regions])


@pytest.mark.parametrize("c_drawn", [True, False])
def test_fixed_trials_decide_a_three_term_not_at_the_defaults(c_drawn):
    """--lift auto's path for NOT expressions (FIXED_TRIALS fixed trials, noise target, the sampled-noise
    rule) on predictions whose answer is known: A and B drawn, C drawn or not."""
    from compkern.pipelines.lift_maps import FIXED_TRIALS, fixed_lift_maps

    comp = parse_composition("a A AND a B AND NOT a C")
    cols = torch.arange(12).view(1, 1, 12)
    regions = [(cols >= 4 * k) & (cols < 4 * k + 4) for k in range(3)]
    if not c_drawn:
        regions[2] = torch.zeros_like(regions[2])
    x0 = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    maps = fixed_lift_maps(_KnownPipe(x0, regions), x0, [None] * 4, torch.tensor(comp.signs), n_trials=FIXED_TRIALS,
                           required=comp.expression.required())
    assert maps.targets == ("noise",) * 3 and maps.source == "sampled"
    assert accept(comp, maps).tolist() == [not c_drawn] * 2


@pytest.mark.parametrize("b_drawn", [True, False])
def test_partial_margin_at_the_default_check_knows_whether_the_not_fails(b_drawn):
    """Early rejection's statistic at its defaults (the check after CHECK_AT of the steps, the noise
    target against the predicted x0 of the generation eps, the cached-noise rule) on the synthetic
    record whose answer is known: B drawn -> A AND NOT B fails (margin < 0), else passes."""
    from compkern.pipelines.early_reject import default_checks, partial_margins

    comp = parse_composition("a A AND NOT a B")
    rec, x0, sched = _record(b_drawn)
    weights = comp.weights(1.0, generate="joint", rows=3)
    (s,) = default_checks(len(rec))
    m = partial_margins(comp, rec, (s,), schedule=sched, weights=weights)
    assert (float(m[0, 0]) > 0) is (not b_drawn)


@pytest.mark.parametrize("b_drawn", [True, False])
def test_partial_margin_of_a_pure_and_at_the_default_check(b_drawn):
    """A AND B, the joint caption's cached maps at the default check: the joint row predicts the
    true noise; B's row does where B is drawn, else the null's -> the AND holds exactly when B is drawn."""
    from compkern.pipelines.early_reject import default_checks, partial_margins

    comp = parse_composition("a A AND a B")
    rec, x0, sched = _record(b_drawn)
    for i, x_t in enumerate(rec.x_t):  # the joint row: the true noise of x_t
        noise = (x_t - sched.sqrt_abar(rec.t[i], x_t) * x0) / sched.sqrt_one_minus_abar(rec.t[i], x_t)
        rec.preds[i] = torch.cat([rec.preds[i], noise[None]])
    assert comp.joint_row == 3
    (s,) = default_checks(len(rec))
    m = partial_margins(comp, rec, (s,))
    assert (float(m[0, 0]) > 0) is b_drawn
