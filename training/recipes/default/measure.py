"""Measure the default recipe's speeds on this machine: VAE training, U-Net training, sampling.

Random weights (speed does not depend on them), latentdiff's own modules (or diffusers' with --impl
diffusers, the same math). The machine is shared, so each figure is the median of --repeats timed runs,
with the fastest run too (the least disturbed one).

    python training/recipes/default/measure.py                      # all three, the recipe's sizes
    python training/recipes/default/measure.py --only sample --set unet.block_out_channels=[48,96,192]
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


def _timed(fn, repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times)}


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


def measure_vae_training(recipe: dict, impl: str, repeats: int) -> dict:
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

    t = _timed(step, repeats)
    return {"params": _params(vae), "batch": batch, **t, "images_per_s": batch / t["median_s"]}


def measure_unet_training(recipe: dict, impl: str, repeats: int) -> dict:
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

    r = _timed(step, repeats)
    return {
        "unet_params": _params(unet),
        "text_params": _params(text),
        "batch": batch,
        **r,
        "images_per_s": batch / r["median_s"],
    }


def measure_sampling(recipe: dict, repeats: int, batch: int = 8) -> dict:
    """The real pipeline call with the stored defaults (sampler, steps, guidance) on `batch` prompts."""
    from latentdiff.pipeline import LatentDiffusionPipeline
    from latentdiff.training.scratch import init_model_folder, shapes_captions

    with tempfile.TemporaryDirectory() as tmp:
        folder = init_model_folder(recipe, shapes_captions(500), None, Path(tmp) / "m", dtype=torch.float16)
        size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        pipe = LatentDiffusionPipeline.from_pretrained(folder)
    prompts = ["a red circle to the left of a blue square on a black background"] * batch
    r = _timed(lambda: pipe(prompts, seed=0, progress=False), repeats)
    d = recipe["defaults"]
    return {
        "fp16_folder_MB": size / 1e6,
        "batch": batch,
        "sampler": d["sampler"],
        "steps": d["steps"],
        "guidance_scale": d["guidance_scale"],
        **r,
        "s_per_image": r["median_s"] / batch,
        "s_per_image_best": r["min_s"] / batch,
    }


def _apply(recipe: dict, assignments: list[str]) -> None:
    """--set section.key=JSON overrides, e.g. unet.block_out_channels=[32,64,128]."""
    for item in assignments:
        path, value = item.split("=", 1)
        section, key = path.split(".", 1)
        recipe[section][key] = json.loads(value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(HERE / "recipe.json"))
    p.add_argument("--only", choices=["vae", "unet", "sample"], action="append")
    p.add_argument("--impl", choices=["ours", "diffusers"], default="ours")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    recipe = json.loads(Path(a.recipe).read_text())
    _apply(recipe, a.set)
    out = {"impl": a.impl, "threads": a.threads, "overrides": a.set}
    only = a.only or ["vae", "unet", "sample"]
    if "vae" in only:
        out["vae_training"] = measure_vae_training(recipe, a.impl, a.repeats)
    if "unet" in only:
        out["unet_training"] = measure_unet_training(recipe, a.impl, a.repeats)
    if "sample" in only:
        out["sampling"] = measure_sampling(recipe, a.repeats)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
