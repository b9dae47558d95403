"""Writing a cache: under a temporary name, renamed to its final name only when complete.

Numeric datasets are row-chunked with HDF5's fletcher32 filter, and `finish` records the
sha256 of every stored array (cache/integrity.py), so damage is found on read. Any
file-system fault (disk full, read-only folder, ...) is a CacheWriteError: one line naming
the path and the fix; the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import os
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
    ) -> None:
        self.path = Path(path)
        self.compression, self.token_chunk = compression, token_chunk
        self._tmp = temp_path(self.path)
        self._f: h5py.File | None = None
        self.n = len(guid)
        self._errors: list[tuple[str, str, str]] = []
        self._vectors: dict[
            str, np.ndarray
        ] = {}  # dataset name -> (N, ...) rows, written by finish
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp.unlink(missing_ok=True)  # left by a run killed while assembling
            self._f = f = h5py.File(self._tmp, "w", libver=LIBVER, rdcc_nbytes=16 << 20)
            f.attrs["fusebench_format"] = FORMAT_VERSION
            f.attrs["complete"] = False
            f.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            f.attrs["config"] = canonical_json(config)
            f.attrs["fingerprint"] = fingerprint(config, manifest)
            for key, value in attrs.items():
                f.attrs[key] = (
                    value if isinstance(value, (str, int, float, bool)) else canonical_json(value)
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
        except OSError as e:
            self.abort()
            raise _write_error(self._tmp, e) from None

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
            raise _write_error(self._tmp, e) from None

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
            raise _write_error(self._tmp, e) from None

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
            raise _write_error(self._tmp, e) from None

    def set_status(self, status: np.ndarray) -> None:
        self._vectors["status"][:] = status

    def add_errors(self, errors: Sequence[tuple[str, str, str]]) -> None:
        """(guid, stage, message) lines for the per-sample error log."""
        self._errors.extend(errors)

    def finish(self) -> Path:
        """Records the digests, marks the file complete and moves it to its final name (atomic
        on POSIX)."""
        f = self._f
        try:
            for name, values in self._vectors.items():
                if values.size:
                    f[name].write_direct(values)
            g = f.create_group("errors")
            for i, name in enumerate(("guid", "stage", "message")):
                column = np.asarray([e[i] for e in self._errors], dtype=object)
                g.create_dataset(name, data=column, dtype=STR)
            f.attrs["n_failed"] = int((self._vectors["status"] == FAILED).sum())
            digests: dict[str, str] = {}
            f.visititems(
                lambda name, obj: (
                    digests.__setitem__(name, dataset_digest(obj, self._tmp))
                    if isinstance(obj, h5py.Dataset)
                    else None
                )
            )
            digests[ATTRS] = attrs_digest(f)
            f.attrs["digests"] = canonical_json(digests)
            f.attrs["complete"] = True
            f.close()
            with open(self._tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(self._tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as e:
            self.abort()
            raise _write_error(self._tmp, e) from None
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._f is not None:
                self._f.close()
        with contextlib.suppress(OSError):
            self._tmp.unlink(missing_ok=True)


def _is_step1(idx: np.ndarray) -> bool:
    return bool(len(idx) == 1 or (np.diff(idx) == 1).all())


def _write_error(path: Path, e: OSError) -> CacheWriteError:
    return e if isinstance(e, CacheWriteError) else write_error(path, e, KEPT)


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
            if feats is None:
                continue
            shape = None if feats.tokens is None else feats.tokens.shape[1:]
            w.create_modality(
                name,
                tokens=shape,
                mask=feats.mask is not None,
                pooled={k: (v.shape[1], feats.pooling.get(k, "")) for k, v in feats.pooled.items()},
            )
            w.write(name, np.arange(n), feats)
        w.set_status(np.ones(n, dtype=np.uint8) if status is None else status)
        w.add_errors(errors)
        return w.finish()
    except BaseException:
        w.abort()
        raise


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
