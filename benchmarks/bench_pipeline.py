"""Stable Diffusion front end: compkern vs the public approach, and SD-sized UNets on a device.

CPU section (tiny random-weight pipeline, compkern.pipelines.tiny): the same images (same seeds,
same DDIM steps, same composition weights) scored by the same object rule, three ways:

- public: a faithful reimplementation of the public code path. Composable Diffusion's pipeline
  (prompts encoded once per call, then one UNet call per prompt per step at batch size 1), then
  CompLift's text-to-image scoring: 200 evenly spaced trials from a fixed noise bank, one UNet call
  per (prompt, trial) at batch size 1 with the prompt re-encoded for every call and each prediction
  copied to the host, the lift computed there.
- compkern fixed: the same 200 trials and target (lift_maps.fixed_lift_maps): batched UNet
  calls, prompts encoded once, everything on the device. Same rows, same decisions.
- compkern cached: the predictions recorded while sampling (lift_maps.cached_lift_maps): no
  extra UNet row; its decisions are compared with the public ones (agreement).

    python benchmarks/bench_pipeline.py --images 8 --steps 20

GPU section (random weights, configs of SD 1.5 and SDXL, fp16): images/s of composed generation
(K+1 = 3 conditions) with compkern's batched call vs serial per-prompt calls at batch size 1,
and the peak memory.

    python benchmarks/bench_pipeline.py --gpu --device cuda --batch 8 --steps 10
    python benchmarks/bench_pipeline.py --gpu --device cpu --smoke      # scaled-down configs, code path only

Continuous section (SD 1.5-sized random UNet): images/s of early rejection, with and without
continuous batching, against full trajectories.

    python benchmarks/bench_pipeline.py --continuous --device cuda --batch 16 --images 64 --steps 50
    python benchmarks/bench_pipeline.py --continuous --device cpu --dtype fp32 --smoke --images 16 --steps 10
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from compkern.pipelines import lift_maps as LM
from compkern.pipelines.composition import (CompositionPipeline, ConditionedUNet, PromptEmbeddings,
                                            parse_composition)
from compkern.samplers.composed import ComposedEps
from compkern.samplers.diffusion import ddim_sample


# -- the public approach ---------------------------------------------------------------------------
def _encode_one(pipe: CompositionPipeline, prompt: str) -> torch.Tensor:
    """A fresh text-encoder run for one prompt (no cache), (1, L, D)."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(pipe.device)
    return pipe.text_encoder(ids)[0].to(pipe.dtype)


@torch.no_grad()
def public_image(pipe, comp, seed: int, *, steps: int, guidance: float, n_trials: int, counter: list[int]):
    """One image the public way: classifier-free guidance on the full prompt (the joint caption),
    then every prompt at every trial, the full prompt's prediction as the target.
    Returns (final latents (1, C, h, w), pixel lift (K, 1, h, w))."""
    prompts = comp.condition_prompts()  # ["", *components, joint caption if it is a row of its own]
    gen = [_encode_one(pipe, p) for p in ("", comp.joint)]

    def eps_fn(x, t):  # serial: one UNet call per prompt, batch size 1
        preds = []
        for e in gen:
            preds.append(pipe.unet(x.to(pipe.dtype), t, encoder_hidden_states=e).sample.float())
            counter[0] += 1
        return preds[0] + guidance * (preds[1] - preds[0])

    x0 = ddim_sample(eps_fn, pipe.initial_latents([seed]), pipe.schedule, num_steps=steps)
    S = tuple(x0.shape[1:])
    ts, bank = LM.evenly_spaced_trials(pipe.schedule.num_steps, n_trials, S, seed=0)
    scores = torch.zeros(len(prompts), n_trials, *S)  # on the host, as the public code keeps them
    for j, p in enumerate(prompts):
        for i in range(n_trials):
            t = ts[i:i + 1].to(pipe.device)
            x_t = pipe.schedule.add_noise(x0, bank[i:i + 1].to(pipe.device), t)
            e = _encode_one(pipe, p)  # re-encoded for every call
            scores[j, i] = pipe.unet(x_t.to(pipe.dtype), t, encoder_hidden_states=e).sample[0].float().cpu()
            counter[0] += 1
    target = scores[comp.joint_row]
    lift = (target - scores[:1]).square() - (target - scores[1:comp.K + 1]).square()  # (K, T, C, h, w)
    return x0, lift.mean(dim=(1, 2))[:, None]


