"""Model folders for the benchmarks: the bundled model, or stand-ins built once and cached.

The cache lives in `cache/benchmarks/` at the repository root (git-ignored); set LATENTDIFF_BENCH_CACHE
to move it. Folders are written in diffusers layout, so both pipelines read the very same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LATENTDIFF_BENCH_CACHE", ROOT / "cache" / "benchmarks"))
BUNDLED = ROOT / "weights" / "shapes-tiny"
RECIPE = ROOT / "training" / "recipes" / "default" / "recipe.json"


def small_model() -> tuple[Path, str]:
    """(folder, description) for benchmark row 1: the bundled model, else a random stand-in from its recipe."""
    if (BUNDLED / "model_index.json").is_file():
        return BUNDLED, "bundled model weights/shapes-tiny"
    recipe, what = json.loads(RECIPE.read_text()), f"random stand-in from {RECIPE.relative_to(ROOT)}"
    model_keys = ("seed", "resolution", "tokenizer", "text_encoder", "vae", "unet", "scheduler", "defaults")
    model_part = {k: recipe.get(k) for k in model_keys}  # training settings do not change the model
    digest = hashlib.sha256(json.dumps(model_part, sort_keys=True).encode()).hexdigest()[:8]
    key = f"{recipe['name']}-{digest}"
    folder = CACHE / f"standin-{key}"
    if not (folder / "model_index.json").is_file():
        from latentdiff.pipeline import LatentDiffusionPipeline
        from latentdiff.testing.tiny import jitter
        from latentdiff.training.scratch import init_model_folder, shapes_captions

        tmp = init_model_folder(recipe, shapes_captions(2000), None, folder.with_suffix(".tmp"))
        pipe = LatentDiffusionPipeline.from_pretrained(tmp)
        for i, m in enumerate((pipe.unet, pipe.vae)):
            jitter(m, recipe.get("seed", 0) + i, scale=0.02)
        pipe.save_pretrained(folder, dtype=torch.float16)
        shutil.rmtree(tmp)
    return folder, what


def sd15_random() -> Path:
    """An SD1.5-size folder with random weights (fp16 files), built with diffusers once and cached."""
    folder = CACHE / "sd15-random"
    if (folder / "model_index.json").is_file():
        return folder
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from latentdiff.testing.tiny import byte_vocab_tokenizer, jitter, sd_pipeline

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = byte_vocab_tokenizer(tmp)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,  # SD's size; the byte tokenizer's ids (< 520) are all inside it
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for i, m in enumerate((unet, vae)):
        jitter(m, i, scale=0.02)
    pipe = sd_pipeline(unet, vae, text, tokenizer)
    tmp = folder.with_suffix(".tmp")
    pipe.to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(folder)
    return folder


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
