"""What identifies a module's state for a cache made from it: its modules, their modes and code, its tensors."""

from __future__ import annotations

from torch import nn


def module_fingerprint(module: nn.Module, versions: bool = False) -> tuple:
    """Changes when modules are replaced, wrapped (peft), patched or switched between train and eval, when a
    tensor is replaced, moved or changes dtype, and the config; with `versions`, also on in-place writes to
    any tensor (optimizer steps, `load_state_dict`, `p.add_()`; not writes through `p.data`).

    One pass over the modules and their own tensors: it runs at every pipeline call.
    """
    parts = []
    for m in module.modules():
        kind, own = type(m), m.__dict__
        # the forward code it runs, so that one patched in (on its class or on it) is noticed
        code = (kind.forward, getattr(kind, "_forward", None), own.get("forward"), own.get("_forward"))
        parts.append((id(m), kind, m.training, code))
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                # tensors made under inference_mode keep no version (and cannot be written outside it)
                version = t._version if versions and not t.is_inference() else 0
                parts.append((id(t), t.data_ptr(), t.dtype, t.device, t.shape, version))
    return tuple(parts), repr(getattr(module, "config", None))
