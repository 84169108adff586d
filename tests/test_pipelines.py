"""The Stable Diffusion front end on tiny random-weight pipelines built from configs, saved with
save_pretrained and loaded back (offline): batched composed eps vs per-prompt diffusers calls,
recorded predictions, lift maps and the object rule, `compkern generate` with resume, and the
torchrun path with 2 gloo processes."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compkern.ops import combine_eps
from compkern.pipelines import CompositionPipeline, LiftMaps, accept, cached_lift_maps, parse_composition
from compkern.experiments import generate as gen
from compkern.pipelines.lift_maps import overlay, save_overlays
from compkern.pipelines.tiny import save_tiny_pipeline
from compkern.utils.checkpoint import load

PROMPT = "a black car AND a white clock AND NOT a dog"
# Settings under which the tiny random SD model accepts some images and rejects others (see
# test_generate_accepts_and_rejects): cached noise target, object rule with threshold 0 and 50 of
# 64 latent pixels (random weights: the decisions mean nothing, the mechanics are tested).
GEN = ["--prompt", "a black car AND NOT a dog", "--steps", "3", "--batch-size", "4", "--dtype", "fp32",
       "--device", "cpu", "--lift", "cached", "--target", "noise", "--threshold", "0", "--min-pixels", "50", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread avoids oversubscription


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd") / "sd")


@pytest.fixture(scope="module")
def sdxl_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "sdxl", sdxl=True)


@pytest.fixture(scope="module")
def sd(sd_path):
    return CompositionPipeline.from_pretrained(sd_path)


@pytest.fixture(scope="module")
def sdxl(sdxl_path):
    return CompositionPipeline.from_pretrained(sdxl_path)


def _reference_conditions(path: Path, sdxl: bool, comp) -> list[dict]:
    """UNet kwargs of [null, *components], each encoded on its own by diffusers' own pipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if not sdxl:
        ref = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
        pos, neg = ref.encode_prompt(comp.components[0], "cpu", 1, True, negative_prompt="")
        out = [{"encoder_hidden_states": neg}, {"encoder_hidden_states": pos}]
        for c in comp.components[1:]:
            out.append({"encoder_hidden_states": ref.encode_prompt(c, "cpu", 1, False)[0]})
        return out
    ref = StableDiffusionXLPipeline.from_pretrained(path)
    size = ref.unet.config.sample_size * ref.vae_scale_factor
    tid = ref._get_add_time_ids((size, size), (0, 0), (size, size), torch.float32,
                                text_encoder_projection_dim=ref.text_encoder_2.config.projection_dim)
    out = []
    for c in ["", *comp.components]:  # the null row is "" encoded like any prompt (CompLift's public code), not zeroed
        pe, _, pp, _ = ref.encode_prompt(c, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        out.append({"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": pp, "time_ids": tid}})
    assert float(out[0]["encoder_hidden_states"].detach().abs().max()) > 0
    return out


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_composed_eps_equals_per_prompt_calls(which, request):
    pipe = request.getfixturevalue(which)
    path = request.getfixturevalue(f"{which}_path")
    comp, emb = pipe.prepare(PROMPT)
    B = 3
    x = torch.randn(B, 4, 8, 8)
    t = torch.tensor([999, 500, 3])
    preds = pipe.predict(x, t, emb)  # one batched call of (K+1) x B rows
    chunked = pipe.predict(x, t, emb, chunk_size=5)  # odd chunks cut across conditions
    assert preds.shape == (comp.K + 1, B, 4, 8, 8)
    torch.testing.assert_close(chunked, preds, atol=1e-6, rtol=1e-5)
    ref = _reference_conditions(path, which == "sdxl", comp)
    direct = torch.stack([torch.cat([pipe.unet(x[b:b + 1], t[b:b + 1], **kw).sample for b in range(B)]) for kw in ref])
    torch.testing.assert_close(preds, direct, atol=2e-5, rtol=1e-4)
    w = comp.weights(7.5)
    assert w.tolist() == [7.5, 7.5, -7.5]
    want = direct[0] + sum(w[k] * (direct[k + 1] - direct[0]) for k in range(comp.K))
    torch.testing.assert_close(combine_eps(preds, w), want, atol=1e-4, rtol=1e-4)


def test_prompts_encoded_once_and_records_equal_separate_calls(sd):
    sd.encode(["", "a black car", "a white clock", "a dog"])
    before = sd.n_encodes
    out = sd(PROMPT, seeds=[5, 6], num_inference_steps=4, output_type="pt", generate="composed")
    out2 = sd(PROMPT, seeds=[5, 6], num_inference_steps=4, output_type="latent", chunk_size=3, generate="composed")
    assert sd.n_encodes == before  # cached: neither call ran the text encoder
    assert out.images.shape == (2, 3, 16, 16) and 0 <= float(out.images.min()) and float(out.images.max()) <= 1
    assert out.n_evals == 4 * 4 * 2 and len(out.record) == 4
    torch.testing.assert_close(out2.latents, out.latents, atol=2e-4, rtol=1e-3)  # chunking: numerics only
    emb = sd.encode(["", *out.composition.components])
    for x_t, t, preds in zip(out.record.x_t, out.record.t, out.record.preds):
        assert preds.device == x_t.device
        torch.testing.assert_close(preds, sd.predict(x_t, t, emb), atol=1e-6, rtol=1e-5)
    # seeds fix each image regardless of its batch
    single = sd(PROMPT, seeds=[6], num_inference_steps=4, output_type="latent", generate="composed")
    torch.testing.assert_close(single.latents[0], out.latents[1], atol=2e-4, rtol=1e-3)


