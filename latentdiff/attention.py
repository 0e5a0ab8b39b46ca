"""Self/cross attention on F.scaled_dot_product_attention; the U-Net's spatial transformer, VAE attention.

Parameter names follow diffusers (to_q, to_k, to_v, to_out.0, norm1..3, ff.net.0.proj, ...) so that Stable
Diffusion checkpoints load with strict=True.
"""

from __future__ import annotations

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
        if not _plain(self.to_q, self.to_k, self.to_v):  # LoRA wrappers, hooks: one module call each
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        elif context is None:  # self-attention: q, k, v in one matmul
            q, k, v = _fused_linear(self, x, self.to_q, self.to_k, self.to_v).chunk(3, dim=-1)
        else:  # cross-attention: k, v of the (fixed) text context in one matmul, reused across steps
            q, (k, v) = self.to_q(x), self._context_kv(context).chunk(2, dim=-1)
        q, k, v = (t.view(B, -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if self.upcast:  # softmax(QK^T) in float32 for half-precision weights (SD 2.1)
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim).to(x.dtype)  # (B, T, H*D)
        return self.to_out[1](self.to_out[0](out))

    def _context_kv(self, context: torch.Tensor) -> torch.Tensor:
        # The text context is the same tensor at every denoising step: at inference its k, v are kept
        # (with a reference to it, so its memory cannot be reused by another tensor) until it changes.
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return _fused_linear(self, context, self.to_k, self.to_v)
        key = (context._version, *_weights_key(self.to_k, self.to_v))
        cached = self.__dict__.get("_kv_cache")
        if cached is None or cached[0] is not context or cached[1] != key:
            cached = (context, key, _fused_linear(self, context, self.to_k, self.to_v))
            self.__dict__["_kv_cache"] = cached  # not a buffer: never in the state_dict
        return cached[2]


def _plain(*layers: nn.Module) -> bool:
    """True if every layer is an nn.Linear whose forward may be replaced by a fused matmul."""
    return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in layers)


def _weights_key(*layers: nn.Linear) -> tuple:
    """Identity of the layers' parameters: changes when they are replaced, moved or updated in place."""
    return tuple((p.data_ptr(), p._version, p.dtype) for m in layers for p in (m.weight, m.bias) if p is not None)


def _fused_linear(owner: nn.Module, x: torch.Tensor, *layers: nn.Linear) -> torch.Tensor:
    """`torch.cat([m(x) for m in layers], -1)` as one matmul (Linear weights concatenated row-wise).

    Under autograd the weights are concatenated on every call (gradients flow to each layer); at
    inference the concatenation is cached on `owner` and rebuilt when any of the weights is replaced,
    moved or updated in place (writes through `.data` bypass the version counter and are not seen).
    """
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(m.weight.requires_grad for m in layers)):
        weight = torch.cat([m.weight for m in layers])
        bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
        return F.linear(x, weight, bias)
    name = f"_fused_{len(layers)}"
    key = _weights_key(*layers)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        weight = torch.cat([m.weight.detach() for m in layers])
        bias = None if layers[0].bias is None else torch.cat([m.bias.detach() for m in layers])
        cached = (key, weight, bias)
        owner.__dict__[name] = cached  # plain attributes: not parameters, not in the state_dict
    return F.linear(x, cached[1], cached[2])


class GEGLU(nn.Module):
    """Linear layer with a GELU-gated output, Shazeer 2020 ("GLU variants improve transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


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

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
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

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, h.shape[1])  # (B, HW, C)
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, h.shape[-1]).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.use_linear_projection:
            h = self.proj_out(h.contiguous())
        return x + h


class VAEAttention(Checkpointed):
    """Single-head self-attention over the pixels of the VAE's coarsest feature map, with a residual."""

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
        if _plain(self.to_q, self.to_k, self.to_v):
            qkv = _fused_linear(self, h, self.to_q, self.to_k, self.to_v)[:, None]  # (B, 1, HW, 3C)
            q, k, v = qkv.chunk(3, dim=-1)
        else:
            q, k, v = (proj(h)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]
        h = self.to_out[1](self.to_out[0](h))
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
