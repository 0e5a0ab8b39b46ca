"""training/recipes/default/relation_probe.py: caption edits, and a probe that sees what a model uses."""

import json
from types import SimpleNamespace

import pytest
import torch
from train_helpers import RECIPE, recipe_script

from latentdiff.pipeline import BUNDLED_MODEL, LatentDiffusionPipeline


@pytest.fixture(scope="module")
def probe_module():
    return recipe_script("relation_probe")


def test_edits(probe_module):
    caption = "a red circle to the left of a blue square on a gray background"
    edits = {name: edit(caption) for name, edit in probe_module.EDITS.items()}
    assert edits == {
        "relation": "a red circle to the right of a blue square on a gray background",
        "order": "a blue square to the left of a red circle on a gray background",
        "colour": "a green circle to the left of a yellow square on a gray background",
    }
    assert probe_module.EDITS["order"]("an orange star above a cyan triangle") == "a cyan triangle above an orange star"


@pytest.mark.skipif(not (BUNDLED_MODEL / "model_index.json").is_file(), reason="no bundled model")
def test_probe_sees_that_colours_matter(probe_module):
    pipe = LatentDiffusionPipeline.from_pretrained(BUNDLED_MODEL)
    rows = probe_module.probe(pipe, count=8, seed=1)
    assert list(rows) == list(probe_module.TIMESTEPS)
    assert all(r["true"] > 0 for r in rows.values())
    # the bundled model draws colours from the prompt: wrong colour words must cost it (measured: +5x at t=200)
    assert rows[200]["colour"] > 0.5
    error, interior, whole = probe_module.position_sense(pipe)
    assert all(0.0 <= v < 10.0 for v in (error, interior, whole)) and interior <= whole
    layout = probe_module.layout_asymmetry(pipe, samples=2)  # the real pipeline's encode / U-Net calls
    assert set(layout) == {"side", "pair"} and all(0.0 <= v < 10.0 for v in layout.values())


def test_side_data_captions_name_the_side(tmp_path):
    side_data = recipe_script("side_data")
    side_data.write(tmp_path, 24, seed=3)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all((tmp_path / r["file_name"]).is_file() for r in rows)
    for scene, text in side_data.side_examples(40, seed=3):
        obj, middle = scene.objects[0], scene.size / 2
        expected = {
            "on the left": obj.cx < middle - 9,
            "on the right": obj.cx > middle + 9,
            "at the top": obj.cy < middle - 9,
            "at the bottom": obj.cy > middle + 9,
        }
        said = [side for side in expected if f" {side}" in text]
        assert len(said) == 1 and expected[said[0]], (text, obj)
        assert f"{obj.color} {obj.shape}" in text


def test_side_data_adds_shapes_scenes_of_the_mix(tmp_path):
    from latentdiff.training.data import parse_shapes_mix

    recipe_script("side_data").write(tmp_path, 3, seed=2, scenes=12, mix=parse_shapes_mix("position=1000000"))
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and all((tmp_path / r["file_name"]).is_file() for r in rows)
    relation_words = ("left", "right", "above", "below", "over", "under", "top", "bottom")
    scenes = [r["text"] for r in rows[3:]]
    assert all(any(w in text.replace(",", " ").split() for w in relation_words) for text in scenes), scenes


def test_side_data_canonical_words_everything_as_the_suite_does(tmp_path):
    from latentdiff.eval.captions import format_caption, parse_caption

    recipe_script("side_data").write(tmp_path, 30, seed=4, scenes=20, canonical=True)
    texts = [json.loads(line)["text"] for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert not any(t.startswith("one ") for t in texts[:30])  # side examples: "a/an <colour> <shape> <side>"
    assert all(t.split(" ", 1)[0] == ("an" if t.split(" ")[1][0] in "aeiou" else "a") for t in texts[:30])
    assert all(format_caption(parse_caption(t)) == t for t in texts[30:]), texts[30:]


def test_side_data_can_leave_the_background_unnamed_on_the_same_scenes(tmp_path):
    from latentdiff.eval.captions import parse_caption

    side_data = recipe_script("side_data")
    named, unnamed, half = (tmp_path / "named", tmp_path / "unnamed", tmp_path / "half")
    side_data.write(named, 0, seed=3, scenes=40, canonical=True)
    side_data.write(unnamed, 0, seed=3, scenes=40, canonical=True, unnamed_background=1.0)
    side_data.write(half, 0, seed=3, scenes=40, canonical=True, unnamed_background=0.5)

    def rows(folder):
        return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]

    for a, b in zip(rows(named), rows(unnamed)):
        assert (named / a["file_name"]).read_bytes() == (unnamed / b["file_name"]).read_bytes()  # same pictures
        assert parse_caption(a["text"]).background is not None and parse_caption(b["text"]).background is None
        # the same caption but for the background phrase
        assert a["text"].startswith(b["text"]) and a["text"][len(b["text"]) :].endswith(" background")
    unnamed_share = sum(parse_caption(r["text"]).background is None for r in rows(half)) / 40
    assert 0.25 <= unnamed_share <= 0.75


