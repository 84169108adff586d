"""SD3 / SD3.5 (flow matching) in CompositionPipeline: composed velocity from one batched call.

A Stable Diffusion 3 folder holds an ``SD3Transformer2DModel`` that predicts the velocity v =
eps - x0 of the rectified-flow path x_sigma = (1 - sigma) x0 + sigma eps (timestep sigma * 1000),
three text encoders (CLIP-L and CLIP-G with projection, T5; T5 may be absent) and a
``FlowMatchEulerDiscreteScheduler``. Everything else is CompositionPipeline's:

- Generation: every step evaluates the K+1 condition rows in one (K+1) x B transformer call and
  combines the velocities with the expression's weights (``combine_eps``; the combination is
  linear, so it is the same as combining eps at the same x), then the flow scheduler steps. For a
  plain prompt this is diffusers' StableDiffusion3Pipeline (tests/test_sd3.py holds it to that).
- CompLift: the transformer seen as an eps model of the variance-preserving path
  (``compkern.models.flow.VelocityEps`` on a ``FlowMatchSchedule``), so the lift maps, the cached
  trials of the record (returned in the variance-preserving layout of every other scheduler) and
  the fresh / fixed trials are the same code as for SD 1.x. The lift is then the conditional
  flow-matching loss difference at shared (noise, t), weighted by (1 - sigma)^2 with sigma
  uniform: |eps - eps_hat|^2 = (1 - sigma)^2 |u - v|^2 (compkern.lift.flow states the
  likelihood-weighted variant and checks both against the exact density ratio in 2-D).

Prompts are encoded as diffusers' SD3 pipeline encodes them: each CLIP's penultimate hidden states
(77 tokens) concatenated on features, zero-padded to T5's width, followed on the sequence axis by
T5's ``max_sequence_length`` states (zeros without T5); pooled = both CLIP projections concatenated.
The empty negative prompt is encoded like any prompt (diffusers does the same for SD3).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from compkern.models.flow import FlowMatchSchedule, VelocityEps, flow_scale
from compkern.models.unet import diffusers_load_kwargs, quiet_loading
from compkern.pipelines.composition import SCHEDULERS, CompositionPipeline, PromptEmbeddings, resolve_dtype
from compkern.samplers.composed import StepRecord
from compkern.samplers.diffusion import check_scheduler, is_flow_scheduler

__all__ = ["ConditionedTransformer", "SD3CompositionPipeline"]


class ConditionedTransformer:
    """Velocity model over condition ids: ``model(x (N, C, h, w) in flow coordinates, t (N,) float
    timesteps sigma * T, ids (N,) int64) -> v`` in the transformer dtype; ``ids`` index the rows
    of a PromptEmbeddings (states (R, L, D), pooled (R, P))."""

    def __init__(self, transformer, embeddings: PromptEmbeddings):
        self.transformer, self.embeddings = transformer, embeddings

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, device=self.embeddings.states.device).long()
        emb = self.embeddings
        return self.transformer(hidden_states=x.to(self.transformer.dtype), timestep=t.float(),
                                encoder_hidden_states=emb.states[ids], pooled_projections=emb.pooled[ids],
                                return_dict=False)[0]


class SD3CompositionPipeline(CompositionPipeline):
    """CompositionPipeline over an SD3 / SD3.5 folder (see the module docstring). Build it with
    ``CompositionPipeline.from_pretrained(folder)`` (it picks this class by transformer/) or
    ``from_pipe(StableDiffusion3Pipeline)``. ``max_sequence_length``: T5 tokens per prompt (256,
    diffusers' default). Samples with the folder's flow-matching scheduler (or another
    FlowMatch* instance); compkern's DDIM and early rejection are not offered here."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = ["text_encoder_3", "tokenizer_3"]
    schedule_type = FlowMatchSchedule

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler,
                 text_encoder_3=None, tokenizer_3=None):
        super(CompositionPipeline, self).__init__()
        if not is_flow_scheduler(scheduler):
            raise TypeError(f"scheduler: an SD3 folder needs a flow-matching scheduler (FlowMatchEulerDiscreteScheduler), "
                            f"got {type(scheduler).__name__}")
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, scheduler=scheduler,
                              text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self.is_sdxl = False
        self.max_sequence_length = 256
        self._init_state()

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pipe(cls, pipe) -> "SD3CompositionPipeline":
        """Over the modules of a loaded StableDiffusion3Pipeline (no weight copied)."""
        names = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
        missing = [n for n in names if getattr(pipe, n, None) is None]
        if missing:
            raise TypeError(f"from_pipe needs an SD3 pipeline with {missing} ({type(pipe).__name__} has none)")
        return cls(*(getattr(pipe, n) for n in names), getattr(pipe, "text_encoder_3", None),
                   getattr(pipe, "tokenizer_3", None))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str | torch.dtype = "fp32",
                        device: str | torch.device = "cpu") -> "SD3CompositionPipeline":
        """Load transformer/, vae/, text_encoder{,_2}/ (CLIPTextModelWithProjection), tokenizer{,_2}/,
        scheduler/ and, when present, text_encoder_3/ (T5EncoderModel) + tokenizer_3/ from a local
        diffusers SD3 folder, offline, in ``dtype`` (the VAE in fp32 where its config says force_upcast)."""
        import diffusers
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        path = Path(path)
        for sub in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"):
            if not (path / sub).is_dir():
                raise ValueError(f"{path}: an SD3 folder needs {sub}/ (transformer, vae, two CLIP text encoders and "
                                 "tokenizers, scheduler; T5 optional)")
        dtype = resolve_dtype(dtype)
        kw = dict(torch_dtype=dtype, local_files_only=True)
        dkw = {**kw, **diffusers_load_kwargs()}
        with quiet_loading():
            vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", **dkw)
            if vae.config.get("force_upcast", False):
                vae.float()
            parts = dict(
                transformer=diffusers.SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **dkw),
                vae=vae,
                text_encoder=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **kw),
                tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw),
                tokenizer_2=AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True),
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler",
                                                                                    local_files_only=True))
            if (path / "text_encoder_3").is_dir():
                parts["text_encoder_3"] = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **kw)
                parts["tokenizer_3"] = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3", local_files_only=True)
        for name, part in parts.items():
            if isinstance(part, torch.nn.Module):
                part.to(device).requires_grad_(False).eval()
        return cls(**parts)

    # -- the model -------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def prediction_type(self) -> str:
        return "flow"

    def eps_model(self, embeddings: PromptEmbeddings) -> VelocityEps:
        """The transformer as an eps model of the variance-preserving path (CompLift's trials)."""
        return VelocityEps(self.sampling_model(embeddings), self.schedule)

    def sampling_model(self, embeddings: PromptEmbeddings) -> ConditionedTransformer:
        return ConditionedTransformer(self.transformer, embeddings)

    def eps_record(self, record: StepRecord) -> StepRecord:
        """The flow record (x_sigma, timesteps, velocities) in CompLift's layout: x_vp = x_sigma / c,
        eps = x_sigma + (1 - sigma) v per row, the timesteps as they are (``FlowMatchSchedule``)."""
        out = StepRecord()
        for x, t, v in zip(record.x_t, record.t, record.preds):  # x (B, *S), t (B,), v (R, B, *S)
            sigma = (t.double() / self.schedule.T).reshape(-1, *([1] * (x.dim() - 1)))
            out.x_t.append(x / flow_scale(sigma).to(x.dtype))
            out.t.append(t)
            out.preds.append((x + (1 - sigma.to(x.dtype)) * v.to(x.dtype)).to(v.dtype))  # eps = x + (1 - sigma) v
        return out

    def timestep_kwargs(self, latents: torch.Tensor, scheduler) -> dict:
        """``mu`` of a dynamically shifted ``scheduler`` (from the image's token count, as diffusers' SD3 pipeline)."""
        cfg = scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        p = self.transformer.config.patch_size
        seq = (latents.shape[-2] // p) * (latents.shape[-1] // p)
        return {"mu": calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                      cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))}

    def resolve_scheduler(self, scheduler):
        """None or 'folder': the folder's flow-matching scheduler; or a FlowMatch* instance."""
        if scheduler is None or scheduler == "folder":
            return self.scheduler
        if isinstance(scheduler, str):
            raise ValueError(f"scheduler {scheduler!r}: an SD3 folder samples with a flow-matching scheduler "
                             f"(None / 'folder', or a FlowMatch* instance); {sorted(SCHEDULERS)} step eps models")
        check_scheduler(scheduler)
        if not is_flow_scheduler(scheduler):
            raise ValueError(f"scheduler {type(scheduler).__name__} does not step a flow-matching velocity; an SD3 "
                             "folder takes a FlowMatch* scheduler")
        return scheduler

    # -- prompts ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str], *, height: int | None = None, width: int | None = None) -> PromptEmbeddings:
        """Encode prompts (row 0 the base) once: states (R, 77 + max_sequence_length, D_T5), pooled (R, P)."""
        prompts = [str(p) for p in prompts]
        L = int(self.max_sequence_length)
        key = (*prompts, str(L), str(self.dtype), str(self.device))
        if key in self._cache:
            return self._cache[key]
        self.n_encodes += 1
        s1, p1 = self._encode_one(prompts, self.tokenizer, self.text_encoder, penultimate=True)
        s2, p2 = self._encode_one(prompts, self.tokenizer_2, self.text_encoder_2, penultimate=True)
        clip = torch.cat([s1, s2.to(s1.dtype)], dim=-1)
        width_t5 = int(self.transformer.config.joint_attention_dim)
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), L, width_t5, dtype=clip.dtype, device=clip.device)
        else:
            t5, _ = self._encode_one(prompts, self.tokenizer_3, self.text_encoder_3, penultimate=False, max_length=L)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        states = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
        pooled = torch.cat([p1, p2.to(p1.dtype)], dim=-1)
        emb = PromptEmbeddings(prompts, states.to(self.dtype), pooled.to(self.dtype))
        self._cache[key] = emb
        return emb

    # -- sampling --------------------------------------------------------------------------------
    def __call__(self, prompt, **kwargs):
        """CompositionPipeline.__call__ with the flow-matching scheduler (``resolve_scheduler``)."""
        if kwargs.get("early_reject") is not None:
            raise ValueError("early_reject runs on compkern's DDIM sampler; an SD3 folder samples with its "
                             "flow-matching scheduler")
        return super().__call__(prompt, **kwargs)
