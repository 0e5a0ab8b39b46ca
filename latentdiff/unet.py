"""Conditional U-Net (Ronneberger et al. 2015; Rombach et al. 2022) with diffusers' parameter names.

The state_dict of `UNet(config)` has exactly the keys and shapes of diffusers' `UNet2DConditionModel` for
the same config, so Stable Diffusion 1.x / 2.x weights load with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.attention import Checkpointed, SpatialTransformer, plain, repeat_batch, set_gradient_checkpointing
from latentdiff.config import UnsupportedConfigError, from_config_dict, to_config_dict
from latentdiff.conv_gemm import conv3x3

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

# diffusers UNet2DConditionModel keys for features latentdiff does not implement, with their "off" value.
UNET_TOLERATED = {
    "dual_cross_attention": False,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "addition_embed_type_num_heads": 64,
    "num_class_embeds": None,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "cross_attention_norm": None,
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise UnsupportedConfigError(f"unknown act_fn {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def per_level(value: Any, n: int) -> tuple:
    """A per-level tuple from a value diffusers allows as one for all levels or one per level."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


@dataclass
class UNetConfig:
    """UNet2DConditionModel's config.json keys (diffusers' names), for the features latentdiff implements."""

    sample_size: int | tuple[int, int] | None = None  # latent height/width the model was trained at
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # predicted channels out (noise, v or x0)
    center_input_sample: bool = False  # map the input x to 2x - 1 first
    flip_sin_to_cos: bool = True  # timestep embedding order: cos, sin (True) or sin, cos
    freq_shift: int = 0  # frequencies are exp(-log(10000) * i / (half - freq_shift))
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # one per level
    mid_block_type: str = "UNetMidBlock2DCrossAttn"  # resnet, transformer, resnet at the bottom
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3  # deepest level first
    only_cross_attention: bool | tuple[bool, ...] = False  # attn1 attends to the context too (per level)
    mid_block_only_cross_attention: bool | None = None  # used only by a mid block type latentdiff lacks
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per level
    layers_per_block: int | tuple[int, ...] = 2  # resnets per down level (up levels have one more)
    downsample_padding: int = 1  # padding of the stride-2 downsampling conv (0: pad right/bottom only)
    mid_block_scale_factor: float = 1.0  # mid-block resnet outputs are divided by this
    dropout: float = 0.0  # dropout in resnets and transformer blocks
    act_fn: str = "silu"  # activation of resnets and the time MLP
    norm_num_groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-5  # GroupNorm epsilon in resnets and the output norm
    cross_attention_dim: int | tuple[int, ...] = 1280  # width of the text context (per level)
    transformer_layers_per_block: int | tuple[int, ...] = 1  # transformer blocks per attention (per level)
    attention_head_dim: int | tuple[int, ...] = 8  # NUMBER of heads when num_attention_heads is None (!)
    num_attention_heads: int | tuple[int, ...] | None = None  # heads per level; overrides the above
    use_linear_projection: bool = False  # proj_in/proj_out as Linear (SD 2.x) instead of 1x1 conv
    upcast_attention: bool = False  # attention in float32 (SD 2.1 in half precision)
    resnet_time_scale_shift: str = "default"  # "default": add time emb; "scale_shift": FiLM after norm2
    time_embedding_dim: int | None = None  # time MLP width; None: 4 * block_out_channels[0]
    conv_in_kernel: int = 3  # kernel size of conv_in
    conv_out_kernel: int = 3  # kernel size of conv_out

    def __post_init__(self):
        n = len(self.block_out_channels)
        checks = {
            "down_block_types": (self.down_block_types, DOWN_BLOCK_TYPES),
            "up_block_types": (self.up_block_types, UP_BLOCK_TYPES),
            "mid_block_type": ((self.mid_block_type,), MID_BLOCK_TYPES),
            "resnet_time_scale_shift": ((self.resnet_time_scale_shift,), ("default", "scale_shift")),
        }
        for key, (values, allowed) in checks.items():
            for value in values:
                if value not in allowed:
                    raise UnsupportedConfigError(f"{key}: {value!r} is not supported; choose from {allowed}")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types and up_block_types need one entry per block_out_channels ({n})")
        if any(not isinstance(k, int) for k in per_level(self.transformer_layers_per_block, n)):
            raise UnsupportedConfigError("transformer_layers_per_block: nested (asymmetric) values are not supported")
        activation(self.act_fn)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per level, resolved as diffusers does (attention_head_dim means heads if unset)."""
        return per_level(self.num_attention_heads or self.attention_head_dim, len(self.block_out_channels))

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding fed to every resnet."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        return from_config_dict(cls, d, "unet/config.json", tolerated=UNET_TOLERATED)

    def to_dict(self) -> dict[str, Any]:
        d = to_config_dict(self, "UNet2DConditionModel")
        if self.num_attention_heads is not None:
            # diffusers refuses num_attention_heads; its attention_head_dim carries the head count instead
            d["attention_head_dim"], d["num_attention_heads"] = d["num_attention_heads"], None
        return d


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps (Vaswani et al. 2017, as in DDPM): (B, dim)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal embedding."""

    def __init__(self, in_dim: int, dim: int, act_fn: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ResBlock(Checkpointed):
    """GroupNorm-act-conv twice, time embedding added in between (He et al. 2016; DDPM's variant)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int = 32,
        eps: float = 1e-6,
        act_fn: str = "silu",
        dropout: float = 0.0,
        time_scale_shift: str = "default",
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.time_scale_shift, self.output_scale_factor = time_scale_shift, output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            scale = 2 if time_scale_shift == "scale_shift" else 1
            self.time_emb_proj = nn.Linear(temb_channels, out_channels * scale)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = activation(act_fn)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def _forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = conv3x3(self.conv1, self.act(self.norm1(x)))
        if temb is not None:
            temb = self.time_emb_proj(self.act(temb))[:, :, None, None]
        if temb is not None and self.time_scale_shift == "scale_shift":
            scale, shift = temb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h if temb is None else _add(h, temb))
        h = conv3x3(self.conv2, self.dropout(self.act(h)))
        if hasattr(self, "conv_shortcut"):
            x = self.conv_shortcut(x)
        h = _add(h, x)  # h is a fresh conv output: added to in place when no gradient needs it
        return h if self.output_scale_factor == 1.0 else h / self.output_scale_factor


def _add(h: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """h + other, written into h (a temporary of the caller's) at inference: one pass, no new tensor."""
    return h.add_(other) if not torch.is_grad_enabled() else h + other


class Downsample(nn.Module):
    """Stride-2 3x3 conv; with padding 0 the input is padded on the right and bottom only (SD's VAE)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return conv3x3(self.conv, x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to `size`, for odd skip sizes), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        B, _, H, W = x.shape
        doubling = size is None or tuple(size) == (2 * H, 2 * W)
        big = B * H * W >= PHASE_MIN_PIXELS and min(H, W) >= PHASE_MIN_SIDE
        # CPU only: on a GPU, four 2x2 convolutions against cuDNN's 3x3 kernels have not been measured
        if doubling and plain(self.conv, nn.Conv2d) and big and x.device.type == "cpu":
            return upsample_conv(x, self.conv.weight, self.conv.bias)
        x = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2.0)
        return conv3x3(self.conv, x)


# Which input pixels each output pixel of conv3x3(nearest_x2(x)) reads: output row 2i + a (phase a) sees
# upsampled rows 2i + a - 1 ... 2i + a + 1, i.e. input rows (i - 1, i, i) for a = 0 and (i, i, i + 1) for
# a = 1. So every phase is a 2x2 convolution of x whose taps are sums of the 3x3 taps: (w0, w1 + w2) for
# phase 0 and (w0 + w1, w2) for phase 1, on each axis. _PHASE_TAPS[a][i]: the 3x3 taps summed into tap i.
_PHASE_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))
# Below this many input pixels (batch x height x width), or below 8x8, building the four kernels and running
# four small convolutions costs more than the 20 of 36 multiply-adds per output they save (measured on a
# 2-core CPU: 16 x 8x8 px with 64 channels 1.2x faster, 16 x 4x4 px slower, 2 x 8x8 px with 1280 slower).
PHASE_MIN_PIXELS, PHASE_MIN_SIDE = 512, 8


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(2, 2, Cout, Cin, 2, 2): the 2x2 kernel of each output phase (row a, column b) of upsample_conv."""
    w = weight.float()
    kernels = w.new_empty(2, 2, *w.shape[:2], 2, 2)
    for a, rows in enumerate(_PHASE_TAPS):
        for i, row_taps in enumerate(rows):
            r = functools.reduce(torch.add, (w[:, :, j] for j in row_taps))  # (Cout, Cin, 3): summed rows
            for b, cols in enumerate(_PHASE_TAPS):
                for k, col_taps in enumerate(cols):
                    kernels[a, b, :, :, i, k] = functools.reduce(torch.add, (r[..., j] for j in col_taps))
    return kernels.to(weight.dtype)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2), weight, bias, padding=1) as four 2x2 convolutions of x, one per
    output phase: 16 multiply-adds per output and input channel instead of 36 (sub-pixel convolution)."""
    B, _, H, W = x.shape
    kernels = phase_kernels(weight)
    xp = F.pad(x, (1, 1, 1, 1))
    out = x.new_empty(B, weight.shape[0], H, 2, W, 2)  # (B, Cout, H, row phase, W, column phase)
    for a in (0, 1):
        for b in (0, 1):  # one phase at a time into its strided place: peak memory ~ the output alone
            out[:, :, :, a, :, b] = F.conv2d(xp[:, :, a : a + H + 1, b : b + W + 1], kernels[a, b], bias)
    return out.view(B, -1, 2 * H, 2 * W)


def make_resblock(cfg: UNetConfig, in_ch: int, out_ch: int, output_scale: float = 1.0) -> ResBlock:
    return ResBlock(
        in_ch, out_ch, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn,
        cfg.dropout, cfg.resnet_time_scale_shift, output_scale,
    )  # fmt: skip


def make_transformer(cfg: UNetConfig, level: int, channels: int, only_cross: bool) -> SpatialTransformer:
    n = len(cfg.block_out_channels)
    heads = cfg.heads[level]
    return SpatialTransformer(
        channels, heads, channels // heads, per_level(cfg.cross_attention_dim, n)[level],
        per_level(cfg.transformer_layers_per_block, n)[level], cfg.norm_num_groups,
        cfg.use_linear_projection, only_cross, cfg.upcast_attention, cfg.dropout,
    )  # fmt: skip


class Level(nn.Module):
    """One U-Net resolution: resnets, each optionally followed by a spatial transformer, then a resampler.

    `in_chs` lists each resnet's input width (up levels include the concatenated skip).
    """

    def __init__(self, cfg: UNetConfig, level: int, in_chs: list[int], out_ch: int, attn: bool, up: bool):
        super().__init__()
        n = len(cfg.block_out_channels)
        self.resnets = nn.ModuleList(make_resblock(cfg, c, out_ch) for c in in_chs)
        if attn:
            only_cross = per_level(cfg.only_cross_attention, n)[level]
            self.attentions = nn.ModuleList(make_transformer(cfg, level, out_ch, only_cross) for _ in in_chs)
        last = level == (0 if up else n - 1)  # no resampling past the finest (up) or coarsest (down) level
        if not last and up:
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])
        elif not last:
            self.downsamplers = nn.ModuleList([Downsample(out_ch, cfg.downsample_padding)])

    def pairs(self):
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        return zip(self.resnets, attentions, strict=True)


class MidBlock(nn.Module):
    """resnets.0 -> attentions.0 -> resnets.1 at the coarsest resolution (UNetMidBlock2DCrossAttn)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c = cfg.block_out_channels[-1]
        self.resnets = nn.ModuleList(make_resblock(cfg, c, c, cfg.mid_block_scale_factor) for _ in (0, 1))
        self.attentions = nn.ModuleList([make_transformer(cfg, -1, c, only_cross=False)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        return self.resnets[1](self.attentions[0](h, context, repeats), repeat_batch(temb, repeats))


class UNet(nn.Module):
    """eps/v-prediction U-Net: (noisy latents, timestep, text context) -> (B, out_channels, H, W)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        n = len(ch)
        layers = per_level(cfg.layers_per_block, n)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, cfg.act_fn)

        self.down_blocks = nn.ModuleList()
        skip_channels = [ch[0]]  # widths of the tensors the down path hands to the up path
        for i, block_type in enumerate(cfg.down_block_types):
            in_channels = [ch[max(i - 1, 0)]] + [ch[i]] * (layers[i] - 1)
            level = Level(cfg, i, in_channels, ch[i], attn=block_type.startswith("CrossAttn"), up=False)
            self.down_blocks.append(level)
            skip_channels += [ch[i]] * (layers[i] + (i < n - 1))

        self.mid_block = MidBlock(cfg)

        self.up_blocks = nn.ModuleList()
        for j, block_type in enumerate(cfg.up_block_types):
            i = n - 1 - j  # the level this up block mirrors
            prev = ch[min(i + 1, n - 1)]
            skips = [skip_channels.pop() for _ in range(layers[i] + 1)]
            in_channels = [(prev if k == 0 else ch[i]) + s for k, s in enumerate(skips)]
            self.up_blocks.append(Level(cfg, i, in_channels, ch[i], attn=block_type.startswith("CrossAttn"), up=True))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_act = activation(cfg.act_fn)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute resnets and transformers in the backward pass (training mode only) to save memory."""
        set_gradient_checkpointing(self, True)

    def disable_gradient_checkpointing(self) -> None:
        set_gradient_checkpointing(self, False)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        sample_repeats: int = 1,
    ) -> torch.Tensor:
        """Predict for `sample` (B, C, H, W) at `timestep` given the text context (B * sample_repeats, T, D).

        With sample_repeats k > 1 the result equals forward(sample.repeat(k, 1, 1, 1), ...): context row
        j * B + i belongs to sample i, as in classifier-free guidance's [unconditional, conditional] batch.
        Everything before the first layer that reads the context is the same for all k copies, so it runs
        once on B rows and the batch is widened to k * B there (a shared prefix of the network).
        """
        cfg, context, k = self.config, encoder_hidden_states, sample_repeats
        if context.shape[0] != k * sample.shape[0]:
            raise ValueError(
                f"encoder_hidden_states has {context.shape[0]} rows; with {sample.shape[0]} samples and "
                f"sample_repeats={k} it needs {k * sample.shape[0]}"
            )
        # 1. time embedding: a number, a 0-d tensor or one timestep per sample
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(sample.shape[0])
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(emb.to(sample.dtype))

        # 2. down path, keeping every intermediate as a skip; the first attention widens the batch
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        h = self.conv_in(sample)
        skips = [h]
        for level in self.down_blocks:
            for resnet, attn in level.pairs():
                h = resnet(h, temb)
                if attn is not None:
                    h, temb, k = attn(h, context, k), repeat_batch(temb, k), 1
                skips.append(h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
                skips.append(h)

        # 3. bottleneck
        h, temb = self.mid_block(h, temb, context, k), repeat_batch(temb, k)

        # 4. up path, concatenating the skips in reverse order (skips from before the widening repeated)
        for level in self.up_blocks:
            for resnet, attn in level.pairs():
                skip = skips.pop()
                h = resnet(torch.cat([h, repeat_batch(skip, h.shape[0] // skip.shape[0])], dim=1), temb)
                h = attn(h, context) if attn is not None else h
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h, size=skips[-1].shape[-2:])

        return self.conv_out(self.conv_act(self.conv_norm_out(h)))
