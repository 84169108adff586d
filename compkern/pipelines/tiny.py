"""A tiny random-weight Stable Diffusion folder (SD 1.x, SDXL or SD3 layout) for offline tests,
benchmarks and smoke runs: every component is built from a small config and written with
``save_pretrained``, exactly as a real checkpoint folder is laid out (model_index.json, unet/,
vae/, text_encoder/, tokenizer/, scheduler/, and for SDXL text_encoder_2/, tokenizer_2/; SD3:
transformer/ instead of unet/, and text_encoder_3/ (T5), tokenizer_3/).

The tokenizer is a byte-level CLIP BPE whose vocabulary is the 256 byte symbols (plain and with the
end-of-word mark) and a handful of merges, so any prompt tokenizes without a downloaded vocab (the
SD3 folder's tokenizer_3 is one too: T5's sentencepiece vocab is not shipped; the T5 encoder reads
its ids like any).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_MAX_LENGTH = 32  # tokens per prompt (SD uses 77)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_clip_tokenizer_files(folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt of a byte-level CLIP BPE (about 520 tokens)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    merges = ["c a", "ca r</w>", "d o", "do g</w>"]
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab, merges = write_tiny_clip_tokenizer_files(folder)
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=TINY_MAX_LENGTH)


def _text_config(tokenizer) -> dict:
    return dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                max_position_embeddings=TINY_MAX_LENGTH, hidden_act="gelu", layer_norm_eps=1e-5,
                vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def _write_folder(path: Path, parts: dict, index: dict) -> Path:
    """The layout of DiffusionPipeline.save_pretrained, without importing the pipeline classes (slow)."""
    for name, part in parts.items():
        part.save_pretrained(path / name)
        lib = "transformers" if name.startswith(("text_encoder", "tokenizer")) else "diffusers"
        index[name] = [lib, type(part).__name__]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    for f in (path / "_tok").iterdir():
        f.unlink()
    (path / "_tok").rmdir()
    return path


def save_tiny_sd3_pipeline(path: str | os.PathLike, *, t5: bool = True, sample_size: int = 8, seed: int = 0,
                           shift: float = 3.0) -> Path:
    """A random-weight SD3 folder: an SD3Transformer2DModel on ``sample_size``^2 latents (images
    twice as large), two CLIP text encoders with projection, a T5 encoder (``t5``), a VAE with
    SD3's shift_factor, and FlowMatchEulerDiscreteScheduler(shift)."""
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(path / "_tok")
    text_cfg = CLIPTextConfig(**_text_config(tokenizer), projection_dim=16)
    parts = {"transformer": SD3Transformer2DModel(sample_size=sample_size, patch_size=1, in_channels=4, num_layers=1,
                                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                                  caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                                                  pos_embed_max_size=sample_size),
             "vae": AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=4, norm_num_groups=4, sample_size=2 * sample_size, layers_per_block=1,
                                  use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                                  scaling_factor=1.5035),
             "text_encoder": CLIPTextModelWithProjection(text_cfg), "tokenizer": tokenizer,
             "text_encoder_2": CLIPTextModelWithProjection(text_cfg), "tokenizer_2": _tokenizer(path / "_tok"),
             "scheduler": FlowMatchEulerDiscreteScheduler(shift=shift)}
    if t5:
        parts["text_encoder_3"] = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37,
                                                          num_layers=2, num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                                          eos_token_id=tokenizer.eos_token_id))
        parts["tokenizer_3"] = _tokenizer(path / "_tok")
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    if not t5:
        index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    return _write_folder(path, parts, index)


def save_tiny_pipeline(path: str | os.PathLike, *, sdxl: bool = False, prediction_type: str = "epsilon",
                       sample_size: int = 8, seed: int = 0) -> Path:
    """Build a random-weight pipeline with ``sample_size`` x ``sample_size`` latents (images twice
    as large), save it under ``path`` and return the path. ``sdxl`` adds the second text encoder
    and the added (text_embeds, time_ids) conditioning of SDXL."""
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    tok_dir = path / "_tok"
    tokenizer = _tokenizer(tok_dir)
    text_cfg = _text_config(tokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    unet_cfg = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4,
                    out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                    attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=2 * sample_size, layers_per_block=1)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    parts = {"unet": None, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False}
    if sdxl:
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg, projection_dim=16))
        parts["tokenizer_2"] = _tokenizer(tok_dir)
        parts["unet"] = UNet2DConditionModel(**{**unet_cfg, "cross_attention_dim": 32}, addition_embed_type="text_time",
                                             addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4)
        index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
                 "feature_extractor": [None, None], "image_encoder": [None, None], "force_zeros_for_empty_prompt": True}
    else:
        parts["unet"] = UNet2DConditionModel(**unet_cfg)
    return _write_folder(path, parts, index)
