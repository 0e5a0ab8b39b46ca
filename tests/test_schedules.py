"""Schedules against diffusers' numbers, and scheduler_config.json reading."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from latentdiff.config import UnsupportedConfigError
from latentdiff.schedules import (
    ScheduleConfig,
    add_noise,
    alphas_cumprod,
    make_betas,
    rescale_zero_terminal_snr,
    snr,
    train_sigmas,
    velocity_target,
)

diffusers = pytest.importorskip("diffusers")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# scheduler/scheduler_config.json as shipped with runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-1
SD15_PNDM = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_DDIM = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        SD,
        {"beta_schedule": "squaredcos_cap_v2"},
        {**SD, "rescale_betas_zero_snr": True},
        {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True, "num_train_timesteps": 500},
    ],
)
def test_betas_and_alphas_cumprod_match_diffusers(kwargs):
    ref = diffusers.DDIMScheduler(**kwargs)
    config = ScheduleConfig(**kwargs)
    betas = make_betas(config)
    assert betas.dtype == torch.float32
    assert torch.equal(betas, ref.betas)
    assert torch.equal(alphas_cumprod(config), ref.alphas_cumprod)


def test_zero_snr_rescale():
    betas = make_betas(ScheduleConfig(**SD))
    rescaled = rescale_zero_terminal_snr(betas)
    ac, ac0 = torch.cumprod(1 - rescaled, 0), torch.cumprod(1 - betas, 0)
    assert ac[-1] == 0  # zero terminal SNR
    assert torch.allclose(ac[0], ac0[0])  # first step unchanged


@pytest.mark.parametrize("zero_snr", [False, True])
def test_train_sigmas_match_euler(zero_snr):
    ref = diffusers.EulerDiscreteScheduler(**SD, rescale_betas_zero_snr=zero_snr)
    sigmas = train_sigmas(ScheduleConfig(**SD, rescale_betas_zero_snr=zero_snr))
    assert torch.isfinite(sigmas).all()
    assert torch.equal(sigmas.flip(0), ref.sigmas[:-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_process_matches_diffusers(dtype):
    ref = diffusers.DDPMScheduler(**SD, rescale_betas_zero_snr=True)
    ac = alphas_cumprod(ScheduleConfig(**SD, rescale_betas_zero_snr=True))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g).to(dtype), torch.randn(4, 3, 5, 5, generator=g).to(dtype)
    t = torch.tensor([0, 17, 500, 999])
    assert torch.equal(add_noise(x0, noise, t, ac), ref.add_noise(x0, noise, t))
    assert torch.equal(velocity_target(x0, noise, t, ac), ref.get_velocity(x0, noise, t))


def test_snr_matches_diffusers_training_utils():
    from diffusers.training_utils import compute_snr

    ref = diffusers.DDPMScheduler(**SD)
    t = torch.tensor([0, 1, 250, 999])
    assert torch.equal(snr(t, alphas_cumprod(ScheduleConfig(**SD))), compute_snr(ref, t))
    ac = alphas_cumprod(ScheduleConfig(**SD))
    assert torch.allclose(snr(t, ac), ac[t] / (1 - ac[t]))


def test_reads_sd15_and_sd21_configs():
    sd15 = ScheduleConfig.from_dict(SD15_PNDM)
    assert (sd15.beta_schedule, sd15.steps_offset, sd15.prediction_type) == ("scaled_linear", 1, "epsilon")
    assert sd15.set_alpha_to_one is False
    sd21 = ScheduleConfig.from_dict(SD21_DDIM)
    assert sd21.prediction_type == "v_prediction"


SAVED_BY = [
    ("DDIMScheduler", {**SD, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    ("DDPMScheduler", {**SD, "clip_sample": False}),
    ("EulerDiscreteScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1}),
    ("EulerAncestralDiscreteScheduler", {**SD, "prediction_type": "v_prediction"}),
    ("HeunDiscreteScheduler", {**SD}),
    ("DPMSolverMultistepScheduler", {**SD, "use_karras_sigmas": True, "rescale_betas_zero_snr": True}),
    ("PNDMScheduler", {**SD, "skip_prk_steps": True}),
]


@pytest.mark.parametrize(("class_name", "kwargs"), SAVED_BY)
def test_reads_configs_saved_by_diffusers(class_name, kwargs):
    saved = json.loads(getattr(diffusers, class_name)(**kwargs).to_json_string())  # what save_config writes
    config = ScheduleConfig.from_dict(saved)
    for key, value in saved.items():
        if hasattr(config, key):
            assert getattr(config, key) == value, key


def test_round_trip():
    config = ScheduleConfig.from_dict(SD21_DDIM)
    d = config.to_dict()
    assert d["_class_name"] == "DDIMScheduler"
    assert ScheduleConfig.from_dict(json.loads(json.dumps(d))) == config
    # diffusers reads it back to the same schedule
    ref = diffusers.DDIMScheduler.from_config(d)
    assert ref.config.prediction_type == "v_prediction" and ref.config.clip_sample is False


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("trained_betas", [0.1] * 1000),
        ("thresholding", True),
        ("timestep_type", "continuous"),
        ("use_beta_sigmas", True),
        ("use_exponential_sigmas", True),
        ("final_sigmas_type", "sigma_min"),
        ("variance_type", "learned_range"),
        ("lambda_min_clipped", -5.1),
        ("sigma_max", 80.0),
        ("some_future_key", 1),
    ],
)
def test_refuses_what_would_sample_differently(key, value):
    with pytest.raises(UnsupportedConfigError, match=key) as err:
        ScheduleConfig.from_dict({**SD15_PNDM, key: value}, where="model/scheduler/scheduler_config.json")
    assert "model/scheduler/scheduler_config.json" in str(err.value)


def test_tolerates_off_values_and_solver_knobs():
    d = {
        **SD15_PNDM,
        "thresholding": False,
        "timestep_type": "discrete",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "solver_order": 3,
        "algorithm_type": "sde-dpmsolver++",
        "use_karras_sigmas": True,
        "dynamic_thresholding_ratio": 0.9,
    }
    assert ScheduleConfig.from_dict(d) == ScheduleConfig.from_dict(SD15_PNDM)  # other classes' meanings


@pytest.mark.parametrize(
    ("key", "value"), [("solver_order", 3), ("algorithm_type", "sde-dpmsolver++"), ("solver_type", "heun")]
)
def test_a_dpm_solver_folder_that_is_not_2m_is_refused(key, value):
    """In a DPMSolverMultistepScheduler folder these knobs change its sampling (up to 152/255 measured)."""
    dpm = {**SD15_PNDM, "_class_name": "DPMSolverMultistepScheduler"}
    assert ScheduleConfig.from_dict({**dpm, "solver_order": 2, "solver_type": "midpoint", "lower_order_final": False})
    with pytest.raises(UnsupportedConfigError, match=re.escape(f"{key!r} = {value!r} makes DPMSolverMultistep")):
        ScheduleConfig.from_dict({**dpm, key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [("beta_schedule", "sigmoid"), ("prediction_type", "flow_prediction"), ("timestep_spacing", "karras")],
)
def test_refuses_unknown_values(key, value):
    with pytest.raises(UnsupportedConfigError, match=f"{key} = '{value}' is not supported; choose from"):
        ScheduleConfig.from_dict({**SD15_PNDM, key: value})
