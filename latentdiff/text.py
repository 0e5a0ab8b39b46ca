"""Prompt -> context: transformers' CLIPTokenizer + CLIPTextModel, with a truncation warning and clip skip."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's window; warns, showing the words cut off, when a prompt is too long."""
    max_length = tokenizer.model_max_length
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    full = tokenizer(prompts, padding=False, truncation=False).input_ids
    for prompt, tokens in zip(prompts, full):
        if len(tokens) > max_length:
            # The window keeps BOS + (max_length - 2) tokens + EOS; the rest of the prompt is dropped.
            dropped = tokenizer.decode(tokens[max_length - 1 : -1])
            warnings.warn(
                f"prompt is longer than the text encoder's {max_length} tokens and was truncated; "
                f"dropped: {dropped!r} (prompt starts {prompt[:40]!r})",
                stacklevel=3,
            )
    return ids


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], clip_skip: int | None = None) -> torch.Tensor:
    """Context for cross-attention, (B, T, D).

    clip_skip follows diffusers: None or 0 uses the last layer; k >= 1 takes the output k layers before the
    last and applies the final layer norm to it (k = 1 is what A1111 calls "Clip skip: 2").
    """
    if clip_skip is not None and not 0 <= clip_skip < text_encoder.config.num_hidden_layers:
        raise ValueError(
            f"clip_skip={clip_skip} is out of range; this text encoder has "
            f"{text_encoder.config.num_hidden_layers} layers (use 0..{text_encoder.config.num_hidden_layers - 1})"
        )
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    if not clip_skip:
        return text_encoder(ids)[0]
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-(clip_skip + 1)]
    # transformers 4 nests the CLIP layers under .text_model; transformers 5 does not.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """Save a CLIP tokenizer with vocab.json + merges.txt beside tokenizer.json.

    transformers 5 writes only tokenizer.json; older transformers and other SD tools read the two CLIP
    files, so they are written from the tokenizer's own BPE model whenever save_pretrained left them out.
    """
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