def test_ancestral_noise_follows_each_seed_not_the_batch(sd):
    """eta > 0: image i's step noise comes from its own seed's generator (diffusers' list of
    generators), so it is the same image alone, first or second in a batch."""
    pair = sd(PROMPT, seeds=[5, 6], num_inference_steps=4, output_type="latent", eta=1.0)
    for b, s in enumerate([5, 6]):
        alone = sd(PROMPT, seeds=[s], num_inference_steps=4, output_type="latent", eta=1.0)
        torch.testing.assert_close(alone.latents[0], pair.latents[b], atol=2e-4, rtol=1e-3)
    swapped = sd(PROMPT, seeds=[6, 5], num_inference_steps=4, output_type="latent", eta=1.0)
    torch.testing.assert_close(swapped.latents.flip(0), pair.latents, atol=2e-4, rtol=1e-3)
    ddim = sd(PROMPT, seeds=[5, 6], num_inference_steps=4, output_type="latent")
    assert not torch.allclose(ddim.latents, pair.latents, atol=1e-3)  # the noise was really added


def test_joint_generation_is_guidance_on_the_joint_caption(sd):
    """generate='joint' (the default): eps = eps_0 + g (eps_joint - eps_0) + g sum over the
    non-required components (NOT pushes away); the joint caption is row K+1 of the record."""
    comp, emb = sd.prepare(PROMPT, with_joint=True)
    assert comp.joint == "a black car and a white clock" and comp.joint_row == 4 and len(emb) == 5
    assert emb.prompts == ["", "a black car", "a white clock", "a dog", "a black car and a white clock"]
    assert comp.weights(2.0, generate="joint", rows=5).tolist() == [0.0, 0.0, -2.0, 2.0]
    out = sd(PROMPT, seeds=[3], num_inference_steps=3, output_type="latent", guidance_scale=2.0)
    assert out.generate == "joint" and out.n_evals == 3 * 5 and out.record.preds[0].shape[0] == 5
    p = out.record.preds[0]
    want = p[0] + 2.0 * (p[4] - p[0]) - 2.0 * (p[3] - p[0])
    ref = sd(PROMPT, seeds=[3], num_inference_steps=1, output_type="latent", guidance_scale=2.0)
    x_T = sd.initial_latents([3])
    a = float(sd.schedule.alphas_cumprod[int(ref.record.t[0][0])])
    torch.testing.assert_close(ref.latents, (x_T - (1 - a) ** 0.5 * want) / a ** 0.5, atol=1e-4, rtol=1e-4)
    # without a record only the rows generation weighs are evaluated (base, dog, joint)
    bare = sd(PROMPT, seeds=[3], num_inference_steps=3, output_type="latent", guidance_scale=2.0, record=False)
    assert bare.n_evals == 3 * 3
    torch.testing.assert_close(bare.latents, out.latents, atol=1e-4, rtol=1e-4)
    # record_every=2: all rows on steps 0, 2 (kept), only base, dog and joint on step 1
    half = sd(PROMPT, seeds=[3], num_inference_steps=3, output_type="latent", guidance_scale=2.0, record_every=2)
    assert len(half.record) == 2 and half.n_evals == 2 * 5 + 1 * 3
    torch.testing.assert_close(half.latents, out.latents, atol=1e-4, rtol=1e-4)
    for a, b in zip(half.record.preds, out.record.preds[::2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # a joint that is one component ("a cat AND NOT a dog" -> "a cat") reuses that row
    c2 = parse_composition("a cat AND NOT a dog")
    assert c2.joint == "a cat" and c2.joint_row == 1 and c2.condition_prompts() == ["", "a cat", "a dog"]
    # no required component: composed, and asking for joint weights says why not
    c3 = parse_composition("a cat OR a dog")
    assert c3.joint is None and sd(c3, seeds=[1], num_inference_steps=1, output_type="latent").generate == "composed"
    with pytest.raises(ValueError, match="generate='joint'"):
        c3.weights(generate="joint")
    with pytest.raises(ValueError, match="generate"):
        sd(PROMPT, seeds=[1], num_inference_steps=1, generate="mixed")


def test_auto_chunks_halve_on_out_of_memory(sd, monkeypatch):
    from compkern.pipelines import composition

    calls = []
    real = composition.ConditionedUNet.__call__

    def limited(self, x_t, t, ids):  # a device that holds at most 5 rows per call
        calls.append(x_t.shape[0])
        if x_t.shape[0] > 5:
            raise torch.OutOfMemoryError("simulated")
        return real(self, x_t, t, ids)

    ref = sd(PROMPT, seeds=[1, 2], num_inference_steps=2, output_type="latent", generate="composed")
    monkeypatch.setattr(composition.ConditionedUNet, "__call__", limited)
    out = sd(PROMPT, seeds=[1, 2], num_inference_steps=2, output_type="latent", chunk_size="auto", generate="composed")
    assert sd.last_chunk_size == 4 and calls[:2] == [8, 4]  # 8 rows failed, then chunks of 4
    assert out.n_evals == 2 * 8 and len(out.record) == 2
    torch.testing.assert_close(out.latents, ref.latents, atol=2e-4, rtol=1e-3)
    with pytest.raises(torch.OutOfMemoryError):
        sd(PROMPT, seeds=[1, 2], num_inference_steps=2, output_type="latent", chunk_size=8, generate="composed")


def test_v_prediction_outputs_are_converted_to_eps(tmp_path):
    pipe = CompositionPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "v", prediction_type="v_prediction"))
    assert pipe.prediction_type == "v_prediction"
    comp, emb = pipe.prepare("a cat AND a dog")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    preds = pipe.predict(x, t, emb)
    v = pipe.unet(x, t, encoder_hidden_states=emb.states[1:2].expand(2, -1, -1)).sample
    torch.testing.assert_close(preds[1], pipe.schedule.v_to_eps(x, v, t), atol=1e-5, rtol=1e-5)


