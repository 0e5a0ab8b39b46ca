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
    resolution     training/sampling size in pixels, a multiple of the VAE's factor; sets the U-Net's sample_size
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
import dataclasses
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from latentdiff.config import fits, from_config_dict, read_json

RECIPE_KEYS = ("name", "resolution", "tokenizer", "text_encoder", "unet", "scheduler", "defaults")
SECTIONS = ("tokenizer", "text_encoder", "unet", "scheduler", "defaults")  # the keys holding JSON objects
TOKENIZER_KEYS = ("vocab_size", "model_max_length", "min_frequency", "num_captions")
TEXT_ENCODER_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class RecipeError(ValueError):
    """A recipe that cannot build a model; the message names the key."""


def _is_positive_int(value: Any) -> bool:
    return fits(value, int) and value > 0


def _located(error: Exception, where: str) -> RecipeError:
    """`error` as a RecipeError whose message starts with `where` (the recipe file and section)."""
    message = str(error)
    return RecipeError(message if message.startswith(where) else f"{where}: {message}")


def check_recipe(recipe: dict[str, Any], where: str = "recipe") -> None:
    """Fail early, naming the recipe (`where`) and the key, on a recipe that misses a section, has a value of
    the wrong type or disagrees with itself; cheap: builds no model and trains no tokenizer."""
    from latentdiff.clip import CLIPTextSettings
    from latentdiff.pipeline import check_defaults
    from latentdiff.training.tokenizer import train_clip_tokenizer
    from latentdiff.unet import UNET_TOLERATED, UNetConfig

    missing = [k for k in RECIPE_KEYS if k not in recipe]
    if missing:
        raise RecipeError(f"{where}: missing {missing}; a recipe needs {list(RECIPE_KEYS)}")
    for key in SECTIONS:
        if not isinstance(recipe[key], dict):
            raise RecipeError(f"{where}: {key} must be a JSON object ({{...}}), got {recipe[key]!r}")
    if not isinstance(recipe["name"], str) or not recipe["name"]:
        raise RecipeError(f"{where}: name = {recipe['name']!r} is not a model name (a non-empty string)")
    if not fits(recipe.get("seed", 0), int):
        raise RecipeError(f"{where}: seed = {recipe['seed']!r} is not an integer")
    if not _is_positive_int(recipe["resolution"]):
        raise RecipeError(f"{where}: resolution = {recipe['resolution']!r} is not a positive integer (pixels)")
    try:
        check_defaults(recipe["defaults"], f"{where}: defaults")
    except ValueError as e:
        raise RecipeError(str(e)) from None

    tok = recipe["tokenizer"]
    for key, value in tok.items():
        if key not in TOKENIZER_KEYS:
            raise RecipeError(f"{where}: tokenizer: unknown key {key!r}; the keys are {list(TOKENIZER_KEYS)}")
        if not _is_positive_int(value):
            raise RecipeError(f"{where}: tokenizer: {key} = {value!r} is not a positive integer")
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer's own checks, on no captions: milliseconds
        try:
            train_clip_tokenizer((), Path(tmp), **{k: v for k, v in tok.items() if k != "num_captions"})
        except ValueError as e:
            raise _located(e, f"{where}: tokenizer") from None

    text = recipe["text_encoder"]
    text_where = f"{where}: text_encoder"
    try:  # the field types first (CLIPTextSettings takes any), then what CLIPTextSettings itself refuses
        shape = {f.name for f in dataclasses.fields(CLIPTextSettings)}
        from_config_dict(CLIPTextSettings, {k: v for k, v in text.items() if k in shape}, text_where)
        for key in TEXT_ENCODER_SIZES:
            if key in text and not _is_positive_int(text[key]):
                raise RecipeError(f"{text_where}: {key} = {text[key]!r} is not a positive integer")
        CLIPTextSettings.from_dict(text, text_where)
    except ValueError as e:
        raise _located(e, text_where) from None
    try:  # the U-Net section's keys and types, before they are compared with the text encoder's
        from_config_dict(UNetConfig, recipe["unet"], f"{where}: unet", tolerated=UNET_TOLERATED)
    except ValueError as e:
        raise _located(e, f"{where}: unet") from None
    width = text.get("hidden_size")
    if width is None:
        raise RecipeError(f"{text_where}: hidden_size is missing; it sets the text width (e.g. 128)")
    cross = recipe["unet"].get("cross_attention_dim", width)
    if cross != width:
        raise RecipeError(
            f"{where}: unet cross_attention_dim ({cross!r}) must equal text_encoder hidden_size ({width}), "
            "the width of the context the U-Net attends to"
        )
    window = tok.get("model_max_length", 77)
    positions = text.get("max_position_embeddings", window)
    if positions != window:
        raise RecipeError(
            f"{where}: text_encoder max_position_embeddings ({positions!r}) must equal tokenizer "
            f"model_max_length ({window})"
        )
    if "vae" in recipe and not isinstance(recipe["vae"], dict):
        raise RecipeError(f"{where}: vae must be a JSON object ({{...}}), got {recipe['vae']!r}")


