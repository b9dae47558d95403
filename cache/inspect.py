"""`cache info`: a human summary of one cache file (works on unfinished and damaged files too:
what cannot be read is reported in the summary, not raised)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
from fusebench.cache.format import FAILED, OK, TODO, CacheError
from fusebench.cache.reader import decode_attr, is_true, missing_parts, read_header, reading
from fusebench.cache.writer import temp_path

HEADER_KEYS = (
    "fusebench_format",
    "encoder",
    "model",
    "model_revision",
    "weights",
    "dataset",
    "data_path",
    "created",
)


def describe(path: str | Path, *, max_errors: int = 20) -> str:
    path = _locate(Path(path))
    with reading(path) as f:
        problems: list[str] = []
        lines = _header_lines(f, path, problems)
        lines.append(_rows_line(f, problems))

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and name.split("/")[0] in ("text", "image"):
                how = obj.attrs.get("pooling")
                extra = f"  pooling={decode_attr(how)}" if how is not None else ""
                lines.append(f"  {name:<20} {list(obj.shape)} {obj.dtype}{extra}")

        f.visititems(visit)
        lines += _error_lines(f, problems, max_errors)
        if missing := missing_parts(f):
            problems.append(f"missing: {', '.join(missing)}")
        for p in problems:
            lines.append(f"  PROBLEM          {p}")
    return "\n".join(lines)


def _locate(path: Path) -> Path:
    """The cache file to describe (its .tmp while unfinished); a missing file, a dangling
    link or a folder is an error naming it."""
    if not path.exists() and not path.is_symlink() and temp_path(path).exists():
        path = temp_path(path)
    if not path.exists():
        if path.is_symlink():
            raise FileNotFoundError(
                f"{path} is a link to {path.readlink()}, which does not exist; fix the link"
            )
        raise FileNotFoundError(f"no cache at {path}")
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.h5"))
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise CacheError(f"{path} is a folder, not a cache file; pass one .h5 file{hint}")
    return path


def _header_lines(f: h5py.File, path: Path, problems: list[str]) -> list[str]:
    try:
        a, config, _ = read_header(f, path)
    except CacheError as e:
        a, config = {k: decode_attr(v) for k, v in f.attrs.items()}, {}
        problems.append(str(e))
    lines = [f"{path}  ({path.stat().st_size / 2**20:.1f} MiB)"]
    for key in HEADER_KEYS:
        lines.append(f"  {key:<16} {a.get(key, '')}")
    lines.append(f"  {'complete':<16} {is_true(a.get('complete'))}")
    lines.append(f"  {'versions':<16} {a.get('versions', '{}')}")
    lines.append(f"  {'fingerprint':<16} {str(a.get('fingerprint', ''))[:16]}…")
    lines.append(f"  {'config':<16} {json.dumps(config, sort_keys=True)}")
    lines.append(f"  {'integrity':<16} {_integrity(f)}")
    return lines


def _rows_line(f: h5py.File, problems: list[str]) -> str:
    n = len(f["guid"]) if "guid" in f else 0
    status = _read(f, "status", problems)
    status = np.zeros(0, np.uint8) if status is None else status
    split = _read(f, "split", problems)
    splits = Counter(split.tolist()) if split is not None else Counter()
    return (
        f"  rows             {n} ({', '.join(f'{k} {v}' for k, v in sorted(splits.items()))}); "
        f"status: {(status == OK).sum()} ok, {(status == FAILED).sum()} failed, "
        f"{(status == TODO).sum()} todo"
    )


def _error_lines(f: h5py.File, problems: list[str], max_errors: int) -> list[str]:
    if not ("errors" in f and "guid" in f["errors"] and len(f["errors/guid"])):
        return []
    cols = [_read(f, f"errors/{c}", problems) for c in ("guid", "stage", "message")]
    rows = list(zip(*cols)) if all(c is not None for c in cols) else []
    lines = [f"  error log: {len(rows)} entries"]
    for guid, stage, msg in rows[:max_errors]:
        lines.append(f"    {guid}  {stage}  {msg}")
    if len(rows) > max_errors:
        lines.append(f"    ... {len(rows) - max_errors} more")
    return lines


def _integrity(f: h5py.File) -> str:
    chunked = []
    f.visititems(
        lambda n, o: (
            chunked.append(o.fletcher32)
            if isinstance(o, h5py.Dataset) and o.dtype.kind not in "OS"
            else None
        )
    )
    raw = f.attrs.get("digests")
    try:
        n_digests = len(json.loads(raw)) if raw is not None else 0
    except (TypeError, ValueError):
        n_digests = -1
    parts = [f"fletcher32 on {sum(chunked)} of {len(chunked)} numeric arrays"]
    if n_digests > 0:
        parts.append(f"sha256 digests of {n_digests} arrays")
    elif n_digests == 0:
        parts.append("no digests (written by an older fusebench)")
    else:
        parts.append("digests unreadable")
    return "; ".join(parts)


def _read(f: h5py.File, name: str, problems: list[str]) -> np.ndarray | None:
    if name not in f:
        return None
    try:
        ds = f[name]
        return ds.asstr()[()] if ds.dtype.kind in "OS" else ds[()]
    except OSError as e:
        problems.append(f"`{name}` cannot be read (damaged: {' '.join(str(e).split())[:120]})")
        return None
