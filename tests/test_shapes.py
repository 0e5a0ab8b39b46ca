"""The Shapes dataset: the spec (palette, sizes, spacing, relations, backgrounds), determinism, files, CLI."""

import json
import time

import numpy as np
import pytest
from PIL import Image

from latentdiff.cli import main
from latentdiff.data.shapes import (
    BACKGROUNDS,
    COLORS,
    Scene,
    ShapesDataset,
    canonical_captions,
    caption,
    make_example,
    render,
    sample_scene,
    scene_for_prompt,
    shape_box,
    write_dataset,
)
from latentdiff.eval.captions import CATEGORIES, parse_caption

N = 400


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(123)
    return [sample_scene(rng) for _ in range(N)]


def test_palette_exact_at_centres_and_background_at_border(scenes):
    for scene in scenes:
        x = np.asarray(render(scene))
        assert x.shape == (64, 64, 3)
        for obj in scene.objects:
            assert tuple(x[int(obj.cy), int(obj.cx)]) == COLORS[obj.color], (scene, obj)
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
        assert (border == BACKGROUNDS[scene.background]).all()


def test_every_category_and_option_occurs(scenes):
    assert {s.category for s in scenes} == set(CATEGORIES)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {o.color for s in scenes for o in s.objects} == set(COLORS)
    assert {o.shape for s in scenes for o in s.objects} == {"circle", "square", "triangle", "star"}
    assert {len(s.objects) for s in scenes if s.category == "counting"} == {2, 3, 4}
    assert {s.relation["type"] for s in scenes if s.relation} == {"left_of", "right_of", "above", "below"}


def test_sizes_spacing_and_bounds(scenes):
    for scene in scenes:
        n = len(scene.objects)
        for obj in scene.objects:
            assert obj.size >= (16 if n <= 2 else 12)
            x0, y0, x1, y1 = shape_box(obj)
            assert x0 >= 1 and y0 >= 1 and x1 <= 63 and y1 <= 63
        for i in range(n):
            for j in range(i + 1, n):
                a, b = shape_box(scene.objects[i]), shape_box(scene.objects[j])
                gap = max(a[0] - b[2], b[0] - a[2], a[1] - b[3], b[1] - a[3])
                assert gap >= 2, scene
        if scene.category == "counting":
            assert len({(o.color, o.shape, o.size) for o in scene.objects}) == 1
        if scene.category in ("two_objects", "position"):
            assert n == 2 and (scene.objects[0].color, scene.objects[0].shape) != (
                scene.objects[1].color,
                scene.objects[1].shape,
            )


