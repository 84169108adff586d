"""The shapes world's models (``compkern.data.shapes``): its frozen text encoder and a tiny
text-to-image model in Stable Diffusion layout.

``build_text_encoder``: a frozen, randomly initialised ``CLIPTextModel`` with zero transformer
layers: its output is LayerNorm(word embedding + position embedding), a fixed per-word code with
positions and no mixing between words; it saves and loads like Stable Diffusion's
``text_encoder/`` folder. ``build_components``: a fresh ``SDComponents`` (UNet ``UNET_CONFIG``,
cosine DDPM scheduler, this text encoder, the world's tokenizer).
"""
from __future__ import annotations

import torch

from compkern.data import shapes
from compkern.models.unet import SDComponents

__all__ = ["UNET_CONFIG", "build_components", "build_text_encoder", "encode_prompts"]

UNET_CONFIG = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                   cross_attention_dim=64, attention_head_dim=2, norm_num_groups=8)
"""1.0M parameters; cross-attention only at 8x8 (down, mid, up: 4 attn2 layers), 2 heads of 32."""


def build_text_encoder(tokenizer, hidden_size: int = 64, seed: int = 0):
    """A frozen ``CLIPTextModel`` with no transformer layers: last_hidden_state (B, L, hidden_size)
    = LayerNorm(token embedding + position embedding), random with ``seed``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size,
                         num_hidden_layers=0, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        enc = CLIPTextModel(cfg)
        with torch.no_grad():  # unit-scale codes so the LayerNorm output is not dominated by positions
            emb = getattr(enc, "text_model", enc).embeddings  # transformers 4.x nests it under text_model
            emb.token_embedding.weight.normal_(0, 1.0)
            emb.position_embedding.weight.normal_(0, 0.5)
    enc.requires_grad_(False).eval()
    return enc


@torch.no_grad()
def encode_prompts(prompts: list[str], tokenizer, text_encoder) -> torch.Tensor:
    """prompts -> encoder states (B, L, D), padded to the tokenizer's model_max_length."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state




def build_components(unet_config: dict | None = None, *, seed: int = 0, prediction_type: str = "v_prediction",
                     text_dim: int | None = None, naming: str = "attributes") -> SDComponents:
    """A fresh (random) tiny text-to-image model of the shapes world, in Stable Diffusion layout:
    images (B, 3, 16, 16), encoder states (B, MAX_LENGTH, cross_attention_dim)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    cfg = dict(UNET_CONFIG if unet_config is None else unet_config)
    tokenizer = shapes.build_tokenizer(naming=naming)
    text_encoder = build_text_encoder(tokenizer, hidden_size=text_dim or cfg["cross_attention_dim"], seed=seed + 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                              clip_sample=False)
    return SDComponents(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
