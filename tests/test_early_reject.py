"""Early rejection (compkern.pipelines.early_reject): the calibration's guarantee, the partial
margins' causality, and the pipeline's dropping being invisible to the images that go on."""
import math

import pytest
import torch

from compkern.pipelines.composition import CompositionPipeline, parse_composition
from compkern.pipelines.early_reject import EarlyRejectRule, partial_margins
from compkern.pipelines.tiny import save_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return CompositionPipeline.from_pretrained(save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd") / "sd"))


def test_calibration_thresholds_by_hand():
    margins = torch.arange(1.0, 20.0)[None]  # 19 pilot images, all accepted: margins 1..19
    acc = torch.ones(19, dtype=torch.bool)
    assert EarlyRejectRule.calibrate(margins, acc, (5,), 0.95).thresholds == (1.0,)  # floor(0.05 * 20) = 1st
    assert EarlyRejectRule.calibrate(margins, acc, (5,), 0.9).thresholds == (2.0,)  # floor(0.1 * 20) = 2nd
    assert EarlyRejectRule.calibrate(margins.repeat(2, 1), acc, (5, 9), 0.9).thresholds == (1.0, 1.0)  # alpha / 2
    assert EarlyRejectRule.calibrate(margins, acc, (5,), 1.0).thresholds == (-math.inf,)
    assert EarlyRejectRule.calibrate(margins[:, :10], acc[:10], (5,), 0.95).thresholds == (-math.inf,)  # too few
    # rejected pilot images do not move the thresholds
    both = torch.cat([margins, -torch.arange(1.0, 50.0)[None]], 1)
    assert EarlyRejectRule.calibrate(both, torch.cat([acc, torch.zeros(49, dtype=torch.bool)]), (5,), 0.9).thresholds == (2.0,)


@pytest.mark.parametrize("confidence", [0.8, 0.95])
def test_calibrated_rule_keeps_new_accepted_images_at_the_confidence(confidence):
    """Exchangeable pilot and new images (margins from one distribution, decisions correlated):
    the share of new finally-accepted images that survive every check is >= confidence."""
    g = torch.Generator().manual_seed(0)
    kept, total = 0, 0
    for _ in range(400):
        z = torch.randn(2, 60, generator=g)
        final = z[1] + 0.5 * torch.randn(60, generator=g) > 0
        margins = torch.stack([z[0] + z[1], z[1]])  # two checks, the second closer to the final
        pilot, new = slice(0, 40), slice(40, 60)
        rule = EarlyRejectRule.calibrate(margins[:, pilot], final[pilot], (10, 20), confidence)
        survive = rule.keep(0, margins[0, new]) & rule.keep(1, margins[1, new])
        kept += int((survive & final[new]).sum())
        total += int(final[new].sum())
    assert kept / total >= confidence - 0.01


@pytest.mark.parametrize("bad", [0.5, 0.3, 1.01, float("nan"), "0.9"])
def test_bad_confidence_is_refused(bad):
    with pytest.raises(ValueError, match="early-reject"):
        EarlyRejectRule((5,), (0.0,), bad)
    with pytest.raises(ValueError, match="early-reject"):
        EarlyRejectRule.calibrate(torch.zeros(1, 4), torch.ones(4, dtype=torch.bool), (5,), bad)


def test_bad_checks_and_shapes_are_refused(sd):
    with pytest.raises(ValueError, match="one threshold per check"):
        EarlyRejectRule((5, 6), (0.0,), 0.9)
    with pytest.raises(ValueError, match="n_checks"):
        EarlyRejectRule.calibrate(torch.zeros(2, 4), torch.ones(4, dtype=torch.bool), (5,), 0.9)
    with pytest.raises(ValueError, match="checks must be increasing"):
        sd("a car AND a clock", seeds=[0], num_inference_steps=4, output_type="latent",
           early_reject=EarlyRejectRule((4,), (0.0,), 0.9))


@pytest.mark.parametrize("prompt", ["a black car AND a white clock", "a black car AND NOT a dog"])
def test_partial_margins_use_only_the_steps_before_the_check(sd, prompt):
    comp = parse_composition(prompt)
    res = sd(comp, seeds=[0, 1, 2], num_inference_steps=6, output_type="latent", record_joint=comp.joint is not None)
    kw = dict(schedule=sd.schedule, weights=res.weights, clip_x0=None)
    before = partial_margins(comp, res.record, (3,), **kw)
    for p in res.record.preds[3:]:
        p.mul_(-7.0)  # the future, changed
    assert torch.equal(partial_margins(comp, res.record, (3,), **kw), before)
    assert before.shape == (1, 3) and torch.isfinite(before).all()


@pytest.mark.parametrize("prompt,record", [("a black car AND a white clock", True), ("a black car AND NOT a dog", False)])
def test_dropping_is_invisible_to_the_images_that_go_on(sd, prompt, record):
    """Per seed, with ancestral noise: a survivor's latents equal its full-trajectory latents;
    confidence 1 (no threshold) gives exactly the full run; +inf stops everyone at the check."""
    comp = parse_composition(prompt)
    seeds = list(range(6))
    kw = dict(seeds=seeds, num_inference_steps=6, eta=1.0, output_type="latent", record=record, guidance_scale=3.0)
    full = sd(comp, **kw)
    off = sd(comp, early_reject=EarlyRejectRule((3,), (-math.inf,), 1.0), **kw)
    assert torch.equal(off.latents, full.latents) and off.alive.all() and off.n_evals >= full.n_evals
    mid = float(off.margins[0].median())
    part = sd(comp, early_reject=EarlyRejectRule((3,), (mid,), 0.9), **kw)
    assert torch.equal(part.margins, off.margins)
    assert torch.equal(part.alive, off.margins[0] >= mid) and 0 < int(part.alive.sum()) < len(seeds)
    assert torch.allclose(part.latents[part.alive], full.latents[part.alive], atol=1e-5)
    assert part.stopped.tolist() == [6 if a else 3 for a in part.alive.tolist()]
    assert part.n_evals < off.n_evals
    if record:
        assert part.record.preds[-1].shape[1] == int(part.alive.sum())
    none = sd(comp, early_reject=EarlyRejectRule((3,), (math.inf,), 0.9), **kw)
    assert not none.alive.any() and none.stopped.tolist() == [3] * len(seeds)


@pytest.mark.parametrize("prompt,record_every", [("a black car AND a white clock", 2), ("a black car AND NOT a dog", 1)])
def test_continuous_batching_gives_every_seed_its_own_image(sd, prompt, record_every):
    """3 slots, 7 seeds, ancestral noise: each image and its record equal the batch pipeline's for
    that seed, whatever slot it ran in; with early rejection a stopped slot is refilled at once
    and the survivors still equal their full trajectories."""
    from compkern.pipelines.continuous import ContinuousSampler, stack_record

    comp = parse_composition(prompt)
    seeds = list(range(10, 17))
    kw = dict(num_inference_steps=6, eta=1.0, guidance_scale=3.0, record_every=record_every,
              record_joint=comp.joint is not None)
    full = sd(comp, seeds=seeds, output_type="latent", **kw)
    out = list(ContinuousSampler(sd, comp, slots=3, **kw).run(seeds))
    assert sorted(r.seed for r in out) == seeds and all(r.stopped == 6 for r in out)
    by = {r.seed: r for r in out}
    for b, s in enumerate(seeds):
        assert torch.allclose(by[s].latents, full.latents[b], rtol=1e-4, atol=1e-4)
    rec = stack_record([by[s] for s in seeds])
    for a, f in zip(rec.preds, full.record.preds):
        assert torch.allclose(a, f, rtol=1e-4, atol=1e-4)
    off = sd(comp, seeds=seeds, output_type="latent", early_reject=EarlyRejectRule((3,), (-math.inf,), 1.0), **kw)
    rule = EarlyRejectRule((3,), (float(off.margins[0].median()),), 0.9)
    early = list(ContinuousSampler(sd, comp, slots=3, early_reject=rule, **kw).run(seeds))
    by = {r.seed: r for r in early}
    alive = off.margins[0] >= rule.thresholds[0]
    for b, s in enumerate(seeds):
        assert by[s].stopped == (6 if alive[b] else 3)
        assert torch.allclose(by[s].margins, off.margins[:, b], atol=1e-4)
        if alive[b]:
            assert torch.allclose(by[s].latents, full.latents[b], rtol=1e-4, atol=1e-4)
    assert 0 < int(alive.sum()) < len(seeds)
    assert sum(r.rows for r in early) < sum(r.rows for r in out)  # a stopped image spends no more rows


def test_continuous_sampler_refuses_bad_settings(sd):
    from compkern.pipelines.continuous import ContinuousSampler

    with pytest.raises(ValueError, match="slots"):
        ContinuousSampler(sd, "a car AND a clock", slots=0)
    with pytest.raises(ValueError, match="checks must be increasing"):
        ContinuousSampler(sd, "a car AND a clock", num_inference_steps=4, early_reject=EarlyRejectRule((4,), (0.0,), 0.9))


@pytest.mark.parametrize("confidence,n_checks", [(0.95, 1), (0.9, 1), (0.9, 2), (0.8, 1), (0.6, 3)])
def test_min_pilot_accepts_is_where_the_checks_turn_on(confidence, n_checks):
    from compkern.pipelines.early_reject import min_pilot_accepts

    n = min_pilot_accepts(confidence, n_checks)
    checks = tuple(range(1, n_checks + 1))
    on = EarlyRejectRule.calibrate(torch.arange(float(n)).repeat(n_checks, 1), torch.ones(n, dtype=torch.bool), checks,
                                   confidence)
    off = EarlyRejectRule.calibrate(torch.arange(float(n - 1)).repeat(n_checks, 1), torch.ones(n - 1, dtype=torch.bool),
                                    checks, confidence)
    assert all(math.isfinite(t) for t in on.thresholds) and all(t == -math.inf for t in off.thresholds)
    assert min_pilot_accepts(1.0) == 0


def test_early_rejection_of_an_and_generated_composed_records_the_joint_row(sd):
    """The partial margin of a pure AND needs the joint caption's row even where generation does
    not use it (--generate composed)."""
    comp = parse_composition("a black car AND a white clock")
    res = sd(comp, seeds=[0, 1], num_inference_steps=4, generate="composed", output_type="latent",
             early_reject=EarlyRejectRule((2,), (-math.inf,), 1.0))
    assert torch.isfinite(res.margins).all() and res.alive.all()


def test_perpendicular_negation_in_the_pipeline_and_the_continuous_sampler(sd):
    """--negation perp changes a NOT prompt's images, not a pure AND's; both samplers agree."""
    from compkern.pipelines.continuous import ContinuousSampler

    kw = dict(num_inference_steps=4, guidance_scale=3.0, eta=1.0)
    for prompt, differs in (("a black car AND NOT a dog", True), ("a black car AND a white clock", False)):
        lin = sd(prompt, seeds=[0, 1, 2], output_type="latent", **kw)
        perp = sd(prompt, seeds=[0, 1, 2], output_type="latent", negation="perp", **kw)
        assert (not torch.allclose(lin.latents, perp.latents, atol=1e-4)) is differs
        cont = list(ContinuousSampler(sd, prompt, slots=2, negation="perp", **kw).run([0, 1, 2]))
        by = {r.seed: r.latents for r in cont}
        assert torch.allclose(torch.stack([by[s] for s in (0, 1, 2)]), perp.latents, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="negation"):
        sd("a cat AND NOT a dog", seeds=[0], num_inference_steps=2, output_type="latent", negation="orthogonal")
