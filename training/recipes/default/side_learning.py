"""How fast can a U-Net learn to draw an object on the side its prompt names? A short loop beside train.py,
text encoder frozen, that prints `relation_probe.layout_asymmetry` ("side": red circle, green star, pink
square) every 100 steps.

    python training/recipes/default/side_learning.py --model DIR --data runs/side --kinds 8 --steps 1200
    python training/recipes/default/side_learning.py --model DIR --target halves --steps 400

--target images (default): the model's own denoising loss (eps / v / x0, unweighted; --v-space: weighed as
a v-prediction loss) at t in [700, 1000), on side_data.py images of the first --kinds objects of OBJECTS,
left and right only, captioned "a <object> on the left|right". At the end: the asymmetry of every trained
object and of UNSEEN ones (never trained here: does "left" carry over?). The same pictures' own asymmetry
is ~0.4.
--target halves: a capacity check without data. From pure noise at t=999 the U-Net must output +1 on the
half the prompt names and -1 on the other ("a red circle on the left|right"); prints the error (1.0 = it
cannot tell the halves apart, 0 = learnt).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

OBJECTS = ("red circle", "blue square", "green star", "yellow triangle", "pink square", "cyan circle")
OBJECTS += ("orange star", "purple triangle")
UNSEEN = ("green circle", "red square", "blue star", "yellow square")
SIDES = ("on the left", "on the right")


@functools.cache
def relation_probe():
    """The script beside this one (the recipe folder is no package), loaded once."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("relation_probe", Path(__file__).with_name("relation_probe.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layout_asymmetry(pipe, **kwargs) -> dict[str, float]:
    return relation_probe().layout_asymmetry(pipe, **kwargs)


def side_latents(pipe, folder: Path, objects, per_caption: int) -> tuple[list[str], list[torch.Tensor]]:
    """Captions "a <object> <side>" and the VAE latents (posterior means) of their images in `folder`."""
    from PIL import Image

    if not (folder / "metadata.jsonl").is_file():
        raise SystemExit(f"side_learning: {folder} has no metadata.jsonl; write the folder with side_data.py")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    captions, latents = [], []
    for obj in objects:
        for side in SIDES:
            # side_data captions: "<article> <colour> <shape> <side>[ <background phrase>]"
            names = [r["file_name"] for r in rows if r["text"].split(" ", 1)[1].startswith(f"{obj} {side}")]
            if not names:
                raise SystemExit(f"side_learning: no image of '{obj} {side}' in {folder}; make more with side_data.py")
            pixels = relation_probe().stack_pixels(Image.open(folder / n).convert("RGB") for n in names[:per_caption])
            latents.append(relation_probe().encode_latents(pipe, pixels))
            captions.append(f"a {obj} {side}")
    return captions, latents


def train(
    pipe, target, steps, lr, batch, data: Path | None, kinds: int, v_space: bool = False, seed: int = 0,
    examples: tuple[torch.Tensor, list[torch.Tensor]] | None = None, probe=None,
):  # fmt: skip
    """Train pipe.unet in place; yield (step, number) every 100 steps: the asymmetry, or the halves error.

    `examples` = (contexts (N, T, D), latents: N stacks of pictures) replaces the side pictures and their
    encoded captions (binding_probe.py brings its own); `probe()` then gives the number to print.
    """
    from latentdiff.schedules import add_noise, alphas_cumprod
    from latentdiff.training.losses import target_for, v_space_weights

    ac = alphas_cumprod(pipe.scheduler_config)
    if examples is not None:
        contexts, latents = examples
    else:
        if target == "halves":
            captions, latents = [f"a red circle {side}" for side in SIDES], None
        else:
            captions, latents = side_latents(pipe, data, OBJECTS[:kinds], per_caption=60)
        with torch.no_grad():
            contexts = pipe.encode(captions).float()
    probe = probe or (lambda: layout_asymmetry(pipe, kinds=("side",))["side"])
    size = pipe.unet.config.sample_size
    halves = torch.ones(2, pipe.unet.config.in_channels, size, size)
    halves[0, ..., size // 2 :] = -1  # "on the left": +1 on the left half
    halves[1, ..., : size // 2] = -1
    unet, g = pipe.unet.train(), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    for step in range(steps + 1):
        k = torch.randint(0, len(contexts), (batch,), generator=g)
        if target == "halves":
            x, t = torch.randn(batch, *halves.shape[1:], generator=g), torch.full((batch,), len(ac) - 1)
            error = ((unet(x, t, contexts[k]) - halves[k]) ** 2).mean()
        else:
            x0 = torch.stack([latents[i][torch.randint(0, len(latents[i]), (1,), generator=g).item()] for i in k])
            t, noise = (
                torch.randint(len(ac) * 7 // 10, len(ac), (batch,), generator=g),
                torch.randn(x0.shape, generator=g),
            )
            kind = pipe.scheduler_config.prediction_type
            goal = target_for(kind, x0, noise, t, ac)
            per_sample = ((unet(add_noise(x0, noise, t, ac), t, contexts[k]) - goal) ** 2).mean(dim=(1, 2, 3))
            error = (per_sample * (v_space_weights(t, ac, kind) if v_space else 1.0)).mean()
        if step % 100 == 0:
            unet.eval()
            number = error.item() if target == "halves" else probe()
            unet.train()
            yield step, number
        if step < steps:
            opt.zero_grad()
            error.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
    unet.eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="weights/shapes-tiny")
    p.add_argument("--target", choices=["images", "halves"], default="images")
    p.add_argument("--data", type=Path, help="side_data.py's folder (--target images)")
    p.add_argument("--kinds", type=int, default=8, help=f"objects to train on, 1..{len(OBJECTS)}")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--v-space", action="store_true", help="weigh the loss as v-prediction would (train.py's --v-space-loss)"
    )
    p.add_argument("--fresh", action="store_true", help="a freshly initialised U-Net of the model's config")
    args = p.parse_args(argv)
    if args.target == "images" and args.data is None:
        p.error("--target images needs --data (a folder written by side_data.py)")
    if not 1 <= args.kinds <= len(OBJECTS):
        p.error(f"--kinds must be 1..{len(OBJECTS)}")
    pipe = relation_probe().load_pipeline(p, args.model, dtype=torch.float32)  # a bad --model: one line
    if args.fresh:
        from latentdiff.unet import UNet

        torch.manual_seed(0)
        pipe.unet = UNet(pipe.unet.config)
    name = "halves error" if args.target == "halves" else "side asymmetry"
    for step, number in train(
        pipe, args.target, args.steps, args.lr, args.batch_size, args.data, args.kinds, args.v_space
    ):
        print(f"step {step:5d}  {name} {number:.4f}", flush=True)
    if args.target == "images":
        for label, objects in (("trained", OBJECTS[: args.kinds]), ("unseen", UNSEEN)):
            values = [layout_asymmetry(pipe, objects=[(o, o)], kinds=("side",))["side"] for o in objects]
            print(f"{label}: " + ", ".join(f"{o} {v:.3f}" for o, v in zip(objects, values)))


if __name__ == "__main__":
    main()
