"""`fusebench cache merge` (docs/architecture.md §8): parts of one dataset, extracted apart and merged, equal
the dataset extracted whole; caches of other encoders, settings, data or classes are refused in
one line."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from fusebench.cache import FeatureStore, MergeError, TokenFeatures, fingerprint, merge_caches
from fusebench.cache.integrity import verify_digests
from fusebench.cache.merge import merge_sources
from fusebench.cache.writer import temp_path, write_features

from tests.conftest import cli, make_lab5, one_line_error, write_manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL, RTOL = 2e-3, 4e-3  # float16 batching tolerance (as tests/test_extract.py)


def assert_one_line_error(result, *needles: str) -> str:
    line = one_line_error(result)
    for n in needles:
        assert n in line, line
    return line


# ------------------------------------------------------------------------------ real extraction


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    root = make_lab5(tmp_path_factory.mktemp("merge") / "mini", n_train=21, n_test=5)
    labels = {}
    for name in ("train.txt", "test_without_label.txt"):
        for line in (root / name).read_text().splitlines()[1:]:
            g, tag = line.split(",")
            labels[g] = tag
    guids = list(labels)
    write_manifest(root / "whole.csv", guids, labels)
    write_manifest(root / "part1.csv", guids[:11], labels)  # 11, 15: not batch-aligned
    write_manifest(root / "part2.csv", guids[11:], labels)
    write_manifest(root / "overlap.csv", guids[7:16], labels)
    return root, guids


def extract(data: Path, out: Path, encoder: str, model: Path, *extra: object) -> Path:
    result = cli(
        "extract", "--encoder", encoder, "--data", data, "--out", out, "--model", model,
        "--batch-size", 4, "--workers", 0, "--quiet", *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (path,) = out.glob("*/*.h5")
    return path


@pytest.fixture(scope="module")
def clip_caches(corpus, tiny_models, tmp_path_factory) -> dict[str, Path]:
    root, _ = corpus
    tmp = tmp_path_factory.mktemp("clip")
    model = tiny_models["clip"]
    return {
        name: extract(root / f"{name}.csv", tmp / name, "clip", model)
        for name in ("whole", "part1", "part2")
    }


def test_merged_parts_equal_the_whole(clip_caches, tmp_path):
    out = tmp_path / "merged.h5"
    result = cli("cache", "merge", clip_caches["part1"], clip_caches["part2"], "--out", out)
    assert result.exit_code == 0, result.output
    assert "26 rows" in result.output and "0 rows in more than one" in result.output

    whole, merged = FeatureStore.open(clip_caches["whole"]), FeatureStore.open(out)
    for key in ("guid", "split", "label", "status"):
        assert np.array_equal(getattr(whole, key), getattr(merged, key)), key
    assert merged.classes == whole.classes
    # the fingerprint extract gives the whole dataset: same config, same manifest, same order
    assert merged.attrs["fingerprint"] == whole.attrs["fingerprint"]
    assert merged.config == whole.config and merged.manifest == whole.manifest
    for m in ("text", "image"):
        a, b = getattr(whole, m), getattr(merged, m)
        assert a.tokens.shape == b.tokens.shape, m  # text padded to the longest part
        if a.mask is not None:
            assert np.array_equal(a.mask, b.mask)
        np.testing.assert_allclose(b.tokens.astype(np.float32), a.tokens, atol=ATOL, rtol=RTOL)
        assert set(a.pooled) == set(b.pooled) and a.pooling == b.pooling
        for k in a.pooled:
            np.testing.assert_allclose(
                b.pooled[k].astype(np.float32), a.pooled[k], atol=ATOL, rtol=RTOL, err_msg=k
            )
    mask = merged.text.mask[..., None]
    assert not merged.text.tokens[~np.broadcast_to(mask, merged.text.tokens.shape)].any()
    with h5py.File(out) as f:  # every digest of the output holds (what `cache verify` checks)
        assert verify_digests(f, out)[1] == []
        assert f["image/tokens"].fletcher32 and f["text/tokens"].fletcher32
    # the record of the data files covers every row, so the stale check sees all of them
    guids = {g for e in merged.sources["files"].values() for g in e.get("guids", [])}
    assert guids == set(whole.guid)
    assert not temp_path(out).exists()


def test_overlap_with_identical_rows_gives_the_whole(corpus, tiny_models, tmp_path):
    """vit image batches are in dataset order: --limit 8 at batch size 4 computes the same
    batches as the whole run, so the 8 shared rows are byte-identical and the merge is the
    whole cache, byte for byte in every array."""
    root, _ = corpus
    first = extract(root / "whole.csv", tmp_path / "a", "vit", tiny_models["vit"], "--limit", 8)
    whole = extract(root / "whole.csv", tmp_path / "b", "vit", tiny_models["vit"])
    out = tmp_path / "merged.h5"
    rep = merge_caches([first, whole], out)
    assert (rep.rows, rep.overlap, rep.inputs) == (26, 8, 2)
    a, b = FeatureStore.open(whole), FeatureStore.open(out)
    assert b.attrs["fingerprint"] == a.attrs["fingerprint"]  # limit: None, as the whole run
    assert np.array_equal(a.image.tokens, b.image.tokens)
    assert np.array_equal(a.image.pooled["pooled"], b.image.pooled["pooled"])
    assert [m["path"] for m in json.loads(b.attrs["merged_from"])] == [str(first), str(whole)]


def test_refuses_other_encoder_and_other_settings(corpus, tiny_models, clip_caches, tmp_path):
    root, _ = corpus
    vit = extract(root / "part2.csv", tmp_path / "vit", "vit", tiny_models["vit"])
    line = assert_one_line_error(
        cli("cache", "merge", clip_caches["part1"], vit, "--out", tmp_path / "x.h5"),
        "config 'encoder' differs",
        str(clip_caches["part1"]),
        str(vit),
    )
    assert "error:" in line
    bs8 = tmp_path / "bs8"
    result = cli(
        "extract", "--encoder", "clip", "--data", root / "part2.csv", "--out", bs8,
        "--model", tiny_models["clip"], "--batch-size", 8, "--workers", 0, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (other,) = bs8.glob("*/*.h5")
    assert_one_line_error(
        cli("cache", "merge", clip_caches["part1"], other, "--out", tmp_path / "x.h5"),
        "config 'batch_size' differs",
        "clip.h5: 4, clip.h5: 8",
    )
    assert not (tmp_path / "x.h5").exists() and not temp_path(tmp_path / "x.h5").exists()


def test_refuses_an_existing_output_unless_overwrite(clip_caches, tmp_path):
    out = tmp_path / "merged.h5"
    out.write_bytes(b"keep me")
    args = ["cache", "merge", clip_caches["part1"], clip_caches["part2"], "--out", out]
    assert_one_line_error(cli(*args), "already exists", "--overwrite")
    assert out.read_bytes() == b"keep me"
    assert cli(*args, "--overwrite").exit_code == 0
    assert len(FeatureStore.open(out)) == 26


# ------------------------------------------------------------------------------ synthetic caches


def synthetic(
    path: Path,
    guids: list[str],
    *,
    labels: list[int] | None = None,
    classes=("negative", "neutral", "positive"),
    config: dict | None = None,
    status: list[int] | None = None,
    seed: int = 0,
    length: int = 5,
    changed: dict[str, float] | None = None,
) -> Path:
    """A text cache whose features depend on the guid only (so parts agree), except the guids
    in `changed`, shifted by that amount."""
    n = len(guids)
    labels = labels if labels is not None else [int(g) % 3 for g in guids]
    tokens = np.zeros((n, length, 4), np.float16)
    mask = np.zeros((n, length), bool)
    for i, g in enumerate(guids):
        real = 1 + int(g) % 3  # <= every length used here
        rng = np.random.default_rng(int(g))
        tokens[i, :real] = rng.standard_normal((real, 4)) + (changed or {}).get(g, 0.0)
        mask[i, :real] = True
    pooled = tokens.sum(axis=1).astype(np.float16)
    return write_features(
        path,
        guid=guids,
        split=["train"] * n,
        label=labels,
        classes=classes,
        text=TokenFeatures(tokens, mask, {"pooled": pooled}, {"pooled": "cls"}),
        status=None if status is None else np.asarray(status, np.uint8),
        errors=[(g, "text", "unreadable") for g, s in zip(guids, status or []) if s == 2],
        config=config or {"encoder": "synthetic", "batch_size": 4, "limit": None},
        attrs={"dataset": "lab5-mini"},
    )


def test_a_row_ok_anywhere_is_ok_and_lengths_are_padded(tmp_path):
    a = synthetic(tmp_path / "a.h5", ["1", "2", "3"], status=[1, 2, 1], length=3)
    b = synthetic(tmp_path / "b.h5", ["2", "3", "4", "5"], length=6)
    rep = merge_caches([a, b], tmp_path / "m.h5")
    assert (rep.rows, rep.ok, rep.failed, rep.overlap) == (5, 5, 0, 2)
    m = FeatureStore.open(tmp_path / "m.h5")
    assert list(m.guid) == ["1", "2", "3", "4", "5"]  # first input's order, then new guids
    assert m.text.tokens.shape == (5, 6, 4)  # padded to the longest input
    whole = FeatureStore.open(synthetic(tmp_path / "w.h5", ["1", "2", "3", "4", "5"], length=6))
    assert np.array_equal(m.text.tokens, whole.text.tokens)
    assert np.array_equal(m.text.mask, whole.text.mask)
    assert m.errors == []  # guid 2 failed in a, ok in b: its row and log come from b
    # a row failed everywhere stays failed, with its error line
    c = synthetic(tmp_path / "c.h5", ["6", "7"], status=[2, 1])
    m2 = FeatureStore.open(merge_caches([a, c], tmp_path / "m2.h5").path)
    assert list(m2.status) == [1, 2, 1, 2, 1]
    assert m2.errors == [("2", "text", "unreadable"), ("6", "text", "unreadable")]


def test_refuses_conflicting_overlap(tmp_path):
    a = synthetic(tmp_path / "a.h5", ["1", "2", "3"])
    b = synthetic(tmp_path / "b.h5", ["3", "4"], changed={"3": 0.5})
    with pytest.raises(MergeError, match=r"sample 3 is in both with different features"):
        merge_caches([a, b], tmp_path / "m.h5")
    result = cli("cache", "merge", a, b, "--out", tmp_path / "m.h5")
    assert_one_line_error(result, "sample 3", str(a), str(b))
    assert not (tmp_path / "m.h5").exists()


def test_refuses_other_data_classes_dataset(tmp_path):
    a = synthetic(tmp_path / "a.h5", ["1", "2", "3"])
    relabelled = synthetic(tmp_path / "b.h5", ["3", "4"], labels=[1, 1])  # 3 was label 0
    assert_one_line_error(
        cli("cache", "merge", a, relabelled, "--out", tmp_path / "m.h5"),
        "sample 3 differs between them (label)",
        "not extracted from the same data",
    )
    other_classes = synthetic(tmp_path / "c.h5", ["4"], classes=("neg", "pos", "x"))
    assert_one_line_error(
        cli("cache", "merge", a, other_classes, "--out", tmp_path / "m.h5"), "the classes differ"
    )
    cfg = {"encoder": "synthetic", "batch_size": 4, "limit": None}
    other = write_features(
        tmp_path / "d.h5",
        guid=["9"],
        split=["train"],
        label=[0],
        text=TokenFeatures(None, None, {"pooled": np.zeros((1, 4), np.float16)}),
        config=cfg,
        attrs={"dataset": "mvsa"},
    )
    assert_one_line_error(
        cli("cache", "merge", a, other, "--out", tmp_path / "m.h5"), "dataset differs", "mvsa"
    )


def test_refuses_incomplete_or_missing_inputs(tmp_path):
    a = synthetic(tmp_path / "a.h5", ["1", "2"])
    b = synthetic(tmp_path / "b.h5", ["3"])
    b.rename(temp_path(b))  # as a killed extract leaves it
    assert_one_line_error(
        cli("cache", "merge", a, b, "--out", tmp_path / "m.h5"), str(b), "not finished"
    )
    assert_one_line_error(
        cli("cache", "merge", a, tmp_path / "nope.h5", "--out", tmp_path / "m.h5"), "no cache at"
    )
    assert_one_line_error(cli("cache", "merge", a, "--out", tmp_path / "m.h5"), "at least two")
    assert_one_line_error(cli("cache", "merge", a, a, "--out", tmp_path / "m.h5"), "twice")
    assert_one_line_error(cli("cache", "merge", a, tmp_path / "b.h5.tmp", "--out", a), "inputs")


def test_limits_merge_to_the_longest_prefix(tmp_path):
    cfg = {"encoder": "synthetic", "batch_size": 4}
    a = synthetic(tmp_path / "a.h5", ["1", "2"], config=cfg | {"limit": 2})
    b = synthetic(tmp_path / "b.h5", ["1", "2", "3"], config=cfg | {"limit": 3})
    m = FeatureStore.open(merge_caches([a, b], tmp_path / "m.h5").path)
    assert m.config["limit"] == 3
    assert m.attrs["fingerprint"] == fingerprint(m.config, m.manifest)
    assert m.attrs["fingerprint"] == FeatureStore.open(b).attrs["fingerprint"]


def test_merge_sources_unions_files_guids_and_lines():
    a = {
        "version": 1,
        "root": "/d",
        "files": {
            "data/1.txt": {"size": 1, "guids": ["1"]},
            "train.txt": {"lines": [["1", 2, "s1"]], "other_lines": ["h", "s2", "s3"]},
        },
    }
    b = {
        "version": 1,
        "root": "/d",
        "files": {
            "data/2.txt": {"size": 2, "guids": ["2"]},
            "train.txt": {"lines": [["2", 3, "s2"]], "other_lines": ["h", "s1", "s3"]},
        },
    }
    c = {"version": 1, "root": "/elsewhere", "files": {"data/3.txt": {"guids": ["3"]}}}
    m = merge_sources([a, None, b, c])
    assert m["root"] == "/d"
    assert m["files"]["train.txt"]["lines"] == [["1", 2, "s1"], ["2", 3, "s2"]]
    assert m["files"]["train.txt"]["other_lines"] == ["h", "s3"]  # lines no sample came from
    assert m["files"]["data/2.txt"]["guids"] == ["2"]
    assert m["files"]["/elsewhere/data/3.txt"]["guids"] == ["3"]
    assert merge_sources([None, None]) is None
