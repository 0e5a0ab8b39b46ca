"""Shapes: a synthetic text-image dataset of coloured shapes, drawn on the fly (hundreds of images/s).

The spec (fixed: the evaluator and the default model rely on it):
- canvas 64x64 by default, background white, black or gray; objects in the 8 colours of `COLORS`;
- circle, square (axis-aligned), triangle (upright), star (five-pointed, upright); filled, anti-aliased;
- scenes: one object; two to four identical objects; two different objects; two objects in a relation
  (centres >= 12% of the canvas apart along its axis); objects never overlap, stay >= 2 px apart and are
  >= 12 px across at 64x64 (>= 16 px with one or two objects).
An object's `size` is its width in pixels; (cx, cy) is the centre of its bounding box.

    rng = np.random.default_rng(0)
    scene = sample_scene(rng)              # or make_example(seed) -> (image, caption, scene dict)
    image = render(scene)                  # PIL RGB, scene.size x scene.size
    text = caption(scene, rng, paraphrase=True)
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from latentdiff.eval.captions import (
    BACKGROUND_NAMES,
    CATEGORIES,
    COLOR_NAMES,
    NUMBER_WORDS,
    OPPOSITE_RELATION,
    RELATION_WORDS,
    SHAPE_NAMES,
    Prompt,
    format_caption,
)

COLORS = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 215, 0),
    "green": (30, 160, 50),
    "cyan": (0, 190, 210),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "pink": (245, 105, 180),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = SHAPE_NAMES
RELATIONS = tuple(RELATION_WORDS)
assert tuple(COLORS) == COLOR_NAMES and tuple(BACKGROUNDS) == BACKGROUND_NAMES

STAR_INNER_RATIO = 0.45  # inner / outer radius of the star (0.38 is the regular pentagram; fatter reads better)
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased, and interiors keep the exact palette colour
# Object widths as fractions of the canvas, per scene kind: (min, max). 12/64 = 0.1875, 16/64 = 0.25.
SIZE_RANGE = {"one": (0.25, 0.45), "two": (0.25, 0.36), "many": (0.1875, 0.26)}
MARGIN = 2 / 64  # objects keep this far from the canvas edge, so the border is background
GAP = 2 / 64  # and this far from each other (never less than 2 px)
MIN_RELATION_OFFSET = 0.12  # centre offset along the relation's axis, fraction of the canvas
MAX_RELATION_SLANT = 0.5  # |offset across the axis| <= this * |offset along it|: the relation is clear


@dataclass
class ShapeObject:
    shape: str  # one of SHAPES
    color: str  # one of COLORS
    cx: float  # bounding-box centre, pixels
    cy: float
    size: float  # width, pixels (height too, but a star is 0.95 as tall as wide)


@dataclass
class Scene:
    background: str  # one of BACKGROUNDS
    objects: list[ShapeObject] = field(default_factory=list)
    relation: dict | None = None  # {"type": "left_of"|..., "a": i, "b": j}: objects[a] is <type> objects[b]
    size: int = 64  # canvas width and height, pixels

    @property
    def category(self) -> str:
        if self.relation is not None:
            return "position"
        if len(self.objects) == 1:
            return "single"
        kinds = {(o.color, o.shape) for o in self.objects}
        return "counting" if len(kinds) == 1 else "two_objects"

    def to_dict(self) -> dict:
        """The metadata.jsonl form: {"background", "objects": [{shape, color, cx, cy, size}], "relation"}."""
        return {
            "background": self.background,
            "objects": [asdict(o) for o in self.objects],
            "relation": None if self.relation is None else dict(self.relation),
        }

    @classmethod
    def from_dict(cls, d: dict, size: int = 64) -> Scene:
        objects = [ShapeObject(**o) for o in d["objects"]]
        return cls(d["background"], objects, d.get("relation"), size)

    def prompt(self, background: bool = True) -> Prompt:
        """What this scene shows, as a canonical `Prompt` (naming the background unless background=False)."""
        bg = self.background if background else None
        first = self.objects[0]
        if self.category in ("single", "counting"):
            return Prompt(((first.color, first.shape),), count=len(self.objects), background=bg)
        if self.relation is not None:
            a, b = self.objects[self.relation["a"]], self.objects[self.relation["b"]]
            return Prompt(((a.color, a.shape), (b.color, b.shape)), relation=self.relation["type"], background=bg)
        second = self.objects[1]
        return Prompt(((first.color, first.shape), (second.color, second.shape)), background=bg)


def shape_box(obj: ShapeObject) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) bounding box of an object, pixels."""
    half_w = obj.size / 2
    half_h = half_w * (_STAR_HEIGHT if obj.shape == "star" else 1.0)
    return obj.cx - half_w, obj.cy - half_h, obj.cx + half_w, obj.cy + half_h


