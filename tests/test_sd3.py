"""SD3 / SD3.5 (flow matching) in CompositionPipeline: for a plain prompt (K = 1) compkern's latents
equal diffusers' own StableDiffusion3Pipeline's (same seeds, guidance, scheduler; with and without
T5, with a dynamically shifted schedule); composed prompts make one (K+1) x B transformer call per
step; the record comes back in CompLift's variance-preserving layout and the cached lift from it
is the ELBO difference written out; the eps view of a velocity is exact on Gaussian classes;
`compkern generate` runs on an SD3 folder."""
from __future__ import annotations

import argparse
import json

import diffusers
import pytest
import torch

from compkern.lift.exact import GaussianClassesEps
from compkern.lift.flow import GaussianClassesVelocity
from compkern.models.flow import FlowMatchSchedule, VelocityEps, flow_abar
from compkern.pipelines import CompositionPipeline, cached_lift_maps
from compkern.pipelines.lift_maps import fixed_lift_maps, fresh_lift_maps
from compkern.pipelines.sd3 import SD3CompositionPipeline
from compkern.pipelines.tiny import save_tiny_sd3_pipeline
from helpers import cached_noise_lift_by_hand

pytestmark = pytest.mark.usefixtures("one_thread")

L_T5 = 32  # T5 tokens per prompt in these tests (SD3 uses 256)


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "sd3")


