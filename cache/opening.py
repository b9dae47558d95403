"""Opening a cache file for reading: `open_h5` (h5py.File, or one CacheError line saying why
the file cannot be opened) and `reading` (a `with` block in which any h5py error becomes one
DamagedCacheError line naming the file). Below both cache.reader and cache.lazy, which open
files through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import h5py
from fusebench.cache.format import CacheError, DamagedCacheError
from fusebench.cache.integrity import fix_line


def open_h5(path: Path) -> h5py.File:
    """h5py.File(path, "r"), or one CacheError line saying why the file cannot be opened."""
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CacheError(_unopenable(path, e)) from None


@contextlib.contextmanager
def reading(path: Path) -> Iterator[h5py.File]:
    """open_h5 for a `with` block in which any h5py error (a damaged object header, a chunk
    whose checksum fails) becomes one DamagedCacheError line naming the file."""
    f = open_h5(path)
    try:
        yield f
    except CacheError:
        raise
    except (OSError, RuntimeError, KeyError) as e:
        text = " ".join(str(e).strip("'\"").split())
        if isinstance(e, KeyError) and "Unable to" not in text:
            raise  # a lookup bug, not damage
        raise DamagedCacheError(
            f"{path} is damaged: HDF5 cannot read part of it ({text}); {fix_line(path)}"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            f.close()


def _unopenable(path: Path, e: OSError) -> str:
    text = " ".join(str(e).split())
    if "signature" in text:
        return f"{path} is not an HDF5 file (a fusebench cache is written by `fusebench extract`)"
    if "truncated" in text:
        return f"{path} is truncated (a copy or a download stopped part-way); copy it again or {fix_line(path)}"
    if "lock" in text:
        return f"{path} is open for writing by another process; rerun once it has finished"
    if "already open for write" in text:
        return (
            f"{path} is marked open for writing (by a running process, or one that stopped "
            f"mid-write); wait for it to finish, or {fix_line(path)}"
        )
    if "checksum" in text or "object header" in text:
        return f"{path} is damaged: HDF5 cannot read its metadata ({text}); {fix_line(path)}"
    if "ermission" in text or getattr(e, "errno", None) == 13:
        return f"{path} cannot be read (permission denied); fix its permissions"
    return f"{path} is not a readable HDF5 file ({text}); {fix_line(path)}"
