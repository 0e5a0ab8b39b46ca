"""GenEval-style evaluation on the Shapes domain: parse canonical captions, detect shapes, score images."""

from __future__ import annotations

from latentdiff.eval.captions import Prompt, format_caption, heldout_prompts, parse_caption, read_prompt_file

__all__ = [
    "Prompt",
    "check",
    "evaluate",
    "format_caption",
    "heldout_prompts",
    "parse_caption",
    "read_prompt_file",
    "score_image",
    "summarize",
]


def __getattr__(name: str):
    # score imports latentdiff.data.shapes, which imports captions from here: load it on first use.
    # (The detector itself: `from latentdiff.eval.detect import detect`.)
    if name in ("check", "evaluate", "score_image", "summarize"):
        from latentdiff.eval import score

        return getattr(score, name)
    raise AttributeError(f"module 'latentdiff.eval' has no attribute {name!r}")
