"""Writing a cache: under a temporary name, renamed to its final name only when complete."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from cache.format import (
    FAILED,
    FORMAT_VERSION,
    CacheLockedError,
    TokenFeatures,
    canonical_json,
    fingerprint,
)

STR = h5py.string_dtype("utf-8")


def temp_path(path: Path) -> Path:
    """Where a cache lives while it is being written."""
    return path.with_name(path.name + ".tmp")


class CacheWriter:
    """Writes one cache file (format v1) row block by row block.

    Rows are in dataset order. Datasets are contiguous and created up front, so unwritten
    positions read as exactly 0 (the fill value) — padding costs no writes.
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
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path)
        self._tmp.unlink(missing_ok=True)
        self._f = h5py.File(self._tmp, "w")
        self.n = len(guid)
        f = self._f
        f.attrs["fusebench_format"] = FORMAT_VERSION
        f.attrs["complete"] = False
        f.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        f.attrs["config"] = canonical_json(config)
        f.attrs["fingerprint"] = fingerprint(config, manifest)
        for key, value in attrs.items():
            f.attrs[key] = value if isinstance(value, (str, int, float, bool)) else canonical_json(value)
        f.create_dataset("guid", data=np.asarray(guid, dtype=object), dtype=STR)
        f.create_dataset("split", data=np.asarray(split, dtype=object), dtype=STR)
        f.create_dataset("label", data=np.asarray(label, dtype=np.int8))
        f["label"].attrs["classes"] = list(classes)
        f.create_dataset("status", data=np.zeros(self.n, dtype=np.uint8))
        f.create_dataset("manifest", data=canonical_json(manifest), dtype=STR)
        self._errors: list[tuple[str, str, str]] = []

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
        g = self._f.create_group(modality)
        for key, value in (attrs or {}).items():
            g.attrs[key] = value
        if tokens is not None:
            g.create_dataset("tokens", shape=(self.n, *tokens), dtype=np.float16, fillvalue=0)
            if mask:
                g.create_dataset("mask", shape=(self.n, tokens[0]), dtype=bool, fillvalue=False)
        for name, (dim, how) in pooled.items():
            ds = g.create_dataset(name, shape=(self.n, dim), dtype=np.float16, fillvalue=0)
            ds.attrs["pooling"] = how

    def write(self, modality: str, rows: np.ndarray, feats: TokenFeatures) -> None:
        """Writes B rows (any order) of one modality; tokens may be shorter than L (zero-padded)."""
        rows = np.asarray(rows)
        order = np.argsort(rows)  # h5py wants increasing indices
        rows = rows[order]
        g = self._f[modality]
        if feats.tokens is not None:
            n_tok = feats.tokens.shape[1]
            g["tokens"][rows, :n_tok] = feats.tokens[order]
            if feats.mask is not None:
                g["mask"][rows, :n_tok] = feats.mask[order]
        for name, values in feats.pooled.items():
            g[name][rows] = values[order]

    def set_status(self, status: np.ndarray) -> None:
        self._f["status"][:] = status

    def add_errors(self, errors: Sequence[tuple[str, str, str]]) -> None:
        """(guid, stage, message) lines for the per-sample error log."""
        self._errors.extend(errors)

    def finish(self) -> Path:
        """Marks the file complete and moves it to its final name (atomic on POSIX)."""
        f = self._f
        g = f.create_group("errors")
        for i, name in enumerate(("guid", "stage", "message")):
            g.create_dataset(name, data=np.asarray([e[i] for e in self._errors], dtype=object), dtype=STR)
        f.attrs["n_failed"] = int((f["status"][:] == FAILED).sum())
        f.attrs["complete"] = True
        f.close()
        with open(self._tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()
        self._tmp.unlink(missing_ok=True)


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
) -> Path:
    """Writes a whole cache in one call (all rows in memory). Used by tests and tools that
    already hold the features; `extract` streams through CacheWriter instead."""
    n = len(guid)
    config = config or {"encoder": "synthetic"}
    manifest = manifest or [{"guid": g, "split": s, "label": int(y)} for g, s, y in zip(guid, split, label)]
    base = {"encoder": config.get("encoder", "synthetic"), "model": "", "model_revision": "",
            "weights": "random", "versions": {}}
    w = CacheWriter(path, guid=guid, split=split, label=label, classes=classes,
                    manifest=manifest, config=config, attrs={**base, **(attrs or {})})
    try:
        for name, feats in (("text", text), ("image", image)):
            if feats is None:
                continue
            shape = None if feats.tokens is None else feats.tokens.shape[1:]
            w.create_modality(
                name, tokens=shape, mask=feats.mask is not None,
                pooled={k: (v.shape[1], feats.pooling.get(k, "")) for k, v in feats.pooled.items()},
            )
            w.write(name, np.arange(n), feats)
        w.set_status(np.ones(n, dtype=np.uint8) if status is None else status)
        w.add_errors(errors)
        return w.finish()
    except BaseException:
        w.abort()
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Holds `<path>.lock` for the duration; a second writer fails at once with a clear error.
    flock is released by the kernel when the holder dies, so a SIGKILL leaves no stale lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise CacheLockedError(
                f"{path} is being written by another fusebench process (pid {holder}); "
                "wait for it to finish, or stop it and rerun to resume"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock
