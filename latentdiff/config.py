"""Config dataclasses <-> diffusers config.json dicts, refusing what latentdiff does not implement."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Bookkeeping keys diffusers writes into every config; they never change the model.
BOOKKEEPING_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


class UnsupportedConfigError(ValueError):
    """A config key (or a value of it) that latentdiff does not implement: refusing beats a different model."""


def from_config_dict(cls: type[T], config: dict[str, Any], where: str, tolerated: dict[str, Any] | None = None) -> T:
    """Build the dataclass `cls` from a diffusers config dict.

    Keys that are fields of `cls` are taken (lists become tuples). Keys in `tolerated` name features
    latentdiff does not implement; they are accepted only while set to the value that turns the feature
    off. Anything else raises UnsupportedConfigError naming the key and `where` it was found.
    """
    tolerated = tolerated or {}
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in config.items():
        if key in BOOKKEEPING_KEYS:
            continue
        if key in fields:
            value = tuple(value) if isinstance(value, list) else value
            if not fits(value, hints[key]):
                # caught here, a wrong type is named; unchecked, it fails deep in model building, or not at all
                raise ValueError(f"{where}: {key} = {value!r} is not {_describe(hints[key])}")
            kwargs[key] = value
        elif key in tolerated:
            if value != tolerated[key]:
                raise UnsupportedConfigError(
                    f"{where}: config key {key!r} = {value!r} is not supported by latentdiff "
                    f"(only {tolerated[key]!r} is); refusing to load a model that would differ"
                )
        else:
            raise UnsupportedConfigError(
                f"{where}: unknown config key {key!r} (value {value!r}); latentdiff does not support it"
            )
    return cls(**kwargs)


def fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the annotated type: int, float (an int too), bool, str, None, unions, tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, h) for h in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(fits(v, h) for v, h in zip(value, args))
    if hint is type(None):
        return value is None
    if hint in (int, float):  # bool is an int to Python, never to a config
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    return True  # annotations not listed above are not checked


_NAMES = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "true/false values"),
    str: ("a string", "strings"),
    type(None): ("null", "nulls"),
}


def _describe(hint: Any, plural: bool = False) -> str:
    """'an integer or a list of integers or null' for int | tuple[int, ...] | None: JSON's words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h, plural) for h in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0], plural=True)}"
        same = len(set(args)) == 1
        return f"a list of {len(args)} {_describe(args[0], plural=True)}" if same else "a list"
    return _NAMES[hint][plural] if hint in _NAMES else str(hint)


def to_config_dict(obj: Any, class_name: str) -> dict[str, Any]:
    """The diffusers-style dict for a config dataclass (tuples become lists, as JSON has no tuples)."""
    out: dict[str, Any] = {"_class_name": class_name}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON config with an error that names the file when it is broken."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"missing config file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object ({{...}}), got a {type(data).__name__}")
    return data


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
