"""The Shapes evaluator: grammar, detection accuracy (clean, corrupted, swapped prompts), reports, CLI."""

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

import latentdiff
from latentdiff.cli import main
from latentdiff.data.shapes import COLORS, SHAPES, render, sample_scene, scene_for_prompt
from latentdiff.eval.captions import (
    CATEGORIES,
    NUMBER_WORDS,
    OPPOSITE_RELATION,
    Prompt,
    all_prompts,
    format_caption,
    heldout_prompts,
    make_heldout_prompts,
    parse_caption,
    read_prompt_file,
)
from latentdiff.eval.detect import FoundObject, detect
from latentdiff.eval.score import check, contact_sheet, relation_found, summarize

N = 300  # scenes per accuracy test


def corrupt(image, rng):
    """Blur (sigma 0.3..1 px), per-channel colour gain/offset jitter, Gaussian noise (sigma 8)."""
    blurred = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    x = np.asarray(blurred, dtype=np.float32) * rng.uniform(0.92, 1.08, 3) + rng.uniform(-10, 10, 3)
    x = x + rng.normal(0, 8, x.shape)
    return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def clean():
    rng = np.random.default_rng(2024)
    scenes = [sample_scene(rng) for _ in range(N)]
    return scenes, [detect(render(s)) for s in scenes]


@pytest.fixture(scope="module")
def noisy():
    rng = np.random.default_rng(99)
    scenes = [sample_scene(rng) for _ in range(N)]
    return scenes, [detect(corrupt(render(s), rng)) for s in scenes]


# ---- grammar ---------------------------------------------------------------------------------------------


def test_every_canonical_prompt_round_trips():
    for category in CATEGORIES:
        for prompt in all_prompts(category):
            text = format_caption(prompt)
            assert parse_caption(text) == prompt
            assert prompt.category == category
    assert format_caption(Prompt((("orange", "star"),))) == "an orange star"
    assert parse_caption("  Two  BLUE squares ") == Prompt((("blue", "square"),), count=2)
    assert parse_caption("a red circle below a blue square on a gray background").relation == "below"


@pytest.mark.parametrize(
    "text",
    [
        "a red hexagon",
        "one red circle",
        "five red circles",
        "two red circle",
        "a red circle next to a blue square",
        "a red circle and a red circle",
        "a red circle on a green background",
        "a red circle and a blue square and a green star",
        "",
    ],
)
def test_non_canonical_prompts_are_refused(text):
    with pytest.raises(ValueError, match="canonical Shapes prompt"):
        parse_caption(text)


def test_heldout_suite():
    prompts = heldout_prompts()
    assert prompts == make_heldout_prompts()  # the file is what the generator draws
    assert len(prompts) >= 400 and len(set(prompts)) == len(prompts)
    counts = {c: sum(parse_caption(p).category == c for p in prompts) for c in CATEGORIES}
    assert min(counts.values()) == max(counts.values()) >= 100
    assert all(parse_caption(p).category == "position" for p in heldout_prompts(("position",)))


def test_read_prompt_file_names_the_bad_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\na red circle\n\nthe red circle\n")
    with pytest.raises(ValueError, match=r"line 4: not a canonical Shapes prompt: 'the red circle'"):
        read_prompt_file(f)
    f.write_text("a red circle\n\ntwo blue stars on a black background\n")
    assert read_prompt_file(f) == ["a red circle", "two blue stars on a black background"]


# ---- accuracy --------------------------------------------------------------------------------------------


def _accuracy(scenes, detections):
    ok = 0
    for scene, det in zip(scenes, detections, strict=True):
        with_bg = check(scene.prompt(background=True), det)[0]
        without_bg = check(scene.prompt(background=False), det)[0]
        ok += with_bg and without_bg
    return ok / len(scenes)


def test_clean_renders_are_judged_correctly(clean):
    accuracy = _accuracy(*clean)
    print(f"\nevaluator accuracy on clean renders: {accuracy:.3f}")
    assert accuracy >= 0.99


def test_corrupted_renders_are_judged_correctly(noisy):
    accuracy = _accuracy(*noisy)
    print(f"\nevaluator accuracy under blur + colour jitter + noise: {accuracy:.3f}")
    assert accuracy >= 0.95


