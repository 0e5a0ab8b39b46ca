"""`python training/train.py` (or `accelerate launch training/train.py`): the command line of a training run."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

from latentdiff.training.images import DEFAULT_MAX_PIXELS


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help only where X says something: not for a required option, a flag
    that is off, an unset (None) option, or one whose help already names its default."""

    def _get_help_string(self, action):
        help = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        if action.required or unset or "default" in help:
            return help
        return super()._get_help_string(action)


def add_data_reading(group) -> None:
    """How both training scripts read their data: the same options, the same words."""
    group.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="files with more pixels are skipped as decompression bombs",
    )
    group.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    group.add_argument("--shapes-count", type=int, default=100_000, help="distinct scenes for --data shapes")


def add_ema(group, decay: float, used_for: str) -> None:
    """--ema [DECAY] for both training scripts; `decay` when no value is given."""
    group.add_argument(
        "--ema",
        type=float,
        nargs="?",
        const=decay,
        default=None,
        metavar="DECAY",
        help=f"keep EMA weights (decay {decay:g} if no value) for {used_for}",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune a latentdiff / Stable Diffusion model folder on image-caption pairs, with Accelerate "
        "(run unchanged under `accelerate launch` for several processes, GPUs or nodes).",
        formatter_class=DefaultsHelpFormatter,
    )
    run = p.add_argument_group("run")
    run.add_argument("--model", required=True, help="diffusers-layout model folder to start from")
    run.add_argument(
        "--data",
        required=True,
        help="folder of images + same-name .txt captions, or with metadata.jsonl/.csv; "
        "or 'shapes' / 'shapes:SEED' for Shapes scenes drawn on the fly",
    )
    run.add_argument("--output-dir", required=True, help="checkpoints, logs, validation grids and final/ go here")
    run.add_argument(
        "--max-steps", type=int, default=1000, help="optimizer steps in all (a resumed run continues to it)"
    )
    run.add_argument("--batch-size", type=int, default=4, help="images per process per micro-batch")
    run.add_argument(
        "--resolution", type=int, default=None, help="square training size in pixels (default: the model's)"
    )
    run.add_argument("--seed", type=int, default=0, help="seeds the data order, noise, caption dropout and validation")
    run.add_argument("--checkpoint-every", type=int, default=0, help="write OUT/checkpoint-N every N steps (0: never)")
    run.add_argument("--keep-checkpoints", type=int, default=None, help="keep only the newest K checkpoints")
    run.add_argument(
        "--resume",
        default=None,
        help="'latest' (newest in --output-dir; fresh if none) or a checkpoint folder",
    )

    data = p.add_argument_group("data")
    data.add_argument("--caption-extension", default=".txt", help="extension of the same-name caption files")
    data.add_argument("--image-column", default="file_name", help="metadata column naming the image file")
    data.add_argument("--caption-column", default="text", help="metadata column holding the caption")
    data.add_argument(
        "--missing-captions",
        choices=["error", "skip", "empty"],
        default="error",
        help="images without a caption: stop and name them, leave them out, or train them with ''",
    )
    data.add_argument("--random-crop", action="store_true", help="random instead of centre crops")
    data.add_argument("--flip", action="store_true", help="random horizontal flips (breaks left/right captions)")
    data.add_argument(
        "--caption-dropout",
        type=float,
        default=0.1,
        help="probability of training with the empty caption (needed for classifier-free guidance)",
    )
    data.add_argument("--cache-latents", action="store_true", help="encode each image once with the frozen VAE")
    add_data_reading(data)
    data.add_argument(
        "--shapes-mix",
        default=None,
        metavar="CATEGORY=WEIGHT,...",
        help="relative frequency of Shapes scene categories (single, counting, two_objects, position; "
        "unnamed ones weigh 1), e.g. position=3 for more relations; default: all equal",
    )

    model = p.add_argument_group("what trains")
    model.add_argument("--train-text-encoder", action="store_true", help="train the text encoder too")
    model.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="train LoRA adapters of this rank on the attention projections instead (merged on export)",
    )
    model.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: the rank)")
    model.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    model.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default="no",
        help="Accelerate's autocast dtype; the frozen modules are kept in it",
    )

    opt = p.add_argument_group("optimization")
    opt.add_argument("--learning-rate", type=float, default=None, help="default 1e-5, or 1e-4 with --lora-rank")
    opt.add_argument("--text-encoder-lr", type=float, default=None, help="default: --learning-rate")
    opt.add_argument(
        "--lr-scheduler",
        choices=["constant", "cosine"],
        default="constant",
        help="after warm-up; cosine decays to 0 at --max-steps",
    )
    opt.add_argument("--lr-warmup-steps", type=int, default=0, help="steps of linear warm-up from 0")
    opt.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW's beta1")
    opt.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW's beta2")
    opt.add_argument("--adam-weight-decay", type=float, default=1e-2, help="AdamW's decoupled weight decay")
    opt.add_argument("--adam-epsilon", type=float, default=1e-8, help="AdamW's epsilon")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: off)")
    add_ema(opt, 0.9999, "validation and export")
    opt.add_argument("--snr-gamma", type=float, default=None, help="min-SNR-gamma loss weighting (5.0 is usual)")
    opt.add_argument(
        "--v-space-loss",
        action="store_true",
        help="weigh every noise level as a v-prediction loss would (x0 weight SNR+1), whatever the model predicts",
    )
    opt.add_argument(
        "--noise-offset",
        type=float,
        default=0.0,
        help="add this times a random per-channel constant to the noise (offset noise: lets flat dark or light "
        "backgrounds be learnt)",
    )
    opt.add_argument(
        "--timestep-range",
        type=int,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="train only on noise levels LO <= t < HI (of the scheduler's T; e.g. 700 1000 for the layout)",
    )
    opt.add_argument(
        "--timestep-range-share",
        type=float,
        default=1.0,
        metavar="P",
        help="draw only this fraction of the noise levels from --timestep-range, the rest from all of T "
        "(e.g. 0.5: the range emphasised, the other steps still trained)",
    )
    opt.add_argument("--max-nan-steps", type=int, default=5, help="stop after this many NaN/inf steps in a row")

    out = p.add_argument_group("output")
    out.add_argument(
        "--validate-every", type=int, default=0, help="sample --validation-prompts every N steps (0: never)"
    )
    out.add_argument(
        "--validation-prompts", nargs="*", default=[], metavar="PROMPT", help="prompts of the validation grids"
    )
    out.add_argument("--validation-steps", type=int, default=20, help="sampling steps for validation grids")
    out.add_argument("--validation-guidance-scale", type=float, default=None, help="default: the model's")
    out.add_argument(
        "--report-to",
        choices=["tensorboard", "none"],
        default="tensorboard",
        help="TensorBoard logs (loss, learning rate) in OUT/logs",
    )
    out.add_argument("--save-dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of final/")
    return p


