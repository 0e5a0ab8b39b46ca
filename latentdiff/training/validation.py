"""What a run shows while it trains: sample grids for fixed prompts and seeds, and the loss curve."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Images (all one size) tiled row by row."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def validation_grid(
    pipe, prompts: list[str], seed: int, steps: int, guidance_scale: float | None, resolution: int
) -> Image.Image:
    """One image per prompt, prompt i always with seed `seed + i`, so grids of different steps compare."""
    images = pipe(
        prompts,
        seed=[seed + i for i in range(len(prompts))],
        steps=steps,
        guidance_scale=guidance_scale,
        height=resolution,
        width=resolution,
        progress=False,
    )
    return image_grid(images, cols=min(len(images), 4))


def save_loss_curve(losses: list[float], path: str | Path, skipped: list[int] | None = None) -> Path:
    """Loss per step (light) and its running mean (dark) as a PNG; NaN/inf steps marked on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(losses) + 1))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    finite = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    if finite:
        xs, ys = zip(*finite)
        ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        window = max(1, len(ys) // 20)
        smooth = [
            sum(ys[max(0, i - window + 1) : i + 1]) / len(ys[max(0, i - window + 1) : i + 1]) for i in range(len(ys))
        ]
        ax.plot(xs, smooth, color="tab:blue", linewidth=2, label=f"mean of {window}")
        if min(ys) > 0 and max(ys) / min(ys) > 20:
            ax.set_yscale("log")
    for s in skipped or []:
        ax.axvline(s, color="tab:red", alpha=0.3, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_losses(losses: list[float], out_dir: Path, skipped: list[int] | None = None) -> Path:
    """OUT/losses.csv (step,loss) and OUT/loss_curve.png; the curve's path."""
    curve = save_loss_curve(losses, out_dir / "loss_curve.png", skipped)
    (out_dir / "losses.csv").write_text(
        "step,loss\n" + "".join(f"{i},{v}\n" for i, v in enumerate(losses, 1)), encoding="utf-8"
    )
    return curve
