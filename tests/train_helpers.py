"""Helpers shared by the training tests: a folder of captioned images and the common train.py arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_captioned_images(folder: Path, count: int, size: tuple[int, int], caption: str) -> Path:
    """`count` random RGB images of `size` (height, width), each with a caption file "<caption> <i>"."""
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"{caption} {i}")
    return folder


def train_argv(model, data, out, *extra) -> list[str]:
    """train.py arguments for a tiny run: --model/--data/--output-dir first (their values at 1, 3, 5), then extra."""
    return [
        "--model",
        str(model),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--seed",
        "0",
        "--resolution",
        "16",
        "--learning-rate",
        "1e-3",
        *map(str, extra),
    ]
