"""Prompt -> context: CLIP tokenizer + text transformer, with a truncation warning and clip skip."""

from __future__ import annotations

import torch

from latentdiff.clip import CLIPTextEncoder
from latentdiff.tokenizer import CLIPTokenizer


@torch.no_grad()
def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextEncoder, prompts: list[str], clip_skip: int | None = None
) -> torch.Tensor:
    """Context for cross-attention, (B, T, D).

    clip_skip follows diffusers: None or 0 uses the last layer; k >= 1 takes the output k layers before the
    last and applies the final layer norm to it (k = 1 is what A1111 calls "Clip skip: 2").
    """
    ids = tokenizer(prompts).to(text_encoder.device)
    return text_encoder(ids, clip_skip=clip_skip or 0)
