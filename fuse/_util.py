"""Small helpers shared by fuse/: notes on stderr, config merging, JSON-safe values, and
run folders that only appear under their final name when finished."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import re
import shutil
import signal
import sys
import threading
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
        E.EIO: f"check that disk (full, over quota, read-only?){other}",
    }
    fix = fixes.get(e.errno, f"check that path{other}")
    return f"{what}: {path}; {fix}" if path else f"{what}; {fix}"


class StagedRunDir:
    """A run folder written as `<out>/<stamp>-<suffix>.tmp/` and renamed to
    `<out>/<stamp>-<suffix>/` only when everything in it is written: a run folder without
    `.tmp` is always a finished run.

    Entering creates the staging folder and writes a probe file, so an unwritable, missing
    or full `--out` fails before any training. Any OSError inside the block becomes one
    OutputError line naming the path and the fix; any failure (Ctrl-C and SIGTERM included)
    removes the staging folder. A process killed outright (SIGKILL, a lost node) cannot: its
    staging folder holds an owner lock that dies with it, and the next run into the same
    `--out` removes such folders (sweep_abandoned).
    """

    def __init__(self, out: str | Path, suffix: str) -> None:
        self.out = Path(out)
        self.suffix = suffix
        self.final: Path | None = None
        self.path: Path | None = None  # the staging folder, where files are written
        self._owner: int | None = None  # fd holding the staging folder's owner lock

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
            self._owner = hold_owner_lock(self.path)
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
        except BaseException:  # Ctrl-C / SIGTERM while the folder is being made
            self._discard()
            raise
        for old in sweep_abandoned(self.out, keep=self.path):
            note(f"removed {old}: a run that was killed before it finished left it")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self._discard()
            if isinstance(exc, OSError) and not isinstance(exc, OutputError):
                if exc.filename is None:  # some writers (PIL's close) name no file
                    exc.filename = str(self.path)
                raise OutputError(
                    f"writing run {self.final.name} failed (nothing was kept): "
                    + os_error_line(exc, option="--out"),
                    exc.errno,
                ) from None
            return False
        try:
            os.replace(self.path, self.final)
            # renamed first, unlocked after: a sweep never sees this folder unlocked as .tmp
            release_owner_lock(self.final, self._owner)
            self._owner = None
        except BaseException as e:
            self._discard()
            if not isinstance(e, OSError):
                raise
            raise OutputError(
                "cannot finish the run folder: " + os_error_line(e, option="--out"), e.errno
            ) from None
        self.path = self.final
        return False

    def _discard(self) -> None:
        try:
            if self.path is not None and self.path.name.endswith(STAGING):
                remove_tree(self.path)  # a signal held meanwhile is raised after it
        finally:
            release_owner_lock(None, self._owner)
            self._owner = None


STAGING = ".tmp"
OWNER = ".owner.lock"  # in a staging folder: locked while the process writing it lives


def staging(path: Path) -> Path:
    """Where run folder `path` is written until it is finished."""
    return path.with_name(path.name + STAGING)


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # held while a staging folder is removed


def remove_tree(path: Path) -> None:
    """shutil.rmtree(path), not cut short by a Ctrl-C or SIGTERM arriving meanwhile (one
    often follows the failure being cleaned up: torchrun stops the other ranks with SIGTERM
    as their collective fails). Such a signal is handled once the folder is gone."""
    with signals_deferred():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM that arrive during the block (or just before it: Python runs a
    handler at the next bytecode, wherever that is) are held and passed to their own
    handlers when it ends. Outside the main thread, nothing is deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = {s: signal.signal(s, lambda n, _f: held.append(n)) for s in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if held:
            handler = before[held[0]]
            if callable(handler):
                handler(held[0], None)  # e.g. raises KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(held[0])


def hold_owner_lock(folder: Path) -> int | None:
    """Marks `folder` (a staging folder) as being written by this process: an flock on
    folder/.owner.lock, which the kernel drops when the process dies however it dies. The
    file is locked under a private name first and then renamed, so a `.owner.lock` is never
    seen unlocked while its owner lives. Returns the fd to keep (None where flock is absent)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    private = folder / f"{OWNER}.{os.getpid()}"
    fd = os.open(private, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without locks: no owner mark, so never swept
        os.close(fd)
        private.unlink(missing_ok=True)
        return None
    try:
        os.rename(private, folder / OWNER)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_owner_lock(folder: Path | None, fd: int | None) -> None:
    """Removes folder/.owner.lock (when folder is given) and drops the lock."""
    if folder is not None:
        with contextlib.suppress(OSError):
            (folder / OWNER).unlink()
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def take_abandoned(folder: Path) -> int | None:
    """The owner lock of a staging folder whose writer died, now held by this process (an
    open descriptor to close when done), or None: the writer is alive, the folder has no
    owner lock, or the platform has no flock (Windows: nothing is ever taken)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    try:
        fd = os.open(folder / OWNER, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # its writer is alive
        os.close(fd)
        return None
    return fd


def sweep_abandoned(
    parent: Path, pattern: str = "*" + STAGING, *, keep: Path | None = None
) -> list[Path]:
    """Removes the staging folders in `parent` whose writer died (their owner lock is free):
    what a SIGKILL, an out-of-memory kill or a lost node leaves. A folder without an owner
    lock (being created this instant, or left by an older fusebench) is left alone."""
    removed = []
    with contextlib.suppress(OSError):
        for folder in sorted(parent.glob(pattern)):
            if folder == keep:  # this process's own (flock is per process on some NFS)
                continue
            if (fd := take_abandoned(folder)) is None:
                continue
            try:
                shutil.rmtree(folder, ignore_errors=True)
            finally:
                os.close(fd)
            if not folder.exists():
                removed.append(folder)
    return removed


def torch_save(obj: Any, path: Path) -> None:
    """torch.save(obj, path), with a failed write raised as the OSError it is. torch's zip
    writer reports a full disk, a quota or a file system gone read-only as a RuntimeError
    ("[enforce fail at inline_container.cc:...] ... file write failed" or "unexpected pos"),
    and a half-written file is left behind: it is removed, and the error says which fault
    the file system shows now."""
    import errno

    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as e:
        with contextlib.suppress(OSError):
            Path(path).unlink()
        code = errno.EIO
        with contextlib.suppress(OSError):
            fs = os.statvfs(Path(path).parent)
            if fs.f_flag & os.ST_RDONLY:
                code = errno.EROFS
            elif fs.f_bavail * fs.f_frsize < (64 << 20):  # < 64 MiB left: what a write needs
                code = errno.ENOSPC
        what = os.strerror(code)
        if code == errno.EIO:
            what = f"torch.save could not write the file ({' '.join(str(e).split())[:120]})"
        raise OSError(code, what, str(path)) from None


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICES = "auto, cpu, cuda, cuda:N (a GPU index), mps"


def check_device(device: Any) -> str:
    """--device as typed, refused in one line unless it names a device torch can train on
    (whether that GPU exists is checked where a torch head is built)."""
    if not isinstance(device, str) or not DEVICE.fullmatch(device.strip()):
        raise ValueError(f"--device must be one of the valid devices {DEVICES}, not {device!r}")
    return device.strip()


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
