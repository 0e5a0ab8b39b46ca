"""Errors a user can act on: the CLI prints their message (no traceback) and exits non-zero."""


class TrainingError(Exception):
    """A training run cannot go on; the message says why and what to do."""


class NonFiniteLossError(TrainingError):
    """Too many NaN/inf losses in a row: the run is diverging."""
