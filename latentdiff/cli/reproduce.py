"""Make an image again from its PNG metadata and say whether the pixels match (exit 0) or not (exit 1)."""

from __future__ import annotations

import sys
from pathlib import Path

from latentdiff.cli import UserError


def add_arguments(parser) -> None:
    add = parser.add_argument
    add("image", metavar="IMAGE.png", help="a PNG written by latentdiff")
    add("--model", metavar="DIR", help="model folder (default: the one recorded in the image, else bundled)")
    add("--device", default=None, help="torch device (default: cpu)")
    add("--save", metavar="PATH", help="also write the regenerated image here")


def run(args) -> int:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from latentdiff.metadata import read_png_metadata, save_png
    from latentdiff.pipeline import LatentDiffusionPipeline

    path = Path(args.image)
    try:
        _, record = read_png_metadata(path)
        with Image.open(path) as im:
            original = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    if not record:
        raise UserError(f"{path} has no latentdiff metadata chunk; only images latentdiff wrote can be reproduced")

    model = args.model or record.get("model_path")
    if model and not Path(model).is_dir() and not args.model:
        print(f"note: recorded model folder {model} is gone; using the bundled model", file=sys.stderr)
        model = None
    try:
        pipe = LatentDiffusionPipeline.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model: {e}") from None
    import torch

    dtype = getattr(torch, record.get("dtype") or "float32", None)
    pipe.to(device=args.device or "cpu", dtype=dtype if isinstance(dtype, torch.dtype) else None)
    if record.get("model_hash") and pipe.model_hash != record["model_hash"]:
        print(
            f"warning: model hash {str(pipe.model_hash)[:10]} differs from the recorded "
            f"{record['model_hash'][:10]}; the pixels are not expected to match",
            file=sys.stderr,
        )
    optional = {k: record[k] for k in ("clip_skip", "eta") if record.get(k) is not None}
    try:
        image = pipe(
            record["prompt"],
            negative_prompt=record.get("negative_prompt") or None,
            height=record["height"],
            width=record["width"],
            steps=record["steps"],
            guidance_scale=record["guidance_scale"],
            sampler=record["sampler"],
            karras=bool(record.get("karras")),
            seed=record["seed"],
            progress=False,
            **optional,
        )[0]
    except KeyError as e:
        raise UserError(f"{path}: metadata lacks {e}; cannot reproduce") from None
    if args.save:
        save_png(image, args.save)
    again = np.asarray(image.convert("RGB"))
    if again.shape == original.shape and np.array_equal(again, original):
        print(f"match: {path} reproduced pixel for pixel")
        return 0
    if again.shape != original.shape:
        (h0, w0), (h1, w1) = original.shape[:2], again.shape[:2]
        print(f"mismatch: {path} is {w0}x{h0}, regenerated {w1}x{h1}")
    else:
        diff = np.abs(again.astype(int) - original.astype(int))
        changed, largest = int((diff > 0).sum()), int(diff.max())
        print(f"mismatch: {changed} of {diff.size} pixel values differ (largest by {largest})")
        if (record.get("batch_size") or 1) > 1 and largest <= 2:
            batch = record["batch_size"]
            print(f"  (made in a batch of {batch}; batched float math can move a value by 1 or 2)")
    return 1
