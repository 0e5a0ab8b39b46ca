"""Measure training and sampling speed of candidate default-model sizes on this machine.

Uses diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel with the recipe's
configs (the same math as latentdiff's own modules), so it runs before or without them.

    python training/recipes/default/measure.py [--recipe training/recipes/default/recipe.json] [--only unet]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _clean(cfg: dict) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if not k.startswith("_")}


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure_vae(vae_cfg: dict, batch: int, res: int, repeats: int) -> dict:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**_clean(vae_cfg))
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, res, res) * 2 - 1

    def step():
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (rec - x).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = statistics.median(_timed(step, repeats))
    return {"vae_params": params(vae), "vae_train_images_per_s": batch / t, "vae_step_s": t, "batch": batch}


def measure_unet(unet_cfg: dict, text_cfg: dict, batch: int, latent: int, repeats: int, train_text: bool) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**_clean(unet_cfg))
    text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    trainable = list(unet.parameters()) + (list(text.parameters()) if train_text else [])
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    T = text_cfg["max_position_embeddings"]
    ids = torch.randint(0, text_cfg["vocab_size"], (batch, T))
    x = torch.randn(batch, unet_cfg["in_channels"], latent, latent)
    t = torch.randint(0, 1000, (batch,))

    def step():
        ctx = text(ids).last_hidden_state
        loss = (unet(x, t, ctx).sample - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    s = statistics.median(_timed(step, repeats))
    return {
        "unet_params": params(unet),
        "text_params": params(text),
        "unet_train_images_per_s": batch / s,
        "unet_step_s": s,
        "batch": batch,
    }


@torch.no_grad()
def measure_sampling(unet_cfg, text_cfg, vae_cfg, batch: int, latent: int, steps: int, repeats: int) -> dict:
    """Seconds per image: text encode (cond + uncond), `steps` U-Net calls on 2*batch (CFG), VAE decode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**_clean(unet_cfg)).eval()
    text = CLIPTextModel(CLIPTextConfig(**text_cfg)).eval()
    vae = AutoencoderKL(**_clean(vae_cfg)).eval()
    T = text_cfg["max_position_embeddings"]
    ids = torch.randint(0, text_cfg["vocab_size"], (2 * batch, T))

    def sample():
        ctx = text(ids).last_hidden_state
        x = torch.randn(batch, unet_cfg["in_channels"], latent, latent)
        for i in range(steps):
            eps = unet(torch.cat([x, x]), torch.full((2 * batch,), 999 - 40 * i), ctx).sample
            eu, ec = eps.chunk(2)
            x = x - 0.01 * (eu + 7.5 * (ec - eu))
        vae.decode(x).sample

    s = statistics.median(_timed(sample, repeats))
    return {"sample_s_per_image": s / batch, "sample_batch_s": s, "batch": batch, "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(HERE / "recipe.json"))
    p.add_argument("--unet", help="JSON file with a U-Net config to use instead of the recipe's")
    p.add_argument("--only", choices=["vae", "unet", "sample"], action="append")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-text-encoder", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    recipe = json.loads(Path(a.recipe).read_text())
    unet_cfg = json.loads(Path(a.unet).read_text()) if a.unet else recipe["unet"]
    text_cfg = dict(recipe["text_encoder"])
    text_cfg.setdefault("vocab_size", recipe["tokenizer"]["vocab_size"])
    vae_cfg = recipe["vae"]
    res = recipe["resolution"]
    latent = res // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    only = a.only or ["vae", "unet", "sample"]
    out = {}
    if "vae" in only:
        out["vae"] = measure_vae(vae_cfg, recipe["vae_training"]["batch_size"], res, a.repeats)
    if "unet" in only:
        out["unet"] = measure_unet(
            unet_cfg, text_cfg, recipe["unet_training"]["batch_size"], latent, a.repeats, a.train_text_encoder
        )
    if "sample" in only:
        d = recipe["defaults"]
        out["sample"] = measure_sampling(unet_cfg, text_cfg, vae_cfg, 8, latent, d["num_inference_steps"], a.repeats)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
