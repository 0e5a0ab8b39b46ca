"""Timing helpers: alternating medians, peak resident memory of a call, this machine's matmul speed."""

from __future__ import annotations

import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable

import psutil
import torch


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Run every fn `warmup` times, then `repeats` rounds, order reversed every other round.

    Returns {name: {"median_s", "min_s", "times", "result"}} with the result of the last call.
    """
    names = list(fns)
    results = {}
    for _ in range(warmup):
        for name in names:
            results[name] = fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            results[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {
        name: {
            "median_s": statistics.median(times[name]) if times[name] else float("nan"),
            "min_s": min(times[name]) if times[name] else float("nan"),
            "times": times[name],
            "result": results.get(name),
        }
        for name in names
    }


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the next peak starts low
    except OSError:
        pass


def peak_rss_increase(fn: Callable[[], object], interval: float = 0.005) -> float:
    """MiB by which this process's resident memory rose above its level before `fn`, at the peak."""
    release_memory()
    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = start
    done = threading.Event()

    def poll():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(interval)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak = max(peak, proc.memory_info().rss)
    return (peak - start) / 2**20


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-`repeats` GFLOP/s of an n x n x n matmul at the current thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn`, counted by torch's FlopCounterMode (matmul, conv, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
