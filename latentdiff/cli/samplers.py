"""List the samplers `--sampler` accepts, with what each one does."""

from __future__ import annotations


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    from latentdiff.samplers import describe_samplers

    rows = describe_samplers()
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")
    return 0
