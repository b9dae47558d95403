"""The files of a local model folder, each with its sha256: what a cache records as its
`model_files` attribute next to `model_revision` (the one hash over all of them), so that
`predict --data` can name the file that changed since the run's caches were extracted.

Only files from_pretrained can read count (`NOT_READ` leaves out docs, VCS files and other
frameworks' weights); `hash_files` gives the revision and the per-file hashes in one read of
each file. A hub id (its revision is the commit) records nothing. Not part of the
fingerprint: caches written before it keep theirs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# never read: docs, VCS files, other frameworks' weights. Everything else (weights, configs,
# tokenizer and processor files: vocab.txt, merges.txt, spiece.model, tokenizer.json, ...)
# goes into the revision hash, so editing any of them invalidates a cache.
NOT_READ = ("*.md", "LICENSE*", ".*", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite")


def hash_files(folder: str | Path) -> tuple[str, dict[str, str]]:
    """(the folder's revision, file name -> sha256) over every file from_pretrained can read
    in `folder` (top level: it reads nothing below), each file read once. The revision is
    "sha256:" + 16 hex digits of one hash over the names and contents in name order ("" when
    there is no such file): what caches record as `model_revision`."""
    folder = Path(folder)
    files = readable_files(folder) if folder.is_dir() else []
    if not files:
        return "", {}
    whole, each = hashlib.sha256(), {}
    for p in files:
        one = hashlib.sha256()
        whole.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                whole.update(block)
                one.update(block)
        whole.update(b"\0")
        each[p.name] = one.hexdigest()
    return "sha256:" + whole.hexdigest()[:16], each


def readable_files(folder: Path) -> list[Path]:
    """The files of `folder` from_pretrained can read (NOT_READ left out), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not any(p.match(pattern) for pattern in NOT_READ)
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
