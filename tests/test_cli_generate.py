"""`latentdiff generate | reproduce | info | samplers` end to end on a tiny model (32x32, 2 steps)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdiff.cli import main
from latentdiff.metadata import read_png_metadata

REPO = Path(__file__).resolve().parent.parent
FAST = ["--width", "32", "--height", "32", "--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from latentdiff.testing.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "m", "sd1")


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from threads; shared CPUs lose a lot
    yield
    torch.set_num_threads(threads)


def generate(*args) -> int:
    return main(["generate", *map(str, args)])


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def folder_state(out: Path) -> dict[str, object]:
    """Every file of the folder: PNG pixels + metadata record, manifest text."""
    state = {}
    for path in sorted(out.iterdir()):
        if path.suffix == ".png":
            state[path.name] = (pixels(path).tobytes(), read_png_metadata(path)[1]["seed"])
        else:
            state[path.name] = path.read_bytes()
    return state


def test_txt_file_end_to_end(model, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "# shapes\na red circle --d 5 --n blurry\nbad --q 1\n\ntwo blue squares --l 3\n", encoding="utf-8"
    )
    out = tmp_path / "out"
    rc = generate(prompts, "--model", model, "--out", out, *FAST)
    err = capsys.readouterr().err
    assert rc == 1  # a bad line: the others are made, then a non-zero exit
    assert f"{prompts}:3: error: unknown option --q" in err
    assert "made 2, skipped 0, failed 0, 1 bad line" in err and "s/image" in err

    rows = manifest(out)
    assert [r["file"] for r in rows] == ["00002-00-5-a-red-circle.png", "00005-00-1-two-blue-squares.png"]
    first, second = rows
    assert first == {
        "file": "00002-00-5-a-red-circle.png",
        "prompt": "a red circle",
        "negative_prompt": "blurry",
        "seed": 5,
        "steps": 2,
        "guidance_scale": 7.5,
        "sampler": "ddim",  # the model folder's own scheduler class (DDIMScheduler), as in diffusers
        "karras": False,
        "width": 32,
        "height": 32,
        "model": "m",
        "model_hash": first["model_hash"],
        "line": 2,
        "index": 0,
    }
    assert (second["seed"], second["guidance_scale"], second["line"]) == (1, 3.0, 5)  # image k=1: seed 0 + 1
    parameters, record = read_png_metadata(out / first["file"])
    assert parameters.startswith("a red circle\nNegative prompt: blurry\nSteps: 2, Sampler: ddim")
    assert record["model_hash"] == first["model_hash"] and len(first["model_hash"]) == 64
    assert record["seed"] == 5 and record["latentdiff_version"]
    assert record["model_path"] == str(model.resolve())
    assert sorted(p.name for p in out.iterdir()) == sorted([*(r["file"] for r in rows), "manifest.jsonl"])


def test_cli_image_is_pixel_identical_to_api(model, tmp_path):
    from latentdiff.pipeline import LatentDiffusionPipeline

    out = tmp_path / "out"
    options = ["--seed", "11", "--sampler", "euler", "--model", model, "--out", out, *FAST]
    assert generate("-p", "a green triangle", *options) == 0
    (row,) = manifest(out)
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    image = pipe("a green triangle", seed=11, sampler="euler", steps=2, width=32, height=32)[0]
    assert np.array_equal(pixels(out / row["file"]), np.asarray(image))


def test_worker_processes_write_the_images_one_process_writes(model, tmp_path):
    prompts = ["-p", "a red circle", "-p", "a blue star", "-p", "a cyan square"]
    options = [*prompts, "--batch-size", "3", "--seed", "4", "--model", model, *FAST]
    assert generate(*options, "--workers", "1", "--out", tmp_path / "one") == 0
    assert generate(*options, "--workers", "2", "--out", tmp_path / "two") == 0
    one, two = manifest(tmp_path / "one"), manifest(tmp_path / "two")
    assert one == two and len(one) == 3
    for row in one:
        difference = pixels(tmp_path / "one" / row["file"]).astype(int) - pixels(tmp_path / "two" / row["file"])
        assert np.abs(difference).max() <= 1


def test_jsonl_csv_images_per_line_batching_and_grid(model, tmp_path, monkeypatch):
    from latentdiff.pipeline import LatentDiffusionPipeline

    calls = []
    real = LatentDiffusionPipeline.__call__

    def spy(self, prompt, **kw):
        calls.append((len(prompt), kw["width"]))
        return real(self, prompt, **kw)

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", spy)
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        '{"prompt": "a", "images": 3, "seed": 100}\n{"prompt": "b", "width": 16}\n{"prompt": "c"}\n{"oops": 1}\n'
    )
    out = tmp_path / "out"
    assert generate(jsonl, "--model", model, "--out", out, "--batch-size", "2", "--grid", *FAST) == 1
    rows = manifest(out)
    assert [(r["line"], r["index"], r["seed"], r["width"]) for r in rows] == [
        (1, 0, 100, 32),
        (1, 1, 101, 32),
        (1, 2, 102, 32),
        (2, 0, 3, 16),
        (3, 0, 4, 32),
    ]
    # 32x32 images batched by two in run order (a0 a1 | a2 c), the 16-wide one alone.
    assert sorted(calls) == [(1, 16), (2, 32), (2, 32)]
    grid = Image.open(out / "00001-grid-a.png")
    assert grid.size == (64, 64)  # 3 images: 2 columns x 2 rows
    assert np.array_equal(np.asarray(grid.convert("RGB"))[:32, 32:], pixels(out / rows[1]["file"]))

    csv = tmp_path / "p.csv"
    csv.write_text('prompt,seed,steps\n"x, y",7,\nz,,1\n', encoding="utf-8")
    out2 = tmp_path / "out2"
    assert generate(csv, "--model", model, "--out", out2, *FAST) == 0
    assert [(r["prompt"], r["seed"], r["steps"]) for r in manifest(out2)] == [("x, y", 7, 2), ("z", 1, 1)]


@pytest.mark.parametrize(
    ("stop", "status", "made"),
    [
        (signal.SIGINT, 130, 2),  # Ctrl-C: the image in hand is finished, nothing after it
        (signal.SIGTERM, 143, 1),  # kill, timeout, a job scheduler: stop at once, as a second Ctrl-C does
    ],
)
def test_a_stop_then_resume_ends_as_an_uninterrupted_run(model, tmp_path, monkeypatch, capsys, stop, status, made):
    from latentdiff.pipeline import LatentDiffusionPipeline

    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo --d 40\nthree\nfour\n", encoding="utf-8")
    clean = tmp_path / "clean"
    assert generate(prompts, "--model", model, "--out", clean, *FAST) == 0

    real = LatentDiffusionPipeline.__call__
    calls = []

    def interrupting(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), stop)  # while the second image is being made
        return real(self, *a, **kw)

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", interrupting)
    out = tmp_path / "out"
    capsys.readouterr()
    assert generate(prompts, "--model", model, "--out", out, *FAST) == status
    err = capsys.readouterr().err
    assert f"made {made}, skipped 0" in err and "rerun with --resume" in err and "Traceback" not in err
    assert len(calls) == 2
    assert [r["line"] for r in manifest(out)] == [1, 2][:made]  # nothing half-written
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives only while a command runs

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", real)
    assert generate(prompts, "--model", model, "--out", out, "--resume", *FAST) == 0
    assert f"made {4 - made}, skipped {made}" in capsys.readouterr().err
    assert folder_state(out) == folder_state(clean)

    # Resuming a finished folder makes nothing and changes nothing: no duplicate manifest lines.
    before = folder_state(out)
    assert generate(prompts, "--model", model, "--out", out, "--resume", *FAST) == 0
    assert "made 0, skipped 4" in capsys.readouterr().err
    assert folder_state(out) == before


def test_resume_remakes_missing_files_and_changed_settings(model, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["-p", "p1", "-p", "p2", "--model", model, "--out", out, *FAST]
    assert generate(*args) == 0
    rows = manifest(out)
    (out / rows[0]["file"]).unlink()
    with open(out / "manifest.jsonl", "ab") as f:
        f.write(b'{"file": "\xff\xfe damaged"}\n{"file": "torn')  # a damaged line, a line cut short by a crash
    capsys.readouterr()
    assert generate(*args, "--resume") == 0
    assert "made 1, skipped 1" in capsys.readouterr().err
    assert manifest(out) == rows
    # other settings, the same names: the earlier images are replaced only when asked to
    before = {r["file"]: (out / r["file"]).read_bytes() for r in rows}
    assert generate(*args, "--resume", "--cfg", "2") == 2
    err = capsys.readouterr().err
    assert f"{out} already holds 2 image(s) under the names this run would write, made with other settings" in err
    assert "(guidance_scale " in err and "add --overwrite to replace them" in err
    assert {f: (out / f).read_bytes() for f in before} == before and manifest(out) == rows
    assert generate(*args, "--resume", "--cfg", "2", "--overwrite") == 0
    assert "made 2, skipped 0" in capsys.readouterr().err
    assert [r["guidance_scale"] for r in manifest(out)] == [2.0, 2.0]
    (out / "stray.png").write_bytes(b"")  # not a name this run writes: no matter
    assert generate(*args, "--cfg", "2") == 0  # a plain rerun, the same settings: the same images again


def test_a_foreign_file_under_an_image_name_is_never_replaced(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert generate("-p", "p1", "--model", model, "--out", out, *FAST) == 0
    name = manifest(out)[0]["file"]
    (out / "manifest.jsonl").unlink()
    (out / name).write_bytes(b"the user's own file")
    assert generate("-p", "p1", "--model", model, "--out", out, *FAST) == 2
    assert f"e.g. {name} (not made by latentdiff generate)" in capsys.readouterr().err
    assert (out / name).read_bytes() == b"the user's own file"


def _pretend_memory_runs_out(monkeypatch, width: int, other_failure_width: int) -> None:
    """The CPU allocator's failure is a plain RuntimeError: raise it for one width, something else for another."""
    from latentdiff.pipeline import LatentDiffusionPipeline

    real_call = LatentDiffusionPipeline.__call__

    def call(self, prompts, **kwargs):
        if kwargs["width"] == width:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
        if kwargs["width"] == other_failure_width:
            raise RuntimeError("some other failure")
        return real_call(self, prompts, **kwargs)

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", call)


