import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # With one xdist worker per core, more torch threads per worker only oversubscribe the cores.
    import torch

    torch.set_num_threads(1)
