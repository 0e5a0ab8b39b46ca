"""Noise schedules: betas, alphas_cumprod, sigmas, timestep spacing, zero-SNR, and the forward process."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from latentdiff.config import UnsupportedConfigError, from_config_dict, to_config_dict

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Keys accepted only at the value(s) that switch their feature off (a different value would change sampling).
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "trained_betas": (None,),  # explicit beta table instead of beta_start/beta_end
    "thresholding": (False,),  # dynamic thresholding of x0 (Imagen), wrong for latents
    "timestep_type": ("discrete",),  # "continuous": U-Net fed 0.25 * log(sigma)
    "use_beta_sigmas": (False,),  # beta-distribution sigma spacing
    "use_exponential_sigmas": (False,),  # log-uniform sigma spacing
    "use_lu_lambdas": (False,),  # uniform-lambda spacing (Lu et al. 2022b)
    "use_flow_sigmas": (False,),  # flow-matching sigmas
    "use_dynamic_shifting": (False,),  # resolution-dependent flow shift
    "final_sigmas_type": ("zero",),  # "sigma_min" stops the last step short of sigma 0
    "interpolation_type": ("linear",),  # "log_linear" respaces Euler sigmas
    "sigma_min": (None,),  # overrides of the Karras sigma range
    "sigma_max": (None,),
    "lambda_min_clipped": (-math.inf,),  # clips the last DPM-Solver timesteps
    "variance_type": (None, "fixed_small"),  # DDPM posterior variance; "learned*" needs a 2C-channel U-Net
}

# What DPM-Solver++(2M) is in diffusers' DPMSolverMultistepScheduler: a folder of that class with other
# values would sample differently there (other scheduler classes give these keys other meanings).
_DPMPP_2M = {"solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint"}

# Keys that change nothing here, whatever their value.
_HARMLESS_KEYS = {
    "skip_prk_steps",  # PNDM's Runge-Kutta warm-up; we have no PNDM
    "use_karras_sigmas",  # a sampler choice, made by make_sampler(karras=...)
    "solver_order",  # DPM-Solver knobs (checked against _DPMPP_2M for DPMSolverMultistepScheduler folders)
    "algorithm_type",
    "solver_type",
    "lower_order_final",  # no effect on 2M while the last sigma is zero
    "euler_at_final",
    "dynamic_thresholding_ratio",  # only read with thresholding=True, which is refused
    "flow_shift",  # only read with flow sigmas / dynamic shifting, which are refused
    "time_shift_type",
}


@dataclass
class ScheduleConfig:
    """The noise schedule of a model, with diffusers' scheduler_config.json key names."""

    num_train_timesteps: int = 1000  # T, number of discrete training timesteps
    beta_start: float = 0.0001  # beta_1
    beta_end: float = 0.02  # beta_T
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" (SD) | "squaredcos_cap_v2" (Nichol & Dhariwal 2021)
    prediction_type: str = "epsilon"  # what the U-Net predicts: "epsilon" | "v_prediction" | "sample" (x0)
    timestep_spacing: str = "leading"  # "leading" | "trailing" | "linspace" (Lin et al. 2023, Table 2)
    steps_offset: int = 0  # added to "leading" timesteps (SD uses 1)
    rescale_betas_zero_snr: bool = False  # rescale betas to zero terminal SNR (Lin et al. 2023, Alg. 1)
    # clamp predicted x0 to +-clip_sample_range (pixel models); refused by ddim/ddpm/heun. diffusers'
    # DDIM/DDPM default is True, but latent models set False, which is our default; to_dict always writes it
    clip_sample: bool = False
    clip_sample_range: float = 1.0  # clamp range when clip_sample
    set_alpha_to_one: bool = True  # DDIM: alpha_cumprod "before t=0" is 1 (else alphas_cumprod[0])
    sample_max_value: float = 1.0  # dynamic-thresholding ceiling (thresholding is refused; kept for round trip)

    def __post_init__(self):
        for key, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
        ):
            if getattr(self, key) not in allowed:
                raise UnsupportedConfigError(
                    f"scheduler config: {key} = {getattr(self, key)!r} is not supported; choose from {list(allowed)}"
                )
        if self.num_train_timesteps < 2:
            raise UnsupportedConfigError(f"scheduler config: num_train_timesteps = {self.num_train_timesteps} < 2")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "scheduler_config.json") -> ScheduleConfig:
        """From a diffusers scheduler config (any scheduler class); refuses what would sample differently."""
        rest = {}
        if d.get("_class_name") == "DPMSolverMultistepScheduler":  # its folder's own sampler must be dpmpp_2m's
            for key, value in _DPMPP_2M.items():
                if d.get(key, value) != value:
                    ours = ", ".join(f"{k} {v}" for k, v in _DPMPP_2M.items())
                    raise UnsupportedConfigError(
                        f"{where}: config key {key!r} = {d[key]!r} makes DPMSolverMultistepScheduler sample "
                        f"differently from latentdiff's dpmpp_2m ({ours}); refusing to load a schedule that would "
                        "sample differently"
                    )
        for key, value in d.items():
            if key in _HARMLESS_KEYS:
                continue
            if key in _OFF_VALUES:
                if value not in _OFF_VALUES[key]:
                    allowed = " or ".join(repr(v) for v in _OFF_VALUES[key])
                    raise UnsupportedConfigError(
                        f"{where}: config key {key!r} = {value!r} is not supported by latentdiff "
                        f"(only {allowed} is); refusing to load a schedule that would sample differently"
                    )
                continue
            rest[key] = value
        return from_config_dict(cls, rest, where)

    def to_dict(self) -> dict[str, Any]:
        return to_config_dict(self, "DDIMScheduler")


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008; Nichol & Dhariwal 2021 eq. 17."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    # beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), capped at max_beta (in float64, then stored as float32)
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0; Lin et al. 2023, Algorithm 1."""
    # 1. sqrt(alpha_bar) from betas
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    # 2. shift so the last is 0, scale so the first is unchanged
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    # 3. back to betas: alpha_t = alpha_bar_t / alpha_bar_{t-1}
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    """beta_1..beta_T in float32 (DDPM, Ho et al. 2020; "scaled_linear" is linear in sqrt(beta), as SD)."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = cosine_betas(T)
    else:
        raise UnsupportedConfigError(f"beta_schedule {config.beta_schedule!r}; choose from {list(BETA_SCHEDULES)}")
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float32; exactly 0 at t = T-1 under zero-SNR."""
    return torch.cumprod(1.0 - make_betas(config), dim=0)


def train_sigmas(config: ScheduleConfig) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), t = 0..T-1 (float32); Karras et al. 2022 VE form.

    Under zero-SNR alpha_bar_{T-1} = 0 would make sigma infinite; like diffusers it is set to 2**-24 first.
    """
    ac = alphas_cumprod(config)
    if config.rescale_betas_zero_snr:
        ac[-1] = 2**-24
    return ((1 - ac) / ac) ** 0.5


