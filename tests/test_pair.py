"""One guided image with its two U-Net rows in two processes: the same image, nothing lost on failure."""

import os

import numpy as np
import pytest
import torch

from latentdiff import LatentDiffusionPipeline, workers
from latentdiff import pair as pairing
from latentdiff.metadata import read_record
from latentdiff.testing.tiny import save_tiny_pipeline

pytestmark = pytest.mark.skipif(not workers.can_fork(), reason="the pair's worker is forked, on Linux only")
SIZE = 32
PARENT_PID = os.getpid()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = save_tiny_pipeline(tmp_path_factory.mktemp("p") / "m", "sd1", seed=5)
    return LatentDiffusionPipeline.from_pretrained(folder)


def call(pipe, **options):
    common = dict(height=SIZE, width=SIZE, steps=4, progress=False, seed=21, guidance_scale=5.0)
    return pipe("a red circle", **{**common, **options})


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])  # euler_a: fresh noise at every step
def test_pair_makes_the_image_one_process_makes(pipe, sampler):
    one = call(pipe, sampler=sampler, workers=1)
    two = call(pipe, sampler=sampler, workers=2)
    assert np.abs(pixels(one) - pixels(two)).max() <= 1
    assert one[0].info["parameters"] == two[0].info["parameters"]
    (a, b) = read_record(one[0]), read_record(two[0])
    assert (a.pop("workers"), b.pop("workers")) == (1, 2)  # how it was computed, for reproduce
    assert a == b


def test_the_pair_really_forks_and_the_child_computes_a_row(pipe, monkeypatch):
    forks, rows = [], []
    real_fork, real_call = workers.fork, pairing.Exchange.__call__

    def counting_fork():
        forks.append(1)
        return real_fork()

    def recording(self, mine, step):
        rows.append(self.role)
        return real_call(self, mine, step)

    monkeypatch.setattr(workers, "fork", counting_fork)
    monkeypatch.setattr(pairing.Exchange, "__call__", recording)
    call(pipe, workers=2)
    assert forks == [1] and rows == [pairing.PARENT] * 4  # the child's calls happen in the child


def test_a_worker_that_dies_is_replaced_by_one_process_with_a_warning(pipe, monkeypatch):
    real_forward = type(pipe.unet).forward

    def dies_in_the_child(self, *args, **kwargs):
        if os.getpid() != PARENT_PID:
            raise MemoryError("no memory in the worker")
        return real_forward(self, *args, **kwargs)

    one = call(pipe, workers=1)
    monkeypatch.setattr(type(pipe.unet), "forward", dies_in_the_child)
    lost = r"worker process ended at step 0 \(MemoryError: no memory in the worker\); making the image again in one"
    with pytest.warns(UserWarning, match=lost):
        again = call(pipe, workers=2)
    assert np.array_equal(pixels(one), pixels(again))


def test_a_refused_fork_falls_back_with_a_warning(pipe, monkeypatch):
    def refuse():
        raise OSError(11, "Resource temporarily unavailable")

    one = call(pipe, workers=1)
    monkeypatch.setattr(workers, "fork", refuse)
    with pytest.warns(UserWarning, match="could not start a worker process"):
        again = call(pipe, workers=2)
    assert np.array_equal(pixels(one), pixels(again))


def test_no_pair_without_guidance_or_with_a_callback(pipe, monkeypatch):
    def no_fork():
        raise AssertionError("forked")

    monkeypatch.setattr(workers, "fork", no_fork)
    call(pipe, workers=2, guidance_scale=1.0)  # one U-Net row: nothing to share
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    seen = []
    call(pipe, callback=lambda i, t, x: seen.append((i, x.shape[0])))  # auto: one process
    assert seen == [(i, 1) for i in range(4)]
    batch = []
    options = dict(height=SIZE, width=SIZE, steps=2, progress=False)
    pipe(["a", "b", "c"], callback=lambda i, t, x: batch.append(x.shape[0]), **options)
    assert batch == [3, 3]  # a callback sees the whole batch: no worker processes


def test_an_interrupted_pair_leaves_no_worker_behind(forked_pids):
    started = forked_pids

    def loop(role, exchange):
        for step in range(1000):
            exchange(torch.zeros(1, 2), step)
            if role == pairing.PARENT and step == 3:
                raise KeyboardInterrupt
        return torch.zeros(1, 2)

    with pytest.raises(KeyboardInterrupt):
        pairing.run_pair(loop, (1, 2), torch.float32)
    assert len(started) == 1
    with pytest.raises(ProcessLookupError):  # killed and reaped, not a zombie
        os.kill(started[0], 0)
