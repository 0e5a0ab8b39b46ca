"""Measure the default recipe's speeds on this machine: VAE training, U-Net training, sampling.

Random weights (speed does not depend on them), latentdiff's own modules (or diffusers' with --impl
diffusers, the same math). The machine is shared, so units are timed in interleaved rounds; the fastest run of
each (the least disturbed) estimates the quiet machine, the median what a busy one gives.

    python training/recipes/default/measure.py                      # all three, the recipe's sizes
    python training/recipes/default/measure.py --only sample --variant 'big:unet.block_out_channels=[48,96,192]'
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _clean(cfg: dict) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if not k.startswith("_")}


def build_models(recipe: dict, impl: str, vocab_size: int = 700):
    """(unet, vae, text_encoder) with the recipe's configs, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **recipe["text_encoder"]))
    unet_cfg = dict(recipe["unet"], cross_attention_dim=recipe["text_encoder"]["hidden_size"])
    if impl == "diffusers":
        from diffusers import AutoencoderKL, UNet2DConditionModel

        return UNet2DConditionModel(**_clean(unet_cfg)), AutoencoderKL(**_clean(recipe["vae"])), text
    from latentdiff.unet import UNet, UNetConfig
    from latentdiff.vae import VAE, VAEConfig

    return UNet(UNetConfig.from_dict(unet_cfg)), VAE(VAEConfig.from_dict(recipe["vae"])), text


def _out(x):
    return x.sample if hasattr(x, "sample") else x


