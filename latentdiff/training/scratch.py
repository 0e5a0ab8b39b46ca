"""A fresh, randomly initialised model folder from a recipe: the starting point of training from scratch.

    python -m latentdiff.training.scratch --recipe training/recipes/default/recipe.json \
        --vae runs/vae/vae --out runs/init

trains the CLIP-format tokenizer on the captions, builds a random CLIP text encoder sized to it and a random
U-Net attending to it, takes the (already trained) autoencoder from --vae, and writes a diffusers-layout
folder with the recipe's stored defaults. `training/train.py --model runs/init --train-text-encoder` then
trains U-Net and text encoder together.

Recipe keys used here (a JSON object; other keys, e.g. training settings, are ignored):
    name           model name stored with the folder
    seed           initialisation seed (default 0)
    resolution     training/sampling size in pixels; sets the U-Net's sample_size
    tokenizer      {"vocab_size", "model_max_length", "min_frequency", "num_captions"}
    text_encoder   CLIPTextConfig fields (vocab_size, token ids, max_position_embeddings are
                   filled in from the tokenizer)
    unet           UNet2DConditionModel config (cross_attention_dim defaults to the text width)
    vae            AutoencoderKL config, used only when no trained --vae is given
    scheduler      diffusers scheduler config (noise schedule, prediction type)
    defaults       stored sampling defaults: sampler, steps, guidance_scale, height, width
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from latentdiff.config import read_json

RECIPE_KEYS = ("name", "resolution", "tokenizer", "text_encoder", "unet", "scheduler", "defaults")


class RecipeError(ValueError):
    """A recipe that cannot build a model; the message names the key."""


def check_recipe(recipe: dict[str, Any]) -> None:
    """Fail early, naming the key, on a recipe that misses a section or disagrees with itself."""
    missing = [k for k in RECIPE_KEYS if k not in recipe]
    if missing:
        raise RecipeError(f"recipe is missing {missing}; it needs {list(RECIPE_KEYS)}")
    from latentdiff.pipeline import check_defaults

    try:
        check_defaults(recipe["defaults"], "recipe defaults")
    except ValueError as e:
        raise RecipeError(str(e)) from None
    width = recipe["text_encoder"].get("hidden_size")
    cross = recipe["unet"].get("cross_attention_dim", width)
    if width is None:
        raise RecipeError("recipe text_encoder needs hidden_size")
    if cross != width:
        raise RecipeError(
            f"recipe: unet cross_attention_dim ({cross}) must equal text_encoder hidden_size ({width}), "
            "the width of the context the U-Net attends to"
        )
    window = recipe["tokenizer"].get("model_max_length", 77)
    positions = recipe["text_encoder"].get("max_position_embeddings", window)
    if positions != window:
        raise RecipeError(
            f"recipe: text_encoder max_position_embeddings ({positions}) must equal tokenizer "
            f"model_max_length ({window})"
        )


def shapes_captions(count: int, seed: int = 0, size: int = 64) -> Iterator[str]:
    """Captions of `count` Shapes scenes (no drawing): one paraphrased and one canonical caption each."""
    import numpy as np

    from latentdiff.data.shapes import caption, sample_scene

    rng = np.random.default_rng([seed, 7])
    for _ in range(count):
        scene = sample_scene(rng, size)
        yield caption(scene, rng, paraphrase=True)
        yield caption(scene)


def folder_captions(folder: str | Path) -> list[str]:
    """The captions of an image-caption folder (the layouts training/train.py reads)."""
    from latentdiff.training.data import find_examples

    found = find_examples(folder, missing_captions="skip")
    return [ex.caption for ex in found.examples if ex.caption]


def load_vae(folder: str | Path):
    """Our VAE from a `vae/` folder (config.json + safetensors), or from a folder holding one."""
    from latentdiff import folders
    from latentdiff.vae import VAE, VAEConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained VAE in {folder}: expected config.json and diffusion_pytorch_model.safetensors"
        )
    vae = VAE(VAEConfig.from_dict(read_json(folder / "config.json")))
    folders.load_weights(vae, folder, "diffusion_pytorch_model")
    return vae


def build_text_encoder(config: dict[str, Any], tokenizer):
    """A random CLIP text encoder whose vocabulary, window and special ids are the tokenizer's."""
    from latentdiff.clip import CLIPTextEncoder, CLIPTextSettings

    fields = dict(config)
    fields.update(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextEncoder(CLIPTextSettings.from_dict(fields, "recipe text_encoder"), fields).init_weights()


def init_model_folder(
    recipe: dict[str, Any],
    captions: Iterable[str],
    vae_folder: str | Path | None,
    out: str | Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Tokenizer trained on `captions`, random text encoder and U-Net, the trained VAE; written to `out`.

    With `vae_folder` None a random VAE is built from recipe["vae"] (for tests; a real recipe trains it
    first, see latentdiff.training.vae_train). Initialisation is seeded by recipe["seed"] and leaves the
    global RNG as it was.
    """
    from latentdiff.pipeline import LatentDiffusionPipeline
    from latentdiff.schedules import ScheduleConfig
    from latentdiff.training.tokenizer import train_clip_tokenizer
    from latentdiff.unet import UNet, UNetConfig
    from latentdiff.vae import VAE, VAEConfig

    check_recipe(recipe)
    scheduler_config = ScheduleConfig.from_dict(recipe["scheduler"], where="recipe scheduler")
    if vae_folder is not None:
        vae = load_vae(vae_folder)
    elif "vae" in recipe:
        vae = None  # built below, under the seed
    else:
        raise RecipeError("no trained VAE given (--vae) and the recipe has no 'vae' config to build one")

    tok = recipe["tokenizer"]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_clip_tokenizer(
            captions,
            Path(tmp) / "tokenizer",
            vocab_size=tok.get("vocab_size", 1024),
            model_max_length=tok.get("model_max_length", 77),
            min_frequency=tok.get("min_frequency", 2),
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.get("seed", 0))
        text_encoder = build_text_encoder(recipe["text_encoder"], tokenizer)
        if vae is None:
            vae = VAE(VAEConfig.from_dict(recipe["vae"]))
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        unet_config = dict(recipe["unet"])
        unet_config.setdefault("cross_attention_dim", text_encoder.config.hidden_size)
        unet_config.setdefault("sample_size", recipe["resolution"] // factor)
        unet_config.setdefault("in_channels", vae.config.latent_channels)
        unet_config.setdefault("out_channels", vae.config.latent_channels)
        if unet_config["in_channels"] != vae.config.latent_channels:
            raise RecipeError(
                f"recipe unet in_channels ({unet_config['in_channels']}) must equal the VAE's "
                f"latent_channels ({vae.config.latent_channels})"
            )
        unet = UNet(UNetConfig.from_dict(unet_config))

    pipe = LatentDiffusionPipeline(
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler_config,
        defaults=dict(recipe["defaults"]),
        name=recipe["name"],
    )
    return pipe.save_pretrained(out, dtype=dtype)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m latentdiff.training.scratch",
        description="Write a randomly initialised model folder (tokenizer trained on the captions, "
        "text encoder, U-Net, the trained VAE) for training from scratch with training/train.py.",
    )
    p.add_argument("--recipe", required=True, help="recipe JSON (training/recipes/default/recipe.json)")
    p.add_argument("--vae", default=None, help="trained VAE: a vae/ folder or a folder holding one")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument(
        "--data",
        default="shapes",
        help="where the tokenizer's captions come from: 'shapes' / 'shapes:SEED' or an image-caption folder",
    )
    p.add_argument("--num-captions", type=int, default=None, help="Shapes scenes to caption (default: recipe)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from latentdiff.training.data import parse_shapes_spec
    from latentdiff.training.errors import TrainingError

    try:
        recipe = read_json(args.recipe)
        shapes_seed = parse_shapes_spec(args.data)
        if shapes_seed is not None:
            count = args.num_captions or recipe.get("tokenizer", {}).get("num_captions", 20_000)
            captions = shapes_captions(count, shapes_seed, recipe.get("resolution", 64))
        else:
            captions = folder_captions(args.data)
        if args.vae is None:
            print("note: no --vae given; the model gets an untrained VAE from the recipe", file=sys.stderr)
        out = init_model_folder(recipe, captions, args.vae, args.out)
    except (RecipeError, TrainingError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