def check_numbers(p: argparse.ArgumentParser, args: argparse.Namespace, positive=(), non_negative=(), below_one=()):
    """Real-valued options (None: not given) must be finite and in their range, else a usage error naming them.

    A negative learning rate or a NaN clip norm would otherwise run, and train nonsense, without a word.
    """
    ranges = [(positive, "a positive number", lambda v: v > 0), (non_negative, "a number >= 0", lambda v: v >= 0)]
    ranges.append((below_one, "in [0, 1)", lambda v: 0 <= v < 1))
    for names, wanted, ok in ranges:
        for name in names:
            value = getattr(args, name)
            if value is not None and not (math.isfinite(value) and ok(value)):
                p.error(f"--{name.replace('_', '-')} must be {wanted}, got {value}")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = ["max_steps", "batch_size", "grad_accum", "max_nan_steps", "validation_steps", "shapes_count"]
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("checkpoint_every", "validate_every", "lr_warmup_steps", "num_workers"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    if args.keep_checkpoints is not None and args.keep_checkpoints < 1:
        p.error("--keep-checkpoints must be at least 1")
    check_numbers(
        p,
        args,
        positive=("learning_rate", "text_encoder_lr", "adam_epsilon", "snr_gamma"),
        non_negative=("adam_weight_decay", "max_grad_norm", "noise_offset"),
        below_one=("adam_beta1", "adam_beta2"),
    )
    if args.resolution is not None and args.resolution < 1:
        p.error("--resolution must be positive")
    if not 0.0 <= args.caption_dropout <= 1.0:
        p.error(f"--caption-dropout must be in [0, 1], got {args.caption_dropout}")
    if args.lora_rank is not None and args.lora_rank < 1:
        p.error("--lora-rank must be at least 1")
    if args.ema is not None and not 0.0 < args.ema < 1.0:
        p.error(f"--ema decay must be in (0, 1), got {args.ema}")
    if args.shapes_mix is not None:
        from latentdiff.training.data import DataError, parse_shapes_mix, parse_shapes_spec

        try:
            is_shapes = parse_shapes_spec(str(args.data)) is not None
            parse_shapes_mix(args.shapes_mix)
        except DataError as e:
            p.error(str(e))
        if not is_shapes:
            p.error(f"--shapes-mix weighs Shapes scenes; it needs --data shapes or shapes:SEED, not {args.data!r}")
    if args.v_space_loss and args.snr_gamma is not None:
        p.error("--v-space-loss and --snr-gamma are two loss weightings; choose one")
    if args.timestep_range is not None and not 0 <= args.timestep_range[0] < args.timestep_range[1]:
        p.error(f"--timestep-range LO HI needs 0 <= LO < HI, got {' '.join(map(str, args.timestep_range))}")
    if not 0.0 < args.timestep_range_share <= 1.0:
        p.error(f"--timestep-range-share must be in (0, 1], got {args.timestep_range_share}")
    if args.timestep_range_share < 1.0 and args.timestep_range is None:
        p.error("--timestep-range-share needs --timestep-range LO HI (the band it emphasises)")
    if args.validate_every and not args.validation_prompts:
        p.error("--validate-every needs --validation-prompts")
    check_companions(
        p,
        args,
        validation_prompts="validate_every",
        text_encoder_lr="train_text_encoder",
        lora_alpha="lora_rank",
        keep_checkpoints="checkpoint_every",
    )


def check_companions(p: argparse.ArgumentParser, args: argparse.Namespace, **needs: str) -> None:
    """Options that do nothing without another (name=companion): a usage error, not a silently ignored flag."""
    for name, companion in needs.items():
        if getattr(args, name) not in (None, []) and not getattr(args, companion):
            flag, needed = (f"--{n.replace('_', '-')}" for n in (name, companion))
            p.error(f"{flag} does nothing without {needed}; add that or leave it out")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if argv is None:  # a real command line: maybe `accelerate launch --cpu --num_processes N`
        from latentdiff.training.launch import relaunch, requested_cpu_processes

        n = requested_cpu_processes()
        if n > 1:
            return relaunch(n, sys.argv[0], sys.argv[1:])

    from latentdiff.training.loop import train
    from latentdiff.training.progress import done_text

    summary, status = run_reporting(train, args)
    if status:
        return status
    if summary.get("final"):
        print(f"{done_text(summary)}, {summary['nan_skipped']} non-finite steps skipped; model in {summary['final']}")
    return 0


def run_reporting(train_fn, args, user_errors: tuple[type[Exception], ...] = ()) -> tuple[dict, int]:
    """(train_fn(args), 0); or ({}, exit status) with one line on stderr, not a traceback, for a user's mistake
    (TrainingError, `user_errors`), a full disk and the like, or Ctrl-C / SIGTERM (status 130 / 143, naming
    what is kept)."""
    from latentdiff.cli import stop_on_sigterm, stopped_status

    with stop_on_sigterm():  # around the report too: a second SIGTERM must not cut it short
        try:
            return _reporting(train_fn, args, user_errors)
        except KeyboardInterrupt as stop:  # one that came while another outcome was being reported
            return {}, stopped_status(stop)


def _reporting(train_fn, args, user_errors: tuple[type[Exception], ...]) -> tuple[dict, int]:
    from latentdiff.cli import machine_error, one_line_warnings, stopped_status
    from latentdiff.training import checkpoint as ckpt
    from latentdiff.training.errors import TrainingError

    fresh, finished = not os.path.lexists(args.output_dir), False
    try:
        with one_line_warnings(""):
            summary = train_fn(args)
        finished = True
        return summary, 0
    except (TrainingError, *user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:  # a full disk while writing logs, grids or losses
        if machine_error(e) is None:
            raise
        print(f"error: {machine_error(e)}", file=sys.stderr)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (kill, a job scheduler): 130 or 143
        found = ckpt.complete_checkpoints(args.output_dir)
        kept = (
            f"{found[-1][1]} is the newest complete checkpoint: carry on with --resume latest"
            if found
            else "no checkpoint was written yet (--checkpoint-every sets how often)"
        )
        print(f"interrupted; {kept}", file=sys.stderr)
        return {}, stopped_status(stop)
    finally:
        if fresh and not finished:  # a folder this run made and left empty (a bad --model, say) is not kept
            with contextlib.suppress(OSError):
                os.rmdir(args.output_dir)
    return {}, 1
