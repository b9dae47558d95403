"""`cache verify`: completeness; every stored array against the sha256 digest recorded at
assembly (fletcher32 checked on every chunk on the way); guid, split and label of every row
against the dataset; the fingerprint against the data and the model; and a fresh forward of a
few rows compared with what the cache holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from fusebench.cache import CacheError, DamagedCacheError, FeatureStore
from fusebench.cache.integrity import fix_line, verify_digests
from fusebench.cache.reader import check_openable, read_header, reading
from fusebench.cache.sources import index_file
from fusebench.extract.datasets import Dataset, detect_format, load_dataset
from fusebench.extract.encoders import Encoder, create_encoder

# float16 storage keeps ~3 significant digits; batching/padding may move the last bit.
ATOL, RTOL = 2e-3, 4e-3


def rebuild_encoder(config: dict, device: str = "auto") -> Encoder:
    """The encoder a cache's config describes, loaded the same way `extract` loaded it
    (images through the same path: the fast one when the config says so)."""
    enc = create_encoder(
        config["encoder"],
        model=config.get("model"),
        layer=config.get("layer"),
        random_init=config.get("weights") == "random",
        device=device,
        precision=str(config.get("precision") or "auto").removesuffix("-autocast"),
    )
    enc.select_recorded(config)
    return enc


def current_config(enc: Encoder, stored: dict, ds: Dataset | None = None) -> dict:
    """What `extract` would record now. Precision follows the stored one: it says how the
    numbers were computed, and a CPU check of a GPU-made cache is still a valid check. The
    dataset's classes and legacy text encoding come from `ds` when given (else as stored)."""
    config = enc.config() | {
        "batch_size": stored.get("batch_size"),
        "format": stored.get("format"),
        "limit": stored.get("limit"),
        "precision": stored.get("precision"),
    }
    now = (
        {}
        if ds is None
        else {
            "classes": list(ds.classes),
            "text_encoding": ds.text_encoding,
            "columns": ds.column_map,
        }
    )
    for key in ("classes", "text_encoding", "columns"):  # absent unless the cache records them
        if key in stored:
            config[key] = now.get(key, stored[key])
    return config


def verify(
    path: str | Path, *, data: str | Path | None = None, rows: int = 4, device: str = "auto"
) -> list[str]:
    path = Path(path)
    check_openable(path)
    with reading(path) as f:
        attrs, config, _ = read_header(f, path)
        checked, bad = verify_digests(f, path)
        sources = _sources(f) if not data else None
    if bad:
        raise DamagedCacheError(f"{path} is damaged: {', '.join(bad)}; {fix_line(path)}")
    data = data or _recorded_data(path, attrs, config, sources)
    if "encoder" not in config:
        raise DamagedCacheError(f"{path} is damaged: its config names no encoder; {fix_line(path)}")
    ds = load_dataset(
        data,
        config.get("format"),
        text_encoding=config.get("text_encoding"),
        labels=config.get("classes"),
        columns=config.get("columns"),
    )
    samples = ds.samples[: config["limit"]] if config.get("limit") else ds.samples
    enc = rebuild_encoder(config, device)
    manifest = ds.manifest()[: len(samples)]
    store = FeatureStore.open(path, config=current_config(enc, config, ds), manifest=manifest)
    _check_rows_against(store, manifest)
    integrity = (
        f"all {checked} arrays match the sha256 digests stored when the cache was written "
        "(and every chunk's fletcher32)"
        if checked
        else "no digests stored (a cache written by an older fusebench): arrays checked only "
        "against the manifest; extract again with --overwrite to add them"
    )
    lines = [
        f"{path}: complete, {len(store)} rows ({int(store.ok().sum())} ok, "
        f"{int(store.failed().sum())} failed)",
        f"integrity: {integrity}",
        f"guid, split and label of all {len(store)} rows match the dataset at {ds.path or ds.root}",
        f"fingerprint matches the data at {ds.path or ds.root} and model {config['model']} "
        f"({config.get('weights')} weights, revision {config.get('model_revision') or 'unknown'})",
    ]
    return [*lines, _recomputed(store, enc, samples, rows)]


