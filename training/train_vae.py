"""Train the autoencoder from scratch: `python training/train_vae.py --help`; `accelerate launch` for many."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's latentdiff, installed or not

from latentdiff.training.vae_train import main  # noqa: E402

raise SystemExit(main())
