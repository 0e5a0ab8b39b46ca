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
