"""3x3 convolutions as unfold + a matrix product where torch's CPU convolution is slow.

oneDNN's direct convolution, which torch runs for fp32 on the CPU, reaches only 30-90 GFLOP/s on a 2-core
CPU for layers with many input channels on a small picture, the lowest levels of an SD-size U-Net (1280 or
more channels at 8x8 and 4x4 latents; 10-25 GFLOP/s for its stride-2 downsampler to 4x4), against ~200
GFLOP/s on bigger pictures. There the same sum as a matrix product over the unfolded 3x3 neighbourhoods is
1.4-4.6x faster (BENCHMARKS.md, session 17); on bigger pictures or fewer channels the direct convolution
is faster, so nothing else changes.

The results differ from the direct convolution by rounding only (relative ~5e-7). Each image gets its own
product, of the same shape whatever the batch, and the choice depends on the layer and one image's size,
never on the batch, so this layer gives an image the same bits in any batch (oneDNN's convolutions do not
promise that: see the README).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.attention import plain

GEMM_MIN_IN_CHANNELS, GEMM_MAX_PIXELS = 1024, 64


def use_gemm(layer: nn.Module, x: torch.Tensor) -> bool:
    """True where `layer(x)` is better run by `gemm_conv`: a plain 3x3 conv (padding 1, stride 1 or 2) at
    CPU fp32 inference with many input channels and at most GEMM_MAX_PIXELS output pixels per image."""
    if not plain(layer, nn.Conv2d) or torch.is_grad_enabled() or x.device.type != "cpu" or x.dim() != 4:
        return False  # LoRA-wrapped or hooked layers, and anything autograd records, run as they are
    geometry = (layer.kernel_size, layer.padding, layer.dilation)
    if geometry != ((3, 3), (1, 1), (1, 1)) or layer.stride not in ((1, 1), (2, 2)) or layer.groups != 1:
        return False
    if layer.padding_mode != "zeros" or x.dtype != torch.float32 or layer.weight.dtype != torch.float32:
        return False  # measured for fp32 only
    out_pixels = ((x.shape[-2] - 1) // layer.stride[0] + 1) * ((x.shape[-1] - 1) // layer.stride[1] + 1)
    return layer.in_channels >= GEMM_MIN_IN_CHANNELS and out_pixels <= GEMM_MAX_PIXELS


def conv3x3(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """layer(x), as one matrix product where `use_gemm` says it is faster."""
    return gemm_conv(x, layer.weight, layer.bias, layer.stride[0]) if use_gemm(layer, x) else layer(x)


def gemm_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding=1) for a 3x3 kernel as unfold + a matrix product per image."""
    N = x.shape[0]
    H, W = ((n - 1) // stride + 1 for n in x.shape[-2:])
    cols = F.unfold(x, 3, padding=1, stride=stride)  # (N, 9 C, H W): each output pixel's 3x3 neighbourhood
    w = weight.reshape(weight.shape[0], -1).t()  # (9 C, K)
    y = x.new_empty(N, H * W, w.shape[1])
    for n in range(N):  # one product per image: a joint one gave small shapes different last bits per batch
        torch.mm(cols[n].t(), w, out=y[n])
    if bias is not None:
        y = y.add_(bias)
    # NCHW again: a channels-last result would send the next GroupNorm down a different kernel
    return y.transpose(1, 2).contiguous().view(N, -1, H, W)
