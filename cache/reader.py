"""Reading a cache: refuses unfinished, mismatched or damaged files, then loads arrays into memory.

Every refusal is a CacheError (or FileNotFoundError) whose one-line message names the file,
what is wrong and the fix; no h5py KeyError or OSError escapes. What a read checks is listed
in cache/integrity.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from fusebench.cache.format import (
    FAILED,
    FORMAT_VERSION,
    MODALITIES,
    OK,
    CacheError,
    DamagedCacheError,
    FingerprintMismatchError,
    IncompleteCacheError,
    TokenFeatures,
    describe_differences,
    fingerprint,
)
from fusebench.cache.integrity import (
    ATTRS,
    attrs_digest,
    check_digest,
    damaged,
    fix_line,
    read_dataset,
    stored_digests,
)
from fusebench.cache.lazy import BlockCache, LazyRows
from fusebench.cache.opening import open_h5, reading  # noqa: F401  (re-exported)
from fusebench.cache.writer import temp_path

LAZY_DEFAULT_BYTES = 256 << 20  # block cache of a store opened with `stream` but no cache
REQUIRED = ("guid", "split", "label", "status", "manifest")  # datasets every cache has


@dataclass
class FeatureStore:
    """One cache file loaded into memory. Rows are in dataset order.

    guid, split: (N,) str arrays; label: (N,) int8 (-1 = none); status: (N,) uint8 (1 = ok).
    text / image: TokenFeatures over all N rows, or None when the file lacks that modality.
    sources: what the data files looked like at extraction (cache/sources.py), or None for a
    cache written before they were recorded.
    """

    path: Path
    attrs: dict
    config: dict
    manifest: list[dict]
    guid: np.ndarray
    split: np.ndarray
    label: np.ndarray
    classes: list[str]
    status: np.ndarray
    errors: list[tuple[str, str, str]]
    text: TokenFeatures | None
    image: TokenFeatures | None
    sources: dict | None = None

    @property
    def encoder(self) -> str:
        return str(self.attrs.get("encoder", ""))

    def __len__(self) -> int:
        return len(self.guid)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        modalities: Iterable[str] = MODALITIES,
        tokens: bool = True,
        config: dict | None = None,
        manifest: list[dict] | None = None,
        stream: Iterable[str] = (),
        block_cache: BlockCache | None = None,
    ) -> FeatureStore:
        """Loads a finished cache. Pass `config` and/or `manifest` (what the data and the encoder
        look like now) to refuse a cache that was built from something else. stream: modalities
        whose token arrays stay in the file, read on demand in row blocks through `block_cache`
        (cache/lazy.py LazyRows; masks and pooled vectors are small and always loaded)."""
        stream = set(stream)
        if stream and block_cache is None:
            block_cache = BlockCache(LAZY_DEFAULT_BYTES)
        path = Path(path)
        check_openable(path)
        with reading(path) as f:
            attrs, stored_config, stored_manifest = read_header(f, path)
            check_fingerprint(path, attrs, stored_config, stored_manifest, config, manifest)
            digests = stored_digests(f, path)
            _check_attrs_digest(f, path, digests)
            rows = _read_small(f, path, digests, stored_manifest)
            feats = {
                m: _read_modality(
                    f[m],
                    path,
                    tokens,
                    digests,
                    len(rows["guid"]),
                    block_cache if m in stream else None,
                )
                for m in modalities
                if m in f
            }
            return cls(
                path=path,
                attrs=attrs,
                config=stored_config,
                manifest=stored_manifest,
                classes=[str(c) for c in decode_attr(f["label"].attrs["classes"])],
                text=feats.get("text"),
                image=feats.get("image"),
                **rows,
            )

    def ok(self) -> np.ndarray:
        """(N,) bool: rows whose features are all present."""
        return self.status == OK

    def failed(self) -> np.ndarray:
        return self.status == FAILED


def _check_attrs_digest(f: h5py.File, path: Path, digests: dict[str, str] | None) -> None:
    if digests is not None and ATTRS in digests and digests[ATTRS] != attrs_digest(f):
        raise DamagedCacheError(
            f"{path} is damaged: its attributes (classes, pooling, settings) differ from "
            f"the digest stored when it was written; {fix_line(path)}"
        )


def _read_small(
    f: h5py.File, path: Path, digests: dict[str, str] | None, stored_manifest: list[dict]
) -> dict:
    """The small arrays of a cache, digests checked, as FeatureStore fields: guid, split,
    label, status (checked against the manifest), errors, sources."""

    def small(name: str) -> np.ndarray:
        a = read_dataset(f[name], path)
        check_digest(path, name, a, digests)
        return a

    small("manifest")  # parsed by read_header; its bytes are checked here
    guid, split, label, status = (small(k) for k in ("guid", "split", "label", "status"))
    check_rows(path, stored_manifest, guid, split, label, status)
    errors = []
    if "errors" in f:
        cols = [small(f"errors/{c}") for c in ("guid", "stage", "message")]
        errors = list(zip(*cols))
    sources = None
    if "sources" in f:
        sources = _json(path, "sources", str(small("sources")[()]))
    return dict(guid=guid, split=split, label=label, status=status, errors=errors, sources=sources)


def read_header(f: h5py.File, path: Path | None = None) -> tuple[dict, dict, list[dict]]:
    """Root attributes (decoded), the stored config and the stored data manifest."""
    path = path or Path(f.filename)
    attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
    config = _json(path, "config", attrs.get("config", "{}"))
    manifest = []
    if "manifest" in f:
        try:
            text = f["manifest"][()]
        except OSError as e:
            raise damaged(path, "manifest", e) from None
        manifest = _json(path, "manifest", text.decode() if isinstance(text, bytes) else text)
    if not isinstance(config, dict) or not isinstance(manifest, list):
        raise DamagedCacheError(
            f"{path} is damaged: its config or manifest has the wrong shape; {fix_line(path)}"
        )
    return attrs, config, manifest


def _json(path: Path, what: str, text):
    try:
        return json.loads(text.decode() if isinstance(text, bytes) else str(text))
    except ValueError:
        raise DamagedCacheError(
            f"{path} is damaged: its {what} is not readable JSON; {fix_line(path)}"
        ) from None


def check_openable(path: Path) -> None:
    """Refuses a missing, unfinished, foreign or incomplete file with a message that says what
    to do."""
    if not path.exists():
        if path.is_symlink():
            raise FileNotFoundError(
                f"{path} is a link to {path.readlink()}, which does not exist; "
                "fix the link or extract the cache again"
            )
        if temp_path(path).exists() or parts_dir(path).exists():
            raise IncompleteCacheError(
                f"{path} is not finished (an extract run stopped part-way); "
                "rerun the same extract command to resume it"
            )
        raise FileNotFoundError(f"no cache at {path}; create it with `fusebench extract`")
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.h5"))
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise CacheError(f"{path} is a folder, not a cache file; pass one .h5 file{hint}")
    with reading(path) as f:
        version = f.attrs.get("fusebench_format")
        if version is None:
            raise CacheError(f"{path} is not a fusebench cache (no fusebench_format attribute)")
        try:
            version = int(version)
        except (TypeError, ValueError):
            version = decode_attr(version)
        if version != FORMAT_VERSION:
            raise CacheError(
                f"{path} has cache format {version}; this fusebench reads format {FORMAT_VERSION}"
                " — extract again with this version"
            )
        if not is_true(f.attrs.get("complete", False)):
            raise IncompleteCacheError(
                f"{path} is marked incomplete; rerun the extract command that made it to finish it"
            )
        if missing := missing_parts(f):
            raise DamagedCacheError(
                f"{path} is missing {', '.join(missing)} (damaged or edited after it was "
                f"written); {fix_line(path)}"
            )


def is_true(v) -> bool:
    """A boolean attribute as written (numpy bool); strings and odd values are not trusted."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (bytes, str)):
        return (v.decode() if isinstance(v, bytes) else v).strip().lower() == "true"
    return isinstance(v, (int, np.integer)) and int(v) == 1


