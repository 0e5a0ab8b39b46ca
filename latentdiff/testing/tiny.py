"""Build tiny Stable-Diffusion-style model folders with diffusers, so tests compare against the oracle.

Everything here is random and small (a few thousand to a few hundred thousand parameters); nothing is
downloaded. The byte-level tokenizer knows every character, so any prompt tokenizes.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def byte_vocab_tokenizer(folder: str | Path, model_max_length: int = 77):
    """Write a CLIP-format tokenizer with one token per byte character and no merges."""
    from transformers import CLIPTokenizer

    from latentdiff.training.tokenizer import write_clip_tokenizer_files

    vocab, merges = write_clip_tokenizer_files(folder, merges=[])
    tok = CLIPTokenizer(str(vocab), str(merges), model_max_length=model_max_length)
    tok.save_pretrained(str(folder))
    return tok


SD1_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)

SD2_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    norm_num_groups=8,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)

TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)


def tiny_diffusers_pipeline(style: str = "sd1", seed: int = 0, prediction_type: str | None = None):
    """A random StableDiffusionPipeline; style 'sd1' (conv projections, epsilon) or 'sd2' (linear, v)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(SD1_UNET if style == "sd1" else SD2_UNET))
    vae = AutoencoderKL(**TINY_VAE)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = byte_vocab_tokenizer(tmp)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TINY_TEXT))
    if prediction_type is None:
        prediction_type = "epsilon" if style == "sd1" else "v_prediction"
    for module in (unet, vae, text_encoder):
        jitter(module, seed + 1)
    return sd_pipeline(unet, vae, text_encoder, tokenizer, prediction_type)


def sd_pipeline(unet, vae, text_encoder, tokenizer, prediction_type: str = "epsilon"):
    """A StableDiffusionPipeline of these parts with SD's DDIM schedule and no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def jitter(module, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every parameter: fresh diffusers models have zeroed layers that hide mistakes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def save_tiny_pipeline(folder: str | Path, style: str = "sd1", seed: int = 0, **kwargs) -> Path:
    """Write a tiny diffusers folder (safetensors) and return its path."""
    pipe = tiny_diffusers_pipeline(style, seed, **kwargs)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
