"""Files that appear whole or not at all: written under a temporary name, then renamed into place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object whose bytes appear at `path` only if the block ends without an exception.

    The file gets the permissions open() would give it (0666 less the umask): mkstemp's private 0600
    would make every image unreadable to the other users of a shared output folder.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o22)  # the only way to read it is to set it; put back at once
    os.umask(mask)
    return mask
