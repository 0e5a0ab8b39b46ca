"""Training checkpoints: OUT/checkpoint-N/ written atomically, found again for --resume, pruned to --keep-checkpoints.

A checkpoint is written into a hidden temporary folder, marked complete there with the COMPLETE file once
every process has written its part, and renamed into place: `checkpoint-N` appears whole or not at all. A
folder without the marker (left by older versions) is never resumed from or counted.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latentdiff.training.errors import TrainingError

MARKER = "COMPLETE"
NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(TrainingError):
    """A checkpoint that is missing, incomplete, or does not fit this run."""


# ---- finding ---------------------------------------------------------------------------------------------
def complete_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in `out_dir`, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for path in out_dir.iterdir():
        match = NAME.match(path.name)
        if match and path.is_dir() and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str | None, out_dir: str | Path, flag: str = "--resume") -> Path | None:
    """The checkpoint folder --resume names; None for 'latest' with none yet (the caller starts fresh)."""
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(out_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"{flag} {resume}: no such checkpoint folder")
    if not (path / MARKER).is_file():
        inside = complete_checkpoints(path)  # an output folder: take its newest checkpoint
        if inside:
            return inside[-1][1]
        raise CheckpointError(
            f"{flag} {resume}: not a complete checkpoint (no {MARKER} marker; it was interrupted while "
            f"being written) nor a run folder holding one; name an older checkpoint-N folder"
        )
    return path


# ---- writing ---------------------------------------------------------------------------------------------
def assert_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = [
        k for k, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()
    ]
    if bad:
        raise TrainingError(f"refusing to save {what}: non-finite values in {bad[:5]}{' ...' if len(bad) > 5 else ''}")


def rng_state(generator: torch.Generator) -> dict:
    """Every random state of this process (python, numpy, torch CPU/CUDA) and the training generator."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def write_checkpoint(out_dir: Path, step: int, accelerator, write_shared, rng: dict) -> Path | None:
    """Write OUT/checkpoint-`step`; every process adds its RNG state, the main process `write_shared(tmp)`."""
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        torch.save(rng, tmp / f"rng-{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            write_shared(tmp)
            # marked here, inside what every process learns about: the folder is renamed into place only once
            # all have written their part, and dropped whole otherwise
            (tmp / MARKER).write_text(f"step {step}\n")
    except BaseException as e:  # noqa: B036 - the others must not wait forever at the barrier below
        error = e
    # every process learns whether any failed (a collective, so also the barrier): the main one must not
    # mark a checkpoint complete that lacks another process's RNG state, and none may run on alone
    failed = accelerator.reduce(torch.tensor(int(error is not None), device=accelerator.device), reduction="sum")
    if int(failed) > 0:
        reason = write_failure(error, out_dir) if error is not None else None  # before the clean-up frees space
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise CheckpointError(
                f"cannot write checkpoint-{step} in {out_dir}: another process failed to write its part (its "
                "own error says why); the complete checkpoints before it are kept: carry on with --resume latest"
            )
        if reason is None:
            raise error
        raise CheckpointError(
            f"cannot write checkpoint-{step} in {out_dir} ({reason}); the complete checkpoints before it are "
            "kept: make room, then carry on with --resume latest"
        ) from None
    if accelerator.is_main_process:
        if final.exists():  # a re-run over an old checkpoint of the same step: move it aside first
            old = out_dir / f".checkpoint-{step}.old"  # put back by the next start if stopped in between
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def write_failure(error: BaseException, folder: Path) -> str | None:
    """Why writing under `folder` failed, when `error` is a failed write (a full disk, no permission); else None.

    Besides OSError, the writers report short writes their own way: torch.save's zip writer and safetensors
    raise RuntimeError / SafetensorError.
    """
    text = str(error)
    if isinstance(error, OSError):
        return error.strerror or text
    if "No space left on device" in text:  # safetensors' I/O error names its cause
        return "no space left on its disk"
    if not (
        (isinstance(error, RuntimeError) and ("PytorchStreamWriter" in text or "unexpected pos" in text))
        or (isinstance(error, SafetensorError) and "I/O error" in text)
    ):
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return text
    return f"{free / 2**20:.0f} MiB free on its disk" if free < 2**30 else text


@contextmanager
def final_write(target: Path):
    """Around writing a run's result: a failed write becomes a CheckpointError saying what to do."""
    try:
        yield
    except Exception as e:  # only write failures become a message; anything else is re-raised as it was
        reason = write_failure(e, target.parent)
        if reason is None:
            raise
        raise CheckpointError(
            f"cannot write {target} ({reason}); any complete checkpoints are kept: make room, then run again "
            "with --resume latest"
        ) from None


def prune(out_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (call only after a new one is complete)."""
    if not keep or keep <= 0:
        return []
    found = complete_checkpoints(out_dir)
    removed = []
    for _, path in found[:-keep]:
        (path / MARKER).unlink()  # unmark first: a half-deleted folder must never look complete
        shutil.rmtree(path)
        removed.append(path)
    return removed


def remove_stale_temporaries(out_dir: str | Path) -> None:
    """Temporary folders left by a run that was killed while writing a checkpoint; an earlier checkpoint it
    had moved aside to write the same step again is put back when the new one did not take its place."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    for path in out_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)
    for old in out_dir.glob(".checkpoint-*.old"):
        final = out_dir / old.name[1 : -len(".old")]
        if (old / MARKER).is_file() and not (final / MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)


def prepare_output_dir(out_dir: Path, resume: str | None, accelerator, log, product: str = "final") -> Path | None:
    """Create `out_dir`, clear a killed run's temporaries (main process); the checkpoint to resume from, or None.

    A fresh start is refused where an earlier run left checkpoints or its model (`out_dir/product`): it
    would overwrite them, and --keep-checkpoints would then prune the new run's checkpoints for the old.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"--output-dir {out_dir} is a file, not a folder; choose another --output-dir")
    try:  # on every process, so that all of them stop on a bad folder instead of waiting for the main one
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot use --output-dir {out_dir}: {e.strerror or e}") from None
    if accelerator.is_main_process:
        remove_stale_temporaries(out_dir)
    accelerator.wait_for_everyone()
    resume_dir = resolve_resume(resume, out_dir)
    if resume_dir is None:
        _refuse_earlier_run(out_dir, product, resume)
    if resume == "latest" and resume_dir is None:
        log(f"--resume latest: no checkpoint in {out_dir} yet; starting fresh")
    return resume_dir


def _refuse_earlier_run(out_dir: Path, product: str, resume: str | None) -> None:
    checkpoints = [path.name for _, path in complete_checkpoints(out_dir)]
    if checkpoints:  # only without --resume: `latest` would have found them
        raise TrainingError(
            f"--output-dir {out_dir} already holds a run ({checkpoints[-1]}, {len(checkpoints)} checkpoint(s) in "
            "all), which a fresh start would overwrite; continue it with --resume latest, or choose another "
            "--output-dir"
        )
    if (out_dir / product).exists():
        how = "" if resume else "--resume latest has nothing to continue from either; "
        raise TrainingError(
            f"--output-dir {out_dir} already holds the model of a finished run ({out_dir / product}) and no "
            f"checkpoint, so a new run would overwrite it; {how}choose another --output-dir, or delete "
            f"{out_dir / product} to train again"
        )


def tensor_mismatch(own: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> str | None:
    """Why a checkpoint's `stored` tensors cannot be copied into this run's `own` (names, then shapes), or None."""
    extra, missing = sorted(set(stored) - set(own)), sorted(set(own) - set(stored))
    if extra or missing:
        return f"only in checkpoint: {extra[:3]}, only in this run: {missing[:3]}"
    wrong = [key for key in own if own[key].shape != stored[key].shape]
    if wrong:
        key = wrong[0]
        return (
            f"{len(wrong)} tensor(s) of another shape, e.g. {key}: {tuple(stored[key].shape)} in the checkpoint, "
            f"{tuple(own[key].shape)} in this run"
        )
    return None


# ---- the files of one checkpoint -------------------------------------------------------------------------
def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return _load(path, lambda p: load_file(str(p)))


def save_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def load_json(path: Path) -> dict:
    return _load(path, lambda p: json.loads(p.read_text(encoding="utf-8")))


def load_torch(path: Path):
    return _load(path, lambda p: torch.load(p, map_location="cpu", weights_only=True))


def _load(path: Path, read):
    """read(path), or a CheckpointError that names the file and the way out (no traceback)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return read(path)
    except Exception as e:  # each reader (safetensors, JSON, torch's restricted unpickler) raises its own kinds
        # torch's own message advises weights_only=False, i.e. running whatever the file holds: not repeated
        why = "torch's safe loader refused it" if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(
            f"checkpoint file {path} cannot be read ({why}); it is damaged or was not written by latentdiff: "
            f"delete {path.parent} and resume from the checkpoint before it"
        ) from None