_STAR_R = 1 / (2 * math.sin(math.radians(72)))  # outer radius per unit width
_STAR_HEIGHT = _STAR_R * (1 + math.cos(math.radians(36)))  # height per unit width (0.951)
_CIRCLE = [(math.cos(2 * math.pi * k / 64), math.sin(2 * math.pi * k / 64)) for k in range(64)]


def shape_polygon(obj: ShapeObject) -> list[tuple[float, float]]:
    """The outline of an object as polygon vertices, pixels (a circle as a 64-gon)."""
    x0, y0, x1, y1 = shape_box(obj)
    cx, cy, h = obj.cx, obj.cy, obj.size / 2
    if obj.shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if obj.shape == "circle":
        return [(cx + h * u, cy + h * v) for u, v in _CIRCLE]
    if obj.shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if obj.shape == "star":
        r_out = obj.size * _STAR_R
        y_mid = y0 + r_out  # centre of the circumscribed circle; the top point touches y0
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_out * STAR_INNER_RATIO
            a = math.radians(-90 + 36 * k)
            pts.append((cx + r * math.cos(a), y_mid + r * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {obj.shape!r}; choose from {SHAPES}")


def render(scene: Scene, size: int | None = None) -> Image.Image:
    """Draw a scene as an RGB image, `size` x `size` (default: the scene's own canvas size)."""
    size = scene.size if size is None else size
    k = SUPERSAMPLE * size / scene.size  # scene pixels -> supersampled pixels
    image = Image.new("RGB", (size * SUPERSAMPLE,) * 2, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        # Pillow fills pixels whose centre is inside: pixel j covers [j, j+1), its centre is j + 0.5.
        pts = [(x * k - 0.5, y * k - 0.5) for x, y in shape_polygon(obj)]
        draw.polygon(pts, fill=COLORS[obj.color])
    return image.reduce(SUPERSAMPLE)


def _as_rng(seed_or_rng) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def _apart(a: tuple, b: tuple, gap: float) -> bool:
    """Bounding boxes at least `gap` apart along x or along y."""
    return max(a[0] - b[2], b[0] - a[2], a[1] - b[3], b[1] - a[3]) >= gap


def _place(rng, objects: list[ShapeObject], canvas: int, relation: str | None, tries: int = 200) -> bool:
    """Give each object a centre, in turn, so that none overlap (and the relation holds); False if stuck."""
    margin, gap = MARGIN * canvas, max(2.0, GAP * canvas)
    boxes = []
    for i, obj in enumerate(objects):
        half_h = obj.size / 2 * (_STAR_HEIGHT if obj.shape == "star" else 1.0)
        for _ in range(tries):
            obj.cx = round(float(rng.uniform(margin + obj.size / 2, canvas - margin - obj.size / 2)), 2)
            obj.cy = round(float(rng.uniform(margin + half_h, canvas - margin - half_h)), 2)
            box = shape_box(obj)
            if not all(_apart(box, other, gap) for other in boxes):
                continue
            if relation is not None and i == 1 and not relation_holds(objects[0], obj, relation, canvas):
                continue
            boxes.append(box)
            break
        else:
            return False
    return True


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str, canvas: int) -> bool:
    """The spec's test for a generated pair: a is `relation` b, clearly (offset >= 12%, slant <= 0.5)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # b relative to a
    along, across = {"left_of": (dx, dy), "right_of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= MIN_RELATION_OFFSET * canvas and abs(across) <= MAX_RELATION_SLANT * along


def sample_scene(
    seed_or_rng=None, size: int = 64, category: str | dict | None = None, exclude=None, backgrounds=None
) -> Scene:
    """Draw a random scene on a `size` canvas; `category` one of CATEGORIES, or a mix {category: weight}
    (categories left out weigh 0); default: all four equally likely. `backgrounds`: {name: weight} likewise
    for the background (default: the three equally likely).

    `exclude`: a set of canonical captions never to show (e.g. held-out two-object prompts); a scene is
    redrawn while any canonical caption of it (`canonical_captions`) is in the set.
    """
    rng = _as_rng(seed_or_rng)
    while True:
        scene = _sample_scene(rng, size, category, backgrounds)
        if not exclude or exclude.isdisjoint(canonical_captions(scene)):
            return scene


def _weighted(rng, names, weights: dict):
    p = np.array([float(weights.get(n, 0.0)) for n in names])
    return names[rng.choice(len(names), p=p / p.sum())]


def _sample_scene(rng, size: int, category: str | dict | None, backgrounds: dict | None = None) -> Scene:
    if category is None:
        category = CATEGORIES[rng.integers(len(CATEGORIES))]
    elif isinstance(category, dict):
        category = _weighted(rng, CATEGORIES, category)
    elif category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose from {CATEGORIES}")
    if backgrounds is None:  # (drawn as before when unweighted: the same seed keeps giving the same scenes)
        background = BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
    else:
        background = _weighted(rng, BACKGROUND_NAMES, backgrounds)
    kinds = ((COLOR_NAMES[rng.integers(8)], SHAPES[rng.integers(4)]),)
    if category == "single":
        prompt = Prompt(kinds, background=background)
    elif category == "counting":
        prompt = Prompt(kinds, count=int(rng.integers(2, 5)), background=background)
    else:
        while (second := (COLOR_NAMES[rng.integers(8)], SHAPES[rng.integers(4)])) == kinds[0]:
            pass
        relation = RELATIONS[rng.integers(4)] if category == "position" else None
        prompt = Prompt((*kinds, second), relation=relation, background=background)
    return scene_for_prompt(prompt, rng, size)


def scene_for_prompt(prompt: Prompt, seed_or_rng=None, size: int = 64) -> Scene:
    """A random scene that shows exactly `prompt` (a random background if it names none)."""
    rng = _as_rng(seed_or_rng)
    background = prompt.background or BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
    kinds = prompt.expected_objects()
    n = len(kinds)
    lo, hi = (f * size for f in SIZE_RANGE["one" if n == 1 else "two" if n == 2 else "many"])
    while True:
        if prompt.count > 1:  # identical objects: one size for all
            widths = [math.ceil(float(rng.uniform(lo, hi)) * 100) / 100] * n
        else:
            widths = [math.ceil(float(rng.uniform(lo, hi)) * 100) / 100 for _ in range(n)]
        objects = [ShapeObject(s, c, 0.0, 0.0, w) for (c, s), w in zip(kinds, widths, strict=True)]
        if _place(rng, objects, size, prompt.relation):
            rel = None if prompt.relation is None else {"type": prompt.relation, "a": 0, "b": 1}
            return Scene(background, objects, rel, size)


def canonical_captions(scene: Scene) -> set[str]:
    """Every canonical caption that describes the scene (with and without background, either order)."""
    out = set()
    for background in (True, False):
        p = scene.prompt(background)
        out.add(format_caption(p))
        if len(p.objects) == 2:
            flipped = None if p.relation is None else OPPOSITE_RELATION[p.relation]
            out.add(format_caption(Prompt(p.objects[::-1], relation=flipped, background=p.background)))
    return out


# Paraphrase templates for training captions: {a}/{b} are object phrases ("a red circle").
_PAIR_TEMPLATES = ["{a} and {b}", "{a} and {b}", "{a} next to {b}", "{a} with {b}", "{a}, {b}"]
_RELATION_TEMPLATES = {
    "left_of": ["{a} to the left of {b}", "{a} left of {b}", "{a} on the left, {b} on the right"],
    "right_of": ["{a} to the right of {b}", "{a} right of {b}", "{a} on the right, {b} on the left"],
    "above": ["{a} above {b}", "{a} over {b}", "{a} on top, {b} underneath"],
    "below": ["{a} below {b}", "{a} under {b}", "{a} at the bottom, {b} on top"],
}
_BACKGROUND_TEMPLATES = [
    " on a {} background",
    " on a {} background",
    " against a {} background",
    ", {} background",
]
_DIGITS = {2: "2", 3: "3", 4: "4"}


def _phrase(rng, color: str, shape: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return [f"{article} {color} {shape}", f"{article} {color} {shape}", f"one {color} {shape}"][rng.integers(3)]


def caption(scene: Scene, rng=None, paraphrase: bool = False) -> str:
    """A caption for the scene: canonical, naming the background, when rng is None.

    With an rng the background is named half the time; with paraphrase=True too, the wording varies
    ("2 red stars", "a blue square under a red circle", ", black background") for training.
    """
    if rng is None:
        return format_caption(scene.prompt(background=True))
    rng = _as_rng(rng)
    p = scene.prompt(background=bool(rng.integers(2)))
    if not paraphrase:
        return format_caption(p)
    (c0, s0), *rest = p.objects
    if p.count > 1:
        number = NUMBER_WORDS[p.count] if rng.integers(3) else _DIGITS[p.count]
        text = f"{number} {c0} {s0}s"
    elif not rest:
        text = _phrase(rng, c0, s0)
    else:
        a, b, relation = _phrase(rng, c0, s0), _phrase(rng, *rest[0]), p.relation
        if rng.integers(2):  # say it the other way round
            a, b = b, a
            relation = None if relation is None else OPPOSITE_RELATION[relation]
        templates = _PAIR_TEMPLATES if relation is None else _RELATION_TEMPLATES[relation]
        text = templates[rng.integers(len(templates))].format(a=a, b=b)
    if p.background is not None:
        text += _BACKGROUND_TEMPLATES[rng.integers(len(_BACKGROUND_TEMPLATES))].format(p.background)
    return text


def unnamed_background_caption(example: dict, seed: int, index: int, share: float) -> str:
    """The canonical caption of a `ShapesDataset(paraphrase=False)` item, without its background phrase for
    `share` of the items (decided by its own (seed, index) stream, so the scenes stay those of the seed).
    Such captions name the background always; the held-out suite leaves it out in a quarter of its prompts."""
    if share > 0 and np.random.default_rng([seed, index, 1]).random() < share:
        return format_caption(Scene.from_dict(example["scene"]).prompt(background=False))
    return example["text"]


def make_example(seed_or_rng=None, size: int = 64, paraphrase: bool = False, exclude=None, mix=None, backgrounds=None):
    """One training example: (PIL image, caption, scene dict). Canonical caption unless paraphrase=True;
    `mix`, `backgrounds`: category and background weights as for `sample_scene` (default: uniform)."""
    rng = _as_rng(seed_or_rng)
    scene = sample_scene(rng, size, mix, exclude=exclude, backgrounds=backgrounds)
    text = caption(scene, rng, paraphrase=True) if paraphrase else caption(scene)
    return render(scene), text, scene.to_dict()


class ShapesDataset:
    """Map-style dataset of `length` scenes; item i is drawn from seed (seed, i), so any order or worker
    split gives the same examples. Items: {"image": PIL, "text": str, "scene": dict}."""

    def __init__(
        self,
        length: int,
        seed: int = 0,
        size: int = 64,
        paraphrase: bool = True,
        exclude=None,
        mix=None,
        backgrounds=None,
    ):
        self.length, self.seed, self.size, self.paraphrase, self.mix = length, seed, size, paraphrase, mix
        self.backgrounds = backgrounds
        self.exclude = None if exclude is None else set(exclude)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        image, text, scene = make_example(
            np.random.default_rng([self.seed, i]), self.size, self.paraphrase, self.exclude, self.mix, self.backgrounds
        )
        return {"image": image, "text": text, "scene": scene}


# A Shapes dataset's image names (000000.png, wider past a million): the only files a new one may remove.
IMAGE_NAME = re.compile(r"\d{6,}\.png")
# There from before the first image is written until metadata.jsonl is: it marks the folder as a Shapes set
# being written, so a stopped run (a first one too) can be run again into it.
WRITING = ".shapes-writing"


def write_dataset(out_dir, count: int, seed: int = 0, size: int = 64, paraphrase: bool = False) -> Path:
    """Write out_dir/000000.png ... and out_dir/metadata.jsonl ({"file_name", "text", "scene"} per line).

    An earlier Shapes set in out_dir is replaced: its metadata.jsonl goes before the first image is overwritten
    (its captions would describe other images), and its images that the new set does not overwrite are
    removed before the new metadata.jsonl appears.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(count, seed, size, paraphrase)
    width = max(6, len(str(count - 1)))
    metadata, writing = out_dir / "metadata.jsonl", out_dir / WRITING
    writing.write_text("a Shapes dataset is being written here; metadata.jsonl appears when it is whole\n")
    metadata.unlink(missing_ok=True)
    # metadata.jsonl appears only when every image is written: a stopped run leaves no dataset that looks whole
    partial = out_dir / ".metadata.jsonl.partial"
    names = set()
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for i in range(count):
                item = data[i]
                name = f"{i:0{width}d}.png"
                item["image"].save(out_dir / name, compress_level=1)
                names.add(name)
                f.write(json.dumps({"file_name": name, "text": item["text"], "scene": item["scene"]}) + "\n")
        for path in out_dir.iterdir():  # the earlier set's extra images (a larger --count), never anything else
            if IMAGE_NAME.fullmatch(path.name) and path.name not in names:
                path.unlink()
        os.replace(partial, metadata)
    finally:
        partial.unlink(missing_ok=True)
    writing.unlink()
    return metadata


def _check_replaceable(out_dir: Path) -> None:
    """Writing overwrites NNNNNN.png and metadata.jsonl: only a new or empty folder, or an earlier Shapes set
    (whole, or one a stopped run was writing)."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()) or (out_dir / WRITING).is_file():
        return
    metadata = out_dir / "metadata.jsonl"
    try:
        with open(metadata, encoding="utf-8") as f:
            earlier = "scene" in json.loads(f.readline())
    except (OSError, ValueError, TypeError):
        earlier = False
    if not earlier:
        raise FileExistsError(
            f"{out_dir} already holds files that are not a Shapes dataset, which writing one would overwrite "
            "or mix with; choose a new or empty folder"
        )
