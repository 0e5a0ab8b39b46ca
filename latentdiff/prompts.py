"""Prompt files: .txt with kohya-style per-line options, .jsonl and .csv, parsed into jobs or line errors.

A bad line never stops the parse: it becomes a `LineError` (1-based line number + message) and the
other lines still become `PromptJob`s, so a run can go on and report the bad lines at the end.

.txt rules (one prompt per line):
- The file is UTF-8, with or without a BOM, or UTF-16 with one (`latentdiff.textfiles`); lines end in LF
  or CRLF. Lines are split on "\\n" only, so line numbers are the ones an editor shows.
- A line that is blank, or whose first non-blank character is `#`, is skipped.
- An *option token* is `--NAME` where NAME is ASCII letters only, standing at the start of the line or
  after whitespace, and followed by whitespace or the end of the line. The options section starts at the
  first option token on the line and runs to its end; everything before it is the prompt, verbatim
  (only the surrounding whitespace is stripped). Each option's value is the text up to the next option
  token, stripped. So `it's "quoted"`, `a -- b`, `--not-an-option`, `x--n y`, `--n,` and any unicode stay
  prompt text, while `a cat --n blurry, dark --s 20` is prompt `a cat` with a negative prompt and steps.
- Options (kohya sd-scripts' names): `--n` negative prompt, `--w` width, `--h` height, `--d` seed,
  `--s` steps, `--l` CFG scale, `--ss` sampler. Any other NAME (`--foo 3`), an option given twice, an
  option without a value, or a value that is not a number of the right kind makes the line an error:
  an option-looking word is never silently dropped into the prompt. A prompt that really needs a
  ` --word ` in its text can be written in .jsonl or .csv, whose prompts are never parsed.

.jsonl: one JSON object per line, keys = `FIELDS`; `prompt` is required, a null value means "not set";
blank lines are skipped. .csv: a header row naming columns from `FIELDS` (must include `prompt`); an
empty cell means "not set"; a row's line number is the line where the row starts.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentdiff.textfiles import NotTextError, decode_text

# Sampler names, for when latentdiff.samplers is not importable; the SAMPLERS dict there is the truth.
FALLBACK_SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m")

# .txt option name -> PromptJob field (kohya sd-scripts' sample-prompt syntax).
TXT_OPTIONS = {
    "n": "negative_prompt",
    "w": "width",
    "h": "height",
    "d": "seed",
    "s": "steps",
    "l": "guidance_scale",
    "ss": "sampler",
}

# The keys a .jsonl object / .csv header may use.
FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "sampler",
    "images",
)

SUFFIXES = (".txt", ".jsonl", ".csv")

_OPTION_TOKEN = re.compile(r"(?:^|(?<=\s))--([A-Za-z]+)(?=\s|$)")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
# Images in one batch: far above the batches machines make, far below what would exhaust memory. generate
# refuses more, so reproduce can refuse more in a record (a tampered one asked for gigabytes).
MAX_BATCH = 1024


@dataclass(frozen=True)
class PromptJob:
    """One line of a prompt file; None means "use the run's default"."""

    line: int  # 1-based line number in the file (for -p prompts: their position on the command line)
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    images: int | None = None  # images of this prompt (default: the run's --images-per-prompt)


@dataclass(frozen=True)
class LineError:
    """A line that could not be parsed; the rest of the file is still used."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class PromptFileError(ValueError):
    """The whole file is unusable (unreadable, not UTF-8, unknown format)."""


def sampler_names() -> list[str]:
    """Valid sampler names: the keys of latentdiff.samplers.SAMPLERS, or the documented list."""
    try:
        from latentdiff.samplers import SAMPLERS
    except ModuleNotFoundError as e:
        if e.name != "latentdiff.samplers":
            raise
        return sorted(FALLBACK_SAMPLERS)
    return sorted(SAMPLERS)


