"""Image metadata: A1111 `parameters` text and a JSON record, in PNG text chunks, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from latentdiff.atomic import atomic_file

RECORD_KEY = "latentdiff"  # the PNG text chunk holding the JSON record


def a1111_parameters(record: dict[str, Any]) -> str:
    """The text A1111 and most SD tools read: prompt, `Negative prompt: ...`, then `Key: value, ...`."""
    lines = [record["prompt"]]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    fields = [
        ("Steps", record["steps"]),
        ("Sampler", record["sampler"] + (" Karras" if record.get("karras") else "")),
        ("CFG scale", record["guidance_scale"]),
        ("Seed", record["seed"]),
        ("Size", f"{record['width']}x{record['height']}"),
        ("Model", record.get("model", "")),
    ]
    if record.get("model_hash"):
        fields.append(("Model hash", record["model_hash"][:10]))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def attach(image: Image.Image, record: dict[str, Any]) -> Image.Image:
    """Put the record on image.info (as `parameters` text and JSON) so it travels with the image."""
    image.info["parameters"] = a1111_parameters(record)
    image.info[RECORD_KEY] = json.dumps(record, sort_keys=True, ensure_ascii=False)
    return image


def save_png(image: Image.Image, path: str | Path, record: dict[str, Any] | None = None) -> Path:
    """Write a PNG with its metadata chunks; a temporary file renamed into place, so never half-written."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if record is not None:
        attach(image, record)
    for key in ("parameters", RECORD_KEY):
        if key in image.info:
            info.add_itxt(key, image.info[key])
    with atomic_file(path) as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


def read_record(image: Image.Image) -> dict[str, Any]:
    """The JSON record an image carries (from the pipeline, or read from a PNG); {} when it has none."""
    record = image.info.get(RECORD_KEY)
    return json.loads(record) if record else {}


def read_png_metadata(path: str | Path) -> tuple[str | None, dict[str, Any] | None]:
    """(parameters text, JSON record) of a PNG; None for what it does not carry."""
    with Image.open(path) as im:
        im.load()
        return im.info.get("parameters"), read_record(im) or None
