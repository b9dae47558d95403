"""Rerunning `extract` over an existing cache or a leftover journal (issue 6): what the user
reads and what is rebuilt. A rerun prints why it recomputes a batch, never calls a damaged
cache "up to date", and keeps stage two's record of the data files in step with the files."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from fusebench.cache import FeatureStore, check_fresh, parts_dir
from fusebench.cache.journal import Journal
from fusebench.extract.loop import cache_path, extract

from tests.conftest import cli, make_lab5


def run(data: Path, out: Path, model: Path, *extra: str):
    args = ["extract", "--encoder", "bert", "--model", str(model), "--data", str(data)]
    return cli(*args, "--out", out, "--workers", 0, "--batch-size", 4, *extra)


@pytest.fixture
def built(tiny_models, tmp_path):
    data = make_lab5(tmp_path / "lab5-mini", n_train=10, n_test=2)
    result = run(data, tmp_path / "out", tiny_models["bert"])
    assert result.exit_code == 0, result.output
    return data, tmp_path / "out", cache_path(tmp_path / "out", data.name, "bert")


def test_a_damaged_journal_part_is_named_on_the_rerun(tiny_models, tmp_path, monkeypatch):
    """Killed mid-run with one part truncated: the rerun says which part it discards."""
    data = make_lab5(tmp_path / "lab5-mini", n_train=10, n_test=2)
    out = tmp_path / "out"
    final = cache_path(out, data.name, "bert")
    real_remove = Journal.remove
    monkeypatch.setattr(Journal, "remove", lambda self: None)  # keep the journal, as a kill does
    extract(data, "bert", model=str(tiny_models["bert"]), out=out, batch_size=4, quiet=True)
    monkeypatch.setattr(Journal, "remove", real_remove)
    final.unlink()
    part = sorted(parts_dir(final).glob("text-*.npz"))[0]
    part.write_bytes(part.read_bytes()[:40])
    result = run(data, out, tiny_models["bert"])
    assert result.exit_code == 0, result.output
    assert "note:" in result.output and part.name in result.output
    assert final.exists() and not parts_dir(final).exists()


def test_a_leftover_journal_beside_a_finished_cache_is_removed(built, tiny_models):
    """Killed right after the final rename: the cache is done, its journal must not linger."""
    data, out, final = built
    parts_dir(final).mkdir()
    (parts_dir(final) / "text-000000.npz").write_bytes(b"x")
    result = run(data, out, tiny_models["bert"])
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    assert not parts_dir(final).exists()


def test_an_edited_header_keeps_the_cache_and_stage_two_agrees(built, tiny_models):
    """Same samples, other bytes in train.txt (header case): extract says up to date and the
    recorded data files are updated, so stage two does not call the cache stale forever."""
    data, out, final = built
    index = data / "train.txt"
    index.write_text(index.read_text().replace("guid,tag", "GUID,Tag", 1))
    assert check_fresh(FeatureStore.open(final, modalities=(), tokens=False))
    result = run(data, out, tiny_models["bert"])
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    assert check_fresh(FeatureStore.open(final, modalities=(), tokens=False)) == []


def test_a_cache_with_a_damaged_array_is_rebuilt_not_called_up_to_date(built, tiny_models):
    """An array edited behind fusebench's back fails its digest: the rerun rebuilds the cache
    (saying why) instead of reporting it up to date."""
    data, out, final = built
    before = FeatureStore.open(final).text.pooled["pooled"].copy()
    with h5py.File(final, "r+") as f:
        f["label"][0] = (int(f["label"][0]) + 1) % 3
    result = run(data, out, tiny_models["bert"])
    assert result.exit_code == 0, result.output
    assert "up to date" not in result.output and "rebuilding" in result.output
    store = FeatureStore.open(final)  # digests hold again
    np.testing.assert_array_equal(store.text.pooled["pooled"], before)


def test_a_refresh_over_a_damaged_cache_rebuilds_every_row(built, tiny_models):
    """The data changed AND the old cache cannot be read: nothing is copied from it."""
    data, out, final = built
    (data / "data" / "100.txt").write_text("a brand new text\n")
    with h5py.File(final, "r+") as f:
        del f["status"]
    result = run(data, out, tiny_models["bert"])
    assert result.exit_code == 0, result.output
    assert "rebuilding every row" in result.output
    store = FeatureStore.open(final)
    assert store.ok().all() and check_fresh(store) == []
    shutil.rmtree(out)


def test_extract_reads_each_data_file_once_for_the_source_record(
    tiny_models, tmp_path, monkeypatch
):
    """The reader hashes every text and image for the manifest; the record of the data files
    stage two checks reuses those hashes (only the index files are hashed again), and it still
    holds the right sha256 of each file."""
    import hashlib

    import fusebench.cache.sources as sources

    data = make_lab5(tmp_path / "lab5-mini", n_train=6, n_test=2)
    hashed: list[Path] = []
    real = sources._hash
    monkeypatch.setattr(sources, "_hash", lambda p: hashed.append(Path(p)) or real(p))
    final = extract(data, "bert", model=str(tiny_models["bert"]), out=tmp_path / "out",
                    batch_size=4, quiet=True).path  # fmt: skip
    assert {p.name for p in hashed} <= {"train.txt", "test_without_label.txt"}, hashed
    store = FeatureStore.open(final, modalities=(), tokens=False)
    files = store.sources["files"]
    name = "data/100.txt"
    assert files[name]["sha256"] == hashlib.sha256((data / name).read_bytes()).hexdigest()
    assert "data/100.jpg" not in files  # a text cache: its images are not its data
    assert check_fresh(store) == []