def vae_training_unit(recipe: dict, impl: str):
    """One AdamW step of the autoencoder (L1 + edge + KL) on a batch of images."""
    from latentdiff.training.vae_train import vae_loss

    _, vae, _ = build_models(recipe, impl)
    vae.train()
    batch, res = recipe["vae_training"]["batch_size"], recipe["resolution"]
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, res, res) * 2 - 1

    def step():
        if impl == "diffusers":
            post = vae.encode(x).latent_dist
            recon = vae.decode(post.sample()).sample
        else:
            recon, post = vae(x, sample_posterior=True)
        loss, _ = vae_loss(recon, x, post, 1e-6, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, {"params": _params(vae), "images": batch}


def unet_training_unit(recipe: dict, impl: str):
    """One AdamW step of U-Net + text encoder (trained together from scratch) on a batch of latents."""
    unet, _, text = build_models(recipe, impl)
    unet.train()
    text.train()
    batch = recipe["unet_training"]["batch_size"]
    factor = 2 ** (len(recipe["vae"]["block_out_channels"]) - 1)
    h = recipe["resolution"] // factor
    opt = torch.optim.AdamW([*unet.parameters(), *text.parameters()], lr=1e-4)
    ids = torch.randint(0, 700, (batch, recipe["text_encoder"]["max_position_embeddings"]))
    x = torch.randn(batch, recipe["vae"]["latent_channels"], h, h)
    t = torch.randint(0, 1000, (batch,))

    def step():
        ctx = text(ids)[0]
        loss = (_out(unet(x, t, ctx)) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, {"unet_params": _params(unet), "text_params": _params(text), "images": batch}


def sampling_unit(recipe: dict, impl: str, batch: int = 8):
    """The real pipeline call with the stored defaults (sampler, steps, guidance) on `batch` prompts."""
    from latentdiff.pipeline import LatentDiffusionPipeline
    from latentdiff.training.scratch import init_model_folder, shapes_captions

    with tempfile.TemporaryDirectory() as tmp:
        folder = init_model_folder(recipe, shapes_captions(500), None, Path(tmp) / "m", dtype=torch.float16)
        size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        pipe = LatentDiffusionPipeline.from_pretrained(folder)
    prompts = ["a red circle to the left of a blue square on a black background"] * batch
    d = recipe["defaults"]
    meta = {"fp16_MB": round(size / 1e6, 2), "images": batch, "sampler": d["sampler"], "steps": d["steps"]}
    return (lambda: pipe(prompts, seed=0, progress=False)), meta


UNITS = {"vae": vae_training_unit, "unet": unet_training_unit, "sample": sampling_unit}


def _apply(recipe: dict, assignments: list[str]) -> None:
    """--set section.key=JSON overrides, e.g. unet.block_out_channels=[32,64,128]; ValueError naming a bad one."""
    for item in assignments:
        path, eq, value = item.partition("=")
        section, dot, key = path.partition(".")
        if not (eq and dot and section and key):
            raise ValueError(f"{item!r} is not SECTION.KEY=JSON (e.g. unet.layers_per_block=2)")
        if not isinstance(recipe.get(section), dict):
            sections = ", ".join(k for k, v in recipe.items() if isinstance(v, dict))
            raise ValueError(f"{item!r}: the recipe has no section {section!r}; it has {sections}")
        try:
            recipe[section][key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{item!r}: {value!r} is not JSON (a string needs quotes: '\"text\"')") from None


def read_recipe(parser, path: str, sets: list[str], variants: list[str]) -> tuple[dict, dict[str, list[str]]]:
    """(the recipe with --set applied, {variant: its assignments}): every option checked before any timing."""
    try:
        base = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        parser.error(f"cannot read --recipe {path}: {getattr(e, 'strerror', None) or e}")
    if not isinstance(base, dict):
        parser.error(f"--recipe {path} is not a recipe: expected a JSON object like {HERE / 'recipe.json'}")
    found = {"recipe": []}
    try:
        _apply(base, sets)
        for v in variants:
            name, _, assignments = v.partition(":")
            if not name or name in found:
                raise ValueError(f"--variant {v!r}: give each variant a new name before the ':'")
            found[name] = [x for x in assignments.split(";") if x]
            _apply(json.loads(json.dumps(base)), found[name])
    except ValueError as e:
        parser.error(f"--set/--variant: {e}")
    return base, found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(HERE / "recipe.json"))
    p.add_argument("--only", choices=list(UNITS), action="append")
    p.add_argument("--impl", choices=["ours", "diffusers"], default="ours")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:SECTION.KEY=JSON;...",
        help="also time the recipe with these overrides, interleaved with the others",
    )
    p.add_argument("--rounds", type=int, default=5, help="timed runs of each unit, interleaved")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if a.rounds < 1 or a.threads < 1:
        p.error(f"--rounds and --threads must be at least 1, got {a.rounds} and {a.threads}")
    base, variants = read_recipe(p, a.recipe, a.set, a.variant)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    units = {}
    for vname, sets in variants.items():  # every unit is built before the first runs: a bad value fails fast
        recipe = json.loads(json.dumps(base))
        _apply(recipe, sets)
        for kind in a.only or list(UNITS):
            try:
                fn, meta = UNITS[kind](recipe, a.impl)
            except (KeyError, TypeError, ValueError) as e:  # a value of the wrong kind, a section left out
                p.error(f"the {vname!r} recipe cannot build the {kind} unit: {type(e).__name__}: {e}")
            units[(kind, vname)] = (fn, meta, [])
    for fn, _, _ in units.values():
        fn()  # warm-up
    for _ in range(a.rounds):  # interleaved, so a busy spell of the shared machine hits all alike
        for fn, _, times in units.values():
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    out = []
    for (kind, vname), (_, meta, times) in units.items():
        n = meta["images"]
        row = {"unit": kind, "variant": vname, **meta}
        row.update(min_s=round(min(times), 4), median_s=round(statistics.median(times), 4))
        if kind == "sample":
            row.update(
                s_per_image_best=round(min(times) / n, 4), s_per_image_median=round(statistics.median(times) / n, 4)
            )
        else:
            row.update(
                images_per_s_best=round(n / min(times), 1), images_per_s_median=round(n / statistics.median(times), 1)
            )
        out.append(row)
    print(
        json.dumps(
            {
                "impl": a.impl,
                "threads": a.threads,
                "rounds": a.rounds,
                "set": a.set,
                "variants": variants,
                "results": out,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
