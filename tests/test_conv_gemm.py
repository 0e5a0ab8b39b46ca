"""The im2col 3x3 convolution for many channels on small pictures (latentdiff/conv_gemm.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentdiff import conv_gemm
from latentdiff.conv_gemm import conv3x3, gemm_conv, use_gemm


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 16, 1, 1), (3, 24, 4, 4)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_equals_conv2d(shape, bias, stride):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    layer = nn.Conv2d(shape[1], 6, 3, padding=1, bias=bias, stride=stride)
    with torch.no_grad():
        expected = layer(x)
        got = gemm_conv(x, layer.weight, layer.bias, stride)
        assert got.shape == expected.shape and got.is_contiguous()
        assert relative_error(got, expected) <= 1e-5


def test_used_where_it_pays_and_nowhere_else():
    big = nn.Conv2d(1024, 8, 3, padding=1)
    x = torch.zeros(2, 1024, 8, 8)
    with torch.no_grad():
        assert use_gemm(big, x)
        assert not use_gemm(big, torch.zeros(2, 1024, 16, 8))  # a bigger picture: the direct conv is faster
        assert not use_gemm(nn.Conv2d(512, 8, 3, padding=1), torch.zeros(2, 512, 8, 8))  # fewer channels
        downsample = nn.Conv2d(1024, 8, 3, padding=1, stride=2)
        assert use_gemm(downsample, torch.zeros(2, 1024, 16, 15))  # 8x8 output pixels
        assert not use_gemm(downsample, torch.zeros(2, 1024, 16, 17))  # 8x9
        assert not use_gemm(nn.Conv2d(1024, 8, 3, padding=1, stride=3), x)
        assert not use_gemm(nn.Conv2d(1024, 8, 1), x)
        assert not use_gemm(big.double(), x.double())
        hooked = nn.Conv2d(1024, 8, 3, padding=1)
        hooked.register_forward_hook(lambda *a: None)
        assert not use_gemm(hooked, x)

        class Wrapped(nn.Conv2d):  # e.g. a LoRA layer: its own forward must run
            pass

        assert not use_gemm(Wrapped(1024, 8, 3, padding=1), x)
    assert not use_gemm(big, x)  # autograd on: the layer runs as it is


def test_an_image_is_the_same_in_any_batch():
    """At a real size (1024 channels at 4x4) and, forced, at a tiny one: image 1 of a batch of 3, bitwise."""
    g = torch.Generator().manual_seed(1)
    for channels, side in ((1024, 4), (7, 3)):
        x = torch.randn(3, channels, side, side, generator=g)
        layer = nn.Conv2d(channels, 5, 3, padding=1)
        with torch.no_grad():
            assert torch.equal(gemm_conv(x, layer.weight, layer.bias)[1:2], gemm_conv(x[1:2], layer.weight, layer.bias))


def test_conv3x3_dispatches(monkeypatch):
    layer = nn.Conv2d(4, 3, 3, padding=1)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        expected = layer(x)
        monkeypatch.setattr(conv_gemm, "GEMM_MIN_IN_CHANNELS", 4)
        calls = []
        monkeypatch.setattr(conv_gemm, "gemm_conv", lambda *a, real=gemm_conv: calls.append(1) or real(*a))
        assert relative_error(conv3x3(layer, x), expected) <= 1e-5 and calls == [1]
        conv3x3(layer, torch.randn(1, 4, 9, 9))  # 81 pixels > GEMM_MAX_PIXELS: the layer itself
        assert calls == [1]
    torch.testing.assert_close(conv3x3(layer, x), F.conv2d(x, layer.weight, layer.bias, padding=1))
