"""Several CPU processes from `accelerate launch --cpu --num_processes N`, which by itself starts only one.

Without MPI, accelerate's launcher runs a `--cpu` script once whatever --num_processes says (huggingface/
accelerate#2741). So when this script finds itself started that way (ACCELERATE_USE_CPU set, no WORLD_SIZE,
and the parent `accelerate launch` command asked for N > 1), it starts the N processes itself with
torch.distributed.run; Accelerate then sees WORLD_SIZE and runs data-parallel on gloo. GPU launches
(torchrun, `accelerate launch --multi_gpu`) already set WORLD_SIZE and pass straight through.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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
    the exit status of the group."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n),
        "--nnodes",
        "1",
        "--master_addr",
        env.get("MASTER_ADDR", "127.0.0.1"),
        "--master_port",
        env.get("MASTER_PORT", "29500"),
        *(["-m"] if module else []),
        script,
        *argv,
    ]
    print(
        f"starting {n} CPU processes (gloo) for `accelerate launch --cpu --num_processes {n}`",
        flush=True,
        file=sys.stderr,
    )
    return subprocess.call(command, env=env)
