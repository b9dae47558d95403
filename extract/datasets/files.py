"""Reading a sample's files without raising, and naming files and guids in messages.

`_read_bytes` returns a file's bytes or the error reading it: a per-sample problem, which
`_unreadable` turns into one line ("text data/12.txt not found; add the file or remove the
sample"). `_shown` and `_clip` keep long names in messages short.
"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

_SHOWN_NAME = 60  # longest file or guid name shown in a message before it is cut with "…"


def _shown(path: Path) -> str:
    """Short form of a file path for messages, e.g. "data/12.jpg"; long names are cut."""
    name = path.name if len(path.name) <= _SHOWN_NAME else f"{path.name[:_SHOWN_NAME]}…"
    return f"{path.parent.name}/{name}" if path.parent.name else name


def _clip(text: str, width: int = _SHOWN_NAME) -> str:
    return text if len(text) <= width else f"{text[:width]}… ({len(text)} characters)"


def _unreadable(what: str, path: Path, err: OSError | ValueError) -> str:
    if isinstance(err, FileNotFoundError):
        return f"{what} {_shown(path)} not found; add the file or remove the sample"
    if isinstance(err, ValueError):  # open() refuses a path holding NUL
        return (
            f"{what} path {_shown(path)!r} holds a NUL character; fix the path or remove the sample"
        )
    if err.errno == errno.ENAMETOOLONG:
        return (
            f"{what} {_shown(path)} cannot be read (file name too long for the file system); "
            "shorten the guid or path, or remove the sample"
        )
    return f"{what} {_shown(path)} cannot be read ({err.strerror or err}); fix the file or remove the sample"


def _too_long(result: bytes | Exception) -> bool:
    return isinstance(result, OSError) and result.errno == errno.ENAMETOOLONG


def _read_bytes(path: Path) -> bytes | OSError | ValueError:
    """The file's bytes, or the error reading it (a per-sample problem, never raised)."""
    try:
        return path.read_bytes()
    except (OSError, ValueError) as err:
        return err


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
