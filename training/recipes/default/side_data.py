"""Single Shapes objects placed clearly on one side of the image, captioned with that side ("a red circle on
the left", "one blue star at the top on a gray background"): the simplest test of whether a U-Net can learn
where to draw from a word. Writes DIR/000000.png ... and DIR/metadata.jsonl (train.py reads the folder).

    python training/recipes/default/side_data.py --out runs/side --count 20000 [--seed 5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

MIN_OFFSET = 10  # pixels of a 64 canvas between the object's centre and the middle line: clearly one side


def side_examples(count: int, seed: int):
    """Yield (scene, caption) with the side phrase after the object and before any background phrase."""
    from latentdiff.data.shapes import Scene, _phrase, sample_scene

    rng = np.random.default_rng(seed)
    made = 0
    while made < count:
        scene: Scene = sample_scene(rng, category="single")
        obj = scene.objects[0]
        middle = scene.size / 2
        if rng.integers(2):
            offset, sides = obj.cx - middle, ("on the left", "on the right")
        else:
            offset, sides = obj.cy - middle, ("at the top", "at the bottom")
        if abs(offset) < MIN_OFFSET * scene.size / 64:
            continue
        text = f"{_phrase(rng, obj.color, obj.shape)} {sides[offset > 0]}"
        if rng.integers(2):
            text += f" on a {scene.background} background"
        made += 1
        yield scene, text


def write(out: Path, count: int, seed: int) -> Path:
    from latentdiff.data.shapes import render

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, (scene, text) in enumerate(side_examples(count, seed)):
            name = f"{i:06d}.png"
            render(scene).save(out / name, compress_level=1)
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return out / "metadata.jsonl"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args(argv)
    print(write(args.out, args.count, args.seed))


if __name__ == "__main__":
    main()
