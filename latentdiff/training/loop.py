"""The training loop: data -> VAE latents -> noised -> U-Net -> weighted MSE -> AdamW, under Accelerate."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch

from latentdiff.training import checkpoint as ckpt
from latentdiff.training import losses
from latentdiff.training.errors import NonFiniteLossError, TrainingError
from latentdiff.training.feed import Collate, batch_context, batch_latents, build_dataset, cache_latents
from latentdiff.training.models import Models, as_pipeline, export, load_models, trainable_state
from latentdiff.training.optim import build_lr_schedule, build_optimizer
from latentdiff.training.progress import nothing_left, record_step, run_summary
from latentdiff.training.sampler import ResumableBatches
from latentdiff.training.state import RunState, restore, save


# ---- one step ----------------------------------------------------------------------------------------
def all_finite(accelerator, value: torch.Tensor) -> bool:
    """True only if `value` is finite on every process (so all take the same branch)."""
    bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=accelerator.device)
    return accelerator.reduce(bad, "sum").item() == 0 if accelerator.num_processes > 1 else bad.item() == 0


# ---- the run -----------------------------------------------------------------------------------------
def train(args, log=None) -> dict:
    """Run training as `args` (the CLI's namespace) say; returns a summary. User errors raise TrainingError."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    out_dir = Path(args.output_dir)
    # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: data-parallel on CPU (gloo)
    cpu_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu_group,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
    )
    if log is None:
        from tqdm.auto import tqdm

        log = tqdm.write  # prints above the progress bar instead of through it
    say = log if accelerator.is_main_process else (lambda *a, **k: None)
    try:
        return _train(args, accelerator, out_dir, say, set_seed)
    finally:
        accelerator.end_training()
        if accelerator.num_processes == 1:  # Accelerate's state is a process-wide singleton: let main() run again
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)


def _train(args, accelerator, out_dir: Path, log, set_seed) -> dict:
    resume_dir = ckpt.prepare_output_dir(out_dir, args.resume, accelerator, log)

    # 1. models; every process starts from the same weights (and the same LoRA init)
    set_seed(args.seed)
    device = accelerator.device
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    if device.type == "cpu":
        frozen_dtype = torch.float32
    models = load_models(
        args.model,
        device,
        args.train_text_encoder,
        args.lora_rank,
        args.lora_alpha,
        args.gradient_checkpointing,
        frozen_dtype,
    )
    pipe = models.pipe
    if args.resolution is None:
        args.resolution = pipe.native_size
    if args.resolution % pipe.size_multiple:
        raise TrainingError(
            f"--resolution {args.resolution} does not fit this model: use a multiple of "
            f"{pipe.size_multiple} (e.g. {max(1, round(args.resolution / pipe.size_multiple)) * pipe.size_multiple})"
        )
    prediction_type = pipe.scheduler_config.prediction_type
    from latentdiff.schedules import alphas_cumprod

    alphas = alphas_cumprod(pipe.scheduler_config).to(device)
    if args.timestep_range is not None and args.timestep_range[1] > len(alphas):
        raise TrainingError(
            f"--timestep-range {args.timestep_range[0]} {args.timestep_range[1]} goes past this model's "
            f"{len(alphas)} training timesteps: use HI <= {len(alphas)}"
        )

    # 2. data
    dataset = build_dataset(args, accelerator, log)
    if args.cache_latents:
        if args.random_crop or args.flip:
            raise TrainingError(
                "--cache-latents encodes each image once, so it cannot be combined with "
                "--random-crop or --flip (they change the image every epoch); drop one of them"
            )
        dataset = cache_latents(dataset, models.vae, accelerator, args.batch_size, log)

    # 3. optimizer, LR schedule, EMA
    lr = args.learning_rate if args.learning_rate is not None else (1e-4 if args.lora_rank else 1e-5)
    groups = [{"params": models.trainable_parameters("unet"), "lr": lr}]
    if args.train_text_encoder:
        groups.append({"params": models.trainable_parameters("text_encoder"), "lr": args.text_encoder_lr or lr})
    optimizer = build_optimizer(groups, (args.adam_beta1, args.adam_beta2), args.adam_weight_decay, args.adam_epsilon)
    lr_schedule = build_lr_schedule(optimizer, args.lr_scheduler, args.lr_warmup_steps, args.max_steps)
    ema = None
    if args.ema is not None:
        from latentdiff.training.ema import EMA

        ema = EMA(models.trained, args.ema)

    # 4. Accelerate: DDP wrapping, mixed precision
    names = list(models.trained)
    prepared = accelerator.prepare(*[models.trained[n] for n in names], optimizer)
    wrapped, optimizer = dict(zip(names, prepared[:-1])), prepared[-1]

    # 5. resume
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + accelerator.process_index)
    state = RunState()
    if resume_dir is not None:
        state = restore(resume_dir, models, optimizer, lr_schedule, ema, generator, accelerator, args, log)
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "train", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )

    # 6. the data stream, from the resumed position
    batches = ResumableBatches(
        len(dataset),
        args.batch_size,
        args.seed,
        accelerator.process_index,
        accelerator.num_processes,
        shuffle=True,
        start=state.micro_batches,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=Collate(pipe.tokenizer),
        num_workers=args.num_workers,
        persistent_workers=args.num_workers > 0,
    )
    stream = iter(loader)

    # 7. the loop
    from tqdm.auto import tqdm

    images_per_step = args.batch_size * args.grad_accum * accelerator.num_processes
    if nothing_left(state.step, args.max_steps):
        log(nothing_left(state.step, args.max_steps))
    bar = tqdm(
        total=args.max_steps,
        initial=state.step,
        desc="training",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    start_step, t0 = state.step, time.perf_counter()
    step_time = None
    while state.step < args.max_steps:
        t_step = time.perf_counter()
        loss, grad_norm = train_step(
            args, models, wrapped, optimizer, stream, generator, alphas, prediction_type, accelerator, state
        )
        finite = loss is not None
        if finite and ema is not None:
            ema.update()
        mean_loss = record_step(state, loss, finite, lr_schedule, accelerator)
        if not finite:
            state.skipped_steps.append(state.step)
        step_time = time.perf_counter() - t_step
        if accelerator.is_main_process:
            logs = {
                "loss": mean_loss,
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": images_per_step / step_time,
            }
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
            accelerator.log({k: v for k, v in logs.items() if math.isfinite(v)}, step=state.step)
        bar.set_postfix(
            loss=f"{mean_loss:.4f}",
            img_s=f"{images_per_step / step_time:.1f}",
            lr=f"{optimizer.param_groups[0]['lr']:.2e}",
            refresh=False,
        )
        bar.update(1)
        if not finite:
            log(
                f"step {state.step}: non-finite loss or gradient, step skipped "
                f"({state.nan_in_a_row} in a row, {state.nan_skipped} in all)"
            )
            if state.nan_in_a_row >= args.max_nan_steps:
                raise NonFiniteLossError(
                    f"{state.nan_in_a_row} steps in a row had a NaN/inf loss or gradient (--max-nan-steps "
                    f"{args.max_nan_steps}); the run is diverging. Lower --learning-rate, set --max-grad-norm, or "
                    f"resume from an earlier checkpoint. No checkpoint with non-finite weights was written."
                )
        # and at the last step: a finished run always leaves one, so --resume latest finds it done
        if args.checkpoint_every and (state.step % args.checkpoint_every == 0 or state.step == args.max_steps):
            path = save(out_dir, state, models, optimizer, lr_schedule, ema, generator, accelerator, args)
            log(f"saved {path}")
        if args.validate_every and args.validation_prompts and state.step % args.validate_every == 0:
            validate(args, models, ema, accelerator, state.step, out_dir)
    bar.close()
    elapsed = time.perf_counter() - t0

    # 8. the end: final model (EMA weights when on), loss curve
    accelerator.wait_for_everyone()
    summary = run_summary(state, state.step - start_step, elapsed, images_per_step)
    if accelerator.is_main_process:
        if args.validate_every and args.validation_prompts and state.step % args.validate_every:
            validate(args, models, ema, accelerator, state.step, out_dir)
        for module in models.trained.values():
            module.eval()
        if ema is not None:
            ema.copy_to_params()
        ckpt.assert_finite(trainable_state(models), "the final model")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.save_dtype)
        with ckpt.final_write(out_dir / "final"):
            summary["final"] = str(export(models, out_dir / "final", name=out_dir.resolve().name, dtype=dtype))
        if state.losses:
            from latentdiff.training.validation import save_losses

            summary["loss_curve"] = str(save_losses(state.losses, out_dir, state.skipped_steps))
    accelerator.wait_for_everyone()
    return summary


