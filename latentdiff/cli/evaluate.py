"""Score prompt-following on Shapes prompts (GenEval-style): a folder from `generate`, or a model."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from latentdiff.cli import UserError, prepare_out

# What `eval --model` writes into --out besides the scores: a manifest.jsonl listing images/NNNNN.png (and, if
# killed mid-write, atomic_file's hidden temporary there). Only these may be replaced by a rerun.
MANIFEST = "manifest.jsonl"
LISTED_IMAGE = re.compile(r"images/\d{5}\.png")
OWN_IMAGE = re.compile(r"\d{5}\.png|\.\d{5}\.png\.\w+\.tmp")
SCORES = ("report.json", "results.jsonl", "contact_sheet.png")  # report.json first: it marks a finished run


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder written by `latentdiff generate` (reads its manifest.jsonl)")
    source.add_argument("--model", help="model folder to generate with, then score")
    parser.add_argument(
        "--out",
        required=True,
        help="folder for results.jsonl, report.json, contact_sheet.png (with --model also images/, manifest.jsonl)",
    )
    parser.add_argument(
        "--prompts", help="with --model: canonical prompts, one a line (default: the bundled held-out suite)"
    )
    parser.add_argument("--images-per-prompt", type=int, default=4, help="with --model (default 4)")
    parser.add_argument(
        "--seed", type=int, default=0, help="with --model: image i of the run gets seed + i (default 0)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="with --model: prompts per pipeline call (default 8)")
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


def earlier_eval_files(out: Path) -> list[Path]:
    """The files of an earlier `eval --model` run into `out` (which a rerun replaces), report first.

    UserError if `out` holds a manifest or images/ that eval did not write (a `generate` folder, the user's
    own pictures): replacing them would lose them.
    """
    manifest, images = out / MANIFEST, out / "images"
    names = sorted(p.name for p in images.iterdir()) if images.is_dir() else []
    try:
        listed = [json.loads(line)["file"] for line in manifest.read_bytes().splitlines() if line.strip()]
        ours = all(isinstance(f, str) and LISTED_IMAGE.fullmatch(f) for f in listed)
    except FileNotFoundError:
        ours = True
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):  # unreadable: not ours to judge
        ours = False
    ours = ours and (images.is_dir() or not images.exists()) and all(OWN_IMAGE.fullmatch(n) for n in names)
    if not ours:
        raise UserError(
            f"--out {out} already holds a {MANIFEST} or images/ that `latentdiff eval --model` did not write, "
            f"and this run would replace them; choose another --out (to score that folder: --images {out})"
        )
    return [out / name for name in (*SCORES, MANIFEST)] + [images / name for name in names]


def generate(args, prompts: list[str], out: Path) -> tuple[list[str], list, list[str]]:
    """Render every prompt K times with the pipeline; saves out/images/*.png + out/manifest.jsonl.

    Every image is drawn before anything is written, so a run that fails or is stopped while drawing leaves
    --out as it was; an earlier eval's output there is then replaced, the manifest coming last.
    """
    from latentdiff import LatentDiffusionPipeline
    from latentdiff.atomic import atomic_file

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
    images = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        try:  # seed + index of the batch's first image: the same images whatever the batch size
            images += pipe(batch, seed=args.seed + start * k, num_images_per_prompt=k, **options)
        except ValueError as e:  # settings this model cannot do, e.g. more --steps than its scheduler has
            raise UserError(f"--model {args.model} cannot sample with these settings: {e}") from None
        print(f"generated {min(start + args.batch_size, len(prompts))}/{len(prompts)} prompts", flush=True)
    for path in earlier_eval_files(out):  # checked again: the folder may have changed while drawing
        path.unlink(missing_ok=True)
    (out / "images").mkdir(exist_ok=True)
    entries = []
    for index, image in enumerate(images):
        entry = {"file": f"images/{index:05d}.png", "prompt": prompts[index // k], "seed": args.seed + index}
        with atomic_file(out / entry["file"]) as f:
            image.save(f, format="PNG")
        entries.append(entry)
    with atomic_file(out / MANIFEST) as f:
        f.write("".join(json.dumps(entry) + "\n" for entry in entries).encode("utf-8"))
    return [e["file"] for e in entries], images, [e["prompt"] for e in entries]


@contextlib.contextmanager
def output_folder(out: Path):
    """prepare_out(out) for the block; a folder it made goes again if the block fails before writing to it."""
    made = not out.exists()
    prepare_out(out)
    try:
        yield out
    except BaseException:
        if made:
            with contextlib.suppress(OSError):  # not empty: what was written stays
                out.rmdir()
        raise


def read_images(folder: Path, files: list[str]) -> list:
    from PIL import Image

    images = []
    for file in files:
        try:
            with Image.open(folder / file) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot read image {folder / file}: {e}") from None
    return images


def run(args) -> int:
    from latentdiff.eval.captions import heldout_prompts, read_prompt_file
    from latentdiff.eval.score import evaluate

    out = Path(args.out)
    if args.images is not None:
        for flag in ("prompts", "steps", "guidance_scale", "sampler"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} goes with --model, not --images")
        folder = Path(args.images)
        files, prompts = read_manifest(folder)
        if (out / MANIFEST).exists() and os.path.realpath(out) != os.path.realpath(folder):
            raise UserError(  # its report would sit beside, and seem to score, the images listed there
                f"--out {out} holds another run's {MANIFEST} and images; choose another --out, or {folder} itself"
            )
        with output_folder(out):
            report = evaluate(files, prompts, read_images(folder, files), out)
    else:
        if args.images_per_prompt < 1 or args.batch_size < 1:
            raise UserError("--images-per-prompt and --batch-size must be at least 1")
        from latentdiff.prompts import MAX_SEED, check_value, sampler_names

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
        n = len(prompt_list) * args.images_per_prompt
        if args.seed + n - 1 > MAX_SEED:  # image i gets seed + i: the last must still be a seed torch takes
            raise UserError(
                f"--seed {args.seed} is too large for {n} images (image i gets --seed + i, and seeds go up to "
                f"{MAX_SEED}); use --seed {MAX_SEED - n + 1} or less"
            )
        if out.is_dir():
            earlier_eval_files(out)  # refuse another run's folder now, before the model loads
        with output_folder(out):
            files, images, prompts = generate(args, prompt_list, out)
            report = evaluate(files, prompts, images, out)
    cats = ", ".join(f"{c} {a:.3f}" for c, a in report["categories"].items() if a is not None)
    print(f"overall {report['overall']:.3f} ({cats}; n={report['n']}); wrote {out}/report.json")
    return 0
