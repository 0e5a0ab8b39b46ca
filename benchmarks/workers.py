"""latentdiff alone: a batch with the bundled model's stored defaults, cut across worker processes or not.

    python benchmarks/workers.py                     # 1 image (pair.py), batches of 8 and 32; 4 rounds
    python benchmarks/workers.py --images 8 --repeats 8

`workers=None` is the default (one worker process per torch thread on Linux with 2-4 threads; one image:
its two guidance rows in two processes), `workers=1` one process with torch's threads. Prints medians
and the largest pixel difference between the two.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import alternate  # noqa: E402

PROMPTS = [
    "a red circle",
    "a blue square above a green star",
    "two yellow triangles",
    "a cyan star on a black background",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="1,8,32", help="batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)

    from latentdiff.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, defaults {pipe.defaults}")
    for count in (int(c) for c in args.images.split(",")):
        prompts = (PROMPTS * count)[:count]

        def call(workers, prompts=prompts):
            return pipe(prompts, seed=0, progress=False, workers=workers)

        r = alternate({"default": lambda: call(None), "one process": lambda: call(1)}, args.repeats)
        a, b = (np.stack([np.asarray(im, dtype=np.int16) for im in r[k]["result"]]) for k in r)
        default, one = r["default"]["median_s"], r["one process"]["median_s"]
        print(
            f"{len(prompts)} images: default {default:.3f} s, one process {one:.3f} s, "
            f"ratio {one / default:.2f}x, max pixel difference {np.abs(a - b).max()}/255"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
