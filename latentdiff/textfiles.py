"""Text files users bring (prompt files, captions, metadata), as editors really save them.

UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8" and Windows Notepad write one), and UTF-16
with its mark (Windows PowerShell 5's `>` writes that). Anything else is refused with the line and byte
where decoding failed: guessing a legacy code page would put wrong characters into prompts silently.
"""

from __future__ import annotations

import codecs
from pathlib import Path

# UTF-32 LE's mark starts with UTF-16 LE's; nobody saves prompts as UTF-32, so it is not looked for.
MARKS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


class NotTextError(ValueError):
    """The bytes are not UTF-8 (or marked UTF-16) text; the message says where and what to do."""


def decode_text(data: bytes, name: str | Path) -> str:
    """The text of a file's bytes without its byte-order mark; NotTextError naming `name`, line and byte."""
    body, encoding, skipped = data, "utf-8", 0
    for mark, codec in MARKS:
        if data.startswith(mark):
            body, encoding, skipped = data[len(mark) :], codec, len(mark)
            break
    try:
        return body.decode(encoding)
    except UnicodeDecodeError as e:
        line = body[: e.start].decode(encoding, errors="replace").count("\n") + 1
        what = "not UTF-8" if encoding == "utf-8" else "marked UTF-16 but not valid UTF-16"  # a damaged file
        raise NotTextError(f"{name}: {what} (line {line}, byte {skipped + e.start}); save it as UTF-8") from None


def read_text(path: str | Path) -> str:
    """decode_text of a file; OSError as open() raises it."""
    return decode_text(Path(path).read_bytes(), path)
