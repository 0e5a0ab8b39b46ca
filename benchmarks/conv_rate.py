"""How fast are the bundled U-Net's convolutions, against a plain matmul of the same FLOPs?

    python benchmarks/conv_rate.py [--model weights/shapes-tiny] [--batch 16] [--threads 1]

Records the shape of every Conv2d call in one U-Net forward at the guidance batch, then times each distinct
shape four ways, alternating: PyTorch's convolution (oneDNN), the same in channels_last, im2col (`unfold`)
+ batched matmul, and a bare matmul of the im2col product's size (the FLOP rate a convolution could borrow
from GEMM). Prints GFLOP/s per shape: if the convolution already beats the bare matmul, no other fp32
algorithm will speed it up.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timing import alternate  # noqa: E402


def conv_shapes(unet, batch: int, context_len: int, context_dim: int) -> list[tuple[int, int, int, int, int]]:
    """(in_ch, out_ch, kernel, stride, input size) of every Conv2d call in one forward, first-seen order."""
    seen: dict[tuple, None] = {}

    def hook(module, inputs, _output):
        x = inputs[0]
        seen[(module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0], x.shape[-1])] = None

    handles = [m.register_forward_hook(hook) for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    size = unet.config.sample_size
    with torch.no_grad():
        unet(torch.randn(batch, unet.config.in_channels, size, size), torch.full((batch,), 500),
             torch.randn(batch, context_len, context_dim))  # fmt: skip
    for h in handles:
        h.remove()
    return list(seen)


def rates(shape, batch: int, repeats: int) -> dict[str, float]:
    cin, cout, k, stride, size = shape
    x, w, b = torch.randn(batch, cin, size, size), torch.randn(cout, cin, k, k), torch.randn(cout)
    pad = k // 2
    out = (size + 2 * pad - k) // stride + 1
    flops = 2 * batch * cout * cin * k * k * out * out
    x_cl, w2 = x.contiguous(memory_format=torch.channels_last), w.reshape(cout, -1)
    cols_a, cols_b = torch.randn(batch * out * out, cin * k * k), torch.randn(cin * k * k, cout)

    def im2col():
        cols = F.unfold(x, k, padding=pad, stride=stride)
        return torch.baddbmm(b.view(1, cout, 1), w2.expand(batch, -1, -1), cols)

    inner = 20  # calls per timed sample: one small convolution is too short to time alone

    def many(fn):
        return lambda: [fn() for _ in range(inner)]

    fns = {
        "conv": many(lambda: F.conv2d(x, w, b, stride, pad)),
        "channels_last": many(lambda: F.conv2d(x_cl, w, b, stride, pad)),
        "im2col+bmm": many(im2col),
        "bare matmul": many(lambda: cols_a @ cols_b),
    }
    timed = alternate(fns, repeats)
    return {name: flops * inner / r["median_s"] / 1e9 for name, r in timed.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="weights/shapes-tiny")
    p.add_argument("--batch", type=int, default=16, help="U-Net batch (batch 8 with guidance: 16)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from latentdiff.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32)
    tokens = pipe.tokenizer.model_max_length
    shapes = conv_shapes(pipe.unet, args.batch, tokens, pipe.text_encoder.config.hidden_size)
    names = ("conv", "channels_last", "im2col+bmm", "bare matmul")
    print(f"{'in->out k/s size':>22}  " + "  ".join(f"{n:>13}" for n in names) + "   (GFLOP/s)")
    for shape in shapes:
        cin, cout, k, stride, size = shape
        r = rates(shape, args.batch, args.repeats)
        label = f"{cin}->{cout} {k}/{stride} {size}x{size}"
        print(f"{label:>22}  " + "  ".join(f"{r[n]:13.1f}" for n in names))


if __name__ == "__main__":
    main()
