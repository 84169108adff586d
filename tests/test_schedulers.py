"""Sampling through diffusers schedulers (CompositionPipeline(scheduler=...)): for a plain prompt
(K = 1) compkern's latents equal diffusers' own StableDiffusionPipeline's with the same scheduler,
seeds and guidance, for epsilon and v-prediction; composed prompts still make one batched
(K+1) x B UNet call per step and keep the record CompLift reads; fractional timesteps (Euler)
interpolate the noise schedule as the scheduler does."""
from __future__ import annotations

import diffusers
import pytest
import torch

from compkern.models.schedule import NoiseSchedule
from compkern.pipelines import CompositionPipeline, cached_lift_maps
from compkern.pipelines.composition import SCHEDULERS
from compkern.pipelines.tiny import save_tiny_pipeline
from helpers import cached_noise_lift_by_hand

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["ddim", "ddpm", "dpm++", "euler", "euler_a", "unipc", "heun", "pndm"]


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def pipes(request, tmp_path_factory):
    path = save_tiny_pipeline(tmp_path_factory.mktemp(request.param) / "sd", prediction_type=request.param)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return CompositionPipeline.from_pipe(ref), ref


@pytest.mark.parametrize("name", NAMES)
def test_a_plain_prompt_samples_as_diffusers_with_each_scheduler(pipes, name):
    pipe, ref = pipes
    if name == "pndm" and pipe.prediction_type == "v_prediction":
        pytest.skip("diffusers' PNDM converts the multistep mix of past v outputs at the current sample; "
                    "compkern converts each step's v at its own x_t (exact), so the two differ by design")
    ref.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    seeds = [3, 4]
    kw = dict(num_inference_steps=4, guidance_scale=3.0, output_type="latent")
    ours = pipe("a black car", seeds=seeds, scheduler=name, **kw)
    gens = [torch.Generator().manual_seed(s) for s in seeds]  # diffusers' per-image generators
    theirs = ref(["a black car"] * 2, generator=gens, **kw)
    assert ours.latents.shape == theirs.images.shape
    torch.testing.assert_close(ours.latents, theirs.images, rtol=1e-4, atol=1e-4)
    assert ours.n_evals == len(ours.record) * 2 * 2  # (K+1) x B rows per model call, recorded each call
    # the pipeline's own scheduler is left as it was (sampling runs on a copy)
    assert pipe.scheduler.config["prediction_type"] == ref.unet.config.get("prediction_type", pipe.prediction_type)