def cpu_section(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    from compkern.pipelines.tiny import save_tiny_pipeline

    pipe = CompositionPipeline.from_pretrained(save_tiny_pipeline(tmp / "sd"))
    comp = parse_composition(args.prompt)
    seeds = list(range(args.images))
    rule = dict(threshold=args.threshold, min_pixels=args.min_pixels)
    res = {}

    # public
    counter = [0]
    t0 = time.perf_counter()
    pub = [public_image(pipe, comp, s, steps=args.steps, guidance=args.guidance, n_trials=args.trials,
                        counter=counter) for s in seeds]
    wall = time.perf_counter() - t0
    pub_maps = LM.LiftMaps(torch.cat([m for _, m in pub], dim=1), args.trials, 0)
    pub_ok = LM.accept(comp, pub_maps, **rule)
    res["public"] = dict(rows=counter[0], wall_s=wall, accepted=int(pub_ok.sum()))

    # compkern: one batch of all images; prompts encoded once for the whole run
    for name in ("fixed", "cached"):
        t0 = time.perf_counter()
        out = pipe(comp, seeds=seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   record=name == "cached", output_type="latent", generate="joint", record_joint=True)
        emb = pipe.encode(comp.condition_prompts())
        if name == "cached":
            maps = LM.cached_lift_maps(out.record, torch.tensor(comp.signs), target="joint", joint_row=comp.joint_row)
        else:
            maps = LM.fixed_lift_maps(pipe, out.latents, emb, torch.tensor(comp.signs), n_trials=args.trials,
                                      chunk_trials=args.chunk_trials, joint_row=comp.joint_row)
        ok = LM.accept(comp, maps, **rule)
        wall = time.perf_counter() - t0
        res[name] = dict(rows=out.n_evals + maps.n_evals, wall_s=wall, accepted=int(ok.sum()),
                         agreement=float((ok == pub_ok).float().mean()),
                         latent_max_diff=float((out.latents - torch.cat([x for x, _ in pub])).abs().max()),
                         map_max_diff=float((maps.pixel_lift - pub_maps.pixel_lift).abs().max()),
                         map_scale=float(pub_maps.pixel_lift.abs().max()))
    for r in res.values():
        r["rows_per_accepted"] = r["rows"] / r["accepted"] if r["accepted"] else None
        r["wall_per_accepted_s"] = r["wall_s"] / r["accepted"] if r["accepted"] else None
    return res


# -- GPU section ------------------------------------------------------------------------------------
def unet_config(name: str, smoke: bool = False) -> dict:
    """UNet2DConditionModel configs of SD 1.5 and SDXL base (random weights); ``smoke`` divides the
    channels by 10 and thins the transformers so the code path runs on a CPU."""
    if name == "sd15":
        cfg = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                   block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        if smoke:
            cfg.update(sample_size=16, block_out_channels=(32, 64, 128, 128), cross_attention_dim=64, attention_head_dim=8,
                       layers_per_block=1)
        return cfg
    if name == "sdxl":
        cfg = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                   block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                   addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=1280 + 6 * 256)
        if smoke:
            cfg.update(sample_size=16, block_out_channels=(32, 64, 128), attention_head_dim=(1, 2, 4),
                       cross_attention_dim=64, transformer_layers_per_block=(1, 1, 1), layers_per_block=1,
                       addition_time_embed_dim=16, projection_class_embeddings_input_dim=32 + 6 * 16)
        return cfg
    raise ValueError(f"name must be 'sd15' or 'sdxl', got {name!r}")


