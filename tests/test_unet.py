"""latentdiff's U-Net against diffusers' UNet2DConditionModel on identical (jittered) random weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from latentdiff import conv_gemm
from latentdiff import unet as unet_module
from latentdiff.config import UnsupportedConfigError
from latentdiff.testing.tiny import SD1_UNET, SD2_UNET, jitter
from latentdiff.unet import UNet, UNetConfig, upsample_conv

TOL = 1e-4

# name -> (diffusers kwargs, overrides for our config on top of them, sample height/width)
CASES = {
    "sd1": (SD1_UNET, {}, (8, 8)),
    "sd2": (SD2_UNET, {}, (8, 8)),
    # diffusers refuses num_attention_heads; its attention_head_dim means the same thing (head counts)
    "explicit_heads": ({**SD1_UNET, "attention_head_dim": (2, 4)}, {"num_attention_heads": (2, 4)}, (8, 8)),
    "two_transformer_layers": ({**SD1_UNET, "transformer_layers_per_block": (2, 1)}, {}, (8, 8)),
    "three_levels_non_square": (
        {
            **SD2_UNET,
            "layers_per_block": 1,
            "cross_attention_dim": 24,
            "resnet_time_scale_shift": "scale_shift",
        },
        {},
        (8, 16),
    ),
    "odd_size": (SD2_UNET, {}, (6, 10)),  # 6 -> 3 -> 2 and back: upsampling to the skip's size
    # no attention at the finest level (the bundled model's layout): the shared prefix spans a level
    "plain_first_level": (
        {
            **SD1_UNET,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        },
        {},
        (8, 8),
    ),
    "only_cross_attention": ({**SD1_UNET, "only_cross_attention": True}, {}, (8, 8)),
}


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def build_pair(name: str):
    kwargs, overrides, size = CASES[name]
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**kwargs).eval()
    jitter(ref, 1)
    ours = UNet(UNetConfig.from_dict({**dict(ref.config), **overrides})).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours, size


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    return build_pair(request.param)


def inputs(ref, size, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ctx_dim = ref.config.cross_attention_dim
    x = torch.randn(batch, ref.config.in_channels, *size, generator=gen)
    return x, torch.randn(batch, 5, ctx_dim, generator=gen)


def test_matches_diffusers_per_sample_timesteps(pair):
    ref, ours, size = pair
    x, ctx = inputs(ref, size)
    t = torch.tensor([3, 871])
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert got.shape == expected.shape == x.shape
    assert relative_error(got, expected) <= TOL


def test_matches_diffusers_with_phase_upsampling(pair, monkeypatch):
    """The sub-pixel upsampler (used above PHASE_MIN_PIXELS, i.e. not at these tiny sizes) forced on."""
    monkeypatch.setattr(unet_module, "PHASE_MIN_PIXELS", 0)
    monkeypatch.setattr(unet_module, "PHASE_MIN_SIDE", 0)
    ref, ours, size = pair
    x, ctx = inputs(ref, size, seed=5)
    t = torch.tensor([3, 871])
    with torch.no_grad():
        assert relative_error(ours(x, t, ctx), ref(x, t, ctx).sample) <= TOL


def test_matches_diffusers_with_gemm_convs(pair, monkeypatch):
    """The im2col convolution (used for >= 1024 input channels, i.e. not at these tiny sizes) forced on."""
    monkeypatch.setattr(conv_gemm, "GEMM_MIN_IN_CHANNELS", 0)
    monkeypatch.setattr(conv_gemm, "GEMM_MAX_PIXELS", 10**6)
    used = []
    monkeypatch.setattr(conv_gemm, "gemm_conv", lambda *a, real=conv_gemm.gemm_conv: used.append(1) or real(*a))
    ref, ours, size = pair
    x, ctx = inputs(ref, size, seed=6)
    t = torch.tensor([3, 871])
    with torch.no_grad():
        assert relative_error(ours(x, t, ctx), ref(x, t, ctx).sample) <= TOL
    assert len(used) >= 2 * len(ref.config.block_out_channels)  # every resnet's convs went that way


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 4, 1, 1), (3, 6, 16, 16)])
def test_upsample_conv_equals_interpolate_then_conv_with_gradients(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    conv = torch.nn.Conv2d(shape[1], 5, 3, padding=1)
    expected = conv(torch.nn.functional.interpolate(x, scale_factor=2.0))
    expected_grad = torch.autograd.grad(expected.square().sum(), conv.weight)[0]
    got = upsample_conv(x, conv.weight, conv.bias)
    got_grad = torch.autograd.grad(got.square().sum(), conv.weight)[0]
    assert got.shape == expected.shape
    assert relative_error(got, expected) < 1e-5
    assert relative_error(got_grad, expected_grad) < 1e-5


@pytest.mark.parametrize("timestep", [500, 250.5, torch.tensor(42), torch.tensor([7])])
def test_matches_diffusers_scalar_timestep(timestep):
    ref, ours, size = build_pair("sd1")
    x, ctx = inputs(ref, size)
    with torch.no_grad():
        assert relative_error(ours(x, timestep, ctx), ref(x, timestep, ctx).sample) <= TOL


def test_sd1_attention_head_dim_means_number_of_heads():
    config = UNetConfig.from_dict(SD1_UNET)
    assert config.heads == (8, 8)
    attn = UNet(config).down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert (attn.heads, attn.head_dim) == (8, 32 // 8)


def test_num_attention_heads_overrides_attention_head_dim():
    config = UNetConfig.from_dict({**SD2_UNET, "num_attention_heads": (1, 2, 4)})
    assert config.heads == (1, 2, 4)
    d = config.to_dict()  # written the way diffusers accepts it
    assert d["attention_head_dim"] == [1, 2, 4] and d["num_attention_heads"] is None


def test_batch_invariance():
    ref, ours, size = build_pair("sd2")
    x, ctx = inputs(ref, size, batch=3)
    t = torch.tensor([1, 500, 999])
    with torch.no_grad():
        whole = ours(x, t, ctx)
        one = ours(x[1:2], t[1:2], ctx[1:2])
    torch.testing.assert_close(whole[1:2], one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sd1", "sd2", "explicit_heads"])
def test_config_round_trip_through_diffusers(name):
    _, ours, _ = build_pair(name)
    rebuilt = UNet2DConditionModel.from_config(ours.config.to_dict())
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == ours_shapes
    assert UNetConfig.from_dict(dict(rebuilt.config)).heads == ours.config.heads


def test_diffusers_config_json_dict_is_accepted():
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**SD2_UNET)
    d = {**dict(ref.config), "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.0"}
    config = UNetConfig.from_dict(d)
    assert config.use_linear_projection and config.block_out_channels == (32, 64, 64)


@pytest.mark.parametrize(
    "key, value", [("class_embed_type", "timestep"), ("addition_embed_type", "text_time"), ("foo_bar", 1)]
)
def test_unsupported_key_is_refused_by_name(key, value):
    with pytest.raises(UnsupportedConfigError, match=key):
        UNetConfig.from_dict({**SD1_UNET, key: value})


def test_unsupported_block_type_is_refused_by_name():
    with pytest.raises(UnsupportedConfigError, match="down_block_types"):
        UNetConfig.from_dict({**SD1_UNET, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})


def test_gradient_checkpointing_gives_the_same_gradients():
    _, ours, size = build_pair("sd1")
    ours.train()
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, *size, generator=gen), torch.randn(2, 5, 32, generator=gen)

    def grads():
        ours.zero_grad()
        ours(x, torch.tensor([10, 20]), ctx).square().mean().backward()
        return [p.grad.clone() for p in ours.parameters()]

    plain = grads()
    ours.enable_gradient_checkpointing()
    assert ours.mid_block.resnets[0].gradient_checkpointing
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("repeats", [2, 3])
def test_sample_repeats_equals_repeated_samples(pair, repeats):
    """One sample for several contexts (classifier-free guidance) gives what the repeated batch gives."""
    _, ours, size = pair
    x, _ = inputs(ours, size, batch=2, seed=3)
    ctx = torch.randn(2 * repeats, 5, ours.config.cross_attention_dim, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        shared = ours(x, t, ctx, sample_repeats=repeats)
        repeated = ours(x.repeat(repeats, 1, 1, 1), t.repeat(repeats), ctx)
    assert shared.shape == repeated.shape
    assert relative_error(shared, repeated) < 1e-5
    assert relative_error(shared[:2], shared[2:4]) > 1e-3  # the contexts differ, so must the outputs


def test_sample_repeats_needs_matching_context_rows():
    _, ours, size = build_pair("sd1")
    x, ctx = inputs(ours, size, batch=2)
    with pytest.raises(ValueError, match=r"encoder_hidden_states has 2 rows; .* sample_repeats=2 it needs 4"):
        ours(x, 500, ctx, sample_repeats=2)
