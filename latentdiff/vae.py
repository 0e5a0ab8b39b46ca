"""KL-regularised autoencoder (Kingma & Welling 2014; Rombach et al. 2022, sec. 3) with diffusers' names.

`VAE(config).state_dict()` has exactly the keys and shapes of diffusers' `AutoencoderKL`, so Stable
Diffusion VAE weights load with `load_state_dict(strict=True)`. Pixels are in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from latentdiff.attention import VAEAttention, set_gradient_checkpointing
from latentdiff.config import UnsupportedConfigError, from_config_dict, to_config_dict
from latentdiff.unet import Downsample, ResBlock, Upsample, activation

# AutoencoderKL keys for features latentdiff does not implement, with their "off" value.
VAE_TOLERATED = {"latents_mean": None, "latents_std": None}
EPS = 1e-6  # GroupNorm epsilon everywhere in SD's autoencoder


@dataclass
class VAEConfig:
    """AutoencoderKL's config.json keys (diffusers' names)."""

    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)  # one per level
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)  # one per level, coarsest first
    block_out_channels: tuple[int, ...] = (64,)  # channels per level
    layers_per_block: int = 1  # resnets per encoder level (decoder levels have one more)
    act_fn: str = "silu"  # activation everywhere
    latent_channels: int = 4  # channels of the latent z
    norm_num_groups: int = 32  # GroupNorm groups
    sample_size: int | tuple[int, int] = 32  # image size the model was trained at (informational)
    scaling_factor: float = 0.18215  # latents are multiplied by this before the U-Net sees them
    shift_factor: float | None = None  # subtracted from latents before scaling (None: 0)
    force_upcast: bool = True  # run this VAE in float32 even when the pipeline is in half precision
    use_quant_conv: bool = True  # 1x1 conv on the encoder's moments
    use_post_quant_conv: bool = True  # 1x1 conv on z before decoding
    mid_block_add_attention: bool = True  # self-attention in the encoder/decoder mid blocks

    def __post_init__(self):
        for key, values, allowed in (
            ("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", self.up_block_types, "UpDecoderBlock2D"),
        ):
            for value in values:
                if value != allowed:
                    raise UnsupportedConfigError(f"{key}: {value!r} is not supported; only {allowed!r} is")
        if not len(self.down_block_types) == len(self.block_out_channels) == len(self.up_block_types):
            raise ValueError("down_block_types and up_block_types need one entry per block_out_channels")
        activation(self.act_fn)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        return from_config_dict(cls, d, "vae/config.json", tolerated=VAE_TOLERATED)

    def to_dict(self) -> dict[str, Any]:
        return to_config_dict(self, "AutoencoderKL")


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), the encoder's posterior."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as SD does, to keep exp() finite
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps (reparameterisation); eps drawn on the generator's device."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over (C, H, W); `other` defaults to N(0, I)."""
        if other is None:
            return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )


class MidBlock(nn.Module):
    """resnets.0 -> attentions.0 (single-head self-attention) -> resnets.1."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(channels, channels, None, groups, EPS, act_fn) for _ in range(2))
        self.attentions = nn.ModuleList([VAEAttention(channels, groups, EPS)] if add_attention else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h)
        for attn in self.attentions:
            h = attn(h)
        return self.resnets[1](h)


class Level(nn.Module):
    """Resnets at one resolution, then an optional stride-2 downsampler or x2 upsampler."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, cfg: VAEConfig, resample: str | None):
        super().__init__()
        groups, act = cfg.norm_num_groups, cfg.act_fn
        self.resnets = nn.ModuleList(
            ResBlock(in_channels if k == 0 else out_channels, out_channels, None, groups, EPS, act)
            for k in range(num_layers)
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=0)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_channels)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(h)
        for resample in getattr(self, "downsamplers", []) or getattr(self, "upsamplers", []):
            h = resample(h)
        return h


class Encoder(nn.Module):
    """Pixels (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H / f, W / f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg, "down" if i < n - 1 else None) for i in range(n)
        )
        self.mid_block = MidBlock(ch[-1], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=EPS)
        self.conv_act = activation("silu")
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> pixels (B, out_channels, h * f, w * f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n = cfg.block_out_channels[::-1], len(cfg.block_out_channels)  # coarsest first
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            Level(ch[max(j - 1, 0)], ch[j], cfg.layers_per_block + 1, cfg, "up" if j < n - 1 else None)
            for j in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=EPS)
        self.conv_act = activation("silu")
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class VAE(nn.Module):
    """encode: pixels in [-1, 1] -> DiagonalGaussian over latents; decode: latents -> pixels."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        latent = config.latent_channels
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute resnets and attention in the backward pass (training mode only) to save memory."""
        set_gradient_checkpointing(self, True)

    def disable_gradient_checkpointing(self) -> None:
        set_gradient_checkpointing(self, False)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
