"""Write a Shapes dataset: synthetic coloured-shape scenes with captions (PNGs + metadata.jsonl)."""

from __future__ import annotations

import time

from latentdiff.cli import UserError, prepare_out


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="folder to write NNNNNN.png and metadata.jsonl into")
    parser.add_argument("--count", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same dataset (default 0)")
    parser.add_argument("--size", type=int, default=64, help="canvas width and height in pixels (default 64)")
    parser.add_argument(
        "--paraphrase",
        action="store_true",
        help="varied training captions (paraphrases; background named half the time), not canonical",
    )


def run(args) -> int:
    from latentdiff.data.shapes import write_dataset

    if args.count < 1:
        raise UserError(f"--count must be at least 1, got {args.count}")
    if args.size < 16:
        raise UserError(f"--size must be at least 16 pixels, got {args.size}")
    if args.seed < 0:
        raise UserError(f"--seed must not be negative, got {args.seed}")
    prepare_out(args.out)
    start = time.perf_counter()
    try:
        path = write_dataset(args.out, args.count, seed=args.seed, size=args.size, paraphrase=args.paraphrase)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    seconds = time.perf_counter() - start
    print(f"wrote {args.count} images and {path} in {seconds:.1f} s ({args.count / max(seconds, 1e-9):.0f} images/s)")
    return 0
