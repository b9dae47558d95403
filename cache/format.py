"""Cache format v1: names, attributes and errors shared by the writer and the reader."""

from __future__ import annotations

import errno as errno_
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MODALITIES = ("text", "image")

# Config keys that say which rows a cache holds and how the data was read, not how a row was
# computed. They are still settings: `extract` refuses a cache built with another --limit,
# --labels, --text-encoding or --column unless --overwrite (then it copies the unchanged rows);
# only classes or a detected encoding that changed with the files themselves is a refresh.
# `cache merge` names them in its refusals (every one must agree but `limit`).
DATA_KEYS = ("classes", "text_encoding", "limit", "columns")

# status [N] uint8
TODO, OK, FAILED = 0, 1, 2


class CacheError(ValueError):
    """A cache file that cannot be used as it is; the message says why and what to do."""


class IncompleteCacheError(CacheError):
    """The cache was never finished (killed, or still running)."""


class FingerprintMismatchError(CacheError):
    """The cache was computed from other data or another config than the one asked for."""


class CacheLockedError(CacheError):
    """Another process is writing this cache."""


class DamagedCacheError(CacheError):
    """Bytes of the file changed after it was written: a checksum or a stored digest fails,
    or a dataset it needs is missing."""


class CacheWriteError(CacheError, OSError):
    """Writing a cache, its journal or its lock failed (disk full, read-only, ...). Also an
    OSError, with `errno` and `filename` set, so callers that handle file-system faults see it.
    The message is one line: the path, what the system said, the fix."""

    def __init__(self, message: str, *, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno, self.filename = errno, filename

    def __str__(self) -> str:
        return str(self.args[0])


def write_error(path: Path, e: OSError, kept: str = "") -> CacheWriteError:
    """One line for a file-system fault while writing `path` (h5py's OSErrors carry their errno
    only in their text: "errno = 28, error message = '...'")."""
    code = e.errno
    if code is None and (m := re.search(r"errno = (\d+)", str(e))):
        code = int(m[1])
    reason = os.strerror(code) if code else (" ".join(str(e).split()) or type(e).__name__)
    rerun = f"; then rerun the same command{kept}"
    if code in (errno_.ENOSPC, errno_.EDQUOT):
        fix = f"free space on that disk or pass --out on another one{rerun}"
    elif code == errno_.EFBIG:  # the file system's largest file (FAT32: 4 GiB) or `ulimit -f`
        fix = f"pass --out on a disk that holds larger files, or raise `ulimit -f`{rerun}"
    elif code in (errno_.EACCES, errno_.EPERM, errno_.EROFS):
        fix = f"pass --out a folder you can write to, or fix its permissions{rerun}"
    elif code == errno_.ENAMETOOLONG:
        fix = f"pass a shorter --out path{rerun}"
    else:
        fix = f"check the disk and the path{rerun}"
    return CacheWriteError(f"cannot write {path} ({reason}); {fix}", errno=code, filename=str(path))


@dataclass
class TokenFeatures:
    """Features of one modality for B rows (a batch) or N rows (a whole cache).

    tokens: (B, L, D) float16, padded positions exactly 0
    mask:   (B, L) bool, True = real token; None for modalities without padding (images)
    pooled: name -> (B, D') float16; "pooled" is the main one, others (e.g. "pooled_mean") are extras
    pooling: name -> how it was pooled ("cls", "mean", "text_embeds", ...)
    """

    tokens: np.ndarray | None
    mask: np.ndarray | None
    pooled: dict[str, np.ndarray]
    pooling: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.pooled.values())))

    def take(self, rows: np.ndarray) -> TokenFeatures:
        return TokenFeatures(
            tokens=None if self.tokens is None else self.tokens[rows],
            mask=None if self.mask is None else self.mask[rows],
            pooled={k: v[rows] for k, v in self.pooled.items()},
            pooling=dict(self.pooling),
        )


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(config: dict, manifest: list[dict]) -> str:
    """sha256 over everything that changes the numbers: the config and the data manifest
    (guid, split, label and content hashes of every sample's files)."""
    h = hashlib.sha256()
    h.update(canonical_json(config).encode())
    h.update(b"\0")
    h.update(canonical_json(manifest).encode())
    return h.hexdigest()


def describe_differences(
    stored_config: dict,
    stored_manifest: list[dict],
    config: dict | None,
    manifest: list[dict] | None,
) -> list[str]:
    """Human lines saying what differs between what a cache was built from and what is asked now."""
    lines: list[str] = []
    if config is not None:
        for key in sorted(set(stored_config) | set(config)):
            a, b = stored_config.get(key, "<absent>"), config.get(key, "<absent>")
            if canonical_json(a) != canonical_json(b):
                lines.append(f"config '{key}': cache has {_short(a)}, now {_short(b)}")
    if manifest is not None:
        old = {m["guid"]: m for m in stored_manifest}
        new = {m["guid"]: m for m in manifest}
        added = [g for g in new if g not in old]
        removed = [g for g in old if g not in new]
        changed = []
        for g in new:
            if g in old and canonical_json(old[g]) != canonical_json(new[g]):
                what = [k for k in new[g] if old[g].get(k) != new[g].get(k)]
                changed.append(f"{g} ({', '.join(what)})")
        if added:
            lines.append(f"{len(added)} samples not in the cache: {_few(added)}")
        if removed:
            lines.append(f"{len(removed)} cached samples no longer in the data: {_few(removed)}")
        if changed:
            lines.append(f"{len(changed)} samples changed since extraction: {_few(changed)}")
        if not (added or removed or changed) and [m["guid"] for m in stored_manifest] != [
            m["guid"] for m in manifest
        ]:
            lines.append("sample order differs from the data's")
    return lines


def _short(v: Any, n: int = 80) -> str:
    s = canonical_json(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")
