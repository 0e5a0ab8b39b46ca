"""The models of a fine-tuning run: load a model folder, choose what trains (U-Net, text encoder, LoRA), export."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from latentdiff.training import checkpoint as ckpt
from latentdiff.training.errors import TrainingError
from latentdiff.training.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, merge_lora


@dataclass
class Models:
    pipe: object  # the LatentDiffusionPipeline loaded from --model (its frozen parts are used as they are)
    trained: dict[str, nn.Module] = field(default_factory=dict)  # "unet" and maybe "text_encoder"
    lora_rank: int | None = None

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for p in self.trained[name].parameters() if p.requires_grad]


def load_models(
    model_dir: str | Path,
    device,
    train_text_encoder: bool = False,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    gradient_checkpointing: bool = False,
    frozen_dtype: torch.dtype = torch.float32,
) -> Models:
    """The pipeline in --model with the VAE (and text encoder unless trained) frozen, maybe in a lower dtype."""
    from latentdiff.folders import ModelFolderError
    from latentdiff.pipeline import LatentDiffusionPipeline

    try:
        pipe = LatentDiffusionPipeline.from_pretrained(model_dir)
    except (ModelFolderError, FileNotFoundError, ValueError) as e:
        raise TrainingError(f"cannot load --model {model_dir}: {e}") from None
    pipe.to(device=device)
    pipe.vae.requires_grad_(False).eval().to(dtype=frozen_dtype)
    models = Models(pipe, {"unet": pipe.unet}, lora_rank)
    if train_text_encoder:
        models.trained["text_encoder"] = pipe.text_encoder
    else:
        pipe.text_encoder.requires_grad_(False).eval().to(dtype=frozen_dtype)

    if lora_rank:
        add_lora(pipe.unet, lora_rank, lora_alpha, UNET_TARGETS)
        if train_text_encoder:
            add_lora(pipe.text_encoder, lora_rank, lora_alpha, TEXT_ENCODER_TARGETS)
    for module in models.trained.values():
        module.to(device=device, dtype=torch.float32).train()
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if train_text_encoder:
            pipe.text_encoder.enable_gradient_checkpointing()
    return models


def trainable_state(models: Models) -> dict[str, torch.Tensor]:
    """{"unet.<param>": tensor, ...}: what a checkpoint must hold of the weights (LoRA: only the adapters)."""
    return {
        f"{name}.{key}": p for name, m in models.trained.items() for key, p in m.named_parameters() if p.requires_grad
    }


@torch.no_grad()
def load_trainable_state(models: Models, tensors: dict[str, torch.Tensor]) -> None:
    own = trainable_state(models)
    why = ckpt.tensor_mismatch(own, tensors)
    if why is not None:
        raise TrainingError(
            "the checkpoint does not match this run's trained parameters (was it made with other "
            f"--lora-rank / --train-text-encoder / --model?); {why}"
        )
    for key, p in own.items():
        p.copy_(tensors[key])


def as_pipeline(models: Models, name: str):
    """A LatentDiffusionPipeline named `name` over the run's modules as they are now (shared, not copied)."""
    from latentdiff.pipeline import LatentDiffusionPipeline

    pipe = models.pipe
    return LatentDiffusionPipeline(
        pipe.unet,
        pipe.vae,
        pipe.text_encoder,
        pipe.tokenizer,
        pipe.scheduler_config,
        defaults=pipe.defaults,
        name=name,
    )


def export(models: Models, path: str | Path, name: str, dtype: torch.dtype | None = None) -> Path:
    """Write a model folder that LatentDiffusionPipeline.from_pretrained loads (LoRA merged; call at the end)."""
    if models.lora_rank:
        for module in models.trained.values():
            merge_lora(module)
    out = as_pipeline(models, name)
    out.vae.float()
    out.text_encoder.float()
    return out.save_pretrained(path, dtype=dtype)
