"""Make an image again from its PNG metadata and say whether the pixels match (exit 0) or not (exit 1)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from latentdiff.cli import UserError
from latentdiff.cli.generate import DTYPES
from latentdiff.prompts import MAX_BATCH, MAX_SEED, sampler_names

# Fields the call cannot do without; the others have a default when absent or null.
REQUIRED = ("prompt", "height", "width", "steps", "guidance_scale", "sampler", "seed")


def record_checks() -> dict:
    """What each record field that reproduce uses must be, as pipeline.check_defaults has it for stored
    defaults: a record can be edited by hand or written by another tool, and is then a bad input, not a crash.
    """
    samplers, dtypes = sampler_names(), sorted(set(DTYPES.values()))
    return {
        "prompt": (_text, "text"),
        "negative_prompt": (_text, "text"),
        "height": (_whole(1), "a whole number of pixels >= 1"),
        "width": (_whole(1), "a whole number of pixels >= 1"),
        "steps": (_whole(1), "a whole number >= 1"),
        "guidance_scale": (_finite(-math.inf), "a finite number"),
        "sampler": (lambda v: _text(v) and v in samplers, f"one of {', '.join(samplers)}"),
        "karras": (lambda v: isinstance(v, bool), "true or false"),
        "seed": (_whole(0, MAX_SEED), f"a whole number from 0 to {MAX_SEED}"),
        "eta": (_finite(0.0), "a finite number >= 0"),
        "clip_skip": (_whole(0), "a whole number >= 0"),
        "dtype": (lambda v: _text(v) and v in dtypes, f"one of {', '.join(dtypes)}"),
        "model_path": (_text, "a folder path"),
        "model_hash": (_text, "text"),
        "batch_size": (_whole(1, MAX_BATCH), f"a whole number from 1 to {MAX_BATCH}"),
        "batch_index": (_whole(0), "a whole number >= 0"),
        "workers": (_whole(1), "a whole number >= 1"),
        "threads": (_whole(1), "a whole number >= 1"),
    }


def _whole(low: int, high: float = math.inf):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _finite(low: float):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v


def _text(v) -> bool:
    return isinstance(v, str)


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
    except json.JSONDecodeError as e:  # before OSError's kin: the chunk was read, its text is not JSON
        raise UserError(f"{path}: its latentdiff metadata is not valid JSON ({e}); cannot reproduce") from None
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    if not record:
        raise UserError(f"{path} has no latentdiff metadata chunk; only images latentdiff wrote can be reproduced")
    if isinstance(record, dict) and isinstance(record.get("grid_of"), list):  # written by `generate --grid`
        files = [str(f) for f in record["grid_of"]]
        shown = ", ".join(files[:2]) + (f" and {len(files) - 2} more" if len(files) > 2 else "")
        raise UserError(f"{path} is a --grid picture of {len(files)} image(s) ({shown}); reproduce those one by one")
    check_record(record, path)
    save = Path(args.save) if args.save else None
    if save:
        check_save(save, path)

    model = args.model or record.get("model_path")
    if model and not Path(model).is_dir() and not args.model:
        print(f"note: recorded model folder {model} is gone; using the bundled model", file=sys.stderr)
        model = None
    try:
        pipe = LatentDiffusionPipeline.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model: {e}") from None
    import torch

    check_record_fits(record, pipe, path)
    try:
        pipe.to(device=args.device or "cpu", dtype=getattr(torch, record.get("dtype") or "float32"))
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
    # Not wrapped in `except ValueError`: every value the call checks was checked above, so an error
    # from here on is a bug to see whole, not a bad record.
    negative = record.get("negative_prompt")
    with shape.threads_set():
        image = pipe(
            [record["prompt"]] * shape.size,
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
    if save:
        check_save(save, path)  # again: a file may have appeared there while the image was made
        save_png(image, save)
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


def check_record(record, path: Path) -> None:
    """Every field the call uses, checked before a model is loaded (see record_checks)."""
    if not isinstance(record, dict):
        raise UserError(
            f"{path}: its latentdiff metadata is a JSON {type(record).__name__}, not an object; "
            "only images latentdiff wrote can be reproduced"
        )
    missing = next((key for key in REQUIRED if record.get(key) is None), None)
    if missing:
        raise UserError(f"{path}: metadata lacks {missing!r}; cannot reproduce")
    for key, (ok, wanted) in record_checks().items():
        if record.get(key) is not None and not ok(record[key]):
            raise invalid_field(path, key, record[key], wanted)


def check_record_fits(record: dict, pipe, path: Path) -> None:
    """The checks that need the model: the sizes it can make, the text encoder layers clip_skip can skip."""
    multiple, layers = pipe.size_multiple, pipe.text_encoder.config.num_hidden_layers
    hint = "was it made with another model? pass that one with --model"
    for key in ("height", "width"):
        if record[key] % multiple:
            raise invalid_field(path, key, record[key], f"a multiple of {multiple}, as this model needs", hint)
    if (record.get("clip_skip") or 0) >= layers:
        wanted = f"below {layers}, the text encoder's layers"
        raise invalid_field(path, "clip_skip", record["clip_skip"], wanted, hint)
    from latentdiff.samplers import make_sampler

    try:
        schedule = make_sampler(record["sampler"], pipe.scheduler_config, karras=bool(record.get("karras")))
    except ValueError as e:  # Karras sigmas with a sampler that has none
        raise invalid_field(path, "karras", record.get("karras"), f"possible with {record['sampler']} ({e})") from None
    try:
        schedule.set_timesteps(record["steps"])
    except ValueError as e:  # more steps than this schedule can take
        raise invalid_field(
            path, "steps", record["steps"], f"a count this model's schedule takes ({e})", hint
        ) from None


def invalid_field(path: Path, key: str, value, wanted: str, hint: str = "") -> UserError:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."  # a tampered value may be megabytes long
    hint = hint or "the record was edited, or written by another tool"
    return UserError(f"{path}: metadata field {key!r} is invalid ({shown} is not {wanted}); {hint}; cannot reproduce")


def check_save(save: Path, image: Path) -> None:
    """--save writes a new file only: it never replaces one (the image being checked least of all)."""
    if save.is_dir():
        raise UserError(f"--save {save} is a folder; give a file path in it, e.g. {save / 'again.png'}")
    if save.exists() or save.is_symlink():
        same = os.path.realpath(save) == os.path.realpath(image)  # realpath: a symlink loop does not raise
        what = "is the image being checked" if same else "already exists"
        raise UserError(f"--save {save} {what}; choose another path (--save does not overwrite files)")
    if not save.parent.is_dir():
        why = "is not a folder" if save.parent.exists() else "does not exist"
        raise UserError(f"--save {save}: folder {save.parent} {why}; create it or choose another path")
    if not os.access(save.parent, os.W_OK | os.X_OK):  # found now, not after the image is made
        raise UserError(f"--save {save}: folder {save.parent} is not writable for you; choose another path")


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
