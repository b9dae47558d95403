"""`cache info`: a human summary of one cache file (works on unfinished files too)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from cache.format import FAILED, OK, TODO
from cache.reader import decode_attr, read_header
from cache.writer import temp_path


def describe(path: str | Path, *, max_errors: int = 20) -> str:
    path = Path(path)
    if not path.exists() and temp_path(path).exists():
        path = temp_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no cache at {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file ({e})") from None
    with f:
        a, config, _ = read_header(f)
        lines = [f"{path}  ({path.stat().st_size / 2**20:.1f} MiB)"]
        for key in ("fusebench_format", "encoder", "model", "model_revision", "weights", "dataset",
                    "created", "complete"):
            lines.append(f"  {key:<16} {a.get(key, '')}")
        lines.append(f"  {'versions':<16} {a.get('versions', '{}')}")
        lines.append(f"  {'fingerprint':<16} {str(a.get('fingerprint', ''))[:16]}…")
        lines.append(f"  {'config':<16} {json.dumps(config, sort_keys=True)}")
        n = len(f["guid"]) if "guid" in f else 0
        status = f["status"][:] if "status" in f else np.zeros(0, np.uint8)
        splits = Counter(f["split"].asstr()[:]) if "split" in f else Counter()
        lines.append(
            f"  rows             {n} ({', '.join(f'{k} {v}' for k, v in sorted(splits.items()))}); "
            f"status: {(status == OK).sum()} ok, {(status == FAILED).sum()} failed, "
            f"{(status == TODO).sum()} todo"
        )

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and name.split("/")[0] in ("text", "image"):
                how = obj.attrs.get("pooling")
                extra = f"  pooling={decode_attr(how)}" if how is not None else ""
                lines.append(f"  {name:<20} {list(obj.shape)} {obj.dtype}{extra}")

        f.visititems(visit)
        if "errors" in f and len(f["errors/guid"]):
            g = f["errors"]
            rows = list(zip(*(g[c].asstr()[:] for c in ("guid", "stage", "message"))))
            lines.append(f"  error log: {len(rows)} entries")
            for guid, stage, msg in rows[:max_errors]:
                lines.append(f"    {guid}  {stage}  {msg}")
            if len(rows) > max_errors:
                lines.append(f"    ... {len(rows) - max_errors} more")
    return "\n".join(lines)

