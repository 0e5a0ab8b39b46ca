"""CLIP's text transformer (Radford et al. 2021) as Stable Diffusion uses it: token ids -> per-token context.

Parameter names are transformers' CLIPTextModel names (without the `text_model.` prefix, as transformers 5
keeps them in memory), so SD text_encoder folders load strictly and ours load in transformers. Only what
latentdiff needs is built: no pooled output or projection (SD's cross-attention reads the hidden states).
Implemented here rather than imported because importing transformers' model code costs 2-4 s of start-up.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.config import UnsupportedConfigError, from_config_dict

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP (SD 1.x)
    "gelu": F.gelu,  # OpenCLIP (SD 2.x)
}
# transformers' CLIPTextConfig keys that never change the text transformer's hidden states.
IGNORED_KEYS = {
    "architectures", "transformers_version", "_name_or_path", "model_type", "torch_dtype", "dtype",
    "projection_dim", "initializer_range", "initializer_factor", "bos_token_id", "eos_token_id", "pad_token_id",
    "attention_dropout", "dropout", "id2label", "label2id", "output_attentions", "output_hidden_states",
    "use_return_dict", "return_dict", "is_encoder_decoder", "tie_word_embeddings", "chunk_size_feed_forward",
    "_attn_implementation_autoset", "add_cross_attention", "tokenizer_class", "prefix", "problem_type",
    "finetuning_task", "architecture", "gradient_checkpointing", "torchscript", "use_bfloat16", "pruned_heads",
    "tf_legacy_loss", "task_specific_params", "_commit_hash", "_attn_implementation",
}  # fmt: skip


@dataclasses.dataclass
class CLIPTextSettings:
    """The CLIPTextConfig fields that shape the text transformer (transformers' defaults = OpenAI ViT-L/14)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "text_encoder/config.json") -> CLIPTextSettings:
        # from_config_dict names a mistyped value: unchecked, "512" or 0 failed later as a TypeError or
        # ZeroDivisionError, a traceback from loading and from `latentdiff info`
        settings = from_config_dict(cls, {k: v for k, v in config.items() if k not in IGNORED_KEYS}, where)
        if settings.num_attention_heads < 1:
            raise ValueError(f"{where}: num_attention_heads must be at least 1, got {settings.num_attention_heads}")
        if settings.hidden_act not in ACTIVATIONS:
            raise UnsupportedConfigError(
                f"{where}: hidden_act {settings.hidden_act!r} is not supported (only {', '.join(ACTIVATIONS)})"
            )
        if settings.hidden_size % settings.num_attention_heads:
            raise UnsupportedConfigError(
                f"{where}: hidden_size {settings.hidden_size} is not a multiple of "
                f"num_attention_heads {settings.num_attention_heads}"
            )
        return settings


class CLIPEmbeddings(nn.Module):
    def __init__(self, s: CLIPTextSettings):
        super().__init__()
        self.token_embedding = nn.Embedding(s.vocab_size, s.hidden_size)
        self.position_embedding = nn.Embedding(s.max_position_embeddings, s.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention (each token sees itself and the tokens before it)."""

    def __init__(self, s: CLIPTextSettings):
        super().__init__()
        self.heads = s.num_attention_heads
        d = s.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj), split(self.k_proj), split(self.v_proj), is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class CLIPMLP(nn.Module):
    def __init__(self, s: CLIPTextSettings):
        super().__init__()
        self.act = ACTIVATIONS[s.hidden_act]
        self.fc1 = nn.Linear(s.hidden_size, s.intermediate_size)
        self.fc2 = nn.Linear(s.intermediate_size, s.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, s: CLIPTextSettings):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.self_attn = CLIPAttention(s)
        self.layer_norm2 = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.mlp = CLIPMLP(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, s: CLIPTextSettings):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(s) for _ in range(s.num_hidden_layers))


class CLIPTextEncoder(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, hidden_size), optionally from an earlier layer (clip skip)."""

    def __init__(self, config: CLIPTextSettings, raw_config: dict[str, Any] | None = None):
        super().__init__()
        self.config = config
        # The folder's config.json as read, so a save writes back every key other tools may want.
        self.raw_config = dict(raw_config or {})
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    @property
    def device(self) -> torch.device:
        return self.final_layer_norm.weight.device

    def forward(self, ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """clip_skip k >= 1 stops k layers before the last and applies the final norm there (diffusers' rule)."""
        n = self.config.num_hidden_layers
        if not 0 <= clip_skip < n:
            raise ValueError(f"clip_skip={clip_skip} is out of range; this text encoder has {n} layers (0..{n - 1})")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{ids.shape[1]} tokens exceed the text encoder's {self.config.max_position_embeddings} positions"
            )
        x = self.embeddings(ids)
        for layer in self.encoder.layers[: n - clip_skip]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.final_layer_norm(x)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each layer in the backward pass (training only) to save activation memory."""
        self.gradient_checkpointing = True

    def config_dict(self) -> dict[str, Any]:
        """config.json for transformers' CLIPTextModel: the loaded keys, with the shape fields as they are now."""
        out = {k: v for k, v in self.raw_config.items() if k != "_name_or_path"}
        out.update(dataclasses.asdict(self.config))
        out.setdefault("architectures", ["CLIPTextModel"])
        out.setdefault("model_type", "clip_text_model")
        return out

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> CLIPTextEncoder:
        """Random initialisation for training from scratch, scaled as in CLIP (deeper -> smaller residual writes)."""
        d, n = self.config.hidden_size, self.config.num_hidden_layers
        nn.init.normal_(self.embeddings.token_embedding.weight, std=std)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=std / 2)
        proj_std = d**-0.5 * (2 * n) ** -0.5
        for layer in self.encoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                nn.init.normal_(proj.weight, std=d**-0.5)
            nn.init.normal_(attn.out_proj.weight, std=proj_std)
            nn.init.normal_(mlp.fc1.weight, std=(2 * d) ** -0.5)
            nn.init.normal_(mlp.fc2.weight, std=proj_std)
            for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2):
                nn.init.zeros_(m.bias)
        return self
