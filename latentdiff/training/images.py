"""One training image from disk: safe decode (bad files, decompression bombs), EXIF, mode -> RGB, resize + crop."""

from __future__ import annotations

import contextlib
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# Pixels per image above which a file is treated as a decompression bomb (Pillow's own default is ~89M).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


class BadImageError(ValueError):
    """A file that cannot be used as a training image; the message says why."""


@contextlib.contextmanager
def pixel_limit(max_pixels: int):
    """Pillow's bomb check at `max_pixels`, its warning (1x to 2x the limit) raised as an error.

    Process-wide (Pillow's limit and the warning filters are globals): enter it once around a whole scan,
    never in worker threads.
    """
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def open_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` fully and return it upright in RGB, or raise BadImageError saying why it is unusable."""
    path = Path(path)
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own check must not be stricter than ours
    try:
        if path.stat().st_size == 0:
            raise BadImageError("empty file (0 bytes)")
        with Image.open(path) as img:
            if img.width * img.height > max_pixels:  # checked on the header, before decoding anything
                raise BadImageError(f"decompression bomb: {img.width}x{img.height} is more than {max_pixels} pixels")
            img.load()  # a truncated or corrupt file fails here, not at open()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"decompression bomb: more than {max_pixels} pixels ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadImageError("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what Pillow raises for truncated/corrupt data
        raise BadImageError(f"corrupt or truncated ({e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any Pillow mode: transparency composited on white, CMYK/P/L/16-bit converted."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode in ("RGB", "L") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit greyscale: rescale to 8 bits
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F" and a.max() <= 1.0:  # floating-point pixels are usually stored in [0, 1]
            top = 1.0
        img = Image.fromarray(np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8))
    return img.convert("RGB")


def resize_crop(
    img: Image.Image,
    resolution: int,
    random_crop: bool = False,
    flip: bool = False,
    rng: random.Random | None = None,
) -> Image.Image:
    """Shorter side -> `resolution` (bicubic), then a centre (or random) square crop; mirrored if `flip`."""
    rng = rng or random.Random(0)
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if random_crop:
        left, top = rng.randint(0, new_w - resolution), rng.randint(0, new_h - resolution)
    else:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB -> float (3, H, W) in [-1, 1], the VAE's input range."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return a.permute(2, 0, 1).float().div(127.5).sub(1.0)
