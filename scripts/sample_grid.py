"""Make the README's sample grid: example prompts x seeds with the bundled model and its stored defaults.

python scripts/sample_grid.py --out docs/samples.png [--model DIR] [--seeds 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "a red circle",
    "an orange star on a black background",
    "three blue squares",
    "four yellow triangles on a gray background",
    "a green triangle and a pink circle",
    "a purple square to the left of a cyan star",
    "a yellow circle above a blue triangle",
    "a red star below a green square on a black background",
]


LABEL_WIDTH = 330  # pixels of prompt text left of each row


def check_out(parser, out: Path) -> None:
    """Refuse an --out the grid could not be written to, before any image is made (a file there is replaced:
    the user named it)."""
    if out.suffix.lower() != ".png":
        parser.error(f"--out {out}: the grid is written as a PNG; give a path ending in .png")
    if out.is_dir():
        parser.error(f"--out {out} is a folder; give a file path in it, e.g. {out / 'samples.png'}")
    if not out.parent.is_dir():
        parser.error(f"--out {out}: folder {out.parent} does not exist; create it or choose another path")


def main(argv: list[str] | None = None) -> int:
    from PIL import Image, ImageDraw

    from latentdiff import LatentDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--out", type=Path, default=Path("docs/samples.png"), help="PNG file to write")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds 0..N-1)")
    parser.add_argument("--scale", type=int, default=2, help="pixel upscaling of each image in the grid")
    args = parser.parse_args(argv)
    for flag, value in (("--seeds", args.seeds), ("--scale", args.scale)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    check_out(parser, args.out)
    try:
        pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    except (OSError, ValueError) as e:  # a ModelFolderError is a ValueError
        parser.error(f"cannot load the model: {e}")
    start = time.perf_counter()
    images = pipe(
        PROMPTS, seed=[s for _ in PROMPTS for s in range(args.seeds)], num_images_per_prompt=args.seeds, progress=False
    )
    seconds = time.perf_counter() - start
    w, h = images[0].size
    w, h = w * args.scale, h * args.scale
    sheet = Image.new("RGB", (LABEL_WIDTH + args.seeds * (w + 4), len(PROMPTS) * (h + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, prompt in enumerate(PROMPTS):
        draw.text((4, row * (h + 4) + h // 2 - 6), prompt, fill="black")
        for col in range(args.seeds):
            image = images[row * args.seeds + col].resize((w, h), Image.NEAREST)
            sheet.paste(image, (LABEL_WIDTH + col * (w + 4), row * (h + 4)))
    try:
        sheet.save(args.out)
    except OSError as e:
        print(f"sample_grid.py: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(images)} images in {seconds:.1f} s ({seconds / len(images):.3f} s/image)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
