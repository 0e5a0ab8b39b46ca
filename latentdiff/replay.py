"""Small U-Nets on the CPU: denoising steps replayed from a TorchScript trace, with no Python between ops.

On the bundled model about an eighth of a U-Net step is Python: some 270 module calls and 900 calls into
torch, a few microseconds each (BENCHMARKS.md, session 18). A trace records the aten operations one step
runs at given shapes and replays them: the same kernels on the same shapes in the same order, so the same
bits. That is checked on the first real step a trace takes; on any difference it is dropped for good and
the step is the eager one. Making a trace costs about half a second, so one is made only when a call's
shapes keep coming back (the third pipeline call with them), on the CPU, for U-Nets up to 50M parameters.

What a trace could get wrong, and the guard for each:
- Weights changed in place (optimizer steps, LoRA merges, load_state_dict): seen, as the trace holds the
  module's own tensors, and the fused attention weights and the text's k, v are computed inside it.
- Weights or modules replaced, layers wrapped (peft), forward code patched, train/eval switched, a move
  to another dtype or device: the U-Net's fingerprint changes and every trace is dropped.
- Hooks: a U-Net with any is never traced (the trace would have run them once, while tracing); nor a
  torch.compile'd one.
- Python branches: the forward code branches on shapes only, and a trace serves only its exact shapes.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import nn

from latentdiff.fingerprint import module_fingerprint

MAX_PARAMETERS = 50_000_000  # as workers.MAX_AUTO_PARAMETERS: on big layers Python is a rounding error
KEEP = 4  # traces kept per pipeline: one per batch shape in use
MAX_SEEN = 64  # shapes counted per pipeline
REPEATS_BEFORE_TRACING = 3  # the third call with a shape makes its trace: it pays back after five or more


class Signature(NamedTuple):
    """What a trace is specific to: the shapes of one U-Net step, and sample_repeats."""

    sample: tuple[int, ...]
    context: tuple[int, ...]
    repeats: int


class _Step(nn.Module):
    """The U-Net call of one denoising step, as a module for torch.jit.trace (which traces modules)."""

    def __init__(self, unet: nn.Module, repeats: int):
        super().__init__()
        self.unet, self.repeats = unet, repeats

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, context, sample_repeats=self.repeats)


class Replay:
    """The traces of one pipeline's U-Net; `prepare` before a call (and before any fork), `step` inside it."""

    def __init__(self) -> None:
        self.unet: nn.Module | None = None
        self.fingerprint: tuple | None = None
        self.seen: dict[Signature, int] = {}
        # None: this signature's trace gave other bits than the eager step, never traced again
        self.traces: OrderedDict[Signature, torch.jit.ScriptModule | None] = OrderedDict()
        self.checked: set[Signature] = set()
        self.active = False  # whether the coming call may replay: set by prepare

    def prepare(self, unet: nn.Module, signatures: list[Signature], enabled: bool = True) -> None:
        """Count each signature of the coming call; trace those that came before. Traces go stale here.

        With enabled=False the call runs eager and counts nothing, but the traces are kept for later calls.
        """
        self.active = False
        if not _traceable(unet):
            self.traces.clear()  # a hook or a device move may be undone later, but the traces would be stale
            return
        fingerprint = module_fingerprint(unet)  # in-place writes are seen by the traces themselves
        if unet is not self.unet or fingerprint != self.fingerprint:  # shapes must come back on this U-Net
            self.unet, self.fingerprint = unet, fingerprint
            self.traces.clear()
            self.checked.clear()
            self.seen.clear()
        if not enabled:
            return
        self.active = True
        for signature in dict.fromkeys(signatures):
            self.seen[signature] = self.seen.pop(signature, 0) + 1  # re-inserted: the newest
            while len(self.seen) > MAX_SEEN:  # a long-lived pipeline fed ever new sizes stays bounded
                self.seen.pop(next(iter(self.seen)))
            if signature in self.traces:
                self.traces.move_to_end(signature)
            elif self.seen[signature] >= REPEATS_BEFORE_TRACING:
                self.traces[signature] = _trace(unet, signature)
                self.checked.discard(signature)
                while len(self.traces) > KEEP:
                    self.traces.popitem(last=False)

    def step(
        self, unet: nn.Module, sample: torch.Tensor, timestep, context: torch.Tensor, repeats: int
    ) -> torch.Tensor:
        """unet(sample, timestep, context, sample_repeats=repeats), from the trace when there is a good one."""
        signature = Signature(tuple(sample.shape), tuple(context.shape), repeats)
        traced = self.traces.get(signature) if self.active else None
        if traced is None or unet is not self.unet or not _scalar(timestep):
            return unet(sample, timestep, context, sample_repeats=repeats)
        # The U-Net turns any timestep into float32 first, so converting it here changes nothing.
        t = torch.as_tensor(timestep, dtype=torch.float32)
        if signature in self.checked:
            with torch.jit.optimized_execution(False):  # the recorded ops as they are: no graph rewrites
                return traced(sample, t, context)
        expected = unet(sample, timestep, context, sample_repeats=repeats)
        with torch.jit.optimized_execution(False):
            got = traced(sample, t, context)
        if torch.equal(got, expected):
            self.checked.add(signature)
        else:
            self.traces[signature] = None
        return expected


def _scalar(timestep) -> bool:
    return not isinstance(timestep, torch.Tensor) or timestep.dim() == 0


def _traceable(unet: nn.Module) -> bool:
    """CPU, no autograd, a small U-Net, no hooks, and no inference cache open (its tensors would be baked in)."""
    if torch.is_grad_enabled() or not hasattr(torch.jit, "trace"):
        return False
    if hasattr(unet, "_orig_mod"):  # torch.compile'd: compiled code has no Python between ops already
        return False
    parameters = list(unet.parameters())
    if not parameters or parameters[0].device.type != "cpu" or sum(p.numel() for p in parameters) > MAX_PARAMETERS:
        return False
    if _global_hooks():
        return False
    for module in unet.modules():
        hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
        if any(hooks) or getattr(module, "_cache", None) is not None:
            return False
    return True


def _global_hooks() -> bool:
    from torch.nn.modules import module

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    return any(getattr(module, name, None) for name in names)


def _trace(unet: nn.Module, signature: Signature) -> torch.jit.ScriptModule | None:
    parameter = next(unet.parameters())
    sample = torch.zeros(signature.sample, dtype=parameter.dtype)
    context = torch.zeros(signature.context, dtype=parameter.dtype)
    try:
        with warnings.catch_warnings():
            # TracerWarnings flag Python branches on shapes (fixed per signature); the deprecation notice
            # is for users of TorchScript models, which this is not: the trace never leaves the process.
            warnings.simplefilter("ignore")
            return torch.jit.trace(
                _Step(unet, signature.repeats), (sample, torch.zeros(()), context), check_trace=False
            )
    except Exception:  # noqa: BLE001 - a trace is only ever an optional speed-up; the eager step is always there
        return None