def test_expression_parsing_and_errors():
    c = parse_composition("(a red cube OR a blue ball) AND NOT 0.5*a dog and a cat")
    assert c.components == ("a red cube", "a blue ball", "a dog and a cat")
    assert c.signs == (0.5, 0.5, -0.5)
    for bad in ["", "a cat AND", "(a cat", '"a cat']:
        with pytest.raises(ValueError):
            parse_composition(bad)


def test_cached_lift_maps_match_the_definition(sd):
    out = sd(PROMPT, seeds=[1, 2], num_inference_steps=5, output_type="latent")
    signs = torch.tensor(out.composition.signs)
    P = torch.stack(out.record.preds).double()  # (T, K+2, B, C, h, w): the joint caption is row 4
    joint = cached_lift_maps(out.record, signs, target="joint", joint_row=out.composition.joint_row)
    d = (P[:, 4:5] - P[:, :1]).square() - (P[:, 4:5] - P[:, 1:4]).square()
    torch.testing.assert_close(joint.pixel_lift.double(), d.mean(dim=(0, 3)), atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="joint_row"):
        cached_lift_maps(out.record, signs, target="joint")
    maps = cached_lift_maps(out.record, signs, target="composed")
    assert maps.n_evals == 0 and maps.n_trials == 5 and maps.pixel_lift.shape == (3, 2, 8, 8)
    P = P[:, :4]  # (T, K+1, B, C, h, w)
    target = P[:, 0] + (signs.double()[None, :, None, None, None, None] * (P[:, 1:] - P[:, :1])).sum(1)
    d = (target[:, None] - P[:, :1]).square() - (target[:, None] - P[:, 1:]).square()
    torch.testing.assert_close(maps.pixel_lift.double(), d.mean(dim=(0, 3)), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(maps.lift.double(), d.mean(dim=(0, 3, 4, 5)), atol=1e-6, rtol=1e-4)
    noise = cached_lift_maps(out.record, signs, target="noise", latents=out.latents, schedule=sd.schedule)
    assert noise.pixel_lift.shape == maps.pixel_lift.shape and not torch.allclose(noise.pixel_lift, maps.pixel_lift)
    with pytest.raises(ValueError, match="signs"):
        cached_lift_maps(out.record, torch.ones(5), target="composed")  # 5 components need 6 rows
    with pytest.raises(ValueError, match="target"):
        cached_lift_maps(out.record, signs, target="x")
    # the default 'term' target: car and clock (required) against the joint, the dog against the noise
    required = out.composition.expression.required()
    assert required == [0, 1]
    term = cached_lift_maps(out.record, signs, target="term", joint_row=out.composition.joint_row,
                            required=required, latents=out.latents, schedule=sd.schedule)
    assert term.targets == ("joint", "joint", "noise")
    torch.testing.assert_close(term.pixel_lift[:2], joint.pixel_lift[:2])
    torch.testing.assert_close(term.pixel_lift[2], noise.pixel_lift[2])
    with pytest.raises(ValueError, match="required"):
        cached_lift_maps(out.record, signs, target="term", joint_row=out.composition.joint_row,
                         latents=out.latents, schedule=sd.schedule)


def test_fixed_and_fresh_trials(sd):
    from compkern.pipelines.lift_maps import evenly_spaced_trials, fixed_lift_maps, fresh_lift_maps

    comp, emb = sd.prepare("a black car AND NOT a dog")
    x0 = torch.randn(2, 4, 8, 8)
    signs = torch.tensor(comp.signs)
    maps = fixed_lift_maps(sd, x0, emb, signs, n_trials=5, chunk_trials=2, target="composed")  # uneven chunks
    assert maps.n_evals == 5 * 3 * 2 and maps.n_trials == 5
    ts, bank = evenly_spaced_trials(sd.schedule.num_steps, 5, (4, 8, 8))
    assert ts.tolist() == [999, 749, 499, 250, 0]
    ref = torch.zeros(2, 2, 8, 8, dtype=torch.float64)
    for i in range(5):  # one trial at a time, the public way
        t = ts[i].expand(2)
        p = sd.predict(sd.schedule.add_noise(x0, bank[i].expand(2, 4, 8, 8), t), t, emb).double()
        tgt = p[0] + (signs.double()[:, None, None, None, None] * (p[1:] - p[:1])).sum(0)
        ref += ((tgt - p[0]).square() - (tgt - p[1:]).square()).mean(2) / 5
    torch.testing.assert_close(maps.pixel_lift.double(), ref, atol=1e-6, rtol=1e-4)
    joint = fixed_lift_maps(sd, x0, emb, signs, n_trials=5, chunk_trials=5, target="joint", joint_row=comp.joint_row)
    ref = torch.zeros(2, 2, 8, 8, dtype=torch.float64)
    for i in range(5):
        t = ts[i].expand(2)
        p = sd.predict(sd.schedule.add_noise(x0, bank[i].expand(2, 4, 8, 8), t), t, emb).double()
        ref += ((p[1] - p[0]).square() - (p[1] - p[1:]).square()).mean(2) / 5  # "a black car" is the joint
    torch.testing.assert_close(joint.pixel_lift.double(), ref, atol=1e-6, rtol=1e-4)
    noise = fixed_lift_maps(sd, x0, emb, signs, n_trials=5, chunk_trials=3, target="noise")
    term = fixed_lift_maps(sd, x0, emb, signs, n_trials=5, chunk_trials=3, joint_row=comp.joint_row,
                           target="term", required=comp.expression.required())  # one pass, both targets
    assert term.targets == ("joint", "noise") and term.n_evals == noise.n_evals == 5 * 3 * 2
    torch.testing.assert_close(term.pixel_lift[0], joint.pixel_lift[0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(term.pixel_lift[1], noise.pixel_lift[1], atol=1e-6, rtol=1e-4)
    fresh = fresh_lift_maps(sd, x0, emb, n_trials=4)
    assert fresh.n_evals == 4 * 3 * 2 and fresh.pixel_lift.shape == (2, 2, 8, 8)
    assert torch.isfinite(fresh.pixel_lift).all()


def test_object_rule_counts_pixels_against_the_threshold():
    comp = parse_composition("a car AND NOT a dog")
    pix = torch.full((2, 3, 4, 4), -1.0)
    pix[0, 0, :2] = 1.0  # car: 8 of 16 pixels positive in image 0
    pix[0, 1, :1] = 1.0  # car: 4 pixels in image 1
    pix[0, 2, :3] = 1.0  # car: 12 pixels in image 2 ...
    pix[1, 2, :2] = 1.0  # ... but the dog shows in 8 pixels there
    maps = LiftMaps(pix, 10, 0)
    assert maps.counts(0.5).tolist() == [[8, 4, 12], [0, 0, 8]]
    assert accept(comp, maps, threshold=0.5, min_pixels=8).tolist() == [True, False, False]
    assert accept(comp, maps, threshold=0.5, min_pixels=0.25).tolist() == [True, True, False]  # 4 of 16 pixels
    assert accept(comp, maps, threshold=2.0, min_pixels=1).tolist() == [False, False, False]
    # mean rule: car lifts (0, -0.5, 0.5), dog lifts (-1, -1, 0): only image 2 has car > 0 and dog <= 0
    assert accept(comp, maps, rule="mean").tolist() == [False, False, True]
    with pytest.raises(ValueError, match="rule"):
        accept(comp, maps, rule="max")
    with pytest.raises(ValueError, match="min_pixels"):
        maps.scores(0.0, -1)
    # a fraction asks for ceil(fraction x h x w) pixels: 0.27 of 16 is 4.32 -> 5, so 4 do not pass
    assert maps.min_count(0.27) == 5 and maps.min_count(0.25) == 4 and maps.min_count(3) == 3
    assert accept(comp, maps, threshold=0.5, min_pixels=0.27).tolist() == [True, False, False]
    for bad in (0, 2.5, 17):  # nothing, a fractional count, more pixels than the latent has
        with pytest.raises(ValueError, match="min_pixels"):
            maps.scores(0.0, bad)
    # the default is a share of the image, so a 16 x 16 latent can hold an object
    from compkern.pipelines.lift_maps import DEFAULT_MIN_PIXELS
    small = LiftMaps(torch.zeros(2, 1, 16, 16), 1, 0)
    assert small.min_count(DEFAULT_MIN_PIXELS) == 48 and LiftMaps(torch.zeros(1, 1, 128, 128), 1, 0).min_count(DEFAULT_MIN_PIXELS) == 3072


def test_each_row_keeps_the_rule_of_its_target():
    from compkern.pipelines.lift_maps import DEFAULT_RULES, SAMPLED_NOISE_RULE, default_rule, per_term

    comp = parse_composition("a car AND NOT a dog")
    pix = torch.zeros(2, 1, 16, 16)
    pix[0, 0, :4] = 0.01  # car: 64 pixels at 0.01 (present by the joint rule: > 5e-5 on 48 pixels)
    pix[1, 0, :3] = 7e-4  # dog: 48 pixels at 7e-4: present by the joint rule, absent at cached noise's 1e-3
    assert DEFAULT_RULES["noise"][0] > 7e-4 > SAMPLED_NOISE_RULE[0] > DEFAULT_RULES["joint"][0]
    assert default_rule("noise", "sampled") == SAMPLED_NOISE_RULE and default_rule("joint", "sampled") == DEFAULT_RULES["joint"]
    joint_only = LiftMaps(pix, 1, 0, ("joint", "joint"))
    assert not bool(accept(comp, joint_only)[0])  # the dog counts at 5e-5
    term = per_term(joint_only, LiftMaps(pix, 1, 0, ("noise", "noise")), [0])
    assert term.targets == ("joint", "noise") and bool(accept(comp, term)[0])
    # the same noise maps from sampled trials: their rule (5e-4 on 3/16 = 48 pixels) sees the dog
    sampled = per_term(joint_only, LiftMaps(pix, 1, 0, ("noise", "noise"), "sampled"), [0])
    assert sampled.source == "sampled" and not bool(accept(comp, sampled)[0])
    with pytest.raises(ValueError, match="source"):
        LiftMaps(pix, 1, 0, ("noise", "noise"), "fresh")
    assert term.counts().tolist() == [[64], [0]] and term.counts(0.0).tolist() == [[64], [48]]
    # one number overrides every row, K numbers set each row
    assert not bool(accept(comp, term, threshold=0.0)[0])
    assert bool(accept(comp, term, threshold=[0.0, 1e-3], min_pixels=[24, 0.5])[0])
    with pytest.raises(ValueError, match="K = 2"):
        term.scores(threshold=[0.0])
    with pytest.raises(ValueError, match="targets"):
        LiftMaps(pix, 1, 0, ("joint",))
    with pytest.raises(ValueError, match="required"):
        per_term(None, term, [0])  # a required row needs joint maps
    with pytest.raises(ValueError, match="required"):
        per_term(joint_only, term, [2])


def test_not_can_fail_on_a_record_with_both_objects_drawn():
    """A synthetic record (the review's check): A's signal in the left half, B's in the right
    half, the joint caption explaining both. "A AND NOT B" must reject it with the joint and the
    noise targets; the composed target (eps_0 + a - b) makes B's lift 2 a.b - 3 |b|^2 < 0 where
    the maps do not overlap, so it accepts."""
    from compkern.models.schedule import NoiseSchedule
    from compkern.samplers.composed import StepRecord

    sched = NoiseSchedule.cosine(1000)
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 1, 4, 8, 8
    x0 = torch.randn(B, C, H, W, generator=g)
    rec = StepRecord()
    left = torch.zeros(1, 1, 1, W)
    left[..., : W // 2] = 1.0
    for t in (900, 600, 300):
        noise = torch.randn(B, C, H, W, generator=g)
        x_t = sched.add_noise(x0, noise, torch.full((B,), t))
        e0 = noise + torch.randn(B, C, H, W, generator=g)  # the null explains neither object
        eA = torch.where(left.bool(), noise, e0)  # A explains the left half, B the right half
        eB = torch.where(left.bool(), e0, noise)
        rec.x_t.append(x_t)
        rec.t.append(torch.full((B,), t))
        rec.preds.append(torch.stack([e0, eA, eB, noise]))  # row 3: a joint caption that explains both
    comp = parse_composition("a A AND NOT a B")
    signs = torch.tensor(comp.signs)
    rule = dict(threshold=0.0, min_pixels=0.25)
    for target, joint_row in (("joint", 3), ("noise", None), ("term", 3)):
        maps = cached_lift_maps(rec, signs, target=target, joint_row=joint_row, required=[0], latents=x0,
                                schedule=sched)
        assert maps.scores(**rule)[1, 0] > 0, target  # B is present ...
        assert not bool(accept(comp, maps, **rule)[0]), target  # ... so NOT B fails
    assert not bool(accept(comp, maps)[0])  # 'term' at the library's defaults
    composed = cached_lift_maps(rec, signs, target="composed")
    assert bool(accept(comp, composed, **rule)[0])  # the old default accepts it
    # and NOT can pass: B's prediction explains nothing (it is the null's), the joint row only A
    for p in rec.preds:
        p[2] = p[0]
        p[3] = p[1]
    maps = cached_lift_maps(rec, signs, target="term", joint_row=3, required=[0], latents=x0, schedule=sched)
    assert maps.scores()[1, 0] < 0 and bool(accept(comp, maps)[0])


def test_overlays(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (16, 16), (0, 128, 0))
    lift = torch.zeros(4, 4)
    lift[0, 0], lift[3, 3] = 1.0, -1.0
    ov = overlay(img, lift)
    a = torch.from_numpy(__import__("numpy").asarray(ov).astype("float32"))
    assert ov.size == (16, 16) and a[0, 0, 0] > a[0, 0, 2] and a[15, 15, 2] > a[15, 15, 0]  # red +, blue -
    files = save_overlays([img, img], LiftMaps(torch.randn(2, 2, 4, 4), 1, 0), tmp_path, ["a", "b"])
    assert files == [["a_lift0.png", "a_lift1.png"], ["b_lift0.png", "b_lift1.png"]]
    assert all((tmp_path / f).exists() for row in files for f in row)
    with pytest.raises(ValueError, match="pixel_lift"):
        overlay(img, torch.zeros(1, 4, 4))


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    gen.add_arguments(p)
    return gen.run(p.parse_args(argv))


def test_generate_accepts_and_rejects_then_resumes(sd_path, tmp_path):
    out = tmp_path / "run"
    assert _run(["--model", str(sd_path), "--out", str(out), "--n", "3", *GEN]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["n_accepted"] == 3 and m["complete"] and 0 < m["acceptance_rate"] < 1
    assert m["components"] == ["a black car", "a dog"] and m["unet_rows"] == m["attempted"] * 3 * 3
    for r in m["accepted"]:
        assert (out / r["image"]).exists() and len(r["maps"]) == 2 and all((out / f).exists() for f in r["maps"])
        assert r["pixels_above"][0] >= 50 and r["pixels_above"][1] < 50
    shards = sorted((out / "shards").glob("batch-*.pt"))
    stamps = {f.name: f.stat().st_mtime_ns for f in shards}
    # an interrupted run: the last batch never committed
    shards[-1].unlink()
    (out / "manifest.json").unlink()
    assert _run(["--model", str(sd_path), "--out", str(out), "--n", "3", *GEN]) == 0
    m2 = json.loads((out / "manifest.json").read_text())
    assert [r["index"] for r in m2["accepted"]] == [r["index"] for r in m["accepted"]]
    assert all(f.stat().st_mtime_ns == stamps[f.name] for f in shards[:-1])  # committed batches were skipped
    # raising the target continues from there
    assert _run(["--model", str(sd_path), "--out", str(out), "--n", "5", *GEN]) == 0
    m3 = json.loads((out / "manifest.json").read_text())
    assert m3["n_accepted"] == 5 and [r["index"] for r in m3["accepted"][:3]] == [r["index"] for r in m["accepted"]]
    with pytest.raises(ValueError, match="other settings"):
        _run(["--model", str(sd_path), "--out", str(out), "--n", "5", *GEN[:-2], "--steps", "4"])


def test_generate_with_fresh_adaptive_trials(sd_path, tmp_path):
    out = tmp_path / "fresh"
    args = [a for a in GEN if a not in ("--threshold", "0", "--min-pixels", "50", "--lift", "cached")]
    assert _run(["--model", str(sd_path), "--out", str(out), "--n", "2", "--max-attempts", "4", "--lift", "fresh",
                 "--rule", "mean", "--trials", "8", "--save-rejected", *args]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["attempted"] == 4 and m["unet_rows"] > 4 * 3 * 3  # generation rows plus the fresh trials
    recs = [torch.load(f, weights_only=False)["records"] for f in (out / "shards").glob("*.pt")][0]
    assert all(r["image"] is not None for r in recs)  # --save-rejected keeps every image
    assert all((r["accepted"]) == (r["lift"][0] > 0 and r["lift"][1] <= 0) for r in recs)


def test_torchrun_two_gloo_processes_share_one_global_target(sd_path, tmp_path):
    serial, dist_out = tmp_path / "serial", tmp_path / "dist"
    assert _run(["--model", str(sd_path), "--out", str(serial), "--n", "3", *GEN]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "compkern.cli", "generate", "--model", str(sd_path), "--out", str(dist_out), "--num-images", "3", *GEN]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((dist_out / "manifest.json").read_text())
    s = json.loads((serial / "manifest.json").read_text())
    assert m["config"]["world_size"] == 2 and m["n_accepted"] == 3
    # the same first-n accepted images as one process, whoever generated them
    assert [r["index"] for r in m["accepted"]] == [r["index"] for r in s["accepted"]]
    ranks = {torch.load(f, weights_only=False)["rank"] for f in (dist_out / "shards").glob("batch-*.pt")}
    assert ranks == {0, 1}
    # the target is global: the ranks stop in the round that reaches it
    assert m["batches"] <= s["batches"] + 1


@pytest.fixture(scope="module")
def pixel_path(tmp_path_factory):
    """A pixel-space text-to-image folder without vae/: the shapes world's layout (`compkern sepen train`)."""
    from compkern.models.shapes import build_components

    path = tmp_path_factory.mktemp("pixel") / "model"
    build_components(naming="nouns").save_pretrained(path)
    return path


def test_pixel_space_folder_runs_through_the_pipeline_and_generate(pixel_path, tmp_path):
    assert not (pixel_path / "vae").exists()
    pipe = CompositionPipeline.from_pretrained(pixel_path)
    assert pipe.vae is None and pipe.vae_scale == 1 and pipe.latent_channels == 3
    out = pipe("a red_square AND a blue_ring", seeds=[0, 1], num_inference_steps=3, guidance_scale=3.0,
               output_type="pt", eta=1.0)
    assert out.latents.shape == (2, 3, 16, 16) and float(out.latents.abs().max()) <= 1.0  # x0 clipped in pixel space
    torch.testing.assert_close(out.images, (out.latents / 2 + 0.5).clamp(0, 1))  # decoding is the identity
    run = tmp_path / "px"
    assert _run(["--model", str(pixel_path), "--out", str(run), "--n", "1", "--max-attempts", "2", "--steps", "2",
                 "--batch-size", "2", "--prompt", "a red_square AND NOT a green_cross", "--dtype", "fp32",
                 "--device", "cpu", "--threads", "1", "--save-rejected"]) == 0
    m = json.loads((run / "manifest.json").read_text())
    assert m["attempted"] == 2 and m["config"]["generate"] == "joint" and m["config"]["target"] == "auto"
    assert all((run / f"images/{i:06d}.png").exists() for i in range(2))


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "a cat AND"], "empty component"),
    (["--prompt", "(a cat AND a dog"], "unbalanced parentheses"),
    (["--prompt", "a cat AND a dog)"], "unbalanced parentheses"),
    (["--n", "0"], "--n"),
    (["--lift", "public", "--trials", "0"], "--trials"),
    (["--prompt", "a cat OR a dog", "--target", "joint"], "--target joint"),
    (["--early-reject", "0.5"], "--early-reject"),
    (["--early-reject", "1.5"], "--early-reject"),
    (["--early-reject", "0.9", "--pilot", "0"], "--pilot"),
    (["--early-reject", "0.9", "--lift", "none"], "--early-reject"),
    (["--early-reject", "0.9", "--early-check", "1.0"], "--early-check"),
    (["--early-reject", "0.9", "--scheduler", "dpm++"], "drop --scheduler"),
])
def test_generate_bad_input_names_the_argument(sd_path, tmp_path, argv, match):
    base = {"--prompt": "a cat AND NOT a dog", "--n": "1"}
    args = dict(base)
    it = iter(argv)
    for k in it:
        args[k] = next(it)
    flat = [x for kv in args.items() for x in kv]
    with pytest.raises(ValueError, match=match):
        _run(["--model", str(sd_path), "--out", str(tmp_path / "o"), "--device", "cpu", "--dtype", "fp32", *flat])


def test_generate_through_a_diffusers_scheduler(sd_path, tmp_path):
    """--scheduler dpm++: the accepted images are the pipeline's own DPM-Solver++ samples of their
    seeds; a folder made with another scheduler is refused on resume."""
    out = tmp_path / "dpm"
    assert _run(["--model", str(sd_path), "--out", str(out), "--n", "2", "--scheduler", "dpm++", *GEN]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["scheduler"] == "dpm++" and m["n_accepted"] == 2
    recs = [r for f in sorted((out / "shards").glob("*.pt")) for r in load(f)["records"] if r["accepted"]]
    pipe = CompositionPipeline.from_pretrained(sd_path)
    first = recs[0]
    ref = pipe("a black car AND NOT a dog", seeds=[first["seed"]], num_inference_steps=3, scheduler="dpm++",
               output_type="latent", record=False)
    import numpy as np
    from PIL import Image

    saved = np.asarray(Image.open(out / first["image"]), dtype=np.int16)
    assert np.abs(saved - np.asarray(pipe.decode(ref.latents)[0], dtype=np.int16)).max() <= 1
    with pytest.raises(ValueError, match="other settings"):
        _run(["--model", str(sd_path), "--out", str(out), "--n", "2", "--scheduler", "euler", *GEN])


def test_generate_refuses_a_folder_without_unet(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--model .*unet"):
        _run(["--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--prompt", "a cat"])


def test_generate_with_early_rejection(sd_path, tmp_path):
    """Confidence 1 decides exactly as the full run; a lower one stops images early after a pilot
    sampled in full, spends fewer UNet rows, and resumes to the same accepted set."""
    base = ["--model", str(sd_path), "--n", "8", *GEN[:2], "--steps", "5", "--eta", "1", *GEN[4:]]
    full = _manifest(base, tmp_path / "full")
    exact = _manifest([*base, "--early-reject", "1.0", "--pilot", "4"], tmp_path / "exact")
    assert [r["index"] for r in exact["accepted"]] == [r["index"] for r in full["accepted"]]
    assert exact["stopped_early"] == 0
    out = tmp_path / "early"
    early = _manifest([*base, "--early-reject", "0.55", "--pilot", "12"], out)
    records = sorted((r for f in (out / "shards").glob("*.pt") for r in load(f)["records"]), key=lambda r: r["index"])
    assert all(r["stopped"] == 5 and len(r["margins"]) == 1 for r in records[:12])  # the pilot ran in full
    assert early["stopped_early"] > 0 and all(not r["accepted"] for r in records if r["stopped"] < 5)
    # a stopped image is one the full run rejects or one the confidence lets go; an accepted one is the full run's
    full_acc = {r["index"] for r in full["accepted"] + full["surplus"]}
    assert {r["index"] for r in early["accepted"]} <= full_acc | set(range(full["attempted"], 10 ** 6))
    assert early["unet_rows"] / early["attempted"] < full["unet_rows"] / full["attempted"]
    shards = sorted((out / "shards").glob("batch-*.pt"))
    shards[-1].unlink()
    again = _manifest([*base, "--early-reject", "0.55", "--pilot", "12"], out)
    assert [r["index"] for r in again["accepted"]] == [r["index"] for r in early["accepted"]]


def _manifest(argv: list[str], out: Path) -> dict:
    assert _run([*argv, "--out", str(out)]) == 0
    return json.loads((out / "manifest.json").read_text())


def test_early_rejection_interrupted_mid_stream_resumes_to_the_same_images(sd_path, tmp_path, monkeypatch):
    """An interruption while continuous batching has images of several batches in flight: the
    rerun redoes only the uncommitted batches and accepts what an uninterrupted run accepts."""
    from compkern.pipelines import generate as G

    base = ["--model", str(sd_path), "--n", "8", *GEN[:2], "--steps", "5", "--eta", "1", *GEN[4:],
            "--early-reject", "0.55", "--pilot", "12"]
    whole = _manifest(base, tmp_path / "whole")
    real, calls = G.commit_batch, []

    def flaky(*a, **k):
        calls.append(a[2])
        if len(calls) == 5:  # the pilot's 3 batches, one continuous batch, then the interruption
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(G, "commit_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        _manifest(base, tmp_path / "cut")
    monkeypatch.setattr(G, "commit_batch", real)
    again = _manifest(base, tmp_path / "cut")
    assert [r["index"] for r in again["accepted"]] == [r["index"] for r in whole["accepted"]]
    assert again["stopped_early"] == whole["stopped_early"] > 0


def test_bad_guidance_and_a_too_long_prompt(sd):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        sd("a cat AND a dog", seeds=[0], num_inference_steps=2, guidance_scale=float("nan"), output_type="latent")
    long = "a " + "very " * 40 + "long cat"
    with pytest.warns(UserWarning, match="tokens long"):
        sd.encode(["", long])


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_from_pipe_shares_a_loaded_diffusers_pipeline(which, request):
    """CompositionPipeline.from_pipe(diffusers pipeline): the same module objects, the same images
    as from_pretrained on the folder."""
    import diffusers

    path = request.getfixturevalue(f"{which}_path")
    cls = diffusers.StableDiffusionXLPipeline if which == "sdxl" else diffusers.StableDiffusionPipeline
    extra = {} if which == "sdxl" else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    loaded = cls.from_pretrained(path, local_files_only=True, **extra)
    pipe = CompositionPipeline.from_pipe(loaded)
    assert pipe.unet is loaded.unet and pipe.text_encoder is loaded.text_encoder
    kw = dict(seeds=[0, 1], num_inference_steps=3, output_type="latent")
    ref = request.getfixturevalue(which)("a black car AND a white clock", **kw)
    assert torch.allclose(pipe("a black car AND a white clock", **kw).latents, ref.latents, atol=1e-5)
    with pytest.raises(TypeError, match="from_pipe needs"):
        CompositionPipeline.from_pipe(object())


def test_a_plain_prompt_samples_as_diffusers_own_pipeline(sd_path):
    """K = 1 at the defaults (DDIM, eta 0, classifier-free guidance): compkern's latents equal
    diffusers' StableDiffusionPipeline's with a DDIM scheduler on the same (trailing) timesteps."""
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_path, safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False, local_files_only=True)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing",
                                                        set_alpha_to_one=True, steps_offset=0)
    ref.set_progress_bar_config(disable=True)
    pipe = CompositionPipeline.from_pipe(ref)
    x = pipe.initial_latents([0, 1])
    ours = pipe("a black car", seeds=[0, 1], num_inference_steps=5, guidance_scale=3.0, output_type="latent", latents=x)
    theirs = ref(["a black car"] * 2, num_inference_steps=5, guidance_scale=3.0, latents=x.clone(), output_type="latent")
    assert torch.equal(pipe.schedule.timesteps(5), ref.scheduler.timesteps)
    assert torch.allclose(ours.latents, theirs.images, rtol=1e-5, atol=1e-4)