def test_side_data_background_mix_reaches_the_scenes(tmp_path, capsys):
    from latentdiff.eval.captions import parse_caption

    side_data = recipe_script("side_data")
    side_data.main(
        ["--out", str(tmp_path), "--count", "0", "--scenes", "24", "--canonical", "--background-mix", "white=0,black=0"]
    )
    texts = [json.loads(line)["text"] for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(texts) == 24 and {parse_caption(t).background for t in texts} == {"gray"}
    with pytest.raises(SystemExit):
        side_data.main(["--out", str(tmp_path / "bad"), "--count", "0", "--background-mix", "grey=2"])
    assert "--background-mix 'grey=2'" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_tuning_prompts_leave_the_background_out_as_the_suite_does():
    from latentdiff.eval.captions import heldout_prompts, parse_caption

    tune = recipe_script("tune")
    named, mixed = tune.tuning_prompts(60, 0.0), tune.tuning_prompts(60, 0.25)
    assert all(parse_caption(t).background is not None for t in named)
    assert 5 <= sum(parse_caption(t).background is None for t in mixed) <= 25
    assert len(mixed) == 60 and not set(mixed) & set(heldout_prompts())


@pytest.mark.skipif(not (BUNDLED_MODEL / "model_index.json").is_file(), reason="no bundled model")
def test_probe_reads_a_folder_with_the_edits_that_apply(probe_module, tmp_path):
    recipe_script("side_data").write(tmp_path, 6, seed=1)
    rows = probe_module.probe(LatentDiffusionPipeline.from_pretrained(BUNDLED_MODEL), count=6, seed=1, data=tmp_path)
    assert set(rows[500]) == {"true", "relation", "colour"}  # no "order": one object, nothing to swap


class _LayoutUNet:
    """x0-hat = +1 on the side the context names (context +1: left, -1: right), -1 on the other half; written
    as the eps / v / x0 the scheduler config asks for."""

    config = SimpleNamespace(sample_size=8, in_channels=4)

    def __init__(self, scheduler_config):
        from latentdiff.schedules import alphas_cumprod

        self.kind, self.ac = scheduler_config.prediction_type, alphas_cumprod(scheduler_config)

    def __call__(self, x, steps, context):
        a, s = self.ac[steps].sqrt().view(-1, 1, 1, 1), (1 - self.ac[steps]).sqrt().view(-1, 1, 1, 1)
        m = torch.ones_like(x)
        m[..., 4:] = -1
        m = m * context[:, 0, 0].view(-1, 1, 1, 1)
        return {"epsilon": (x - a * m) / s, "v_prediction": (a * x - m) / s}.get(self.kind, m)


class _LayoutPipe:
    """A stand-in pipeline: the prompt's side word becomes the context (+1 left, -1 right; 0 when `blind`)."""

    def __init__(self, prediction_type: str, blind: bool = False):
        from latentdiff.schedules import ScheduleConfig

        self.scheduler_config = ScheduleConfig(prediction_type=prediction_type)
        self.unet, self.blind = _LayoutUNet(self.scheduler_config), blind

    def encode(self, prompts):
        side = [0.0 if self.blind else (1.0 if " left" in p else -1.0) for p in prompts]
        return torch.tensor(side).view(-1, 1, 1).expand(-1, 2, 3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_layout_asymmetry_measures_how_far_the_layout_mirrors(probe_module, prediction_type):
    # x0-hat = +-1 on each half, mirrored by the side word: per channel (left half - right half) of the
    # difference is 4, over 4 channels |.| = 8, halved: 4
    values = probe_module.layout_asymmetry(_LayoutPipe(prediction_type), samples=4)
    assert values == pytest.approx({"side": 4.0, "pair": 4.0}, rel=1e-4)
    blind = probe_module.layout_asymmetry(_LayoutPipe(prediction_type, blind=True), samples=4)
    assert blind == pytest.approx({"side": 0.0, "pair": 0.0}, abs=1e-5)


@pytest.mark.skipif(not (BUNDLED_MODEL / "model_index.json").is_file(), reason="no bundled model")
def test_side_learning_runs_both_targets(tmp_path, capsys):
    side_learning = recipe_script("side_learning")
    for fresh in ([], ["--fresh"]):
        side_learning.main(
            ["--model", str(BUNDLED_MODEL), "--target", "halves", "--steps", "1", "--batch-size", "2"] + fresh
        )
        assert capsys.readouterr().out.startswith("step     0  halves error ")
    argv = ["--model", str(BUNDLED_MODEL), "--data", str(tmp_path), "--kinds", "1", "--steps", "1"]
    with pytest.raises(SystemExit, match="has no metadata.jsonl"):
        side_learning.main(argv)
    recipe_script("side_data").write(tmp_path, 3, seed=0)
    with pytest.raises(SystemExit, match="no image of 'red circle on the left'"):
        side_learning.main(argv)
    recipe_script("side_data").write(tmp_path, 1500, seed=0)  # enough for a red circle on either side
    side_learning.main(argv + ["--v-space"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("step     0  side asymmetry ") and lines[1].startswith("trained: red circle ")
    assert lines[2].startswith("unseen: green circle ")


@pytest.mark.skipif(not (BUNDLED_MODEL / "model_index.json").is_file(), reason="no bundled model")
def test_binding_probe_contexts_and_run(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(RECIPE))  # the script imports side_learning beside it
    binding = recipe_script("binding_probe")
    pipe = LatentDiffusionPipeline.from_pretrained(BUNDLED_MODEL)
    bound = binding.make_encoder(pipe, "bound")
    left, right = bound(["a red circle to the left of an orange star", "a red circle to the right of an orange star"])
    red_left, red_right, star_left, star_right = pipe.encode(
        [
            "a red circle on the left",
            "a red circle on the right",
            "an orange star on the left",
            "an orange star on the right",
        ]
    ).float()
    half = left.shape[0] // 2
    assert torch.equal(left[:half], red_left[:half]) and torch.equal(left[half:], star_right[: left.shape[0] - half])
    assert torch.equal(right[:half], red_right[:half]) and torch.equal(right[half:], star_left[: left.shape[0] - half])
    with pytest.raises(ValueError, match="is not a pair caption"):
        bound(["a red circle on the left"])
    binding.main(["--model", str(BUNDLED_MODEL), "--context", "bound", "--steps", "1", "--batch-size", "2",
                  "--pictures", "2"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "bound: 12 captions, e.g. 'a red circle to the left of a blue square'"
    assert lines[1].startswith("step     0  pair asymmetry ")


@pytest.mark.skipif(not (BUNDLED_MODEL / "model_index.json").is_file(), reason="no bundled model")
def test_bind_text_targets_and_run(tmp_path, capsys):
    from latentdiff.eval.captions import parse_caption

    bind = recipe_script("bind_text")
    prompt = parse_caption("an orange star below a red circle on a gray background")
    assert bind.sub_captions(prompt) == (
        "an orange star at the bottom on a gray background",
        "a red circle at the top on a gray background",
    )
    trained, heldout, others = bind.caption_sets()
    assert len(heldout) == 100 and not {str(p) for p in heldout} & {str(p) for p in trained}
    assert all(p.relation is not None for p in trained) and "a red circle" in others
    bind.main(["--model", str(BUNDLED_MODEL), "--steps", "1", "--batch-size", "4", "--out", str(tmp_path / "m")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step     0  held-out relations 1.000  trained relations 1.000  others drift 0.0000"
    assert lines[1].startswith("step     1  held-out relations ")
    assert LatentDiffusionPipeline.from_pretrained(tmp_path / "m").text_encoder is not None
