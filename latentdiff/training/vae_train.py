"""Train the autoencoder (KL-regularised VAE, Rombach et al. 2022 sec. 3) from scratch, under Accelerate.

    python training/train_vae.py --config training/recipes/default/recipe.json --data shapes \
        --output-dir runs/vae --max-steps 3000 --batch-size 16

Loss per image, all terms means over pixels so the weights do not depend on the resolution:

    L = |x - x^|_1 + edge_weight * (|dx x - dx x^|_1 + |dy x - dy x^|_1)
        + kl_weight * KL(q(z|x) || N(0, I)) / numel(x)

With `--foreground-weight W` the first term is a weighted mean instead: pixels whose colour is off the
image's median (the background, on flat-background data such as Shapes) count 1 + W times, so a small shape
the decoder drops costs more than the few pixels it covers (the fix for faint shapes on gray, recipe Part 6).

The KL is divided by the number of pixel values, as LDM's weight of ~1e-6 is relative to a per-pixel
reconstruction sum. Why the edge term: Shapes images are flat colour fields whose information is almost all
in the edges. A plain pixel loss is satisfied by a slightly blurred edge (few pixels are wrong); an L1 on
finite differences puts the whole loss of a blurred or shifted edge on exactly those pixels, so edges stay
crisp. LDM keeps edges sharp with LPIPS + a patch GAN instead; LPIPS needs pretrained VGG weights (we have
none offline) and a GAN discriminator doubles the cost on 2 CPU cores and is unstable without tuning, while
the gradient loss is free, deterministic and has no second network.

Decoder fine-tuning (`--init VAE_FOLDER --decoder-only`): start from a trained VAE and train only the decoder
(post_quant_conv + decoder), the encoder frozen. The latents of every image stay exactly as they were, so a
U-Net already trained on them stays valid and sees sharper images (what SD's "ft-MSE" VAE did); the
scaling factor is kept from the init for the same reason.

After training, OUT/vae/ holds config.json + diffusion_pytorch_model.safetensors (diffusers' AutoencoderKL
layout), with scaling_factor = 1 / std of the latents of held-out images, as SD chose its 0.18215.
Checkpoints (OUT/checkpoint-N/) and --resume use latentdiff.training.checkpoint, like training/train.py.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from latentdiff.training import checkpoint as ckpt
from latentdiff.training.cli import (
    DefaultsHelpFormatter,
    add_data_reading,
    add_ema,
    check_companions,
    check_numbers,
    run_reporting,
)
from latentdiff.training.errors import NonFiniteLossError, TrainingError
from latentdiff.training.progress import done_text


# ---- loss --------------------------------------------------------------------------------------------
def edge_l1(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between horizontal and vertical finite differences (image gradients) of the two images."""
    dx = F.l1_loss(recon[..., :, 1:] - recon[..., :, :-1], target[..., :, 1:] - target[..., :, :-1])
    dy = F.l1_loss(recon[..., 1:, :] - recon[..., :-1, :], target[..., 1:, :] - target[..., :-1, :])
    return dx + dy


