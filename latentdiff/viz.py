"""Looking inside: image <-> tensor, figure grids, GIFs, and recorders of what the U-Net sees and attends to.

Used by the notebooks in notebooks/; matplotlib is needed for the figure helpers (`pip install -e .[train]`).

    with record_denoising(pipe, guidance_scale=5.0) as rec, record_cross_attention(pipe.unet) as attn:
        image = pipe("a red circle", guidance_scale=5.0, seed=0)[0]
    rec.x0          # the U-Net's guess of the clean latents at every step
    attn.maps(1)    # (1, T, h, w): cross-attention of each prompt token over the image
"""

from __future__ import annotations

import io
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.attention import Attention
from latentdiff.samplers import predict_x0_eps
from latentdiff.schedules import alphas_cumprod

# ---- images and tensors --------------------------------------------------------------------------------


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float32 in [-1, 1], the VAE's pixel range."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) in [-1, 1] -> PIL RGB (values outside the range are clipped)."""
    x = x[0] if x.ndim == 4 else x
    array = ((x.detach().float().cpu().permute(1, 2, 0) + 1.0) * 127.5).clamp(0, 255).round()
    return Image.fromarray(array.numpy().astype(np.uint8))


@torch.no_grad()
def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """The latents (1, C, h, w) the U-Net works on: the VAE posterior's mode, shifted and scaled; the inverse
    of `pipe.decode_latents`."""
    config = pipe.vae.config
    z = pipe.vae.encode(to_tensor(image).to(pipe.device, pipe.dtype)).mode()
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def latent_channels(z: torch.Tensor, scale: float = 3.0) -> Image.Image:
    """The channels of one latent (1, C, h, w) side by side as gray tiles, mapping [-scale, scale] to [0, 255]."""
    z = z[0].detach().float().cpu()
    tiles = ((z / scale).clamp(-1, 1) + 1) * 127.5
    row = torch.cat(list(tiles), dim=1)  # (h, C * w)
    return Image.fromarray(row.round().numpy().astype(np.uint8)).convert("RGB")


def enlarge(image: Image.Image, factor: int = 4) -> Image.Image:
    """Nearest-neighbour upscaling, so small images stay sharp in a GIF or on a page."""
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def image_row(images: list[Image.Image], gap: int = 2) -> Image.Image:
    """Images side by side on white, `gap` pixels apart."""
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    row = Image.new("RGB", (width, max(im.height for im in images)), "white")
    x = 0
    for im in images:
        row.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return row


# ---- figures -------------------------------------------------------------------------------------------


def show_images(
    images: list[Image.Image],
    titles: list[str] | None = None,
    cols: int | None = None,
    row_labels: list[str] | None = None,
    title_colors: list[str] | None = None,
    size: float = 1.5,
    suptitle: str | None = None,
):
    """A matplotlib figure of `images` in rows of `cols`, with optional titles (wrapped to fit) and row labels."""
    import matplotlib.pyplot as plt

    width = max(8, int(size * 72 / 4.8))  # characters of an 8-point title that fit over one image
    if titles is not None:
        titles = ["\n".join(textwrap.fill(line, width) for line in t.split("\n")) for t in titles]
    title_lines = max((t.count("\n") + 1 for t in titles), default=0) if titles is not None else 0
    cols = cols or len(images)
    rows = -(-len(images) // cols)
    height = rows * (size + 0.15 * title_lines) + (0.3 if suptitle else 0.1)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, height), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(images):
            ax.axis("off")
            continue
        ax.imshow(images[i])
        if titles is not None:
            color = title_colors[i] if title_colors is not None else "black"
            ax.set_title(titles[i], fontsize=8, color=color)
    for r, label in enumerate(row_labels or []):
        axes[r, 0].set_ylabel(label, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def show_attention(image: Image.Image, maps: torch.Tensor, tokens: list[str], size: float = 1.5, cols: int = 8):
    """The image, then each token's attention map (T, h, w) laid over it, in rows of `cols` panels."""
    import matplotlib.pyplot as plt

    panels = len(tokens) + 1
    cols = min(cols, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, (size + 0.3) * rows), squeeze=False)
    axes = axes.flatten()
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    extent = (-0.5, image.width - 0.5, image.height - 0.5, -0.5)
    for ax, m, token in zip(axes[1:], maps, tokens):
        ax.imshow(image.convert("L"), cmap="gray", alpha=0.6)
        ax.imshow(m.float().cpu().numpy(), cmap="jet", alpha=0.55, extent=extent, interpolation="bilinear")
        ax.set_title(token, fontsize=8)
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= panels:
            ax.axis("off")
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, max_bytes: int = 200_000, dpi: int = 90) -> Path:
    """Save a figure as PNG of at most `max_bytes`: with a 256-colour palette, then at lower resolution, if
    needed (noisy pictures compress badly)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(6):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi * 0.85**attempt)
        data = buffer.getvalue()
        if len(data) > max_bytes:
            image = Image.open(io.BytesIO(data)).convert("RGB").quantize(256)
            buffer = io.BytesIO()
            image.save(buffer, format="png", optimize=True)
            data = buffer.getvalue()
        if len(data) <= max_bytes:
            break
    path.write_bytes(data)
    return path


def save_gif(frames: list[Image.Image], path: str | Path, duration_ms: int = 150, hold_last_ms: int = 1500) -> Path:
    """An animated GIF that loops forever, lingering on the last frame."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [duration_ms] * (len(frames) - 1) + [hold_last_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


