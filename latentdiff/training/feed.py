"""What the loop eats: the dataset (or its cached latents), collated batches, and their latents and context."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from latentdiff.training.data import (
    CaptionedImages,
    DataError,
    ShapesScenes,
    bad_files_message,
    find_examples,
    parse_shapes_mix,
    parse_shapes_spec,
    sample_rng,
)


class BadFilesWarning(UserWarning):
    """Files in the data folder that were skipped (truncated, corrupt, empty, not images, too many pixels)."""


def build_dataset(args, accelerator, log) -> CaptionedImages:
    """The dataset; a folder is scanned once, on the main process, and the result shared."""
    shapes_seed = parse_shapes_spec(str(args.data))
    if shapes_seed is not None:
        mix = parse_shapes_mix(args.shapes_mix)
        mixed = "" if mix is None else f", category weights {args.shapes_mix}"
        log(f"data: {args.shapes_count} Shapes scenes drawn on the fly (scene seed {shapes_seed}{mixed})")
        return ShapesScenes(args.shapes_count, args.resolution, shapes_seed, args.caption_dropout, args.seed, mix)
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
                skip=args.output_dir,
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
        log(f"{len(found.uncaptioned)} image(s) without a caption {verb} (--missing-captions {args.missing_captions})")
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
            "input_ids": self.tokenizer(captions, warn=False),
        }
        for key in ("pixels", "mean", "std"):
            if key in items[0]:
                batch[key] = torch.stack([it[key] for it in items])
        return batch


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


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
        return text_encoder(ids).float()
