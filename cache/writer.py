"""Writing a cache: under a temporary name, renamed to its final name only when complete.

Numeric datasets are row-chunked with HDF5's fletcher32 filter, and `finish` records the
sha256 of every stored array (cache/integrity.py), so damage is found on read. Any
file-system fault (disk full, read-only folder, ...) is a CacheWriteError: one line naming
the path and the fix; the temporary file is removed. HDF5 never sees such a fault: it writes
through a `Sink` (see there), so a full disk cannot leave it unable to close the file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import functools
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
from fusebench.cache.format import (
    FAILED,
    FORMAT_VERSION,
    CacheLockedError,
    CacheWriteError,
    DamagedCacheError,
    TokenFeatures,
    canonical_json,
    fingerprint,
    write_error,
)
from fusebench.cache.integrity import (
    ATTRS,
    TOKEN_CHUNK,
    TOKEN_COMPRESSION,
    attrs_digest,
    create_dataset,
    dataset_digest,
)

STR = h5py.string_dtype("utf-8")
# HDF5 1.10 file format: checksummed metadata (superblock, object headers), so damage there is
# found on open too; readable by HDF5 >= 1.10 (h5py >= 2.8).
LIBVER = ("v110", "v110")
KEPT = " (finished batches are kept)"


def temp_path(path: Path) -> Path:
    """Where a cache lives while it is being written."""
    return path.with_name(path.name + ".tmp")


class Sink:
    """The file object HDF5 writes a cache through (h5py's `fileobj` driver), instead of
    writing the file itself.

    With HDF5's own driver, a failed write (disk full, over quota, I/O error) left HDF5 unable
    to close the file: every later flush failed again, h5py printed one ignored-exception
    traceback per object it freed, and HDF5's exit handler then crashed on the half-closed
    objects (exit 139). Here a failed write (or read) is recorded in `error` and reported to
    HDF5 as done; it and every later write are kept in memory (`_late`, read back from
    there), so HDF5 stays consistent and closes cleanly. Whoever writes calls `check()` after
    each call into h5py and never finishes a file that had an error. These methods are
    Python code run from inside HDF5, so a signal handler must not raise in them: callers
    hold Ctrl-C / SIGTERM meanwhile (`signals_held`)."""

    def __init__(self, path: Path, mode: str = "w", kept: str = KEPT) -> None:
        self.kept = kept  # what a write fault's line says survives ("": nothing to resume)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if mode == "w" else 0)
        self.path = Path(path)
        self.fd = os.open(self.path, flags, 0o644)
        self.pos = 0
        self.end = os.fstat(self.fd).st_size  # the file's size as HDF5 sees it
        self.error: OSError | None = None  # the first fault
        self._late: dict[int, bytes] = {}  # writes since `error`: offset -> bytes, in order

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos}.get(whence, self.end)
        self.pos = offset + base
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = len(view)
        got = 0
        if n and self.pos < self.end:
            try:
                got = os.preadv(self.fd, [view], self.pos)
            except OSError as e:
                self.error = self.error or e
        if got < n:
            view[got:] = bytes(n - got)  # past the end reads as zeros (as HDF5's sec2 driver)
        for at, data in self._late.items():  # what HDF5 wrote after a fault
            lo, hi = max(at, self.pos), min(at + len(data), self.pos + n)
            if lo < hi:
                view[lo - self.pos : hi - self.pos] = data[lo - at : hi - at]
        self.pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        buf = bytearray(max(0, self.end - self.pos) if size < 0 else size)
        self.readinto(buf)
        return bytes(buf)

    def write(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = len(view)
        if self.error is None:
            try:
                done = 0
                while done < n:
                    done += os.pwrite(self.fd, view[done:], self.pos + done)
            except OSError as e:
                self.error = e
        if self.error is not None:  # kept here: HDF5 reads back what it wrote
            self._late.pop(self.pos, None)  # re-added last: later writes win on read
            self._late[self.pos] = bytes(view)
        self.pos += n
        self.end = max(self.end, self.pos)
        return n

    def truncate(self, size: int | None = None) -> int:
        end = self.pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, end)
            except OSError as e:
                self.error = e
        self.end = end
        return end

    def flush(self) -> None:
        pass  # nothing buffered here; `close_synced` makes the file durable

    def check(self, e: OSError | None = None) -> None:
        """After a call into h5py (which raised `e`, or nothing): the first fault, the
        sink's own or e, as one CacheWriteError line."""
        if self.error is not None or e is not None:
            raise _write_error(self.path, self.error or e, self.kept)

    def close_synced(self) -> None:
        """fsync and close the file (once h5py has closed it); a fault is one line."""
        try:
            os.fsync(self.fd)
        except OSError as e:
            self.error = self.error or e
        self.close()
        self.check()

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        self._late.clear()


_HOLDING = threading.local()


def _holding(method):
    """A CacheWriter method that calls into h5py: run with signals held (`signals_held`)."""

    @functools.wraps(method)
    def held(*args, **kwargs):
        with signals_held():
            return method(*args, **kwargs)

    return held


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while HDF5 writes through a Sink: their Python handlers run in
    the main thread at the next Python call, which would be a Sink method called from inside
    HDF5, and an exception there makes HDF5 drop that write unnoticed (a cache that looks
    complete) or crash at exit. A signal that came meanwhile is passed to its handler on
    leaving (Ctrl-C: KeyboardInterrupt, raised here). Only the main thread runs handlers, so
    other threads need nothing; SIG_DFL / SIG_IGN dispositions are left as they are."""
    if threading.current_thread() is not threading.main_thread() or getattr(_HOLDING, "on", False):
        yield
        return
    came: list[tuple[int, object]] = []
    saved = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            saved[signum] = handler
            signal.signal(signum, lambda n, frame: came.append((n, frame)))
    _HOLDING.on = True
    try:
        yield
    finally:
        _HOLDING.on = False
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        for signum, frame in came[:1]:
            saved[signum](signum, frame)


@contextlib.contextmanager
def h5_writing(path: Path, mode: str = "w") -> Iterator[h5py.File]:
    """An HDF5 file written through a Sink (see there), signals held: yields the h5py.File;
    on leaving normally, closes it, fsyncs and raises the first write fault as one
    CacheWriteError (the caller removes the file); on leaving by an exception, closes it."""
    with signals_held():
        sink = Sink(path, mode, kept="")
        try:
            f = h5py.File(sink, mode, libver=LIBVER)
        except BaseException:
            sink.close()
            raise
        try:
            try:
                yield f
            except OSError as e:
                sink.check(e)
                raise
            sink.check()
            f.close()
            sink.close_synced()
        finally:
            with contextlib.suppress(Exception):
                f.close()
            sink.close()


class CacheWriter:
    """Writes one cache file (format v1) row block by row block.

    Rows are in dataset order. Datasets are created up front; unwritten positions read as
    exactly 0 (the fill value), so padding costs no writes. Token rows go to the file as they
    come (one row per chunk: out-of-order rows never rewrite a chunk); the per-row vectors
    (pooled, mask, status: small) are kept in memory and written once, in order, by `finish`.
    `sources` (cache/sources.py record_sources) is stored as is; it is not part of the
    fingerprint. Padded token arrays (those with a mask: text) are chunked by slabs of about
    `token_chunk` tokens of one row (None: whole rows), so all-padding slabs are never stored,
    and compressed with `compression` (cache/integrity.py COMPRESSIONS; None by default: see
    TOKEN_COMPRESSION). Unpadded ones (image) keep whole-row, uncompressed chunks.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        guid: Sequence[str],
        split: Sequence[str],
        label: Sequence[int],
        classes: Sequence[str],
        manifest: list[dict],
        config: dict,
        attrs: dict,
        sources: dict | None = None,
        compression: str | None = TOKEN_COMPRESSION,
        token_chunk: int | None = TOKEN_CHUNK,
        kept: str = KEPT,
    ) -> None:
        self.path = Path(path)
        self.kept = kept  # a write fault's line: what a rerun reuses ("" for `cache merge`)
        self.compression, self.token_chunk = compression, token_chunk
        self._tmp = temp_path(self.path)
        self._f: h5py.File | None = None
        self._sink: Sink | None = None
        self.n = len(guid)
        self._errors: list[tuple[str, str, str]] = []
        self._vectors: dict[
            str, np.ndarray
        ] = {}  # dataset name -> (N, ...) rows, written by finish
        try:
            with signals_held():  # raises a Ctrl-C that came meanwhile, on leaving
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._tmp.unlink(missing_ok=True)  # left by a run killed while assembling
                self._sink = Sink(self._tmp, "w", kept)
                self._f = f = h5py.File(self._sink, "w", libver=LIBVER, rdcc_nbytes=16 << 20)
                f.attrs["fusebench_format"] = FORMAT_VERSION
                f.attrs["complete"] = False
                f.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                f.attrs["config"] = canonical_json(config)
                f.attrs["fingerprint"] = fingerprint(config, manifest)
                for key, value in attrs.items():
                    f.attrs[key] = (
                        value
                        if isinstance(value, (str, int, float, bool))
                        else canonical_json(value)
                    )
                f.create_dataset("guid", data=np.asarray(guid, dtype=object), dtype=STR)
                f.create_dataset("split", data=np.asarray(split, dtype=object), dtype=STR)
                labels = np.asarray(label, dtype=np.int8).reshape(self.n)
                create_dataset(f, "label", shape=(self.n,), dtype=np.int8, data=labels)
                f["label"].attrs["classes"] = list(classes)
                create_dataset(f, "status", shape=(self.n,), dtype=np.uint8)
                self._vectors["status"] = np.zeros(self.n, dtype=np.uint8)
                f.create_dataset("manifest", data=canonical_json(manifest), dtype=STR)
                if sources is not None:
                    f.create_dataset("sources", data=canonical_json(sources), dtype=STR)
                self._check()
        except BaseException as e:  # Ctrl-C too: nothing is left behind
            self.abort()
            if isinstance(e, OSError):
                self._check(e)
            raise

    @_holding
    def create_modality(
        self,
        modality: str,
        *,
        tokens: tuple[int, int] | None,
        mask: bool,
        pooled: dict[str, tuple[int, str]],
        attrs: dict | None = None,
    ) -> None:
        """tokens: (L, D) per row or None; pooled: name -> (D', how it was pooled)."""
        try:
            g = self._f.create_group(modality)
            for key, value in (attrs or {}).items():
                g.attrs[key] = value
            if tokens is not None:
                create_dataset(
                    g,
                    "tokens",
                    shape=(self.n, *tokens),
                    dtype=np.float16,
                    compression=self.compression if mask else None,
                    token_chunk=self.token_chunk if mask else None,
                )
                if mask:
                    create_dataset(
                        g, "mask", shape=(self.n, tokens[0]), dtype=bool, fillvalue=False
                    )
                    self._vectors[f"{modality}/mask"] = np.zeros((self.n, tokens[0]), bool)
            for name, (dim, how) in pooled.items():
                ds = create_dataset(g, name, shape=(self.n, dim), dtype=np.float16)
                ds.attrs["pooling"] = how
                self._vectors[f"{modality}/{name}"] = np.zeros((self.n, dim), np.float16)
        except OSError as e:
            self._check(e)
        self._check()

    @_holding
    def write(self, modality: str, rows: np.ndarray, feats: TokenFeatures) -> None:
        """Writes B rows (any order) of one modality; tokens may be shorter than L (zero-padded).

        Token rows go in as runs of consecutive rows (slice writes: a batch in dataset order is
        one write), never as a fancy-index selection, which HDF5 handles slowly on chunked
        datasets."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n_tok = None if feats.tokens is None else feats.tokens.shape[1]
        if feats.mask is not None:
            self._vectors[f"{modality}/mask"][rows, :n_tok] = feats.mask
        for name, values in feats.pooled.items():
            self._vectors[f"{modality}/{name}"][rows] = values
        if feats.tokens is None:
            return
        tokens = self._f[modality]["tokens"]
        if tokens.chunks and tokens.chunks[1] < tokens.shape[1]:
            return self._write_slabs(tokens, rows, feats.tokens)
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1
        try:
            for run in np.split(np.arange(len(rows)), cuts):
                if not len(run):
                    continue
                dest = slice(int(rows[run[0]]), int(rows[run[-1]]) + 1)
                src = order[run]
                src = slice(int(src[0]), int(src[-1]) + 1) if _is_step1(src) else src
                tokens[dest, :n_tok] = feats.tokens[src]
        except OSError as e:
            self._check(e)
        self._check()

    def _write_slabs(self, tokens: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
        """Token rows chunked by slabs (padded arrays), each row up to the slab of its last
        nonzero token (runs of consecutive rows that need as many slabs: one write): the slabs
        after it are never written, so HDF5 never stores them (they read back as the fill
        value, 0: bit-exact, as -0.0 counts as nonzero). Rows are written once: a row written
        again keeps what it had in the slabs past its new last nonzero token."""
        values = np.asarray(values)
        nonzero = ((values != 0) | np.signbit(values)).any(axis=2)  # (B, n_tok)
        width, slab = nonzero.shape[1], tokens.chunks[1]
        ends = np.where(nonzero.any(axis=1), width - np.argmax(nonzero[:, ::-1], axis=1), 0)
        slabs = -(-ends // slab)  # slabs each row needs
        order = np.argsort(rows, kind="stable")
        # one write per run of consecutive rows that need the same slabs
        cuts = np.flatnonzero((np.diff(rows[order]) != 1) | (np.diff(slabs[order]) != 0)) + 1
        try:
            for run in np.split(order, cuts):
                stop = min(width, int(slabs[run[0]]) * slab)
                if len(run) and stop:
                    first = int(rows[run[0]])
                    src = slice(int(run[0]), int(run[-1]) + 1) if _is_step1(run) else run
                    tokens[first : first + len(run), :stop] = values[src, :stop]
        except OSError as e:
            self._check(e)
        self._check()

    def set_status(self, status: np.ndarray) -> None:
        self._vectors["status"][:] = status

    def add_errors(self, errors: Sequence[tuple[str, str, str]]) -> None:
        """(guid, stage, message) lines for the per-sample error log."""
        self._errors.extend(errors)

    def finish(self) -> Path:
        """Records the digests, marks the file complete and moves it to its final name (atomic
        on POSIX). Signals are held per call into h5py (not for the whole digest pass), so
        Ctrl-C stops a long finish between blocks."""
        f = self._f
        try:
            with signals_held():
                for name, values in self._vectors.items():
                    if values.size:
                        f[name].write_direct(values)
                g = f.create_group("errors")
                for i, name in enumerate(("guid", "stage", "message")):
                    column = np.asarray([e[i] for e in self._errors], dtype=object)
                    g.create_dataset(name, data=column, dtype=STR)
                f.attrs["n_failed"] = int((self._vectors["status"] == FAILED).sum())
                names: list[str] = []
                f.visititems(
                    lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
                )
                self._check()
            digests: dict[str, str] = {}
            for name in names:
                with signals_held():
                    ds = f[name]
                try:
                    digests[name] = dataset_digest(ds, self._tmp, hold=signals_held)
                except DamagedCacheError:
                    self._check()  # a read fault the sink met: its own line instead
                    raise
            with signals_held():
                digests[ATTRS] = attrs_digest(f)
                f.attrs["digests"] = canonical_json(digests)
                self._check()  # never `complete` after a fault
                f.attrs["complete"] = True
                f.close()
            self._check()
            self._sink.close_synced()
            os.replace(self._tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as e:
            self.abort()
            self._check(e)
        return self.path

    def _check(self, e: OSError | None = None) -> None:
        """After a call into h5py (which raised e, or nothing): a write fault as one
        CacheWriteError line."""
        if self._sink is not None:
            self._sink.check(e)
        elif e is not None:
            raise _write_error(self._tmp, e, self.kept) from None

    @_holding
    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._f is not None:
                self._f.close()  # through the sink: never fails for want of disk space
        if self._sink is not None:
            self._sink.close()
        with contextlib.suppress(OSError):
            self._tmp.unlink(missing_ok=True)


def _is_step1(idx: np.ndarray) -> bool:
    return bool(len(idx) == 1 or (np.diff(idx) == 1).all())


def _write_error(path: Path, e: OSError, kept: str = KEPT) -> CacheWriteError:
    return e if isinstance(e, CacheWriteError) else write_error(path, e, kept)


def _fsync_dir(folder: Path) -> None:
    """Makes a rename durable (a crash right after it keeps the new name)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_features(
    path: str | Path,
    *,
    guid: Sequence[str],
    split: Sequence[str],
    label: Sequence[int],
    classes: Sequence[str] = ("negative", "neutral", "positive"),
    text: TokenFeatures | None = None,
    image: TokenFeatures | None = None,
    status: np.ndarray | None = None,
    errors: Sequence[tuple[str, str, str]] = (),
    config: dict | None = None,
    manifest: list[dict] | None = None,
    attrs: dict | None = None,
    sources: dict | None = None,
    compression: str | None = TOKEN_COMPRESSION,
    token_chunk: int | None = TOKEN_CHUNK,
) -> Path:
    """Writes a whole cache in one call (all rows in memory). Used by tests and tools that
    already hold the features; `extract` streams through CacheWriter instead."""
    n = len(guid)
    config = config or {"encoder": "synthetic"}
    manifest = manifest or [
        {"guid": g, "split": s, "label": int(y)} for g, s, y in zip(guid, split, label)
    ]
    base = {
        "encoder": config.get("encoder", "synthetic"),
        "model": "",
        "model_revision": "",
        "weights": "random",
        "versions": {},
    }
    w = CacheWriter(
        path,
        guid=guid,
        split=split,
        label=label,
        classes=classes,
        manifest=manifest,
        config=config,
        attrs={**base, **(attrs or {})},
        sources=sources,
        compression=compression,
        token_chunk=token_chunk,
    )
    try:
        for name, feats in (("text", text), ("image", image)):
            if feats is not None:
                _write_modality(w, name, feats)
        w.set_status(np.ones(n, dtype=np.uint8) if status is None else status)
        w.add_errors(errors)
        return w.finish()
    except BaseException:
        w.abort()
        raise


