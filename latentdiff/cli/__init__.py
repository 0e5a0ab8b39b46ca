"""`latentdiff` command line: one module per sub-command, each with add_arguments(parser) and run(args)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

# sub-command -> module under latentdiff.cli; imported only when used, so start-up stays fast.
COMMANDS = {
    "generate": "generate",
    "eval": "evaluate",
    "shapes": "shapes",
    "info": "info",
    "samplers": "samplers",
    "reproduce": "reproduce",
}


# Failures of the machine, not of latentdiff: reported in one line, without a traceback.
MACHINE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def machine_error(error: OSError) -> str | None:
    """The one-line message for a failure of the machine (full disk, no permission); None for anything else."""
    if error.errno not in MACHINE_ERRORS:
        return None
    where = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror}{where}; make room or fix the folder"


@contextlib.contextmanager
def one_line_warnings(prefix: str):
    """Warnings shown as `{prefix}warning: message`: for the user of a command, not the library line that warned."""
    plain = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest, **kw: f"{prefix}warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = plain


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a job scheduler, accelerate's launcher on Ctrl-C): a request to stop, met as
    a Ctrl-C is (what is written stays whole, the one-line report says how to go on), with exit status 143."""


def stopped_status(stop: KeyboardInterrupt) -> int:
    """128 + the signal: 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM raises Terminated in this process while the block runs. Python's default is to die on the
    spot: no report, temporary files left beside the outputs. A forked worker (it inherits the handler) still
    dies of it at once; a SIGTERM this process ignores stays ignored."""
    owner, stopping = os.getpid(), False

    def handle(signum, frame):
        nonlocal stopping
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        if stopping:  # a group signal and accelerate's launcher each send one: the stop is already under way
            return
        stopping = True
        # A SIGTERM to the whole group (`timeout`, a job scheduler, accelerate's launcher) ends the DataLoader
        # workers too, often only after this block: torch's SIGCHLD handler would report that as their failure,
        # a traceback over this stop. Not put back: this process is stopping, and torch reaps them at any time.
        if callable(signal.getsignal(signal.SIGCHLD)):
            signal.signal(signal.SIGCHLD, _quiet)
        raise Terminated

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    if not main_thread or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:  # None: a handler not set from Python, which cannot be put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _quiet(signum, frame) -> None:
    """A SIGCHLD handler that does nothing (a Python one: SIG_IGN would reap every child before its waitpid)."""


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2, no traceback."""


PATH_OPTIONS = ("out", "model", "save", "images", "prompts")


def prepare_out(out: str | Path, flag: str = "--out") -> Path:
    """Create the output folder and prove it is writable, before any time is spent loading a model."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot write to {flag} {out}: it is a file, not a folder")
    if out.is_symlink() and not out.exists():
        raise UserError(
            f"cannot write to {flag} {out}: it is a symbolic link to {os.readlink(out)}, which does not exist; "
            f"create that folder or choose another {flag}"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {flag} {out}: {e.strerror or e}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="latentdiff", description="latent text-to-image diffusion")
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"latentdiff.cli.{module_name}")
        except ModuleNotFoundError as e:
            if e.name != f"latentdiff.cli.{module_name}":
                raise
            continue  # a sub-command not written yet
        modules[name] = module
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sub = subparsers.add_parser(name, help=summary, description=summary)
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    for name in PATH_OPTIONS:  # "" is what an unset shell variable gives: not the current or bundled folder
        if getattr(args, name, None) == "":
            parser.error(f"--{name.replace('_', '-')} is empty; give a path (is a shell variable unset?)")
    with stop_on_sigterm():  # around the reports below too: a second SIGTERM must not cut them short
        try:
            return _run(args, modules[args.command])
        except KeyboardInterrupt as stop:  # one that came while another outcome was being reported
            return stopped_status(stop)


def _run(args, module) -> int:
    """The sub-command's exit status; a user's mistake, a closed pipe, an interruption or a full disk as one line."""
    try:
        with one_line_warnings(f"latentdiff {args.command}: "):
            code = int(module.run(args) or 0)
        sys.stdout.flush()  # here, not at exit: a closed pipe must fail where it is handled, below
        return code
    except BrokenPipeError:
        # The reader went away (`latentdiff info | head -1`): what it wanted it has. Python would report
        # the closed pipe again when it flushes at exit, so stdout goes to devnull (Python's documented idiom).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a shell reports for a program a closed pipe stopped
    except UserError as e:
        print(f"latentdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(f"latentdiff {args.command}: interrupted", file=sys.stderr)
        return stopped_status(stop)
    except OSError as e:
        if machine_error(e) is None:
            raise
        print(f"latentdiff {args.command}: error: {machine_error(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
