"""Generate images from a prompt file (or -p prompts) into a folder, with a manifest; resumable, parallel.

The run is planned before anything is drawn: every image of the run gets a `Task` (its line, its index
on that line, seed, size, sampler, file name) in file order, so the plan is the same on every rank and in
every rerun. Image k of the run uses seed + k unless its line sets a seed (then image i of that line uses
line seed + i). Under `accelerate launch`, rank r takes tasks r, r + N, r + 2N, ...; each rank batches
its tasks that share size, steps, guidance and sampler, writes each PNG atomically and appends its
manifest line to OUT/manifest.rank{r}.partial.jsonl; at the end rank 0 merges everything into
OUT/manifest.jsonl (global order, one line per file) and removes the parts. Pixels depend only on an
image's own seed and settings, so the batching and the split never change an image.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentdiff.cli import UserError, prepare_out, stopped_status
from latentdiff.naming import grid_filename, image_filename
from latentdiff.prompts import MAX_BATCH, MAX_SEED, LineError, PromptFileError, PromptJob, check_value, read_prompt_file

MANIFEST = "manifest.jsonl"
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16"}
DTYPES |= {"bfloat16": "bfloat16", "bf16": "bfloat16"}
# Manifest keys, in the order they are written (file relative to OUT).
MANIFEST_KEYS = (
    "file",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "sampler",
    "karras",
    "width",
    "height",
    "model",
    "model_hash",
    "line",
    "index",
)


def add_arguments(parser) -> None:
    add = parser.add_argument
    add("prompt_file", nargs="?", metavar="PROMPT_FILE", help="a .txt, .jsonl or .csv file")
    add("-p", "--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    add("--model", metavar="DIR", help="diffusers-layout model folder (default: the bundled model)")
    add("--out", metavar="DIR", default="outputs", help="output folder (default: outputs)")
    add("--negative", metavar="TEXT", help="negative prompt for lines that set none")
    add("--steps", type=int, help="denoising steps (default: the model's)")
    add("--cfg", type=float, help="classifier-free guidance scale (default: the model's)")
    add("--sampler", help="ddpm, ddim, euler, euler_a, heun, dpmpp_2m (default: the model's)")
    add(
        "--karras",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Karras et al. sigmas (euler, euler_a, heun, dpmpp_2m) (default: the model's)",
    )
    add("--seed", type=int, default=0, help="image k of the run uses SEED + k (default 0)")
    add("--width", type=int, help="image width in pixels (default: the model's)")
    add("--height", type=int, help="image height in pixels (default: the model's)")
    add("--images-per-prompt", type=int, default=1, metavar="N", help="images per line (default 1)")
    add("--batch-size", type=int, default=1, metavar="N", help="images per forward pass (default 1)")
    add(
        "--workers",
        type=int,
        metavar="N",
        help="CPU processes, one thread each, that share each batch (one image: its two guidance rows) "
        "(default: one per torch thread on Linux with 2-4 threads for U-Nets up to 50M parameters, else 1)",
    )
    add("--device", help="torch device, e.g. cpu, cuda:1 (default: cpu, or the rank's GPU)")
    add("--dtype", choices=sorted(DTYPES), help="weights and compute dtype (default float32)")
    add("--grid", action="store_true", help="also write a grid image per prompt line")
    add("--resume", action="store_true", help="skip images already written and in the manifest")
    add(
        "--overwrite",
        action="store_true",
        help="replace images in OUT that an earlier run made with other settings (refused otherwise)",
    )
    add("--quiet", action="store_true", help="no progress bar")


@dataclass(frozen=True)
class Task:
    """One image of the run, fully resolved."""

    k: int  # position in the run (0-based, file order)
    line: int
    index: int  # image index on its line
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    sampler: str
    karras: bool
    width: int
    height: int

    @property
    def file(self) -> str:
        return image_filename(self.prompt, self.line, self.index, self.seed)

    @property
    def batch_key(self) -> tuple:
        """Tasks with equal keys can share one pipeline call."""
        return (self.width, self.height, self.steps, self.guidance_scale, self.sampler, self.karras)

    def manifest_record(self, model: str, model_hash: str | None) -> dict[str, Any]:
        values = {**self.__dict__, "file": self.file, "model": model, "model_hash": model_hash}
        return {key: values[key] for key in MANIFEST_KEYS}


MIN_CALLS_TO_TRACE = 8
MAX_RUN_IMAGES = 1_000_000  # a plan entry each: about half a gigabyte of them


def run(args) -> int:
    started = time.perf_counter()
    from latentdiff.training.launch import relaunch, requested_cpu_processes

    processes = requested_cpu_processes()  # accelerate's --cpu launcher starts one process only: start them here
    if processes > 1:
        return relaunch(processes, "latentdiff", sys.argv[1:], module=True)
    source, jobs, errors = _read_jobs(args)
    _check_options(args)
    state = _distributed_state(args.device)
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    main_process = rank == 0
    out = prepare_out(Path(args.out))
    if main_process:
        for error in errors:
            print(f"{source}:{error.line}: error: {error.message}", file=sys.stderr)

    images = sum(job.images if job.images is not None else args.images_per_prompt for job in jobs)
    if images > MAX_RUN_IMAGES:  # the plan alone would fill memory before the first image
        raise UserError(f"this run asks for {images} images, more than {MAX_RUN_IMAGES} in one run; split it up")
    pipe = _load_pipeline(args, state)
    tasks = plan(jobs, args, resolved_defaults(pipe))
    # seed + k past the generator's range fails those images alone, whatever batch they would share
    unseedable = [t for t in tasks if t.seed > MAX_SEED]
    tasks = [t for t in tasks if t.seed <= MAX_SEED]
    if main_process:
        for t in unseedable:
            print(
                f"{source}:{t.line}: error: image {t.index + 1} would get seed {t.seed}, past {MAX_SEED}",
                file=sys.stderr,
            )
    model, model_hash = pipe.model_name, pipe.model_hash
    extra = {
        "model_path": str(Path(args.model).resolve()) if args.model else None,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "device": pipe.device.type,  # not the index: every rank must write the same record
    }

    known = read_manifest(out)
    if not args.overwrite:
        _refuse_replacing(out, tasks, known, model, model_hash)
    if not args.resume:
        known = {}
    # Batches are cut from the whole run, then dealt out: rank r runs batches r, r + N, ... So every
    # image is made in the same batch as in a one-process, uninterrupted run, bit for bit.
    mine = batches(tasks, args.batch_size)[rank::world]
    todo = [[t for t in batch if not _done(out, t, known, model, model_hash)] for batch in mine]
    pending = sum(len(b) for b in todo)
    # A trace of the U-Net step (replay.py) costs about as much as five calls save: not for short runs.
    pipe.trace_steps = sum(1 for b in todo if b) >= MIN_CALLS_TO_TRACE
    counts = {"made": 0, "skipped": sum(len(b) for b in mine) - pending, "failed": len(unseedable[rank::world])}
    part = out / f"manifest.rank{rank}.partial.jsonl"

    from tqdm.auto import tqdm

    bar = tqdm(total=pending, unit="img", disable=args.quiet or not main_process, desc="generating")
    interrupted, stop_status, write_error = False, 130, None  # 130: the status of a Ctrl-C
    generating = time.perf_counter()
    with _StopOnCtrlC() as stop:
        try:
            for batch, wanted in zip(mine, todo, strict=True):
                if not wanted:
                    continue
                if stop.requested:
                    interrupted = True
                    break
                try:
                    images = pipe(
                        [t.prompt for t in batch],
                        negative_prompt=_negatives(batch),
                        height=batch[0].height,
                        width=batch[0].width,
                        steps=batch[0].steps,
                        guidance_scale=batch[0].guidance_scale,
                        sampler=batch[0].sampler,
                        karras=batch[0].karras,
                        seed=[t.seed for t in batch],
                        progress=False,
                        workers=args.workers,
                    )
                except (ValueError, RuntimeError) as e:  # settings this model cannot do, or memory it lacks
                    if isinstance(e, RuntimeError) and not _out_of_memory(e):
                        raise
                    why = str(e) if isinstance(e, ValueError) else _memory_advice(batch, pipe.device)
                    for t in wanted:
                        print(f"{source}:{t.line}: error: {why}", file=sys.stderr)
                    counts["failed"] += len(wanted)
                    bar.update(len(wanted))
                    continue
                for t, image in zip(batch, images, strict=True):
                    if t in wanted and not args.overwrite and _taken(out, t, model, model_hash):
                        print(f"{source}:{t.line}: error: {out / t.file} {TAKEN}", file=sys.stderr)
                        counts["failed"] += 1
                        bar.update(1)
                    elif t in wanted:
                        try:
                            _save(out, part, t, image, model, model_hash, extra)
                        except OSError as e:  # a full disk, a folder made read-only: every next image would fail
                            write_error = f"cannot write {out / t.file}: {e.strerror or e}"
                            raise KeyboardInterrupt from None  # stop as an interruption does: what is written stays
                        counts["made"] += 1
                        bar.update(1)
        except KeyboardInterrupt as stop:  # a second Ctrl-C or SIGTERM: stop now; what was written is whole
            interrupted, stop_status = True, stopped_status(stop)
    bar.close()

    if state is not None and not interrupted:
        state.wait_for_everyone()
    if main_process and (world == 1 or not interrupted):
        try:
            merge_manifest(out, tasks, model, model_hash)
        except OSError:  # the parts it would merge stay, and --resume reads them
            if write_error is None:
                raise
        if args.grid and not interrupted:
            _write_grids(out, tasks)
    seconds = time.perf_counter() - started
    _summary(counts, len(errors), seconds, time.perf_counter() - generating, interrupted, rank, world, write_error)
    if write_error is not None:
        return 1
    if interrupted:
        return stop_status
    return 1 if errors or counts["failed"] else 0


# ---- planning ----------------------------------------------------------------------------------------


def resolved_defaults(pipe) -> dict[str, Any]:
    """The model's defaults with the size filled in (the native size when the folder stores none)."""
    native = getattr(pipe, "native_size", None)
    defaults = dict(pipe.defaults)
    defaults.setdefault("height", native)
    defaults.setdefault("width", native)
    return defaults