@torch.no_grad()
def gpu_section(args) -> dict:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from compkern.models.schedule import NoiseSchedule

    device, dtype = torch.device(args.device), {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    schedule = NoiseSchedule.from_diffusers(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    K, B, L = 2, args.batch, 77
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    out = {}
    for name in ("sd15", "sdxl"):
        cfg = unet_config(name, args.smoke)
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**cfg).to(device, dtype).eval()
        params = sum(p.numel() for p in unet.parameters())
        D = cfg["cross_attention_dim"]
        states = torch.randn(K + 1, L, D, device=device, dtype=dtype)
        pooled = tid = None
        if name == "sdxl":
            P = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            pooled = torch.randn(K + 1, P, device=device, dtype=dtype)
            size = cfg["sample_size"] * 8
            tid = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype).expand(K + 1, 6)
        emb = PromptEmbeddings([""] * (K + 1), states, pooled, tid)
        model = ConditionedUNet(unet, emb, schedule, "epsilon")
        h = cfg["sample_size"]
        x = torch.randn(B, 4, h, h, device=device)
        w = torch.full((K,), 7.5, device=device)
        ids = torch.arange(K + 1, device=device)[:, None].expand(K + 1, B)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def batched(steps):
            fn = ComposedEps(model, ids, w, chunk_size=args.chunk_size, record=True)
            return ddim_sample(fn, x, schedule, num_steps=steps)

        def serial(steps):
            def fn(xx, t):
                outs = []
                for b in range(B):
                    preds = [model(xx[b:b + 1], t[b:b + 1], torch.tensor([k], device=device)) for k in range(K + 1)]
                    outs.append(preds[0] + sum(w[k] * (preds[k + 1] - preds[0]) for k in range(K)))
                return torch.cat(outs)
            return ddim_sample(fn, x, schedule, num_steps=steps)

        row = {"params_M": params / 1e6, "batch": B, "steps": args.steps, "latent": h}
        for label, fn in (("compkern_batched", batched), ("serial_bs1", serial)):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            fn(1)
            sync()
            t0 = time.perf_counter()
            fn(args.steps)
            sync()
            dt = time.perf_counter() - t0
            row[f"{label}_images_per_s"] = B / dt
            if device.type == "cuda":
                row[f"{label}_peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        out[name] = row
        del unet, model
    return out


class _EveryOther:
    """A stand-in EarlyRejectRule: at its one check it stops every second image it sees (counted
    over all calls, so batches and slots stop the same share)."""

    def __init__(self, checks, thresholds, confidence):
        self.checks, self.thresholds, self.confidence = tuple(checks), thresholds, confidence
        self.seen = 0

    def keep(self, i: int, margins: torch.Tensor) -> torch.Tensor:
        keep = (torch.arange(len(margins)) + self.seen) % 2 == 0
        self.seen += len(margins)
        return keep


@torch.no_grad()
def continuous_section(args) -> dict:
    """Early rejection with and without continuous batching on an SD-sized random UNet (SD 1.5 /
    SDXL block layout; cross-attention width that of the tiny text encoder): images decided per
    second at --batch slots, --images seeds, a stand-in rule that stops every second image at the
    check after 40% of the steps (random weights give the partial margins no spread to calibrate
    on; the decisions mean nothing here, the throughput does)."""
    from diffusers import UNet2DConditionModel

    from compkern.pipelines.continuous import ContinuousSampler
    from compkern.pipelines.early_reject import default_checks
    from compkern.pipelines.tiny import save_tiny_pipeline

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        pipe = CompositionPipeline.from_pretrained(save_tiny_pipeline(Path(tmp) / "sd"), dtype=args.dtype, device=device)
        cfg = unet_config("sd15", args.smoke)
        cfg.update(cross_attention_dim=pipe.text_encoder.config.hidden_size)
        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel(**cfg).to(device, pipe.dtype).eval()
        comp = parse_composition(args.prompt)
        kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, record_every=2)
        rule = _EveryOther(default_checks(args.steps), (0.0,), 0.9)
        seeds = list(range(args.images))
        B = args.batch

        def full():
            return [pipe(comp, seeds=seeds[s:s + B], output_type="latent", **kw).n_evals for s in range(0, len(seeds), B)]

        def early():
            return [pipe(comp, seeds=seeds[s:s + B], output_type="latent", early_reject=rule, **kw).n_evals
                    for s in range(0, len(seeds), B)]

        def continuous():
            sampler = ContinuousSampler(pipe, comp, slots=B, early_reject=rule, **kw)
            return [r.rows for r in sampler.run(seeds)]

        for label, fn in (("full", full), ("early", early), ("early_continuous", continuous)):
            sync()
            t0 = time.perf_counter()
            rows = sum(fn())
            sync()
            dt = time.perf_counter() - t0
            out[label] = {"images_per_s": len(seeds) / dt, "unet_rows": rows, "rows_per_s": rows / dt, "wall_s": dt}
        out["config"] = {"unet": "sd15" + ("-smoke" if args.smoke else ""), "slots": B, "images": len(seeds),
                         "steps": args.steps, "dtype": args.dtype, "device": str(device),
                         "unet_params_M": sum(q.numel() for q in pipe.unet.parameters()) / 1e6}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default="a black car AND a white clock",
                   help="an AND of components (the public code's full-prompt target exists only for AND)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--chunk-trials", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--min-pixels", type=float, default=23)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="run the device section instead")
    p.add_argument("--continuous", action="store_true", help="run the early-rejection / continuous-batching section")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="scaled-down UNet configs (runs on a CPU)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    res = continuous_section(args) if args.continuous else gpu_section(args) if args.gpu else cpu_section(args)
    if not args.gpu and not args.continuous:
        print("| method | UNet rows | rows / accepted | wall s | wall s / accepted | accepted | agreement with public |")
        print("|---|---|---|---|---|---|---|")
        for k, r in res.items():
            f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
            print(f"| {k} | {r['rows']} | {f(r['rows_per_accepted'])} | {r['wall_s']:.2f} | {f(r['wall_per_accepted_s'], 3)} "
                  f"| {r['accepted']}/{args.images} | {r.get('agreement', 1.0):.2f} |")
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
