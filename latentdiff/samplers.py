"""Samplers ddpm, ddim, euler, euler_a, heun, dpmpp_2m (+ Karras sigmas), each matching its diffusers twin."""

from __future__ import annotations

import numpy as np
import torch

from latentdiff.config import UnsupportedConfigError
from latentdiff.schedules import (
    ScheduleConfig,
    alphas_cumprod,
    karras_sigmas,
    sigma_to_timestep,
    spaced_timesteps,
    train_sigmas,
)


def per_image_noise(like: torch.Tensor, generators: list[torch.Generator] | None, dtype: torch.dtype) -> torch.Tensor:
    """N(0, I) noise shaped like `like`; image k comes from generators[k] alone (batch-size invariant)."""
    if generators is None:
        return torch.randn(like.shape, device=like.device, dtype=dtype)
    if len(generators) != like.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {like.shape[0]}; pass one per image")
    one = (1, *like.shape[1:])
    return torch.cat([torch.randn(one, generator=g, device=g.device, dtype=dtype) for g in generators]).to(like.device)


class Sampler:
    """Base class: a schedule, the inference timesteps, and a counter of the steps taken."""

    description = ""
    options: tuple[str, ...] = ()  # keyword options make_sampler passes on
    supports_karras = True
    stochastic = False

    def __init__(self, config: ScheduleConfig, karras: bool = False):
        if karras and not self.supports_karras:
            raise ValueError(
                f"{type(self).__name__} steps on the training timestep grid and has no Karras sigmas; "
                "use karras=False, or one of euler, euler_a, heun, dpmpp_2m"
            )
        self.config = config
        self.karras = karras
        self.timesteps = torch.empty(0)
        self.init_noise_sigma = 1.0
        self._index = 0

    def set_timesteps(self, num_steps: int) -> None:
        T = self.config.num_train_timesteps
        if not 0 < num_steps <= T:
            raise ValueError(f"num_steps must be between 1 and num_train_timesteps={T}, got {num_steps}")
        self._index = 0
        self._set_timesteps(int(num_steps))
        problem = self._problem()
        if problem is not None:
            # near T, "leading" spacing with steps_offset reaches t = T, and neighbouring steps can share a noise
            # level (diffusers fails the same way: an IndexError, or NaN latents and a black image)
            most = int(num_steps) - 1
            while most > 1:  # a few tries: only the top few counts fail
                self._set_timesteps(most)
                if self._problem() is None:
                    break
                most -= 1
            raise ValueError(
                f"steps={num_steps} is too many for this sampler and schedule ({problem}); use at most {most}"
            )

    def _set_timesteps(self, num_steps: int) -> None:
        raise NotImplementedError

    def _problem(self) -> str | None:
        """Why the timesteps just set cannot be sampled, or None."""
        return None

    def _current(self, t) -> int:
        """Index of this step; t must be the next of self.timesteps."""
        if self._index >= len(self.timesteps):
            raise RuntimeError("no timesteps left: call set_timesteps() before sampling (again)")
        expected = self.timesteps[self._index]
        if float(t) != float(expected):
            raise ValueError(
                f"step {self._index} expects timestep {expected.item()}, got {t}; iterate sampler.timesteps"
            )
        return self._index

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        return x

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generators=None) -> torch.Tensor:
        raise NotImplementedError


def _refuse_clip(config: ScheduleConfig, name: str) -> None:
    if config.clip_sample:
        raise UnsupportedConfigError(
            f"scheduler config key 'clip_sample' = True (clamp x0 to +-{config.clip_sample_range}) is not "
            f"supported by the {name} sampler; latent models use clip_sample = false"
        )


def predict_x0_eps(config: ScheduleConfig, model_output, x, alpha_bar):
    """(x0, eps) from the U-Net output, with x = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."""
    beta_bar = 1 - alpha_bar
    if config.prediction_type == "epsilon":
        eps = model_output
        x0 = (x - beta_bar**0.5 * eps) / alpha_bar**0.5
    elif config.prediction_type == "sample":
        x0 = model_output
        eps = (x - alpha_bar**0.5 * x0) / beta_bar**0.5
    else:  # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)
        x0 = alpha_bar**0.5 * x - beta_bar**0.5 * model_output
        eps = alpha_bar**0.5 * model_output + beta_bar**0.5 * x
    return x0, eps