def plan(jobs: list[PromptJob], args, defaults: dict[str, Any]) -> list[Task]:
    """Every image of the run in file order: line options > command-line options > model defaults."""
    defaults = {"negative_prompt": "", "karras": False, **defaults}

    def pick(line_value, cli_value, key):
        return line_value if line_value is not None else cli_value if cli_value is not None else defaults[key]

    tasks: list[Task] = []
    for job in jobs:
        for index in range(job.images if job.images is not None else args.images_per_prompt):
            k = len(tasks)
            tasks.append(
                Task(
                    k=k,
                    line=job.line,
                    index=index,
                    prompt=job.prompt,
                    negative_prompt=job.negative_prompt if job.negative_prompt is not None else args.negative or "",
                    seed=job.seed + index if job.seed is not None else args.seed + k,
                    steps=pick(job.steps, args.steps, "steps"),
                    guidance_scale=float(pick(job.guidance_scale, args.cfg, "guidance_scale")),
                    sampler=pick(job.sampler, args.sampler, "sampler"),
                    karras=bool(pick(None, args.karras, "karras")),
                    width=pick(job.width, args.width, "width"),
                    height=pick(job.height, args.height, "height"),
                )
            )
    return tasks


def batches(tasks: list[Task], batch_size: int) -> list[list[Task]]:
    """Tasks grouped by batch key (groups in order of first appearance), cut into runs of batch_size."""
    groups: dict[tuple, list[Task]] = {}
    for t in tasks:
        groups.setdefault(t.batch_key, []).append(t)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def _out_of_memory(error: RuntimeError) -> bool:
    """torch's CUDA OutOfMemoryError, or the CPU allocator's failure (a plain RuntimeError)."""
    text = str(error)
    return type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text