@pytest.mark.parametrize(
    "line, message",
    [
        ("odd size --w 33", "size 33x32 is not possible"),
        ("huge --w 64", "out of memory making 1 image(s) of 64x32 on cpu; use a smaller --width/--height"),
    ],
)
def test_a_line_the_model_cannot_make_fails_alone(model, tmp_path, capsys, monkeypatch, line, message):
    _pretend_memory_runs_out(monkeypatch, width=64, other_failure_width=48)
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"fine\n{line}\n", encoding="utf-8")
    out = tmp_path / "out"
    assert generate(prompts, "--model", model, "--out", out, *FAST) == 1
    err = capsys.readouterr().err
    assert f"{prompts}:2: error: {message}" in err
    assert "made 1, skipped 0, failed 1" in err and "Traceback" not in err
    assert [r["line"] for r in manifest(out)] == [1]
    prompts.write_text("other --w 48\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="some other failure"):  # a bug stays a bug, with its traceback
        generate(prompts, "--model", model, "--out", out, *FAST)


def test_a_full_disk_stops_the_run_and_resume_finishes_it(model, tmp_path, capsys, monkeypatch):
    import errno

    import latentdiff.metadata

    real_save = latentdiff.metadata.save_png
    saved = []

    def save_png(image, path, record=None):
        if len(saved) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        return real_save(image, path, record)

    monkeypatch.setattr(latentdiff.metadata, "save_png", save_png)
    out = tmp_path / "out"
    args = ["-p", "p1", "-p", "p2", "-p", "p3", "--model", model, "--out", out, *FAST]
    assert generate(*args) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write {out / '00002-00-1-p2.png'}: No space left on device; stopped" in err
    assert "rerun with --resume" in err and "Traceback" not in err
    assert [r["file"] for r in manifest(out)] == ["00001-00-0-p1.png"]
    assert sorted(p.name for p in out.iterdir()) == ["00001-00-0-p1.png", "manifest.jsonl"]  # no temporaries
    monkeypatch.setattr(latentdiff.metadata, "save_png", real_save)
    assert generate(*args, "--resume") == 0
    assert "made 2, skipped 1" in capsys.readouterr().err
    assert [r["file"] for r in manifest(out)] == ["00001-00-0-p1.png", "00002-00-1-p2.png", "00003-00-2-p3.png"]


def test_images_get_the_permissions_open_would_give(model, tmp_path):
    """Written under a private temporary name first, they must not stay private (0600) once renamed."""
    old = os.umask(0o022)
    try:
        assert generate("-p", "x", "--model", model, "--out", tmp_path / "out", *FAST) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == {"00001-00-0-x.png": 0o644, "manifest.jsonl": 0o644}


def test_only_runs_long_enough_to_pay_for_a_trace_make_one(model, tmp_path, monkeypatch):
    """Tracing a U-Net step (replay.py) costs about as much as five calls save."""
    from latentdiff.cli.generate import MIN_CALLS_TO_TRACE
    from latentdiff.pipeline import LatentDiffusionPipeline

    real_call, seen = LatentDiffusionPipeline.__call__, []

    def call(self, prompts, **kwargs):
        seen.append(self.trace_steps)
        return real_call(self, prompts, **kwargs)

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", call)
    short = [a for k in range(MIN_CALLS_TO_TRACE - 1) for a in ("-p", f"p{k}")]
    assert generate(*short, "--model", model, "--out", tmp_path / "a", *FAST) == 0
    assert seen == [False] * (MIN_CALLS_TO_TRACE - 1)
    seen.clear()
    assert generate(*short, "-p", "one more", "--model", model, "--out", tmp_path / "b", *FAST) == 0
    assert seen == [True] * MIN_CALLS_TO_TRACE


def test_a_merge_holds_the_manifest_alone(tmp_path):
    """Two runs may share OUT (the default folder, two terminals): an append waits while a merge reads the
    parts, rewrites the manifest and deletes the parts, so no line falls in between."""
    import threading

    from latentdiff.cli.generate import _manifest_lock

    appended = threading.Event()

    def append():
        with _manifest_lock(tmp_path, exclusive=False):
            appended.set()

    with _manifest_lock(tmp_path, exclusive=True):
        other = threading.Thread(target=append)
        other.start()
        assert not appended.wait(0.3)  # blocked by the merge
    assert appended.wait(10)
    other.join()
    with _manifest_lock(tmp_path, exclusive=False), _manifest_lock(tmp_path, exclusive=False):
        pass  # appends share it
    assert list(tmp_path.iterdir()) == []  # no lock file left behind


def test_warnings_are_one_line_for_the_user(model, tmp_path):
    """Not `.../torch/utils/_contextlib.py:124: UserWarning: ...` and the library's source line."""
    prompt = " ".join(["word"] * 100)  # longer than the text encoder's window: truncated with a warning
    argv = [sys.executable, "-m", "latentdiff", "generate", "-p", prompt, "--model", str(model)]
    argv += ["--out", str(tmp_path / "out"), *FAST]
    err = subprocess.run(argv, capture_output=True, text=True, check=True).stderr.splitlines()
    assert err[0].startswith("latentdiff generate: warning: prompt is longer than the text encoder's")
    assert len(err) == 2 and err[1].startswith("made 1, skipped 0, failed 0")


def test_hostile_prompt_stays_inside_out(model, tmp_path):
    out = tmp_path / "a" / "out"
    assert generate("-p", "../../../escape/CON\x00.png", "--model", model, "--out", out, *FAST) == 0
    (row,) = manifest(out)
    assert (out / row["file"]).is_file() and row["file"] == "00001-00-0-escape-con-png.png"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted([row["file"], "manifest.jsonl"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{tmp}/nowhere"], "cannot load model: model folder not found: {tmp}/nowhere"),
        (["{tmp}/missing.txt"], "cannot read prompt file {tmp}/missing.txt"),
        (["--out", "{tmp}/file"], "cannot write to --out {tmp}/file"),
        (["--out", "{tmp}/file/sub"], "cannot write to --out {tmp}/file/sub"),
        (["--sampler", "warp"], "unknown sampler 'warp'; choose from ddim, ddpm"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--device", "cuda:99"], "cannot use --device cuda:99: "),
        ([], "give a prompt file (.txt, .jsonl, .csv) or at least one -p TEXT"),
    ],
)
def test_user_errors_are_one_line_exit_2(model, tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("precious")
    args = [a.format(tmp=tmp_path) for a in args]
    if not any(a.endswith(".txt") for a in args) and "give a prompt" not in message:
        args = ["-p", "x", *args]
    if "--model" not in args:
        args += ["--model", str(model)]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert generate(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentdiff generate: error: ") and message.format(tmp=tmp_path) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "precious"  # nothing lost


def test_reproduce_match_and_mismatch(model, tmp_path, capsys):
    out = tmp_path / "out"
    options = ["--seed", "3", "--negative", "dull", "--model", model, "--out", out, *FAST]
    assert generate("-p", "a star", *options) == 0
    path = out / manifest(out)[0]["file"]
    capsys.readouterr()
    assert main(["reproduce", str(path)]) == 0
    assert capsys.readouterr().out.startswith("match: ")
    assert main(["reproduce", str(path), "--device", "cuda:99"]) == 2
    assert "reproduce: error: cannot use --device cuda:99: " in capsys.readouterr().err

    from latentdiff.metadata import save_png

    with Image.open(path) as im:
        im.load()
        tampered = im.convert("RGB")
        tampered.info = dict(im.info)
    tampered.putpixel((0, 0), tuple((v + 50) % 256 for v in tampered.getpixel((0, 0))))
    save_png(tampered, tmp_path / "tampered.png")
    assert main(["reproduce", str(tmp_path / "tampered.png")]) == 1
    assert capsys.readouterr().out.startswith("mismatch: 3 of 3072 pixel values differ")

    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert main(["reproduce", str(plain)]) == 2
    assert "has no latentdiff metadata" in capsys.readouterr().err


def test_reproduce_repeats_the_batch_an_image_was_made_in(model, tmp_path, capsys, monkeypatch):
    """CPU kernels pick their algorithm by batch size and threads, so an image is made again as it was made:
    in a batch of the recorded size (copies of it), cut across the recorded processes, on the same threads."""
    import torch

    from latentdiff.pipeline import LatentDiffusionPipeline

    out = tmp_path / "out"
    prompts = ["-p", "a star", "-p", "a moon", "-p", "a sun"]
    assert generate(*prompts, "--batch-size", "3", "--workers", "2", "--model", model, "--out", out, *FAST) == 0
    files = [out / r["file"] for r in manifest(out)]
    keys = ("batch_size", "batch_index", "workers", "threads")
    shapes = [tuple(read_png_metadata(f)[1][k] for k in keys) for f in files]
    assert shapes == [(3, k, 2, 1) for k in range(3)]

    calls = []
    call = LatentDiffusionPipeline.__call__

    def spy(self, prompt, **options):
        calls.append((prompt, options["seed"], options["workers"], torch.get_num_threads()))
        return call(self, prompt, **options)

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", spy)
    capsys.readouterr()
    assert main(["reproduce", str(files[2])]) == 0
    assert calls[-1] == (["a sun"] * 3, [2] * 3, 2, 1)  # the third image of the batch, the same split
    assert "image 3 of a batch of 3" in capsys.readouterr().err
    assert main(["reproduce", "--alone", str(files[2])]) in (0, 1)  # alone: rounding may differ
    assert calls[-1] == (["a sun"], [2], None, 1)
    assert torch.get_num_threads() == 1  # the recorded thread count was set for the call only


@pytest.mark.parametrize(
    ("fields", "alone", "expected"),
    [
        ({"batch_size": 4, "batch_index": 3, "workers": 2, "threads": 1}, False, (4, 3, 2, 1)),
        ({"batch_size": 4, "batch_index": 3, "workers": 2, "threads": 1}, True, (1, 0, None, 1)),
        ({}, False, (1, 0, None, None)),  # an image from before the batch shape was recorded
        ({"batch_size": 4, "batch_index": 4}, False, (1, 0, None, None)),  # its place is not in the batch
        ({"batch_size": "4", "batch_index": -1, "workers": True, "threads": 0}, False, (1, 0, None, None)),
        ({"batch_size": 2, "threads": 10_000}, False, (2, 0, None, None)),  # more threads than this machine has
    ],
)
def test_batch_shape_from_a_record(fields, alone, expected):
    from latentdiff.cli.reproduce import BatchShape

    shape = BatchShape.of(fields, alone=alone)
    assert (shape.size, shape.index, shape.workers, shape.threads) == expected


def test_info_and_samplers(model, tmp_path, capsys):
    assert main(["info", str(model)]) == 0
    text = capsys.readouterr().out
    for word in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "UNet2DConditionModel", "defaults"):
        assert word in text
    assert "792,964" in text  # the tiny U-Net's parameters, counted from the safetensors header
    assert "steps" in text and "height          16" in text
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    damaged = shutil.copytree(model, tmp_path / "damaged")
    (damaged / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage!" * 4)
    (damaged / "scheduler" / "scheduler_config.json").write_text("{bad")
    assert main(["info", str(damaged)]) == 1  # shown as far as it can be, then what is wrong
    text = capsys.readouterr().out
    # in the order loading meets them: every config before any weight, each problem once
    assert "vae" in text and text.split("problems (loading this folder will fail on them)\n")[1].splitlines() == [
        f"  {damaged / 'scheduler' / 'scheduler_config.json'}: not valid JSON (Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1))",
        f"  {damaged / 'unet' / 'diffusion_pytorch_model.safetensors'}: not a readable safetensors file (its header "
        "claims 2406443243860549991 bytes, more than the file holds)",
    ]
    assert main(["samplers"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m"]


def accelerate_generate(launch: list[str], *args) -> subprocess.CompletedProcess:
    """`accelerate launch <launch> --num_processes 2 -m latentdiff generate <args> <FAST>`, output captured."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate not installed")
    command = [accelerate, "launch", *launch, "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "latentdiff", "generate"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, *map(str, args), *FAST], env=env, capture_output=True, text=True, timeout=300)


def test_accelerate_two_processes_write_what_one_process_writes(model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree --d 9\nfour\nfive\n", encoding="utf-8")
    one = tmp_path / "one"
    assert generate(prompts, "--model", model, "--out", one, "--batch-size", "2", *FAST) == 0
    two = tmp_path / "two"
    done = accelerate_generate(["--multi_gpu"], prompts, "--model", model, "--out", two, "--batch-size", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 0/2] made 3" in done.stderr and "[rank 1/2] made 2" in done.stderr  # batches 0, 2 | 1
    assert folder_state(two) == folder_state(one)


def test_an_image_another_run_wrote_meanwhile_is_kept(model, tmp_path, capsys, monkeypatch):
    """Two runs into one folder, started together, planned before either wrote: the second write must not win."""
    import shutil

    from latentdiff.pipeline import LatentDiffusionPipeline

    other, out = tmp_path / "other", tmp_path / "out"
    assert generate("-p", "p1", "--model", model, "--out", other, "--cfg", "2", *FAST) == 0
    name = manifest(other)[0]["file"]
    real_call = LatentDiffusionPipeline.__call__

    def call(self, prompts, **kwargs):
        images = real_call(self, prompts, **kwargs)
        shutil.copy(other / name, out / name)  # the other run's image lands while this one draws
        return images

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", call)
    capsys.readouterr()
    assert generate("-p", "p1", "--model", model, "--out", out, *FAST) == 1
    assert f"{out / name} was written meanwhile by another run with other settings" in capsys.readouterr().err
    assert (out / name).read_bytes() == (other / name).read_bytes()


def test_a_seed_past_the_range_fails_only_its_image_whatever_the_batch(model, tmp_path, capsys):
    top = 2**64 - 1
    for batch in ("1", "2"):
        out = tmp_path / f"b{batch}"
        args = ["-p", "p1", "-p", "p2", "--seed", top, "--batch-size", batch]
        assert generate(*args, "--model", model, "--out", out, *FAST) == 1
        err = capsys.readouterr().err
        assert (
            f"-p:2: error: image 1 would get seed {top + 1}, past {top}" in err and "made 1, skipped 0, failed 1" in err
        )
        assert [r["seed"] for r in manifest(out)] == [top]


def test_runs_that_cannot_be_meant_are_refused_before_loading(model, tmp_path, capsys, monkeypatch):
    import latentdiff.cli.generate as gen

    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    assert generate(tmp_path / "empty.txt", "--model", model, "--out", tmp_path / "o", *FAST) == 2
    assert "empty.txt holds no prompts (only blank or # comment lines)" in capsys.readouterr().err
    monkeypatch.setattr(gen, "MAX_RUN_IMAGES", 5)
    assert (
        generate("-p", "a", "-p", "b", "--images-per-prompt", 3, "--model", model, "--out", tmp_path / "o", *FAST) == 2
    )
    assert "this run asks for 6 images, more than 5 in one run; split it up" in capsys.readouterr().err
    assert generate("-p", "a", "--batch-size", 1025, "--model", model, "--out", tmp_path / "o", *FAST) == 2
    assert "--batch-size 1025 is more than 1024 images in one batch" in capsys.readouterr().err  # reproduce's limit
    assert generate("-p", "a", "--device", "meta", "--model", model, "--out", tmp_path / "o", *FAST) == 2
    assert "the meta device holds no data" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*.png"))


def test_an_empty_path_or_a_dangling_link_as_out_is_named(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for option in ("--out", "--model"):
        args = ["-p", "a", "--model", model, "--out", tmp_path / "o", *FAST]
        args[args.index(option) + 1] = ""
        with pytest.raises(SystemExit) as stop:
            generate(*args)
        assert stop.value.code == 2
        assert f"{option} is empty; give a path (is a shell variable unset?)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written into the current folder
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    assert generate("-p", "a", "--model", model, "--out", tmp_path / "link", *FAST) == 2
    err = capsys.readouterr().err
    assert f"it is a symbolic link to {tmp_path / 'missing'}, which does not exist; create that folder" in err


def test_accelerates_cpu_launcher_gets_its_processes(monkeypatch, tmp_path):
    """`accelerate launch --cpu --num_processes 2 -m latentdiff generate ...` starts one process (accelerate
    #2741): generate then starts the two itself, as `python -m latentdiff`, ranks 0 and 1."""
    import subprocess
    import sys

    import latentdiff.training.launch as launch

    started = []

    class Started:
        returncode = 0

        def __init__(self, command, env):
            started.append((command, env["RANK"], env["WORLD_SIZE"]))

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Started)
    monkeypatch.setattr(launch, "requested_cpu_processes", lambda: 2)
    monkeypatch.setattr(sys, "argv", ["latentdiff", "generate", "-p", "a", "--out", str(tmp_path / "o")])
    assert generate("-p", "a", "--out", tmp_path / "o") == 0
    command = [sys.executable, "-m", "latentdiff", "generate", "-p", "a", "--out", str(tmp_path / "o")]
    assert started == [(command, "0", "2"), (command, "1", "2")]
    assert not (tmp_path / "o").exists()  # nothing done in the launcher's own process


def test_a_bad_line_under_accelerates_cpu_launcher_is_one_line_not_a_traceback(model, tmp_path):
    """Two real processes; one prompt each, the bad line named once (by rank 0), exit status 1."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square --seed abc\na green star\n", encoding="utf-8")
    # -q: on a failure accelerate's launcher adds a traceback of its own (CalledProcessError) without it
    done = accelerate_generate(["-q", "--cpu"], prompts, "--model", model, "--out", tmp_path / "o")
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.count("error") == 1 and f"{prompts}:2: error: unknown option --seed" in done.stderr
    assert "[rank 0/2] made 1" in done.stderr and "[rank 1/2] made 1" in done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert len(manifest(tmp_path / "o")) == 2


def test_sigterm_raises_terminated_only_inside_the_block_and_a_forked_worker_still_dies_of_it():
    from latentdiff.cli import Terminated, stop_on_sigterm, stopped_status

    with pytest.raises(Terminated), stop_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    reported = False
    with stop_on_sigterm():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except Terminated:  # a second one (a group signal, then accelerate's launcher) must not cut the report short
            os.kill(os.getpid(), signal.SIGTERM)
            reported = True
    assert reported and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert (stopped_status(Terminated()), stopped_status(KeyboardInterrupt())) == (143, 130)
    with stop_on_sigterm():
        pid = os.fork()
        if pid == 0:  # a worker forked inside the block inherits the handler
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            finally:
                os._exit(0)  # reached only if the signal did not end it
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_a_forked_worker_leaves_ctrl_c_to_its_parent(capfd):
    """The terminal's Ctrl-C reaches the workers too: one message (the parent's), and the workers go on."""
    from latentdiff.cli.generate import _StopOnCtrlC

    with _StopOnCtrlC() as stop:
        pid = os.fork()
        if pid == 0:
            try:
                os.kill(os.getpid(), signal.SIGINT)
            finally:
                os._exit(7)  # carried on past the signal
        _, status = os.waitpid(pid, 0)
        os.kill(os.getpid(), signal.SIGINT)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
    assert stop.requested and capfd.readouterr().err.count("stopping after the batch in hand") == 1


def test_a_stop_while_another_outcome_is_reported_is_still_a_quiet_stop(tmp_path, monkeypatch):
    """SIGTERM that lands while a user's mistake is being printed: the stop's status, no traceback."""
    import latentdiff.cli
    from latentdiff.cli import Terminated

    def print_then_stopped(*args, **kwargs):
        raise Terminated

    monkeypatch.setattr(latentdiff.cli, "print", print_then_stopped, raising=False)
    assert main(["info", str(tmp_path / "nope")]) == 143