class _TableSampler(Sampler):
    """A sampler that looks each timestep up in the training schedule's tables (no interpolation)."""

    def _problem(self) -> str | None:
        T = self.config.num_train_timesteps
        if len(self.timesteps) and int(self.timesteps.max()) > T - 1:
            return f"a timestep of {int(self.timesteps.max())} is past the last trained one, {T - 1}"
        return None


class DDPM(_TableSampler):
    """Ancestral sampling of the reverse process, Ho et al. 2020, Algorithm 2 (variance beta-tilde, eq. 7)."""

    description = "DDPM (Ho et al. 2020): ancestral sampling, stochastic; needs many steps"
    supports_karras = False
    stochastic = True

    def __init__(self, config: ScheduleConfig, karras: bool = False):
        super().__init__(config, karras)
        _refuse_clip(config, "ddpm")
        self.alphas_cumprod = alphas_cumprod(config)

    def _set_timesteps(self, num_steps: int) -> None:
        self.timesteps = torch.from_numpy(np.round(spaced_timesteps(self.config, num_steps)).astype(np.int64))

    def step(self, model_output, t, x, generators=None):
        i = self._current(t)
        t = int(self.timesteps[i])
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        ab_t = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        alpha_t = ab_t / ab_prev  # of the (possibly skipped) step t -> prev_t
        beta_t = 1 - alpha_t
        # 1. predict x0
        x0, _ = predict_x0_eps(self.config, model_output, x, ab_t)
        # 2. posterior mean mu~(x_t, x0), eq. 7
        mean = (ab_prev**0.5 * beta_t / (1 - ab_t)) * x0 + (alpha_t**0.5 * (1 - ab_prev) / (1 - ab_t)) * x
        # 3. add sqrt(beta~_t) z, beta~_t = (1 - ab_prev) / (1 - ab_t) beta_t, except at t = 0
        if t > 0:
            variance = torch.clamp((1 - ab_prev) / (1 - ab_t) * beta_t, min=1e-20)
            mean = mean + variance**0.5 * per_image_noise(model_output, generators, model_output.dtype)
        self._index += 1
        return mean


class DDIM(_TableSampler):
    """DDIM, Song et al. 2021, eq. 12 (eta = 0 deterministic, eta = 1 DDPM-like noise, eq. 16)."""

    description = "DDIM (Song et al. 2021): deterministic at eta=0 (option eta adds noise)"
    options = ("eta",)
    supports_karras = False

    def __init__(self, config: ScheduleConfig, karras: bool = False, eta: float = 0.0):
        super().__init__(config, karras)
        _refuse_clip(config, "ddim")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.stochastic = self.eta > 0
        self.alphas_cumprod = alphas_cumprod(config)
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def _set_timesteps(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self.timesteps = torch.from_numpy(np.round(spaced_timesteps(self.config, num_steps)).astype(np.int64))

    def step(self, model_output, t, x, generators=None):
        i = self._current(t)
        t = int(self.timesteps[i])
        # previous timestep is t - T // n for every spacing, as diffusers' DDIMScheduler
        prev_t = t - self.config.num_train_timesteps // self.num_steps
        ab_t = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        # 1. predicted x0 and eps
        x0, eps = predict_x0_eps(self.config, model_output, x, ab_t)
        # 2. sigma_t(eta) = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev), eq. 16
        std = self.eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
        # 3. x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma_t^2) eps (+ sigma_t z), eq. 12
        x_prev = ab_prev**0.5 * x0 + (1 - ab_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * per_image_noise(model_output, generators, model_output.dtype)
        self._index += 1
        return x_prev


class _SigmaSampler(Sampler):
    """Karras et al. 2022 form: x = x0 + sigma eps at noise level sigma; U-Net input x / sqrt(sigma^2 + 1)."""

    def _set_timesteps(self, num_steps: int) -> None:
        train = train_sigmas(self.config).numpy()
        timesteps = spaced_timesteps(self.config, num_steps).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
        if self.karras:  # range of the spaced sigmas, respaced by eq. 5; timesteps follow the sigmas
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_steps)
            timesteps = sigma_to_timestep(sigmas, np.log(train))
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps.astype(np.float32))
        # x_T = sigma_max eps, but "leading" never visits t = T-1, so SD's recipe scales by sqrt(sigma^2 + 1)
        sigma_max = self.sigmas.max()
        if self.config.timestep_spacing != "leading":
            self.init_noise_sigma = float(sigma_max)
        else:
            self.init_noise_sigma = float((sigma_max**2 + 1) ** 0.5)

    def scale_model_input(self, x, t):
        sigma = self.sigmas[self._current(t)]
        return x / (sigma**2 + 1) ** 0.5

    def _denoised(self, model_output, x, sigma):
        """D(x; sigma), the x0 estimate, from an eps, v or x0 prediction."""
        if self.config.prediction_type == "epsilon":
            return x - sigma * model_output
        if self.config.prediction_type == "v_prediction":  # with x_vp = x / sqrt(sigma^2 + 1)
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        return model_output


