"""Stage two over a memory budget: token arrays streamed from the cache in row blocks give the
same batches and the same fits as in RAM; block-aware order reads each block once a pass; a
damaged chunk is one line; features kept on a device are gathered as on the host."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fusebench.cache import DamagedCacheError, lazy
from fusebench.cache.lazy import BlockCache, LazyRows
from fusebench.cache.lazy import read_rows as lazy_read
from fusebench.fuse import StratifiedProtocol, build_head, load_feature_set
from fusebench.fuse.features import Modality
from fusebench.fuse.grid import Cell, load_bank
from fusebench.fuse.streaming import fits_on_device, parse_size, plan_streaming, resident
from fusebench.fuse.trainer import BUFFER_BLOCKS, batches, gather, row_blocks

from tests.conftest import cli

sys.path.insert(0, str(Path(__file__).parent))
from test_fuse import synthetic, write  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
BOTH = ("text", "image")
TINY = 64 << 10  # a budget every token array of the fixture is over


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """300 rows, text tokens (40 x 16, padded) and image tokens (30 x 24): rows of 1-2 KB, so
    blocks hold MAX_BLOCK_ROWS = 128 rows and the set spans 3 blocks."""
    root = tmp_path_factory.mktemp("stream")
    write(root / "syn.h5", synthetic(n_train=280, n_test=20, lt=40, li=30, signal=0.8))
    return root


def load(root: Path, budget=None):
    return load_feature_set(root, text="syn", image="syn", tokens=True, memory_budget=budget)


# ---------------------------------------------------------------- the budget


def test_budget_sizes_parse_and_bad_ones_name_the_flag():
    assert parse_size("1GB") == parse_size("1G") == parse_size("1GiB") == 1 << 30
    assert parse_size("512MB") == 512 << 20
    assert parse_size("1.5g") == 3 << 29
    assert parse_size("4096") == 4096
    for bad in ("lots", "-1GB", "0", "1XB"):
        with pytest.raises(ValueError, match="--memory-budget must be"):
            parse_size(bad)


def test_only_arrays_over_the_budget_stream_largest_first():
    arrays = {("vit", "image"): 600, ("minilm", "text"): 300}
    assert plan_streaming(arrays, budget=1000) == (set(), 0)  # fits: nothing streams
    streamed, cache = plan_streaming(arrays, budget=800)
    assert streamed == {("vit", "image")}  # the rest (300) fits half the budget
    assert cache == (800 - 300) // 2
    streamed, _ = plan_streaming(arrays, budget=400)
    assert streamed == set(arrays)


def test_pooled_heads_never_stream(cache_dir):
    fs = load_feature_set(cache_dir, text="syn", image="syn", memory_budget=1)
    assert not fs.text.streamed and not fs.image.streamed
    assert fs.image.feats.tokens is None


# ---------------------------------------------------------------- lazy arrays


def test_lazy_rows_index_like_the_array_within_the_cache_budget(cache_dir):
    ram = load(cache_dir)
    with h5py.File(cache_dir / "syn.h5") as f:
        cache = BlockCache(capacity=2 * 128 * 30 * 24 * 2)  # two image blocks
        lazy = LazyRows.of(f["image/tokens"], cache_dir / "syn.h5", cache)
    full = ram.image.feats.tokens
    assert lazy.shape == full.shape and lazy.dtype == full.dtype and len(lazy) == len(full)
    rng = np.random.default_rng(0)
    for idx in (rng.permutation(len(full))[:70], np.arange(100, 260), np.array([5, 5, -1])):
        assert np.array_equal(lazy[idx], full[idx])
        assert np.array_equal(lazy[idx, :7], full[idx, :7])
        assert cache.nbytes <= cache.capacity
    assert np.array_equal(lazy[10:290:3], full[10:290:3])
    assert np.array_equal(lazy[3], full[3])
    with pytest.raises(IndexError):
        lazy[np.array([len(full)])]


def test_streamed_batches_equal_in_ram_batches(cache_dir):
    ram, st = load(cache_dir), load(cache_dir, TINY)
    assert st.text.streamed and st.image.streamed and not ram.image.streamed
    rows = np.random.default_rng(1).permutation(len(st))[:50]
    a = gather(ram, rows, modalities=BOTH, tokens=True, device=CPU)
    b = gather(st, rows, modalities=BOTH, tokens=True, device=CPU)
    for key, value in a.items():
        assert (value is None) == (b[key] is None), key
        if value is not None:
            assert torch.equal(value, b[key]), key


def test_block_aware_order_reads_each_block_once_a_pass(cache_dir, monkeypatch):
    monkeypatch.setattr(lazy, "MAX_BLOCK_ROWS", 16)  # 19 blocks per array, cached ~8 of each
    st = load(cache_dir, TINY)
    blocks = row_blocks(st, BOTH, tokens=True)
    assert np.array_equal(blocks, row_blocks(load(cache_dir), BOTH, tokens=True))  # in RAM too
    n_blocks = len(np.unique(blocks))
    assert n_blocks == 19
    for lengths in (None, st.text.lengths()):
        order = batches(len(st), 32, np.random.default_rng(3), lengths, blocks)
        flat = np.concatenate(order)
        assert np.array_equal(np.sort(flat), np.arange(len(st)))  # every row once
        assert all(len(np.unique(blocks[b])) <= BUFFER_BLOCKS for b in order)
        assert not np.array_equal(flat, np.arange(len(st)))  # shuffled
    cache = st.image.feats.tokens.cache
    assert cache.capacity < 16 * st.image.feats.tokens.block_rows * st.image.feats.tokens.row_bytes
    row_reads = []
    monkeypatch.setattr(
        lazy, "read_rows", lambda ds, r, p: row_reads.append(len(r)) or lazy_read(ds, r, p)
    )
    for rng, order_blocks in ((np.random.default_rng(4), blocks), (np.random.default_rng(5), None)):
        cache._blocks.clear()
        cache.nbytes, cache.reads, row_reads[:] = 0, 0, []
        for rows in batches(len(st), 32, rng, None, order_blocks):
            gather(st, rows, modalities=BOTH, tokens=True, device=CPU)
        if order_blocks is not None:  # block-aware: every block of both arrays read once
            assert (cache.reads, len(row_reads)) == (2 * n_blocks, 0)
        else:  # a random order reads rows on their own, or blocks it needs 1/FEW_ROWS of
            assert len(row_reads) > 0
            read = cache.reads * 16 + sum(row_reads)
            assert read <= lazy.FEW_ROWS * 2 * len(st)


def test_streamed_and_in_ram_fits_agree(cache_dir):
    """A token head fitted on a streamed set and on the same set in RAM: training draws the
    same block-aware order either way, so the probabilities are identical (tolerance: exact);
    the memory budget never changes the numbers."""
    folds = StratifiedProtocol(val_ratio=0.2).splits(load(cache_dir))
    fold = folds[0]
    streamed = load(cache_dir, TINY)
    probas = []
    for fs in (load(cache_dir), streamed):
        head = build_head("cross_attn", seed=0, epochs=2, overrides={"dim": 16, "hidden": 16})
        head.fit(fs.take(fold.fit), fs.take(fold.inner_val))
        probas.append(head.predict_proba(fs.take(fold.scored)))
    assert np.array_equal(probas[0], probas[1])
    assert streamed.image.feats.tokens.cache.reads > 0  # the second fit did stream


def test_bank_streams_with_one_cache_for_every_file(cache_dir):
    cells = [Cell("syn", "syn", "cross_attn")]
    bank = load_bank(cache_dir, cells, allow_stale=False, memory_budget=TINY)
    text, image = bank.modalities[("text", "syn")], bank.modalities[("image", "syn")]
    assert text.streamed and image.streamed
    assert text.feats.tokens.cache is image.feats.tokens.cache  # one budget for the run
    assert not load_bank(cache_dir, cells, allow_stale=False).modalities[("image", "syn")].streamed


def test_a_damaged_token_chunk_is_one_line(cache_dir, tmp_path):
    path = tmp_path / "syn.h5"
    path.write_bytes((cache_dir / "syn.h5").read_bytes())
    with h5py.File(path) as f:
        info = f["image/tokens"].id.get_chunk_info_by_coord((200, 0, 0))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 40)
        fh.write(b"\xff" * 16)
    with h5py.File(path) as f:
        lazy = LazyRows.of(f["image/tokens"], path, BlockCache(1 << 20))
    assert lazy[np.arange(10)].shape[0] == 10  # undamaged blocks still read
    for rows in (np.arange(150, 260), np.array([200])):  # a whole block, and one row
        with pytest.raises(DamagedCacheError) as e:
            lazy[rows]
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        assert "image/tokens" in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(DamagedCacheError, match="image/tokens"):
        load(tmp_path, TINY)  # the finite-value check at load reads it too


# ---------------------------------------------------------------- device-resident features


def test_device_copy_is_made_only_when_it_fits():
    assert fits_on_device(100, free=200) and not fits_on_device(101, free=200)
    fs_like = synthetic(n_train=20, n_test=0)
    feats = fs_like["image"]
    held: dict = {}
    assert resident(held, feats, CPU, True) is None  # a CPU: nothing moves
    assert resident({}, feats, CPU, True, free=feats.tokens.nbytes) is None  # over half
    copy = resident(held := {}, feats, CPU, True, free=1 << 30)
    assert isinstance(copy.tokens, torch.Tensor) and copy.tokens.dtype == torch.float16
    assert resident(held, feats, CPU, False) is copy  # pooled heads reuse the token copy


def test_gather_from_device_copies_equals_gather_from_numpy(cache_dir, monkeypatch):
    host, dev = load(cache_dir), load(cache_dir)
    for m in BOTH:
        mod = dev.modality(m)
        assert resident(mod.held, mod.feats, CPU, True, free=1 << 34) is not None
    part = dev.take(np.arange(40, 240))  # a fold shares its set's copies
    rows = np.random.default_rng(2).permutation(len(part))[:33]
    want = gather(host.take(np.arange(40, 240)), rows, modalities=BOTH, tokens=True, device=CPU)

    def host_read(*_a, **_k):
        raise AssertionError("gather read the host arrays")

    monkeypatch.setattr(Modality, "tokens", host_read)
    monkeypatch.setattr(Modality, "pooled", host_read)
    got = gather(part, rows, modalities=BOTH, tokens=True, device=CPU)
    for key, value in want.items():
        assert (value is None) == (got[key] is None), key
        if value is not None:
            assert torch.equal(value, got[key]), key


# ---------------------------------------------------------------- the flag


def test_memory_budget_flag_is_checked_and_recorded(cache_dir):
    base = ["fuse", "--head", "cross_attn", "--features", str(cache_dir)]
    bad = cli(*base, "--text", "syn", "--image", "syn", "--memory-budget", "lots")
    assert bad.exit_code == 2 and "--memory-budget must be" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    shown = cli(
        *base, "--text", "syn", "--image", "syn", "--memory-budget", "1GB", "--print-config"
    )
    assert shown.exit_code == 0, shown.output
    assert "memory_budget: 1GB" in shown.output
