"""`latentdiff reproduce` on records and --save paths it cannot use, `info` on folders loading refuses, and a
closed stdout: each a one-line error (or a quiet exit), never a traceback, and nothing of the user's replaced."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from latentdiff.cli import main
from latentdiff.pipeline import LatentDiffusionPipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from latentdiff.testing.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "m", "sd1")


@pytest.fixture(scope="module")
def image(model, tmp_path_factory) -> Path:
    """A PNG generate wrote, with its record (model_path: the tiny model)."""
    out = tmp_path_factory.mktemp("out")
    fast = ["--width", "32", "--height", "32", "--steps", "2", "--quiet"]
    assert main(["generate", "-p", "a star", "--model", str(model), "--out", str(out), *fast]) == 0
    return next(out.glob("*.png"))


@pytest.fixture
def loaded(monkeypatch) -> list:
    """The model folders reproduce loads; calling the pipeline fails the test (every case here stops before)."""
    paths = []
    load = LatentDiffusionPipeline.from_pretrained.__func__

    def spy(cls, path=None, **options):
        paths.append(path)
        return load(cls, path, **options)

    def call(self, *args, **options):
        raise AssertionError("the pipeline was called")

    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", call)
    return paths


def with_record(image: Path, path: Path, text: str) -> Path:
    """A copy of `image` whose latentdiff chunk holds `text`."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("latentdiff", text)
    with Image.open(image) as im:
        im.save(path, pnginfo=info)
    return path


def record_of(image: Path) -> dict:
    with Image.open(image) as im:
        return json.loads(im.info["latentdiff"])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("latentdiff reproduce: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_a_grid_names_its_images_for_reproduce(model, tmp_path, capsys, request):
    out = tmp_path / "out"
    fast = ["--width", "32", "--height", "32", "--steps", "2", "--quiet", "--images-per-prompt", "3", "--grid"]
    assert main(["generate", "-p", "a star", "--model", str(model), "--out", str(out), *fast]) == 0
    (grid,) = out.glob("*-grid-*.png")
    images = sorted(p.name for p in out.glob("*.png") if p != grid)
    loaded = request.getfixturevalue("loaded")  # from here on, loading is recorded and generating fails
    capsys.readouterr()
    assert main(["reproduce", str(grid)]) == 2
    error = one_line_error(capsys)
    assert f"is a --grid picture of 3 image(s) ({images[0]}, {images[1]} and 1 more)" in error
    assert loaded == []  # told before any model is loaded


@pytest.mark.parametrize(
    ("change", "shown", "wanted"),
    [
        ({"steps": "2"}, '"2"', "a whole number >= 1"),
        ({"steps": 0}, "0", "a whole number >= 1"),
        ({"seed": -1}, "-1", "a whole number from 0 to 18446744073709551615"),
        ({"sampler": "foo"}, '"foo"', "one of ddim, ddpm, dpmpp_2m, euler, euler_a, heun"),
        ({"sampler": ["euler"]}, '["euler"]', "one of ddim"),  # unhashable: no TypeError from `in`
        ({"width": "64"}, '"64"', "a whole number of pixels >= 1"),
        ({"height": True}, "true", "a whole number of pixels >= 1"),
        ({"guidance_scale": float("nan")}, "NaN", "a finite number"),
        ({"guidance_scale": float("-inf")}, "-Infinity", "a finite number"),
        ({"prompt": 5}, "5", "text"),
        ({"negative_prompt": 7}, "7", "text"),
        ({"karras": "yes"}, '"yes"', "true or false"),
        ({"dtype": "int8"}, '"int8"', "one of bfloat16, float16, float32"),
        ({"eta": -1}, "-1", "a finite number >= 0"),
        ({"model_path": 5}, "5", "a folder path"),
        ({"model_hash": 5}, "5", "text"),
        ({"batch_size": 100_000_000}, "100000000", "a whole number from 1 to 1024"),  # not gigabytes of copies
        ({"threads": 0}, "0", "a whole number >= 1"),
        ({"sampler": "x" * 100}, '"' + "x" * 56 + "...", "one of ddim"),  # a long value is cut short
    ],
)
def test_a_bad_record_field_is_named_before_any_model_loads(image, tmp_path, capsys, loaded, change, shown, wanted):
    path = with_record(image, tmp_path / "t.png", json.dumps({**record_of(image), **change}))
    assert main(["reproduce", str(path)]) == 2
    field = next(iter(change))
    assert one_line_error(capsys).startswith(
        f"latentdiff reproduce: error: {path}: metadata field {field!r} is invalid ({shown} is not {wanted}"
    )
    assert loaded == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 63}, "metadata field 'width' is invalid (63 is not a multiple of "),
        ({"clip_skip": 100}, "metadata field 'clip_skip' is invalid (100 is not below 2, the text encoder's layers)"),
        ({"sampler": "ddim", "steps": 1000}, "metadata field 'steps' is invalid (1000 is not a count this model's"),
        ({"sampler": "ddim", "karras": True}, "metadata field 'karras' is invalid (true is not possible with ddim"),
    ],
)
def test_a_record_the_model_cannot_follow_fails_before_the_call(image, tmp_path, capsys, loaded, change, message):
    path = with_record(image, tmp_path / "t.png", json.dumps({**record_of(image), **change}))
    assert main(["reproduce", str(path)]) == 2
    err = one_line_error(capsys)
    assert message in err and ("pass that one with --model" in err or "karras" in change)
    assert len(loaded) == 1  # the model says what it can make; the pipeline itself is never called


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{bad", "its latentdiff metadata is not valid JSON (Expecting property name"),
        ('[{"prompt": "a star"}]', "its latentdiff metadata is a JSON list, not an object"),
        (json.dumps({"prompt": "a star", "steps": 2}), "metadata lacks 'height'; cannot reproduce"),
    ],
)
def test_a_record_that_is_not_one_is_a_one_line_error(image, tmp_path, capsys, loaded, text, message):
    path = with_record(image, tmp_path / "t.png", text)
    assert main(["reproduce", str(path)]) == 2
    assert f"{path}: {message}" in one_line_error(capsys)
    assert loaded == []