def check_out(out: str | Path) -> Path:
    """The rule save_pretrained follows, checked before any work: `out` is new, empty or an earlier save."""
    from latentdiff import folders
    from latentdiff.training.errors import TrainingError

    try:
        folders.check_replaceable(out, folders.DEFAULTS_FILE)
    except FileExistsError as e:
        raise TrainingError(str(e)) from None
    return Path(out)


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
    from latentdiff.vae import VAE, VAE_TOLERATED, VAEConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained VAE in {folder}: expected config.json and diffusion_pytorch_model.safetensors"
        )
    config = read_json(folder / "config.json")
    kind = config.get("_class_name", "AutoencoderKL")
    if kind != "AutoencoderKL":
        raise folders.ModelFolderError(
            f"{folder} is not a VAE folder: its config.json is a {kind}'s, not an AutoencoderKL's; give a trained "
            "VAE's folder (config.json + diffusion_pytorch_model.safetensors) or a model folder holding vae/"
        )
    vae = VAE(from_config_dict(VAEConfig, config, str(folder / "config.json"), tolerated=VAE_TOLERATED))
    folders.load_weights(vae, folder, "diffusion_pytorch_model")
    return vae


def build_text_encoder(config: dict[str, Any], tokenizer, where: str = "recipe: text_encoder"):
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
    return CLIPTextEncoder(CLIPTextSettings.from_dict(fields, where), fields).init_weights()


@dataclasses.dataclass
class Plan:
    """A checked recipe with everything but the slow parts (tokenizer, random weights) worked out."""

    recipe: dict[str, Any]
    where: str  # names the recipe in messages
    out: Path
    vae: Any  # the trained VAE, or None: built from vae_config under the recipe's seed
    vae_config: Any
    unet_config: Any
    scheduler_config: Any