class Euler(_SigmaSampler):
    """Euler, Karras et al. 2022, Algorithm 1 without the 2nd-order correction (steps 8-10)."""

    description = "Euler (Karras et al. 2022): first-order ODE solver, deterministic"

    def step(self, model_output, t, x, generators=None):
        i = self._current(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.to(torch.float32)
        # 1. denoise, 2. d = (x - D) / sigma (eq. 3), 3. x_next = x + (sigma_next - sigma) d
        d = (x - self._denoised(model_output, x, sigma)) / sigma
        x_next = x + d * (sigma_next - sigma)
        self._index += 1
        return x_next.to(model_output.dtype)


class EulerAncestral(_SigmaSampler):
    """Euler ancestral: Euler to sigma_down, then noise of std sigma_up (Ho et al. 2020 in sigma form)."""

    description = "Euler ancestral: Euler step plus fresh noise each step, stochastic"
    stochastic = True

    def step(self, model_output, t, x, generators=None):
        i = self._current(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.to(torch.float32)
        # 1. split sigma_next^2 = sigma_down^2 + sigma_up^2 as the DDPM posterior does
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        # 2. Euler step to sigma_down
        d = (x - self._denoised(model_output, x, sigma)) / sigma
        x_next = x + d * (sigma_down - sigma)
        # 3. add noise up to sigma_next (drawn at every step, the last included, as diffusers)
        x_next = x_next + per_image_noise(model_output, generators, model_output.dtype) * sigma_up
        self._index += 1
        return x_next.to(model_output.dtype)


class Heun(_SigmaSampler):
    """Heun's 2nd-order method, Karras et al. 2022, Algorithm 1 (two U-Net calls per step but the last)."""

    description = "Heun (Karras et al. 2022): second-order ODE solver, 2 U-Net calls per step"

    def __init__(self, config: ScheduleConfig, karras: bool = False):
        super().__init__(config, karras)
        _refuse_clip(config, "heun")
        if config.rescale_betas_zero_snr:  # diffusers' HeunDiscreteScheduler has no such option: no twin to match
            raise UnsupportedConfigError(
                "scheduler config key 'rescale_betas_zero_snr' = True is not supported by the heun sampler "
                "(diffusers' Heun ignores it, so the two would sample differently); use euler, dpmpp_2m or ddim"
            )

    def _set_timesteps(self, num_steps: int) -> None:
        super()._set_timesteps(num_steps)
        # every sigma but the first and the final 0 is visited twice: Euler predictor, then corrector
        s, ts = self.sigmas, self.timesteps
        self.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
        self.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
        self._predictor = None  # (x_i, d_i, sigma_next - sigma_i) between the two halves

    def step(self, model_output, t, x, generators=None):
        i = self._current(t)
        if self._predictor is None:
            # 1. Euler predictor from sigma_i to sigma_{i+1} (Alg. 1 steps 5-7)
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            d = (x - self._denoised(model_output, x, sigma)) / sigma
            dt = sigma_next - sigma
            self._predictor = (x, d, dt)
            x_next = x + d * dt
        else:
            # 2. corrector: average the slopes at both ends (Alg. 1 steps 9-10)
            sigma_next = self.sigmas[i]
            d_next = (x - self._denoised(model_output, x, sigma_next)) / sigma_next
            x, d, dt = self._predictor
            self._predictor = None
            x_next = x + (d + d_next) / 2 * dt
        self._index += 1
        return x_next


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the VP process at VE noise level sigma: alpha = 1 / sqrt(sigma^2 + 1)."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (first order at the first and last steps)."""

    description = "DPM-Solver++(2M) (Lu et al. 2022): second-order multistep, deterministic; good at 20-25 steps"

    def _set_timesteps(self, num_steps: int) -> None:
        cfg = self.config
        train = train_sigmas(cfg).numpy()
        if cfg.timestep_spacing == "trailing":
            timesteps = spaced_timesteps(cfg, num_steps)
        else:  # n + 1 points, dropping the one nearest t = 0, as diffusers' DPMSolverMultistepScheduler
            timesteps = spaced_timesteps(cfg, num_steps + 1)[:-1]
        timesteps = np.round(timesteps)
        if self.karras:  # the whole training sigma range, respaced by Karras et al. 2022 eq. 5
            sigmas = karras_sigmas(train[0].item(), train[-1].item(), num_steps)
            timesteps = sigma_to_timestep(sigmas, np.log(train))
            if cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = np.round(timesteps)
        else:
            sigmas = np.interp(timesteps, np.arange(len(train)), train)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64))
        self._prev = None  # (x0 prediction, lambda) of the previous step

    def _problem(self) -> str | None:
        levels = self.sigmas[:-1]
        if bool((levels[1:] >= levels[:-1]).any()):  # the second-order step divides by their log-SNR gap
            return "two steps would share a noise level"
        return None

    def step(self, model_output, t, x, generators=None):
        i = self._current(t)
        alpha_s, sigma_s = _alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)  # half log-SNR
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # +inf at the final sigma 0
        h = lambda_t - lambda_s
        # 1. data prediction x0 (x is the VP sample alpha x0 + sigma eps)
        if self.config.prediction_type == "epsilon":
            x0 = (x - sigma_s * model_output) / alpha_s
        elif self.config.prediction_type == "v_prediction":
            x0 = alpha_s * x - sigma_s * model_output
        else:
            x0 = model_output
        x = x.to(torch.float32)
        # 2. first-order update (DPM-Solver++(1), eq. 8): x_t = sigma_t / sigma_s x - alpha_t (e^-h - 1) x0
        x_next = sigma_t / sigma_s * x - alpha_t * (torch.exp(-h) - 1.0) * x0
        if self._prev is not None and i < len(self.timesteps) - 1:
            # 3. second-order correction with r = h_prev / h: D = x0 + (x0 - x0_prev) / (2 r)
            prev_x0, prev_lambda = self._prev
            r = (lambda_s - prev_lambda) / h
            x_next = x_next - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * ((1.0 / r) * (x0 - prev_x0))
        self._prev = (x0, lambda_s)
        self._index += 1
        return x_next.to(model_output.dtype)


SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "euler": Euler,
    "euler_a": EulerAncestral,
    "heun": Heun,
    "dpmpp_2m": DPMSolverPP2M,
}


def make_sampler(name: str, config: ScheduleConfig, karras: bool = False, **options) -> Sampler:
    """The sampler `name` on schedule `config`; karras=True uses Karras et al. 2022 sigmas (rho = 7)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    cls = SAMPLERS[name]
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ValueError(f"sampler {name!r} has no option(s) {unknown}; it takes {list(cls.options) or 'none'}")
    return cls(config, karras=karras, **options)


def describe_samplers() -> list[tuple[str, str]]:
    """(name, one-line description) for each sampler, for `latentdiff samplers`."""
    return [
        (name, cls.description + ("; karras=True for Karras sigmas" if cls.supports_karras else ""))
        for name, cls in SAMPLERS.items()
    ]