def _swaps(prompt: Prompt, rng) -> dict[str, Prompt]:
    """The prompt with one thing changed: colour, shape, count, relation, background."""
    out = {}
    objects = list(prompt.objects)
    i = int(rng.integers(len(objects)))
    color, shape = objects[i]
    for kind in ("color", "shape"):
        for _ in range(20):
            new = (
                (str(rng.choice([c for c in COLORS if c != color])), shape)
                if kind == "color"
                else (
                    color,
                    str(rng.choice([s for s in SHAPES if s != shape])),
                )
            )
            changed = tuple(new if j == i else o for j, o in enumerate(objects))
            if len(set(changed)) == len(changed):
                out[kind] = Prompt(changed, prompt.count, prompt.relation, prompt.background)
                break
    if prompt.category == "counting":
        count = int(rng.choice([n for n in NUMBER_WORDS if n != prompt.count]))
        out["count"] = Prompt(prompt.objects, count, None, prompt.background)
    if prompt.relation is not None:
        for relation in ("left_of", "right_of", "above", "below"):
            if relation != prompt.relation:
                out[f"relation {relation}"] = Prompt(prompt.objects, 1, relation, prompt.background)
        out["swapped order"] = Prompt(prompt.objects[::-1], 1, prompt.relation, prompt.background)
        assert OPPOSITE_RELATION[prompt.relation] != prompt.relation
    backgrounds = [b for b in ("white", "black", "gray") if b != prompt.background]
    out["background"] = Prompt(prompt.objects, prompt.count, prompt.relation, str(rng.choice(backgrounds)))
    return out


def test_swapped_prompts_fail(clean, noisy):
    rng = np.random.default_rng(5)
    passes, total = {}, {}
    for scenes, detections in (clean, noisy):
        for scene, det in zip(scenes, detections, strict=True):
            for kind, prompt in _swaps(scene.prompt(), rng).items():
                kind = kind.split()[0]
                total[kind] = total.get(kind, 0) + 1
                passes[kind] = passes.get(kind, 0) + check(prompt, det)[0]
    rates = {k: passes[k] / total[k] for k in total}
    print(f"\npass rate of swapped prompts: { {k: round(v, 4) for k, v in rates.items()} }")
    assert sum(passes.values()) / sum(total.values()) <= 0.01
    assert all(rate <= 0.01 for rate in rates.values())


@pytest.mark.parametrize("size", [48, 96, 160])
def test_other_sizes(size):
    rng = np.random.default_rng(size)
    scenes = [sample_scene(rng, size=size) for _ in range(40)]
    ok = sum(check(s.prompt(), detect(render(s)))[0] for s in scenes)
    assert ok >= 39


def test_relation_rule():
    a = FoundObject("red", "circle", 0.3, 0.5, 0.05)
    b = FoundObject("blue", "square", 0.6, 0.6, 0.05)
    assert relation_found(a, b, "left_of") and relation_found(b, a, "right_of")
    assert not relation_found(a, b, "above") and not relation_found(a, b, "right_of")
    near = FoundObject("blue", "square", 0.33, 0.5, 0.05)  # 3% apart: too close to call
    assert not relation_found(a, near, "left_of")
    diagonal = FoundObject("blue", "square", 0.5, 0.9, 0.05)  # mostly below: over 60 degrees off the x axis
    assert relation_found(a, diagonal, "above") and not relation_found(a, diagonal, "left_of")