def _memory_advice(batch: list[Task], device) -> str:
    size = f"{batch[0].width}x{batch[0].height}"
    return (
        f"out of memory making {len(batch)} image(s) of {size} on {device}; "
        "use a smaller --width/--height (or --w/--h on the line) or a smaller --batch-size"
    )


def _negatives(batch: list[Task]) -> list[str] | None:
    negatives = [t.negative_prompt for t in batch]
    return None if not any(negatives) else negatives  # None: exactly what the API does by default


# ---- manifest ----------------------------------------------------------------------------------------


def read_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """file -> record from OUT/manifest.jsonl, then per-rank parts (later lines win); torn lines skipped."""
    records: dict[str, dict[str, Any]] = {}
    for path in [out / MANIFEST, *sorted(out.glob("manifest.rank*.partial.jsonl"))]:
        if not path.is_file():
            continue
        for line in path.read_bytes().splitlines():  # lines one by one: a damaged one spoils only itself
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue  # a line cut short by a crash (or damaged); its image is made again
            if isinstance(record, dict) and isinstance(record.get("file"), str):
                records[record["file"]] = record
    return records


def _refuse_replacing(out: Path, tasks: list[Task], known: dict, model: str, model_hash: str | None) -> None:
    """File names follow line, index, seed and prompt, not the other settings: a rerun with other steps,
    sampler or model would silently replace the earlier run's images under the same names."""
    clashes = []
    for task in tasks:
        path = out / task.file
        if not path.is_file():
            continue
        wanted = task.manifest_record(model, model_hash)
        record = known.get(task.file) or _png_record(path)
        if record is None:
            clashes.append(f"{task.file} (not made by latentdiff generate)")
            continue
        differ = [key for key in MANIFEST_KEYS if record.get(key) != wanted[key]]
        if differ:
            key = differ[0]
            clashes.append(f"{task.file} ({key} {record.get(key)!r} there, {wanted[key]!r} in this run)")
    if clashes:
        raise UserError(
            f"{out} already holds {len(clashes)} image(s) under the names this run would write, made with other "
            f"settings, e.g. {clashes[0]}; choose another --out, or add --overwrite to replace them"
        )


