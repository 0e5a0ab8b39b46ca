"""Helpers shared by the training tests: a folder of captioned images, the common train.py arguments, and the
recipe's scripts loaded by path."""

from __future__ import annotations

import importlib.util
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


RECIPE = Path(__file__).resolve().parent.parent / "training" / "recipes" / "default"


def recipe_script(name: str):
    """A script of the default recipe (not a package module), loaded by path."""
    spec = importlib.util.spec_from_file_location(name, RECIPE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
