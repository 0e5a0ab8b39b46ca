"""Helper scripts (scripts/, the default recipe's, benchmarks/run.py): a user's mistake is one error line and a
non-zero exit, found before any long work, and nothing the user has is overwritten."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from train_helpers import RECIPE, recipe_script

ROOT = Path(__file__).resolve().parent.parent


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(main, argv, capsys, *words: str) -> str:
    """main(argv) must stop with exit status 2 and one error line naming `words`, before writing anything."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in captured.err, captured.err
    for word in words:
        assert word in errors[0], errors[0]
    assert not captured.out  # stopped before any work was reported
    return errors[0]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny model folder whose stored defaults sample in 2 steps."""
    from latentdiff.testing.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model")
    (folder / "latentdiff.json").write_text(json.dumps({"defaults": {"steps": 2}}))
    return folder


@pytest.fixture
def foreign(tmp_path):
    """Files of the user's that no script may touch: a file, a PNG, and a dataset folder."""
    from PIL import Image

    (tmp_path / "notes.txt").write_text("mine")
    Image.new("RGB", (4, 4), "red").save(tmp_path / "photo.png")
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text('{"file_name": "000000.png", "text": "my photo"}\n')
    Image.new("RGB", (4, 4), "red").save(data / "000000.png")
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- scripts/sample_grid.py ----------------------------------------------------------------------------------
def test_sample_grid_refuses_bad_arguments(tmp_path, foreign, capsys):
    grid = load(ROOT / "scripts" / "sample_grid.py", "sample_grid")
    before = snapshot(foreign)
    out = tmp_path / "g.png"
    refused(grid.main, ["--seeds", "0", "--out", out], capsys, "--seeds must be at least 1")
    refused(grid.main, ["--scale", "0", "--out", out], capsys, "--scale must be at least 1")
    refused(grid.main, ["--out", tmp_path / "nodir" / "g.png"], capsys, "does not exist")
    refused(grid.main, ["--out", tmp_path / "g.txt"], capsys, ".png")
    refused(grid.main, ["--model", tmp_path / "nope", "--out", out], capsys, "cannot load the model", "nope")
    assert snapshot(foreign) == before and not out.exists()


def test_sample_grid_writes_and_replaces_its_own_grid(tmp_path, tiny_model, capsys):
    grid = load(ROOT / "scripts" / "sample_grid.py", "sample_grid")
    out = tmp_path / "g.png"
    assert grid.main(["--model", str(tiny_model), "--out", str(out), "--seeds", "1", "--scale", "1"]) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()


# ---- tune.py -------------------------------------------------------------------------------------------------
def test_tune_checks_every_list_before_the_first_eval(tmp_path, tiny_model, foreign, capsys):
    tune = recipe_script("tune")
    out = tmp_path / "tune"
    base = ["--model", tiny_model, "--out", out]
    refused(tune.main, base + ["--steps", "1,abc"], capsys, "--steps", "'abc'")
    refused(tune.main, base + ["--steps", "abc"], capsys, "--steps", "whole number")
    refused(tune.main, base + ["--steps", "20,0"], capsys, "--steps must be at least 1")
    refused(tune.main, base + ["--guidance", "x"], capsys, "--guidance", "'x'")
    refused(tune.main, base + ["--guidance", "3,nan"], capsys, "--guidance", "finite")
    refused(tune.main, base + ["--samplers", "euler,bogus"], capsys, "unknown sampler 'bogus'")
    refused(tune.main, base + ["--count", "-3"], capsys, "--count must be at least 1")
    refused(tune.main, ["--model", tmp_path / "nope", "--out", out], capsys, "--model", "not found")
    assert not out.exists()
    before = snapshot(foreign)
    refused(tune.main, ["--model", tiny_model, "--out", foreign / "notes.txt"], capsys, "is a file")
    refused(tune.main, ["--model", tiny_model, "--out", foreign / "data"], capsys, "not an earlier tune.py run")
    assert snapshot(foreign) == before


def test_tune_keeps_the_finished_rows_when_a_later_eval_fails(tmp_path, tiny_model, monkeypatch):
    """A failure mid-grid that is no argument of tune's (a full disk) must not lose the settings already scored."""
    import latentdiff.cli

    tune = recipe_script("tune")
    out = tmp_path / "tune"
    evals = []

    def fake_eval(argv):  # the first setting scores; the second meets a full disk
        evals.append(argv)
        if len(evals) == 2:
            raise OSError(28, "No space left on device")
        where = Path(argv[argv.index("--out") + 1])
        where.mkdir(parents=True)
        (where / "report.json").write_text(json.dumps({"categories": {"color": 0.5}, "overall": 0.25}))
        return 0

    monkeypatch.setattr(latentdiff.cli, "main", fake_eval)
    with pytest.raises(OSError, match="No space left"):
        tune.main(["--model", str(tiny_model), "--out", str(out), "--guidance", "3,5", "--count", "2"])
    rows = json.loads((out / "tune.json").read_text())
    assert rows == [{"sampler": "dpmpp_2m", "steps": 20, "guidance_scale": 3.0, "color": 0.5, "overall": 0.25}]


