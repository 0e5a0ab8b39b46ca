"""What identifies a module's state for a cache made from it: its modules, their modes and code, its tensors."""

from __future__ import annotations

from torch import nn


def module_fingerprint(module: nn.Module, versions: bool = False) -> tuple:
    """Changes when modules are replaced, wrapped (peft), patched or switched between train and eval, when a
    tensor is replaced, moved or changes dtype, and the config; with `versions`, also on in-place writes to
    any tensor (optimizer steps, `load_state_dict`, `p.add_()`; not writes through `p.data`)."""
    modules = tuple((id(m), type(m), m.training, *_code(m)) for m in module.modules())
    tensors = tuple(
        (id(t), t.data_ptr(), t.dtype, t.device, tuple(t.shape), t._version if versions else 0)
        for t in (*module.parameters(), *module.buffers())
    )
    return modules, tensors, repr(getattr(module, "config", None))


def _code(module: nn.Module) -> tuple:
    """The forward code a module runs, so that one patched in (on its class or on it) is noticed."""
    kind = type(module)
    return (
        kind.forward,
        getattr(kind, "_forward", None),
        module.__dict__.get("forward"),
        module.__dict__.get("_forward"),
    )