def train_step(
    args,
    models: Models,
    wrapped: dict,
    optimizer,
    stream,
    generator,
    alphas,
    prediction_type,
    accelerator,
    state: RunState,
):
    """One optimizer step over --grad-accum micro-batches; (loss, grad norm), or (None, None) if skipped."""
    total, skip = torch.zeros((), device=accelerator.device), False
    unet = wrapped["unet"]
    text_encoder = wrapped.get("text_encoder", models.text_encoder)
    for k in range(args.grad_accum):
        batch = next(stream)
        state.micro_batches += 1
        last = k == args.grad_accum - 1
        no_sync = [accelerator.no_sync(m) for m in wrapped.values()] if not last else []
        with contextlib.ExitStack() as stack:
            for cm in no_sync:
                stack.enter_context(cm)
            with accelerator.autocast():
                latents = batch_latents(batch, models.vae, generator, accelerator.device)
                context = batch_context(batch, text_encoder, args.train_text_encoder, accelerator.device)
                loss = losses.diffusion_loss(
                    unet,
                    latents,
                    context,
                    alphas,
                    prediction_type,
                    generator,
                    args.noise_offset,
                    args.snr_gamma,
                    args.timestep_range,
                    args.v_space_loss,
                    args.timestep_range_share,
                )
            if not all_finite(accelerator, loss.detach()):
                skip = True
            if not skip:
                accelerator.backward(loss / args.grad_accum)
        total = total + loss.detach() / args.grad_accum
    grad_norm = None
    if not skip:
        max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else math.inf
        trained_params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = accelerator.clip_grad_norm_(trained_params, max_norm)
        grad_norm = float(norm) if norm is not None else None
        if accelerator.scaler is None and grad_norm is not None and not math.isfinite(grad_norm):
            skip = True
    if not skip:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (None, None) if skip else (total, grad_norm)


# ---- validation --------------------------------------------------------------------------------------
def validate(args, models: Models, ema, accelerator, step: int, out_dir: Path) -> None:
    """A grid of --validation-prompts with fixed seeds (EMA weights when on), on the main process only."""
    if not accelerator.is_main_process:
        return
    from latentdiff.training.validation import validation_grid

    modes = {n: m.training for n, m in models.trained.items()}
    view = as_pipeline(models, "validation")
    with ema.swapped_in() if ema is not None else contextlib.nullcontext(), accelerator.autocast():
        grid = validation_grid(
            view,
            args.validation_prompts,
            args.seed,
            args.validation_steps,
            args.validation_guidance_scale,
            args.resolution,
        )
    for name, m in models.trained.items():
        m.train(modes[name])
    folder = out_dir / "validation"
    folder.mkdir(exist_ok=True)
    grid.save(folder / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
