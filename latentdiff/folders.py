"""Model folders in the diffusers layout: find, check and read/write each component, safetensors only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latentdiff.config import read_json

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# The weight file name stem of each component that has weights (diffusers' and transformers' names).
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
DEFAULTS_FILE = "latentdiff.json"  # our stored defaults; diffusers ignores files it does not know

# The diffusers scheduler class that runs the same sampler, so a folder we write samples alike in diffusers.
DIFFUSERS_SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


class ModelFolderError(ValueError):
    """A model folder that is missing, incomplete, or holds weights we refuse to load."""


def component_dir(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise ModelFolderError(
            f"model folder {root} has no {name!r} component folder ({folder} is missing); "
            f"a diffusers-layout folder needs {', '.join(COMPONENTS)}"
        )
    return folder


def check_model_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ModelFolderError(f"model folder not found: {root}")
    if not (root / "model_index.json").is_file():
        raise ModelFolderError(f"{root} is not a diffusers model folder: it has no model_index.json")
    return root


def weight_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors file(s) of one component, in diffusers' order: the full-precision weights (one file or
    a sharded index) before the fp16 variant's, which are rounded."""
    # the full-precision file, its sharded index, then the same for the fp16 variant
    names = (f"{stem}.safetensors", f"{stem}.safetensors.index.json")
    names += (f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.fp16.json")
    for name in names:
        if (folder / name).is_file():
            return _named_files(folder / name)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelFolderError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); latentdiff loads safetensors only, "
            "because a pickle can run arbitrary code. Convert it once with a tool you trust "
            "(e.g. diffusers: pipe.save_pretrained(dir, safe_serialization=True))"
        )
    raise ModelFolderError(f"{folder} has no weights: expected {stem}.safetensors")


def _named_files(path: Path) -> list[Path]:
    """[path] for a weights file; the shard files for a sharded index."""
    if path.suffix == ".safetensors":
        return [path]
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
        raise ModelFolderError(f"{path} has no weight_map of tensor names to shard files")
    shards = [path.parent / s for s in sorted(set(weight_map.values()))]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ModelFolderError(f"{path} names shard files that are not there: {', '.join(missing)}")
    return shards


def read_state_dict(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder, stem):
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise ModelFolderError(
                f"{path} is not a readable safetensors file ({e}); it may be truncated or damaged: "
                "copy or save the model again"
            ) from None
    return state


def load_weights(
    module: torch.nn.Module, folder: Path, stem: str, ignore: tuple[str, ...] = (), prefix: str = ""
) -> None:
    """Load safetensors into `module`, casting to its dtype; every key must match (bar `ignore` suffixes).

    `prefix` is a key prefix that some writers add and others do not (transformers 4 wrote CLIP text
    weights under `text_model.`, transformers 5 without it): it is added or removed to fit the module.
    """
    state = read_state_dict(folder, stem)
    if prefix:
        state = _fit_prefix(state, module, prefix)
    own = module.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)}, not {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if wrong:
        raise ModelFolderError(
            f"{folder}: weights do not fit the model built from its config.json: {len(wrong)} have other shapes "
            f"({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''})"
        )
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(ignore)]
    unexpected = [k for k in result.unexpected_keys if not k.endswith(ignore)]
    if missing or unexpected:
        raise ModelFolderError(
            f"{folder}: weights do not fit the model built from its config.json "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )


def _fit_prefix(state: dict[str, torch.Tensor], module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    module_has = any(k.startswith(prefix) for k in module.state_dict())
    file_has = any(k.startswith(prefix) for k in state)
    if module_has and not file_has:
        return {prefix + k: v for k, v in state.items()}
    if file_has and not module_has:
        return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def save_weights(module: torch.nn.Module, path: Path, dtype: torch.dtype | None, prefix: str = "") -> None:
    """Write `module`'s weights as safetensors; `prefix` is put on keys that lack it (see load_weights)."""
    state = {}
    for key, tensor in module.state_dict().items():
        if prefix and not key.startswith(prefix):
            key = prefix + key
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()
    save_file(state, str(path), metadata={"format": "pt"})


def model_index(scheduler_class: str) -> dict[str, Any]:
    """model_index.json as diffusers' StableDiffusionPipeline expects it."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def read_defaults(root: Path) -> dict[str, Any]:
    path = root / DEFAULTS_FILE
    return read_json(path) if path.is_file() else {}


def check_replaceable(target: str | Path, marker: str) -> None:
    """FileExistsError unless `target` is new, an empty folder or an earlier save (it holds `marker`): saving
    replaces it whole. Callers that work long before saving call this first too."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"cannot save to {target}: it is a file, not a folder")
    if target.is_dir() and not (target / marker).is_file() and any(target.iterdir()):
        raise FileExistsError(
            f"cannot save to {target}: it is a folder with other files in it and no {marker} of an earlier "
            "save, and saving would replace it whole; choose a new or empty folder, or an earlier save to overwrite"
        )


def write_folder_atomically(target: str | Path, write, marker: str) -> Path:
    """Call write(tmp_dir) then move tmp_dir into place, so `target` is never a half-written model.

    An existing `target` is replaced whole, so only an empty folder or one holding `marker` (an earlier save
    of the same kind) may be: anything else there would be deleted with it.
    """
    target = Path(target)
    check_replaceable(target, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def folder_hash(root: str | Path) -> str:
    """sha256 over the folder's configs and weights (sorted relative paths + bytes): names a model exactly."""
    import hashlib

    root = Path(root)
    digest = hashlib.sha256()
    # os.walk(followlinks=True), not rglob: a component folder may be a symlink (a model assembled from
    # others' parts), and its files must count; a folder reached twice (a link loop) only once
    found, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(folder, name) for name in names]
    for path in sorted(p for p in found if p.is_file() and not p.name.startswith(".")):
        if path.suffix not in (".safetensors", ".json", ".txt"):
            continue
        digest.update(path.relative_to(root).as_posix().encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
