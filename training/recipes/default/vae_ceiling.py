"""The autoencoder's ceiling on the held-out suite: what the evaluator scores on VAE round trips.

    python training/recipes/default/vae_ceiling.py --vae weights/shapes-tiny [--out sheet.png]

For each prompt of the held-out suite one scene is drawn that satisfies it (seed 0), rendered, encoded
(posterior mean) and decoded, and the evaluator scores the decoded image against the prompt. A generated
image can only pass where its decoder can draw the scene, so this roughly bounds the whole model's score (a
generated scene may be an easier one, e.g. larger shapes, so it is a guide, not a proof). The rendered
scenes themselves score 1.0 (checked).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def round_trips(vae, images: list[Image.Image], batch_size: int = 50) -> list[Image.Image]:
    from latentdiff.viz import to_image, to_tensor

    x = torch.cat([to_tensor(im) for im in images])
    out = [vae.decode(vae.encode(x[i : i + batch_size]).mode()) for i in range(0, len(x), batch_size)]
    return [to_image(t) for t in torch.cat(out)]


def check_sheet_path(parser, out: Path) -> None:
    """--out, checked before the run: a .png file path in an existing folder (a file there is replaced)."""
    if out.suffix.lower() != ".png" or out.is_dir():
        parser.error(f"--out {out}: give a file path ending in .png for the contact sheet")
    if not out.parent.is_dir():
        parser.error(f"--out {out}: folder {out.parent} does not exist; create it or choose another path")


def main(argv: list[str] | None = None) -> int:
    from latentdiff.data.shapes import render, scene_for_prompt
    from latentdiff.eval.captions import heldout_prompts, parse_caption
    from latentdiff.eval.score import contact_sheet, score_image, summarize
    from latentdiff.training.scratch import load_vae

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="a model folder or its vae/")
    p.add_argument("--out", type=Path, default=None, help="contact sheet of the round trips (failures framed), .png")
    args = p.parse_args(argv)
    if args.out is not None:
        check_sheet_path(p, args.out)
    try:
        vae = load_vae(args.vae).float().eval()
    except (OSError, ValueError) as e:  # a missing folder, another component's config.json, bad weights
        p.error(f"cannot load --vae {args.vae} as an autoencoder: {e}")
    prompts = heldout_prompts()
    rng = np.random.default_rng(0)
    scenes = [render(scene_for_prompt(parse_caption(text), rng)) for text in prompts]
    originals = summarize([score_image(im, text) for im, text in zip(scenes, prompts)])
    if originals["overall"] != 1.0:  # the evaluator must pass its own renders, or the ceiling means nothing
        raise SystemExit(f"error: the rendered scenes themselves score {originals['overall']}")
    decoded = round_trips(vae, scenes)
    results = [score_image(im, text) for im, text in zip(decoded, prompts)]
    report = summarize(results)
    print(json.dumps({"overall": report["overall"], "categories": report["categories"]}))
    if args.out:
        contact_sheet(decoded, [r["pass"] for r in results]).save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