def test_an_image_does_not_depend_on_its_batch_with_an_ancestral_scheduler(pipes):
    pipe, _ = pipes
    kw = dict(num_inference_steps=3, output_type="latent", scheduler="euler_a")
    pair = pipe("a black car AND NOT a dog", seeds=[5, 6], **kw)
    alone = pipe("a black car AND NOT a dog", seeds=[6], **kw)
    torch.testing.assert_close(alone.latents[0], pair.latents[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["dpm++", "euler-linspace"])
def test_composed_prompt_one_batched_call_per_step_and_a_record_lift_reads(pipes, name):
    """The record holds the model inputs (the variance-preserving x_t), their t (fractional for
    Euler with linspace spacing) and every row's eps; the cached noise-target lift from it equals
    the ELBO difference written out: eps* = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    pipe, _ = pipes
    sched = name if name == "dpm++" else \
        diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    prompt = "a black car AND a white clock AND NOT a dog"
    out = pipe(prompt, seeds=[0, 1], num_inference_steps=5, scheduler=sched, output_type="latent", generate="composed")
    K, B = out.composition.K, 2
    assert len(out.record) == 5 and out.n_evals == 5 * (K + 1) * B
    emb = pipe.encode(out.prompts)
    assert out.record.preds[0].shape == (K + 1, B, 4, 8, 8)
    want = cached_noise_lift_by_hand(pipe, out, emb)
    if name != "dpm++":
        t = torch.cat(out.record.t)
        assert bool((t != t.round()).any())
    maps = cached_lift_maps(out.record, torch.tensor(out.composition.signs), target="noise",
                            latents=out.latents, schedule=pipe.schedule)
    torch.testing.assert_close(maps.pixel_lift, want, atol=1e-4, rtol=1e-4)


def test_fractional_timesteps_interpolate_sigma_as_euler_does(pipes):
    pipe, _ = pipes
    sched = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    sched.set_timesteps(7)
    t = sched.timesteps
    assert bool((t != t.round()).any())  # some timesteps are fractional
    abar = pipe.schedule.alphas_cumprod_at(t)
    torch.testing.assert_close(((1 - abar) / abar).sqrt().float(), sched.sigmas[:-1].float(), rtol=1e-5, atol=1e-5)
    ints = torch.tensor([0, 17, 999])
    torch.testing.assert_close(pipe.schedule.alphas_cumprod_at(ints.double()), pipe.schedule.alphas_cumprod_at(ints),
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="must lie in"):
        NoiseSchedule.scaled_linear().alphas_cumprod_at(torch.tensor([999.5]))


def test_bad_schedulers_are_refused(pipes):
    pipe, _ = pipes
    with pytest.raises(ValueError, match="scheduler must be None, 'folder', one of"):
        pipe("a car", scheduler="lms-typo")
    with pytest.raises(TypeError, match="diffusers scheduler instance"):
        pipe("a car", scheduler=object())
    with pytest.raises(ValueError, match="noise-prediction"):
        pipe("a car", scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    from compkern.pipelines.early_reject import EarlyRejectRule

    rule = EarlyRejectRule(checks=(1,), thresholds=(0.0,), confidence=0.95)
    with pytest.raises(ValueError, match="scheduler=None"):
        pipe("a car AND NOT a dog", scheduler="dpm++", early_reject=rule)
    with pytest.raises(ValueError, match="takes no eta"):
        pipe("a car", scheduler="euler", eta=1.0, num_inference_steps=2)


def test_a_diffusion_pipeline_with_callbacks_save_and_a_swapped_scheduler(pipes, tmp_path):
    """CompositionPipeline is a diffusers DiffusionPipeline: components, save_pretrained and
    loading back, .to(dtype) (prompts re-encoded in the new dtype), callback_on_step_end (called
    once per step with diffusers' arguments; returned latents replace the running ones), and
    ``pipe.scheduler = ...`` followed by scheduler='folder'."""
    pipe, ref = pipes
    assert isinstance(pipe, diffusers.DiffusionPipeline)
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(pipe.components)
    pipe.save_pretrained(tmp_path / "saved")
    back = CompositionPipeline.from_pretrained(tmp_path / "saved")
    kw = dict(seeds=[1], num_inference_steps=3, output_type="latent")
    assert torch.equal(back("a car AND NOT a dog", **kw).latents, pipe("a car AND NOT a dog", **kw).latents)
    back.to(torch.float64)
    assert back("a car", **kw).latents.dtype == torch.float32 and back.encode(["", "a car"]).states.dtype == torch.float64
    for name in (None, "dpm++"):
        seen = []

        def cb(p, i, t, kwargs):
            seen.append((p, i, int(t)))
            return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else {}

        out = pipe("a car", scheduler=name, callback_on_step_end=cb, **kw)
        assert [i for _, i, _ in seen] == [0, 1, 2] and all(p is pipe for p, _, _ in seen)
        assert float(out.latents.abs().max()) == 0.0  # the last step's returned latents are the output
    with pytest.raises(TypeError, match="callback_on_step_end"):
        pipe("a car", callback_on_step_end=3, **kw)
    old = pipe.scheduler
    try:
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(old.config)
        a = pipe("a car", scheduler="folder", **kw).latents
        b = pipe("a car", scheduler="euler", **kw).latents
        assert torch.equal(a, b)
    finally:
        pipe.scheduler = old


@pytest.mark.parametrize("name", ["dpm++", "euler_a"])
def test_sdxl_plain_prompt_samples_as_diffusers_with_a_scheduler(tmp_path_factory, name):
    """SDXL (two encoders, added conditioning): the same latents as diffusers' own
    StableDiffusionXLPipeline for a plain prompt, given a negative prompt (diffusers zeroes an
    absent one, compkern encodes the base row like any prompt)."""
    path = save_tiny_pipeline(tmp_path_factory.mktemp("xl") / "sdxl", sdxl=True)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    pipe = CompositionPipeline.from_pipe(ref)
    ref.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    kw = dict(num_inference_steps=3, guidance_scale=3.0, output_type="latent")
    ours = pipe("a black car", seeds=[3, 4], scheduler=name, negative_prompt="a dog", **kw)
    theirs = ref(["a black car"] * 2, negative_prompt=["a dog"] * 2,
                 generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **kw)
    torch.testing.assert_close(ours.latents, theirs.images, rtol=1e-4, atol=1e-4)
