"""score prompt-following on Shapes prompts (GenEval-style): a folder from `generate`, or a model"""

from __future__ import annotations

import json
from pathlib import Path

from latentdiff.cli import UserError, prepare_out


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder written by `latentdiff generate` (reads its manifest.jsonl)")
    source.add_argument("--model", help="model folder (or id) to generate with, then score")
    parser.add_argument("--out", required=True, help="folder for results.jsonl, report.json, contact_sheet.png")
    parser.add_argument(
        "--prompts", help="with --model: canonical prompts, one a line (default: the bundled held-out suite)"
    )
    parser.add_argument("--images-per-prompt", type=int, default=4, help="with --model (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="with --model: image i of the run gets seed + i")
    parser.add_argument("--batch-size", type=int, default=8, help="with --model: prompts per pipeline call")
    parser.add_argument("--steps", type=int, help="with --model: sampling steps (default: the pipeline's)")
    parser.add_argument("--guidance-scale", type=float, help="with --model: guidance_scale (default: the pipeline's)")
    parser.add_argument(
        "--sampler", help="with --model: ddpm, ddim, euler, euler_a, heun, dpmpp_2m (default: the model's)"
    )


def read_manifest(folder: Path) -> tuple[list[str], list[str]]:
    """(files, prompts) from folder/manifest.jsonl; UserError naming the line of any problem."""
    from latentdiff.eval.captions import parse_caption
    from latentdiff.textfiles import NotTextError, read_text

    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise UserError(f"{manifest} not found; --images takes a folder written by `latentdiff generate`")
    files, prompts = [], []
    try:
        text = read_text(manifest)
    except NotTextError as e:  # names the file already
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot read {manifest}: {e.strerror or e}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            file, prompt = entry["file"], entry["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{manifest}, line {lineno}: need a JSON object with 'file' and 'prompt' ({e})") from None
        try:
            parse_caption(prompt)
        except ValueError as e:
            raise UserError(f"{manifest}, line {lineno}: {e}") from None
        if not (folder / file).is_file():
            raise UserError(f"{manifest}, line {lineno}: image {file!r} not found in {folder}")
        files.append(file)
        prompts.append(prompt)
    if not files:
        raise UserError(f"{manifest} lists no images")
    return files, prompts


def generate(args, prompts: list[str], out: Path) -> tuple[list[str], list, list[str]]:
    """Render every prompt K times with the pipeline; saves out/images/*.png + out/manifest.jsonl."""
    from latentdiff import LatentDiffusionPipeline

    k = args.images_per_prompt
    try:
        pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    except (OSError, ValueError) as e:  # ModelFolderError is a ValueError
        raise UserError(f"cannot load --model: {e}") from None
    options = {"progress": False}
    if args.steps is not None:
        options["steps"] = args.steps
    if args.guidance_scale is not None:
        options["guidance_scale"] = args.guidance_scale
    if args.sampler is not None:
        options["sampler"] = args.sampler
    (out / "images").mkdir(parents=True, exist_ok=True)
    files, images, image_prompts = [], [], []
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as manifest:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            # seed + index of the batch's first image: the same images whatever the batch size
            outputs = pipe(batch, seed=args.seed + start * k, num_images_per_prompt=k, **options)
            for j, image in enumerate(outputs):
                index = start * k + j
                file = f"images/{index:05d}.png"
                image.save(out / file)
                prompt = batch[j // k]
                entry = {"file": file, "prompt": prompt, "seed": args.seed + index}
                manifest.write(json.dumps(entry) + "\n")
                files.append(file)
                images.append(image)
                image_prompts.append(prompt)
            print(f"generated {min(start + args.batch_size, len(prompts))}/{len(prompts)} prompts", flush=True)
    return files, images, image_prompts


def run(args) -> int:
    from PIL import Image

    from latentdiff.eval.captions import heldout_prompts, read_prompt_file
    from latentdiff.eval.score import evaluate

    out = Path(args.out)
    if args.images is not None:
        for flag in ("prompts", "steps", "guidance_scale", "sampler"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} goes with --model, not --images")
        folder = Path(args.images)
        files, prompts = read_manifest(folder)
        prepare_out(out)
        images = []
        for file in files:
            try:
                with Image.open(folder / file) as im:
                    images.append(im.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise UserError(f"cannot read image {folder / file}: {e}") from None
    else:
        if args.images_per_prompt < 1 or args.batch_size < 1:
            raise UserError("--images-per-prompt and --batch-size must be at least 1")
        from latentdiff.prompts import check_value, sampler_names

        try:  # the range rules of generate's options and prompt lines
            for field, value, name in (
                ("steps", args.steps, "--steps"),
                ("guidance_scale", args.guidance_scale, "--guidance-scale"),
            ):
                if value is not None:
                    check_value(field, value, name)
        except ValueError as e:
            raise UserError(str(e)) from None
        if args.seed < 0:
            raise UserError(f"--seed must not be negative, got {args.seed}")

        if args.sampler is not None and args.sampler not in sampler_names():
            raise UserError(f"unknown --sampler {args.sampler!r}; choose one of {', '.join(sampler_names())}")
        if args.prompts is None:
            prompt_list = heldout_prompts()
        else:
            if not Path(args.prompts).is_file():
                raise UserError(f"prompt file {args.prompts} not found")
            try:
                prompt_list = read_prompt_file(args.prompts)
            except ValueError as e:
                raise UserError(str(e)) from None
        prepare_out(out)
        files, images, prompts = generate(args, prompt_list, out)
    report = evaluate(files, prompts, images, out)
    cats = ", ".join(f"{c} {a:.3f}" for c, a in report["categories"].items() if a is not None)
    print(f"overall {report['overall']:.3f} ({cats}; n={report['n']}); wrote {out}/report.json")
    return 0