# ---- side_data.py --------------------------------------------------------------------------------------------
def test_side_data_refuses_bad_arguments_and_other_folders(tmp_path, foreign, capsys):
    side_data = recipe_script("side_data")
    before = snapshot(foreign)
    refused(side_data.main, ["--out", foreign / "data", "--count", "2"], capsys, "not a Shapes dataset")
    refused(side_data.main, ["--out", foreign / "notes.txt", "--count", "2"], capsys, "is a file")
    assert snapshot(foreign) == before
    new = tmp_path / "new"
    refused(side_data.main, ["--out", new, "--count", "-1"], capsys, "--count must not be negative")
    refused(side_data.main, ["--out", new, "--count", "0"], capsys, "nothing to write")
    refused(side_data.main, ["--out", new, "--count", "1", "--seed", "-2"], capsys, "--seed must not be negative")
    assert not new.exists()


def test_side_data_replaces_its_own_dataset(tmp_path, capsys):
    side_data = recipe_script("side_data")
    out = tmp_path / "side"
    assert side_data.main(["--out", str(out), "--count", "3", "--scenes", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png", "000003.png",
                                                      "metadata.jsonl"]  # fmt: skip
    assert side_data.main(["--out", str(out), "--count", "2"]) == 0  # its own earlier set: replaced whole
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["000000.png", "000001.png"] and all("scene" in r for r in rows)
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "metadata.jsonl"]
    capsys.readouterr()


# ---- vae_ceiling.py ------------------------------------------------------------------------------------------
def test_vae_ceiling_refuses_bad_arguments(tmp_path, tiny_model, foreign, capsys):
    ceiling = recipe_script("vae_ceiling")
    before = snapshot(foreign)
    refused(ceiling.main, ["--vae", tmp_path / "nope"], capsys, "cannot load --vae", "no trained VAE")
    refused(ceiling.main, ["--vae", tiny_model / "unet"], capsys, "cannot load --vae", "not a VAE folder")
    for out, words in (
        (tmp_path / "nodir" / "s.png", "does not exist"),
        (tmp_path / "s.txt", ".png"),
    ):  # checked before the VAE loads: a bad --out must not cost the whole run
        refused(ceiling.main, ["--vae", tmp_path / "nope", "--out", out], capsys, "--out", words)
    assert snapshot(foreign) == before


# ---- relation_probe.py, bind_text.py, binding_probe.py -------------------------------------------------------
def test_probes_refuse_a_missing_model(tmp_path, foreign, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(RECIPE))  # binding_probe imports the scripts beside it
    nope = tmp_path / "nope"
    refused(recipe_script("relation_probe").main, ["--model", nope], capsys, "cannot load --model", "not found")
    refused(recipe_script("relation_probe").main, ["--data", nope], capsys, "no metadata.jsonl")
    refused(recipe_script("bind_text").main, ["--model", nope], capsys, "cannot load --model", "not found")
    argv = ["--model", nope, "--context", "text"]
    refused(recipe_script("binding_probe").main, argv, capsys, "cannot load --model", "not found")
    before = snapshot(foreign)
    bind = recipe_script("bind_text").main
    refused(bind, ["--model", nope, "--out", foreign / "notes.txt"], capsys, "--out", "it is a file, not a folder")
    refused(bind, ["--model", nope, "--out", foreign / "data"], capsys, "--out", "no latentdiff.json of an")
    refused(bind, ["--model", nope, "--batch-size", "1"], capsys, "--batch-size")
    assert snapshot(foreign) == before


# ---- measure.py ----------------------------------------------------------------------------------------------
def test_measure_refuses_bad_recipes_and_overrides(tmp_path, capsys):
    measure = recipe_script("measure").main
    refused(measure, ["--recipe", tmp_path / "nope.json"], capsys, "cannot read --recipe")
    (tmp_path / "bad.json").write_text("{not json")
    refused(measure, ["--recipe", tmp_path / "bad.json"], capsys, "cannot read --recipe")
    refused(measure, ["--set", "foo"], capsys, "'foo' is not SECTION.KEY=JSON")
    refused(measure, ["--set", "unet.layers_per_block=two"], capsys, "is not JSON")
    refused(measure, ["--set", "nosuch.key=1"], capsys, "no section 'nosuch'")
    refused(measure, ["--variant", "big:unet.layers_per_block=2;foo"], capsys, "'foo' is not SECTION.KEY=JSON")
    refused(measure, ["--rounds", "0"], capsys, "--rounds")


# ---- benchmarks/run.py ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench():
    path = list(sys.path)
    try:
        yield load(ROOT / "benchmarks" / "run.py", "benchmarks_run")
    finally:
        sys.path[:] = path  # the script puts benchmarks/ first, for its own imports


def test_benchmarks_check_arguments_before_running(bench, tmp_path, foreign, capsys):
    refused(bench.main, ["--rows", "abc"], capsys, "--rows", "'abc'")
    refused(bench.main, ["--rows", "1,9"], capsys, "--rows", "1 to 7")
    refused(bench.main, ["--sizes", "x"], capsys, "--sizes", "'x'")
    refused(bench.main, ["--sizes", "100"], capsys, "--sizes", "multiple of 8")
    refused(bench.main, ["--threads", "-1"], capsys, "--threads must be at least 1")
    refused(bench.main, ["--repeats", "-2"], capsys, "--repeats must be at least 1")
    refused(bench.main, ["--json", tmp_path / "nodir" / "x.json"], capsys, "--json", "existing folder")
    before = snapshot(foreign)
    refused(bench.main, ["--json", foreign / "notes.txt"], capsys, "--json", "already exists")
    assert snapshot(foreign) == before
    (tmp_path / "old.json").write_text(json.dumps([{"row": "1. small", "ratio": 1.0}]))
    assert bench.earlier_rows(tmp_path / "old.json")  # an earlier run's rows: a new run may replace them
