"""The cache under damage and faults (issue 6, cache side): damage is found on read, never used
as features; the writer's lock dies with its owner and leaves no file behind; a damaged
journal never blocks a rerun; a disk-full write loses no finished batch; a cache missing
parts is refused in one line; `cache verify` checks every array; and stage two can tell
when the data changed since extraction (cache/sources.py)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fusebench.cache.integrity as integrity
import h5py
import numpy as np
import pytest
from fusebench.cache import (
    CacheError,
    CacheLockedError,
    CacheWriteError,
    DamagedCacheError,
    FeatureStore,
    IncompleteCacheError,
    StaleCacheError,
    TokenFeatures,
    check_fresh,
    ensure_fresh,
    exclusive_lock,
    parts_dir,
    record_sources,
    temp_path,
    write_features,
)
from fusebench.cache.journal import Journal
from fusebench.extract.loop import cache_path

from tests.conftest import REPO, cli, make_lab5
from tests.conftest import one_line_error as one_error_line


def synthetic(
    path: Path, n: int = 40, length: int = 64, dim: int = 512, seed: int = 0, **kw
) -> Path:
    """A small text+image cache (40 rows; text token rows of 64 KiB)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((n, length), dtype=bool)
    for i in range(n):
        mask[i, : 1 + i % length] = True
    text = TokenFeatures(
        tokens=(rng.standard_normal((n, length, dim)) * mask[..., None]).astype(np.float16),
        mask=mask,
        pooled={"pooled": rng.standard_normal((n, 16)).astype(np.float16)},
        pooling={"pooled": "cls"},
    )
    image = TokenFeatures(
        tokens=rng.standard_normal((n, 5, dim)).astype(np.float16),
        mask=None,
        pooled={"pooled": rng.standard_normal((n, 16)).astype(np.float16)},
        pooling={"pooled": "cls"},
    )
    return write_features(
        path,
        guid=[f"g{i}" for i in range(n)],
        split=["train"] * n,
        label=[i % 3 for i in range(n)],
        text=text,
        image=image,
        **kw,
    )


def arrays(store: FeatureStore) -> dict[str, np.ndarray]:
    out = {"guid": store.guid, "split": store.split, "label": store.label, "status": store.status}
    for m in ("text", "image"):
        feats = getattr(store, m)
        out |= {f"{m}/{k}": v for k, v in feats.pooled.items()}
        out[f"{m}/tokens"] = feats.tokens
        if feats.mask is not None:
            out[f"{m}/mask"] = feats.mask
    return out


def chunk_offsets(path: Path, name: str) -> list[tuple[int, int]]:
    """(file offset, stored size) of every chunk of one dataset."""
    with h5py.File(path, "r") as f:
        found: list[tuple[int, int]] = []
        f[name].id.chunk_iter(lambda s: found.append((s.byte_offset, s.size)))
    return found


def flip(path: Path, offset: int, n: int = 8) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = bytearray(fh.read(n))
        fh.seek(offset)
        fh.write(bytes(b ^ 0x5A for b in data))


# ---------------------------------------------------------------- 4. damage found on read