def spaced_timesteps(config: ScheduleConfig, num_steps: int) -> np.ndarray:
    """Descending float64 inference timesteps; Lin et al. 2023, Table 2 ("linspace" left unrounded)."""
    T = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, num_steps)[::-1].copy()
    if config.timestep_spacing == "leading":
        return (np.arange(num_steps) * (T // num_steps))[::-1].astype(np.float64) + config.steps_offset
    if config.timestep_spacing == "trailing":
        return np.round(np.arange(T, 0, -T / num_steps)) - 1
    raise UnsupportedConfigError(f"timestep_spacing {config.timestep_spacing!r}; choose from {list(TIMESTEP_SPACINGS)}")


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho; Karras et al. 2022 eq. 5."""
    ramp = np.linspace(0, 1, num_steps)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of `sigmas`, interpolating log(sigma) linearly over the training table."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    # index of the last training log-sigma <= log_sigma (the table ascends with t), kept inside [0, T-2]
    low = np.clip(np.searchsorted(log_train_sigmas, log_sigma, side="right") - 1, 0, len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] reshaped to broadcast over `like` (B, ...)."""
    v = values.to(device=like.device, dtype=like.dtype)[t.to(like.device)].flatten()
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps; Ho et al. 2020 eq. 4 (q(x_t | x_0))."""
    ab = _per_sample(alphas_cumprod, t, x0)  # cast to x0's dtype first, as diffusers
    return ab**0.5 * x0 + (1 - ab) ** 0.5 * noise


def velocity_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0; Salimans & Ho 2022, section 4."""
    ab = _per_sample(alphas_cumprod, t, x0)
    return ab**0.5 * noise - (1 - ab) ** 0.5 * x0


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), float32, shaped like t; for Min-SNR (Hang et al. 2023)."""
    alpha = (alphas_cumprod**0.5).to(t.device)[t].float()
    sigma = ((1.0 - alphas_cumprod) ** 0.5).to(t.device)[t].float()
    return (alpha / sigma) ** 2
