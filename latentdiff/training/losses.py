"""The denoising loss: noise the latents at a random t, predict eps / v / x0, weighted MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentdiff.schedules import add_noise, snr, velocity_target


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """eps ~ N(0, I) from a CPU generator (same numbers on any device), plus offset noise (Guttenberg 2023)."""
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    return noise.to(latents.device, latents.dtype)


def unknown_prediction_type(prediction_type: str) -> ValueError:
    return ValueError(f"unknown prediction_type {prediction_type!r}; choose from epsilon, v_prediction, sample")


def target_for(prediction_type: str, latents, noise, t, alphas_cumprod) -> torch.Tensor:
    """What the U-Net should output at (x_t, t)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity_target(latents, noise, t, alphas_cumprod)
    if prediction_type == "sample":
        return latents
    raise unknown_prediction_type(prediction_type)


def min_snr_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 9), written for the eps / v / x0 parameterisation.

    The x0-space weight min(SNR, gamma) becomes min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1)
    for v. SNR = 0 (zero-terminal-SNR schedules) would divide by zero for eps; that weight is clamped.
    """
    s = snr(t, alphas_cumprod)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    if prediction_type == "epsilon":
        return clipped / s.clamp(min=1e-8)
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    return clipped


def v_space_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Weights that turn the model's own MSE into the MSE its output would have as a v-prediction.

    An error d in eps is an error d / sqrt(abar) in v, and an error d in x0 one of d / sqrt(1 - abar); in x0
    space that is the weight SNR + 1 at every t. For an eps-model this lifts the noisiest steps, where the
    layout is decided, from the weight SNR (0.005 at t = 999 of the SD schedule) to about 1, while it keeps
    sampling as it was (the parameterisation, and so how the first step sees an all-noise input, is unchanged).
    """
    abar = alphas_cumprod.to(t.device)[t].float()
    if prediction_type == "epsilon":
        return 1.0 / abar.clamp(min=1e-8)
    if prediction_type == "v_prediction":
        return torch.ones_like(abar)
    if prediction_type == "sample":
        return 1.0 / (1.0 - abar).clamp(min=1e-8)
    raise unknown_prediction_type(prediction_type)


def sample_timesteps(
    n: int, steps: int, generator: torch.Generator, timestep_range=None, range_share: float = 1.0
) -> torch.Tensor:
    """n training noise levels: from [lo, hi) with probability `range_share`, else from all of 0..steps-1.
    A share below 1 emphasises a band (the noisy steps, where the layout is decided) without forgetting the
    rest of the schedule, which training on the band alone would let drift."""
    lo, hi = timestep_range or (0, steps)
    t = torch.randint(lo, hi, (n,), generator=generator)
    if range_share < 1.0:
        anywhere = torch.randint(0, steps, (n,), generator=generator)
        t = torch.where(torch.rand(n, generator=generator) < range_share, t, anywhere)
    return t


def diffusion_loss(
    unet,
    latents: torch.Tensor,
    context: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    generator: torch.Generator,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    timestep_range: tuple[int, int] | None = None,
    v_space: bool = False,
    range_share: float = 1.0,
) -> torch.Tensor:
    """One training loss (scalar, float32) for clean latents x0 and their text context; t is drawn from
    `timestep_range` [lo, hi) when given (e.g. only the noisy steps, where the layout is decided) for a
    `range_share` of the samples, the rest from all T; `v_space` weighs each sample as a v-prediction loss
    (see `v_space_weights`), `snr_gamma` as min-SNR."""
    # 1. eps and t ~ U{lo..hi-1} (default all T), both from the training generator
    noise = sample_noise(latents, generator, noise_offset)
    t = sample_timesteps(latents.shape[0], len(alphas_cumprod), generator, timestep_range, range_share)
    t = t.to(latents.device)
    # 2. forward process q(x_t | x_0) (Ho et al. 2020, eq. 4)
    noisy = add_noise(latents, noise, t, alphas_cumprod)
    target = target_for(prediction_type, latents, noise, t, alphas_cumprod)
    # 3. prediction and per-sample MSE
    pred = unet(noisy, t, context)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(t, alphas_cumprod, snr_gamma, prediction_type).to(per_sample.device)
    if v_space:
        per_sample = per_sample * v_space_weights(t, alphas_cumprod, prediction_type).to(per_sample.device)
    return per_sample.mean()
