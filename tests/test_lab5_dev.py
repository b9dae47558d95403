"""Integration on the real lab5-dev data (1,300 pairs, messy encodings) with the real bundled
MiniLM weights. Skips cleanly where ../shared/data is absent (a user's clone)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from fusebench.cache import FeatureStore

from tests.conftest import LAB5_DEV, cli

pytestmark = pytest.mark.skipif(not LAB5_DEV.exists(), reason="../shared/data/lab5-dev not present")


def _index(name: str) -> list[tuple[str, str]]:
    with open(LAB5_DEV / name, newline="") as fh:
        return [(r["guid"], r["tag"]) for r in csv.DictReader(fh)]


def test_extract_minilm_on_lab5_dev(tmp_path):
    res = cli(
        *[
            "extract",
            "--encoder",
            "minilm",
            "--data",
            str(LAB5_DEV),
            "--out",
            str(tmp_path),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    store = FeatureStore.open(tmp_path / "lab5-dev" / "minilm.h5")

    train, test = _index("train.txt"), _index("test_without_label.txt")
    assert len(store) == 1300 == len(train) + len(test)
    assert list(store.guid) == [g for g, _ in train] + [g for g, _ in test]  # dataset order
    assert list(store.split) == ["train"] * len(train) + ["test"] * len(test)
    names = store.classes
    assert [names[y] for y in store.label[: len(train)]] == [t for _, t in train]
    assert (store.label[len(train) :] == -1).all()
    assert store.ok().all()

    t = store.text
    assert t.tokens.dtype == np.float16 and t.tokens.shape[2] == 384 and t.tokens.shape[1] <= 128
    assert t.pooled["pooled"].shape == (1300, 384) and t.pooling["pooled"] == "mean"
    pad = ~t.mask  # (N, L)
    assert pad.any() and (t.tokens[pad] == 0).all()  # padded positions exactly zero
    assert (np.abs(t.tokens[t.mask]).sum(-1) > 0).all()  # real tokens are not
    # masked mean of the stored tokens reproduces the stored pooled vector
    m = t.mask[..., None].astype(np.float32)
    mean = (t.tokens.astype(np.float32) * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(mean, t.pooled["pooled"].astype(np.float32), atol=2e-3)
    # fallback decodes are recorded, by guid, and did not fail the sample
    notes = [e for e in store.errors if e[1] == "text-note"]
    assert len(notes) > 100 and all(g in set(store.guid) for g, _, _ in notes)