def test_extra_or_missing_objects_fail():
    scene = scene_for_prompt(parse_caption("three green stars"), 1)
    det = detect(render(scene))
    assert check(parse_caption("three green stars"), det)[0]
    assert not check(parse_caption("a green star"), det)[0]
    two = scene_for_prompt(parse_caption("a red circle and a blue square"), 2)
    det = detect(render(two))
    assert not check(parse_caption("a red circle"), det)[0]
    passed, reason = check(parse_caption("a red circle and a pink square"), det)
    assert not passed and "wanted" in reason
    blank = detect(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert blank.background == "white" and blank.objects == []


def test_summarize_and_contact_sheet():
    results = [
        {"category": "single", "pass": True},
        {"category": "single", "pass": False},
        {"category": "position", "pass": True},
    ]
    report = summarize(results)
    assert report["categories"] == {"single": 0.5, "counting": None, "two_objects": None, "position": 1.0}
    assert report["overall"] == 0.75 and report["n"] == 3 and report["accuracy"] == pytest.approx(2 / 3)
    sheet = contact_sheet([Image.new("RGB", (64, 64))] * 3, [True, False, True], columns=2)
    x = np.asarray(sheet)
    assert tuple(x[0, 0]) == (40, 200, 40) and tuple(x[0, 70]) == (230, 0, 0)


# ---- CLI -------------------------------------------------------------------------------------------------


def _write_generated_folder(folder, prompts, seed=0):
    folder.mkdir()
    with open(folder / "manifest.jsonl", "w") as f:
        for i, prompt in enumerate(prompts):
            render(scene_for_prompt(parse_caption(prompt), seed + i)).save(folder / f"{i:03d}.png")
            f.write(json.dumps({"file": f"{i:03d}.png", "prompt": prompt, "seed": i}) + "\n")


def test_cli_eval_images_round_trip(tmp_path, capsys):
    prompts = heldout_prompts()[::25]  # 16 prompts over all four categories
    _write_generated_folder(tmp_path / "gen", prompts)
    assert main(["eval", "--images", str(tmp_path / "gen"), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["n"] == 16 and report["overall"] == 1.0
    assert set(report["categories"]) == set(CATEGORIES)
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in results] == prompts
    assert {"file", "prompt", "category", "pass", "found"} <= set(results[0])
    with Image.open(tmp_path / "out" / "contact_sheet.png") as sheet:
        assert sheet.width > 64
    assert "overall 1.000" in capsys.readouterr().out
    # scored in place, or into a folder of its own: never beside another run's images
    assert main(["eval", "--images", str(tmp_path / "gen"), "--out", str(tmp_path / "gen")]) == 0
    _write_generated_folder(tmp_path / "other", prompts[:2])
    assert main(["eval", "--images", str(tmp_path / "gen"), "--out", str(tmp_path / "other")]) == 2
    assert "holds another run's manifest.jsonl and images; choose another --out" in capsys.readouterr().err
    assert not (tmp_path / "other" / "report.json").exists()


def test_cli_eval_refuses_non_canonical_manifest_line(tmp_path, capsys):
    _write_generated_folder(tmp_path / "gen", ["a red circle", "a blue star"])
    lines = (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace("a blue star", "a cute blue star")
    (tmp_path / "gen" / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["eval", "--images", str(tmp_path / "gen"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "a cute blue star" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert main(["eval", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "manifest.jsonl not found" in capsys.readouterr().err


class FakePipeline:
    """Stands in for LatentDiffusionPipeline: draws a correct scene for every prompt but the 'pink' ones."""

    calls = []

    @classmethod
    def from_pretrained(cls, path):
        cls.calls.append(("from_pretrained", path))
        return cls()

    def __call__(self, prompts, seed=0, num_images_per_prompt=1, **kwargs):
        self.calls.append(("call", list(prompts), seed, num_images_per_prompt, kwargs))
        images = []
        for i, prompt in enumerate(prompts):
            for j in range(num_images_per_prompt):
                scene = scene_for_prompt(parse_caption(prompt), seed + i * num_images_per_prompt + j)
                if "pink" in prompt:
                    scene.objects = scene.objects[:-1] or scene.objects
                    scene.background = "black" if scene.background != "black" else "white"
                images.append(render(scene))
        return images


def test_cli_eval_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(latentdiff, "LatentDiffusionPipeline", FakePipeline, raising=False)
    FakePipeline.calls = []
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo green stars\na pink square on a gray background\n")
    argv = ["eval", "--model", "m", "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    sampling = ["--steps", "3", "--sampler", "euler_a"]
    assert main([*argv, "--images-per-prompt", "2", "--seed", "10", "--batch-size", "2", *sampling]) == 0
    assert FakePipeline.calls[0] == ("from_pretrained", "m")
    assert FakePipeline.calls[1] == (
        "call",
        ["a red circle", "two green stars"],
        10,
        2,
        {"steps": 3, "sampler": "euler_a", "progress": False},
    )
    assert FakePipeline.calls[2][1:3] == (["a pink square on a gray background"], 14)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["n"] == 6 and report["categories"]["single"] == 0.5 and report["categories"]["counting"] == 1.0
    manifest = (tmp_path / "o" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 6 and (tmp_path / "o" / json.loads(manifest[5])["file"]).is_file()
    # the generated folder can be scored again as it is
    assert main(["eval", "--images", str(tmp_path / "o"), "--out", str(tmp_path / "o2")]) == 0
    assert json.loads((tmp_path / "o2" / "report.json").read_text())["overall"] == report["overall"]
    capsys.readouterr()
    prompts.write_text("a red circle\na red circle with a hat\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "a red circle with a hat" in err
    # a sampler name that does not exist is a user error, before any model is loaded
    FakePipeline.calls = []
    assert main([*argv, "--sampler", "euler_b"]) == 2
    assert "euler_b" in capsys.readouterr().err and FakePipeline.calls == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--seed", "-1"], "--seed must not be negative, got -1"),
        (["--out", "{tmp}/file"], "cannot write to --out {tmp}/file: it is a file, not a folder"),
        ([], "cannot load --model: model folder not found: {tmp}/nowhere"),
        (["--prompts", "{tmp}/latin1.txt"], "latin1.txt: not UTF-8 (line 2, byte 16); save it as UTF-8"),
    ],
)
def test_cli_eval_model_user_errors(tmp_path, capsys, extra, message):
    (tmp_path / "file").write_text("precious")
    (tmp_path / "latin1.txt").write_bytes("a red circle\ncaf\xe9".encode("latin-1"))
    """Each is found before any model loads: the model folder given does not exist, and only [] reaches it."""
    argv = ["eval", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]
    assert main(argv + [a.format(tmp=tmp_path) for a in extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentdiff eval: error: ") and message.format(tmp=tmp_path) in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "precious"


def test_cli_eval_images_names_an_unreadable_image(tmp_path, capsys):
    _write_generated_folder(tmp_path / "gen", ["a red circle", "a blue star"])
    file = json.loads((tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()[1])["file"]
    (tmp_path / "gen" / file).write_bytes(b"not a png")
    assert main(["eval", "--images", str(tmp_path / "gen"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read image {tmp_path / 'gen' / file}: " in err and "Traceback" not in err
