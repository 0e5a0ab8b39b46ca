"""Make an image again from its PNG metadata and say whether the pixels match (exit 0) or not (exit 1)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from latentdiff.cli import UserError


def add_arguments(parser) -> None:
    add = parser.add_argument
    add("image", metavar="IMAGE.png", help="a PNG written by latentdiff")
    add("--model", metavar="DIR", help="model folder (default: the one recorded in the image, else bundled)")
    add("--device", default=None, help="torch device (default: cpu)")
    add("--save", metavar="PATH", help="also write the regenerated image here")
    add(
        "--alone",
        action="store_true",
        help="make just this image, not the batch it was made in (faster; rounding may move a value by 1)",
    )


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
    try:
        pipe.to(device=args.device or "cpu", dtype=dtype if isinstance(dtype, torch.dtype) else None)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"cannot use --device {args.device}: {e}") from None
    if record.get("model_hash") and pipe.model_hash != record["model_hash"]:
        print(
            f"warning: model hash {str(pipe.model_hash)[:10]} differs from the recorded "
            f"{record['model_hash'][:10]}; the pixels are not expected to match",
            file=sys.stderr,
        )
    optional = {k: record[k] for k in ("clip_skip", "eta") if record.get(k) is not None}
    shape = BatchShape.of(record, alone=args.alone)
    if shape.size > 1:
        print(
            f"note: image {shape.index + 1} of a batch of {shape.size}: making the batch again from copies of "
            "it, so that its arithmetic is the same (--alone: this image only)",
            file=sys.stderr,
        )
    try:
        copies = [record["prompt"]] * shape.size
        negative = record.get("negative_prompt")
        with shape.threads_set():
            image = pipe(
                copies,
                negative_prompt=[negative] * shape.size if negative else None,
                height=record["height"],
                width=record["width"],
                steps=record["steps"],
                guidance_scale=record["guidance_scale"],
                sampler=record["sampler"],
                karras=bool(record.get("karras")),
                seed=[record["seed"]] * shape.size,
                progress=False,
                workers=shape.workers_for(pipe.device),
                **optional,
            )[shape.index]
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
        if largest <= 2 and args.alone and shape.recorded > 1:
            print(f"  (made in a batch of {shape.recorded}, made again alone: rounding can move a value by 1 or 2)")
        elif largest <= 2:
            print("  (another machine, thread count or library version can move a value by 1 or 2 through rounding)")
    return 1


@dataclass
class BatchShape:
    """The shape of the call an image came from: batch size, its place in it, processes and threads.

    An image's pixels depend on that shape (the CPU kernels pick their algorithm by batch size and
    thread count) but not on the other images in the batch, so a batch of copies of the image, cut
    across the same processes, gives the same pixels at its place.
    """

    size: int = 1
    index: int = 0
    workers: int | None = None  # None: the pipeline's default
    threads: int | None = None  # None: leave torch's setting
    recorded: int = 1  # the batch size in the record, even when --alone ignores it

    @classmethod
    def of(cls, record: dict, alone: bool) -> BatchShape:
        size, index = _count(record.get("batch_size"), 1), _count(record.get("batch_index"), 0, low=0)
        if index >= size:  # a record edited by hand: the place cannot be trusted, make the image alone
            size, index = 1, 0
        threads = _count(record.get("threads"), None)
        if threads is not None and threads > (os.cpu_count() or 1):
            threads = None  # another machine: more threads than cores only slows the call down
        workers = _count(record.get("workers"), None)
        if alone and size > 1:
            return cls(threads=threads, recorded=size)
        return cls(size, index, workers, threads, recorded=size)

    def workers_for(self, device) -> int | None:
        """The recorded processes where this machine can use them, else the pipeline's default."""
        from latentdiff.workers import check_workers

        if self.workers is None:
            return None
        try:
            check_workers(self.workers, device, callback=None)
        except ValueError:
            print(f"note: made by {self.workers} processes, which this machine cannot use", file=sys.stderr)
            return None
        return self.workers

    def threads_set(self):
        """Torch's threads set to the recorded count for the call (left as they are without one)."""
        import torch

        from latentdiff.workers import num_threads

        return num_threads(self.threads or torch.get_num_threads())


def _count(value, default, low: int = 1):
    """A whole number >= low from the record, else `default` (absent, or not a usable number)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        return default
    return value
