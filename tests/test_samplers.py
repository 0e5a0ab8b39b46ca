"""Samplers against diffusers' schedulers (the oracle), batch invariance, and errors."""

from __future__ import annotations

import logging

import pytest
import torch

from latentdiff.config import UnsupportedConfigError
from latentdiff.folders import DIFFUSERS_SCHEDULERS
from latentdiff.samplers import SAMPLERS, describe_samplers, make_sampler
from latentdiff.schedules import ScheduleConfig

diffusers = pytest.importorskip("diffusers")
logging.getLogger("diffusers").setLevel(logging.ERROR)  # from_config warns about keys another class ignores

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False)
CONFIGS = {
    "sd1": ScheduleConfig(**SD, steps_offset=1),
    "sd2": ScheduleConfig(**SD, steps_offset=1, prediction_type="v_prediction"),
    "cosine": ScheduleConfig(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"),
    "zero_snr": ScheduleConfig(
        **SD, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
    ),
    "sample": ScheduleConfig(prediction_type="sample", timestep_spacing="trailing"),
}
SHAPE = (2, 4, 6, 6)


def reference(name: str, config: ScheduleConfig, karras: bool = False):
    cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[name])
    extra = {"use_karras_sigmas": True} if karras else {}
    return cls.from_config({**config.to_dict(), **extra})


