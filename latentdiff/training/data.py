"""Training examples: image-caption folders (kohya .txt or metadata.jsonl/.csv) and Shapes scenes drawn on the fly."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from latentdiff.textfiles import NotTextError, read_text
from latentdiff.training.errors import TrainingError
from latentdiff.training.images import (
    DEFAULT_MAX_PIXELS,
    BadImageError,
    open_rgb,
    pixel_limit,
    resize_crop,
    to_tensor,
)

MISSING_CAPTION_POLICIES = ("error", "skip", "empty")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class DataError(TrainingError, ValueError):
    """The data cannot be used as given; the message names the files and the way out."""


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str | None  # None: no caption was found


@dataclass
class Found:
    """What a data folder holds: usable examples, files skipped (path, reason), images without captions."""

    examples: list[Example]
    bad_files: list[tuple[Path, str]]
    uncaptioned: list[Path]


def find_examples(
    folder: str | Path,
    missing_captions: str = "error",
    caption_extension: str = ".txt",
    image_column: str = "file_name",
    caption_column: str | None = "text",  # None: captions are not wanted (the VAE's training)
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 4,
    skip: str | Path | None = None,
) -> Found:
    """Every usable (image, caption) pair in `folder`; bad files are listed, never raised.

    `skip`: a folder inside `folder` not to read (the run's own output folder: its grids are no data).
    """
    if missing_captions not in MISSING_CAPTION_POLICIES:
        raise DataError(
            f"unknown --missing-captions {missing_captions!r}; choose from {list(MISSING_CAPTION_POLICIES)}"
        )
    folder = Path(folder)
    caption_extension = _extension(caption_extension)
    if not folder.exists():
        raise DataError(f"data folder not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"--data must be a folder of images and captions (or 'shapes'), got a file: {folder}")

    present = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if len(present) > 1:
        raise DataError(f"{folder} has both metadata.jsonl and metadata.csv; keep one of them")
    no_column = None
    if present:
        candidates, bad, no_column = _from_metadata(present[0], image_column, caption_column)
    else:
        candidates, bad = _from_caption_files(folder, caption_extension, skip)
    if not candidates and not bad:
        raise DataError(
            f"no images found in {folder}: expected images with same-name {caption_extension} captions, "
            f"or a metadata.jsonl / metadata.csv ({image_column!r} + {caption_column!r} columns)"
        )

    with pixel_limit(max_pixels), ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(pool.map(lambda ex: _check_image(ex.path, max_pixels), candidates))
    good = []
    for example, reason in zip(candidates, reasons):
        if reason is None:
            good.append(example)
        else:
            bad.append((example.path, reason))

    uncaptioned = [ex.path for ex in good if ex.caption is None]
    if uncaptioned and no_column and missing_captions == "error":
        raise DataError(f"{no_column}; or pass --missing-captions empty to train without captions")
    if uncaptioned and no_column:
        warnings.warn(no_column, stacklevel=2)  # most likely a misspelt column: say so even when allowed
    if uncaptioned and missing_captions == "error":
        raise DataError(
            f"{len(uncaptioned)} image(s) in {folder} have no caption: {_names(uncaptioned, folder)}; "
            f"add captions, or pass --missing-captions skip (leave them out) or empty (train them with '')"
        )
    if missing_captions == "skip":
        good = [ex for ex in good if ex.caption is not None]
    else:
        good = [Example(ex.path, ex.caption if ex.caption is not None else "") for ex in good]
    if not good:
        raise DataError(
            bad_files_message(bad + [(p, "no caption") for p in uncaptioned], folder, 10, "no usable images in")
        )
    return Found(good, bad, uncaptioned)


def bad_files_message(
    bad: list[tuple[Path, str]], folder: str | Path, limit: int = 100, head: str = "skipped {n} unusable file(s) in"
) -> str:
    """The one warning for all skipped files: each named with its reason."""
    lines = [f"  {_rel(p, folder)}: {why}" for p, why in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return f"{head.format(n=len(bad))} {folder}:\n" + "\n".join(lines)


def _check_image(path: Path, max_pixels: int) -> str | None:
    try:
        open_rgb(path, max_pixels)
    except BadImageError as e:
        return str(e)
    return None


def _extension(caption_extension: str) -> str:
    """'.txt', 'txt' and '.TXT' all mean the same caption files (suffixes are compared in lower case)."""
    ext = caption_extension.strip().lower()
    if not ext.lstrip("."):
        raise DataError(f"--caption-extension {caption_extension!r} is empty; give one such as .txt")
    return ext if ext.startswith(".") else "." + ext


def _walk(folder: Path, skip: str | Path | None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every file under `folder` (symlinked folders followed, once each), and broken links with the reason."""
    skip_real = os.path.realpath(skip) if skip is not None else None
    files, broken, seen = [], [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen or real == skip_real:  # a link loop, or the run's own output folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(root, name)
            if name.startswith("."):
                continue
            if path.is_file():
                files.append(path)
            elif path.is_symlink():
                broken.append((path, f"broken symbolic link (to {os.readlink(path)})"))
    return sorted(files), broken


def _from_caption_files(
    folder: Path, caption_extension: str, skip: str | Path | None = None
) -> tuple[list[Example], list[tuple[Path, str]]]:
    """kohya style: every non-caption file is a candidate image (Pillow decides); captions share its stem.

    An image whose caption file cannot be read as text is left out with the reason, like a bad image; so is
    a caption with no image beside it (a renamed or deleted image the user may not know is missing).
    """
    files, bad = _walk(folder, skip)
    captions = {p.with_suffix(""): p for p in files if p.suffix.lower() == caption_extension}
    stems = {p.with_suffix("") for p in files if p.suffix.lower() != caption_extension}
    stems |= {p.with_suffix("") for p, _ in bad}  # a broken link's caption: the link is the one to name
    bad += [(p, "caption without an image of the same name") for stem, p in captions.items() if stem not in stems]
    examples = []
    for path in files:
        if path.suffix.lower() == caption_extension:
            continue
        caption_file = captions.get(path.with_suffix(""))
        try:
            caption = read_text(caption_file).strip() if caption_file else None
        except NotTextError as e:
            bad.append((path, f"caption {e}"))
            continue
        except OSError as e:
            bad.append((path, f"cannot read caption {caption_file}: {e.strerror or e}"))
            continue
        examples.append(Example(path, caption))
    return examples, bad


def _from_metadata(
    path: Path, image_column: str, caption_column: str | None
) -> tuple[list[Example], list[tuple[Path, str]], str | None]:
    """Hugging Face imagefolder style: rows of (file_name relative to the folder, text).

    The third value says so when no row has `caption_column` at all (most likely a misspelt column name).
    """
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)
    examples, missing = [], []
    no_column = None
    if rows and caption_column is not None and not any(caption_column in row for _, row in rows):
        columns = sorted({key for _, row in rows for key in row})
        no_column = f"no row of {path} has a {caption_column!r} column (columns: {columns}); set --caption-column"
    for line, row in rows:
        if image_column not in row or not row[image_column]:
            raise DataError(
                f"{path}, row {line}: no {image_column!r} (columns: {sorted(row)}); "
                f"set --image-column if the images are named in another column"
            )
        file = path.parent / str(row[image_column])
        caption = row.get(caption_column)
        if caption is not None and not isinstance(caption, str):  # JSON lists, objects, numbers, booleans
            kind = type(caption).__name__
            missing.append((file, f"{path.name} row {line}: the {caption_column!r} is a {kind}, not a string"))
            continue
        caption = None if caption is None else caption.strip()
        if file.is_file():
            examples.append(Example(file, caption))
        else:
            missing.append((file, "file listed in the metadata does not exist"))
    return examples, missing, no_column


def _metadata_text(path: Path) -> str:
    try:
        return read_text(path)
    except NotTextError as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for i, text in enumerate(_metadata_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {i}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {i}: expected a JSON object, got {type(row).__name__}")
        rows.append((i, row))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    rows = csv.DictReader(io.StringIO(_metadata_text(path), newline=""))
    return [(i, {k: v for k, v in row.items() if k is not None}) for i, row in enumerate(rows, 2)]


def _rel(path: Path, folder: str | Path) -> str:
    try:
        return str(Path(path).relative_to(folder))
    except ValueError:
        return str(path)


def _names(paths: list[Path], folder: str | Path, limit: int = 20) -> str:
    names = ", ".join(_rel(p, folder) for p in paths[:limit])
    return names + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The randomness of one example in one epoch (crop, flip, caption dropout): independent of order and rank."""
    return random.Random(f"{seed}:{epoch}:{index}")


class CaptionedImages(torch.utils.data.Dataset):
    """Items are keyed by (epoch, index): the same key always gives the same crop, flip and dropped caption."""

    def __init__(
        self,
        examples: list[Example],
        resolution: int,
        random_crop: bool = False,
        flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.examples = examples
        self.resolution, self.random_crop, self.flip = resolution, random_crop, flip
        self.caption_dropout, self.seed, self.max_pixels = caption_dropout, seed, max_pixels

    def __len__(self) -> int:
        return len(self.examples)

    def image(self, index: int, rng: random.Random) -> Image.Image:
        img = open_rgb(self.examples[index].path, self.max_pixels)
        flip = self.flip and rng.random() < 0.5
        return resize_crop(img, self.resolution, self.random_crop, flip, rng)

    def caption(self, index: int) -> str:
        return self.examples[index].caption or ""

    def image_tensor(self, index: int) -> torch.Tensor:
        """The image with the epoch-0 crop (for --cache-latents, where crops are fixed)."""
        return to_tensor(self.image(index, sample_rng(self.seed, 0, index)))

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rng = sample_rng(self.seed, epoch, index)
        dropped = rng.random() < self.caption_dropout
        item = {"index": index, "caption": "" if dropped else self.caption(index)}
        item["pixels"] = to_tensor(self.image(index, rng))
        return item


class ShapesScenes(CaptionedImages):
    """`length` synthetic scenes from latentdiff.data.shapes, drawn on the fly at the training resolution."""

    def __init__(
        self,
        length: int,
        resolution: int,
        scene_seed: int = 0,
        caption_dropout: float = 0.0,
        seed: int = 0,
        mix: dict[str, float] | None = None,
    ):
        super().__init__([], resolution, caption_dropout=caption_dropout, seed=seed)
        from latentdiff.data.shapes import ShapesDataset

        self.scenes = ShapesDataset(
            length, seed=scene_seed, size=resolution, paraphrase=True, exclude=heldout_combinations(), mix=mix
        )
        self._last: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return len(self.scenes)

    def _scene(self, index: int) -> dict:
        if self._last is None or self._last[0] != index:  # caption() and image() of one item draw it once
            self._last = (index, self.scenes[index])
        return self._last[1]

    def image(self, index: int, rng: random.Random) -> Image.Image:
        img = self._scene(index)["image"].convert("RGB")
        return img if img.size == (self.resolution, self.resolution) else resize_crop(img, self.resolution)

    def caption(self, index: int) -> str:
        return self._scene(index)["text"]


def heldout_combinations() -> set[str]:
    """The held-out suite's two-object and position prompts, on any background: never drawn for training, so
    that those categories measure compositions the model has not seen. (Single objects and counts are too
    few to hold out: the suite necessarily repeats them.)"""
    import dataclasses

    from latentdiff.eval.captions import format_caption, heldout_prompts, parse_caption

    return {
        format_caption(dataclasses.replace(parse_caption(p), background=None))
        for p in heldout_prompts(("two_objects", "position"))
    }


def parse_shapes_mix(spec: str | None) -> dict[str, float] | None:
    """'position=3,two_objects=2' -> {"single": 1, "counting": 1, "two_objects": 2, "position": 3}: the
    relative frequency of each scene category (unnamed ones keep weight 1); None or '' -> None (uniform)."""
    from latentdiff.eval.captions import CATEGORIES

    return _parse_weights(spec, CATEGORIES, "--shapes-mix", "position=3,two_objects=2", "CATEGORY")


def parse_background_mix(spec: str | None) -> dict[str, float] | None:
    """'gray=2' -> {"white": 1, "black": 1, "gray": 2}: the relative frequency of each Shapes background, as
    `parse_shapes_mix` for the categories; None or '' -> None (uniform)."""
    from latentdiff.eval.captions import BACKGROUND_NAMES

    return _parse_weights(spec, BACKGROUND_NAMES, "--background-mix", "gray=2", "BACKGROUND")


def _parse_weights(spec: str | None, names, flag: str, example: str, what: str) -> dict[str, float] | None:
    if not spec:
        return None
    mix = dict.fromkeys(names, 1.0)
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip()
        if not sep or name not in names:
            raise DataError(
                f"{flag} {spec!r}: {part.strip()!r} is not {what}=WEIGHT with {what} one of "
                f"{', '.join(names)} (e.g. {flag} {example})"
            )
        try:
            mix[name] = float(value)
        except ValueError:
            raise DataError(f"{flag} {spec!r}: the weight of {name} must be a number, got {value!r}") from None
        if not mix[name] >= 0.0 or mix[name] == float("inf"):
            raise DataError(f"{flag} {spec!r}: the weight of {name} must be finite and >= 0")
    if sum(mix.values()) <= 0.0:
        raise DataError(f"{flag} {spec!r}: at least one {what.lower()} needs a weight above 0")
    return mix


def parse_shapes_spec(spec: str) -> int | None:
    """'shapes' -> 0, 'shapes:7' -> 7, anything else -> None (a folder)."""
    if spec == "shapes":
        return 0
    if spec.startswith("shapes:"):
        try:
            return int(spec.split(":", 1)[1])
        except ValueError:
            raise DataError(f"--data {spec!r}: the Shapes seed must be an integer, e.g. shapes:7") from None
    return None
