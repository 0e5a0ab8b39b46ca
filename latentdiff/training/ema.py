"""Exponential moving average of the trained parameters, used for validation and export."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """shadow <- d shadow + (1 - d) param, with d = min(decay, (1 + n) / (10 + n)) after n updates.

    The warm-up (as diffusers' EMAModel without inv_gamma) keeps early, random weights from dominating.
    Works on the named trainable parameters of several modules: {"unet": unet, "text_encoder": te}.
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float = 0.9999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.num_updates = decay, 0
        self.params = {
            f"{name}.{key}": p for name, m in modules.items() for key, p in m.named_parameters() if p.requires_grad
        }
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        # one foreach call, not one lerp per tensor: on a GPU this loop was hundreds of kernel launches a step
        shadows = [self.shadow[k] for k in self.params]
        torch._foreach_lerp_(shadows, [p.detach().float() for p in self.params.values()], 1.0 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The modules hold the EMA weights inside the block and their own weights again after it."""
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        for k, p in self.params.items():
            p.copy_(self.shadow[k])
        try:
            yield
        finally:
            for k, p in self.params.items():
                p.copy_(saved[k])

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for k, p in self.params.items():
            p.copy_(self.shadow[k])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the trained parameters (differs in {sorted(missing)[:5]})")
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
