"""The files of a local model folder, each with its sha256: what a cache records as its
`model_files` attribute next to `model_revision` (the one hash over all of them), so that
`predict --data` can name the file that changed since the run's caches were extracted.

Only files from_pretrained can read count (extract/encoders.py `_NOT_READ` leaves out docs,
VCS files and other frameworks' weights), the same ones `weights_revision` hashes. A hub id
(its revision is the commit) records nothing. Not part of the fingerprint: caches written
before it keep theirs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fusebench.extract.encoders import _NOT_READ


def model_files(folder: str | Path, revision: str) -> dict[str, str]:
    """file name -> sha256 of every file from_pretrained can read in `folder` (top level),
    for a folder whose `revision` is a content hash ("sha256:..."); {} otherwise."""
    folder = Path(folder)
    if not str(revision).startswith("sha256:") or not folder.is_dir():
        return {}
    return {p.name: _sha256(p) for p in readable_files(folder)}


def readable_files(folder: Path) -> list[Path]:
    """The files of `folder` weights_revision hashes, sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not any(p.match(pattern) for pattern in _NOT_READ)
    )


def changed_files(folder: Path, recorded: dict[str, str]) -> list[str]:
    """Names of the files of `folder` that differ from `recorded` (model_files): changed,
    missing ("name (missing)") or new ("name (new)")."""
    now = {p.name: p for p in readable_files(folder)}
    out = [f"{n} (missing)" for n in recorded if n not in now]
    out += [n for n, p in now.items() if n in recorded and _sha256(p) != recorded[n]]
    return out + [f"{n} (new)" for n in now if n not in recorded]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