def missing_parts(f: h5py.File) -> list[str]:
    """What a finished cache needs and this file lacks: datasets, attributes, each modality's
    pooled vector, and every dataset recorded in its digests."""
    missing = [name for name in REQUIRED if not isinstance(f.get(name), h5py.Dataset)]
    missing += [f"attribute {a}" for a in ("config", "fingerprint") if a not in f.attrs]
    if "label" not in missing and "classes" not in f["label"].attrs:
        missing.append("attribute label.classes")
    for m in MODALITIES:
        if m in f and not isinstance(f[m].get("pooled"), h5py.Dataset):
            missing.append(f"{m}/pooled")
    if "errors" in f:
        missing += [f"errors/{c}" for c in ("guid", "stage", "message") if c not in f["errors"]]
    raw = f.attrs.get("digests")
    try:
        recorded = json.loads(raw) if raw is not None else {}
    except ValueError:
        recorded = {}  # stored_digests() reports it
    if isinstance(recorded, dict):
        missing += [n for n in recorded if n not in f and n not in missing and n != ATTRS]
    return missing


def check_rows(
    path: Path,
    manifest: list[dict],
    guid: np.ndarray,
    split: np.ndarray,
    label: np.ndarray,
    status: np.ndarray,
) -> None:
    """The per-row arrays agree with the manifest the fingerprint covers, and hold valid values
    (works for caches written before digests existed)."""
    n = len(guid)
    if not (len(split) == len(label) == len(status) == n):
        raise DamagedCacheError(
            f"{path} is damaged: guid, split, label and status have different lengths "
            f"({n}, {len(split)}, {len(label)}, {len(status)}); {fix_line(path)}"
        )
    if manifest and len(manifest) != n:
        raise DamagedCacheError(
            f"{path} is damaged: {n} rows but its manifest lists {len(manifest)} samples; "
            f"{fix_line(path)}"
        )
    for i, m in enumerate(manifest):
        for key, arr in (("guid", guid), ("split", split), ("label", label)):
            if key in m and str(m[key]) != str(arr[i]):
                raise DamagedCacheError(
                    f"{path} is damaged: row {i} has {key} {arr[i]!s} but the manifest it was "
                    f"built from says {m[key]} (edited after writing); {fix_line(path)}"
                )
    if n and not np.isin(status, (0, 1, 2)).all():
        i = int(np.flatnonzero(~np.isin(status, (0, 1, 2)))[0])
        raise DamagedCacheError(
            f"{path} is damaged: row {i} has status {int(status[i])} (not 0, 1 or 2); "
            f"{fix_line(path)}"
        )


