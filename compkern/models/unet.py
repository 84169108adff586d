"""diffusers ``UNet2DConditionModel`` as an EpsModel, and loading of Stable Diffusion 1.x folders.

``UNetEps(unet, schedule, prediction_type)`` is ``model(x_t (N, C, H, W), t (N,) int64,
encoder_states (N, L, D)) -> eps (N, C, H, W)``: it converts the UNet's output to eps through the
schedule whatever the model predicts ("epsilon", "v_prediction" or "sample").

``SDComponents.from_pretrained(path)`` loads a local Stable Diffusion 1.x folder (the layout of
e.g. CompVis/stable-diffusion-v1-4 or a ``save_pretrained`` of compkern's tiny shapes model)::

    path/unet/            config.json + diffusion_pytorch_model.safetensors
    path/text_encoder/    CLIPTextModel
    path/tokenizer/       any tokenizer AutoTokenizer loads (CLIPTokenizer for SD)
    path/scheduler/       scheduler_config.json (DDPMScheduler, PNDMScheduler, ...: only its betas
                          and prediction_type are used)
    path/vae/             AutoencoderKL, loaded only with ``with_vae=True`` (needed to decode latents)

Nothing is downloaded: pass a folder you have (``huggingface-cli download
CompVis/stable-diffusion-v1-4 --local-dir sd14`` on a machine with internet, then
``SDComponents.from_pretrained("sd14", with_vae=True)``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from compkern.models.schedule import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class UNetEps(torch.nn.Module):
    """EpsModel adapter around a diffusers ``UNet2DConditionModel``."""

    def __init__(self, unet: torch.nn.Module, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a compkern NoiseSchedule, got {type(schedule).__name__}")
        self.unet, self.schedule, self.prediction_type = unet, schedule, prediction_type

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, encoder_states: torch.Tensor) -> torch.Tensor:
        """The UNet's own output (eps, v or x0, per ``prediction_type``), (N, C, H, W)."""
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4:
            raise TypeError(f"x_t must be a (N, C, H, W) tensor, got {getattr(x_t, 'shape', type(x_t))}")
        if not isinstance(encoder_states, torch.Tensor) or encoder_states.dim() != 3 or encoder_states.shape[0] != x_t.shape[0]:
            raise ValueError(f"encoder_states must be (N={x_t.shape[0]}, L, D), got {getattr(encoder_states, 'shape', type(encoder_states))}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        return self.unet(x_t, t, encoder_hidden_states=encoder_states.to(x_t.dtype)).sample

    def to_eps(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Converts a raw prediction to eps."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        if self.prediction_type == "v_prediction":
            return self.schedule.v_to_eps(x_t, out, t)
        if self.prediction_type == "sample":
            return self.schedule.x0_to_eps(x_t, out, t)
        return out

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of ``raw`` for a denoising loss (eps, v or x0)."""
        if self.prediction_type == "v_prediction":
            return self.schedule.v_target(x0, noise, t)
        if self.prediction_type == "sample":
            return x0
        return noise

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, encoder_states: torch.Tensor) -> torch.Tensor:
        return self.to_eps(x_t, self.raw(x_t, t, encoder_states), t)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "UNetEps":
        """From a Stable-Diffusion-style folder (unet/ + scheduler/); kwargs go to the UNet's loader."""
        return SDComponents.from_pretrained(path, load_text=False, **kwargs).eps_model()


def diffusers_load_kwargs() -> dict:
    """Loader options that need no warning: without accelerate, diffusers falls back to a plain
    load and warns each time unless low_cpu_mem_usage=False is asked for."""
    return {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Loading without transformers' per-model "Loading weights" progress bars (restored after)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion 1.x folder compkern uses."""

    unet: Any
    scheduler: Any
    text_encoder: Any = None
    tokenizer: Any = None
    vae: Any = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, with_vae: bool = False, load_text: bool = True,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> "SDComponents":
        """Loads unet/, scheduler/, text_encoder/ + tokenizer/ (``load_text``) and vae/ (``with_vae``)
        from a local folder, offline; every model is put in eval mode with gradients off."""
        from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
        from diffusers import DDPMScheduler

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"path must be a local Stable Diffusion folder, {path!r} is not a directory")
        for sub in ("unet", "scheduler") + (("text_encoder", "tokenizer") if load_text else ()) + (("vae",) if with_vae else ()):
            if not os.path.isdir(os.path.join(path, sub)):
                raise ValueError(f"{path!r} has no {sub}/ subfolder (expected the Stable Diffusion 1.x layout)")
        dt = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        quiet = diffusers_load_kwargs()
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True, **dt, **quiet)
        try:  # the scheduler's class is irrelevant here: only betas and prediction_type are used
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        except Exception:  # noqa: BLE001 - fall back to whatever class the config names
            scheduler = SchedulerMixin.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        parts = cls(unet=unet, scheduler=scheduler)
        if load_text:
            from transformers import AutoTokenizer, CLIPTextModel
            parts.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
            with quiet_loading():
                parts.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True, **dt)
        if with_vae:
            parts.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, **dt, **quiet)
        for m in (parts.unet, parts.text_encoder, parts.vae):
            if m is not None:
                m.to(device).requires_grad_(False).eval()
        return parts

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes the same layout back (the parts that are present)."""
        path = os.fspath(path)
        for name in ("unet", "scheduler", "text_encoder", "tokenizer", "vae"):
            part = getattr(self, name)
            if part is not None:
                part.save_pretrained(os.path.join(path, name))

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_diffusers(self.scheduler)

    @property
    def prediction_type(self) -> str:
        return getattr(self.scheduler.config, "prediction_type", "epsilon")

    def eps_model(self) -> UNetEps:
        return UNetEps(self.unet, self.schedule, self.prediction_type)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> encoder states (B, L, D), padded to the tokenizer's model_max_length."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("these components were loaded without the text encoder (load_text=False)")
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] (needs ``with_vae=True``)."""
        if self.vae is None:
            raise ValueError("decoding needs the VAE: load with with_vae=True")
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)
