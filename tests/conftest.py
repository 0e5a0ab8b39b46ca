import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # With one xdist worker per core, more torch threads per worker only oversubscribe the cores.
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def forked_pids(monkeypatch):
    """The pids of the worker processes latentdiff forks during the test (workers.py, pair.py)."""
    from latentdiff import workers

    started = []
    real_fork = workers.fork

    def recording_fork():
        pid = real_fork()
        if pid:
            started.append(pid)
        return pid

    monkeypatch.setattr(workers, "fork", recording_fork)
    return started