def check_fingerprint(
    path: Path,
    attrs: dict,
    stored_config: dict,
    stored_manifest: list[dict],
    config: dict | None,
    manifest: list[dict] | None,
) -> None:
    stored_fp = attrs.get("fingerprint", "")
    if fingerprint(stored_config, stored_manifest) != stored_fp:
        raise FingerprintMismatchError(
            f"{path}: stored fingerprint does not match its own config and manifest "
            "(the file was edited after writing); extract again"
        )
    if config is None and manifest is None:
        return
    now = fingerprint(
        config if config is not None else stored_config,
        manifest if manifest is not None else stored_manifest,
    )
    if now != stored_fp:
        diffs = describe_differences(stored_config, stored_manifest, config, manifest)
        raise FingerprintMismatchError(
            f"{path} was built from other data or settings: "
            + "; ".join(diffs or ["fingerprints differ"])
            + " — extract again (or point at the data/model it was built from)"
        )


def parts_dir(path: Path) -> Path:
    """Where `extract` journals finished batches before the cache is assembled."""
    return path.with_name(path.name + ".parts")


def _read_modality(
    g: h5py.Group,
    path: Path,
    tokens: bool,
    digests: dict[str, str] | None,
    n: int,
    block_cache: BlockCache | None = None,
) -> TokenFeatures:
    """Pooled vectors and the mask are checked against their digests; tokens (the bulk of the
    file) rely on the fletcher32 checksum of every chunk (`cache verify` checks their digests).
    With a block_cache, tokens are not read now: a LazyRows reads them on demand."""
    pooled, pooling = {}, {}

    def load(name: str, check: bool, lazy: bool = False) -> np.ndarray | LazyRows:
        ds = g[name]
        if ds.ndim == 0 or ds.shape[0] != n:
            raise DamagedCacheError(
                f"{path} is damaged: `{ds.name.lstrip('/')}` has shape {ds.shape}, not {n} rows; "
                f"{fix_line(path)}"
            )
        if lazy:
            return LazyRows.of(ds, path, block_cache)
        a = read_dataset(ds, path)
        if check:
            check_digest(path, ds.name.lstrip("/"), a, digests)
        return a

    for name, ds in g.items():
        if name.startswith("pooled") and isinstance(ds, h5py.Dataset):
            pooled[name] = load(name, True)
            pooling[name] = decode_attr(ds.attrs.get("pooling", ""))
    return TokenFeatures(
        tokens=load("tokens", False, block_cache is not None) if tokens and "tokens" in g else None,
        mask=load("mask", True) if tokens and "mask" in g else None,
        pooled=pooled,
        pooling=pooling,
    )


def decode_attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return [decode_attr(x) for x in v.tolist()]
    return v
