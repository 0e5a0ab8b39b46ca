"""The training loop: data -> VAE latents -> noised -> U-Net -> weighted MSE -> AdamW, under Accelerate."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from latentdiff.training import checkpoint as ckpt
from latentdiff.training import losses
from latentdiff.training.data import (
    CaptionedImages,
    DataError,
    ShapesScenes,
    bad_files_message,
    find_examples,
    parse_shapes_spec,
)
from latentdiff.training.errors import NonFiniteLossError, TrainingError
from latentdiff.training.models import Models, export, load_models, load_trainable_state, trainable_state
from latentdiff.training.optim import build_lr_schedule, build_optimizer, set_lr_for_step
from latentdiff.training.sampler import ResumableBatches


class BadFilesWarning(UserWarning):
    """Files in the data folder that were skipped (truncated, corrupt, empty, not images, too many pixels)."""


@dataclass
class RunState:
    """Everything about progress that a checkpoint must restore besides weights, optimizer and RNG."""

    step: int = 0  # optimizer steps taken (skipped non-finite steps count too)
    micro_batches: int = 0  # micro-batches consumed per process: the data position
    nan_skipped: int = 0
    nan_in_a_row: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss of each step, all processes
    skipped_steps: list[int] = field(default_factory=list)


# ---- data --------------------------------------------------------------------------------------------
def build_dataset(args, accelerator, log) -> CaptionedImages:
    """The dataset; a folder is scanned once, on the main process, and the result shared."""
    shapes_seed = parse_shapes_spec(str(args.data))
    if shapes_seed is not None:
        return ShapesScenes(args.shapes_count, args.resolution, shapes_seed, args.caption_dropout, args.seed)
    found, error = None, None
    if accelerator.is_main_process:
        try:
            found = find_examples(
                args.data,
                args.missing_captions,
                args.caption_extension,
                args.image_column,
                args.caption_column,
                args.max_image_pixels,
                workers=max(1, args.num_workers),
            )
        except DataError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        found, error = broadcast_object_list([found, error], from_process=0)
    if error is not None:
        raise DataError(error)
    if found.bad_files and accelerator.is_main_process:
        message = bad_files_message(found.bad_files, args.data)
        (Path(args.output_dir) / "skipped-files.txt").write_text(
            "".join(f"{p}\t{why}\n" for p, why in found.bad_files), encoding="utf-8"
        )
        warnings.warn(message, BadFilesWarning, stacklevel=2)
    if found.uncaptioned:
        verb = "left out" if args.missing_captions == "skip" else "trained with an empty caption"
        log(
            f"{len(found.uncaptioned)} image(s) without a caption {verb} (--missing-captions {args.missing_captions})"
        )
    log(f"data: {len(found.examples)} images from {args.data}")
    return CaptionedImages(
        found.examples,
        args.resolution,
        args.random_crop,
        args.flip,
        args.caption_dropout,
        args.seed,
        args.max_image_pixels,
    )


class CachedLatents(torch.utils.data.Dataset):
    """The dataset with each image replaced by its VAE posterior (mean, std), encoded once."""

    def __init__(self, dataset: CaptionedImages, posteriors: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.dataset, self.posteriors = dataset, posteriors

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        from latentdiff.training.data import sample_rng

        dropped = sample_rng(self.dataset.seed, epoch, index).random() < self.dataset.caption_dropout
        mean, std = self.posteriors[index]
        return {
            "index": index,
            "caption": "" if dropped else self.dataset.caption(index),
            "mean": mean,
            "std": std,
        }


@torch.no_grad()
def cache_latents(dataset: CaptionedImages, vae, accelerator, batch_size: int, log) -> CachedLatents:
    """Encode every image once (each process a share, then all share all); crops must be fixed for this."""
    from tqdm.auto import tqdm

    mine = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    posteriors = {}
    bar = tqdm(total=len(mine), desc="caching latents", disable=not accelerator.is_local_main_process)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        pixels = torch.stack([dataset.image_tensor(i) for i in chunk]).to(accelerator.device, _dtype(vae))
        post = vae.encode(pixels)
        for i, mean, std in zip(chunk, post.mean.float().cpu(), post.std.float().cpu()):
            posteriors[i] = (mean.clone(), std.clone())
        bar.update(len(chunk))
    bar.close()
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        posteriors = dict(gather_object(list(posteriors.items())))
    log(f"cached the latents of {len(posteriors)} images")
    return CachedLatents(dataset, posteriors)


class Collate:
    """Stack a batch and tokenize its captions (picklable, for DataLoader workers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        captions = [it["caption"] for it in items]
        batch = {
            "index": torch.tensor([it["index"] for it in items]),
            "input_ids": self.tokenizer(
                captions,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids,
        }
        for key in ("pixels", "mean", "std"):
            if key in items[0]:
                batch[key] = torch.stack([it[key] for it in items])
        return batch


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


# ---- one step ----------------------------------------------------------------------------------------
def batch_latents(batch: dict, vae, generator: torch.Generator, device) -> torch.Tensor:
    """z ~ q(z|x) (reparameterised, from the training generator), shifted and scaled for the U-Net."""
    if "pixels" in batch:
        with torch.no_grad():
            post = vae.encode(batch["pixels"].to(device, _dtype(vae)))
        mean, std = post.mean.float(), post.std.float()
    else:
        mean, std = batch["mean"].to(device), batch["std"].to(device)
    z = mean + std * torch.randn(mean.shape, generator=generator).to(device)
    cfg = vae.config
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def batch_context(batch: dict, text_encoder, train_text_encoder: bool, device) -> torch.Tensor:
    ids = batch["input_ids"].to(device)
    with contextlib.nullcontext() if train_text_encoder else torch.no_grad():
        return text_encoder(ids)[0].float()


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
    accelerator = Accelerator(
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


def _train(args, accelerator, out_dir: Path, log, set_seed) -> dict:
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(out_dir)
    accelerator.wait_for_everyone()

    resume_dir = ckpt.resolve_resume(args.resume, out_dir)
    if args.resume == "latest" and resume_dir is None:
        log(f"--resume latest: no checkpoint in {out_dir} yet; starting fresh")

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
        groups.append(
            {"params": models.trainable_parameters("text_encoder"), "lr": args.text_encoder_lr or lr}
        )
    optimizer = build_optimizer(
        groups, (args.adam_beta1, args.adam_beta2), args.adam_weight_decay, args.adam_epsilon
    )
    lr_schedule = build_lr_schedule(optimizer, args.lr_scheduler, args.lr_warmup_steps, args.max_steps)
    ema = None
    if args.ema is not None:
        from latentdiff.training.ema import EMA

        ema = EMA(models.trained, args.ema)

    # 4. Accelerate: DDP wrapping, mixed precision
    names = list(models.trained)
    prepared = accelerator.prepare(*[models.trained[n] for n in names], optimizer)
    wrapped, optimizer = dict(zip(names, prepared[:-1])), prepared[-1]
    trained_params = [p for g in optimizer.param_groups for p in g["params"]]

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
            args,
            models,
            wrapped,
            optimizer,
            stream,
            generator,
            alphas,
            prediction_type,
            trained_params,
            accelerator,
            state,
        )
        finite = loss is not None
        if finite:
            if ema is not None:
                ema.update()
            state.nan_in_a_row = 0
        else:
            state.nan_skipped += 1
            state.nan_in_a_row += 1
            state.skipped_steps.append(state.step + 1)
        lr_schedule.step()
        state.step += 1
        mean_loss = accelerator.reduce(loss.detach().reshape(1), "mean").item() if finite else math.nan
        state.losses.append(mean_loss)
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
        if args.checkpoint_every and state.step % args.checkpoint_every == 0:
            path = save(out_dir, state, models, optimizer, lr_schedule, ema, generator, accelerator, args)
            log(f"saved {path}")
        if args.validate_every and args.validation_prompts and state.step % args.validate_every == 0:
            validate(args, models, ema, accelerator, state.step, out_dir)
    bar.close()
    elapsed = time.perf_counter() - t0
    steps_run = state.step - start_step
    images_per_s = steps_run * images_per_step / elapsed if steps_run and elapsed > 0 else float("nan")

    # 8. the end: final model (EMA weights when on), loss curve
    accelerator.wait_for_everyone()
    summary = {
        "steps": state.step,
        "steps_this_run": steps_run,
        "seconds": elapsed,
        "images_per_s": images_per_s,
        "nan_skipped": state.nan_skipped,
        "final_loss": state.losses[-1] if state.losses else None,
    }
    if accelerator.is_main_process:
        if args.validate_every and args.validation_prompts and state.step % args.validate_every:
            validate(args, models, ema, accelerator, state.step, out_dir)
        for module in models.trained.values():
            module.eval()
        if ema is not None:
            ema.copy_to_params()
        ckpt.assert_finite(trainable_state(models), "the final model")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.save_dtype)
        summary["final"] = str(export(models, out_dir / "final", name=out_dir.resolve().name, dtype=dtype))
        if state.losses:
            from latentdiff.training.validation import save_loss_curve

            summary["loss_curve"] = str(
                save_loss_curve(state.losses, out_dir / "loss_curve.png", state.skipped_steps)
            )
            (out_dir / "losses.csv").write_text(
                "step,loss\n" + "".join(f"{i},{v}\n" for i, v in enumerate(state.losses, 1)), encoding="utf-8"
            )
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
    trained_params,
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
                )
            if not all_finite(accelerator, loss.detach()):
                skip = True
            if not skip:
                accelerator.backward(loss / args.grad_accum)
        total = total + loss.detach() / args.grad_accum
    grad_norm = None
    if not skip:
        max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else math.inf
        norm = accelerator.clip_grad_norm_(trained_params, max_norm)
        grad_norm = float(norm) if norm is not None else None
        if accelerator.scaler is None and grad_norm is not None and not math.isfinite(grad_norm):
            skip = True
    if not skip:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (None, None) if skip else (total, grad_norm)


