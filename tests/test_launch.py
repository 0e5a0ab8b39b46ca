"""latentdiff.training.launch.relaunch: the N gloo processes it starts for `accelerate launch --cpu`, their
environment, the exit status of the group, and what it says (no traceback) when one fails or on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STARTING = "starting 2 CPU processes (gloo) for `accelerate launch --cpu --num_processes 2`\n"
# What each child script starts with: its rank, and report() to leave a value in a file (two processes'
# prints can interleave on the one pipe). `ready` marks that a child runs its own code (signal handlers set).
PRELUDE = """import json, os, signal, sys, time
rank = int(os.environ['RANK'])
def report(value):
    with open(f'result-{rank}.json', 'w') as f:
        json.dump(value, f)
"""
READY = "open(f'ready-{rank}', 'w').close()\n"


def start(tmp_path: Path, child: str, env: dict[str, str] | None = None, **settings) -> subprocess.Popen:
    """relaunch(2, child script) in a process of its own (a session too, so a test can signal its group the
    way a terminal's Ctrl-C does), with launch's timing `settings` changed. Output is captured as text."""
    (tmp_path / "child.py").write_text(PRELUDE + child, encoding="utf-8")
    launcher = (
        "import signal, latentdiff.training.launch as launch\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as in a terminal, even if started in background
        f"for name, value in {settings!r}.items(): setattr(launch, name, value)\n"
        "raise SystemExit(launch.relaunch(2, 'child.py', ['an', 'argument']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", launcher],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run(tmp_path: Path, child: str, env: dict[str, str] | None = None, **settings) -> tuple[int, str, str]:
    process = start(tmp_path, child, env, **settings)
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def results(tmp_path: Path) -> list:
    """What the two processes report(), by rank."""
    return [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]


def wait_ready(tmp_path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)


def test_the_children_get_torchruns_environment_and_a_port_of_their_own(tmp_path, monkeypatch):
    keys = "RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE ROLE_RANK ROLE_WORLD_SIZE"
    keys += " MASTER_ADDR MASTER_PORT OMP_NUM_THREADS ACCELERATE_USE_CPU"
    child = (
        f"report([sys.argv[1:], {{k: os.environ.get(k) for k in {keys.split()!r}}}])\n"
        "os.write(1, f'rank {rank} on stdout\\n'.encode())\n"
        "os.write(2, f'rank {rank} on stderr\\n'.encode())\n"
    )
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    # accelerate's launcher sets MASTER_PORT=29500 when not told a port: a fixed one would collide with another run
    status, out, err = run(tmp_path, child, {"MASTER_PORT": "29500", "ACCELERATE_USE_CPU": "True"})
    assert status == 0 and err.startswith(STARTING), err
    assert sorted(err.splitlines()[1:]) == ["rank 0 on stderr", "rank 1 on stderr"]  # both pass straight through
    assert sorted(out.splitlines()) == ["rank 0 on stdout", "rank 1 on stdout"]
    seen = results(tmp_path)
    port = seen[0][1]["MASTER_PORT"]
    assert port != "29500" and int(port) > 0
    for rank, (argv, env) in enumerate(seen):
        assert argv == ["an", "argument"]
        assert env == {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "ROLE_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "ROLE_WORLD_SIZE": "2",
            "GROUP_RANK": "0",
            "GROUP_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",  # as torchrun: two processes each using every core would oversubscribe them
            "ACCELERATE_USE_CPU": "true",
        }

    # a port (--main_process_port) and a thread count the user chose are kept
    assert run(tmp_path, child, {"MASTER_PORT": "29617", "OMP_NUM_THREADS": "3"})[0] == 0
    assert {(env["MASTER_PORT"], env["OMP_NUM_THREADS"]) for _, env in results(tmp_path)} == {("29617", "3")}


def test_the_group_runs_data_parallel_on_gloo(tmp_path):
    child = (
        "import torch, torch.distributed as dist\n"
        "from accelerate import Accelerator\n"
        "state = Accelerator().state\n"  # as training makes it: ACCELERATE_USE_CPU says cpu
        "total = torch.tensor([state.process_index + 1.0])\n"
        "dist.all_reduce(total)\n"
        "report([str(state.distributed_type), state.backend, state.num_processes, state.process_index, total.item()])\n"
        "dist.destroy_process_group()\n"
    )
    status, _, err = run(tmp_path, child, {"MASTER_PORT": "29500"})
    assert status == 0, err
    assert results(tmp_path) == [
        ["DistributedType.MULTI_CPU", "gloo", 2, 0, 3.0],
        ["DistributedType.MULTI_CPU", "gloo", 2, 1, 3.0],
    ]


def test_a_failing_process_sets_the_status_and_nothing_is_added_to_its_own_error(tmp_path):
    child = "if rank == 1:\n    print('p.txt:2: error: unknown option --seed', file=sys.stderr)\n    sys.exit(3)\n"
    status, out, err = run(tmp_path, child)
    assert status == 3
    assert err == STARTING + "p.txt:2: error: unknown option --seed\n" and out == ""  # no traceback, no box


def test_a_process_killed_by_a_signal_is_named_in_one_line(tmp_path):
    status, _, err = run(tmp_path, "if rank == 0:\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert status == 128 + signal.SIGKILL
    assert err == STARTING + "error: process 0 of 2 was killed by signal SIGKILL\n"


def test_the_others_are_stopped_when_they_do_not_finish_after_a_failure(tmp_path):
    child = (
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # stuck, say in a collective: only SIGKILL ends it
        + READY
        + "while not os.path.exists('ready-1'): time.sleep(0.01)\n"
        + "if rank == 0:\n    print('rank 0: error: bad', file=sys.stderr)\n    sys.exit(1)\n"
        + "time.sleep(120)\n"
    )
    started = time.monotonic()
    status, _, err = run(tmp_path, child, GRACE_S=0.3, KILL_AFTER_S=0.3)
    assert status == 1 and time.monotonic() - started < 60
    assert (
        err
        == STARTING
        + "rank 0: error: bad\nerror: stopping the process still running 0.3 s after process 0 of 2 failed\n"
    )


def test_ctrl_c_lets_each_process_stop_itself_and_gives_130_without_a_traceback(tmp_path):
    child = (
        f"try:\n    {READY}    time.sleep(120)\n"
        "except KeyboardInterrupt:\n    os.write(2, f'rank {rank}: interrupted\\n'.encode())\n    sys.exit(130)\n"
    )
    process = start(tmp_path, child)
    wait_ready(tmp_path, process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal does: to the launcher and both processes
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert sorted(err.splitlines()) == sorted([STARTING.strip(), "rank 0: interrupted", "rank 1: interrupted"])


def test_a_second_ctrl_c_stops_processes_that_do_not_stop_themselves(tmp_path):
    process = start(
        tmp_path, "signal.signal(signal.SIGINT, signal.SIG_IGN)\n" + READY + "time.sleep(120)\n", STOP_NOW_S=0.2
    )
    wait_ready(tmp_path, process)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None  # the first Ctrl-C is the processes' own to act on
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err == STARTING


def test_sigterm_to_the_launcher_reaches_the_processes(tmp_path):
    process = start(tmp_path, READY + "time.sleep(120)\n")
    wait_ready(tmp_path, process)
    process.terminate()  # only the launcher, as a job scheduler might
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM and err == STARTING


def test_sigterm_to_the_whole_group_reaches_each_process_once(tmp_path):
    """`timeout`, a job scheduler, accelerate's launcher: every process gets the SIGTERM. One stopping on it
    (a rank writing what it holds, reporting) must not get a second one from the launcher and die of it."""
    child = (
        "terms = []\n"
        "signal.signal(signal.SIGTERM, lambda *_: terms.append(1) or report(len(terms)))\n"
        + READY
        + "while not terms: time.sleep(0.01)\n"
        + "time.sleep(1)\n"  # stopping takes a while
        + "sys.exit(128 + signal.SIGTERM)\n"
    )
    process = start(tmp_path, child)
    wait_ready(tmp_path, process)
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM and err == STARTING
    assert results(tmp_path) == [1, 1]
