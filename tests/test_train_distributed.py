"""Data-parallel training through `accelerate launch --cpu --num_processes 2` (gloo), and resuming its checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_helpers import train_argv, write_captioned_images

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate),
        "launch",
        "--cpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(ROOT / "training" / "train.py"),
        *args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None, reason="accelerate CLI not installed"
)
def test_two_process_cpu_run_completes_and_its_checkpoint_resumes(tmp_path):
    from latentdiff.pipeline import LatentDiffusionPipeline
    from latentdiff.testing.tiny import save_tiny_pipeline

    model = save_tiny_pipeline(tmp_path / "model", "sd1")
    data = tmp_path / "data"
    data.mkdir()
    # odd count: the two processes wrap into the next epoch at different points
    write_captioned_images(data, 5, (20, 20), "image")
    out = tmp_path / "out"
    common = train_argv(model, data, out, "--batch-size", 2, "--checkpoint-every", 2, "--ema", 0.9)

    first = _launch([*common, "--max-steps", "2"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoint-2" / "COMPLETE").is_file()
    assert {p.name for p in (out / "checkpoint-2").glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    state = json.loads((out / "checkpoint-2" / "state.json").read_text())
    assert state["num_processes"] == 2 and state["micro_batches"] == 2

    second = _launch([*common, "--max-steps", "4", "--resume", "latest"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    state = json.loads((out / "checkpoint-4" / "state.json").read_text())
    assert state["step"] == 4 and len(state["losses"]) == 4

    straight = _launch([*common[:5], str(tmp_path / "straight"), *common[6:], "--max-steps", "4"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = (
        load_file(str(d / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
        for d in (out, tmp_path / "straight")
    )
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6  # 2 + resumed 2 == 4 straight, on 2 processes

    pipe = LatentDiffusionPipeline.from_pretrained(out / "final")
    assert pipe(["image 1"], seed=0, steps=2, height=16, width=16, progress=False)[0].size == (16, 16)
