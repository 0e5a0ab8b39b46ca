"""One guided image on two CPU cores: the unconditional and the conditional U-Net pass in two processes.

A single image cannot be cut across workers like a batch (workers.py), but with classifier-free guidance
every step runs the U-Net on two rows: the unconditional and the conditional one. Here a forked child
computes one row and the calling process the other, each on one thread; after each U-Net pass they swap
their rows through shared memory and both go on with the same sampler step on the same numbers, so
their latents stay equal without being sent. Only the calling process decodes the image.

Each step's rows go in one of two slots, by step parity: a process can run at most one step ahead of the
other (it waits for the other's row of that step), so the slot it writes is never one still being read.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import warnings
from collections.abc import Callable

import torch

from latentdiff import workers
from latentdiff.callers import user_stacklevel

PARENT, CHILD = 0, 1  # roles; the parent computes the unconditional row, the child the conditional one


class PartnerLost(RuntimeError):
    """The other process of the pair ended before the loop did."""


class Exchange:
    """Swap this process's U-Net row for the other's, once per step."""

    def __init__(self, role: int, slots: torch.Tensor, send_fd: int, receive_fd: int):
        self.role, self.slots = role, slots  # slots: (2 parities, 2 rows, *row shape)
        self.send_fd, self.receive_fd = send_fd, receive_fd

    def __call__(self, mine: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(unconditional row, conditional row) of this step, once the other process has written its row."""
        slot = self.slots[step % 2]
        slot[self.role].copy_(mine)
        try:
            os.write(self.send_fd, b"+")
            arrived = os.read(self.receive_fd, 1) == b"+"  # b"": end of file, the other process is gone
        except BrokenPipeError:  # it is gone and its end of our pipe with it
            arrived = False
        if not arrived:
            raise PartnerLost(f"the {'worker' if self.role == PARENT else 'calling'} process ended at step {step}")
        return slot[0], slot[1]


def run_pair(loop: Callable[[int, Exchange], torch.Tensor], row_shape: tuple[int, ...], dtype) -> torch.Tensor:
    """`loop(role, exchange)` here (PARENT) and in a forked child (CHILD); the parent's result.

    Raises PartnerLost when the child ends early or cannot be forked: the caller starts again in one process.
    """
    numel = 2 * 2 * int(torch.Size(row_shape).numel())
    buffer = mmap.mmap(-1, numel * torch.empty((), dtype=dtype).element_size())
    slots = torch.frombuffer(buffer, dtype=dtype, count=numel).view(2, 2, *row_shape)
    to_child, from_parent = _pipe()
    to_parent, from_child = _pipe()
    error_from_child, error_to_parent = os.pipe()  # what went wrong in the child, for the warning
    try:  # the child computes its rows; when it fails, the parent sees the closed pipe and starts again alone
        pid = workers.start_child(
            lambda: loop(CHILD, Exchange(CHILD, slots, to_parent, from_parent)),
            close=(to_child, from_child, error_from_child),
            error_fd=error_to_parent,
        )
    except OSError as error:
        for fd in (to_child, from_parent, to_parent, from_child, error_from_child, error_to_parent):
            os.close(fd)
        raise PartnerLost(f"could not start a worker process ({error})") from None
    for fd in (from_parent, to_parent, error_to_parent):
        os.close(fd)
    reaped = False
    try:
        with workers.num_threads(max(1, torch.get_num_threads() - 1)):
            return loop(PARENT, Exchange(PARENT, slots, to_child, from_child))
    except PartnerLost as lost:  # the child has ended (its pipe closed): say why, when it could tell
        why, reaped = workers.reap(pid, error_from_child), True
        raise PartnerLost(f"{lost} ({why})" if why else str(lost)) from None
    finally:
        os.close(to_child)  # a child still waiting sees end of file and leaves
        os.close(from_child)
        if not reaped:
            os.close(error_from_child)
            with contextlib.suppress(ProcessLookupError):
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def warn_restart(error: PartnerLost) -> None:
    warnings.warn(f"{error}; making the image again in one process", stacklevel=user_stacklevel())


def _pipe() -> tuple[int, int]:
    """(write end, read end), the other way round from os.pipe(), to read as "to" and "from"."""
    read_fd, write_fd = os.pipe()
    return write_fd, read_fd
