"""latentdiff: latent text-to-image diffusion in the Stable Diffusion style, on PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LatentDiffusionPipeline", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import latentdiff` (and the CLI's start-up) does not pay for torch + transformers.
    if name == "LatentDiffusionPipeline":
        from latentdiff.pipeline import LatentDiffusionPipeline

        return LatentDiffusionPipeline
    raise AttributeError(f"module 'latentdiff' has no attribute {name!r}")