def test_objects_do_not_touch_in_pixels(scenes):
    """Rendered one by one, no object's pixels come within one pixel of another's."""
    for scene in scenes[:100]:
        masks = []
        for obj in scene.objects:
            alone = type(scene)(scene.background, [obj], None, scene.size)
            masks.append((np.asarray(render(alone)) != BACKGROUNDS[scene.background]).any(-1))
        for i in range(len(masks)):
            grown = np.pad(masks[i], 1)
            grown = np.logical_or.reduce(
                [grown[1 + dy : 65 + dy, 1 + dx : 65 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            )
            for j in range(i + 1, len(masks)):
                assert not (grown & masks[j]).any(), scene


def test_relations_are_clear(scenes):
    for scene in (s for s in scenes if s.relation):
        a, b = scene.objects[scene.relation["a"]], scene.objects[scene.relation["b"]]
        dx, dy = b.cx - a.cx, b.cy - a.cy
        along, across = {"left_of": (dx, dy), "right_of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[
            scene.relation["type"]
        ]
        assert along >= 0.12 * 64 and abs(across) <= 0.5 * along


def test_captions_parse_back_to_the_scene(scenes):
    rng = np.random.default_rng(0)
    for scene in scenes:
        text = caption(scene)
        assert text.endswith(f" on a {scene.background} background")
        assert parse_caption(text) == scene.prompt()
        assert text in canonical_captions(scene)
        short = caption(scene, rng)  # background named about half the time, still canonical
        assert parse_caption(short).objects == scene.prompt().objects
    paraphrases = [caption(s, rng, paraphrase=True) for s in scenes]
    assert len(set(paraphrases)) > N // 2
    canonical = sum(1 for p in paraphrases if _is_canonical(p))
    assert 0 < canonical < N  # a mix


def _is_canonical(text):
    try:
        parse_caption(text)
    except ValueError:
        return False
    return True


def test_deterministic_per_seed():
    a = [render(sample_scene(np.random.default_rng(7))).tobytes() for _ in range(2)]
    assert a[0] == a[1]
    one = ShapesDataset(20, seed=5)
    two = ShapesDataset(20, seed=5)
    assert [one[i]["text"] for i in range(20)] == [two[i]["text"] for i in reversed(range(20))][::-1]
    assert one[3]["image"].tobytes() == two[3]["image"].tobytes()
    assert ShapesDataset(20, seed=6)[3]["scene"] != one[3]["scene"]
    image, text, scene = make_example(11)
    assert image.tobytes() == make_example(11)[0].tobytes() and text == make_example(11)[1]
    with pytest.raises(IndexError):
        one[20]


def test_category_mix_sets_the_frequencies():
    rng = np.random.default_rng(3)
    drawn = [sample_scene(rng, category={"position": 3.0, "single": 1.0}).category for _ in range(800)]
    assert set(drawn) == {"position", "single"}  # unnamed categories weigh 0
    assert 0.70 < drawn.count("position") / len(drawn) < 0.80  # expected 0.75; sd 0.015
    data = ShapesDataset(40, seed=2, mix={"counting": 1.0})
    assert {Scene.from_dict(data[i]["scene"]).category for i in range(40)} == {"counting"}


def test_background_weights_set_the_frequencies_and_default_draws_as_before():
    rng = np.random.default_rng(4)
    drawn = [sample_scene(rng, backgrounds={"gray": 2.0, "black": 1.0}).background for _ in range(600)]
    assert set(drawn) == {"gray", "black"}  # unnamed backgrounds weigh 0
    assert 0.60 < drawn.count("gray") / len(drawn) < 0.73  # expected 2/3; sd 0.019
    data = ShapesDataset(30, seed=2, backgrounds={"white": 1.0})
    assert {data[i]["scene"]["background"] for i in range(30)} == {"white"}
    # no weights: the draws of earlier versions, so a seed keeps naming the same scenes
    assert ShapesDataset(10, seed=5, backgrounds=None)[7]["scene"] == ShapesDataset(10, seed=5)[7]["scene"]


def test_other_sizes_scale():
    scene = sample_scene(3, size=128)
    image = render(scene)
    assert image.size == (128, 128)
    assert all(o.size >= 24 for o in scene.objects)
    small = render(sample_scene(3, size=64), size=32)  # a scene can also be drawn at another size
    assert small.size == (32, 32)


def test_scene_for_prompt_and_exclude():
    prompt = parse_caption("a red circle to the left of a blue square on a gray background")
    for seed in range(20):
        scene = scene_for_prompt(prompt, seed)
        assert scene.prompt() == prompt
    held = {"a red circle and a blue square", "two green stars"}
    rng = np.random.default_rng(0)
    for _ in range(300):
        assert held.isdisjoint(canonical_captions(sample_scene(rng, exclude=held)))
    assert "a blue square and a red circle" in canonical_captions(
        scene_for_prompt(parse_caption("a red circle and a blue square"), 0)
    )


def test_write_dataset_metadata_format(tmp_path):
    path = write_dataset(tmp_path / "d", 12, seed=1)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 12
    for entry in lines:
        assert set(entry) == {"file_name", "text", "scene"}
        assert set(entry["scene"]) == {"background", "objects", "relation"}
        for obj in entry["scene"]["objects"]:
            assert set(obj) == {"shape", "color", "cx", "cy", "size"}
        rel = entry["scene"]["relation"]
        assert rel is None or (
            set(rel) == {"type", "a", "b"} and rel["type"] in ("left_of", "right_of", "above", "below")
        )
        parse_caption(entry["text"])
        with Image.open(tmp_path / "d" / entry["file_name"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    again = write_dataset(tmp_path / "e", 12, seed=1)
    assert again.read_text() == path.read_text()
    assert (tmp_path / "e" / lines[4]["file_name"]).read_bytes() == (
        tmp_path / "d" / lines[4]["file_name"]
    ).read_bytes()


def test_cli_shapes(tmp_path, capsys):
    assert main(["shapes", "--out", str(tmp_path / "s"), "--count", "5", "--seed", "2", "--size", "96"]) == 0
    lines = (tmp_path / "s" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 5
    with Image.open(tmp_path / "s" / json.loads(lines[0])["file_name"]) as im:
        assert im.size == (96, 96)
    assert "wrote 5 images" in capsys.readouterr().out
    assert main(["shapes", "--out", str(tmp_path / "t"), "--count", "0"]) == 2
    assert "--count must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    assert main(["shapes", "--out", str(tmp_path / "t"), "--count", "2", "--seed", "-1"]) == 2
    assert "--seed must not be negative, got -1" in capsys.readouterr().err
    (tmp_path / "f").write_text("precious")
    assert main(["shapes", "--out", str(tmp_path / "f"), "--count", "2"]) == 2
    assert f"cannot write to --out {tmp_path / 'f'}: it is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "precious" and not (tmp_path / "t").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "my cat"}\n')
    assert main(["shapes", "--out", str(tmp_path / "mine"), "--count", "2"]) == 2
    assert "already holds files that are not a Shapes dataset" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["metadata.jsonl"]
    assert "my cat" in (tmp_path / "mine" / "metadata.jsonl").read_text()
    assert main(["shapes", "--out", str(tmp_path / "s"), "--count", "3", "--seed", "3"]) == 0  # an earlier set
    assert len((tmp_path / "s" / "metadata.jsonl").read_text().splitlines()) == 3


def test_a_stopped_write_leaves_no_metadata(tmp_path, monkeypatch):
    calls = []

    def save(self, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "d", 5)
    # no metadata.jsonl, no partial file (the PNGs were not saved); the marker of a set being written stays
    assert [p.name for p in (tmp_path / "d").iterdir()] == [".shapes-writing"]
    monkeypatch.undo()
    assert write_dataset(tmp_path / "d", 2).is_file()  # so the same command can be run again into it
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["000000.png", "000001.png", "metadata.jsonl"]


def test_speed_report():
    """Not asserted (shared CPUs): printed for the record."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(200):
        render(sample_scene(rng))
    rate = 200 / (time.perf_counter() - start)
    print(f"\nShapes: {rate:.0f} scenes sampled + rendered per second (64x64, one process)")


def test_cli_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import latentdiff.data.shapes

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "s" / "000007.png"))

    monkeypatch.setattr(latentdiff.data.shapes, "write_dataset", no_room)
    assert main(["shapes", "--out", str(tmp_path / "s"), "--count", "9"]) == 1
    err = capsys.readouterr().err
    where = tmp_path / "s" / "000007.png"
    assert err == f"latentdiff shapes: error: No space left on device ({where}); make room or fix the folder\n"

    def bug(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    monkeypatch.setattr(latentdiff.data.shapes, "write_dataset", bug)
    with pytest.raises(FileNotFoundError):  # not a machine failure: a bug keeps its traceback
        main(["shapes", "--out", str(tmp_path / "s"), "--count", "9"])