# ---- checkpoints -------------------------------------------------------------------------------------
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


def restore(
    path: Path, models: Models, optimizer, lr_schedule, ema, generator, accelerator, args, log
) -> RunState:
    info = ckpt.load_json(path / "state.json")
    load_trainable_state(models, ckpt.load_tensors(path / "trainable.safetensors"))
    optimizer.load_state_dict(ckpt.load_torch(path / "optimizer.pt"))
    lr_schedule.load_state_dict(ckpt.load_torch(path / "lr_schedule.pt"))
    set_lr_for_step(
        optimizer, lr_schedule, info["step"]
    )  # the schedule of this run's --max-steps at that step
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
        **{
            k: info[k]
            for k in ("step", "micro_batches", "nan_skipped", "nan_in_a_row", "losses", "skipped_steps")
        }
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


# ---- validation --------------------------------------------------------------------------------------
def validate(args, models: Models, ema, accelerator, step: int, out_dir: Path) -> None:
    """A grid of --validation-prompts with fixed seeds (EMA weights when on), on the main process only."""
    if not accelerator.is_main_process:
        return
    from latentdiff.pipeline import LatentDiffusionPipeline
    from latentdiff.training.validation import validation_grid

    pipe = models.pipe
    modes = {n: m.training for n, m in models.trained.items()}
    view = LatentDiffusionPipeline(
        pipe.unet,
        pipe.vae,
        pipe.text_encoder,
        pipe.tokenizer,
        pipe.scheduler_config,
        defaults=pipe.defaults,
        name="validation",
    )
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
