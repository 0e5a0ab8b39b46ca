"""Run state and checkpoints of a training run: what is saved at OUT/checkpoint-N and how a run resumes from it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from latentdiff.training import checkpoint as ckpt
from latentdiff.training.models import Models, load_trainable_state, trainable_state
from latentdiff.training.optim import set_lr_for_step


@dataclass
class RunState:
    """Everything about progress that a checkpoint must restore besides weights, optimizer and RNG."""

    step: int = 0  # optimizer steps taken (skipped non-finite steps count too)
    micro_batches: int = 0  # micro-batches consumed per process: the data position
    nan_skipped: int = 0
    nan_in_a_row: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss of each step, all processes
    skipped_steps: list[int] = field(default_factory=list)


def save(
    out_dir: Path, state: RunState, models: Models, optimizer, lr_schedule, ema, generator, accelerator, args
) -> Path:
    def write_shared(tmp: Path) -> None:
        weights = trainable_state(models)
        ckpt.assert_finite(weights, f"checkpoint-{state.step}")
        ckpt.save_tensors(weights, tmp / "trainable.safetensors")
        opt_state = optimizer.state_dict()
        ckpt.assert_finite(
            {f"{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items()},
            f"checkpoint-{state.step} (optimizer state)",
        )
        torch.save(opt_state, tmp / "optimizer.pt")
        torch.save(lr_schedule.state_dict(), tmp / "lr_schedule.pt")
        if ema is not None:
            ckpt.assert_finite(ema.shadow, f"checkpoint-{state.step} (EMA)")
            ckpt.save_tensors(ema.shadow, tmp / "ema.safetensors")
        info = {
            **asdict(state),
            "num_processes": accelerator.num_processes,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "max_steps": args.max_steps,
            "seed": args.seed,
            "ema_updates": ema.num_updates if ema is not None else None,
            "model": str(args.model),
            "lora_rank": args.lora_rank,
            "train_text_encoder": args.train_text_encoder,
        }
        ckpt.save_json(info, tmp / "state.json")

    path = ckpt.write_checkpoint(out_dir, state.step, accelerator, write_shared, ckpt.rng_state(generator))
    if accelerator.is_main_process:
        ckpt.prune(out_dir, args.keep_checkpoints)
    accelerator.wait_for_everyone()
    return path


def restore(path: Path, models: Models, optimizer, lr_schedule, ema, generator, accelerator, args, log) -> RunState:
    info = ckpt.load_json(path / "state.json")
    load_trainable_state(models, ckpt.load_tensors(path / "trainable.safetensors"))
    optimizer.load_state_dict(ckpt.load_torch(path / "optimizer.pt"))
    lr_schedule.load_state_dict(ckpt.load_torch(path / "lr_schedule.pt"))
    set_lr_for_step(optimizer, lr_schedule, info["step"])  # the schedule of this run's --max-steps at that step
    if ema is not None:
        shadow = path / "ema.safetensors"
        if shadow.is_file():
            ema.load_state_dict({"shadow": ckpt.load_tensors(shadow), "num_updates": info["ema_updates"]})
        else:
            log(f"{path} has no EMA weights; the EMA starts from the current weights")
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if info["num_processes"] != accelerator.num_processes or (info["batch_size"], info["grad_accum"]) != (
        args.batch_size,
        args.grad_accum,
    ):
        log(
            f"note: {path} was written by {info['num_processes']} process(es) with batch size {info['batch_size']} "
            f"x {info['grad_accum']}; this run differs, so the data order and noise will not continue exactly"
        )
    if rng_file.is_file():
        ckpt.set_rng_state(ckpt.load_torch(rng_file), generator)
    state = RunState(
        **{k: info[k] for k in ("step", "micro_batches", "nan_skipped", "nan_in_a_row", "losses", "skipped_steps")}
    )
    if info["num_processes"] != accelerator.num_processes or info["batch_size"] != args.batch_size:
        # keep the images seen so far: the new stream starts after them
        state.micro_batches = math.ceil(
            info["micro_batches"]
            * info["num_processes"]
            * info["batch_size"]
            / (accelerator.num_processes * args.batch_size)
        )
    log(f"resumed from {path} at step {state.step}")
    return state
