"""Render a batch of images in several CPU processes: each image is computed whole in one of them.

On a small model the U-Net's layers are too small to keep two threads busy inside one operator (two
intra-op threads gave 1.35x over one on the bundled model), while two processes with one thread each run
apart with nothing shared. Every image depends only on its own seed and context (per-image generators),
so cutting the batch into slices changes nothing but which process computes which image.

The workers are forked for the call and end with it: a fork sees the pipeline exactly as it is now (no
stale copy of weights changed by a LoRA merge or an optimizer step), and the weights are shared, not
copied, until written. Forking is only safe where nothing else runs (no Python threads besides the main
one) and on Linux (macOS' system libraries do not survive a fork), so `auto_workers` is 1 elsewhere.
"""

from __future__ import annotations

import contextlib
import mmap
import numbers
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable

import numpy as np
import torch

from latentdiff.callers import user_stacklevel

# Only small U-Nets split by default: the bundled one (4.2M parameters) gains, SD1.5's (860M) loses;
# sizes in between were not measured.
MAX_AUTO_PARAMETERS = 50_000_000
MAX_AUTO_THREADS = 4  # auto splits only up to this many threads: measured on 2 cores, bigger CPUs untested
ERROR_BYTES = 4000  # a child's error text is cut to this: the pipe must never fill while nobody reads it

# render(start, stop, progress) -> uint8 pixels (stop - start, H, W, 3) of images start..stop-1
Render = Callable[[int, int, bool], np.ndarray]


def can_fork() -> bool:
    return sys.platform == "linux" and hasattr(os, "fork")


def auto_workers(count: int, device: torch.device, guided: bool, unet_parameters: int) -> int:
    """How many processes a call with `count` images uses when the caller does not say."""
    if device.type != "cpu" or not can_fork() or not alone():
        return 1  # alone(): another Python thread could hold a lock the forked child would wait on forever
    if unet_parameters > MAX_AUTO_PARAMETERS:
        return 1  # big layers keep two threads busy: an SD1.5 image took 9.2 s in a pair, 8.5 s in one process
    threads = torch.get_num_threads()
    if count == 1:  # the guidance rows in two processes (pair.py); a parent with 2+ threads would wait
        return 2 if guided and threads == 2 else 1  # every step for its one-thread child
    return min(count, threads) if threads <= MAX_AUTO_THREADS else 1


def alone() -> bool:
    """Called from the main thread, with no other Python thread but tqdm's monitor, whose only lock
    (tqdm's) the child never takes: it makes no progress bar."""
    from tqdm._monitor import TMonitor

    if threading.current_thread() is not threading.main_thread():
        return False
    return all(t is threading.main_thread() or isinstance(t, TMonitor) for t in threading.enumerate())


def check_workers(workers: int, device: torch.device, callback) -> None:
    """An explicit `workers` > 1 the call cannot honour is a user error, not a silent fallback."""
    if not isinstance(workers, numbers.Integral) or isinstance(workers, bool) or workers <= 0:  # numpy's too
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if workers == 1:
        return
    if device.type != "cpu":
        raise ValueError(f"workers > 1 splits CPU work across processes; this pipeline is on {device}, use workers=1")
    if not can_fork():
        raise ValueError(f"workers > 1 needs fork(), used only on Linux (this is {sys.platform}); use workers=1")
    if callback is not None:
        raise ValueError("a callback sees the whole batch at every step, so it needs workers=1")


