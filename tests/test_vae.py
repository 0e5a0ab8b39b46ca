"""latentdiff's VAE against diffusers' AutoencoderKL on identical (jittered) random weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from latentdiff.config import UnsupportedConfigError
from latentdiff.testing.tiny import TINY_VAE, jitter
from latentdiff.vae import VAE, DiagonalGaussian, VAEConfig

TOL = 1e-4


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def build_pair(**overrides):
    torch.manual_seed(0)
    ref = AutoencoderKL(**{**TINY_VAE, **overrides}).eval()
    jitter(ref, 1)
    ours = VAE(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def pair():
    return build_pair()


def pixels(batch=2, h=16, w=16):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_encode_matches_diffusers(pair):
    ref, ours = pair
    x = pixels()
    with torch.no_grad():
        expected, got = ref.encode(x).latent_dist, ours.encode(x)
    assert got.mean.shape == (2, 4, 8, 8)
    assert relative_error(got.mean, expected.mean) <= TOL
    assert relative_error(got.logvar, expected.logvar) <= TOL
    assert relative_error(got.kl(), expected.kl()) <= TOL


def test_decode_matches_diffusers(pair):
    ref, ours = pair
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = ours.decode(z), ref.decode(z).sample
    assert got.shape == (2, 3, 16, 12)
    assert relative_error(got, expected) <= TOL


@pytest.mark.parametrize("overrides", [{"mid_block_add_attention": False}, {"use_quant_conv": False}])
def test_variants_match_diffusers(overrides):
    ref, ours = build_pair(**overrides)
    x = pixels(1, 8, 16)
    with torch.no_grad():
        assert relative_error(ours(x)[0], ref(x).sample) <= TOL


def test_forward_samples_reproducibly_with_a_generator(pair):
    _, ours = pair
    x = pixels()
    with torch.no_grad():
        a, posterior = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(3))
        b, _ = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(3))
        mode, _ = ours(x)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, mode)
    assert torch.equal(posterior.mode(), posterior.mean)


def test_diagonal_gaussian_clamps_logvar_and_kl_is_zero_at_the_prior():
    moments = torch.cat([torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), -100.0)], dim=1)
    assert DiagonalGaussian(moments).logvar.min().item() == -30.0
    prior = DiagonalGaussian(torch.zeros(1, 4, 2, 2))
    assert prior.kl().abs().max().item() == 0.0
    assert prior.kl(prior).abs().max().item() == 0.0


def test_downsample_factor(pair):
    assert pair[1].downsample_factor == 2


def test_config_round_trip_through_diffusers(pair):
    _, ours = pair
    rebuilt = AutoencoderKL.from_config(ours.config.to_dict())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert VAEConfig.from_dict(dict(rebuilt.config)) == ours.config


@pytest.mark.parametrize("key, value", [("latents_mean", [0.1, 0.2, 0.3, 0.4]), ("foo_bar", 1)])
def test_unsupported_key_is_refused_by_name(key, value):
    with pytest.raises(UnsupportedConfigError, match=key):
        VAEConfig.from_dict({**TINY_VAE, key: value})


def test_gradient_checkpointing_gives_the_same_gradients():
    _, ours = build_pair()
    ours.train()
    x = pixels()

    def grads():
        ours.zero_grad()
        recon, posterior = ours(x)
        (recon.square().mean() + posterior.kl().mean()).backward()
        return [p.grad.clone() for p in ours.parameters()]

    plain = grads()
    ours.enable_gradient_checkpointing()
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
