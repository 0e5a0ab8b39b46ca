"""Turn a training checkpoint into a model folder without resuming the run (e.g. to evaluate it mid-run).

    python -m latentdiff.training.export --model runs/init --checkpoint runs/out/checkpoint-6000 --out m6000

takes the base model the run started from (--model of train.py), puts the checkpoint's EMA weights (or,
with --no-ema or when the run had no EMA, its trained weights) into it and writes a diffusers-layout folder.
LoRA checkpoints are not handled here: their adapters need the run's LoRA settings (use train.py's final/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from latentdiff.training.errors import TrainingError


def export_checkpoint(model: str | Path, checkpoint: str | Path, out: str | Path, ema: bool = True, dtype=None) -> Path:
    """`checkpoint`: a checkpoint-N folder, or a run's output folder (its newest complete checkpoint)."""
    from latentdiff import folders
    from latentdiff.pipeline import LatentDiffusionPipeline
    from latentdiff.training import checkpoint as ckpt

    checkpoint = ckpt.resolve_resume(str(checkpoint), checkpoint, flag="--checkpoint")
    if Path(out).resolve() == Path(model).resolve():
        raise ValueError(f"--out {out} is the --model folder: writing it would replace the base model; choose another")
    folders.check_replaceable(out, folders.DEFAULTS_FILE)  # now, not after loading a big model
    source = checkpoint / "ema.safetensors"
    if not ema or not source.is_file():
        source = checkpoint / "trainable.safetensors"
    tensors = ckpt.load_tensors(source)
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    targets = {f"{name}.{key}": p for name, m in modules.items() for key, p in m.named_parameters()}
    unknown = sorted(set(tensors) - set(targets))
    if unknown:
        raise ValueError(
            f"{source} holds weights the model in {model} lacks ({unknown[:3]}...): a LoRA run or another base model"
        )
    why = ckpt.tensor_mismatch({key: targets[key] for key in tensors}, tensors)  # copy_ would broadcast some
    if why is not None:
        raise ValueError(f"{source} does not fit the model in {model} (another base model?); {why}")
    with torch.no_grad():
        for key, value in tensors.items():
            targets[key].copy_(value)
    return pipe.save_pretrained(out, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m latentdiff.training.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the base model folder the run trained from (train.py --model)")
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint-N folder, or the run's output folder (its newest checkpoint)"
    )
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--no-ema", action="store_true", help="export the raw trained weights, not their EMA")
    p.add_argument("--save-dtype", choices=["fp32", "fp16"], default="fp32")
    args = p.parse_args(argv)
    from latentdiff.cli import machine_error

    dtype = torch.float16 if args.save_dtype == "fp16" else None
    try:
        path = export_checkpoint(args.model, args.checkpoint, args.out, ema=not args.no_ema, dtype=dtype)
    except (FileNotFoundError, FileExistsError, ValueError, TrainingError) as e:  # missing, damaged, in the way
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder
        if machine_error(e) is None:
            raise
        print(f"export: error: {machine_error(e)}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
