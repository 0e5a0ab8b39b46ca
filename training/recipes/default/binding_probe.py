"""Text encoder or U-Net: which one cannot tie each of two objects to its side? The same pair pictures and
the same short training loop as side_learning.py, with one of two contexts:

    python training/recipes/default/binding_probe.py --context text --steps 1500
    python training/recipes/default/binding_probe.py --context bound --steps 1500

`text`: the frozen text encoder on the caption "a red circle to the left of a blue square". Its tokens
for the first object come before the relation word, so a causal encoder cannot tell them their side.
`bound`: a hand-made context that does: its first half is the (frozen) encoding of "a red circle on the
left", its second half that of "a blue square on the right" (each cut to half the window). The U-Net sees
every fact it needs, already bound to its object.
Pictures: two objects side by side for LAYOUT_OBJECTS' three pairs, both orders, "to the left of" and
"to the right of" (12 captions, 60 pictures each, drawn by the Shapes renderer). Every 100 steps the pair
asymmetry is printed (relation_probe.layout_asymmetry, with the arm's own contexts; the pictures
themselves: ~0.33). If only `bound` learns, the text encoder is what stops relations from being learnt.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from bind_text import SIDES
from side_learning import relation_probe, train

from latentdiff.eval.captions import RELATION_WORDS

# caption words -> (side of the first object, side of the second), for the two relations trained here
RELATIONS = {RELATION_WORDS[r]: SIDES[r] for r in ("left_of", "right_of")}


def pair_captions() -> list[tuple[str, str, str]]:
    """(object a, relation, object b) for every probe pair in both orders and both relations."""
    pairs = relation_probe().LAYOUT_OBJECTS
    return [(a, rel, b) for x, y in pairs for a, b in ((x, y), (y, x)) for rel in RELATIONS]


def with_article(obj: str) -> str:
    from latentdiff.eval.captions import _with_article

    return _with_article(*obj.split(" "))  # "a red circle", "an orange star": the suite's wording


def caption(a: str, relation: str, b: str) -> str:
    return f"{with_article(a)} {relation} {with_article(b)}"


def bound_context(pipe, a: str, relation: str, b: str) -> torch.Tensor:
    """(T, D): the encodings of "<a> <its side>" and "<b> <its side>", half the window each."""
    side_a, side_b = RELATIONS[relation]
    first, second = pipe.encode([f"{with_article(a)} {side_a}", f"{with_article(b)} {side_b}"])
    half = first.shape[0] // 2
    return torch.cat([first[:half], second[: first.shape[0] - half]])


def make_encoder(pipe, arm: str):
    """prompts -> (N, T, D) contexts for the arm; the prompts are canonical pair captions."""
    pattern = relation_probe().PAIR
    if arm == "text":
        return lambda prompts: pipe.encode(prompts).float()

    def encode(prompts):
        rows = []
        for p in prompts:
            m = pattern.fullmatch(p)
            if m is None:
                raise ValueError(f"binding_probe: {p!r} is not a pair caption")
            rows.append(bound_context(pipe, m.group(1).split(" ", 1)[1], m.group(2), m.group(3).split(" ", 1)[1]))
        return torch.stack(rows).float()

    return encode


@torch.no_grad()
def pair_latents(pipe, per_caption: int, seed: int) -> tuple[list[str], list[torch.Tensor]]:
    from latentdiff.data.shapes import render, scene_for_prompt
    from latentdiff.eval.captions import parse_caption

    rng = np.random.default_rng(seed)
    captions, latents = [], []
    for a, rel, b in pair_captions():
        text = caption(a, rel, b)
        scenes = [scene_for_prompt(parse_caption(text), rng) for _ in range(per_caption)]
        latents.append(relation_probe().encode_latents(pipe, relation_probe().stack_pixels(render(s) for s in scenes)))
        captions.append(text)
    return captions, latents


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="weights/shapes-tiny")
    p.add_argument("--context", choices=["text", "bound"], required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pictures", type=int, default=60, help="pictures per caption")
    args = p.parse_args(argv)
    if args.steps < 0 or args.batch_size < 1 or args.pictures < 1 or not args.lr > 0:
        p.error("--steps must not be negative, --batch-size and --pictures at least 1, and --lr above 0")
    pipe = relation_probe().load_pipeline(p, args.model, dtype=torch.float32)
    encode = make_encoder(pipe, args.context)
    captions, latents = pair_latents(pipe, per_caption=args.pictures, seed=args.seed)
    with torch.no_grad():
        contexts = encode(captions)

    def probe() -> float:
        return relation_probe().layout_asymmetry(pipe, kinds=("pair",), encode=encode)["pair"]

    print(f"{args.context}: {len(captions)} captions, e.g. {captions[0]!r}", flush=True)
    examples = (contexts, latents)
    for step, number in train(
        pipe, "images", args.steps, args.lr, args.batch_size, None, 0, seed=args.seed, examples=examples, probe=probe
    ):
        print(f"step {step:5d}  pair asymmetry {number:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