def test_cache_datasets_are_row_chunked_with_fletcher32_and_digests(tmp_path):
    path = synthetic(tmp_path / "c.h5")
    with h5py.File(path, "r") as f:
        names: list[str] = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        digests = json.loads(f.attrs["digests"])
        assert set(digests) == {*names, "@attrs"}  # every array, and the attributes
        for name in names:
            ds = f[name]
            if ds.dtype.kind == "O":
                continue  # strings cannot carry filters: their digests cover them
            assert ds.fletcher32, name
            if name == "text/tokens":  # padded: one row's tokens in slabs (issue 10 item 6)
                assert ds.chunks == (1, integrity.TOKEN_CHUNK, *ds.shape[2:]), ds.chunks
                continue
            assert ds.chunks[1:] == ds.shape[1:], f"{name} is not row-chunked: {ds.chunks}"
            row = int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
            if ds.ndim == 3:  # token rows: one per chunk (text rows arrive out of order)
                assert ds.chunks[0] == 1, name
            else:  # per-row vectors: about 1 MiB of rows
                assert ds.chunks[0] == min(ds.shape[0], max(1, (1 << 20) // row)), name


@pytest.mark.parametrize("reader", ["fast", "hdf5"])
@pytest.mark.parametrize("name", ["text/tokens", "image/tokens", "text/pooled", "label"])
def test_flipped_bytes_in_a_chunk_are_refused_on_read(tmp_path, monkeypatch, reader, name):
    if reader == "hdf5":  # the path used where HDF5's checksum function is not found
        monkeypatch.setattr(integrity, "_fletcher32", lambda: None)
    path = synthetic(tmp_path / "lab" / "c.h5")
    offset, size = chunk_offsets(path, name)[-1]
    flip(path, offset + size // 2)
    with pytest.raises(DamagedCacheError) as e:
        FeatureStore.open(path)
    msg = str(e.value)
    assert str(path) in msg and name in msg and "extract it again" in msg and "\n" not in msg


def test_bytes_flipped_anywhere_are_refused_or_change_nothing(tmp_path):
    """Never silently wrong: wherever bytes flip (data, metadata, heap), the file is refused in
    one CacheError line, or it reads back exactly as written (the flip hit unused space)."""
    clean = synthetic(tmp_path / "clean.h5")
    want = arrays(FeatureStore.open(clean))
    size = clean.stat().st_size
    refused = 0
    for k, offset in enumerate(range(0, size - 8, size // 41)):
        damaged = tmp_path / f"d{k}.h5"
        damaged.write_bytes(clean.read_bytes())
        flip(damaged, offset)
        try:
            got = arrays(FeatureStore.open(damaged))
        except CacheError as e:
            assert "\n" not in str(e) and str(damaged) in str(e)
            refused += 1
            continue
        for key, value in want.items():
            assert np.array_equal(got[key], value), f"flip at {offset} silently changed {key}"
    assert refused >= 20  # most of the file is data: most flips must be caught


def test_every_region_of_a_small_cache_when_damaged_is_refused_or_harmless(tmp_path):
    """A dense sweep over a whole small file: superblock, object headers, attributes (classes,
    pooling, config), the string heap (guid, split, error log, sources), chunk index, data.
    Every flip is refused in one CacheError line, or changes nothing a reader gets."""
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((4, 6, 8)).astype(np.float16)
    text = TokenFeatures(tokens, np.ones((4, 6), bool), {"pooled": tokens[:, 0]}, {"pooled": "cls"})
    clean = write_features(
        tmp_path / "c.h5",
        guid=["a", "b", "c", "d"],
        split=["train", "train", "test", "test"],
        label=[0, 1, 2, -1],
        text=text,
        errors=[("c", "image", "truncated")],
        sources={"root": "/data", "files": {"data/a.txt": {"size": 3, "guids": ["a"]}}},
    )
    raw = clean.read_bytes()

    def seen(s: FeatureStore) -> list:
        attrs = {k: v for k, v in s.attrs.items() if k != "digests"}  # only verify reads all
        return [
            s.guid.tolist(),
            s.split.tolist(),
            s.label.tolist(),
            s.status.tolist(),
            s.text.tokens.tolist(),
            s.text.mask.tolist(),
            s.text.pooled["pooled"].tolist(),
            s.text.pooling,
            s.classes,
            s.errors,
            s.sources,
            s.manifest,
            s.config,
            attrs,
        ]

    want = seen(FeatureStore.open(clean))
    damaged, refused = tmp_path / "d.h5", 0
    for offset in range(0, len(raw) - 8, 24):
        damaged.write_bytes(
            raw[:offset] + bytes(b ^ 0x5A for b in raw[offset : offset + 8]) + raw[offset + 8 :]
        )
        try:
            got = seen(FeatureStore.open(damaged))
        except CacheError as e:
            assert "\n" not in str(e) and str(damaged) in str(e)
            refused += 1
            continue
        assert got == want, f"a flip at byte {offset} silently changed what a reader gets"
    assert refused > len(raw) // 24 // 2


def test_fast_bulk_read_equals_hdf5_read(tmp_path, monkeypatch):
    path = synthetic(tmp_path / "c.h5", n=37)
    assert integrity._fletcher32() is not None, "HDF5's fletcher32 not found: fast path untested"
    fast = arrays(FeatureStore.open(path))
    monkeypatch.setattr(integrity, "_fletcher32", lambda: None)
    slow = arrays(FeatureStore.open(path))
    for key in slow:
        assert np.array_equal(fast[key], slow[key]), key


@pytest.mark.parametrize("edit", ["pooled-row", "label", "guid", "status", "mask"])
def test_an_array_edited_with_h5py_is_refused_on_open(tmp_path, edit):
    """h5py rewrites the fletcher32 checksum of what it writes; the digests still catch it."""
    path = synthetic(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        if edit == "pooled-row":
            f["image/pooled"][3] = f["image/pooled"][3] + np.float16(1)
        elif edit == "label":
            f["label"][5] = (f["label"][5] + 1) % 3
        elif edit == "guid":
            f["guid"][2] = "someone-else"
        elif edit == "status":
            f["status"][7] = 2
        else:
            f["text/mask"][4, -1] = True
    with pytest.raises(DamagedCacheError, match="damaged") as e:
        FeatureStore.open(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_an_edited_label_is_refused_even_without_digests(tmp_path):
    """Caches written before digests existed: the per-row arrays are still checked against
    the manifest the fingerprint covers."""
    path = synthetic(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        del f.attrs["digests"]
        f["label"][5] = (f["label"][5] + 1) % 3
    with pytest.raises(DamagedCacheError, match=r"row 5 has label"):
        FeatureStore.open(path)


@pytest.fixture(scope="module")
def bert_cache(tiny_models, tmp_path_factory):
    """A real extracted cache (records its dataset and model, so `cache verify` can run)."""
    root = tmp_path_factory.mktemp("verify")
    data = make_lab5(root / "lab5-mini")
    result = cli(
        "extract",
        "--encoder",
        "bert",
        "--model",
        tiny_models["bert"],
        "--data",
        data,
        "--out",
        root / "features",
        "--quiet",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    return cache_path(root / "features", "lab5-mini", "bert")


def test_cache_verify_checks_every_array_not_only_the_recomputed_rows(bert_cache, tmp_path):
    copy = tmp_path / "features" / "lab5-mini" / "bert.h5"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(bert_cache.read_bytes())
    result = cli("cache", "verify", copy, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "all" in result.stdout and "digests" in result.stdout
    assert "guid, split and label of all 30 rows match the dataset" in result.stdout

    with h5py.File(copy, "r+") as f:  # row 5: not among the 4 rows verify recomputes
        f["text/tokens"][5, 0, :4] = f["text/tokens"][5, 0, :4] + np.float16(0.5)
    FeatureStore.open(copy)  # tokens are left to verify (fletcher32 passes: h5py rewrote it)
    line = one_error_line(cli("cache", "verify", copy, "--device", "cpu"))
    assert "text/tokens" in line and str(copy) in line


def test_rows_written_out_of_order_and_short_read_back_exactly(tmp_path):
    """Text batches arrive sorted by length: scattered rows, each batch padded to its own
    longest. The file holds each row zero-padded to L, in dataset order."""
    from fusebench.cache import CacheWriter, read_rows

    n, length, dim = 23, 9, 6
    rng = np.random.default_rng(1)
    want = np.zeros((n, length, dim), np.float16)
    w = CacheWriter(
        tmp_path / "c.h5",
        guid=[str(i) for i in range(n)],
        split=["train"] * n,
        label=[0] * n,
        classes=["a"],
        manifest=[],
        config={"encoder": "x"},
        attrs={},
    )
    w.create_modality("text", tokens=(length, dim), mask=True, pooled={"pooled": (dim, "cls")})
    order = rng.permutation(n)
    for batch in np.array_split(order, 5):
        width = int(rng.integers(1, length + 1))
        tokens = rng.standard_normal((len(batch), width, dim)).astype(np.float16)
        want[batch, :width] = tokens
        w.write(
            "text",
            batch,
            TokenFeatures(tokens, np.ones((len(batch), width), bool), {"pooled": tokens[:, 0]}),
        )
    w.set_status(np.ones(n, np.uint8))
    path = w.finish()
    store = FeatureStore.open(path)
    assert np.array_equal(store.text.tokens, want)
    assert np.array_equal(store.text.pooled["pooled"], want[:, 0])
    with h5py.File(path, "r") as f:
        rows = [3, 4, 5, 9, 0, 22, 21]
        assert np.array_equal(read_rows(f["text/tokens"], rows), want[rows])


# ---------------------------------------------------------------- 9. missing parts


@pytest.mark.parametrize(
    "part",
    [
        "image/pooled",
        "text/pooled",
        "status",
        "guid",
        "label",
        "manifest",
        "errors/guid",
        "attr:label.classes",
        "attr:fingerprint",
        "attr:config",
    ],
)
def test_a_cache_missing_a_part_is_refused_in_one_line(tmp_path, part):
    path = synthetic(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        if part == "attr:label.classes":
            del f["label"].attrs["classes"]
        elif part.startswith("attr:"):
            del f.attrs[part[5:]]
        else:
            del f[part]
    shown = part.removeprefix("attr:")
    with pytest.raises(CacheError) as e:
        FeatureStore.open(path)
    assert str(path) in str(e.value) and shown in str(e.value) and "\n" not in str(e.value)
    result = cli("cache", "info", path)  # info still describes it, naming the problem
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "PROBLEM" in result.stdout and shown in result.stdout


def test_complete_attribute_that_is_a_string_is_not_trusted(tmp_path):
    path = synthetic(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = "false"
    with pytest.raises(IncompleteCacheError):
        FeatureStore.open(path)


def test_damaged_digests_attribute_is_refused(tmp_path):
    path = synthetic(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["digests"] = "{not json"
    with pytest.raises(DamagedCacheError, match="digests"):
        FeatureStore.open(path)


def test_zero_row_cache_round_trips(tmp_path):
    empty = TokenFeatures(
        np.zeros((0, 4, 8), np.float16),
        np.zeros((0, 4), bool),
        {"pooled": np.zeros((0, 8), np.float16)},
    )
    path = write_features(tmp_path / "z.h5", guid=[], split=[], label=[], text=empty)
    store = FeatureStore.open(path)
    assert len(store) == 0 and store.text.tokens.shape == (0, 4, 8)


@pytest.mark.parametrize("kind", ["not-hdf5", "empty", "truncated", "folder", "dangling-link"])
def test_cache_info_and_verify_give_one_line_for_unreadable_paths(tmp_path, kind):
    path = tmp_path / "c.h5"
    if kind == "not-hdf5":
        path.write_text("guid,tag\n1,positive\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        full = synthetic(tmp_path / "full.h5").read_bytes()
        path.write_bytes(full[: len(full) // 2])
    elif kind == "folder":
        path = tmp_path / "features"
        synthetic(path / "bert.h5")
    else:
        path.symlink_to(tmp_path / "gone.h5")
    for command in (["cache", "info", path], ["cache", "verify", path, "--device", "cpu"]):
        line = one_error_line(cli(*command))
        assert str(path) in line
        if kind == "dangling-link":
            assert "gone.h5" in line
        if kind == "folder":
            assert "folder" in line and "bert.h5" in line


def test_cache_info_gives_one_line_for_a_file_it_may_not_read(tmp_path, monkeypatch):
    """(root reads every file, so the permission error is injected where h5py opens it)"""
    path = synthetic(tmp_path / "c.h5")

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("fusebench.cache.reader.h5py.File", denied)
    line = one_error_line(cli("cache", "info", path))
    assert "permission" in line.lower() and str(path) in line


# ---------------------------------------------------------------- 6 and 12. the lock


def test_lock_file_is_removed_when_released_even_after_a_failure(tmp_path):
    final = tmp_path / "features" / "ds" / "bert.h5"
    lock = final.with_name("bert.h5.lock")
    with exclusive_lock(final):
        assert lock.exists()
    assert not lock.exists()
    with pytest.raises(RuntimeError), exclusive_lock(final):
        raise RuntimeError("the run failed")
    assert not lock.exists()


def test_failed_extract_leaves_no_lock_file(tmp_path, tiny_models):
    data = make_lab5(tmp_path / "lab5-mini", n_train=6, n_test=2)
    (data / "data" / "101.txt").unlink()  # a bad sample: --on-error fail stops the run
    out = tmp_path / "features"
    one_error_line(
        cli(
            "extract",
            "--encoder",
            "bert",
            "--model",
            tiny_models["bert"],
            "--data",
            data,
            "--out",
            out,
            "--on-error",
            "fail",
            "--quiet",
        )
    )
    assert not list(out.rglob("*.lock"))


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    final = tmp_path / "c.h5"
    with exclusive_lock(final):
        with pytest.raises(CacheLockedError, match="this process"), exclusive_lock(final):
            pass
        assert final.with_name("c.h5.lock").exists()  # the refused attempt did not drop it
    with exclusive_lock(final):  # released: free again
        pass


HOLD = """
import sys, time
from fusebench.cache import exclusive_lock
with exclusive_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(final: Path) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(final)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_of_another_process_refuses_naming_it_and_dies_with_it(tmp_path):
    final = tmp_path / "c.h5"
    holder = _holder(final)
    try:
        with pytest.raises(CacheLockedError, match=rf"pid {holder.pid}\b"), exclusive_lock(final):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive_lock(final):  # at once: the kernel dropped it with its owner
        pass


def test_lock_removal_race_never_gives_two_holders(tmp_path, monkeypatch):
    """A writer opens the lock file just before its holder removes it, then gets the lock on
    that removed file: it must notice and lock the file the path names now."""
    final = tmp_path / "c.h5"
    lock = final.with_name("c.h5.lock")
    real_open, raced = os.open, []

    def racing_open(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if Path(path) == lock and not raced:
            raced.append(fd)
            os.unlink(path)  # the previous holder releases right after our open
        return fd

    monkeypatch.setattr(os, "open", racing_open)
    with exclusive_lock(final):
        monkeypatch.setattr(os, "open", real_open)
        assert raced and lock.exists()
        probe = subprocess.run(
            [sys.executable, "-c", HOLD, str(final)],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=60,
        )
        assert probe.returncode != 0 and "being written" in probe.stderr, probe.stdout


SLOW_IMAGES = """
import sys, time
import fusebench.extract.encoders as e
for cls in (e.ImageEncoder, e.ClipEncoder):
    orig = cls.encode_image
    def slow(self, *a, _orig=orig, **k):
        time.sleep(0.3)
        return _orig(self, *a, **k)
    cls.encode_image = slow
import fusebench.cli as cli
sys.argv = ["cli.py", *sys.argv[1:]]
cli.main()
"""


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_rerun_right_after_sigkill_is_not_locked_out_by_image_workers(tmp_path, tiny_models):
    data = make_lab5(tmp_path / "lab5-kill", n_train=40, n_test=8)
    out = tmp_path / "features"
    args = [
        "extract",
        "--encoder",
        "vit",
        "--model",
        str(tiny_models["vit"]),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--workers",
        "2",
        "--quiet",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    final = cache_path(out, "lab5-kill", "vit")
    victim = subprocess.Popen(
        [sys.executable, "-c", SLOW_IMAGES, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 90
    while not list(parts_dir(final).glob("image-*.npz")) and time.monotonic() < deadline:
        assert victim.poll() is None, victim.stderr.read()
        time.sleep(0.02)
    workers = _children(victim.pid)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    alive = [w for w in workers if Path(f"/proc/{w}").exists()]
    rerun = subprocess.run(
        [sys.executable, "cli.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert rerun.returncode == 0, f"workers alive at rerun: {alive}\n{rerun.stderr}"
    assert "being written" not in rerun.stderr
    store = FeatureStore.open(final)
    assert store.ok().all() and len(store) == 48
    assert not final.with_name("vit.h5.lock").exists()


# ---------------------------------------------------------------- 8. damaged journal


def _feats(rows: list[int]) -> TokenFeatures:
    n = len(rows)
    return TokenFeatures(
        np.full((n, 3, 4), 1, np.float16),
        None,
        {"pooled": np.full((n, 4), 2, np.float16)},
        {"pooled": "cls"},
    )


PLAN = {"text_batches": [], "image_batches": [[0, 1], [2, 3], [4, 5]], "text_ids": {}}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong-rows", "missing-array"])
def test_a_damaged_journal_part_is_discarded_with_a_note(tmp_path, damage):
    folder = tmp_path / "c.h5.parts"
    j = Journal(folder, "fp")
    j.save_plan(PLAN)
    for b, rows in enumerate(PLAN["image_batches"]):
        j.save("image", b, np.asarray(rows), _feats(rows), [])
    part = folder / "image-000001.npz"
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    elif damage == "garbage":
        part.write_bytes(os.urandom(300))
    elif damage == "empty":
        part.write_bytes(b"")
    elif damage == "wrong-rows":
        j.save("image", 1, np.asarray([7, 8]), _feats([7, 8]), [])
    else:
        np.savez(part, rows=np.asarray([2, 3]))
    again = Journal(folder, "fp")
    assert again.done("image") == {0, 2}
    assert not part.exists()
    assert len(again.notes) == 1 and "image-000001.npz" in again.notes[0]


def test_a_part_damaged_after_it_was_accepted_fails_once_then_recomputes(tmp_path):
    folder = tmp_path / "c.h5.parts"
    j = Journal(folder, "fp")
    j.save_plan(PLAN)
    j.save("image", 0, np.asarray([0, 1]), _feats([0, 1]), [])
    assert j.done("image") == {0}
    part = folder / "image-000000.npz"
    part.write_bytes(part.read_bytes()[:40])
    with pytest.raises(CacheError, match="rerun the same command") as e:
        j.load("image", 0)
    assert "\n" not in str(e.value) and not part.exists()
    assert Journal(folder, "fp").done("image") == set()


@pytest.mark.parametrize("plan", ["{trunc", "[1, 2]", '{"fingerprint": "fp"}', ""])
def test_a_damaged_plan_discards_the_journal_with_a_note(tmp_path, plan):
    folder = tmp_path / "c.h5.parts"
    j = Journal(folder, "fp")
    j.save_plan(PLAN)
    j.save("image", 0, np.asarray([0, 1]), _feats([0, 1]), [])
    (folder / "plan.json").write_text(plan)
    again = Journal(folder, "fp")
    assert again.plan is None and again.done("image") == set()
    assert len(again.notes) == 1 and "plan.json" in again.notes[0]


def _bert_args(data: Path, out: Path, tiny_models) -> list[object]:
    return [
        "extract",
        "--encoder",
        "bert",
        "--model",
        tiny_models["bert"],
        "--data",
        data,
        "--out",
        out,
        "--batch-size",
        "4",
        "--quiet",
        "--device",
        "cpu",
    ]


class Stopped(Exception):
    """Stands in for a kill: the parts saved so far stay."""


def test_rerun_after_a_truncated_part_recomputes_it_and_matches(tmp_path, tiny_models, monkeypatch):
    data = make_lab5(tmp_path / "lab5-mini", n_train=14, n_test=2)
    assert cli(*_bert_args(data, tmp_path / "ref", tiny_models)).exit_code == 0
    out = tmp_path / "features"
    real, calls = Journal.save, []

    def save_then_stop(self, *a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise Stopped
        return real(self, *a, **k)

    monkeypatch.setattr(Journal, "save", save_then_stop)
    assert isinstance(cli(*_bert_args(data, out, tiny_models)).exception, Stopped)
    monkeypatch.undo()
    final = cache_path(out, "lab5-mini", "bert")
    parts = sorted(parts_dir(final).glob("text-*.npz"))
    assert len(parts) == 3
    parts[1].write_bytes(parts[1].read_bytes()[:100])  # a part cut short
    result = cli(*_bert_args(data, out, tiny_models))  # not a crash, now or forever
    assert result.exit_code == 0, result.output
    assert "reused 8 " in result.stdout  # the two whole parts; the damaged one recomputed
    a, b = (
        FeatureStore.open(final),
        FeatureStore.open(cache_path(tmp_path / "ref", "lab5-mini", "bert")),
    )
    assert np.array_equal(a.text.tokens, b.text.tokens)
    assert np.array_equal(a.text.pooled["pooled"], b.text.pooled["pooled"])


# ---------------------------------------------------------------- 7. disk full


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_journal_write_on_a_full_disk_leaves_no_partial_part(tmp_path, monkeypatch):
    folder = tmp_path / "c.h5.parts"
    j = Journal(folder, "fp")
    j.save_plan(PLAN)
    j.save("image", 0, np.asarray([0, 1]), _feats([0, 1]), [])

    def half_then_full(fh, **arrays):
        fh.write(b"PK\x03\x04 partial bytes")
        _enospc()

    monkeypatch.setattr("fusebench.cache.journal.np.savez", half_then_full)
    with pytest.raises(CacheWriteError) as e:
        j.save("image", 1, np.asarray([2, 3]), _feats([2, 3]), [])
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert "image-000001.npz" in str(e.value) and "No space left" in str(e.value)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in folder.iterdir()) == ["image-000000.npz", "plan.json"]
    monkeypatch.undo()
    assert Journal(folder, "fp").done("image") == {0}


def test_extract_on_a_full_disk_says_so_in_one_line_and_the_rerun_resumes(
    tmp_path, tiny_models, monkeypatch
):
    data = make_lab5(tmp_path / "lab5-mini", n_train=14, n_test=2)
    out = tmp_path / "features"
    real, calls = np.savez, []

    def fills_up(fh, **arrays):
        calls.append(1)
        if len(calls) > 2:
            _enospc()
        real(fh, **arrays)

    monkeypatch.setattr("fusebench.cache.journal.np.savez", fills_up)
    line = one_error_line(cli(*_bert_args(data, out, tiny_models)))
    assert "No space left" in line and str(out) in line
    final = cache_path(out, "lab5-mini", "bert")
    assert len(list(parts_dir(final).glob("text-*.npz"))) == 2
    assert not list(parts_dir(final).glob(".*.tmp"))
    monkeypatch.undo()
    result = cli(*_bert_args(data, out, tiny_models))
    assert result.exit_code == 0, result.output
    assert "reused 8 " in result.stdout  # two batches of 4 were kept
    assert FeatureStore.open(final).ok().all()


def test_cache_writer_on_a_full_disk_raises_one_line_and_leaves_no_tmp(tmp_path, monkeypatch):

    real = integrity.dataset_digest

    def fails(ds, path, **kw):  # the disk fills while the finished file is read back and flushed
        if ds.name == "/text/tokens":
            raise OSError(
                "Can't synchronously write data (file write failed: time = x, "
                "errno = 28, error message = 'No space left on device')"
            )
        return real(ds, path, **kw)

    monkeypatch.setattr("fusebench.cache.writer.dataset_digest", fails)
    path = tmp_path / "c.h5"
    with pytest.raises(CacheWriteError) as e:
        synthetic(path)
    assert e.value.errno == errno.ENOSPC and "No space left on device" in str(e.value)
    assert not path.exists() and not temp_path(path).exists()


# ---------------------------------------------------------------- hunt: crash leftovers


def test_stale_tmp_from_a_crash_does_not_block_a_new_write(tmp_path):
    path = tmp_path / "c.h5"
    temp_path(path).write_bytes(b"half a file from a killed run")
    with pytest.raises(IncompleteCacheError, match="rerun the same extract command"):
        FeatureStore.open(path)
    synthetic(path)
    assert not temp_path(path).exists()
    assert len(FeatureStore.open(path)) == 40


def test_cache_info_on_a_tmp_being_written_gives_one_line(tmp_path):
    path = tmp_path / "c.h5"
    writing = h5py.File(temp_path(path), "w")  # another process's writer, mid-run
    try:
        writing.attrs["fusebench_format"] = 1
        writing.flush()
        probe = subprocess.run(
            [sys.executable, "cli.py", "cache", "info", str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        writing.close()
    assert "Traceback" not in probe.stderr
    if probe.returncode != 0:  # HDF5 file locking on: refused in one line
        assert len(probe.stderr.strip().splitlines()) == 1 and "writ" in probe.stderr
    else:
        assert "complete" in probe.stdout and "False" in probe.stdout


# ---------------------------------------------------------------- I2: sources and staleness


def _dataset(root: Path, n: int = 6) -> tuple[Path, list]:
    (root / "data").mkdir(parents=True)
    lines = ["guid,tag"]
    rows = []
    for i in range(n):
        g = str(100 + i)
        (root / "data" / f"{g}.txt").write_text(f"text {i}\n")
        (root / "data" / f"{g}.jpg").write_bytes(bytes([i]) * 50)
        lines.append(f"{g},{['negative', 'positive'][i % 2]}")
        rows.append(
            (
                g,
                [root / "data" / f"{g}.txt", root / "data" / f"{g}.jpg"],
                (root / "train.txt", i + 2),
            )
        )
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root, rows


def _stored(tmp_path: Path, sources: dict) -> FeatureStore:
    pooled = {"pooled": np.zeros((6, 4), np.float16)}
    path = write_features(
        tmp_path / "features" / "ds" / "bert.h5",
        guid=[str(100 + i) for i in range(6)],
        split=["train"] * 6,
        label=[i % 2 for i in range(6)],
        classes=("negative", "positive"),
        text=TokenFeatures(None, None, pooled),
        sources=sources,
        attrs={"encoder": "bert", "data_path": sources["root"]},
    )
    return FeatureStore.open(path)


def test_sources_are_stored_and_fresh_data_passes(tmp_path):
    root, rows = _dataset(tmp_path / "ds")
    sources = record_sources(root, rows)
    store = _stored(tmp_path, sources)
    assert store.sources == sources
    assert sources["files"]["data/103.txt"]["guids"] == ["103"]
    assert [r[0] for r in sources["files"]["train.txt"]["lines"]] == [r[0] for r in rows]
    assert check_fresh(store) == []
    ensure_fresh(store)
    os.utime(root / "data" / "101.jpg")  # touched, same bytes: still fresh
    (root / "data" / "102.txt").write_text("text 2\n")  # rewritten with the same content
    assert check_fresh(store) == []


def test_changed_text_label_and_deleted_image_name_their_samples(tmp_path):
    root, rows = _dataset(tmp_path / "ds")
    store = _stored(tmp_path, record_sources(root, rows))
    (root / "data" / "101.txt").write_text("an edited text\n")
    (root / "data" / "104.jpg").unlink()
    train = (root / "train.txt").read_text().replace("103,positive", "103,negative")
    (root / "train.txt").write_text(train + "106,positive\n")
    changes = check_fresh(store)
    assert "101: data/101.txt changed" in changes
    assert "104: data/104.jpg was removed" in changes
    assert "103: its row in train.txt (line 5) was edited or removed" in changes
    assert "train.txt: 1 new row not in the cache (line 8)" in changes
    assert len(changes) == 4, changes
    with pytest.raises(StaleCacheError) as e:
        ensure_fresh(store)
    msg = str(e.value)
    assert "\n" not in msg and str(store.path) in msg and "101" in msg
    assert "fusebench extract --encoder bert" in msg and "--allow-stale" in msg
    assert e.value.changes == changes


def test_stale_line_names_a_few_samples_then_counts_the_rest(tmp_path):
    root, rows = _dataset(tmp_path / "ds")
    store = _stored(tmp_path, record_sources(root, rows))
    for i in range(6):
        (root / "data" / f"{100 + i}.txt").write_text(f"new text {i}\n")
    with pytest.raises(StaleCacheError, match=r"\(\+2 more\)"):
        ensure_fresh(store)


def test_unreachable_data_folder_cannot_be_checked_and_is_not_stale(tmp_path):
    root, rows = _dataset(tmp_path / "ds")
    store = _stored(tmp_path, record_sources(root, rows))
    root.rename(tmp_path / "moved")
    assert check_fresh(store) == []
    ensure_fresh(store)


def test_a_cache_without_sources_is_not_checked(tmp_path):
    path = synthetic(tmp_path / "c.h5")
    store = FeatureStore.open(path)
    assert store.sources is None and check_fresh(store) == []


def test_a_row_copied_verbatim_counts_as_a_new_row(tmp_path):
    root, rows = _dataset(tmp_path / "ds")
    store = _stored(tmp_path, record_sources(root, rows))
    with open(root / "train.txt", "a") as fh:
        fh.write("102,negative\n\n")  # a duplicate of row 102's line, and a blank line
    assert check_fresh(store) == ["train.txt: 1 new row not in the cache (line 8)"]


def test_rewrite_sources_records_a_header_edit_without_touching_features(tmp_path):
    """The header changed but no sample did (the fingerprint still matches): `extract` can
    re-record the files instead of leaving stage two refusing an up-to-date cache."""
    from fusebench.cache import rewrite_sources

    root, rows = _dataset(tmp_path / "ds")
    store = _stored(tmp_path, record_sources(root, rows))
    train = root / "train.txt"
    train.write_text(train.read_text().replace("guid,tag", "guid,tag "))
    assert check_fresh(store) == []  # whitespace around a line is not a change
    train.write_text(train.read_text().replace("guid,tag", "GUID,TAG"))
    assert check_fresh(store) == ["train.txt: 1 new row not in the cache (line 1)"]
    rewrite_sources(store.path, record_sources(root, rows))
    again = FeatureStore.open(store.path)  # digests still hold
    assert check_fresh(again) == [] and again.sources != store.sources
    assert np.array_equal(again.text.pooled["pooled"], store.text.pooled["pooled"])
    assert again.attrs["fingerprint"] == store.attrs["fingerprint"]


def test_sources_of_a_real_lab5_dataset_name_an_edited_label(tmp_path):
    """Through the dataset reader's own paths and line numbers (Sample.text_path, image_path,
    index_line), as `extract` records them."""
    from fusebench.extract.datasets import load_dataset

    data = make_lab5(tmp_path / "lab5-mini", n_train=6, n_test=2)
    ds = load_dataset(data)
    rows = [
        (s.guid, [p for p in (s.text_path, s.image_path) if p is not None], s.index_line)
        for s in ds.samples
    ]
    store = _stored(tmp_path, record_sources(data, rows[:6]))
    assert check_fresh(store) == []
    train = data / "train.txt"
    train.write_text(train.read_text().replace("103,negative", "103,positive"))
    assert check_fresh(store) == ["103: its row in train.txt (line 5) was edited or removed"]


def test_a_cache_in_the_earlier_layout_still_opens(tmp_path):
    """Contiguous datasets, no digests, no sources (what fusebench wrote before): readable,
    with the per-row arrays still checked against the manifest."""
    from fusebench.cache import fingerprint

    n, config = 5, {"encoder": "synthetic"}
    manifest = [{"guid": str(i), "split": "train", "label": i % 2} for i in range(n)]
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(
            fusebench_format=1,
            complete=True,
            config=json.dumps(config),
            fingerprint=fingerprint(config, manifest),
            encoder="synthetic",
        )
        f["guid"] = np.array([m["guid"] for m in manifest], dtype=object).astype("S")
        f["split"] = np.array(["train"] * n, dtype="S")
        f["label"] = np.array([m["label"] for m in manifest], dtype=np.int8)
        f["label"].attrs["classes"] = ["negative", "positive"]
        f["status"] = np.ones(n, np.uint8)
        f["manifest"] = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
        f["text/pooled"] = np.arange(n * 3, dtype=np.float16).reshape(n, 3)
    store = FeatureStore.open(path)
    assert store.guid.tolist() == ["0", "1", "2", "3", "4"] and store.sources is None
    assert np.array_equal(store.text.pooled["pooled"], np.arange(15).reshape(5, 3))
    assert "no digests" in cli("cache", "info", path).stdout