@pytest.mark.parametrize(
    ("save", "message"),
    [
        ("victim.png", "--save {tmp}/victim.png is the image being checked; choose another path"),
        ("link.png", "--save {tmp}/link.png is the image being checked; choose another path"),
        ("precious.png", "--save {tmp}/precious.png already exists; choose another path"),
        ("nodir/x.png", "--save {tmp}/nodir/x.png: folder {tmp}/nodir does not exist; create it"),
        ("precious.png/x.png", "--save {tmp}/precious.png/x.png: folder {tmp}/precious.png is not a folder"),
        ("folder", "--save {tmp}/folder is a folder; give a file path in it, e.g. {tmp}/folder/again.png"),
    ],
)
def test_save_never_replaces_a_file_and_is_checked_first(image, tmp_path, capsys, loaded, save, message):
    victim = Path(shutil.copy(image, tmp_path / "victim.png"))
    (tmp_path / "link.png").symlink_to(victim)
    (tmp_path / "precious.png").write_bytes(b"precious")
    (tmp_path / "folder").mkdir()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert main(["reproduce", str(victim), "--save", str(tmp_path / save)]) == 2
    assert message.format(tmp=tmp_path) in one_line_error(capsys)
    assert loaded == []  # refused before the model loads, not after the image is made
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["folder", "link.png", "precious.png", "victim.png"]


def test_save_writes_a_new_file_and_keeps_one_that_appeared_meanwhile(image, tmp_path, capsys, monkeypatch):
    new = tmp_path / "again.png"
    assert main(["reproduce", str(image), "--save", str(new)]) == 0
    with Image.open(new) as again, Image.open(image) as original:
        assert np.array_equal(np.asarray(again), np.asarray(original))

    late = tmp_path / "late.png"
    call = LatentDiffusionPipeline.__call__

    def meanwhile(self, *args, **options):
        late.write_bytes(b"written while the image was made")
        return call(self, *args, **options)

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", meanwhile)
    capsys.readouterr()
    assert main(["reproduce", str(image), "--save", str(late)]) == 2
    assert "already exists; choose another path" in one_line_error(capsys)
    assert late.read_bytes() == b"written while the image was made"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("pickle", "holds only pickle weights (diffusion_pytorch_model.bin)"),
        ("tokenizer", "has no 'tokenizer' component folder"),
        ("unet/config.json", "extra input channels mean an inpainting or instruct-pix2pix model"),
        ("scheduler/scheduler_config.json", "solver_order"),
        ("text_encoder/config.json", "num_attention_heads must be at least 1, got 0"),  # not a ZeroDivisionError
    ],
)
def test_info_shows_the_problems_loading_refuses(model, tmp_path, capsys, damage, message):
    folder = shutil.copytree(model, tmp_path / "m")
    if damage == "pickle":
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        weights.rename(weights.with_suffix(".bin"))
    elif damage == "tokenizer":
        shutil.rmtree(folder / "tokenizer")
    else:  # a config loading refuses before any weight is read: an inpainting U-Net, a DPM-Solver of order 3
        config = json.loads((folder / damage).read_text())
        changes = {
            "unet": {"in_channels": 9},
            "scheduler": {"solver_order": 3, "_class_name": "DPMSolverMultistepScheduler"},
            "text_encoder": {"num_attention_heads": 0},
        }[damage.split("/")[0]]
        (folder / damage).write_text(json.dumps({**config, **changes}))
    with pytest.raises(ValueError, match=re.escape(message)) as refused:  # ModelFolderError, UnsupportedConfigError
        LatentDiffusionPipeline.from_pretrained(folder)
    assert main(["info", "--no-hash", str(folder)]) == 1
    problems = capsys.readouterr().out.split("problems (loading this folder will fail on them)\n")[1]
    assert problems.splitlines() == [f"  {refused.value}"]  # the loader's own words: the two cannot disagree


def test_a_closed_stdout_ends_quietly(model):
    """`latentdiff info | head -1`: the reader is gone, which is no error of latentdiff's."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "latentdiff", "info", "--no-hash", str(model)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as process:
        process.stdout.close()  # before the first line is written: every write meets a closed pipe
        err = process.stderr.read().decode()
    assert (process.returncode, err) == (141, "")
