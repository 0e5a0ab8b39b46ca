"""The canonical Shapes caption grammar: format a `Prompt`, parse a caption back, the held-out suite.

Canonical captions (the evaluator parses exactly these, lower case):
    a red circle | an orange star                          single
    two blue squares | three ... | four ...                counting
    a red circle and a blue square                         two_objects
    a red circle to the left of a blue square              position (also: to the right of, above, below)
each optionally followed by " on a white background" (or black, gray).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from latentdiff.textfiles import read_text

COLOR_NAMES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SHAPE_NAMES = ("circle", "square", "triangle", "star")
BACKGROUND_NAMES = ("white", "black", "gray")
CATEGORIES = ("single", "counting", "two_objects", "position")
# relation type -> the words between the two objects: "A <words> B" means A is <type> B.
RELATION_WORDS = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
OPPOSITE_RELATION = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}

EXAMPLES = (
    "'a red circle', 'three blue squares', 'a red circle and a blue square', "
    "'a red circle to the left of a blue square', optionally + ' on a white|black|gray background'"
)


@dataclass(frozen=True)
class Prompt:
    """What a canonical caption asks for."""

    objects: tuple[tuple[str, str], ...]  # (color, shape) of each distinct object, in caption order
    count: int = 1  # how many copies of objects[0] (2..4 for counting, else 1)
    relation: str | None = None  # "left_of" | "right_of" | "above" | "below": objects[0] <relation> objects[1]
    background: str | None = None  # "white" | "black" | "gray", or None when the caption names none

    def __post_init__(self):
        for color, shape in self.objects:
            if color not in COLOR_NAMES or shape not in SHAPE_NAMES:
                raise ValueError(f"unknown object {color!r} {shape!r}")
        if self.background is not None and self.background not in BACKGROUND_NAMES:
            raise ValueError(f"unknown background {self.background!r}; choose from {BACKGROUND_NAMES}")
        if self.relation is not None and self.relation not in RELATION_WORDS:
            raise ValueError(f"unknown relation {self.relation!r}; choose from {sorted(RELATION_WORDS)}")
        if len(self.objects) == 1:
            if self.relation is not None or not 1 <= self.count <= 4:
                raise ValueError(f"a single kind of object takes a count of 1..4 and no relation: {self}")
        elif len(self.objects) == 2:
            if self.count != 1 or self.objects[0] == self.objects[1]:
                raise ValueError(f"two objects must differ and have count 1: {self}")
        else:
            raise ValueError(f"a prompt names one or two kinds of object, not {len(self.objects)}")

    @property
    def category(self) -> str:
        if len(self.objects) == 1:
            return "single" if self.count == 1 else "counting"
        return "two_objects" if self.relation is None else "position"

    def expected_objects(self) -> list[tuple[str, str]]:
        """Every object the image must hold, as (color, shape), with repeats for counting."""
        return list(self.objects) * self.count


def _with_article(color: str, shape: str) -> str:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def format_caption(prompt: Prompt) -> str:
    """The canonical caption of `prompt`."""
    (color, shape), *rest = prompt.objects
    if prompt.count > 1:
        text = f"{NUMBER_WORDS[prompt.count]} {color} {shape}s"
    else:
        text = _with_article(color, shape)
    if rest:
        words = "and" if prompt.relation is None else RELATION_WORDS[prompt.relation]
        text += f" {words} {_with_article(*rest[0])}"
    if prompt.background is not None:
        text += f" on a {prompt.background} background"
    return text


_C = "|".join(COLOR_NAMES)
_S = "|".join(SHAPE_NAMES)
_OBJ = rf"an? (?P<{{0}}c>{_C}) (?P<{{0}}s>{_S})"
_REL = "|".join(RELATION_WORDS.values())
_CAPTION = re.compile(
    rf"(?:(?P<n>{'|'.join(NUMBER_WORDS.values())}) (?P<nc>{_C}) (?P<ns>{_S})s"
    rf"|{_OBJ.format('a')}(?: (?P<words>and|{_REL}) {_OBJ.format('b')})?)"
    rf"(?: on an? (?P<bg>{'|'.join(BACKGROUND_NAMES)}) background)?"
)
_WORDS_TO_RELATION = {words: rel for rel, words in RELATION_WORDS.items()}
_WORDS_TO_NUMBER = {word: n for n, word in NUMBER_WORDS.items()}


def parse_caption(text: str) -> Prompt:
    """Parse a canonical caption (case and runs of spaces are forgiven); ValueError if it is not one."""
    norm = " ".join(text.lower().split())
    m = _CAPTION.fullmatch(norm)
    if m is None:
        raise ValueError(f"not a canonical Shapes prompt: {text!r}; expected e.g. {EXAMPLES}")
    if m["n"]:
        objects, count, relation = ((m["nc"], m["ns"]),), _WORDS_TO_NUMBER[m["n"]], None
    else:
        objects, count = ((m["ac"], m["as"]),), 1
        relation = None
        if m["words"]:
            objects += ((m["bc"], m["bs"]),)
            relation = None if m["words"] == "and" else _WORDS_TO_RELATION[m["words"]]
            if objects[0] == objects[1]:
                raise ValueError(
                    f"not a canonical Shapes prompt: {text!r}; two objects must differ "
                    f"(say 'two {objects[0][0]} {objects[0][1]}s')"
                )
    return Prompt(objects=objects, count=count, relation=relation, background=m["bg"])


def all_prompts(category: str) -> list[Prompt]:
    """Every distinct prompt of a category (counting backgrounds, including none), in a fixed order."""
    kinds = [(c, s) for c in COLOR_NAMES for s in SHAPE_NAMES]
    backgrounds = (None, *BACKGROUND_NAMES)
    if category == "single":
        return [Prompt((k,), background=bg) for k in kinds for bg in backgrounds]
    if category == "counting":
        return [Prompt((k,), count=n, background=bg) for n in NUMBER_WORDS for k in kinds for bg in backgrounds]
    if category in ("two_objects", "position"):
        relations = (None,) if category == "two_objects" else tuple(RELATION_WORDS)
        return [
            Prompt((a, b), relation=r, background=bg)
            for a in kinds
            for b in kinds
            if a != b
            for r in relations
            for bg in backgrounds
        ]
    raise ValueError(f"unknown category {category!r}; choose from {CATEGORIES}")


def make_heldout_prompts(per_category: int = 100, seed: int = 2024) -> list[str]:
    """Draw the held-out suite: `per_category` distinct canonical prompts per category, category-major."""
    rng = random.Random(seed)
    out = []
    for category in CATEGORIES:
        out += [format_caption(p) for p in rng.sample(all_prompts(category), per_category)]
    return out


@lru_cache(maxsize=1)
def _heldout() -> tuple[str, ...]:
    text = resources.files("latentdiff.eval").joinpath("heldout_prompts.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def heldout_prompts(categories: tuple[str, ...] | None = None) -> list[str]:
    """The bundled held-out suite (latentdiff/eval/heldout_prompts.txt), optionally only some categories."""
    prompts = list(_heldout())
    if categories is not None:
        prompts = [p for p in prompts if parse_caption(p).category in categories]
    return prompts


def read_prompt_file(path) -> list[str]:
    """Canonical prompts, one a line (blank lines and # comments skipped); ValueError naming the bad line."""
    prompts = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):  # NotTextError is a ValueError
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            parse_caption(text)
        except ValueError as e:
            raise ValueError(f"{path}, line {lineno}: {e}") from None
        prompts.append(text)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