def foreground_mask(target: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(B, 1, H, W) True where a pixel's colour is off its image's background (the per-channel median).

    Meant for flat backgrounds (Shapes); on a photograph it marks whatever is far from the median colour.
    """
    background = target.flatten(2).median(dim=2).values[..., None, None]
    return (target - background).abs().amax(dim=1, keepdim=True) > threshold


def weighted_l1(recon: torch.Tensor, target: torch.Tensor, foreground_weight: float) -> torch.Tensor:
    """L1 with foreground pixels counted 1 + foreground_weight times, normalised to a weighted mean."""
    if not foreground_weight:
        return F.l1_loss(recon, target)
    w = 1.0 + foreground_weight * foreground_mask(target).to(recon.dtype)
    return ((recon - target).abs() * w).sum() / (w.sum() * recon.shape[1])


def vae_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    posterior,
    kl_weight: float,
    edge_weight: float,
    foreground_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss and its parts (for logs)."""
    rec = weighted_l1(recon, target, foreground_weight)
    edge = edge_l1(recon, target) if edge_weight else recon.new_zeros(())
    kl = posterior.kl().mean() / target[0].numel()
    total = rec + edge_weight * edge + kl_weight * kl
    return total, {"rec": rec.item(), "edge": edge.item(), "kl": kl.item()}


# ---- data --------------------------------------------------------------------------------------------
def build_dataset(data: str, resolution: int, seed: int, shapes_count: int, max_pixels: int, log=print, skip=None):
    """Shapes scenes drawn on the fly ('shapes', 'shapes:SEED') or an image folder (captions not needed)."""
    from latentdiff.training.data import (
        CaptionedImages,
        ShapesScenes,
        bad_files_message,
        find_examples,
        parse_shapes_spec,
    )

    shapes_seed = parse_shapes_spec(str(data))
    if shapes_seed is not None:
        return ShapesScenes(shapes_count, resolution, shapes_seed, caption_dropout=0.0, seed=seed)
    found = find_examples(data, missing_captions="empty", caption_column=None, max_pixels=max_pixels, skip=skip)
    if found.bad_files:
        log(f"warning: {bad_files_message(found.bad_files, data)}")
    log(f"data: {len(found.examples)} images from {data}")
    return CaptionedImages(found.examples, resolution, seed=seed, max_pixels=max_pixels)


def collate_pixels(items: list[dict]) -> torch.Tensor:
    return torch.stack([item["pixels"] for item in items])


# ---- the run -----------------------------------------------------------------------------------------
@dataclass
class VAERunState:
    step: int = 0
    micro_batches: int = 0  # batches consumed per process: the data position
    nan_skipped: int = 0
    nan_in_a_row: int = 0
    losses: list[float] = field(default_factory=list)


def load_vae_config(path: str | Path | None):
    """VAEConfig from a JSON file: an AutoencoderKL config.json, or a recipe with a "vae" section."""
    from latentdiff.config import read_json
    from latentdiff.vae import VAEConfig

    if path is None:
        return VAEConfig(
            block_out_channels=(32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=16,
            sample_size=64,
        )
    d = read_json(path)
    d = d.get("vae", d)
    return VAEConfig.from_dict({k: v for k, v in d.items() if k != "scaling_factor"})


def train_vae(args, log=print) -> dict:
    """Run VAE training as `args` (train_vae.py's namespace) say; returns a summary."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from latentdiff.training.optim import build_lr_schedule, build_optimizer
    from latentdiff.training.progress import nothing_left, record_step, run_summary
    from latentdiff.training.sampler import ResumableBatches

    out_dir = Path(args.output_dir)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    say = log if accelerator.is_main_process else (lambda *a, **k: None)
    resume_dir = ckpt.prepare_output_dir(out_dir, args.resume, accelerator, say, product="vae")

    # 1. model, optimizer, schedule, EMA: the same on every process
    set_seed(args.seed)
    vae = _initial_vae(args).to(accelerator.device).train()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % factor:
        raise TrainingError(f"--resolution {args.resolution} must be a multiple of the VAE's factor {factor}")
    if args.decoder_only:
        frozen = [vae.encoder] + ([vae.quant_conv] if vae.quant_conv is not None else [])
        for module in frozen:
            module.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    optimizer = build_optimizer([{"params": trained, "lr": args.learning_rate}])
    lr_schedule = build_lr_schedule(optimizer, args.lr_scheduler, args.lr_warmup_steps, args.max_steps)
    ema = None
    if args.ema is not None:
        from latentdiff.training.ema import EMA

        ema = EMA({"vae": vae}, args.ema)
    wrapped, optimizer = accelerator.prepare(vae, optimizer)

    # 2. resume: weights, optimizer, schedule, EMA, RNG, step and data position
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + accelerator.process_index)
    state = VAERunState()
    if resume_dir is not None:
        state = _restore(resume_dir, vae, optimizer, lr_schedule, ema, generator, accelerator, args)
        say(f"resumed from {resume_dir} at step {state.step}")

    # 3. data
    dataset = build_dataset(
        args.data, args.resolution, args.seed, args.shapes_count, args.max_image_pixels, say, skip=out_dir
    )
    batches = ResumableBatches(
        len(dataset),
        args.batch_size,
        args.seed,
        accelerator.process_index,
        accelerator.num_processes,
        start=state.micro_batches,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate_pixels, num_workers=args.num_workers
    )
    stream = iter(loader)
    held_out = _held_out_pixels(args, dataset)

    # 4. the loop
    from tqdm.auto import tqdm

    if nothing_left(state.step, args.max_steps):
        say(nothing_left(state.step, args.max_steps))
    bar = tqdm(
        total=args.max_steps,
        initial=state.step,
        desc="training VAE",
        disable=not accelerator.is_local_main_process,
    )
    images_per_step = args.batch_size * accelerator.num_processes
    start_step, t0 = state.step, time.perf_counter()
    while state.step < args.max_steps:
        t_step = time.perf_counter()
        pixels = next(stream).to(accelerator.device)
        state.micro_batches += 1
        with accelerator.autocast():
            recon, posterior = wrapped(pixels, sample_posterior=True, generator=generator)
            loss, parts = vae_loss(
                recon.float(), pixels, posterior, args.kl_weight, args.edge_weight, args.foreground_weight
            )
        finite = bool(torch.isfinite(loss))
        if finite:
            accelerator.backward(loss)
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(trained, args.max_grad_norm)
            finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in trained)
        if finite:
            optimizer.step()
            if ema is not None:
                ema.update()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = record_step(state, loss, finite, lr_schedule, accelerator)
        bar.set_postfix(
            loss=f"{mean_loss:.4f}",
            rec=f"{parts['rec']:.4f}",
            img_s=f"{images_per_step / (time.perf_counter() - t_step):.1f}",
            refresh=False,
        )
        bar.update(1)
        if state.nan_in_a_row >= args.max_nan_steps:
            raise NonFiniteLossError(
                f"{state.nan_in_a_row} steps in a row had a NaN/inf loss or gradient; lower --learning-rate "
                "or resume from an earlier checkpoint"
            )
        # and at the last step: a finished run always leaves one, so --resume latest finds it done
        if args.checkpoint_every and (state.step % args.checkpoint_every == 0 or state.step == args.max_steps):
            path = _save(out_dir, state, vae, optimizer, lr_schedule, ema, generator, accelerator, args)
            say(f"saved {path}")
        if args.validate_every and state.step % args.validate_every == 0 and accelerator.is_main_process:
            _reconstruction_grid(vae, ema, held_out, out_dir / "validation" / f"recon-{state.step:06d}.png")
    bar.close()
    elapsed = time.perf_counter() - t0

    # 5. export: EMA weights when on, scaling factor from held-out latents
    summary = run_summary(state, state.step - start_step, elapsed, images_per_step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vae.eval()
        if ema is not None:
            ema.copy_to_params()
        ckpt.assert_finite(dict(vae.state_dict()), "the final VAE")
        if not args.decoder_only:  # frozen encoder: same latents, so the U-Net's scaling factor stays
            vae.config.scaling_factor = latent_scaling_factor(
                vae, held_out, generator=torch.Generator().manual_seed(args.seed)
            )
        summary["scaling_factor"] = vae.config.scaling_factor
        summary["reconstruction_l1"] = reconstruction_error(vae, held_out)
        with ckpt.final_write(out_dir / "vae"):
            summary["vae"] = str(save_vae(vae, out_dir / "vae"))
        _reconstruction_grid(vae, None, held_out, out_dir / "reconstructions.png")
        if state.losses:
            from latentdiff.training.validation import save_losses

            save_losses(state.losses, out_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _initial_vae(args):
    """A fresh VAE from --config, or the trained one in --init (its own config, weights and scaling factor)."""
    from latentdiff.vae import VAE

    if args.init is None:
        config = load_vae_config(args.config)
        config.sample_size = args.resolution
        return VAE(config)
    from latentdiff.training.scratch import load_vae

    return load_vae(args.init).float()


def _held_out_pixels(args, dataset) -> torch.Tensor:
    """Images for scaling factor, error and grids: Shapes scenes of another seed, else the first images."""
    from latentdiff.training.data import ShapesScenes, parse_shapes_spec

    n = args.scale_samples
    if parse_shapes_spec(str(args.data)) is not None:
        dataset = ShapesScenes(n, args.resolution, scene_seed=10_000_019 + args.seed)
    idx = range(min(n, len(dataset)))
    return torch.stack([dataset.image_tensor(i) for i in idx])


@torch.no_grad()
def latent_scaling_factor(vae, pixels: torch.Tensor, batch_size: int = 64, generator=None) -> float:
    """1 / std of posterior samples z over `pixels` (Rombach et al. 2022, sec. G: unit-variance latents)."""
    zs = [
        vae.encode(pixels[i : i + batch_size].to(next(vae.parameters()).device)).sample(generator).float().cpu()
        for i in range(0, len(pixels), batch_size)
    ]
    z = torch.cat(zs)
    shift = vae.config.shift_factor or 0.0
    return float(1.0 / (z - shift).std())


@torch.no_grad()
def reconstruction_error(vae, pixels: torch.Tensor, batch_size: int = 64) -> float:
    """Mean absolute error in [-1, 1] units of decode(mean) against the images."""
    device = next(vae.parameters()).device
    total = 0.0
    for i in range(0, len(pixels), batch_size):
        x = pixels[i : i + batch_size].to(device)
        total += (vae(x)[0].float() - x).abs().sum().item()
    return total / pixels.numel()


def save_vae(vae, folder: str | Path) -> Path:
    """config.json + diffusion_pytorch_model.safetensors, read by our VAE and diffusers' AutoencoderKL."""
    from latentdiff import folders
    from latentdiff.config import write_json

    folder = Path(folder)

    def write(tmp: Path) -> None:
        write_json(tmp / "config.json", vae.config.to_dict())
        folders.save_weights(vae, tmp / "diffusion_pytorch_model.safetensors", None)

    return folders.write_folder_atomically(folder, write, marker="config.json")


@torch.no_grad()
def _reconstruction_grid(vae, ema, pixels: torch.Tensor, path: Path, count: int = 8) -> None:
    """Originals (top row) over reconstructions (bottom row)."""
    import contextlib

    from PIL import Image

    from latentdiff.training.validation import image_grid

    was_training = vae.training
    vae.eval()
    with ema.swapped_in() if ema is not None else contextlib.nullcontext():
        x = pixels[:count].to(next(vae.parameters()).device)
        recon = vae(x)[0].float()
    vae.train(was_training)

    def pil(t):
        a = ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(a)

    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid([pil(t) for t in x] + [pil(t) for t in recon], cols=len(x)).save(path)


# ---- checkpoints (files as training/train.py writes them) ---------------------------------------------
def _save(out_dir, state, vae, optimizer, lr_schedule, ema, generator, accelerator, args) -> Path:
    def write_shared(tmp: Path) -> None:
        weights = {f"vae.{k}": p for k, p in vae.named_parameters()}
        ckpt.assert_finite(weights, f"checkpoint-{state.step}")
        ckpt.save_tensors(weights, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_schedule.state_dict(), tmp / "lr_schedule.pt")
        if ema is not None:
            ckpt.save_tensors(ema.shadow, tmp / "ema.safetensors")
        info = {
            **asdict(state),
            "num_processes": accelerator.num_processes,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "ema_updates": ema.num_updates if ema is not None else None,
            "vae_config": vae.config.to_dict(),
        }
        ckpt.save_json(info, tmp / "state.json")

    path = ckpt.write_checkpoint(Path(out_dir), state.step, accelerator, write_shared, ckpt.rng_state(generator))
    if accelerator.is_main_process:
        ckpt.prune(out_dir, args.keep_checkpoints)
    accelerator.wait_for_everyone()
    return path


@torch.no_grad()
def _restore(path: Path, vae, optimizer, lr_schedule, ema, generator, accelerator, args) -> VAERunState:
    from latentdiff.training.optim import set_lr_for_step

    info = ckpt.load_json(path / "state.json")
    if info.get("vae_config", {}).get("block_out_channels") != list(vae.config.block_out_channels):
        raise ckpt.CheckpointError(f"{path} holds a VAE of another size than --config gives")
    tensors = ckpt.load_tensors(path / "trainable.safetensors")
    own = {f"vae.{k}": p for k, p in vae.named_parameters()}
    why = ckpt.tensor_mismatch(own, tensors)
    if why is not None:
        raise ckpt.CheckpointError(f"{path} does not match this VAE (was it made with another --config?); {why}")
    for k, p in own.items():
        p.copy_(tensors[k])
    optimizer.load_state_dict(ckpt.load_torch(path / "optimizer.pt"))
    lr_schedule.load_state_dict(ckpt.load_torch(path / "lr_schedule.pt"))
    set_lr_for_step(optimizer, lr_schedule, info["step"])
    if ema is not None and (path / "ema.safetensors").is_file():
        ema.load_state_dict({"shadow": ckpt.load_tensors(path / "ema.safetensors"), "num_updates": info["ema_updates"]})
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if rng_file.is_file():
        ckpt.set_rng_state(ckpt.load_torch(rng_file), generator)
    state = VAERunState(**{k: info[k] for k in ("step", "micro_batches", "nan_skipped", "nan_in_a_row", "losses")})
    if (info["num_processes"], info["batch_size"]) != (accelerator.num_processes, args.batch_size):
        state.micro_batches = math.ceil(
            info["micro_batches"]
            * info["num_processes"]
            * info["batch_size"]
            / (accelerator.num_processes * args.batch_size)
        )
    return state


# ---- command line ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(
        prog="train_vae.py",
        description="Train the autoencoder from scratch (L1 + edge + KL), with Accelerate; writes OUT/vae/.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--data", default="shapes", help="'shapes' / 'shapes:SEED' or a folder of images")
    p.add_argument("--output-dir", required=True, help="checkpoints, logs and vae/ go here")
    p.add_argument("--config", default=None, help="AutoencoderKL config.json or a recipe JSON with a 'vae' section")
    p.add_argument("--init", default=None, help="start from this trained VAE (a model folder or its vae/)")
    p.add_argument(
        "--decoder-only",
        action="store_true",
        help="with --init: train only the decoder, so latents (and a U-Net trained on them) stay valid",
    )
    p.add_argument("--max-steps", type=int, default=3000, help="optimizer steps in all (a resumed run continues to it)")
    p.add_argument("--batch-size", type=int, default=16, help="images per process per step")
    p.add_argument("--learning-rate", "--lr", type=float, default=2e-4, dest="learning_rate", help="AdamW's peak rate")
    p.add_argument(
        "--lr-scheduler", choices=["constant", "cosine"], default="cosine", help="after warm-up; cosine decays to 0"
    )
    p.add_argument("--lr-warmup-steps", type=int, default=100, help="steps of linear warm-up from 0")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="weight of KL / numel(x) (LDM: 1e-6)")
    p.add_argument("--edge-weight", type=float, default=1.0, help="weight of the image-gradient L1 (0: off)")
    p.add_argument(
        "--foreground-weight",
        type=float,
        default=0.0,
        help="count pixels off the image's background colour (its median) 1+W times in the L1 (flat backgrounds)",
    )
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: off)")
    add_ema(p, 0.999, "validation grids and the exported VAE")
    p.add_argument("--resolution", type=int, default=64, help="square training size in pixels")
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the initial weights, the data order and the latent sampling"
    )
    p.add_argument("--checkpoint-every", type=int, default=0, help="write OUT/checkpoint-N every N steps (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=None, help="keep only the newest K checkpoints")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--validate-every", type=int, default=0, help="save a reconstruction grid every N steps")
    p.add_argument("--scale-samples", type=int, default=256, help="held-out images for the scaling factor")
    add_data_reading(p)
    p.add_argument("--max-nan-steps", type=int, default=5, help="stop after this many NaN/inf steps in a row")
    p.add_argument(
        "--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="Accelerate's autocast dtype"
    )
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_steps", "batch_size", "scale_samples", "shapes_count", "resolution", "max_nan_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    check_numbers(
        parser,
        args,
        positive=("learning_rate",),
        non_negative=("kl_weight", "edge_weight", "foreground_weight", "max_grad_norm"),
    )
    check_companions(parser, args, keep_checkpoints="checkpoint_every")
    if args.decoder_only and args.init is None:
        parser.error("--decoder-only needs --init (the trained VAE whose encoder is kept)")
    if args.init is not None and args.config is not None:
        parser.error("--init brings its own config; leave out --config")
    if args.ema is not None and not 0.0 < args.ema < 1.0:
        parser.error(f"--ema decay must be in (0, 1), got {args.ema}")
    summary, status = run_reporting(train_vae, args, (FileNotFoundError, ValueError))
    if status:
        return status
    if summary.get("vae"):
        print(
            f"{done_text(summary)}, held-out L1 "
            f"{summary['reconstruction_l1']:.4f}, scaling_factor {summary['scaling_factor']:.4f}; "
            f"VAE in {summary['vae']}"
        )
    return 0
