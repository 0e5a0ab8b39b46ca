"""Several CPU processes from `accelerate launch --cpu --num_processes N`, which by itself starts only one.

Without MPI, accelerate's launcher runs a `--cpu` script once whatever --num_processes says (huggingface/
accelerate#2741). So when this script finds itself started that way (ACCELERATE_USE_CPU set, no WORLD_SIZE,
and the parent `accelerate launch` command asked for N > 1), it starts the N processes itself with the
environment torch.distributed.run would give them; Accelerate then sees WORLD_SIZE and runs data-parallel on
gloo. GPU launches (torchrun, `accelerate launch --multi_gpu`) already set WORLD_SIZE and pass straight through.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

GRACE_S = 60.0  # after one process fails, how long the others get to finish (or fail) on their own
KILL_AFTER_S = 10.0  # from SIGTERM to SIGKILL
# from a second Ctrl-C or a SIGTERM to passing SIGTERM on: the processes got that Ctrl-C too, and a SIGTERM
# to the group (`timeout`, a job scheduler, accelerate's launcher) too; they normally stop by then
STOP_NOW_S = 3.0
ACCELERATE_PORT = "29500"  # the MASTER_PORT accelerate's launcher sets when not given --main_process_port


def requested_cpu_processes(parent_args: list[str] | None = None) -> int:
    """N from the parent `accelerate launch --cpu --num_processes N` command line; 1 when it does not apply."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes") or "WORLD_SIZE" in os.environ:
        return 1
    if parent_args is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return 1
        parent_args = [a.decode(errors="replace") for a in raw if a]
    args = parent_args
    if "launch" not in args:
        return 1
    for i, arg in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            value = None
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            if value is not None:
                try:
                    return max(1, int(value))
                except ValueError:
                    return 1
    return 1


def relaunch(n: int, script: str, argv: list[str], module: bool = False) -> int:
    """Run `script argv` (with `module`: `python -m script argv`) as n gloo processes on this machine; returns
    the exit status of the group: 0, or that of the first to fail (128 + N for one killed by signal N), where a
    Ctrl-C or SIGTERM to this process counts as a failure with 130 or 143."""
    # Not torch.distributed.run: under the one-line error a failing process prints itself, it adds a log line,
    # its own traceback and a ChildFailedError box, some 35 lines. What it does for one static node is small:
    # the environment below (OMP_NUM_THREADS=1 unless set), wait for the processes, stop the rest on a failure.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1")}
    env.setdefault("OMP_NUM_THREADS", "1")  # n processes each using every core would oversubscribe them
    if env.get("MASTER_PORT", ACCELERATE_PORT) == ACCELERATE_PORT:
        # a fixed port makes two runs at once collide; the group is on this machine: no one else needs to know it
        env["MASTER_PORT"] = str(free_port())
    command = [sys.executable, *(["-m"] if module else []), script, *argv]
    print(
        f"starting {n} CPU processes (gloo) for `accelerate launch --cpu --num_processes {n}`",
        flush=True,
        file=sys.stderr,
    )
    group = _Group(n)
    with group.noting_signals():
        try:
            for rank in range(n):  # in this process group: a Ctrl-C in the terminal reaches each one directly
                group.children.append(subprocess.Popen(command, env={**env, **rank_env(rank, n)}))
            return group.wait()
        finally:
            group.signal_running(signal.SIGKILL)  # none is left, unless this process fails itself


def rank_env(rank: int, n: int) -> dict[str, str]:
    """What torch.distributed.run sets for process `rank` of a static one-node group of n. Accelerate's
    PartialState reads WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_ADDR/PORT: with
    ACCELERATE_USE_CPU it comes up MULTI_CPU on gloo."""
    ranks = dict.fromkeys(("RANK", "LOCAL_RANK", "ROLE_RANK"), str(rank))
    sizes = dict.fromkeys(("WORLD_SIZE", "LOCAL_WORLD_SIZE", "ROLE_WORLD_SIZE"), str(n))
    return {**ranks, **sizes, "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1"}


def free_port() -> int:
    """A port no one listens on now: the one the system picks for port 0."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _Group:
    """The processes of one run and what ends them: the first failure sets the exit status and, when the others
    have not finished GRACE_S later (one can wait in a collective for a process that is gone), they are stopped
    with SIGTERM, then SIGKILL."""

    def __init__(self, n: int):
        self.n = n
        self.children: list[subprocess.Popen] = []
        self.status = 0
        self.failed: int | None = None  # the rank of the first to fail
        self.noted: list[int] = []  # SIGINT, SIGTERM that reached this process, not yet acted on
        self.interrupts = 0
        self.deadline = math.inf  # when to send the next of SIGTERM, SIGKILL to those still running
        self.sent = 0  # how many of those two were sent
        self.stopping = False  # set once they are stopped from outside or by us: a process killed then is no news

    @contextlib.contextmanager
    def noting_signals(self):
        # Handlers that only take note, acted on in wait(): a KeyboardInterrupt raised inside Popen.poll, between
        # reaping a process and storing its status, would lose that status. A signal this process ignores (a
        # shell without job control has its background jobs ignore SIGINT) stays ignored, by the processes too.
        stops = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            stops = []
        previous = {s: signal.signal(s, lambda signum, _: self.noted.append(signum)) for s in stops}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def wait(self) -> int:
        running = dict(enumerate(self.children))
        while running:
            while self.noted:
                self._stop_requested(self.noted.pop(0))
            for rank, child in list(running.items()):
                if child.poll() is not None:
                    del running[rank]
                    self._ended(rank, child.returncode)
            if running and time.monotonic() >= self.deadline:
                self._escalate(len(running))
            if running:
                time.sleep(0.05)
        return self.status

    def _ended(self, rank: int, code: int) -> None:
        if code < 0 and not self.stopping:  # one that exited non-zero has said why itself
            try:
                name = signal.Signals(-code).name
            except ValueError:  # a real-time signal has no name
                name = str(-code)
            print(f"error: process {rank} of {self.n} was killed by signal {name}", file=sys.stderr, flush=True)
        if code:
            if not self.status:
                self.status, self.failed = (128 - code if code < 0 else code), rank
            self.deadline = min(self.deadline, time.monotonic() + GRACE_S)

    def _stop_requested(self, signum: int) -> None:
        """A first Ctrl-C reached the processes as well (one process group): they stop on their own, as each
        does when run alone. A second, or SIGTERM (accelerate's launcher sends it on Ctrl-C), stops them: passed
        on STOP_NOW_S later to those still running, as a SIGTERM to the group reached them already, and a
        second one would kill a process that is stopping on the first."""
        self.stopping = True
        self.status = self.status or 128 + signum
        if signum == signal.SIGINT:
            self.interrupts += 1
        if signum == signal.SIGTERM or self.interrupts > 1:
            self.deadline = min(self.deadline, time.monotonic() + STOP_NOW_S)

    def _escalate(self, running: int) -> None:
        if self.sent == 0 and not self.stopping:
            which = "the process" if running == 1 else f"the {running} processes"
            print(
                f"error: stopping {which} still running {GRACE_S:g} s after process {self.failed} of {self.n} failed",
                file=sys.stderr,
                flush=True,
            )
        self.stopping = True
        self.signal_running(signal.SIGKILL if self.sent else signal.SIGTERM)
        self.sent += 1
        self.deadline = time.monotonic() + KILL_AFTER_S if self.sent == 1 else math.inf

    def signal_running(self, signum: int) -> None:
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)