TAKEN = "was written meanwhile by another run with other settings; it is kept (choose another --out)"


def _taken(out: Path, task: Task, model: str, model_hash: str | None) -> bool:
    """Another run into OUT, started at the same time, wrote this name with other settings since the plan."""
    path = out / task.file
    if not path.is_file():
        return False
    record = _png_record(path) or {}
    return {key: record.get(key) for key in MANIFEST_KEYS} != task.manifest_record(model, model_hash)


def _png_record(path: Path) -> dict[str, Any] | None:
    """The record a PNG carries (an image whose manifest line was lost), None for anything else."""
    from latentdiff.metadata import read_png_metadata

    try:
        return read_png_metadata(path)[1]
    except (OSError, ValueError, SyntaxError):  # not a PNG Pillow can read, or a damaged record
        return None


def _done(out: Path, task: Task, known: dict, model: str, model_hash: str | None) -> bool:
    record = known.get(task.file)
    return record == task.manifest_record(model, model_hash) and (out / task.file).is_file()


def merge_manifest(out: Path, tasks: list[Task], model: str, model_hash: str | None) -> None:
    """Rewrite OUT/manifest.jsonl: earlier runs' images first, then this run's in run order; drop parts.

    Another run may share OUT (two terminals, the default folder): the lock keeps its appends out of the
    gap between reading the parts and deleting them, and its merge from overwriting this one.
    """
    with _manifest_lock(out, exclusive=True):
        known = read_manifest(out)
        ours = {t.file for t in tasks}
        lines = [r for f, r in known.items() if f not in ours and (out / f).is_file()]
        lines += [known[t.file] for t in tasks if _done(out, t, known, model, model_hash)]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines)
        _write_atomically(out / MANIFEST, text.encode("utf-8"))
        for part in out.glob("manifest.rank*.partial.jsonl"):
            part.unlink(missing_ok=True)


