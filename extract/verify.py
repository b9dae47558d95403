"""`cache verify`: completeness, fingerprint against the data and the model, and a fresh
forward of a few rows compared with what the cache holds."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch

from cache import CacheError, FeatureStore
from cache.reader import check_openable
from extract.datasets import load_dataset, load_image
from extract.encoders import Encoder, create_encoder

# float16 storage keeps ~3 significant digits; batching/padding may move the last bit.
ATOL, RTOL = 2e-3, 4e-3


def rebuild_encoder(config: dict, device: str = "auto") -> Encoder:
    """The encoder a cache's config describes, loaded the same way `extract` loaded it."""
    return create_encoder(
        config["encoder"], model=config.get("model"), layer=config.get("layer"),
        random_init=config.get("weights") == "random", device=device,
        precision=str(config.get("precision") or "auto").removesuffix("-autocast"),
    )


def current_config(enc: Encoder, stored: dict) -> dict:
    """What `extract` would record now. Precision follows the stored one: it says how the
    numbers were computed, and a CPU check of a GPU-made cache is still a valid check."""
    return enc.config() | {
        "batch_size": stored.get("batch_size"), "format": stored.get("format"),
        "limit": stored.get("limit"), "precision": stored.get("precision"),
    }


def verify(
    path: str | Path, *, data: str | Path | None = None, rows: int = 4, device: str = "auto"
) -> list[str]:
    path = Path(path)
    check_openable(path)
    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["config"])
        data = data or f.attrs.get("data_path")
    if not data:
        raise ValueError(f"{path} does not record its dataset; pass --data DIR")
    ds = load_dataset(data, config.get("format"))
    samples = ds.samples[: config["limit"]] if config.get("limit") else ds.samples
    enc = rebuild_encoder(config, device)
    store = FeatureStore.open(
        path, config=current_config(enc, config), manifest=ds.manifest()[: len(samples)]
    )
    lines = [
        f"{path}: complete, {len(store)} rows ({int(store.ok().sum())} ok, "
        f"{int(store.failed().sum())} failed)",
        f"fingerprint matches the data at {ds.root} and model {config['model']} "
        f"({config.get('weights')} weights, revision {config.get('model_revision') or 'unknown'})",
    ]
    ok_rows = np.flatnonzero(store.ok())
    picks = ok_rows[np.linspace(0, len(ok_rows) - 1, min(rows, len(ok_rows))).astype(int)] if len(ok_rows) else []
    worst = 0.0
    for r in picks:
        fresh = recompute_row(enc, samples[r])
        for modality, feats in fresh.items():
            stored = getattr(store, modality)
            worst = max(worst, _compare(samples[r].guid, modality, stored, r, feats))
    lines.append(f"recomputed {len(picks)} rows with the encoder: max |diff| {worst:.2g} (within float16)")
    return lines


def recompute_row(enc: Encoder, sample) -> dict:
    """A direct single-sample forward: no batching, no sorting, no padding."""
    out = {}
    if "text" in enc.modalities:
        out["text"] = enc.encode_text(enc.tokenize([sample.text or ""]))
    if "image" in enc.modalities:
        pixels = torch.as_tensor(enc.preprocess([load_image(sample.image_path)]))
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
