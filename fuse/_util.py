"""Small helpers shared by fuse/: notes on stderr, config merging, JSON-safe values."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def note(message: str) -> None:
    """A line for the user on stderr that does not break a running progress bar."""
    from tqdm import tqdm

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


def new_run_dir(out: Path, suffix: str) -> Path:
    """out/<YYYYmmdd-HHMMSS>-<suffix>/, never reusing an existing folder."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(out) / f"{stamp}-{suffix}"
    k = 2
    while path.exists():
        path = Path(out) / f"{stamp}-{suffix}-{k}"
        k += 1
    path.mkdir(parents=True)
    return path


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
