"""Step bookkeeping shared by the training loops (diffusion in loop.py, autoencoder in vae_train.py)."""

from __future__ import annotations

import math


def record_step(state, loss, finite: bool, lr_schedule, accelerator) -> float:
    """Count one optimizer step (a skipped non-finite one too) and log its loss; the mean over processes."""
    if finite:
        state.nan_in_a_row = 0
    else:
        state.nan_skipped += 1
        state.nan_in_a_row += 1
    lr_schedule.step()
    state.step += 1
    mean_loss = accelerator.reduce(loss.detach().reshape(1), "mean").item() if finite else math.nan
    state.losses.append(mean_loss)
    return mean_loss


def run_summary(state, steps_run: int, elapsed: float, images_per_step: int) -> dict:
    """What a run returns: steps, time, throughput, skipped steps and the last loss."""
    return {
        "steps": state.step,
        "steps_this_run": steps_run,
        "seconds": elapsed,
        "images_per_s": steps_run * images_per_step / elapsed if steps_run and elapsed > 0 else float("nan"),
        "nan_skipped": state.nan_skipped,
        "final_loss": state.losses[-1] if state.losses else None,
    }


def nothing_left(step: int, max_steps: int) -> str | None:
    """The note for a run resumed at or past --max-steps (it only writes the model again), else None."""
    if step < max_steps:
        return None
    return f"the checkpoint is at step {step}, not below --max-steps {max_steps}: nothing to train; writing its model"


def done_text(summary: dict) -> str:
    """'done: 1 step, 12.34 images/s this run': how a finished run's last line begins."""
    steps = summary["steps"]
    return f"done: {steps} step{'' if steps == 1 else 's'}, {rate_text(summary)}"


def rate_text(summary: dict) -> str:
    """'12.34 images/s this run', or 'no steps this run' (a resumed run that was already done)."""
    if not summary.get("steps_this_run"):
        return "no steps this run"
    return f"{summary['images_per_s']:.2f} images/s this run"
