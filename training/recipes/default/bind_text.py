"""Can the causal CLIP text encoder itself give a relation caption the bound context that binding_probe.py
showed a U-Net can learn pairs from? A distillation check, text encoder only (no U-Net, no pictures):

    python training/recipes/default/bind_text.py --steps 2000 [--out DIR]

With --out, DIR becomes a copy of the model folder with the trained text encoder (binding_probe.py
--model DIR --context text then trains a U-Net on its contexts).

Student: the model's text encoder, trained. Targets, from the same encoder frozen (the teacher): for every
position caption "A <relation> B[ on a <bg> background]", a bound context: the first half of the window
from the encoding of "A <its side>", the second half from that of "B <its side>" at the same positions
(B's padding tokens, which have seen all of B's caption; binding_probe.bound_context takes B's first
half instead); "above" uses "at the top" / "at the bottom". For every single-object, counting and
two-object caption, the teacher's own context (to stay unchanged).
The held-out suite's position combinations are never trained on. Printed every 250 steps:
- `held-out relations`: mean |student - bound|^2 / mean |teacher - bound|^2 on the held-out position
  prompts (1: no closer than the untouched encoder, 0: exactly the bound context);
- `trained relations`: the same on trained position captions;
- `others drift`: mean |student - teacher|^2 on the other captions, over the mean |teacher(c) -
  teacher(c')|^2 between two different captions (0: unchanged, 1: as far off as another caption).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from pathlib import Path

import torch

SIDES = {
    "left_of": ("on the left", "on the right"),
    "right_of": ("on the right", "on the left"),
    "above": ("at the top", "at the bottom"),
    "below": ("at the bottom", "at the top"),
}


def sub_captions(prompt) -> tuple[str, str]:
    """The two one-object captions whose encodings make the bound context of a position prompt."""
    from latentdiff.eval.captions import _with_article

    (a, b), (side_a, side_b) = prompt.objects, SIDES[prompt.relation]
    bg = "" if prompt.background is None else f" on a {prompt.background} background"
    return f"{_with_article(*a)} {side_a}{bg}", f"{_with_article(*b)} {side_b}{bg}"


def caption_sets():
    """(trained position prompts, held-out position prompts, other captions) as canonical Prompt/str."""
    from latentdiff.eval.captions import all_prompts, format_caption, heldout_prompts, parse_caption
    from latentdiff.training.data import heldout_combinations

    held = heldout_combinations()
    trained = [
        p for p in all_prompts("position") if format_caption(dataclasses.replace(p, background=None)) not in held
    ]
    heldout = [parse_caption(p) for p in heldout_prompts(("position",))]
    others = [format_caption(p) for c in ("single", "counting", "two_objects") for p in all_prompts(c)]
    return trained, heldout, others


def check_out(parser, out: Path, model: Path) -> None:
    """--out, before training: save_pretrained's own rule (a new or empty folder, or an earlier latentdiff
    save), checked now, and never the --model folder itself."""
    from latentdiff import folders

    try:
        folders.check_replaceable(out, folders.DEFAULTS_FILE)
    except FileExistsError as e:
        parser.error(f"--out: {e}")
    if out.resolve() == model.resolve():
        parser.error(f"--out {out} is the --model folder; write the trained model to another folder")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="weights/shapes-tiny")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the model folder with the trained text encoder here")
    args = p.parse_args(argv)
    if args.steps < 0 or args.batch_size < 2 or not args.lr > 0:
        p.error("--steps must not be negative, --batch-size must be at least 2 and --lr above 0")
    if args.out is not None:
        check_out(p, Path(args.out), Path(args.model))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from latentdiff.eval.captions import format_caption
    from latentdiff.pipeline import LatentDiffusionPipeline

    torch.manual_seed(args.seed)
    try:
        pipe = LatentDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32)
    except (OSError, ValueError) as e:  # a missing folder, not a model folder (ModelFolderError), bad weights
        p.error(f"cannot load --model {args.model}: {e}")
    trained, heldout, others = caption_sets()
    halves = sorted({s for prompt in trained + heldout for s in sub_captions(prompt)})
    with torch.no_grad():
        sub = dict(zip(halves, pipe.encode(halves)))
    half = next(iter(sub.values())).shape[0] // 2

    def bound(prompts) -> torch.Tensor:
        pairs = [sub_captions(q) for q in prompts]
        return torch.stack([torch.cat([sub[x][:half], sub[y][half:]]) for x, y in pairs])

    student = copy.deepcopy(pipe.text_encoder).train()
    for param in student.parameters():
        param.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)

    def run(model, texts):
        return model(pipe.tokenizer(texts), clip_skip=0)

    @torch.no_grad()
    def relation_error(prompts) -> float:
        texts, target = [format_caption(q) for q in prompts], bound(prompts)
        return (
            (run(student, texts) - target).square().mean() / (run(pipe.text_encoder, texts) - target).square().mean()
        ).item()

    g = torch.Generator().manual_seed(args.seed)
    check_others = [others[i] for i in torch.randperm(len(others), generator=g)[:256].tolist()]

    @torch.no_grad()
    def others_drift() -> float:
        teacher = run(pipe.text_encoder, check_others)
        spread = (teacher - teacher.roll(1, 0)).square().mean()
        return ((run(student, check_others) - teacher).square().mean() / spread).item()

    check_trained = [trained[i] for i in torch.randperm(len(trained), generator=g)[:256].tolist()]
    for step in range(args.steps + 1):
        if step % 250 == 0 or step == args.steps:
            student.eval()
            print(f"step {step:5d}  held-out relations {relation_error(heldout):.3f}  trained relations "
                  f"{relation_error(check_trained):.3f}  others drift {others_drift():.4f}", flush=True)  # fmt: skip
            student.train()
        if step == args.steps:
            break
        n = args.batch_size // 2
        rel = [trained[i] for i in torch.randint(0, len(trained), (n,), generator=g).tolist()]
        oth = [others[i] for i in torch.randint(0, len(others), (n,), generator=g).tolist()]
        with torch.no_grad():
            target = torch.cat([bound(rel), run(pipe.text_encoder, oth)])
        loss = (run(student, [format_caption(q) for q in rel] + oth) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if args.out:
        pipe.text_encoder = student.eval().requires_grad_(False)
        pipe.save_pretrained(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