def slices(count: int, workers: int) -> list[tuple[int, int]]:
    """`workers` contiguous, nearly equal slices of range(count); the first (the parent's) is the largest."""
    size, extra = divmod(count, workers)
    bounds, start = [], 0
    for k in range(workers):
        stop = start + size + (k < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def render_split(render: Render, count: int, item_shape: tuple[int, ...], workers: int, progress: bool) -> np.ndarray:
    """Pixels of images 0..count-1: the first slice here, each other slice in a forked child."""
    parts = slices(count, workers)
    out = _shared_array((count, *item_shape))
    threads = torch.get_num_threads()
    children: dict[int, tuple[int, int, int]] = {}  # pid -> (error pipe, start, stop)
    redo: list[tuple[int, int, str]] = []  # slices this process computes after its own
    try:
        for start, stop in parts[1:]:
            child = _fork(render, out, start, stop)
            if child is None:
                redo.append((start, stop, "could not start a worker process (fork failed)"))
            else:
                children[child[0]] = (child[1], start, stop)
        start, stop = parts[0]
        with num_threads(max(1, threads - len(children))):
            out[start:stop] = render(start, stop, progress)
        for pid in list(children):
            error_fd, start, stop = children[pid]
            error = reap(pid, error_fd)
            del children[pid]  # only now: one interrupted while waiting for it is still killed below
            if error is not None:
                redo.append((start, stop, f"a worker process failed: {error}"))
        for start, stop, why in redo:  # nothing is lost: the slice is made here instead
            warnings.warn(f"{why}; making images {start}..{stop - 1} in this process", stacklevel=user_stacklevel())
            out[start:stop] = render(start, stop, False)
        return np.array(out)  # a private copy: the shared mapping goes with `out`
    finally:
        for pid, (error_fd, _, _) in children.items():  # interrupted: no orphan keeps computing
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            reap(pid, error_fd)


def _shared_array(shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 array in anonymous shared memory: what a forked child writes there, the parent reads."""
    size = int(np.prod(shape))
    buffer = mmap.mmap(-1, max(size, 1))
    return np.frombuffer(buffer, dtype=np.uint8, count=size).reshape(shape)


def _fork(render: Render, out: np.ndarray, start: int, stop: int) -> tuple[int, int] | None:
    """Start a child that writes images start..stop-1 into `out`; (pid, read end of its error pipe)."""
    read_fd, write_fd = os.pipe()

    def body() -> None:
        out[start:stop] = render(start, stop, False)

    try:
        pid = start_child(body, close=(read_fd,), error_fd=write_fd)
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        return None
    os.close(write_fd)
    return pid, read_fd


def start_child(body: Callable[[], object], close: tuple[int, ...], error_fd: int | None = None) -> int:
    """Fork a child that closes `close`, runs `body` on one thread and exits (0, or 1 after writing what
    went wrong to `error_fd`); the child's pid. Raises OSError when the fork is refused."""
    pid = fork()
    if pid:
        return pid
    code = 1  # the child from here on: it leaves without running the parent's exit handlers
    try:
        for fd in close:
            os.close(fd)
        # One thread, always: GNU OpenMP's thread pool does not survive fork(), and a child that
        # opens a parallel region with 2+ threads hangs (seen with torch's libgomp build).
        torch.set_num_threads(1)
        body()
        code = 0
    except BaseException as error:  # noqa: BLE001 - everything must reach the parent, as text or exit code
        if error_fd is not None:
            message = f"{type(error).__name__}: {error}".encode(errors="replace")[:ERROR_BYTES]
            with contextlib.suppress(OSError):
                os.write(error_fd, message)
    finally:
        os._exit(code)


def fork() -> int:
    with warnings.catch_warnings():
        # Python 3.12+ warns on fork() in a process with OS threads; ours are torch's idle OpenMP
        # workers, which hold no lock the child needs, and the child runs single-threaded.
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def reap(pid: int, error_fd: int) -> str | None:
    """Reap the child; None when it succeeded, else what went wrong."""
    _, status = os.waitpid(pid, 0)
    try:
        message = os.read(error_fd, ERROR_BYTES).decode(errors="replace")
    finally:
        os.close(error_fd)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return None
    if os.WIFSIGNALED(status):
        return message or f"killed by signal {os.WTERMSIG(status)}"
    return message or f"exit status {os.WEXITSTATUS(status)}"


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
