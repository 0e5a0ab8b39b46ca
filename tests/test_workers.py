"""A batch cut across forked worker processes: the same images, nothing lost when a worker fails."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from latentdiff import LatentDiffusionPipeline
from latentdiff import workers as parallel
from latentdiff.metadata import read_record
from latentdiff.testing.tiny import save_tiny_pipeline

pytestmark = pytest.mark.skipif(not parallel.can_fork(), reason="worker processes are forked, on Linux only")
SIZE = 32
SHAPE = (2, 3, 3)  # the pixels of one fake image in the render_split tests
HERE, ELSEWHERE = 1, 2  # what fake_render writes in an image's last value: made by this process or not
PARENT = os.getpid()
SMALL = 4_000_000  # U-Net parameters, about the bundled model's


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = save_tiny_pipeline(tmp_path_factory.mktemp("w") / "m", "sd1", seed=3)
    return LatentDiffusionPipeline.from_pretrained(folder)


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def fake_render(start, stop, show):
    """Image k is filled with k, and says which process made it in its last value."""
    out = np.empty((stop - start, *SHAPE), np.uint8)
    for k in range(start, stop):
        out[k - start] = k
        out[k - start, -1, -1, -1] = HERE if os.getpid() == PARENT else ELSEWHERE
    return out


@pytest.mark.parametrize("count,workers", [(2, 2), (5, 2), (7, 3), (3, 3)])
def test_slices_cover_the_batch_in_order(count, workers):
    parts = parallel.slices(count, workers)
    assert [k for a, b in parts for k in range(a, b)] == list(range(count))
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes[0] == max(sizes) and min(sizes) >= 1


def test_each_slice_is_made_by_its_own_process_and_lands_in_place():
    out = parallel.render_split(fake_render, 5, SHAPE, 2, progress=False)
    assert [int(image[0, 0, 0]) for image in out] == list(range(5))
    makers = [int(image[-1, -1, -1]) for image in out]
    assert makers == [HERE] * 3 + [ELSEWHERE] * 2  # the parent keeps the first (larger) slice


def test_a_failing_worker_is_redone_here_with_a_warning():
    def render(start, stop, show):
        if os.getpid() != PARENT:
            raise RuntimeError("out of memory in the worker")
        return fake_render(start, stop, show)

    with pytest.warns(UserWarning, match=r"worker process failed: RuntimeError: out of memory.*images 3\.\.4"):
        out = parallel.render_split(render, 5, SHAPE, 2, progress=False)
    assert [int(image[0, 0, 0]) for image in out] == list(range(5))
    assert {int(image[-1, -1, -1]) for image in out} == {HERE}


def test_a_refused_fork_is_done_here_with_a_warning(monkeypatch):
    def refuse():
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(parallel.os, "fork", refuse)
    with pytest.warns(UserWarning, match=r"fork failed.*images 2\.\.3"):
        out = parallel.render_split(fake_render, 4, SHAPE, 2, progress=False)
    assert [int(image[0, 0, 0]) for image in out] == list(range(4))


def test_an_interrupt_leaves_no_worker_behind(forked_pids):
    started = forked_pids

    def render(start, stop, show):
        if os.getpid() != PARENT:
            time.sleep(60)  # a worker still busy when the parent is interrupted
        raise KeyboardInterrupt

    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        parallel.render_split(render, 4, SHAPE, 2, progress=False)
    assert time.monotonic() - began < 30 and len(started) == 1
    with pytest.raises(ProcessLookupError):  # killed and reaped, not a zombie
        os.kill(started[0], 0)


def test_an_interrupt_while_waiting_for_a_worker_leaves_none_behind(forked_pids):
    """SIGTERM (`kill`: this process only) or a second Ctrl-C after this process's own slice is made."""
    started = forked_pids

    def render(start, stop, show):
        if os.getpid() != PARENT:
            time.sleep(60)
        return fake_render(start, stop, show)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)  # the parent is then waiting for its worker
    try:
        began = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            parallel.render_split(render, 2, SHAPE, 2, progress=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - began < 30 and len(started) == 1
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left computing
        os.kill(started[0], 0)


def test_auto_uses_two_processes_only_for_a_cpu_batch_in_a_lone_thread(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu = torch.device("cpu")
    assert parallel.auto_workers(4, cpu, True, SMALL) == 2
    assert parallel.auto_workers(1, cpu, True, SMALL) == 2  # one guided image: its two U-Net rows (pair.py)
    assert parallel.auto_workers(1, cpu, False, SMALL) == 1
    assert parallel.auto_workers(4, torch.device("cuda"), True, SMALL) == 1
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert parallel.auto_workers(4, cpu, True, SMALL) == 1  # a user's thread might hold a lock the child needs
    finally:
        stop.set()
        other.join()
    assert parallel.auto_workers(4, cpu, True, 860_000_000) == 1  # SD1.5-size: threads do better
    assert parallel.auto_workers(1, cpu, True, 860_000_000) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert parallel.auto_workers(4, cpu, True, SMALL) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert parallel.auto_workers(4, cpu, True, SMALL) == 3 and parallel.auto_workers(2, cpu, True, SMALL) == 2
    assert parallel.auto_workers(1, cpu, True, SMALL) == 1  # the pair's parent would wait for its 1-thread child
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert parallel.auto_workers(32, cpu, True, SMALL) == 1  # a big CPU keeps its threads in one process: not measured
    monkeypatch.setattr(parallel.sys, "platform", "darwin")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert parallel.auto_workers(4, cpu, True, SMALL) == 1


@pytest.mark.parametrize("workers", [2, 3])
def test_pipeline_images_and_metadata_do_not_depend_on_workers(pipe, workers):
    common = dict(height=SIZE, width=SIZE, steps=3, sampler="euler_a", progress=False, seed=40)
    prompts = ["a red circle", "a blue star", "a green square"]
    one = pipe(prompts, num_images_per_prompt=2, workers=1, **common)
    split = pipe(prompts, num_images_per_prompt=2, workers=workers, **common)
    assert np.abs(pixels(one) - pixels(split)).max() <= 1
    assert [im.info["parameters"] for im in one] == [im.info["parameters"] for im in split]
    records = [[read_record(im) for im in images] for images in (one, split)]
    # the record says how the batch was computed (reproduce repeats it) and otherwise nothing changes
    assert [r.pop("workers") for r in records[0]] == [1] * 6
    assert [r.pop("workers") for r in records[1]] == [workers] * 6
    assert records[0] == records[1]


def test_pipeline_rejects_workers_it_cannot_use(pipe, monkeypatch):
    common = dict(height=SIZE, width=SIZE, steps=1, progress=False)
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            pipe(["a", "b"], workers=bad, **common)
    with pytest.raises(ValueError, match="callback .* needs workers=1"):
        pipe(["a", "b"], workers=2, callback=lambda i, t, x: None, **common)
    monkeypatch.setattr(parallel.sys, "platform", "darwin")
    with pytest.raises(ValueError, match="only on Linux .*darwin.*use workers=1"):
        pipe(["a", "b"], workers=2, **common)


CHILD_WITH_THREADS = """
import torch
from latentdiff.workers import render_split
torch.set_num_threads(4)
a = torch.randn(256, 256)
(a @ a).sum()  # the parent's OpenMP pool now exists: a child that used 2+ threads would hang


def render(start, stop, show):
    b = torch.randn(512, 512)
    return (b @ b).abs().clamp(0, 255).flatten()[: (stop - start) * 12].to(torch.uint8).numpy().reshape(-1, 2, 3, 2)


out = render_split(render, 4, (2, 3, 2), 2, progress=False)
print("done", out.shape, torch.get_num_threads())
"""


def test_a_parent_with_many_threads_forks_workers_that_finish():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", CHILD_WITH_THREADS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["done", "(4,", "2,", "3,", "2)", "4"]  # and the parent's threads are restored
