"""`eval --model` and `shapes` over folders that already hold something: nothing of another run is lost, a
bad option is one line before anything is written, and a stopped run never leaves output that looks whole."""

import json

import pytest
from PIL import Image
from test_eval import FakePipeline

import latentdiff
from latentdiff.cli import main
from latentdiff.data.shapes import write_dataset
from latentdiff.pipeline import BUNDLED_MODEL
from latentdiff.prompts import MAX_SEED


def snapshot(folder):
    """name -> bytes of every file under folder: to show that nothing in it changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setattr(latentdiff, "LatentDiffusionPipeline", FakePipeline, raising=False)
    FakePipeline.calls = []


def eval_argv(tmp_path, prompts, out, *extra):
    (tmp_path / "prompts.txt").write_text("".join(f"{p}\n" for p in prompts))
    return ["eval", "--model", "m", "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), *extra]


def test_eval_model_refuses_a_folder_with_another_runs_manifest_or_images(tmp_path, capsys):
    generated = tmp_path / "g1"
    argv = ["generate", "--quiet", "-p", "a red circle", "-p", "a blue square", "--steps", "2", "--out"]
    assert main([*argv, str(generated)]) == 0
    capsys.readouterr()
    before = snapshot(generated)
    assert len(before["manifest.jsonl"].splitlines()) == 2
    (tmp_path / "ep.txt").write_text("a red circle\n")
    # The model folder does not exist: the refusal comes first, before any time is spent loading one.
    argv = ["eval", "--model", str(tmp_path / "nowhere"), "--prompts", str(tmp_path / "ep.txt"), "--out"]
    assert main([*argv, str(generated), "--steps", "2"]) == 2
    err = one_error_line(capsys)
    assert f"--out {generated} already holds a manifest.jsonl" in err and "choose another --out" in err
    assert f"--images {generated}" in err
    assert snapshot(generated) == before

    pictures = tmp_path / "pictures"
    (pictures / "images").mkdir(parents=True)
    (pictures / "images" / "00000.png").write_bytes(b"my photo")
    (pictures / "images" / "holiday.png").write_bytes(b"my other photo")
    assert main([*argv, str(pictures)]) == 2
    assert "images/ that `latentdiff eval --model` did not write" in one_error_line(capsys)
    assert snapshot(pictures) == {"images/00000.png": b"my photo", "images/holiday.png": b"my other photo"}


def test_eval_model_rerun_replaces_its_own_earlier_output_only(tmp_path, capsys, fake_model):
    out = tmp_path / "o"
    prompts = ["a red circle", "two green stars", "a blue square"]
    assert main([*eval_argv(tmp_path, prompts, out), "--images-per-prompt", "2"]) == 0
    assert len(list((out / "images").iterdir())) == 6
    (out / "notes.txt").write_text("mine")

    assert main([*eval_argv(tmp_path, ["two green stars"], out), "--images-per-prompt", "1", "--seed", "5"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png"]  # no image of the first run left
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert manifest == [{"file": "images/00000.png", "prompt": "two green stars", "seed": 5}]
    assert json.loads((out / "report.json").read_text())["n"] == 1
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    assert (out / "notes.txt").read_text() == "mine"
    capsys.readouterr()


def test_eval_model_stopped_run_never_looks_finished(tmp_path, monkeypatch, capsys, fake_model):
    out = tmp_path / "o"
    argv = [*eval_argv(tmp_path, ["a red circle", "two green stars"], out), "--batch-size", "1"]
    assert main(argv) == 0
    earlier = snapshot(out)

    def stop_on_second_batch(self, prompts, **kwargs):
        if len(FakePipeline.calls) > 1:
            raise KeyboardInterrupt
        return real_call(self, prompts, **kwargs)

    real_call = FakePipeline.__call__
    monkeypatch.setattr(FakePipeline, "__call__", stop_on_second_batch)
    FakePipeline.calls = []
    assert main([*argv, "--seed", "3"]) == 130
    assert snapshot(out) == earlier  # stopped while drawing: the earlier output is untouched

    real_save = Image.Image.save

    def stop_on_second_image(self, fp, *args, **kwargs):
        if (out / "images" / "00000.png").exists():
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(FakePipeline, "__call__", real_call)
    monkeypatch.setattr(Image.Image, "save", stop_on_second_image)
    assert main([*argv, "--seed", "3"]) == 130
    names = {p.name for p in out.rglob("*")}
    assert names == {"images", "00000.png"}  # no manifest, no report: plainly unfinished, and no torn image
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert main([*argv, "--seed", "3"]) == 0  # its own stopped output is replaced like any earlier one
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 8
    capsys.readouterr()


def test_eval_model_steps_the_scheduler_cannot_do_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "ep.txt").write_text("a red circle\n")
    out = tmp_path / "o"
    argv = ["eval", "--model", str(BUNDLED_MODEL), "--prompts", str(tmp_path / "ep.txt"), "--images-per-prompt", "1"]
    assert main([*argv, "--steps", "2000", "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert err.startswith("latentdiff eval: error: --model ") and "num_train_timesteps=1000, got 2000" in err
    assert not out.exists()
    out.mkdir()  # a folder that was there stays, empty
    assert main([*argv, "--steps", "2000", "--out", str(out)]) == 2
    assert list(out.iterdir()) == []


def test_eval_model_seeds_past_the_last_are_refused_before_loading(tmp_path, capsys, fake_model):
    out = tmp_path / "o"
    argv = eval_argv(tmp_path, ["a red circle"], out, "--images-per-prompt", "2")
    assert main([*argv, "--seed", str(MAX_SEED)]) == 2
    err = one_error_line(capsys)
    assert f"--seed {MAX_SEED} is too large for 2 images" in err and f"use --seed {MAX_SEED - 1} or less" in err
    assert FakePipeline.calls == [] and not out.exists()
    assert main([*argv, "--seed", str(MAX_SEED - 1)]) == 0  # the last image gets MAX_SEED: allowed
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[1])["seed"] == MAX_SEED


def test_shapes_rerun_stopped_or_smaller_leaves_no_stale_dataset(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sh"
    assert main(["shapes", "--out", str(out), "--count", "3", "--seed", "0"]) == 0
    first = snapshot(out)
    (out / "notes.txt").write_text("mine")
    (out / "0000001.PNG").write_text("mine too")  # not a Shapes name (upper case): never removed

    real_save = Image.Image.save
    saved = []

    def stop_after_two(self, *args, **kwargs):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(args)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", stop_after_two)
    assert main(["shapes", "--out", str(out), "--count", "6", "--seed", "1"]) == 130
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert (out / "000000.png").read_bytes() != first["000000.png"]  # the new seed's scene is already there,
    assert not (out / "metadata.jsonl").exists()  # so no metadata may claim to describe the folder
    assert not (out / ".metadata.jsonl.partial").exists()

    # Run again, smaller: accepted (a Shapes folder still), and only the new set is left, beside the user's file.
    assert main(["shapes", "--out", str(out), "--count", "2", "--seed", "1"]) == 0
    mine = {"notes.txt": b"mine", "0000001.PNG": b"mine too"}
    fresh = snapshot(write_dataset(tmp_path / "fresh", 2, seed=1).parent)
    assert snapshot(out) == {**fresh, **mine}
    capsys.readouterr()
