"""Show a model folder: components, parameter counts, sizes on disk and stored defaults."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from latentdiff.cli import UserError


def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL", help="diffusers-layout folder (default: bundled model)")
    parser.add_argument("--no-hash", action="store_true", help="skip hashing the weights (fast on big models)")


def run(args) -> int:
    from latentdiff import folders
    from latentdiff.config import read_json
    from latentdiff.pipeline import BUNDLED_MODEL, FALLBACK_DEFAULTS, check_defaults, read_configs

    root = Path(args.model) if args.model else BUNDLED_MODEL
    try:
        folders.check_model_root(root)
    except folders.ModelFolderError as e:
        hint = "" if args.model else " (the bundled model is not in this checkout; pass a model folder)"
        raise UserError(f"{e}{hint}") from None
    problems: list[str] = []  # a damaged folder is shown as far as it can be, then what is wrong with it

    def read(path: Path, read_file) -> dict:
        try:
            return read_file(path)
        except (OSError, ValueError) as e:
            problems.append(str(e))
            return {}

    index = read(root / "model_index.json", read_json)
    read(root, read_configs)  # settings loading refuses (unsupported scheduler keys, parts that do not fit)
    stored = read(root, folders.read_defaults)
    try:
        check_defaults(stored.get("defaults") or {}, f"{root / folders.DEFAULTS_FILE}: defaults")
    except ValueError as e:
        problems.append(str(e))
        stored = {**stored, "defaults": {}, "invalid": True}
    print(f"model   {stored.get('name') or root.resolve().name}")
    print(f"folder  {root.resolve()}")
    if not args.no_hash:
        print(f"hash    {folders.folder_hash(root)}")

    total_params = total_bytes = 0
    print("\ncomponent     class                           parameters  dtype      size")
    for name in folders.COMPONENTS:
        library_class = index.get(name) or [None, "?"]
        folder = root / name
        params, dtypes = _count_parameters(_weight_files(root, name, problems), problems)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
        total_params += params
        total_bytes += size
        shown = f"{params:,}" if params else "-"
        dtype = "/".join(sorted(dtypes)) or "-"
        print(f"{name:<13} {library_class[1] or '-':<30} {shown:>12}  {dtype:<9} {_size(size)}")
    print(f"{'total':<13} {'':<30} {total_params:>12,}  {'':<9} {_size(total_bytes)}")

    defaults = {**FALLBACK_DEFAULTS, **(stored.get("defaults") or {})}
    if "height" not in defaults or "width" not in defaults:
        native = _native_size(root)
        if native:
            defaults.setdefault("height", native)
            defaults.setdefault("width", native)
    which = "invalid ones" if stored.get("invalid") else "none"
    note = "" if stored.get("defaults") else f" ({which} stored in {folders.DEFAULTS_FILE}; latentdiff's)"
    print("\ndefaults" + note)
    for key in sorted(defaults):
        print(f"  {key:<15} {defaults[key]}")
    scheduler = root / "scheduler" / "scheduler_config.json"
    config = read(scheduler, read_json) if scheduler.is_file() else {}
    if config:
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
        print("\nschedule")
        for key in keys:
            if key in config:
                print(f"  {key:<20} {config[key]}")
    if problems:
        print("\nproblems (loading this folder will fail on them)")
        for problem in dict.fromkeys(problems):  # a missing folder is met by two checks: said once
            print(f"  {problem}")
        return 1
    return 0


def _weight_files(root: Path, name: str, problems: list[str]) -> list[Path]:
    """The files loading would read for a component, found by the loader's own checks so that info and
    loading cannot disagree (a missing component, pickle weights only, a broken shard index: to `problems`)."""
    from latentdiff import folders

    try:
        folder = folders.component_dir(root, name)
        stem = folders.WEIGHT_STEMS.get(name)
        return folders.weight_files(folder, stem) if stem else []
    except (OSError, ValueError) as e:  # ModelFolderError is a ValueError
        problems.append(str(e))
        return []


def _count_parameters(paths: list[Path], problems: list[str]) -> tuple[int, set[str]]:
    """Parameters and dtypes from the safetensors headers alone (no tensor is read); bad files to `problems`."""
    count, dtypes = 0, set()
    for path in paths:
        try:
            header = _header(path)
            entries = [entry for key, entry in header.items() if key != "__metadata__"]
            count += sum(math.prod(entry["shape"]) for entry in entries)
            dtypes.update(entry["dtype"] for entry in entries)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
            problems.append(f"{path}: not a readable safetensors file ({e or type(e).__name__})")
    return count, dtypes


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file: 8 bytes of length, then that many bytes of JSON."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > path.stat().st_size - 8:  # garbage would otherwise ask for gigabytes
            raise ValueError(f"its header claims {length} bytes, more than the file holds")
        return json.loads(f.read(length))


def _native_size(root: Path) -> int | None:
    try:
        unet = json.loads((root / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((root / "vae" / "config.json").read_text(encoding="utf-8"))
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""
