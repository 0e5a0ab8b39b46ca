"""Config dataclasses <-> diffusers config.json dicts, refusing what latentdiff does not implement."""

from __future__ import annotations

import dataclasses
import json
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
    kwargs = {}
    for key, value in config.items():
        if key in BOOKKEEPING_KEYS:
            continue
        if key in fields:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
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
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"missing config file: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
