"""Safe, deterministic image file names: `{line:05d}-{index:02d}-{seed}-{slug}.png`, never outside --out.

The name depends only on (prompt, line, index, seed), so a rerun or a resumed run writes the same
files. The slug keeps letters, digits and marks of any script (NFC-normalised, lower-cased), joins
everything else into single `-`, and is capped in UTF-8 bytes without cutting a character. Since the
name starts with digits it is never empty, never hidden (leading dot), never a Windows device name
(CON, NUL, COM1...), and it holds no separator, NUL or character Windows forbids.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

SLUG_MAX_BYTES = 80  # whole name stays far below the 255-byte limit of common file systems
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}


def slugify(text: str, max_bytes: int = SLUG_MAX_BYTES, empty: str = "prompt") -> str:
    """A file-name-safe slug of `text`, at most `max_bytes` UTF-8 bytes; `empty` if nothing is left."""
    out: list[str] = []
    size = 0
    for ch in unicodedata.normalize("NFC", text).lower():
        keep = unicodedata.category(ch)[0] in "LNM" and ch.isprintable()
        piece = ch if keep else "-"
        if piece == "-" and (not out or out[-1] == "-"):
            continue  # no leading or doubled separators
        if unicodedata.category(piece)[0] == "M" and (not out or out[-1] == "-"):
            continue  # a combining mark needs a base character
        n = len(piece.encode("utf-8"))
        if size + n > max_bytes:
            break
        out.append(piece)
        size += n
    slug = "".join(out).strip("-")
    # Unreachable with the rules above, kept as a guard should they ever loosen.
    slug = slug.lstrip(".")
    if slug.split(".")[0].upper() in WINDOWS_RESERVED:
        slug = f"_{slug}"
    return slug or empty


def image_filename(prompt: str, line: int, index: int, seed: int, max_slug_bytes: int = SLUG_MAX_BYTES) -> str:
    """The PNG name for image `index` (0-based) of the prompt on `line` (1-based), made with `seed`."""
    return f"{int(line):05d}-{int(index):02d}-{int(seed)}-{slugify(prompt, max_slug_bytes)}.png"


def grid_filename(prompt: str, line: int, max_slug_bytes: int = SLUG_MAX_BYTES) -> str:
    """The name of the grid of all images of the prompt on `line`."""
    return f"{int(line):05d}-grid-{slugify(prompt, max_slug_bytes)}.png"


def inside(folder: str | Path, name: str) -> Path:
    """folder / name, refusing any name that would resolve outside `folder` (belt and braces)."""
    folder = Path(folder).resolve()
    if "\x00" in name or (folder / name).resolve().parent != folder:
        raise ValueError(f"unsafe file name {name!r}: it would not land directly in {folder}")
    return folder / name