@pytest.fixture(scope="module")
def pipes(sd3_path):
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(sd3_path, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    pipe = CompositionPipeline.from_pipe(ref)
    pipe.max_sequence_length = L_T5
    return pipe, ref


def _diffusers_latents(ref, prompt: str, seeds, **kw):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return ref([prompt] * len(seeds), generator=gens, output_type="latent", max_sequence_length=L_T5, **kw).images


@pytest.mark.parametrize("variant", ["t5", "no-t5", "dynamic-shift"])
def test_a_plain_prompt_samples_as_diffusers_sd3_pipeline(pipes, tmp_path, variant):
    pipe, ref = pipes
    if variant == "no-t5":
        path = save_tiny_sd3_pipeline(tmp_path / "no_t5", t5=False)
        ref = diffusers.StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True, text_encoder_3=None,
                                                                 tokenizer_3=None)
        ref.set_progress_bar_config(disable=True)
        pipe = CompositionPipeline.from_pretrained(path)
        pipe.max_sequence_length = L_T5
        assert pipe.text_encoder_3 is None
    sched = None
    if variant == "dynamic-shift":
        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True,
                                                                      base_image_seq_len=16, max_image_seq_len=256)
        ref = diffusers.StableDiffusion3Pipeline.from_pipe(ref, scheduler=sched)
        ref.set_progress_bar_config(disable=True)
        assert pipe.timestep_kwargs(torch.zeros(1, 4, 8, 8), sched)["mu"] != 0
    seeds = [3, 4]
    kw = dict(num_inference_steps=5, guidance_scale=4.0)
    ours = pipe("a black car", seeds=seeds, output_type="latent", scheduler=sched, **kw)
    theirs = _diffusers_latents(ref, "a black car", seeds, **kw)
    assert ours.latents.shape == theirs.shape == (2, 4, 8, 8)
    torch.testing.assert_close(ours.latents, theirs, rtol=1e-5, atol=1e-5)
    assert ours.n_evals == 5 * 2 * 2  # (K+1) x B rows per step
    images = pipe.decode(ours.latents, output_type="pt")  # the VAE's shift_factor as diffusers applies it
    want = ref.vae.decode(theirs / ref.vae.config.scaling_factor + ref.vae.config.shift_factor).sample
    torch.testing.assert_close(images, (want / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_from_pipe_shares_the_modules_and_an_image_does_not_depend_on_its_batch(pipes):
    pipe, ref = pipes
    assert isinstance(pipe, SD3CompositionPipeline) and pipe.transformer is ref.transformer
    assert pipe.text_encoder_3 is ref.text_encoder_3 and pipe.scheduler is ref.scheduler
    kw = dict(num_inference_steps=3, output_type="latent")
    pair = pipe("a black car AND NOT a dog", seeds=[5, 6], **kw)
    alone = pipe("a black car AND NOT a dog", seeds=[6], **kw)
    torch.testing.assert_close(alone.latents[0], pair.latents[1], atol=1e-5, rtol=1e-4)


def test_composed_velocity_from_one_batched_call_and_the_record_in_complift_layout(pipes):
    """Each step: one (K+1) x B call; the first step is x_1 = x_T + (sigma_1 - sigma_0) v with v the
    combined velocity written out; the record (x_vp, t, eps) matches the eps view of the
    transformer at its own points, and the cached noise-target lift equals the ELBO difference
    computed by hand (eps* = (x_t - sqrt(abar) x0) / sqrt(1 - abar))."""
    pipe, _ = pipes
    prompt = "a black car AND a white clock AND NOT a dog"
    steps, seeds = 4, [0, 1]
    seen = {}

    def keep(pipe_, i, t, kw):
        seen[i] = kw["latents"].clone()
        return {}

    out = pipe(prompt, seeds=seeds, num_inference_steps=steps, generate="composed", output_type="latent",
               callback_on_step_end=keep)
    K, B = out.composition.K, len(seeds)
    assert len(out.record) == steps and out.n_evals == steps * (K + 1) * B
    emb = pipe.encode(out.prompts)
    # the first step by hand, in flow coordinates
    x_T = pipe.initial_latents(seeds)
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    t0 = sched.timesteps[0].expand(B)
    model = pipe.sampling_model(emb)
    v = torch.stack([model(x_T, t0, torch.full((B,), r)) for r in range(K + 1)])
    w = torch.tensor(out.composition.signs) * 7.5
    v_comp = v[0] + (w[:, None, None, None, None] * (v[1:] - v[0])).sum(0)
    torch.testing.assert_close(seen[0], x_T + (sched.sigmas[1] - sched.sigmas[0]) * v_comp, atol=1e-5, rtol=1e-5)
    # the record: variance-preserving x_t and eps, as every other scheduler's
    assert out.record.preds[0].shape == (K + 1, B, 4, 8, 8)
    want = cached_noise_lift_by_hand(pipe, out, emb)
    maps = cached_lift_maps(out.record, torch.tensor(out.composition.signs), target="noise",
                            latents=out.latents, schedule=pipe.schedule)
    torch.testing.assert_close(maps.pixel_lift, want, atol=1e-4, rtol=1e-4)
    # fresh and fixed trials run through the same eps view
    assert bool(torch.isfinite(fixed_lift_maps(pipe, out.latents, emb, torch.tensor(out.composition.signs),
                                               n_trials=4, target="noise").pixel_lift).all())
    assert fresh_lift_maps(pipe, out.latents, emb, n_trials=3).pixel_lift.shape == (K, B, 8, 8)


def test_the_eps_view_of_an_exact_velocity_is_the_exact_eps():
    """VelocityEps on the exact velocity of Gaussian classes gives the exact eps of the
    variance-preserving path at abar = flow_abar(sigma), over the whole range of t."""
    sched = FlowMatchSchedule(1000)
    classes = GaussianClassesEps(torch.tensor([[1.5, 0.0], [-1.0, 1.0]]), torch.tensor([0.3, 0.5]), sched)
    velocity = GaussianClassesVelocity(classes)  # takes sigma in [0, 1]; an SD3 transformer sigma * 1000
    model = VelocityEps(lambda x_flow, t, c: velocity(x_flow, t / 1000, c), sched)
    gen = torch.Generator().manual_seed(0)
    t = torch.cat([torch.tensor([0.0, 1.0, 500.0, 999.0]), torch.rand(60, generator=gen) * 1000]).double()
    x = torch.randn(len(t), 2, generator=gen, dtype=torch.float64)
    cond = torch.randint(0, 3, (len(t),), generator=gen)  # 2 is the null id
    want = classes.eps_at(x, flow_abar(t / 1000), cond)
    torch.testing.assert_close(model(x, t, cond), want, atol=1e-8, rtol=1e-8)
    # the schedule: a flow point is the variance-preserving point rescaled
    x0, noise = torch.randn(64, 3, generator=gen, dtype=torch.float64), torch.randn(64, 3, generator=gen, dtype=torch.float64)
    sigma = t / 1000
    c = ((1 - sigma) ** 2 + sigma ** 2).sqrt()[:, None]
    torch.testing.assert_close(c * sched.add_noise(x0, noise, t), (1 - sigma[:, None]) * x0 + sigma[:, None] * noise)
    ints = torch.arange(0, 1000, 37)
    torch.testing.assert_close(sched.alphas_cumprod[ints], sched.alphas_cumprod_at(ints))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\]"):
        sched.alphas_cumprod_at(torch.tensor([1000.5]))


def test_save_pretrained_round_trip(pipes, tmp_path):
    pipe, _ = pipes
    pipe.save_pretrained(tmp_path / "saved")
    again = CompositionPipeline.from_pretrained(tmp_path / "saved")
    again.max_sequence_length = L_T5
    kw = dict(seeds=[2], num_inference_steps=3, output_type="latent")
    torch.testing.assert_close(again("a dog OR a black car", **kw).latents, pipe("a dog OR a black car", **kw).latents)


def test_bad_input_is_refused_clearly(pipes, sd3_path, tmp_path):
    pipe, _ = pipes
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        pipe("a dog", scheduler="dpm++", num_inference_steps=2)
    ddim = diffusers.DDIMScheduler()
    with pytest.raises(ValueError, match="does not step a flow-matching velocity"):
        pipe("a dog", scheduler=ddim, num_inference_steps=2)
    with pytest.raises(TypeError, match="flow-matching scheduler"):
        SD3CompositionPipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2,
                               pipe.tokenizer_2, ddim)
    from compkern.pipelines.early_reject import EarlyRejectRule

    with pytest.raises(ValueError, match="early_reject"):
        pipe("a dog AND a cat", early_reject=EarlyRejectRule((1,), (0.0,), 0.9), num_inference_steps=3)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        pipe("a dog", guidance_scale=float("nan"), num_inference_steps=2)
    with pytest.raises(ValueError, match="takes no eta"):
        pipe("a dog", eta=1.0, num_inference_steps=2)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "transformer").mkdir()
    with pytest.raises(ValueError, match="needs vae/"):
        CompositionPipeline.from_pretrained(broken)


def test_generate_runs_on_an_sd3_folder(sd3_path, tmp_path):
    from compkern.experiments import generate as gen

    def run(*extra):
        p = argparse.ArgumentParser()
        gen.add_arguments(p)
        return gen.run(p.parse_args(["--model", str(sd3_path), "--out", str(tmp_path / "run"), "--prompt",
                                     "a black car AND NOT a dog", "--steps", "3", "--batch-size", "2", "--n", "2",
                                     "--max-attempts", "4", "--dtype", "fp32", "--device", "cpu", "--trials", "4",
                                     "--threads", "1", *extra]))

    assert run() == 0
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["attempted"] >= 2 and m["unet_rows"] >= m["attempted"] * 3 * 3
    assert all((tmp_path / "run" / r["image"]).exists() for r in m["accepted"])
    with pytest.raises(ValueError, match="SD3 folder"):
        run("--scheduler", "dpm++")
