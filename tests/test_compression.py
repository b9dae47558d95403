"""Issue 10 item 6: bytes on disk ~ real tokens. Padded (text) token arrays are chunked by slabs
of one row's tokens, so all-padding slabs are never stored; lzf / gzip can be added. Every
layout reads back bit-exactly through the raw-chunk reader and through HDF5, damage is still
refused, and caches in the earlier layout (whole-row chunks) still open."""

from __future__ import annotations

from pathlib import Path

import fusebench.cache.integrity as integrity
import h5py
import numpy as np
import pytest
from fusebench.cache import CacheWriter, FeatureStore, TokenFeatures, read_rows, write_features
from fusebench.cache.format import DamagedCacheError

LENGTH, DIM = 64, 48


def padded_text(n: int, seed: int = 0, length: int = LENGTH) -> TokenFeatures:
    """Rows of 1..length real tokens, the rest exactly +0.0 (as the extractor writes them);
    real tokens include -0.0, which must not be taken for padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length // 3, size=n)
    lengths[0] = length  # one full row: the array is as wide as the longest
    mask = np.arange(length)[None, :] < lengths[:, None]
    tokens = rng.standard_normal((n, length, DIM)).astype(np.float16)
    tokens[~mask] = 0
    tokens[1, lengths[1] - 1] = np.float16(-0.0)  # a last real token that is all -0.0
    return TokenFeatures(
        tokens=tokens,
        mask=mask,
        pooled={"pooled": tokens[:, 0].copy()},
        pooling={"pooled": "cls"},
    )


def image_feats(n: int) -> TokenFeatures:
    rng = np.random.default_rng(1)
    return TokenFeatures(
        tokens=rng.standard_normal((n, 5, DIM)).astype(np.float16),
        mask=None,
        pooled={"pooled": rng.standard_normal((n, 8)).astype(np.float16)},
        pooling={"pooled": "cls"},
    )


def write(path: Path, text: TokenFeatures, **kw) -> Path:
    n = len(text.tokens)
    return write_features(
        path,
        guid=[f"g{i}" for i in range(n)],
        split=["train"] * n,
        label=[i % 3 for i in range(n)],
        text=text,
        image=image_feats(n),
        **kw,
    )


LAYOUTS = {
    "slabs": {},  # the default
    "slabs+lzf": {"compression": "lzf"},
    "lzf": {"compression": "lzf", "token_chunk": None},
    "gzip": {"compression": "gzip", "token_chunk": None},
    "earlier": {"compression": None, "token_chunk": None},  # before issue 10
}


def both_reads(path: Path, monkeypatch) -> tuple[FeatureStore, FeatureStore]:
    fast = FeatureStore.open(path)
    with monkeypatch.context() as m:
        m.setattr(integrity, "_read_chunks_raw", lambda ds, path: None)
        slow = FeatureStore.open(path)
    return fast, slow


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_round_trips_bit_exactly_on_both_read_paths(tmp_path, monkeypatch, layout):
    text = padded_text(30)
    path = write(tmp_path / "c.h5", text, **LAYOUTS[layout])
    with h5py.File(path, "r") as f:  # the raw-chunk reader takes it (not HDF5's fallback)
        assert integrity._read_chunks_raw(f["text/tokens"], path) is not None
    for store in both_reads(path, monkeypatch):
        got = store.text.tokens
        assert got.dtype == np.float16
        assert np.array_equal(got.view(np.uint16), text.tokens.view(np.uint16))  # -0.0 kept
        assert np.array_equal(store.text.mask, text.mask)
        assert np.array_equal(store.image.tokens, image_feats(30).tokens)
    with h5py.File(path, "r") as f:
        rows = [5, 6, 7, 0, 29, 2]
        assert np.array_equal(read_rows(f["text/tokens"], rows), text.tokens[rows])


def test_slabs_and_filters_apply_to_padded_token_arrays_only(tmp_path):
    path = write(tmp_path / "c.h5", padded_text(20), compression="lzf")
    with h5py.File(path, "r") as f:
        text, image = f["text/tokens"], f["image/tokens"]
        assert text.compression == "lzf" and text.fletcher32
        assert text.chunks == (1, 16, DIM)  # slabs of 16 tokens of one row
        assert image.compression is None and image.chunks == (1, 5, DIM)  # no padding
        assert f["text/pooled"].compression is None
    path = write(tmp_path / "d.h5", padded_text(20), compression="gzip", token_chunk=None)
    with h5py.File(path, "r") as f:
        assert f["text/tokens"].compression == "gzip"
        assert f["text/tokens"].compression_opts == integrity.GZIP_LEVEL
        assert f["text/tokens"].chunks == (1, LENGTH, DIM)


def test_defaults_are_slabs_without_a_compressor(tmp_path):
    path = write(tmp_path / "c.h5", padded_text(20))
    with h5py.File(path, "r") as f:
        ds = f["text/tokens"]
        assert ds.compression is None and ds.fletcher32
        assert ds.chunks == (1, integrity.TOKEN_CHUNK, DIM)


def test_all_padding_slabs_are_never_stored(tmp_path):
    text = padded_text(40)
    path = write(tmp_path / "c.h5", text)
    real_len = np.where(text.mask.any(axis=1), LENGTH - np.argmax(text.mask[:, ::-1], axis=1), 0)
    want = int(np.ceil(real_len / 16).sum())
    with h5py.File(path, "r") as f:
        assert f["text/tokens"].id.get_num_chunks() == want


@pytest.mark.parametrize("layout", ["slabs", "slabs+lzf", "lzf", "gzip"])
def test_padded_tokens_take_at_most_half_the_bytes(tmp_path, layout):
    text = padded_text(60, length=128)

    def stored(path: Path) -> int:
        with h5py.File(path, "r") as f:
            return f["text/tokens"].id.get_storage_size()

    earlier = stored(write(tmp_path / "a.h5", text, **LAYOUTS["earlier"]))
    now = stored(write(tmp_path / "b.h5", text, **LAYOUTS[layout]))
    assert now <= earlier / 2, (layout, now, earlier)


@pytest.mark.parametrize("reader", ["fast", "hdf5"])
@pytest.mark.parametrize("layout", ["slabs", "slabs+lzf", "lzf", "gzip"])
def test_flipped_bytes_in_a_stored_chunk_are_refused(tmp_path, monkeypatch, reader, layout):
    if reader == "hdf5":
        monkeypatch.setattr(integrity, "_read_chunks_raw", lambda ds, path: None)
    path = write(tmp_path / "lab" / "c.h5", padded_text(30), **LAYOUTS[layout])
    with h5py.File(path, "r") as f:
        found: list[tuple[int, int]] = []
        f["text/tokens"].id.chunk_iter(lambda s: found.append((s.byte_offset, s.size)))
    offset, size = max(found, key=lambda c: c[1])  # a chunk with real tokens in it
    with open(path, "r+b") as fh:
        fh.seek(offset + size // 3)
        data = bytearray(fh.read(8))
        fh.seek(offset + size // 3)
        fh.write(bytes(b ^ 0x5A for b in data))
    with pytest.raises(DamagedCacheError) as e:
        FeatureStore.open(path)
    msg = str(e.value)
    assert str(path) in msg and "text/tokens" in msg and "\n" not in msg


def test_a_decompressor_that_is_missing_leaves_the_read_to_hdf5(tmp_path, monkeypatch):
    text = padded_text(20)
    path = write(tmp_path / "c.h5", text, compression="lzf")
    monkeypatch.setattr(integrity, "_lzf_decompress", lambda: None)
    with h5py.File(path, "r") as f:
        assert integrity._read_chunks_raw(f["text/tokens"], path) is None
    assert np.array_equal(FeatureStore.open(path).text.tokens, text.tokens)


def test_a_chunk_lzf_left_uncompressed_reads_back(tmp_path, monkeypatch):
    """lzf gives up on incompressible chunks; HDF5 then stores them as they are."""
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((6, 16, DIM)).astype(np.float16)
    text = TokenFeatures(tokens=noise, mask=np.ones((6, 16), bool), pooled={"pooled": noise[:, 0]})
    path = write(tmp_path / "c.h5", text, compression="lzf")
    with h5py.File(path, "r") as f:
        masks: list[int] = []
        f["text/tokens"].id.chunk_iter(lambda s: masks.append(s.filter_mask))
        assert any(masks), "no chunk was left uncompressed: the case is not exercised"
        assert integrity._read_chunks_raw(f["text/tokens"], path) is not None
    for store in both_reads(path, monkeypatch):
        assert np.array_equal(store.text.tokens, noise)


@pytest.mark.parametrize("length", [9, 17, 77, 128])
def test_slabs_for_any_row_length_round_trip(tmp_path, monkeypatch, length):
    """Slabs tile the row when a divisor of its length fits (77 -> 11); otherwise (17, prime)
    the edge slab sticks out and HDF5 reads the array."""
    assert integrity.slab_tokens(length, 16) == {9: 9, 17: 16, 77: 11, 128: 16}[length]
    text = padded_text(12, length=length)
    path = write(tmp_path / "c.h5", text)
    for store in both_reads(path, monkeypatch):
        assert np.array_equal(store.text.tokens.view(np.uint16), text.tokens.view(np.uint16))


def test_rows_written_out_of_order_in_short_batches_read_back_exactly(tmp_path, monkeypatch):
    """As extract writes text: batches sorted by length, each padded to its own longest."""
    n, length = 25, 48
    rng = np.random.default_rng(5)
    want = np.zeros((n, length, DIM), np.float16)
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
    w.create_modality("text", tokens=(length, DIM), mask=True, pooled={"pooled": (DIM, "cls")})
    for batch in np.array_split(rng.permutation(n), 4):
        lens = rng.integers(0, length + 1, size=len(batch))
        width = max(1, int(lens.max()))
        mask = np.arange(width)[None, :] < lens[:, None]
        tokens = (rng.standard_normal((len(batch), width, DIM)) * mask[..., None]).astype(
            np.float16
        )
        tokens[~mask] = 0
        want[batch, :width] = tokens
        w.write("text", batch, TokenFeatures(tokens, mask, {"pooled": tokens[:, 0]}))
    w.set_status(np.ones(n, np.uint8))
    path = w.finish()
    for store in both_reads(path, monkeypatch):
        assert np.array_equal(store.text.tokens, want)


def test_create_dataset_refuses_an_unknown_compressor(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f, pytest.raises(ValueError, match="compression"):
        integrity.create_dataset(f, "x", shape=(2, 3, 4), dtype=np.float16, compression="zstd")
