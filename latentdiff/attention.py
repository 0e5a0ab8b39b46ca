"""Self/cross attention on F.scaled_dot_product_attention; the U-Net's spatial transformer, VAE attention.

Parameter names follow diffusers (to_q, to_k, to_v, to_out.0, norm1..3, ff.net.0.proj, ...) so that Stable
Diffusion checkpoints load with strict=True.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Checkpointed(nn.Module):
    """A module whose `_forward` is recomputed in the backward pass when gradient checkpointing is on."""

    gradient_checkpointing = False

    def forward(self, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)

    def _forward(self, *args):
        raise NotImplementedError


def set_gradient_checkpointing(model: nn.Module, enabled: bool = True) -> None:
    """Switch gradient checkpointing on (or off) for every Checkpointed block inside `model`."""
    for module in model.modules():
        if isinstance(module, Checkpointed):
            module.gradient_checkpointing = enabled


class Attention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017); cross-attention to a context when `context_dim` is set."""

    _cache: dict | None = None  # set by inference_cache(): fused weights, context k and v of one call

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        upcast: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.heads, self.head_dim, self.upcast = heads, head_dim, upcast
        inner_dim = heads * head_dim
        context_dim = context_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        if not _fusable(self.to_q, self.to_k, self.to_v):  # LoRA, hooks, big layers: one call each
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        elif context is None:  # self-attention: q, k, v in one matmul
            q, k, v = _fused_linear(self, "qkv", x, self.to_q, self.to_k, self.to_v).chunk(3, dim=-1)
        else:  # cross-attention: k, v of the text context in one matmul (once per call in inference_cache)
            q, (k, v) = self.to_q(x), self._context_kv(context).chunk(2, dim=-1)
        q, k, v = (t.view(B, -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if self.upcast:  # softmax(QK^T) in float32 for half-precision weights (SD 2.1)
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim).to(x.dtype)  # (B, T, H*D)
        return self.to_out[1](self.to_out[0](out))

    def _context_kv(self, context: torch.Tensor) -> torch.Tensor:
        # The text context is the same tensor at every denoising step: inside inference_cache its k, v are
        # computed once (the cache holds a reference to it, so its memory cannot pass to another tensor).
        if self._cache is None or torch.is_grad_enabled():
            return _fused_linear(self, "kv", context, self.to_k, self.to_v)
        hit = self._cache.get("context")
        if hit is None or hit[0] is not context:
            # Not keeping the fused k/v weight: it serves once per context, and for SD1.5 it would hold ~76 MB.
            kv = _fused_linear(self, "kv", context, self.to_k, self.to_v, keep=False)
            hit = self._cache["context"] = (context, kv)
        return hit[1]


@contextmanager
def inference_cache(*models: nn.Module):
    """Inside the block the models' weights are taken as constant (one pipeline call): fused q/k/v weights
    and the text context's k, v are computed once and reused; everything is dropped on exit.
    """
    layers = [m for model in models for m in model.modules() if isinstance(m, (Attention, VAEAttention))]
    previous = [m._cache for m in layers]
    for m in layers:
        m._cache = {}
    try:
        yield
    finally:
        for m, cache in zip(layers, previous):
            m._cache = cache


# Fusing saves per-call overhead, which matters for small layers only; a big model's fused copies would
# cost memory (SD1.5: ~150 MB of q/k/v weights) for no measurable speed, so its layers stay separate.
FUSE_MAX_BYTES = 1 << 20


def plain(layer: nn.Module, kind: type[nn.Module]) -> bool:
    """True if `layer` is exactly a `kind` (not a LoRA wrapper or other subclass) with no forward hooks, so
    its forward may be replaced by the same arithmetic done another way."""
    return type(layer) is kind and not (layer._forward_hooks or layer._forward_pre_hooks)


def _plain(*layers: nn.Module) -> bool:
    """True if every layer is a plain nn.Linear (see `plain`)."""
    return all(plain(m, nn.Linear) for m in layers)


def _fusable(*layers: nn.Module) -> bool:
    """True if the layers are plain and small enough to run as one fused matmul."""
    return _plain(*layers) and sum(m.weight.nbytes for m in layers) <= FUSE_MAX_BYTES


def _fused_linear(owner: nn.Module, name: str, x: torch.Tensor, *layers: nn.Linear, keep: bool = True) -> torch.Tensor:
    """`torch.cat([m(x) for m in layers], -1)` as one matmul (the Linear weights concatenated row-wise).

    The concatenation is made on every call (gradients flow to each layer), except inside inference_cache
    without autograd, where it is made once and kept in `owner._cache[name]` (unless keep=False).
    """
    cache = owner._cache if keep and not torch.is_grad_enabled() else None
    fused = cache.get(name) if cache is not None else None
    if fused is None:
        weight = torch.cat([m.weight for m in layers])
        bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
        fused = (weight, bias)
        if cache is not None:
            cache[name] = fused
    return F.linear(x, *fused)


def repeat_batch(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """x stacked `repeats` times along the batch (x itself for 1): [x, x, ...]."""
    return x if repeats == 1 else x.repeat(repeats, *([1] * (x.dim() - 1)))


class GEGLU(nn.Module):
    """Linear layer with a GELU-gated output, Shazeer 2020 ("GLU variants improve transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not _plain(self.proj):
            x, gate = self.proj(x).chunk(2, dim=-1)
            return x * F.gelu(gate)
        # Inference: the two halves as two matmuls on row slices of the weight, so the gate comes out
        # contiguous and gelu does not first copy a strided half (a few % of a small model's step).
        n = self.proj.out_features // 2
        w, b = self.proj.weight, self.proj.bias
        gate = F.gelu(F.linear(x, w[n:], b[n:]))
        return gate.mul_(F.linear(x, w[:n], b[:n]))


class FeedForward(nn.Module):
    """GEGLU MLP with 4x hidden width; `net` indices match diffusers (0 = GEGLU, 1 = dropout, 2 = out)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text context, GEGLU feed-forward."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        only_cross_attention: bool = False,
        upcast: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(
            dim,
            heads,
            head_dim,
            context_dim if only_cross_attention else None,
            upcast=upcast,
            dropout=dropout,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, upcast=upcast, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        """`repeats` > 1: x holds one row per sample, widened to the context's rows where it is first read."""
        if self.only_cross_attention:
            x, repeats = repeat_batch(x, repeats), 1
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = repeat_batch(x, repeats)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(Checkpointed):
    """Transformer over the pixels of a feature map (diffusers' Transformer2DModel, continuous input).

    proj_in/proj_out are 1x1 convolutions (SD 1.x) or linear layers on the token axis (SD 2.x,
    `use_linear_projection`); the two are the same map, stored differently.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        num_layers: int = 1,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner_dim, heads, head_dim, context_dim, only_cross_attention, upcast, dropout)
            for _ in range(num_layers)
        )

    def _forward(self, x: torch.Tensor, context: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        """`repeats` > 1: x has one row per sample and the context `repeats` rows per sample (see UNet)."""
        B, _, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, h.shape[1])  # (B, HW, C)
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h, repeats = block(h, context, repeats), 1  # the first block widens the batch
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(-1, H, W, h.shape[-1]).permute(0, 3, 1, 2)  # (B * repeats, C, H, W)
        if not self.use_linear_projection:
            h = self.proj_out(h.contiguous())
        if h.shape[0] == B:
            return x + h
        # the residual x (B rows) broadcast over the repeats instead of copied
        return (h.view(-1, *x.shape) + x).view(h.shape)


class VAEAttention(Checkpointed):
    """Single-head self-attention over the pixels of the VAE's coarsest feature map, with a residual."""

    _cache: dict | None = None  # set by inference_cache(): fused q/k/v weights of one call

    def __init__(self, channels: int, norm_num_groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(norm_num_groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x.view(B, C, H * W)).transpose(1, 2)  # (B, HW, C)
        if _fusable(self.to_q, self.to_k, self.to_v):
            qkv = _fused_linear(self, "qkv", h, self.to_q, self.to_k, self.to_v)[:, None]  # (B, 1, HW, 3C)
            q, k, v = qkv.chunk(3, dim=-1)
        else:
            q, k, v = (proj(h)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]
        h = self.to_out[1](self.to_out[0](h))
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
