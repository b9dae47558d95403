"""What the data looked like when a cache was built, and whether it still does.

    extract: record_sources(root, rows) -> stored in the cache (`sources`, not in the fingerprint)
    stage two: ensure_fresh(store) refuses a cache whose data changed since, naming the samples;
               check_fresh(store) lists the changes (for --allow-stale, which uses it anyway).

Recorded per file, relative to the data root: size, mtime_ns, sha256 and the guids it feeds.
For index files (train.txt, labelResultAll.txt, a CSV/JSONL manifest) also the sha256 of each
sample's line (its last line, as the dataset reader numbers it) and of every other line, so an
edited label names its sample and a new row is counted.

Fast path: a file whose size and mtime_ns are both unchanged is taken as unchanged without
reading it (what rsync and make assume); an edit that keeps the size within the file system's
timestamp resolution would go unseen. Any other file is hashed; a file touched but unchanged
in content is fine. When the recorded data folder is unreachable (the cache was copied to
another machine), nothing can be checked and the cache is used as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fusebench.cache.format import CacheError, canonical_json, write_error
from fusebench.cache.integrity import dataset_digest, stored_digests

if TYPE_CHECKING:
    from fusebench.cache.reader import FeatureStore

SOURCES_VERSION = 1
SHOWN = 4  # changed samples named in a StaleCacheError line before "+N more"


class StaleCacheError(CacheError):
    """The data a cache was built from changed since; `changes` lists how, one line each."""

    def __init__(self, message: str, changes: list[str]) -> None:
        super().__init__(message)
        self.changes = changes


def record_sources(
    root: Path,
    rows: Iterable[tuple[str, list[Path], tuple[Path, int] | None]],
    known: Mapping[Path, str] | None = None,
) -> dict:
    """rows: (guid, the data files the sample was read from, (index file, 1-based line) or None).
    known: sha256 of files the caller has just hashed (the dataset reader hashes every text and
    image for the manifest), so a 100k-image dataset is not read twice. Returns a JSON-able
    record of every file (see the module docstring)."""
    root = Path(root).resolve()
    files: dict[str, dict] = {}
    lines_of: dict[str, list[bytes]] = {}  # index file -> its lines, read once
    known = {Path(p): sha for p, sha in (known or {}).items() if sha}

    def entry(path: Path) -> tuple[str, dict]:
        key = _key(root, Path(path))
        if key not in files:
            sha = known.get(Path(path))
            described = _describe(_where(root, key), hashed=sha is None)
            files[key] = (
                described
                if sha is None or described.get("missing")
                else described | {"sha256": sha}
            )
        return key, files[key]

    for guid, paths, index_line in rows:
        for p in paths:
            _, e = entry(p)
            e.setdefault("guids", []).append(guid)
        if index_line is not None:
            path, lineno = index_line
            key, e = entry(path)
            if key not in lines_of:
                lines_of[key] = _read_lines(_where(root, key))
            lines = lines_of[key]
            sha = _sha(lines[lineno - 1]) if 0 < lineno <= len(lines) else ""
            e.setdefault("lines", []).append([guid, lineno, sha])
    for key, lines in lines_of.items():  # header, blank and other lines: not new rows later
        sample_lines = {n for _, n, _ in files[key]["lines"]}
        files[key]["other_lines"] = sorted(
            _sha(x) for i, x in enumerate(lines, 1) if i not in sample_lines
        )
    return {"version": SOURCES_VERSION, "root": str(root), "files": files}


def check_fresh(store: FeatureStore) -> list[str]:
    """Human lines naming what changed in the data since the cache was built, one per change;
    [] when nothing did, when no sources were recorded, or when the recorded data folder is
    unreachable (then nothing can be checked)."""
    src = store.sources
    if not src or not isinstance(src.get("files"), dict):
        return []
    root = Path(str(src.get("root", "")))
    if not root.is_dir():
        return []
    changes: list[str] = []
    for key, recorded in src["files"].items():
        path = _where(root, key)
        now = _describe(path)
        if now.get("missing") and not recorded.get("missing"):
            changes += [f"{g}: {key} was removed" for g in recorded.get("guids", [])]
            changes += [
                f"{g}: {key} (its index file) was removed" for g, _, _ in recorded.get("lines", [])
            ]
            continue
        if _same_stat(now, recorded):
            continue
        now["sha256"] = _hash(path)
        if now["sha256"] == recorded.get("sha256"):
            continue  # touched, not changed
        changes += [f"{g}: {key} changed" for g in recorded.get("guids", [])]
        if "lines" in recorded:
            changes += _changed_lines(key, path, recorded)
    return changes


def ensure_fresh(store: FeatureStore) -> None:
    """Raises StaleCacheError (one line: the cache, the changed samples, the fix) when the data
    it was built from changed since; see check_fresh."""
    changes = check_fresh(store)
    if not changes:
        return
    root = store.sources["root"]
    data = store.attrs.get("data_path") or root
    shown = "; ".join(changes[:SHOWN]) + (
        f" (+{len(changes) - SHOWN} more)" if len(changes) > SHOWN else ""
    )
    command = extract_command(store, data)
    raise StaleCacheError(
        f"{store.path} is stale: its data at {root} changed since extraction ({shown}); rerun "
        f"`{command}` (it reuses every unchanged row), or pass --allow-stale to use the old "
        "features anyway",
        changes,
    )


def extract_command(store: FeatureStore, data: str | None = None) -> str:
    """The `fusebench extract` command that rebuilds `store` in place from its data: every
    option that built it (the ones left out are the defaults), so the command refreshes it
    rather than being refused as another setting."""
    cfg, attrs = store.config, store.attrs
    data = data or attrs.get("data_path") or (store.sources or {}).get("root", "")
    request = attrs.get("request")
    try:
        request = json.loads(request) if isinstance(request, (str, bytes)) else request
    except ValueError:
        request = None
    request = request if isinstance(request, dict) else {}
    if cfg.get("format") == "manifest" and Path(str(data)).is_dir():
        data = index_file(store.sources) or data  # a cache that recorded the manifest's folder
    args = ["fusebench", "extract", "--encoder", store.encoder or str(cfg.get("encoder", ""))]
    args += ["--data", str(data), "--out", str(store.path.parent.parent)]
    if cfg.get("model") is not None:
        args += ["--model", str(cfg["model"])]
    if cfg.get("layer") is not None:
        args += ["--layer", str(cfg["layer"])]
    if cfg.get("weights") == "random":
        args.append("--random-init")
    if cfg.get("batch_size") not in (None, 32):
        args += ["--batch-size", str(cfg["batch_size"])]
    if str(cfg.get("precision") or "fp32") != "fp32":
        args += ["--precision", str(cfg["precision"]).removesuffix("-autocast")]
    if cfg.get("kind") in ("image", "clip"):
        preprocess = str(cfg.get("preprocess", ""))
        if not preprocess:  # the model's own processor
            args.append("--exact-preprocess")
        elif preprocess.startswith("device:"):
            args += ["--decode", "gpu"]
        elif preprocess == "fast-draft2x":  # the CPU path, also where `auto` would pick gpu
            args += ["--decode", "cpu"]
    limit = request.get("limit", cfg.get("limit"))
    if limit is not None:
        args += ["--limit", str(limit)]
    if request.get("labels"):
        args += ["--labels", ",".join(map(str, request["labels"]))]
    if request.get("text_encoding"):
        args += ["--text-encoding", str(request["text_encoding"])]
    for key, column in (cfg.get("columns") or {}).items():
        args += ["--column", f"{key}={column}"]
    return shlex.join(args)


def index_file(sources: dict | None) -> str | None:
    """The one CSV / JSONL manifest file whose lines a cache's samples came from (its record
    of the data files, `record_sources`); None when there is not exactly one."""
    src = sources if isinstance(sources, dict) else {}
    files = src.get("files") if isinstance(src.get("files"), dict) else {}
    index = [key for key, e in files.items() if isinstance(e, dict) and e.get("lines")]
    if len(index) != 1:
        return None
    return str(_where(Path(str(src.get("root", ""))), index[0]))


def rewrite_sources(path: Path, sources: dict) -> None:
    """Replaces the `sources` a finished cache records, leaving its features, fingerprint and
    every other digest as they are; atomic (an edited copy is renamed over it). For `extract`
    when check_fresh reports changes but the fingerprint still matches (an edited header, a
    reformatted index line): the features are up to date, the record of the files is not.
    Call it holding `exclusive_lock(path)`."""
    from fusebench.cache.writer import STR, _fsync_dir, h5_writing, temp_path

    path = Path(path)
    tmp = temp_path(path)
    try:
        shutil.copyfile(path, tmp)
        with h5_writing(tmp, "r+") as f:  # a full disk: one line, never a crashed HDF5
            if "sources" in f:
                del f["sources"]
            f.create_dataset("sources", data=canonical_json(sources), dtype=STR)
            if (digests := stored_digests(f, tmp)) is not None:
                digests["sources"] = dataset_digest(f["sources"], tmp)
                f.attrs["digests"] = canonical_json(digests)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(tmp, e) from None
        raise


def _changed_lines(key: str, path: Path, recorded: dict) -> list[str]:
    """Per sample whose line is gone: it was edited or removed; then new rows (lines that
    neither a sample nor the header had), not counting lines that replaced an edited one."""
    lines = _read_lines(path)
    shas = [_sha(x) for x in lines]
    present = set(shas)
    out, edited_at = [], set()
    for guid, lineno, sha in recorded["lines"]:
        if sha not in present:
            out.append(f"{guid}: its row in {key} (line {lineno}) was edited or removed")
            edited_at.add(lineno)
    known = Counter(sha for _, _, sha in recorded["lines"])  # with multiplicity: a row
    known.update(recorded.get("other_lines", []))  # copied verbatim is a new row too
    new = []
    for i, sha in enumerate(shas, 1):
        if known[sha] > 0:
            known[sha] -= 1
        elif i not in edited_at and lines[i - 1].strip():
            new.append(i)
    if new:
        where = ", ".join(map(str, new[:SHOWN])) + (", ..." if len(new) > SHOWN else "")
        out.append(
            f"{key}: {len(new)} new row{'s' if len(new) > 1 else ''} not in the cache (line {where})"
        )
    return out


def _key(root: Path, path: Path) -> str:
    """The file relative to the data root (posix), or its absolute path when outside it."""
    path = Path(os.path.abspath(path))
    full = path.parent.resolve() / path.name  # the folders resolved, not a linked file itself
    try:
        return full.relative_to(root).as_posix()
    except ValueError:
        return str(full)


def _where(root: Path, key: str) -> Path:
    return Path(key) if os.path.isabs(key) else root / key


def _describe(path: Path, *, hashed: bool = False) -> dict:
    try:
        st = os.stat(path)
    except OSError:
        return {"missing": True}
    out = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out | {"sha256": _hash(path)} if hashed else out


def _same_stat(now: dict, recorded: dict) -> bool:
    return now.get("size") == recorded.get("size") and now.get("mtime_ns") == recorded.get(
        "mtime_ns"
    )


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


def _read_lines(path: Path) -> list[bytes]:
    """Lines as the dataset readers number them (\\n, \\r\\n and \\r all end a line)."""
    try:
        return Path(path).read_bytes().splitlines()
    except OSError:
        return []


def _sha(line: bytes) -> str:
    return hashlib.sha256(line.strip()).hexdigest()