def _recorded_data(path: Path, attrs: dict, config: dict, sources) -> str:
    """The dataset a cache records (the manifest file read, or the dataset's folder);
    ValueError naming --data when it records none usable."""
    recorded = attrs.get("data_path")
    if recorded and config.get("format") == "manifest" and Path(recorded).is_dir():
        recorded = index_file(sources) or recorded  # a cache that recorded a manifest's folder
        if Path(recorded).is_dir() and _no_layout(Path(recorded)):
            raise ValueError(
                f"{path} records its data as the folder {recorded}, which holds no single "
                "manifest (a cache merged from part manifests, or one from an older "
                "fusebench); pass --data with the manifest file of its rows"
            )
    if not recorded:
        raise ValueError(f"{path} does not record its dataset; pass --data DIR")
    return recorded


def _recomputed(store: FeatureStore, enc, samples, rows: int) -> str:
    """`rows` ok rows spread over the cache, recomputed with the encoder and compared."""
    ok_rows = np.flatnonzero(store.ok())
    picks = (
        ok_rows[np.linspace(0, len(ok_rows) - 1, min(rows, len(ok_rows))).astype(int)]
        if len(ok_rows)
        else []
    )
    worst = 0.0
    for r in picks:
        fresh = recompute_row(enc, samples[r])
        for modality, feats in fresh.items():
            stored = getattr(store, modality)
            worst = max(worst, _compare(samples[r].guid, modality, stored, r, feats))
    return f"recomputed {len(picks)} rows with the encoder: max |diff| {worst:.2g} (within float16)"


def _no_layout(folder: Path) -> bool:
    try:
        detect_format(folder)
    except ValueError:
        return True
    return False


def _sources(f) -> dict | None:
    """The cache's record of its data files, or None."""
    if "sources" not in f:
        return None
    try:
        raw = f["sources"][()]
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (OSError, ValueError):
        return None


def _check_rows_against(store: FeatureStore, manifest: list[dict]) -> None:
    """The stored per-row arrays (not only the stored manifest) say what the data says."""
    if len(manifest) != len(store):
        raise CacheError(
            f"{store.path} has {len(store)} rows but the dataset has {len(manifest)}; extract again"
        )
    for i, m in enumerate(manifest):
        for key in ("guid", "split", "label"):
            stored = getattr(store, key)[i]
            if str(stored) != str(m[key]):
                raise DamagedCacheError(
                    f"{store.path}: row {i} has {key} {stored} but the dataset says {m[key]} "
                    f"(sample {m['guid']}); {fix_line(store.path)}"
                )


def recompute_row(enc: Encoder, sample) -> dict:
    """A direct single-sample forward: no batching, no sorting, no padding."""
    out = {}
    if "text" in enc.modalities:
        out["text"] = enc.encode_text(enc.tokenize([sample.text or ""]))
    if "image" in enc.modalities:
        pixels = torch.as_tensor(enc.preprocess([enc.load_image(sample)]))
        out["image"] = enc.encode_image(pixels)
    return out


def _compare(guid: str, modality: str, stored, row: int, fresh) -> float:
    worst = 0.0
    pairs = [(k, stored.pooled[k][row], v[0]) for k, v in fresh.pooled.items()]
    if stored.tokens is not None and fresh.tokens is not None:
        n = fresh.tokens.shape[1]
        pairs.append(("tokens", stored.tokens[row, :n], fresh.tokens[0]))
        if stored.tokens[row, n:].any():
            raise CacheError(f"sample {guid}: {modality} tokens beyond its length are not zero")
    for name, a, b in pairs:
        a, b = a.astype(np.float32), b.astype(np.float32)
        if not np.allclose(a, b, atol=ATOL, rtol=RTOL):
            raise CacheError(
                f"sample {guid}: cached {modality}/{name} differs from a fresh forward "
                f"(max |diff| {np.abs(a - b).max():.3g}); extract again"
            )
        worst = max(worst, float(np.abs(a - b).max()))
    return worst
