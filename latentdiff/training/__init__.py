"""Training: image-caption data, the Accelerate loop, checkpoints and export (entry point: training/train.py)."""