def _write_modality(w: CacheWriter, name: str, feats: TokenFeatures) -> None:
    """All rows of one modality, its datasets shaped by `feats`."""
    shape = None if feats.tokens is None else feats.tokens.shape[1:]
    w.create_modality(
        name,
        tokens=shape,
        mask=feats.mask is not None,
        pooled={k: (v.shape[1], feats.pooling.get(k, "")) for k, v in feats.pooled.items()},
    )
    w.write(name, np.arange(w.n), feats)  # every row of the cache


# ------------------------------------------------------------------------------ the lock

_HELD: set[str] = set()  # lock files this process holds: POSIX locks never conflict within one
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Holds `<path>.lock` while a cache is written; a second writer (another process, or
    this one) fails at once with CacheLockedError. The lock file is removed on release.

    POSIX record locks (fcntl.lockf) belong to the process: the kernel drops them when it
    dies, and forked children (DataLoader workers) do not inherit them, so a SIGKILLed
    writer's lock dies with it. (flock locks belong to the open file, which forked workers
    share: they outlived a killed writer until its workers noticed, seconds later.)
    Removal race: a process that opened the lock file just before its holder removed it, then
    got the lock, finds the path no longer names the file it locked, and tries again."""
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    key = os.path.abspath(lock)
    with _HELD_GUARD:
        if key in _HELD:
            raise CacheLockedError(
                f"{path} is being written by another fusebench run in this process "
                f"(pid {os.getpid()}); wait for it to finish"
            )
        _HELD.add(key)
    try:
        fd = _acquire(lock, path)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                if _names(lock, fd):
                    os.unlink(lock)  # while still locked: see the removal race above
            os.close(fd)  # drops the lock
    finally:
        with _HELD_GUARD:
            _HELD.discard(key)


def _acquire(lock: Path, path: Path) -> int:
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(lock.parent, e) from None
    for _ in range(1000):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(lock, e) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):  # e.g. no locks on this file system
                raise write_error(lock, e) from None
            raise CacheLockedError(
                f"{path} is being written by another fusebench process (pid {holder}); "
                "wait for it to finish, or stop it and rerun to resume"
            ) from None
        if _names(lock, fd):
            break
        os.close(fd)  # its holder removed it between our open and our lock: again
    else:
        raise CacheLockedError(f"{path}: could not take {lock}; rerun the command")
    with contextlib.suppress(OSError):  # who holds it, for the message a second writer sees
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _names(lock: Path, fd: int) -> bool:
    """Whether `lock` still names the file open as `fd`."""
    try:
        a, b = os.stat(lock), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