def fake_unet(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for the U-Net: elementwise in x, so images do not interact."""
    return 0.1 * x + torch.sin(torch.as_tensor(t, dtype=torch.float32) / 100)


def run_ours(sampler, x, generators=None):
    xs = []
    for t in sampler.timesteps:
        out = fake_unet(sampler.scale_model_input(x, t), t)
        x = sampler.step(out, t, x, generators=generators)
        xs.append(x)
    return xs


def run_diffusers(sched, x, **step_kwargs):
    if hasattr(sched, "set_begin_index"):
        # start at index 0: diffusers otherwise looks the first timestep up and, when it repeats (cosine +
        # Karras gives 998 four times), starts at its second occurrence
        sched.set_begin_index(0)
    xs = []
    for t in sched.timesteps:
        out = fake_unet(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, **step_kwargs).prev_sample
        xs.append(x)
    return xs


def assert_same_trajectory(ours, theirs):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.isfinite(a).all(), f"step {i}: not finite"
        tol = 1e-5 * max(1.0, b.abs().max().item())
        err = (a - b).abs().max().item()
        assert err <= tol, f"step {i}: max abs diff {err:.3g} > {tol:.3g}"


DETERMINISTIC = [
    (name, karras)
    for name, karras in [
        ("ddim", False),
        ("euler", False),
        ("heun", False),
        ("dpmpp_2m", False),
        ("euler", True),
        ("heun", True),
        ("dpmpp_2m", True),
    ]
]


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize(("name", "karras"), DETERMINISTIC)
@pytest.mark.parametrize("num_steps", [10, 7])
def test_deterministic_matches_diffusers(name, karras, config_name, num_steps):
    config = CONFIGS[config_name]
    if name == "heun" and config.rescale_betas_zero_snr:
        pytest.skip("diffusers' HeunDiscreteScheduler has no rescale_betas_zero_snr (it ignores the key)")
    ours = make_sampler(name, config, karras=karras)
    theirs = reference(name, config, karras)
    ours.set_timesteps(num_steps)
    theirs.set_timesteps(num_steps)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=0)
    assert float(ours.init_noise_sigma) == float(theirs.init_noise_sigma)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    assert_same_trajectory(
        run_ours(ours, noise * ours.init_noise_sigma), run_diffusers(theirs, noise * theirs.init_noise_sigma)
    )


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("num_steps", [1, 3, 25, 50])
def test_timesteps_match_diffusers(name, spacing, num_steps):
    config = ScheduleConfig(**SD, steps_offset=1, timestep_spacing=spacing)
    ours, theirs = make_sampler(name, config), reference(name, config)
    ours.set_timesteps(num_steps)
    theirs.set_timesteps(num_steps)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=0)


STOCHASTIC = [("euler_a", {}), ("ddpm", {}), ("ddim", {"eta": 0.7})]


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("config_name", ["sd1", "sd2", "zero_snr"])
@pytest.mark.parametrize(("name", "options"), STOCHASTIC)
def test_stochastic_matches_diffusers(name, options, config_name):
    config = CONFIGS[config_name]
    ours, theirs = make_sampler(name, config, **options), reference(name, config)
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    xs = run_ours(ours, noise * ours.init_noise_sigma, generators([5, 6]))
    ref = run_diffusers(theirs, noise * theirs.init_noise_sigma, generator=generators([5, 6]), **options)
    assert_same_trajectory(xs, ref)


@pytest.mark.parametrize(("name", "options"), STOCHASTIC)
def test_batch_invariance(name, options):
    seeds = [11, 12, 13]
    start = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in generators(seeds)])
    sampler = make_sampler(name, CONFIGS["sd1"], **options)
    sampler.set_timesteps(6)
    batch = run_ours(sampler, start * sampler.init_noise_sigma, generators(seeds))[-1]
    for k, seed in enumerate(seeds):
        sampler.set_timesteps(6)
        alone = run_ours(sampler, start[k : k + 1] * sampler.init_noise_sigma, generators([seed]))[-1]
        torch.testing.assert_close(batch[k : k + 1], alone, rtol=0, atol=1e-6)


def test_euler_ancestral_karras_uses_euler_karras_sigmas():
    # diffusers' EulerAncestralDiscreteScheduler has no Karras option; ours shares Euler's (tested) sigmas
    a, e = (
        make_sampler("euler_a", CONFIGS["sd1"], karras=True),
        make_sampler("euler", CONFIGS["sd1"], karras=True),
    )
    a.set_timesteps(12)
    e.set_timesteps(12)
    assert torch.equal(a.sigmas, e.sigmas) and torch.equal(a.timesteps, e.timesteps)


def test_heun_repeats_timesteps():
    s = make_sampler("heun", CONFIGS["sd1"])
    s.set_timesteps(5)
    assert len(s.timesteps) == 2 * 5 - 1
    assert torch.equal(s.timesteps[1::2], s.timesteps[2::2])


def test_unknown_sampler_lists_choices():
    with pytest.raises(ValueError, match=r"unknown sampler 'plms'; choose from \['ddim', 'ddpm', 'dpmpp_2m'"):
        make_sampler("plms", ScheduleConfig())


@pytest.mark.parametrize("num_steps", [0, -3, 1001])
def test_bad_num_steps(num_steps):
    s = make_sampler("euler", ScheduleConfig())
    with pytest.raises(ValueError, match="num_steps must be between 1 and num_train_timesteps=1000"):
        s.set_timesteps(num_steps)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_karras_refused_on_discrete_samplers(name):
    with pytest.raises(ValueError, match="no Karras sigmas"):
        make_sampler(name, ScheduleConfig(), karras=True)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "heun"])
def test_clip_sample_refused_where_it_would_clip(name):
    with pytest.raises(UnsupportedConfigError, match="clip_sample"):
        make_sampler(name, ScheduleConfig(clip_sample=True))
    make_sampler("euler", ScheduleConfig(clip_sample=True))  # euler never clips, in diffusers neither


def test_unknown_option():
    with pytest.raises(ValueError, match=r"sampler 'euler' has no option\(s\) \['eta'\]"):
        make_sampler("euler", ScheduleConfig(), eta=0.5)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        make_sampler("ddim", ScheduleConfig(), eta=-1)


def test_generator_count_and_timestep_order_checked():
    s = make_sampler("euler_a", ScheduleConfig())
    s.set_timesteps(4)
    x = torch.zeros(SHAPE)
    t0, t1 = s.timesteps[0], s.timesteps[1]
    with pytest.raises(ValueError, match="2 generators for a batch of 2|1 generators for a batch of 2"):
        s.step(x, t0, x, generators=generators([1]))
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="expects timestep"):
        s.step(x, t1, x)
    s = make_sampler("ddim", ScheduleConfig())
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(x, 0, x)


def test_describe_samplers():
    described = dict(describe_samplers())
    assert list(described) == list(SAMPLERS)
    assert all(text and "\n" not in text for text in described.values())


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("config_name", ["zero_snr", "sample"])
def test_every_sampler_runs_where_diffusers_has_no_twin(name, config_name):
    # euler_a + "sample" (diffusers raises); heun + zero-SNR is refused: diffusers' Heun ignores
    # rescale_betas_zero_snr, so its images would differ, not be missing
    if (name, config_name) == ("heun", "zero_snr"):
        with pytest.raises(
            UnsupportedConfigError, match="'rescale_betas_zero_snr' = True is not supported by the heun"
        ):
            make_sampler(name, CONFIGS[config_name])
        return
    sampler = make_sampler(name, CONFIGS[config_name])
    sampler.set_timesteps(6)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    xs = run_ours(sampler, noise * sampler.init_noise_sigma, generators([1, 2]))
    assert torch.isfinite(xs[-1]).all()


@pytest.mark.parametrize(("name", "options"), STOCHASTIC)
def test_half_precision_noise_matches_diffusers(name, options):
    config = CONFIGS["sd1"]
    ours, theirs = make_sampler(name, config, **options), reference(name, config)
    ours.set_timesteps(4)
    theirs.set_timesteps(4)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).half()
    xs = run_ours(ours, noise * ours.init_noise_sigma, generators([5, 6]))
    ref = run_diffusers(theirs, noise * theirs.init_noise_sigma, generator=generators([5, 6]), **options)
    assert xs[-1].dtype == ref[-1].dtype == torch.float16
    torch.testing.assert_close(xs[-1], ref[-1], rtol=0, atol=0)
