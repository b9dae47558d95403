"""Small helpers shared by fuse/: notes on stderr, config merging, JSON-safe values, and
run folders that only appear under their final name when finished."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def note(message: str) -> None:
    """A line for the user on stderr that does not break a running progress bar. Under
    torchrun only rank 0 speaks: every rank of a grid makes the same notes (fuse.distributed)."""
    from fusebench.cache.ranks import world
    from tqdm import tqdm

    if world()[0] != 0:
        return
    tqdm.write(f"note: {message}", file=sys.stderr)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """base updated by override; nested mappings are merged key by key, not replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def plain(obj: Any) -> Any:
    """obj with numpy scalars/arrays, Paths and tuples turned into JSON/YAML-safe Python values."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def few(items: list[str], n: int = 5) -> str:
    """'a, b, c, ... (+7)' — enough names to find the rows, short enough for one line."""
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


class DamagedModelError(ValueError):
    """A saved head that cannot be loaded; the message names the file and the fix."""


class OutputError(OSError):
    """A run folder or predictions file could not be written; str() is one line naming the
    path and the fix (errno is the cause's)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[0])


def os_error_line(e: OSError, *, option: str | None = None) -> str:
    """'<strerror>: <path>; <fix>' for an OSError a user can cause (permissions, full disk,
    a file where a folder should be, a name too long ...). option: the flag that chose the
    path ("--out"), offered as the way around."""
    import errno as E

    if isinstance(e, OutputError):  # already one line with its fix
        return str(e)
    path = e.filename if e.filename is not None else ""
    what = e.strerror or str(e) or type(e).__name__
    other = f", or pass {option} another path" if option else ""
    fixes = {
        E.ENOSPC: f"free space on that disk{other}",
        E.EDQUOT: f"free space in your quota{other}",
        E.EACCES: f"make it writable for you{other}",
        E.EPERM: f"make it writable for you{other}",
        E.EROFS: f"that file system is read-only{other}",
        E.ENAMETOOLONG: "use a shorter path",
        E.ENOTDIR: f"a file stands where a folder is needed: move it{other}",
        E.EEXIST: f"a file stands where a folder is needed: move it{other}",
        E.EISDIR: f"that path is a folder; give a file path{other}",
        E.ENOENT: "check that the path exists",
    }
    fix = fixes.get(e.errno, f"check that path{other}")
    return f"{what}: {path}; {fix}" if path else f"{what}; {fix}"


class StagedRunDir:
    """A run folder written as `<out>/<stamp>-<suffix>.tmp/` and renamed to
    `<out>/<stamp>-<suffix>/` only when everything in it is written: a run folder without
    `.tmp` is always a finished run.

    Entering creates the staging folder and writes a probe file, so an unwritable, missing
    or full `--out` fails before any training. Any OSError inside the block becomes one
    OutputError line naming the path and the fix; any failure removes the staging folder.
    """

    def __init__(self, out: str | Path, suffix: str) -> None:
        self.out = Path(out)
        self.suffix = suffix
        self.final: Path | None = None
        self.path: Path | None = None  # the staging folder, where files are written

    def __enter__(self) -> StagedRunDir:
        try:
            if self.out.exists() and not self.out.is_dir():
                raise OutputError(
                    f"--out {self.out} is a file, not a folder; pass --out a folder for runs"
                )
            self.out.mkdir(parents=True, exist_ok=True)
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            for k in itertools.count(1):  # never reuses a folder, even one made meanwhile
                final = self.out / f"{stamp}-{self.suffix}{'' if k == 1 else f'-{k}'}"
                if final.exists():
                    continue
                try:
                    staging(final).mkdir()
                except FileExistsError:
                    continue
                break
            self.final, self.path = final, staging(final)
            probe = self.path / ".write-probe"
            probe.write_bytes(b"\0" * 4096)  # a full disk refuses a block, not just an inode
            probe.unlink()
        except OutputError:
            raise
        except OSError as e:
            self._discard()
            raise OutputError(
                "cannot write the run folder: " + os_error_line(e, option="--out"), e.errno
            ) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self._discard()
            if isinstance(exc, OSError) and not isinstance(exc, OutputError):
                raise OutputError(
                    f"writing run {self.final.name} failed (nothing was kept): "
                    + os_error_line(exc, option="--out"),
                    exc.errno,
                ) from None
            return False
        try:
            os.replace(self.path, self.final)
        except OSError as e:
            self._discard()
            raise OutputError(
                "cannot finish the run folder: " + os_error_line(e, option="--out"), e.errno
            ) from None
        self.path = self.final
        return False

    def _discard(self) -> None:
        if self.path is not None and self.path.name.endswith(STAGING):
            shutil.rmtree(self.path, ignore_errors=True)


STAGING = ".tmp"


def staging(path: Path) -> Path:
    """Where run folder `path` is written until it is finished."""
    return path.with_name(path.name + STAGING)


def write_atomic(path: Path, write) -> None:
    """Calls write(file_handle) on `<path>.tmp` (text, newline="") and renames it to `path`
    when done, so `path` is either the old file or the whole new one, never half of one."""
    tmp = path.with_name(path.name + STAGING)
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def versions() -> dict[str, str]:
    """Versions of the libraries that change the numbers (imported ones only)."""
    from importlib import metadata

    out = {}
    for dist in ("fusebench", "torch", "numpy", "scikit-learn", "lightgbm", "h5py"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