def prepare(recipe: dict[str, Any], vae_folder: str | Path | None, out: str | Path, where: str = "recipe") -> Plan:
    """Every check init_model_folder makes, in moments: the recipe (named `where`), the VAE, the out folder."""
    from latentdiff.schedules import ScheduleConfig
    from latentdiff.unet import UNET_TOLERATED, UNetConfig
    from latentdiff.vae import VAE_TOLERATED, VAEConfig

    check_recipe(recipe, where)
    out = check_out(out)
    try:
        scheduler_config = ScheduleConfig.from_dict(recipe["scheduler"], where=f"{where}: scheduler")
    except ValueError as e:
        raise _located(e, f"{where}: scheduler") from None
    if vae_folder is not None:
        vae = load_vae(vae_folder)
        vae_config = vae.config
    elif "vae" in recipe:
        vae = None  # built later, under the seed
        try:
            vae_config = from_config_dict(VAEConfig, recipe["vae"], f"{where}: vae", tolerated=VAE_TOLERATED)
        except ValueError as e:
            raise _located(e, f"{where}: vae") from None
    else:
        raise RecipeError(f"no trained VAE given (--vae) and {where} has no 'vae' config to build one")

    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    resolution = recipe["resolution"]
    if resolution % factor:
        low = resolution - resolution % factor
        raise RecipeError(
            f"{where}: resolution = {resolution} is not a multiple of {factor}, the VAE's downsampling factor; "
            f"use e.g. {low or factor} or {low + factor}"
        )
    unet_where = f"{where}: unet"
    unet = dict(recipe["unet"])
    unet.setdefault("cross_attention_dim", recipe["text_encoder"]["hidden_size"])
    unet.setdefault("sample_size", resolution // factor)
    unet.setdefault("in_channels", vae_config.latent_channels)
    unet.setdefault("out_channels", vae_config.latent_channels)
    try:
        unet_config = from_config_dict(UNetConfig, unet, unet_where, tolerated=UNET_TOLERATED)
    except ValueError as e:
        raise _located(e, unet_where) from None
    latent = resolution // factor
    if unet_config.sample_size not in (latent, (latent, latent)):
        raise RecipeError(
            f"{unet_where}: sample_size = {unet['sample_size']!r} does not match resolution {resolution} / "
            f"{factor} (the VAE's downsampling factor) = {latent}; leave sample_size out or make them agree"
        )
    for key in ("in_channels", "out_channels"):
        if getattr(unet_config, key) != vae_config.latent_channels:
            raise RecipeError(
                f"{unet_where}: {key} ({getattr(unet_config, key)}) must equal the VAE's "
                f"latent_channels ({vae_config.latent_channels})"
            )
    return Plan(recipe, where, out, vae, vae_config, unet_config, scheduler_config)


def build(plan: Plan, captions: Iterable[str], dtype: torch.dtype | None = None) -> Path:
    """The slow part of init_model_folder, on a prepared plan: train the tokenizer, initialise, save."""
    from latentdiff.pipeline import LatentDiffusionPipeline
    from latentdiff.training.tokenizer import train_clip_tokenizer
    from latentdiff.unet import UNet
    from latentdiff.vae import VAE

    recipe = plan.recipe
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
        text_encoder = build_text_encoder(recipe["text_encoder"], tokenizer, f"{plan.where}: text_encoder")
        vae = plan.vae if plan.vae is not None else VAE(plan.vae_config)
        unet = UNet(plan.unet_config)

    pipe = LatentDiffusionPipeline(
        unet,
        vae,
        text_encoder,
        tokenizer,
        plan.scheduler_config,
        defaults=dict(recipe["defaults"]),
        name=recipe["name"],
    )
    return pipe.save_pretrained(plan.out, dtype=dtype)


def init_model_folder(
    recipe: dict[str, Any],
    captions: Iterable[str],
    vae_folder: str | Path | None,
    out: str | Path,
    dtype: torch.dtype | None = None,
    where: str = "recipe",
) -> Path:
    """Tokenizer trained on `captions`, random text encoder and U-Net, the trained VAE; written to `out`.

    With `vae_folder` None a random VAE is built from recipe["vae"] (for tests; a real recipe trains it
    first, see latentdiff.training.vae_train). Initialisation is seeded by recipe["seed"] and leaves the
    global RNG as it was. Everything is checked (see prepare) before the tokenizer is trained; `where`
    names the recipe in the messages.
    """
    return build(prepare(recipe, vae_folder, out, where), captions, dtype)


def positive_int(text: str) -> int:
    """argparse type: a count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer; leave it out for the recipe's count")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m latentdiff.training.scratch",
        description="Write a randomly initialised model folder (tokenizer trained on the captions, "
        "text encoder, U-Net, the trained VAE) for training from scratch with training/train.py.",
    )
    p.add_argument("--recipe", required=True, help="recipe JSON (training/recipes/default/recipe.json)")
    p.add_argument("--vae", default=None, help="trained VAE: a vae/ folder or a folder holding one")
    p.add_argument("--out", required=True, help="model folder to write (new, empty, or an earlier one to replace)")
    p.add_argument(
        "--data",
        default="shapes",
        help="where the tokenizer's captions come from: 'shapes' / 'shapes:SEED' or an image-caption folder",
    )
    p.add_argument("--num-captions", type=positive_int, default=None, help="Shapes scenes to caption (default: recipe)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from latentdiff.training.data import parse_shapes_spec
    from latentdiff.training.errors import TrainingError

    try:
        recipe = read_json(args.recipe)
        shapes_seed = parse_shapes_spec(args.data)
        plan = prepare(recipe, args.vae, args.out, where=args.recipe)  # before any slow work
        if shapes_seed is not None:
            count = args.num_captions or recipe["tokenizer"].get("num_captions", 20_000)
            captions = shapes_captions(count, shapes_seed, recipe["resolution"])
        else:
            captions = folder_captions(args.data)
            if not captions:
                raise TrainingError(f"--data {args.data}: no captions found to train the tokenizer on")
        if args.vae is None:
            print("note: no --vae given; the model gets an untrained VAE from the recipe", file=sys.stderr)
        out = build(plan, captions)
    except (RecipeError, TrainingError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