def read_prompt_file(path: str | Path) -> tuple[list[PromptJob], list[LineError]]:
    """Parse a .txt, .jsonl or .csv prompt file into its jobs and its bad lines, both in line order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PromptFileError(
            f"{path}: unknown prompt file type {path.suffix or '(no suffix)'!r}; use one of {', '.join(SUFFIXES)}"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PromptFileError(f"cannot read prompt file {path}: {e.strerror or e}") from None
    try:
        text = decode_text(data, path)
    except NotTextError as e:
        raise PromptFileError(str(e)) from None
    return parse_prompts(text, suffix.lstrip("."))


def parse_prompts(text: str, fmt: str = "txt") -> tuple[list[PromptJob], list[LineError]]:
    """Parse prompt-file text of format 'txt', 'jsonl' or 'csv' (a leading BOM is ignored)."""
    text = text.removeprefix("\ufeff")
    parsers = {"txt": parse_txt_line, "jsonl": _parse_jsonl_line}
    if fmt == "csv":
        results = _parse_csv(text)
    elif fmt in parsers:
        results = []
        for number, raw in enumerate(text.split("\n"), start=1):
            line = raw.removesuffix("\r")
            if not line.strip() or (fmt == "txt" and line.lstrip().startswith("#")):
                continue
            results.append(parsers[fmt](line, number))
    else:
        raise PromptFileError(f"unknown prompt format {fmt!r}; use txt, jsonl or csv")
    jobs = [r for r in results if isinstance(r, PromptJob)]
    errors = [r for r in results if isinstance(r, LineError)]
    return jobs, errors


def parse_txt_line(line: str, number: int = 1) -> PromptJob | LineError:
    """One .txt line (already known not to be blank or a comment) -> job or error."""
    tokens = list(_OPTION_TOKEN.finditer(line))
    prompt = (line[: tokens[0].start()] if tokens else line).strip()
    values: dict[str, Any] = {}
    try:
        for i, token in enumerate(tokens):
            name = token.group(1)
            end = tokens[i + 1].start() if i + 1 < len(tokens) else len(line)
            value = line[token.end() : end].strip()
            if name not in TXT_OPTIONS:
                known = ", ".join(f"--{n}" for n in TXT_OPTIONS)
                raise ValueError(f"unknown option --{name} (options are {known})")
            field = TXT_OPTIONS[name]
            if field in values:
                raise ValueError(f"option --{name} given twice")
            if not value:
                raise ValueError(f"option --{name} needs a value")
            values[field] = convert_value(field, value, f"--{name}")
        if not prompt:
            raise ValueError("no prompt before the options" if tokens else "no prompt")
    except ValueError as e:
        return LineError(number, str(e))
    return PromptJob(line=number, prompt=prompt, **values)


def _parse_jsonl_line(line: str, number: int) -> PromptJob | LineError:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return LineError(number, f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return LineError(number, f"expected a JSON object, got {type(obj).__name__}")
    return _job_from_mapping(obj, number, strings_are_text=False)


def _parse_csv(text: str) -> list[PromptJob | LineError]:
    reader = csv.reader(io.StringIO(text, newline=""))
    results: list[PromptJob | LineError] = []
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)  # blank lines before the header
        if header is None:
            return results
        header_line = reader.line_num
        names = [cell.strip() for cell in header]
        unknown = [n for n in names if n not in FIELDS]
        if unknown or "prompt" not in names or len(set(names)) != len(names):
            problem = (
                f"unknown column(s) {', '.join(map(repr, unknown))}"
                if unknown
                else "no 'prompt' column"
                if "prompt" not in names
                else "a column is named twice"
            )
            return [LineError(header_line, f"bad CSV header: {problem}; columns are {', '.join(FIELDS)}")]
        start = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):
                if len(row) != len(names):
                    results.append(LineError(start, f"expected {len(names)} fields, got {len(row)}"))
                else:
                    obj = {n: cell for n, cell in zip(names, row, strict=True) if cell.strip() != ""}
                    results.append(_job_from_mapping(obj, start, strings_are_text=True))
            start = reader.line_num + 1
    except csv.Error as e:
        results.append(LineError(reader.line_num, f"bad CSV ({e})"))
    return results


def _job_from_mapping(obj: dict[str, Any], number: int, strings_are_text: bool) -> PromptJob | LineError:
    """A .jsonl object or .csv row -> job; CSV cells are strings, so numbers are parsed from text."""
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        names = ", ".join(map(repr, unknown))
        return LineError(number, f"unknown key(s) {names}; keys are {', '.join(FIELDS)}")
    values: dict[str, Any] = {}
    try:
        for key, value in obj.items():
            if value is None:
                continue
            if key in ("prompt", "negative_prompt"):
                if not isinstance(value, str):
                    raise ValueError(f"{key!r} must be a string, got {json.dumps(value)}")
                values[key] = value
            elif strings_are_text:
                values[key] = convert_value(key, value.strip(), repr(key))
            else:
                values[key] = _convert_json(key, value)
        if not values.get("prompt", "").strip():
            raise ValueError("missing or empty 'prompt'")
    except ValueError as e:
        return LineError(number, str(e))
    return PromptJob(line=number, **values)


_INT_FIELDS = {"seed", "steps", "width", "height", "images"}


def convert_value(field: str, value: str, name: str) -> Any:
    """Text value -> typed, checked value for `field`; ValueError naming the option otherwise."""
    if field in ("negative_prompt", "prompt"):
        return value
    if field == "sampler":
        return check_value(field, value, name)
    if field in _INT_FIELDS:
        if not re.fullmatch(r"[+-]?\d+", value):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return check_value(field, int(value), name)
    try:  # guidance_scale
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    return check_value(field, number, name)


def _convert_json(field: str, value: Any) -> Any:
    name = repr(field)
    if field == "sampler":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {json.dumps(value)}")
        return check_value(field, value, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {json.dumps(value)}")
    if field in _INT_FIELDS:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            value = int(value)
        return check_value(field, value, name)
    return check_value(field, float(value), name)


def check_value(field: str, value: Any, name: str) -> Any:
    """Range checks that do not depend on the model (the pipeline checks size multiples itself)."""
    if field == "sampler":
        sampler = value.strip().lower()
        names = sampler_names()
        if sampler not in names:
            raise ValueError(f"unknown sampler {value!r}; choose from {', '.join(names)}")
        return sampler
    if field == "seed" and not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be between 0 and {MAX_SEED}, got {value}")
    if field in ("steps", "width", "height", "images") and value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    if field == "guidance_scale" and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value
