"""Where a warning should point: the user's own line, not latentdiff's or torch's insides."""

from __future__ import annotations

import os
import sys

import torch

_INSIDE = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def user_stacklevel() -> int:
    """warnings.warn's stacklevel, from the function calling this one, of the first frame outside latentdiff and
    torch: a fixed number breaks whenever a decorator (torch.no_grad) or a helper adds a frame."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level
