"""Single Shapes objects placed clearly on one side of the image, captioned with that side ("a red circle on
the left", "one blue star at the top on a gray background"): the simplest test of whether a U-Net can learn
where to draw from a word. Writes DIR/000000.png ... and DIR/metadata.jsonl (train.py reads the folder).
With --scenes, ordinary Shapes training scenes follow (paraphrased captions, the held-out suite's combinations
left out, as train.py's `--data shapes`), weighted by --shapes-mix: a folder that teaches the sides and keeps
everything else.

    python training/recipes/default/side_data.py --out runs/side --count 20000 [--seed 5]
    python training/recipes/default/side_data.py --out runs/mix --count 20000 --scenes 40000 \
        --shapes-mix position=4,two_objects=2,counting=2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

MIN_OFFSET = 10  # pixels of a 64 canvas between the object's centre and the middle line: clearly one side


def side_examples(count: int, seed: int, canonical: bool = False):
    """Yield (scene, caption) with the side phrase after the object and before any background phrase;
    `canonical`: the object always as "a/an <colour> <shape>", as the held-out suite words it (not "one ...")."""
    from latentdiff.data.shapes import Scene, _phrase, sample_scene
    from latentdiff.eval.captions import _with_article

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
        phrase = _phrase(rng, obj.color, obj.shape)  # drawn either way: same scenes with or without canonical
        if canonical:
            phrase = _with_article(obj.color, obj.shape)
        text = f"{phrase} {sides[offset > 0]}"
        if rng.integers(2):
            text += f" on a {scene.background} background"
        made += 1
        yield scene, text


def shapes_examples(
    count: int,
    seed: int,
    mix: dict[str, float] | None,
    canonical: bool = False,
    unnamed_background: float = 0.0,
    backgrounds: dict[str, float] | None = None,
):
    """Yield (image, caption, scene dict) of train.py's `--data shapes` kind (held-out combinations excluded);
    `canonical`: the suite's wording ("a red circle to the left of a blue square on a gray background"), no
    paraphrases. `unnamed_background`: with `canonical`, the share of captions that leave the background out,
    as a quarter of the held-out suite's prompts do (always named otherwise, so such prompts were never trained
    on).
    `backgrounds`: background weights (default: uniform)."""
    from latentdiff.data.shapes import ShapesDataset, unnamed_background_caption
    from latentdiff.training.data import heldout_combinations

    scenes = ShapesDataset(
        count, seed=seed, paraphrase=not canonical, exclude=heldout_combinations(), mix=mix, backgrounds=backgrounds
    )
    for i in range(count):
        example = scenes[i]
        text = unnamed_background_caption(example, seed, i, unnamed_background) if canonical else example["text"]
        yield example["image"], text, example["scene"]


def write(
    out: Path,
    count: int,
    seed: int,
    scenes: int = 0,
    mix=None,
    canonical: bool = False,
    unnamed_background=0.0,
    backgrounds=None,
) -> Path:
    """Write the folder as `latentdiff shapes` writes a Shapes set (a "scene" in every metadata line), so that
    only a new or empty folder or an earlier Shapes set is replaced (FileExistsError otherwise), metadata.jsonl
    appears only when every image is there, and an earlier set's surplus images go."""
    import itertools
    import os

    from latentdiff.data.shapes import IMAGE_NAME, WRITING, _check_replaceable, render

    _check_replaceable(out)
    sides = ((render(scene), text, scene.to_dict()) for scene, text in side_examples(count, seed, canonical))
    examples = itertools.chain(sides, shapes_examples(scenes, seed, mix, canonical, unnamed_background, backgrounds))
    out.mkdir(parents=True, exist_ok=True)
    metadata, partial, names = out / "metadata.jsonl", out / ".metadata.jsonl.partial", set()
    (out / WRITING).write_text("side_data.py is writing a Shapes set here; metadata.jsonl comes last\n")
    metadata.unlink(missing_ok=True)  # its captions would describe other images
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for i, (image, text, scene) in enumerate(examples):
                names.add(f"{i:06d}.png")
                image.save(out / f"{i:06d}.png", compress_level=1)
                f.write(json.dumps({"file_name": f"{i:06d}.png", "text": text, "scene": scene}) + "\n")
        for path in out.iterdir():
            if IMAGE_NAME.fullmatch(path.name) and path.name not in names:
                path.unlink()
        os.replace(partial, metadata)
    finally:
        partial.unlink(missing_ok=True)
    (out / WRITING).unlink()
    return metadata


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--scenes", type=int, default=0, help="ordinary Shapes training scenes to add after the sides")
    p.add_argument("--shapes-mix", default=None, help="their category weights, as train.py's --shapes-mix")
    p.add_argument(
        "--background-mix",
        default=None,
        help="the --scenes backgrounds' weights, e.g. gray=2 (default: the three equally often)",
    )
    p.add_argument("--canonical", action="store_true", help="the held-out suite's wording only, no paraphrases")
    p.add_argument(
        "--unnamed-background",
        type=float,
        default=0.0,
        help="with --canonical: share of the --scenes captions without the background phrase (default 0)",
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.unnamed_background <= 1.0:
        p.error(f"--unnamed-background must be a share between 0 and 1, got {args.unnamed_background}")
    if args.unnamed_background and not args.canonical:
        p.error("--unnamed-background needs --canonical (paraphrased captions already leave it out half the time)")
    from latentdiff.cli import UserError, prepare_out
    from latentdiff.data.shapes import _check_replaceable
    from latentdiff.training.data import DataError, parse_background_mix, parse_shapes_mix

    try:
        mix = parse_shapes_mix(args.shapes_mix)
        backgrounds = parse_background_mix(args.background_mix)
    except DataError as e:
        p.error(str(e))
    for flag, value in (("--count", args.count), ("--scenes", args.scenes), ("--seed", args.seed)):
        if value < 0:
            p.error(f"{flag} must not be negative, got {value}")
    if args.count + args.scenes < 1:
        p.error("--count and --scenes are both 0: nothing to write; give at least one of them")
    try:
        _check_replaceable(args.out)  # by write(), too: here to refuse before the folder is made
        prepare_out(args.out)
    except (FileExistsError, UserError) as e:
        p.error(str(e))
    print(
        write(args.out, args.count, args.seed, args.scenes, mix, args.canonical, args.unnamed_background, backgrounds)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