@contextlib.contextmanager
def _manifest_lock(out: Path, exclusive: bool):
    """flock on OUT itself (no lock file left behind): appends share it, a merge holds it alone."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs sharing a folder there are not serialised
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _save(out: Path, part: Path, task: Task, image, model: str, model_hash, extra: dict) -> None:
    from latentdiff.metadata import read_record, save_png

    record = read_record(image)
    record |= {"line": task.line, "index": task.index, "file": task.file, **extra}
    save_png(image, out / task.file, record)
    # After the PNG, so a listed file is always whole; under the shared lock, so no merge deletes the part
    # between reading it and this line.
    with _manifest_lock(out, exclusive=False), open(part, "a", encoding="utf-8") as f:
        f.write(json.dumps(task.manifest_record(model, model_hash), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_atomically(path: Path, data: bytes) -> None:
    from latentdiff.atomic import atomic_file

    with atomic_file(path) as f:
        f.write(data)


def _write_grids(out: Path, tasks: list[Task]) -> None:
    """One grid per line, from the images on disk (any rank may have made them); lines with gaps skipped."""
    from PIL import Image

    from latentdiff.metadata import RECORD_KEY, save_png

    by_line: dict[int, list[Task]] = {}
    for t in tasks:
        by_line.setdefault(t.line, []).append(t)
    for line, group in by_line.items():
        paths = [out / t.file for t in group]
        if not all(p.is_file() for p in paths):
            continue
        images = []
        for path in paths:
            with Image.open(path) as image:  # closed at once: a long run's grids must not hold every file open
                images.append(image.convert("RGB"))
        cols = math.ceil(math.sqrt(len(images)))
        rows = math.ceil(len(images) / cols)
        w, h = images[0].size
        grid = Image.new("RGB", (cols * w, rows * h))
        for i, im in enumerate(images):
            grid.paste(im, ((i % cols) * w, (i // cols) * h))
        # a grid is made again from its images, each of which carries its own record: it names them
        grid.info[RECORD_KEY] = json.dumps({"grid_of": [t.file for t in group]}, ensure_ascii=False)
        save_png(grid, out / grid_filename(group[0].prompt, line))


# ---- set-up ------------------------------------------------------------------------------------------


def _read_jobs(args) -> tuple[str, list[PromptJob], list[LineError]]:
    if args.prompt_file and args.prompt:
        raise UserError("give a prompt file or -p prompts, not both")
    if args.prompt:
        jobs = [PromptJob(line=i, prompt=p) for i, p in enumerate(args.prompt, start=1) if p.strip()]
        errors = [LineError(i, "empty prompt") for i, p in enumerate(args.prompt, start=1) if not p.strip()]
        return "-p", jobs, errors
    if not args.prompt_file:
        raise UserError("give a prompt file (.txt, .jsonl, .csv) or at least one -p TEXT")
    try:
        jobs, errors = read_prompt_file(args.prompt_file)
    except PromptFileError as e:
        raise UserError(str(e)) from None
    if not jobs and not errors:  # not a success: most likely the wrong file
        raise UserError(f"{args.prompt_file} holds no prompts (only blank or # comment lines)")
    return args.prompt_file, jobs, errors


def _check_options(args) -> None:
    try:
        for field, value, name in [
            ("steps", args.steps, "--steps"),
            ("guidance_scale", args.cfg, "--cfg"),
            ("sampler", args.sampler, "--sampler"),
            ("seed", args.seed, "--seed"),
            ("width", args.width, "--width"),
            ("height", args.height, "--height"),
            ("images", args.images_per_prompt, "--images-per-prompt"),
            ("images", args.batch_size, "--batch-size"),
            ("images", args.workers, "--workers"),
        ]:
            if value is not None:
                value = check_value(field, value, name)
                if field == "sampler":
                    args.sampler = value
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.batch_size > MAX_BATCH:
        raise UserError(f"--batch-size {args.batch_size} is more than {MAX_BATCH} images in one batch; use fewer")


def _distributed_state(device: str | None):
    """accelerate's PartialState when launched with several processes; None for a plain run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # Without cpu=True accelerate falls back to one process when there is no GPU (gloo on CPU).
    return PartialState(cpu=(device or "").startswith("cpu") or not torch.cuda.is_available())


def _load_pipeline(args, state):
    import torch

    from latentdiff.devices import check_device
    from latentdiff.pipeline import LatentDiffusionPipeline

    device = args.device or (state.device if state is not None else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    try:
        device = check_device(device)  # before loading: a big model takes a while to read
    except ValueError as e:
        raise UserError(f"cannot use --device {device}: {e}") from None
    try:
        pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    except (OSError, ValueError) as e:  # ModelFolderError is a ValueError
        raise UserError(f"cannot load model: {e}") from None
    try:
        pipe.to(device=device, dtype=dtype)
    except RuntimeError as e:  # e.g. out of memory on the device
        raise UserError(f"cannot use --device {device}: {e}") from None
    if args.workers is not None:
        from latentdiff.workers import check_workers

        try:
            check_workers(args.workers, pipe.device, callback=None)
        except ValueError as e:
            raise UserError(f"--workers {args.workers}: {e}") from None
    return pipe


class _StopOnCtrlC:
    """First Ctrl-C: finish the batch in hand, then stop. Second: stop at once (KeyboardInterrupt)."""

    requested = False

    def __enter__(self):
        self._previous, self._owner = None, os.getpid()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self._owner:  # a forked worker got the terminal's Ctrl-C too: its parent decides
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after the batch in hand (Ctrl-C again to stop now)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _summary(counts, bad_lines: int, seconds: float, busy: float, interrupted: bool, rank, world, write_error=None):
    """`seconds` is the whole wall time; s/image counts only the time spent making images."""
    who = f"[rank {rank}/{world}] " if world > 1 else ""
    per_image = f", {busy / counts['made']:.2f} s/image" if counts["made"] else ""
    bad = f", {bad_lines} bad line{'s' if bad_lines != 1 else ''}" if bad_lines and rank == 0 else ""
    print(
        f"{who}made {counts['made']}, skipped {counts['skipped']}, failed {counts['failed']}{bad}; "
        f"{seconds:.1f} s{per_image}",
        file=sys.stderr,
    )
    if write_error is not None:
        print(f"{who}error: {write_error}; stopped (the images written are whole and kept)", file=sys.stderr)
        print(f"{who}make room or fix the folder, then rerun with --resume to finish", file=sys.stderr)
    elif interrupted:
        print(f"{who}interrupted: rerun with --resume to finish", file=sys.stderr)
