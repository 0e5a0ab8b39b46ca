"""GenEval-style scoring on Shapes: a prompt passes only if exactly the named objects are found (colour and
shape), in the right number, in the right relation, on the named background. Plus reports and a contact sheet.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from PIL import Image, ImageOps

from latentdiff.atomic import atomic_file
from latentdiff.eval.captions import CATEGORIES, Prompt, parse_caption
from latentdiff.eval.detect import Detection, FoundObject, detect

RELATION_MIN_OFFSET = 0.06  # centres at least this far apart (fraction of the canvas) along the axis,
RELATION_MIN_COSINE = 0.5  # and the offset within 60 degrees of the axis (GenEval's rule)
PASS_COLOR, FAIL_COLOR = (40, 200, 40), (230, 0, 0)


def relation_found(a: FoundObject, b: FoundObject, relation: str) -> bool:
    """Is a `relation` b ("left_of", "right_of", "above", "below"), judged from their centres?"""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # b relative to a
    along = {"left_of": dx, "right_of": -dx, "above": dy, "below": -dy}[relation]
    return along >= RELATION_MIN_OFFSET and along >= RELATION_MIN_COSINE * math.hypot(dx, dy)


def check(prompt: Prompt, detection: Detection) -> tuple[bool, str]:
    """(passed, why not) for one image's detection against what the prompt asks."""
    if prompt.background is not None and detection.background != prompt.background:
        return False, f"background {detection.background}, wanted {prompt.background}"
    found = Counter((o.color, o.shape) for o in detection.objects)
    wanted = Counter(prompt.expected_objects())
    if found != wanted:
        return False, f"found {_describe(found)}, wanted {_describe(wanted)}"
    if prompt.relation is not None:
        a, b = ([o for o in detection.objects if (o.color, o.shape) == kind][0] for kind in prompt.objects)
        if not relation_found(a, b, prompt.relation):
            return (
                False,
                f"{prompt.relation} not found (centres {a.cx:.2f},{a.cy:.2f} and {b.cx:.2f},{b.cy:.2f})",
            )
    return True, ""


def _describe(objects: Counter) -> str:
    return ", ".join(f"{n}x {c} {s}" for (c, s), n in sorted(objects.items())) or "nothing"


def score_image(image: Image.Image, prompt: str | Prompt) -> dict:
    """{"prompt", "category", "pass", "reason", "found"} for one image."""
    parsed = parse_caption(prompt) if isinstance(prompt, str) else prompt
    detection = detect(image)
    passed, reason = check(parsed, detection)
    text = prompt if isinstance(prompt, str) else ""
    return {
        "prompt": text,
        "category": parsed.category,
        "pass": passed,
        "reason": reason,
        "found": detection.to_dict(),
    }


def summarize(results: list[dict]) -> dict:
    """report.json: per-category accuracy, `overall` = their mean (as GenEval), `accuracy` over all images."""
    by_category = {c: [r["pass"] for r in results if r["category"] == c] for c in CATEGORIES}
    categories = {c: (sum(v) / len(v) if v else None) for c, v in by_category.items()}
    present = [a for a in categories.values() if a is not None]
    return {
        "overall": sum(present) / len(present) if present else None,
        "accuracy": sum(r["pass"] for r in results) / len(results) if results else None,
        "categories": categories,
        "n": len(results),
        "n_per_category": {c: len(v) for c, v in by_category.items()},
    }


def contact_sheet(images: list[Image.Image], passed: list[bool], cell: int = 64, columns: int = 16) -> Image.Image:
    """A grid of the images, each framed green (pass) or red (fail)."""
    border = max(2, cell // 20)
    tile = cell + 2 * border
    columns = max(1, min(columns, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * tile, rows * tile), (255, 255, 255))
    for i, (image, ok) in enumerate(zip(images, passed, strict=True)):
        framed = ImageOps.expand(
            image.convert("RGB").resize((cell, cell), Image.LANCZOS), border, PASS_COLOR if ok else FAIL_COLOR
        )
        sheet.paste(framed, ((i % columns) * tile, (i // columns) * tile))
    return sheet


def evaluate(files: list[str], prompts: list[str], images: list[Image.Image], out_dir) -> dict:
    """Score images against their prompts; write out_dir/results.jsonl, report.json, contact_sheet.png.
    Returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [
        {"file": file, **score_image(image, prompt)} for file, prompt, image in zip(files, prompts, images, strict=True)
    ]
    report = summarize(results)
    # An earlier report goes first and the new one comes last, each file whole: a stopped run never leaves a
    # report.json beside results or a contact sheet it does not describe.
    (out_dir / "report.json").unlink(missing_ok=True)
    with atomic_file(out_dir / "results.jsonl") as f:
        f.write("".join(json.dumps(result) + "\n" for result in results).encode("utf-8"))
    with atomic_file(out_dir / "contact_sheet.png") as f:
        contact_sheet(images, [r["pass"] for r in results]).save(f, format="PNG")
    with atomic_file(out_dir / "report.json") as f:
        f.write((json.dumps(report, indent=2) + "\n").encode("utf-8"))
    return report