# ---- recorders -----------------------------------------------------------------------------------------


class DenoisingRecord:
    """What the U-Net saw and predicted at each call: timestep, noisy latents x_t and predicted clean x0."""

    def __init__(self):
        self.timesteps: list[float] = []
        self.x_t: list[torch.Tensor] = []
        self.x0: list[torch.Tensor] = []


@contextmanager
def record_denoising(pipe, guidance_scale: float):
    """Record the predicted x0 at every U-Net call of the pipeline calls made inside the block.

    `guidance_scale` must be the one passed to the pipeline: the guided prediction is recombined from the
    U-Net's two halves (unconditional, conditional) exactly as the pipeline does. The x0 estimate is the
    samplers' own (`x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps`, for any prediction type), with
    alpha_bar at the nearest training timestep.
    """
    record = DenoisingRecord()
    table = alphas_cumprod(pipe.scheduler_config)

    def hook(module, args, output):
        x, t = args[0], args[1]
        if guidance_scale > 1.0:
            x = x.chunk(2)[1] if x.shape[0] == output.shape[0] else x  # the pipeline passes x once
            out_uncond, out_cond = output.chunk(2)
            output = out_uncond + guidance_scale * (out_cond - out_uncond)
        t = float(t)
        alpha_bar = table[min(max(round(t), 0), len(table) - 1)].to(x.device, torch.float32)
        x0, _ = predict_x0_eps(pipe.scheduler_config, output.float(), x.float(), alpha_bar)
        record.timesteps.append(t)
        record.x_t.append(x.detach().float().cpu())
        record.x0.append(x0.detach().cpu())

    handle = pipe.unet.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


class CrossAttentionRecord:
    """Cross-attention probabilities softmax(QK^T / sqrt(d)), averaged over heads, one entry per layer call."""

    def __init__(self):
        self.probs: list[torch.Tensor] = []  # each (B, h*w, T) at that layer's resolution

    def maps(self, num_images: int, size: int | None = None) -> torch.Tensor:
        """(num_images, T, size, size): the mean over all layers and steps of each token's map.

        The pipeline's batch is [unconditional, conditional] when guided, so the conditional maps are
        the last `num_images` rows of each call. `size` defaults to the largest resolution recorded.
        """
        if not self.probs:
            raise RuntimeError("no cross-attention recorded: run the pipeline inside record_cross_attention()")
        sides = [int(round(p.shape[1] ** 0.5)) for p in self.probs]
        size = size or max(sides)
        total = 0
        for p, side in zip(self.probs, sides):
            p = p[-num_images:]
            m = p.transpose(1, 2).reshape(num_images, p.shape[2], side, side)  # (n, T, h, w)
            total = total + torch.nn.functional.interpolate(m, size=(size, size), mode="bilinear")
        return total / len(self.probs)


@contextmanager
def record_cross_attention(unet):
    """Record every cross-attention (`attn2`) map of the U-Net while the block runs, through forward hooks.

    The hook recomputes softmax(QK^T / sqrt(d)) from the layer's own inputs and projections; the layer itself
    (and its fused fast path) is untouched.
    """
    record = CrossAttentionRecord()

    def hook(module, args, output):
        x, context = args[0], args[1]
        B, N, _ = x.shape
        q = module.to_q(x).view(B, N, module.heads, module.head_dim).transpose(1, 2)  # (B, H, N, D)
        k = module.to_k(context).view(B, -1, module.heads, module.head_dim).transpose(1, 2)  # (B, H, T, D)
        probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) / module.head_dim**0.5, dim=-1)
        record.probs.append(probs.mean(dim=1).detach().cpu())  # (B, N, T)

    layers = [m for name, m in unet.named_modules() if name.endswith("attn2") and isinstance(m, Attention)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's tokens as the text encoder sees them, without BOS/EOS/padding; index i is context row i+1."""
    ids = tokenizer.token_ids([prompt])[0][: tokenizer.model_max_length - 2]
    return [t.replace("</w>", "") for t in tokenizer.tokens(ids)]
