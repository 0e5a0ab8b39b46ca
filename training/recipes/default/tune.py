"""Choose the stored sampling defaults (sampler, steps, guidance scale) on prompts that are NOT the held-out suite.

    python training/recipes/default/tune.py --model runs/default/shapes-tiny/final --out runs/tune \
        --guidance 3,5,7.5,10 --steps 20,30 --samplers dpmpp_2m,euler_a

The tuning prompts are canonical captions of Shapes scenes drawn like the training data (seed 777, the
held-out combinations excluded, and no prompt of the held-out suite), so the suite stays a test set. Each
setting is scored with `latentdiff eval` (one image per prompt, seed 0); the table and tune.json go to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TUNING_SEED = 777


def tuning_prompts(count: int, unnamed_background: float = 0.0) -> list[str]:
    from latentdiff.data.shapes import ShapesDataset, unnamed_background_caption
    from latentdiff.eval.captions import heldout_prompts
    from latentdiff.training.data import heldout_combinations

    suite = set(heldout_prompts())
    scenes = ShapesDataset(4 * count, seed=TUNING_SEED, size=64, paraphrase=False, exclude=heldout_combinations())
    texts = (unnamed_background_caption(scenes[i], TUNING_SEED, i, unnamed_background) for i in range(len(scenes)))
    return [text for text in texts if text not in suite][:count]


def parse_list(parser, flag: str, text: str, field: str) -> list:
    """A comma-separated option -> its checked values (eval's rules for `field`); one error line otherwise."""
    from latentdiff.prompts import convert_value

    try:
        return [convert_value(field, item.strip(), flag) for item in text.split(",")]
    except ValueError as e:
        parser.error(f"{e} (in {flag} {text!r}, a comma-separated list)")


def main(argv: list[str] | None = None) -> int:
    from latentdiff.atomic import atomic_file
    from latentdiff.cli import UserError, prepare_out
    from latentdiff.cli import main as cli
    from latentdiff.folders import ModelFolderError, check_model_root

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--guidance", default="3,5,7.5,10", help="comma-separated guidance scales")
    p.add_argument("--steps", default="20", help="comma-separated step counts")
    p.add_argument("--samplers", default="dpmpp_2m", help="comma-separated sampler names")
    p.add_argument("--count", type=int, default=120, help="tuning prompts")
    p.add_argument(
        "--unnamed-background",
        type=float,
        default=0.25,
        help="share of tuning prompts without a background phrase, as in the held-out suite (default 0.25; "
        "the recipe README's figures before session 14 had 0)",
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.unnamed_background <= 1.0:
        p.error(f"--unnamed-background must be a share between 0 and 1, got {args.unnamed_background}")
    if args.count < 1:
        p.error(f"--count must be at least 1, got {args.count}")
    # every setting of the grid is checked now: a typo must not stop the run after hours of finished evals
    samplers = parse_list(p, "--samplers", args.samplers, "sampler")
    step_counts = parse_list(p, "--steps", args.steps, "steps")
    scales = parse_list(p, "--guidance", args.guidance, "guidance_scale")
    try:
        check_model_root(args.model)
    except ModelFolderError as e:
        p.error(f"--model: {e}")
    out = Path(args.out)
    prompt_file = out / "tuning_prompts.txt"  # written first: it marks a folder as tune's own
    if out.is_dir() and any(out.iterdir()) and not prompt_file.is_file():
        p.error(f"--out {out} already holds files that are not an earlier tune.py run; choose a new or empty folder")
    try:
        prepare_out(out)
    except UserError as e:
        p.error(str(e))
    prompt_file.write_text("\n".join(tuning_prompts(args.count, args.unnamed_background)) + "\n", encoding="utf-8")
    rows = []
    for sampler in samplers:
        for steps in step_counts:
            for guidance in scales:
                where = out / f"{sampler}-s{steps}-g{guidance:g}"
                flags = ["--model", args.model, "--prompts", str(prompt_file), "--out", str(where), "--seed", "0"]
                flags += ["--images-per-prompt", "1", "--sampler", sampler, "--steps", str(steps)]
                status = cli(["eval", *flags, "--guidance-scale", str(guidance)])
                if status:  # eval has said why; 130 / 143 for a stop, as a shell expects
                    return status
                report = json.loads((where / "report.json").read_text())
                setting = {"sampler": sampler, "steps": steps, "guidance_scale": guidance}
                rows.append({**setting, **report["categories"], "overall": report["overall"]})
                # after every setting: a later failure (a full disk, Ctrl-C) keeps the rows finished so far
                with atomic_file(out / "tune.json") as f:
                    f.write((json.dumps(rows, indent=2) + "\n").encode("utf-8"))
    print("| sampler | steps | guidance | " + " | ".join(list(rows[0])[len(setting) :]) + " |")
    for row in rows:
        print("| " + " | ".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in row.values()) + " |")
    best = max(rows, key=lambda r: r["overall"])
    print(
        f"best: {best['sampler']}, steps {best['steps']}, guidance {best['guidance_scale']:g} "
        f"(overall {best['overall']:.3f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
