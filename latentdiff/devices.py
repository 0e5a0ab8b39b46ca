"""Check a torch device before any weight moves to it, so a wrong one fails with a sentence, not deep in torch."""

from __future__ import annotations

import torch


def check_device(device: str | torch.device) -> torch.device:
    """The device, parsed; ValueError saying what is missing when this torch or machine cannot use it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{device!r} is not a torch device ({e})") from None
    kind = parsed.type
    if kind == "meta":  # shapes without data: the weights would be lost and nothing could be computed
        raise ValueError("the meta device holds no data, so nothing can run on it; use cpu or a GPU")
    if kind == "cpu":
        return parsed
    if kind == "cuda" and torch.version.cuda is None and torch.version.hip is None:
        raise ValueError(
            f"torch {torch.__version__} was built without CUDA, so {parsed} cannot be used; "
            "use cpu, or install a CUDA build of torch"
        )
    backend = getattr(torch.backends, kind, None) if kind == "mps" else getattr(torch, kind, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is not None and not is_available():
        raise ValueError(f"no {kind} device is available on this machine; use cpu")
    count = getattr(getattr(torch, kind, None), "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        n = count()
        raise ValueError(
            f"{parsed} does not exist: this machine has {n} {kind} device{'s' if n != 1 else ''} "
            f"({', '.join(f'{kind}:{i}' for i in range(n))})"
        )
    return parsed
