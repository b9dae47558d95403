"""Reading a cache: refuses unfinished or mismatched files, then loads arrays into memory."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from cache.format import (
    FAILED,
    FORMAT_VERSION,
    MODALITIES,
    OK,
    CacheError,
    FingerprintMismatchError,
    IncompleteCacheError,
    TokenFeatures,
    describe_differences,
    fingerprint,
)
from cache.writer import temp_path


@dataclass
class FeatureStore:
    """One cache file loaded into memory. Rows are in dataset order.

    guid, split: (N,) str arrays; label: (N,) int8 (-1 = none); status: (N,) uint8 (1 = ok).
    text / image: TokenFeatures over all N rows, or None when the file lacks that modality.
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
    ) -> FeatureStore:
        """Loads a finished cache. Pass `config` and/or `manifest` (what the data and the encoder
        look like now) to refuse a cache that was built from something else."""
        path = Path(path)
        check_openable(path)
        with h5py.File(path, "r") as f:
            attrs, stored_config, stored_manifest = read_header(f)
            check_fingerprint(path, attrs, stored_config, stored_manifest, config, manifest)
            feats = {m: _read_modality(f[m], tokens) for m in modalities if m in f}
            errors = []
            if "errors" in f:
                cols = [f["errors"][c].asstr()[:] for c in ("guid", "stage", "message")]
                errors = list(zip(*cols))
            return cls(
                path=path,
                attrs=attrs,
                config=stored_config,
                manifest=stored_manifest,
                guid=f["guid"].asstr()[:],
                split=f["split"].asstr()[:],
                label=f["label"][:],
                classes=[str(c) for c in f["label"].attrs["classes"]],
                status=f["status"][:],
                errors=errors,
                text=feats.get("text"),
                image=feats.get("image"),
            )

    def ok(self) -> np.ndarray:
        """(N,) bool: rows whose features are all present."""
        return self.status == OK

    def failed(self) -> np.ndarray:
        return self.status == FAILED


def read_header(f: h5py.File) -> tuple[dict, dict, list[dict]]:
    """Root attributes (decoded), the stored config and the stored data manifest."""
    attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
    config = json.loads(attrs.get("config", "{}"))
    manifest = json.loads(f["manifest"][()].decode()) if "manifest" in f else []
    return attrs, config, manifest


def check_openable(path: Path) -> None:
    """Refuses a missing, unfinished or foreign file with a message that says what to do."""
    if not path.exists():
        if temp_path(path).exists() or parts_dir(path).exists():
            raise IncompleteCacheError(
                f"{path} is not finished (an extract run stopped part-way); "
                "rerun the same extract command to resume it"
            )
        raise FileNotFoundError(f"no cache at {path}; create it with `fusebench extract`")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path} is not a readable HDF5 file ({e}); delete it and extract again") from None
    with f:
        version = f.attrs.get("fusebench_format")
        if version is None:
            raise CacheError(f"{path} is not a fusebench cache (no fusebench_format attribute)")
        if int(version) != FORMAT_VERSION:
            raise CacheError(
                f"{path} has cache format {version}; this fusebench reads format {FORMAT_VERSION}"
                " — extract again with this version"
            )
        if not bool(f.attrs.get("complete", False)):
            raise IncompleteCacheError(
                f"{path} is marked incomplete; rerun the extract command that made it to finish it"
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


def _read_modality(g: h5py.Group, tokens: bool) -> TokenFeatures:
    pooled, pooling = {}, {}
    for name, ds in g.items():
        if name.startswith("pooled"):
            pooled[name] = _read(ds)
            pooling[name] = decode_attr(ds.attrs.get("pooling", ""))
    return TokenFeatures(
        tokens=_read(g["tokens"]) if tokens and "tokens" in g else None,
        mask=_read(g["mask"]) if tokens and "mask" in g else None,
        pooled=pooled,
        pooling=pooling,
    )


def _read(ds: h5py.Dataset) -> np.ndarray:
    out = np.empty(ds.shape, dtype=ds.dtype)
    if out.size:
        ds.read_direct(out)
    return out


def decode_attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v
