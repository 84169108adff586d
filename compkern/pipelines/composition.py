"""CompositionPipeline: composed Stable Diffusion generation over diffusers components.

A prompt is an expression of component prompts, ``"a black car AND a white clock AND NOT a dog"``.
Its conditions are encoded once (row 0: the negative / unconditional prompt, rows 1..K: the
components) and cached on the pipeline. Every denoising step evaluates all K+1 conditions in one
condition-major batched UNet call ((K+1) x B rows, ``chunk_size`` rows at a time) through
``compkern.models.evaluate_conditions`` and combines them with ``compkern.ops.combine_eps``:

    eps = eps(x, c_0) + guidance_scale * sum_k w_k (eps(x, c_k) - eps(x, c_0)),   w_k = +1 / -1 (NOT)

With ``record=True`` (the default) every step's (x_t, t, preds) stay on the device: CompLift's
cached trials (compkern.pipelines.lift_maps) reuse them without one extra UNet row.

Supported folders: SD 1.x / 2.x (one CLIP text encoder; epsilon or v-prediction), SDXL (two
encoders, penultimate hidden states concatenated, pooled text_embeds and time_ids as added
conditioning) and SD3 / SD3.5 (``compkern.pipelines.sd3``: a flow-matching transformer, which
``from_pretrained`` / ``from_pipe`` pick by the folder's transformer/). The scheduler folder
supplies the noise schedule and prediction type; sampling is compkern's DDIM (eta = 0) / DDPM
(eta = 1) on that schedule (``scheduler=None``, the default: the path early rejection and
continuous batching run on), or any diffusers scheduler's ``step`` (``scheduler='dpm++'``,
'euler', 'unipc', ... or an instance; ``SCHEDULERS``), with the same batched call, record and
per-seed generators.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from diffusers import DiffusionPipeline

from compkern.models.base import evaluate_conditions
from compkern.models.schedule import NoiseSchedule
from compkern.ops import combine_eps
from compkern.samplers.composed import ComposedEps, StepRecord
from compkern.samplers.diffusion import (check_scheduler, ddim_sample, epsilon_scheduler, is_flow_scheduler,
                                        scheduler_sample)

if TYPE_CHECKING:
    from compkern.pipelines.early_reject import EarlyRejectRule

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp16' / 'bf16' / 'fp32' (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


# diffusers scheduler classes by the short names `compkern generate --scheduler` takes; 'folder' is
# the folder's own scheduler class, None compkern's DDIM / DDPM.
SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm++": "DPMSolverMultistepScheduler",
              "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
              "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler", "heun": "HeunDiscreteScheduler"}


# -- expressions ----------------------------------------------------------------------------------
GENERATE_MODES = ("joint", "composed")


@dataclass(frozen=True)
class Composition:
    """A parsed prompt: K component prompts, the expression's composed-eps weights ``signs`` (K,)
    (+1; negative under NOT; 1/m inside an OR of m terms; times a written weight such as 0.5*),
    the expression whose ``accept(scores (K, B)) -> (B,) bool`` decides acceptance, and ``joint``:
    the caption of the components every satisfying image needs (``Expr.required``) joined by
    " and " ("a black car AND a white clock AND NOT a dog" -> "a black car and a white clock"),
    None when no component is required (a pure OR or NOT).

    Conditions are the rows ``condition_prompts``: [base, *components] plus the joint as row K+1
    when it is not already a component (``joint_row`` says where it lives)."""

    text: str
    components: tuple[str, ...]
    signs: tuple[float, ...]
    expression: object
    joint: str | None = None

    @property
    def K(self) -> int:
        return len(self.components)

    @property
    def joint_row(self) -> int | None:
        """Row of the joint prompt among the conditions: a component's row (1..K) when the joint is
        that component, K + 1 when it is a row of its own, None without a joint."""
        if self.joint is None:
            return None
        return self.components.index(self.joint) + 1 if self.joint in self.components else self.K + 1

    def condition_prompts(self, negative_prompt: str = "", *, with_joint: bool = True) -> list[str]:
        """[base, *components] (+ [joint] when it is a row of its own and ``with_joint``)."""
        rows = [negative_prompt, *self.components]
        return rows + [self.joint] if with_joint and self.joint_row == self.K + 1 else rows

    def weights(self, guidance_scale: float = 1.0, *, generate: str = "composed", rows: int | None = None) -> torch.Tensor:
        """combine_eps weights over the condition rows 1.. (``rows`` - 1 of them, default K), fp32.

        generate='composed': guidance_scale x signs (Composable Diffusion; 0 on a joint row).
        generate='joint': guidance_scale on the joint row (classifier-free guidance on the joint
        caption, as CompLift's public code generates), the required components' own weights
        zeroed, every other component's kept (NOT terms still push away, OR terms as composed)."""
        if generate not in GENERATE_MODES:
            raise ValueError(f"generate must be one of {GENERATE_MODES}, got {generate!r}")
        n = self.K if rows is None else rows - 1
        if n < self.K:
            raise ValueError(f"rows must be >= K + 1 = {self.K + 1}, got {rows}")
        w = torch.zeros(n)
        w[:self.K] = torch.tensor(self.signs, dtype=torch.float32)
        if generate == "joint":
            if self.joint is None:
                raise ValueError(f"generate='joint' needs a component every satisfying image holds; {self.text!r} "
                                 "has none (a pure OR / NOT): use generate='composed'")
            w[torch.tensor(self.expression.required(), dtype=torch.long)] = 0.0
            if self.joint_row - 1 >= n:
                raise ValueError(f"generate='joint' needs the joint row {self.joint_row}: pass rows >= {self.joint_row + 1}")
            w[self.joint_row - 1] = 1.0
        return w * float(guidance_scale)

    def accept(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (K, B), positive where component k holds -> (B,) bool."""
        return self.expression.accept(scores)


_PROMPT_TOKEN = re.compile(r'\s*("[^"]*"|\(|\)|(?:\d+(?:\.\d*)?|\.\d+)\s*\*|[^\s()"]+)')


def to_expression(text: str) -> str:
    """Quote the free-text phrases of a prompt expression for compkern.lift.parse:
    ``a black car AND NOT a dog`` -> ``"a black car" AND NOT "a dog"``. Only upper-case AND / OR /
    NOT are operators here (a lower-case "and" stays inside its phrase); parentheses, weights
    (``0.5*``) and already quoted phrases pass through."""
    out: list[str] = []
    words: list[str] = []

    def flush():
        if words:
            out.append('"' + " ".join(words) + '"')
            words.clear()

    pos = 0
    for m in _PROMPT_TOKEN.finditer(text):
        if text[pos:m.start()].strip():
            break
        pos = m.end()
        tok = m.group(1)
        if tok in ("AND", "OR", "NOT", "(", ")") or tok.startswith('"') or tok.rstrip().endswith("*"):
            flush()
            out.append(tok)
        else:
            words.append(tok)
    if text[pos:].strip():
        raise ValueError(f"prompt has an unbalanced quote or an unreadable part at position {pos}: {text!r}")
    flush()
    return " ".join(out)


def parse_composition(text: str) -> Composition:
    """Parse a prompt expression such as ``"a black car AND a white clock AND NOT a dog"`` (see
    ``to_expression``) with compkern.lift.parse."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"prompt must be a non-empty string expression such as 'a car AND NOT a dog', got {text!r}")
    from compkern.lift import parse

    expr = parse(to_expression(text))
    w = torch.as_tensor(expr.weights(), dtype=torch.float32).flatten()
    required = expr.required()
    joint = " and ".join(expr.names[k] for k in required) if required else None
    return Composition(text, tuple(expr.names), tuple(float(x) for x in w), expr, joint)


# -- encoded prompts ------------------------------------------------------------------------------
@dataclass
class PromptEmbeddings:
    """Encoded conditions, row 0 the base (negative or empty prompt), rows 1..K the components.

    states (K+1, L, D) in the UNet dtype; SDXL adds pooled (K+1, P) and time_ids (K+1, 6)."""

    prompts: list[str]
    states: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def unet_kwargs(self, ids: torch.Tensor) -> dict:
        """UNet keyword arguments for condition ids (N,) int64."""
        kw = {"encoder_hidden_states": self.states[ids]}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled[ids], "time_ids": self.time_ids[ids]}
        return kw


class ConditionedUNet:
    """EpsModel over condition ids: ``model(x_t (N, C, h, w), t (N,), ids (N,) int64) -> eps`` in
    the UNet dtype. ``ids`` index the rows of a PromptEmbeddings, so the stacked (K+1) x B
    condition batch holds integers, never copies of the (L, D) states. The output goes to eps
    through compkern.models.unet.UNetEps (epsilon, v_prediction or sample models)."""

    def __init__(self, unet, embeddings: PromptEmbeddings, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        from compkern.models.unet import UNetEps

        self.adapter = UNetEps(unet, schedule, prediction_type)
        self.unet, self.embeddings = unet, embeddings

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, device=self.embeddings.states.device).long()
        x = x_t.to(self.unet.dtype)
        emb = self.embeddings
        if emb.pooled is None:
            return self.adapter(x, t, emb.states[ids])
        raw = self.unet(x, t, **emb.unet_kwargs(ids), return_dict=False)[0]  # SDXL: added conditioning
        return self.adapter.to_eps(x, raw, t)


@dataclass
class CompositionOutput:
    """images: list of PIL images (or a (B, 3, H, W) tensor in [0, 1] for output_type='pt', None for
    'latent'); latents (B, C, h, w) fp32; record: the per-step predictions (R, B, C, h, w) of the
    R condition rows ``prompts`` (None without record); n_evals: UNet rows evaluated; weights
    (R - 1,) the combine weights used; generate: the generation mode used."""

    images: object
    latents: torch.Tensor
    record: StepRecord | None
    n_evals: int
    composition: Composition
    weights: torch.Tensor
    seeds: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # the condition rows (row 0 the base)
    generate: str = "composed"
    # early rejection (``early_reject=``): alive (B,) bool, the images sampled to the end (latents of
    # the others: where they stopped; record: the alive ones only, in order); stopped (B,) int64,
    # the steps each ran; margins (n_checks, B) fp32, the partial margins (NaN where not reached)
    alive: torch.Tensor | None = None
    stopped: torch.Tensor | None = None
    margins: torch.Tensor | None = None


class _EarlyStop:
    """ddim_sample's on_step for early rejection: at each check, the partial margins of the images
    still running, the rule's verdict, and the bookkeeping of who stopped where."""

    def __init__(self, rule, comp, eps_fn, x_T, schedule, weights, record_every, clip_x0, num_steps, negation):
        self.rule, self.comp, self.eps_fn, self.num_steps = rule, comp, eps_fn, num_steps
        self.kw = dict(record_every=record_every, schedule=schedule, weights=weights, clip_x0=clip_x0, negation=negation)
        B = x_T.shape[0]
        self.latents = x_T.clone().float()  # where each image stopped (the alive ones filled at the end)
        self.alive = torch.ones(B, dtype=torch.bool)
        self.stopped = torch.full((B,), num_steps, dtype=torch.long)
        self.margins = torch.full((len(rule.checks), B), float("nan"))

    def __call__(self, s: int, x: torch.Tensor) -> torch.Tensor | None:
        if s not in self.rule.checks:
            return None
        from compkern.pipelines.early_reject import partial_margins

        i = self.rule.checks.index(s)
        idx = self.alive.nonzero().flatten()
        m = partial_margins(self.comp, self.eps_fn.record, (s,), **self.kw)[0].cpu()
        self.margins[i, idx] = m
        keep = self.rule.keep(i, m)
        gone = idx[~keep]
        self.latents[gone.to(x.device)] = x[~keep.to(x.device)].float()
        self.stopped[gone] = s
        self.alive[gone] = False
        if not bool(keep.all()):
            self.eps_fn.select(keep)
        return keep

    def finish(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (alive, *S) of the images sampled to the end -> latents (B, *S) of every image."""
        out = self.latents.to(x0.device)
        out[self.alive.to(x0.device)] = x0.float()
        return out


class CompositionPipeline(DiffusionPipeline):
    """Composed generation (Composable Diffusion with one batched UNet call per step) over the
    components of a diffusers Stable Diffusion folder: a diffusers ``DiffusionPipeline`` (registered
    modules, ``.to()``, ``save_pretrained``, ``components``, ``enable_model_cpu_offload`` with
    accelerate). Build with ``from_pretrained`` (a local folder) or ``from_pipe`` (a loaded pipeline)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["vae", "text_encoder_2", "tokenizer_2"]
    schedule_type = NoiseSchedule  # the noise schedule the folder's scheduler defines

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2=None, tokenizer_2=None):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.is_sdxl = text_encoder_2 is not None
        self._init_state()

    def _init_state(self) -> None:
        self._cache: dict[tuple[str, ...], PromptEmbeddings] = {}
        self.n_encodes = 0  # text-encoder batches run (prompts are encoded once per pipeline)
        self.last_chunk_size: int | None = None  # the rows per UNet call the last generation used

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network every condition row runs through (the UNet; SD3's transformer)."""
        return self.unet

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pipe(cls, pipe) -> "CompositionPipeline":
        """A CompositionPipeline over the components of a loaded diffusers pipeline
        (StableDiffusionPipeline, StableDiffusionXLPipeline, or any with unet, vae, text_encoder,
        tokenizer, scheduler and for SDXL text_encoder_2, tokenizer_2): the same module objects,
        no weight copied; its scheduler supplies the noise schedule and prediction type."""
        if cls is CompositionPipeline and getattr(pipe, "transformer", None) is not None:
            from compkern.pipelines.sd3 import SD3CompositionPipeline

            return SD3CompositionPipeline.from_pipe(pipe)
        missing = [n for n in ("unet", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, n, None) is None]
        if missing:
            raise TypeError(f"from_pipe needs a pipeline with {missing} ({type(pipe).__name__} has none)")
        return cls(pipe.unet, getattr(pipe, "vae", None), pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                   getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str | torch.dtype = "fp32",
                        device: str | torch.device = "cpu") -> "CompositionPipeline":
        """Load unet/, text_encoder/, tokenizer/, scheduler/ (compkern.models.unet.SDComponents),
        vae/ when present, and for SDXL text_encoder_2/ + tokenizer_2/, from a local diffusers
        folder, offline. A folder without vae/ is a pixel-space model (such as `compkern sepen
        train`'s shapes world): its samples are the images. The models take ``dtype``, except a
        VAE whose config says force_upcast (fp32)."""
        from transformers import CLIPTextModelWithProjection

        from compkern.models.unet import SDComponents, quiet_loading

        path = Path(path)
        if cls is CompositionPipeline and (path / "transformer").is_dir():
            from compkern.pipelines.sd3 import SD3CompositionPipeline

            return SD3CompositionPipeline.from_pretrained(path, dtype=dtype, device=device)
        dtype = resolve_dtype(dtype)
        parts = SDComponents.from_pretrained(path, with_vae=(path / "vae").is_dir(), torch_dtype=dtype, device=device)
        if parts.vae is not None and parts.vae.config.get("force_upcast", False):
            parts.vae.float()  # SDXL's VAE overflows in fp16
        te2 = tok2 = None
        if (path / "text_encoder_2").is_dir():  # SDXL
            from transformers import AutoTokenizer

            with quiet_loading():
                te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=dtype,
                                                                  local_files_only=True)
            te2 = te2.to(device).requires_grad_(False).eval()
            tok2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
        return cls(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler, te2, tok2)

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule of the scheduler now set (``pipe.scheduler = ...`` swaps it)."""
        if getattr(self, "_schedule_of", None) is not self.scheduler:
            self._schedule, self._schedule_of = self.schedule_type.from_diffusers(self.scheduler), self.scheduler
        return self._schedule

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def sample_size(self) -> int:
        """Image pixels per side by default."""
        return int(self.denoiser.config.sample_size) * self.vae_scale

    @property
    def vae_scale(self) -> int:
        """Image pixels per latent pixel (1 for a pixel-space model without a VAE)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -- prompts ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_one(self, prompts: list[str], tokenizer, text_encoder, penultimate: bool, max_length: int | None = None):
        limit = max_length or tokenizer.model_max_length
        for prompt in prompts:  # as diffusers does: warn, then encode the first `limit` tokens
            n = len(tokenizer(prompt, truncation=False).input_ids)
            if n > limit:
                import warnings

                warnings.warn(f"prompt {prompt!r} is {n} tokens long; the text encoder reads {limit}: the rest is "
                              "cut off", stacklevel=3)
        tok = tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        ids = tok.input_ids.to(text_encoder.device)
        mask = tok.attention_mask.to(ids.device) if getattr(text_encoder.config, "use_attention_mask", False) else None
        out = text_encoder(ids, attention_mask=mask, output_hidden_states=penultimate)
        states = out.hidden_states[-2] if penultimate else out[0]
        return states, (out[0] if out[0].dim() == 2 else None)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], *, height: int | None = None, width: int | None = None) -> PromptEmbeddings:
        """Encode prompts (row 0 the base) once; later calls with the same prompts and size hit a cache."""
        prompts = [str(p) for p in prompts]
        key = (*prompts, str(height), str(width), str(self.dtype), str(self.device))  # .to() re-encodes
        if key in self._cache:
            return self._cache[key]
        self.n_encodes += 1
        if not self.is_sdxl:
            states, _ = self._encode_one(prompts, self.tokenizer, self.text_encoder, penultimate=False)
            emb = PromptEmbeddings(prompts, states.to(self.dtype))
        else:
            s1, _ = self._encode_one(prompts, self.tokenizer, self.text_encoder, penultimate=True)
            s2, pooled = self._encode_one(prompts, self.tokenizer_2, self.text_encoder_2, penultimate=True)
            # the empty prompt is encoded like any other (CompLift's public code), not zeroed as
            # diffusers' SDXL does for a missing negative prompt (force_zeros_for_empty_prompt)
            states = torch.cat([s1, s2.to(s1.dtype)], dim=-1)
            h, w = height or self.sample_size, width or self.sample_size
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=states.device).expand(len(prompts), 6)
            emb = PromptEmbeddings(prompts, states.to(self.dtype), pooled.to(self.dtype), time_ids.contiguous())
        self._cache[key] = emb
        return emb

    def prepare(self, prompt: str | Composition, *, negative_prompt: str = "", height: int | None = None,
                width: int | None = None, with_joint: bool = False) -> tuple[Composition, PromptEmbeddings]:
        """Parse the expression and encode its condition rows (once): [negative_prompt,
        *components], plus the joint caption as row K+1 with ``with_joint`` (Composition.condition_prompts)."""
        comp = prompt if isinstance(prompt, Composition) else parse_composition(prompt)
        rows = comp.condition_prompts(negative_prompt, with_joint=with_joint)
        return comp, self.encode(rows, height=height, width=width)

    def eps_model(self, embeddings: PromptEmbeddings) -> ConditionedUNet:
        """The EpsModel over condition ids that CompLift's trials evaluate."""
        return ConditionedUNet(self.unet, embeddings, self.schedule, self.prediction_type)

    def sampling_model(self, embeddings: PromptEmbeddings):
        """What the sampler's batched call evaluates (eps here; SD3: the velocity)."""
        return self.eps_model(embeddings)

    def eps_record(self, record: StepRecord) -> StepRecord:
        """The sampling record in CompLift's layout (variance-preserving x_t, t, eps); as it is here."""
        return record

    def timestep_kwargs(self, latents: torch.Tensor, scheduler) -> dict:
        """Extra arguments of ``scheduler``'s set_timesteps for latents (B, C, h, w) (none here)."""
        return {}

    # -- sampling --------------------------------------------------------------------------------
    def resolve_scheduler(self, scheduler):
        """None (compkern's DDIM / DDPM) or a diffusers scheduler: an instance, a name of
        ``SCHEDULERS`` built from this folder's scheduler config, or 'folder' (the folder's own)."""
        if scheduler is None:
            return None
        if isinstance(scheduler, str):
            if scheduler == "folder":
                return self.scheduler
            if scheduler not in SCHEDULERS:
                raise ValueError(f"scheduler must be None, 'folder', one of {sorted(SCHEDULERS)} or a diffusers "
                                 f"scheduler instance, got {scheduler!r}")
            import diffusers

            return getattr(diffusers, SCHEDULERS[scheduler]).from_config(self.scheduler.config)
        check_scheduler(scheduler)
        name = type(scheduler).__name__
        if is_flow_scheduler(scheduler) or "num_train_timesteps" not in scheduler.config:
            raise ValueError(f"scheduler {name} does not sample a noise-prediction (DDPM-trained) model; "
                             f"use one of {sorted(SCHEDULERS)}")
        return scheduler

    def generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        """One CPU generator per seed: it draws that image's initial latents, then its step noise
        (eta > 0), so an image never depends on the batch it lands in (diffusers' list of generators)."""
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    def initial_latents(self, seeds: Sequence[int] | Sequence[torch.Generator], *, height: int | None = None,
                        width: int | None = None) -> torch.Tensor:
        """(B, C, h, w) fp32 standard normal, one CPU generator per seed (independent of batching)."""
        h = (height or self.sample_size) // self.vae_scale
        w = (width or self.sample_size) // self.vae_scale
        gens = [g if isinstance(g, torch.Generator) else torch.Generator().manual_seed(int(g)) for g in seeds]
        return torch.stack([torch.randn(self.latent_channels, h, w, generator=g) for g in gens]).to(self.device)

    def sampling_setup(self, prompt: str | Composition, *, num_inference_steps: int, guidance_scale: float,
                       negative_prompt: str = "", generate: str = "joint", record_joint: bool | None = None,
                       clip_x0: float | str | None = "auto", height: int | None = None, width: int | None = None,
                       early_reject: "EarlyRejectRule | None" = None):
        """What a sampler of this pipeline needs, checked once: (composition, its encoded condition
        rows, the combine weights (R - 1,), the generation mode used, clip_x0 resolved). The joint
        caption's row is encoded when generating from it, or (record_joint None) when early
        rejection scores a pure AND against it."""
        if generate not in GENERATE_MODES:
            raise ValueError(f"generate must be one of {GENERATE_MODES}, got {generate!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if early_reject is not None:
            from compkern.pipelines.early_reject import check_checks

            check_checks(early_reject.checks, num_inference_steps)
        comp = prompt if isinstance(prompt, Composition) else parse_composition(prompt)
        if comp.joint is None:
            generate = "composed"
        if record_joint is None:
            record_joint = generate == "joint" or (early_reject is not None and comp.joint is not None)
        comp, emb = self.prepare(comp, negative_prompt=negative_prompt, height=height, width=width,
                                 with_joint=bool(record_joint))
        weights = comp.weights(guidance_scale, generate=generate, rows=len(emb)).to(self.device)
        if clip_x0 == "auto":
            clip_x0 = 1.0 if self.vae is None else None
        return comp, emb, weights, generate, clip_x0

    @torch.no_grad()
    def __call__(self, prompt: str | Composition, *, seeds: Sequence[int] = (0,), num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, negative_prompt: str = "", eta: float = 0.0,
                 generate: str = "joint", record_joint: bool | None = None, clip_x0: float | str | None = "auto",
                 height: int | None = None, width: int | None = None, chunk_size: int | str | None = None,
                 record: bool = True, record_every: int = 1, output_type: str = "pil",
                 latents: torch.Tensor | None = None, progress: bool = False,
                 early_reject: "EarlyRejectRule | None" = None, negation: str = "linear",
                 scheduler=None, callback_on_step_end=None) -> CompositionOutput:
        """Generate len(seeds) images of the composed prompt.

        generate: 'joint' (default; classifier-free guidance on the joint caption of the required
        components, the other components composed: ``Composition.weights``), or 'composed'
        (Composable Diffusion over every component). Expressions without a joint (a pure OR or
        NOT) are always composed. record_joint: evaluate the joint caption as an extra condition
        row (row K+1; the CompLift target of ``cached_lift_maps(target='joint')``); None: when
        generating from it. clip_x0: clamp the predicted x0 at each step ('auto': to [-1, 1] for a
        pixel-space model without a VAE, off for latents). record_every: with ``record``, keep every
        k-th step (all rows evaluated there, the steps between evaluate only the rows generation
        weighs). ``chunk_size`` caps the UNet rows per call (None: all rows at once; "auto": start
        there and halve on out-of-memory). early_reject: an ``early_reject.EarlyRejectRule``; at each
        of its checks the images whose partial margin is below its threshold stop (``alive``); without
        ``record`` the steps up to the last check are recorded for it (and nothing after). negation:
        'linear' (a NOT is a negative weight) or 'perp' (perpendicular negation, ``perp_neg_eps``).
        scheduler: None (compkern's DDIM, or DDPM-like with eta > 0), or a diffusers scheduler
        (``resolve_scheduler``: 'dpm++', 'euler', 'unipc', 'folder', ... or an instance) whose step
        takes the composed eps (``scheduler_sample``); early rejection needs None.
        callback_on_step_end(pipe, step, t, {"latents": x}) -> dict, as diffusers calls it after each
        step; a returned "latents" replaces the latents (of the images still running)."""
        sched = self.resolve_scheduler(scheduler)
        if sched is not None and early_reject is not None:
            raise ValueError("early_reject stops images on compkern's own DDIM sampler: pass scheduler=None")
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        comp, emb, weights, generate, clip_x0 = self.sampling_setup(
            prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            generate=generate, record_joint=record_joint, clip_x0=clip_x0, height=height, width=width,
            early_reject=early_reject)
        seeds = [int(s) for s in seeds]
        if not seeds and latents is None:
            raise ValueError("seeds must hold at least one seed (one image per seed)")
        rows = None if chunk_size in (None, "auto") else int(chunk_size)
        while True:  # one pass, or with chunk_size "auto" one more per halving after an out-of-memory
            gens = self.generators(seeds)  # every image's latents and noise replay from its own seed
            x_T = self.initial_latents(gens, height=height, width=width) if latents is None else latents.float()
            if x_T.dim() != 4 or x_T.shape[1] != self.latent_channels:
                raise ValueError(f"latents must have shape (B, {self.latent_channels}, h, w), got {tuple(x_T.shape)}")
            if eta > 0 and len(gens) != x_T.shape[0]:
                raise ValueError(f"eta > 0 draws each image's step noise from its seed: give one seed per latent "
                                 f"({x_T.shape[0]}), got {len(gens)}")
            ids = torch.arange(len(emb), device=self.device)[:, None].expand(len(emb), x_T.shape[0])
            rows = ids.numel() if rows is None else rows
            until = None if record or early_reject is None else early_reject.checks[-1]
            eps_fn = ComposedEps(self.sampling_model(emb), ids, weights, chunk_size=rows,
                                 record=record or early_reject is not None, record_every=record_every, record_until=until,
                                 negation=negation)
            stop = None if early_reject is None else _EarlyStop(early_reject, comp, eps_fn, x_T, self.schedule, weights,
                                                                record_every, clip_x0, num_inference_steps, negation)
            ts_kw = self.timestep_kwargs(x_T, sched)
            on_step = self._on_step(stop, callback_on_step_end, sched, num_inference_steps, ts_kw)
            try:
                if sched is None:
                    x0 = ddim_sample(eps_fn, x_T, self.schedule, num_steps=num_inference_steps, eta=eta, clip_x0=clip_x0,
                                     progress=progress, generator=gens if eta > 0 else None, on_step=on_step)
                else:
                    x0 = scheduler_sample(eps_fn, x_T, sched, num_steps=num_inference_steps, schedule=self.schedule,
                                          clip_x0=clip_x0, eta=eta, progress=progress, on_step=on_step,
                                          generator=gens if len(gens) == x_T.shape[0] else None, timestep_kwargs=ts_kw)
                break
            except torch.OutOfMemoryError:
                if chunk_size != "auto" or rows == 1:
                    raise
                del eps_fn
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                rows = max(1, rows // 2)  # "auto": halve the rows per UNet call and start the batch again
        self.last_chunk_size = rows
        extra = {}
        if stop is not None:
            x0 = stop.finish(x0)
            extra = dict(alive=stop.alive, stopped=stop.stopped, margins=stop.margins)
        images = None if output_type == "latent" else self.decode(x0, output_type=output_type)
        return CompositionOutput(images, x0, self.eps_record(eps_fn.record) if record else None, eps_fn.n_evals,
                                 comp, weights, seeds, emb.prompts, generate, **extra)

    def _on_step(self, stop: "_EarlyStop | None", callback, sched, num_steps: int, timestep_kwargs: dict):
        """The samplers' on_step: diffusers' callback_on_step_end (its "latents" copied in), then early rejection."""
        if callback is None:
            return stop
        if not callable(callback):
            raise TypeError(f"callback_on_step_end must be callable(pipe, step, t, callback_kwargs), got {type(callback).__name__}")
        if sched is None:
            ts = self.schedule.timesteps(num_steps)
        else:  # the timesteps scheduler_sample's copy of the scheduler steps through
            probe = epsilon_scheduler(sched)
            probe.set_timesteps(num_steps, **timestep_kwargs)
            ts = probe.timesteps

        def on_step(s: int, x: torch.Tensor):
            ret = callback(self, s - 1, ts[s - 1], {"latents": x})
            new = (ret or {}).get("latents")
            if new is not None and new is not x:
                if new.shape != x.shape:
                    raise ValueError(f"callback_on_step_end returned latents {tuple(new.shape)}, expected {tuple(x.shape)}")
                x.copy_(new)
            return None if stop is None else stop(s, x)

        return on_step

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, embeddings: PromptEmbeddings, *,
                chunk_size: int | None = None) -> torch.Tensor:
        """x_t (B, C, h, w), t (B,) -> preds (K+1, B, C, h, w) of every condition, one batched call."""
        B = x_t.shape[0]
        ids = torch.arange(len(embeddings), device=x_t.device)[:, None].expand(len(embeddings), B)
        return evaluate_conditions(self.eps_model(embeddings), x_t, t, ids, chunk_size=chunk_size)

    @staticmethod
    def combine(preds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return combine_eps(preds, weights.to(preds.device))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, output_type: str = "pil", batch: int = 4):
        """latents (B, C, h, w) -> PIL images, or a (B, 3, H, W) fp32 tensor in [0, 1]. Without a
        VAE the latents are the images, in [-1, 1]."""
        if self.vae is None:
            if latents.shape[1] != 3:
                raise ValueError(f"a pixel-space model must make RGB samples (B, 3, H, W), got {tuple(latents.shape)}")
            img = (latents.float() / 2 + 0.5).clamp(0, 1)
        else:
            vdt = self.vae.dtype
            outs = []
            for s in range(0, latents.shape[0], batch):
                z = latents[s:s + batch].to(vdt) / self.vae.config.scaling_factor
                if self.vae.config.get("shift_factor") is not None:  # SD3's VAE
                    z = z + self.vae.config.shift_factor
                outs.append(self.vae.decode(z, return_dict=False)[0].float())
            img = (torch.cat(outs) / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return img
        from PIL import Image

        arr = (img.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in arr]
