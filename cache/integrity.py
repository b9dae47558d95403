"""Integrity of a cache file: damage is found when the file is read, not used as features.

Two layers, both written when the cache is assembled:
- every numeric dataset is row-chunked (whole rows per chunk, so stage two can stream
  chunk-aligned blocks; see `chunk_rows`) and carries HDF5's fletcher32 checksum per chunk: ANY
  read of a chunk, by fusebench or another HDF5 tool, fails on a chunk whose bytes changed;
- the root attribute `digests` holds the sha256 of every stored array (`dataset_digest`).

What is checked when (README "Cache guarantees"):
- `FeatureStore.open`: the fletcher32 checksum of every chunk it loads, and the digests of the
  small arrays (guid, split, label, status, pooled, mask, errors, sources) — cheap;
- `cache verify`: the digests of every array, token arrays included.
String datasets (guid, split, the error log) cannot carry HDF5 filters; their digests cover them.

Padded token arrays (text: rows zero-padded to the longest) are chunked by slabs of
`TOKEN_CHUNK` tokens of one row (`token_chunk`): a slab that is all padding is never written, so
HDF5 never allocates it (it reads as the fill value, 0) and padding costs no bytes on disk. The
file stays format v1 (any HDF5 reader handles it). A compressor every h5py reads natively (lzf,
gzip) can be added (`compression`; fletcher32 then checksums the compressed bytes), but on
lab5-dev's minilm cache (benchmarks/cache_load.py --codecs) slabs alone took 0.32x the bytes
(lzf 0.28x, gzip-1 0.25x) and opened faster than the earlier layout, while lzf and gzip-1 took
3-4x longer to open (decompression): `TOKEN_COMPRESSION` is None. Caches written before
(whole-row chunks) read as before.

`read_dataset` loads a whole numeric dataset the way a raw read would: the chunks' bytes go
straight from the file into the result array, and each chunk's fletcher32 is checked with
HDF5's own checksum function on a few threads (it runs without the GIL); compressed chunks are
checked, then decompressed straight into the result on the same threads (lzf with the
lzf_decompress h5py's filter uses, gzip with zlib). Where those functions cannot be found, the
normal HDF5 read path (which checks the same checksums) is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import hashlib
import json
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from fusebench.cache.format import DamagedCacheError

CHUNK_BYTES = 1 << 20  # target bytes per chunk (whole rows)
DIGEST_BLOCK_BYTES = 64 << 20  # rows hashed per read when streaming a digest
RUN_BYTES = 16 << 20  # bytes the bulk reader asks of one preadv (or decompresses per task)
TOKEN_CHUNK = 16  # tokens per chunk of a padded token array (benchmarks/cache_load.py)
TOKEN_COMPRESSION: str | None = None  # compressor of padded token arrays (ditto)
COMPRESSIONS = (None, "lzf", "gzip")  # "gzip" is level GZIP_LEVEL
GZIP_LEVEL = 1


def fix_line(path: Path) -> str:
    """The fix for a damaged cache, as the end of one error line."""
    return f"extract it again with --overwrite (`fusebench cache verify {path}` checks every array)"


def chunk_rows(shape: tuple[int, ...], itemsize: int) -> int:
    """Rows per chunk. Token arrays ([N, L, D]): one row per chunk — a row is already 10-300
    KiB, and text rows arrive out of order (sorted by length), so a chunk of several rows would
    be read back, checked and rewritten once per row (measured: 10-20x slower assembly).
    Per-row vectors ([N] or [N, D]): about CHUNK_BYTES of whole rows."""
    if len(shape) >= 3:
        return 1
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    return int(max(1, min(shape[0], CHUNK_BYTES // row_bytes)))


def slab_tokens(length: int, most: int) -> int:
    """Tokens per chunk for rows of `length` tokens: the largest divisor of `length` up to
    `most` (whole slabs keep every chunk contiguous in the row-major array the reader fills),
    or `most` when `length` has none above most/2 (then HDF5 reads the array)."""
    best = max(d for d in range(1, min(most, length) + 1) if length % d == 0)
    return best if 2 * best > min(most, length) else min(most, length)


def create_dataset(
    group: h5py.Group,
    name: str,
    *,
    shape: tuple[int, ...],
    dtype,
    fillvalue=0,
    data=None,
    compression: str | None = None,
    token_chunk: int | None = None,
) -> h5py.Dataset:
    """A row-chunked numeric dataset with the fletcher32 filter (contiguous when it has no
    rows: HDF5 cannot chunk an empty fixed-size dataset). compression: one of COMPRESSIONS,
    applied to each chunk before its checksum. token_chunk (token arrays [N, L, D] only):
    chunks of one row and about that many tokens (`slab_tokens`), so that all-padding slabs
    are never stored."""
    dtype = np.dtype(dtype)
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
    if 0 in shape:
        return group.create_dataset(name, shape=shape, dtype=dtype, data=data)
    chunks = (chunk_rows(shape, dtype.itemsize), *shape[1:])
    if token_chunk and len(shape) >= 3:
        chunks = (1, slab_tokens(shape[1], token_chunk), *shape[2:])
    return group.create_dataset(
        name,
        shape=shape,
        dtype=dtype,
        data=data,
        chunks=chunks,
        fletcher32=True,
        compression=compression,
        compression_opts=GZIP_LEVEL if compression == "gzip" else None,
        fillvalue=None if data is not None else fillvalue,
    )


# ------------------------------------------------------------------------------ digests


def digest(a: np.ndarray) -> str:
    """sha256 of an array as stored: numbers by their bytes in row order, strings by the
    JSON list of them."""
    h = hashlib.sha256()
    if a.dtype.kind in "OUS":
        h.update(json.dumps([_str(x) for x in a.reshape(-1)], ensure_ascii=False).encode())
    else:
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def dataset_digest(
    ds: h5py.Dataset, path: Path, hold: Callable[[], AbstractContextManager] = nullcontext
) -> str:
    """`digest` of a stored dataset, read in chunk-aligned blocks (never all of it at once).
    Each read runs inside `hold()` (the cache writer holds Ctrl-C there: cache/writer.py
    signals_held), so a long digest still stops between blocks."""
    name = ds.name.lstrip("/")
    try:
        with hold():
            kind, shape = ds.dtype.kind, ds.shape
            if kind in "OS" or shape == ():
                return digest(np.asarray(ds.asstr()[()] if kind in "OS" else ds[()]))
            step, dtype = _block_rows(ds), ds.dtype
        h = hashlib.sha256()
        buf = np.empty((step, *shape[1:]), dtype=dtype)
        for start in range(0, shape[0], step):
            stop = min(shape[0], start + step)
            view = buf[: stop - start]
            if view.size:
                with hold():
                    ds.read_direct(view, source_sel=np.s_[start:stop])
            h.update(view.data)
        return h.hexdigest()
    except OSError as e:
        raise damaged(path, name, e) from None


ATTRS = "@attrs"  # the digests entry covering every attribute (classes, pooling, config, ...)


def attrs_digest(f: h5py.File) -> str:
    """sha256 of every attribute in the file (root, groups, datasets), but the two that change
    after it is computed: `digests` and `complete` (checked on its own)."""
    found: dict[str, dict] = {"/": _attrs(f, skip=("digests", "complete"))}
    f.visititems(lambda name, obj: found.__setitem__(name, _attrs(obj)) if obj.attrs else None)
    return hashlib.sha256(json.dumps(found, sort_keys=True, default=str).encode()).hexdigest()


def _attrs(obj, skip: tuple[str, ...] = ()) -> dict:
    out = {}
    for k, v in obj.attrs.items():
        if k not in skip:
            v = v.tolist() if isinstance(v, np.ndarray | np.generic) else v
            out[k] = [_str(x) for x in v] if isinstance(v, list) else _str(v)
    return out


def stored_digests(f: h5py.File, path: Path) -> dict[str, str] | None:
    """The digests recorded at assembly, or None for a cache written before they existed."""
    raw = f.attrs.get("digests")
    if raw is None:
        return None
    try:
        out = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        if not isinstance(out, dict):
            raise ValueError("not a JSON object")
    except ValueError:
        raise DamagedCacheError(
            f"{path} is damaged: its `digests` attribute is not readable JSON; {fix_line(path)}"
        ) from None
    return {str(k): str(v) for k, v in out.items()}


def check_digest(path: Path, name: str, a: np.ndarray, digests: dict[str, str] | None) -> None:
    """Refuses an array whose bytes differ from the digest recorded for it at assembly."""
    if digests is not None and name in digests and digest(a) != digests[name]:
        raise DamagedCacheError(
            f"{path} is damaged: `{name}` differs from the digest stored when the cache was "
            f"written (edited or corrupted since); {fix_line(path)}"
        )


def damaged(path: Path, name: str, e: OSError) -> DamagedCacheError:
    """One line for an HDF5 read that failed (a fletcher32 mismatch, unreadable metadata)."""
    text = " ".join(str(e).split())
    why = "a checksum fails" if "filter" in text or "checksum" in text else f"unreadable: {text}"
    return DamagedCacheError(
        f"{path} is damaged: reading `{name}` failed ({why}); {fix_line(path)}"
    )


def _str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _block_rows(ds: h5py.Dataset) -> int:
    per_chunk = ds.chunks[0] if ds.chunks else 1
    row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    rows = max(per_chunk, DIGEST_BLOCK_BYTES // row_bytes // per_chunk * per_chunk)
    return int(max(1, min(ds.shape[0], rows)))


# ------------------------------------------------------------------------------ bulk read


def read_dataset(ds: h5py.Dataset, path: Path) -> np.ndarray:
    """The whole dataset in memory, every chunk's fletcher32 checked; DamagedCacheError names
    the file and the dataset when one fails."""
    name = ds.name.lstrip("/")
    try:
        if ds.dtype.kind in "OS":
            return np.asarray(ds.asstr()[()])
        fast = _read_chunks_raw(ds, path)
        if fast is not None:
            return fast
        out = np.empty(ds.shape, dtype=ds.dtype)
        if out.size:
            ds.read_direct(out)
        return out
    except OSError as e:
        raise damaged(path, name, e) from None


def read_rows(ds: h5py.Dataset, rows, path: Path | None = None) -> np.ndarray:
    """ds[rows] for any row indices, read as runs of consecutive rows (slices): h5py's
    fancy-index read is ~20x slower on row-chunked datasets. Checksums are checked as always;
    a failure is one DamagedCacheError line."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((len(rows), *ds.shape[1:]), dtype=ds.dtype)
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    try:
        for run in np.split(np.arange(len(rows)), cuts):
            if len(run):
                src = np.s_[int(rows[run[0]]) : int(rows[run[-1]]) + 1]
                ds.read_direct(out, source_sel=src, dest_sel=np.s_[int(run[0]) : int(run[-1]) + 1])
    except OSError as e:
        where = Path(path) if path is not None else Path(ds.file.filename)
        raise damaged(where, ds.name.lstrip("/"), e) from None
    return out


Chunk = tuple[int, int, int]  # (chunk index, file offset, stored size)


@dataclass(frozen=True)
class _ChunkGrid:
    """Where chunk k of a dataset lands in the result: chunk k (row-major over the chunk grid)
    is bytes k*chunk_bytes.. of it, whole rows or slabs of one row (`_raw_codec` checks they
    tile it)."""

    rows_per_chunk: int
    slab: int  # tokens per chunk of a slab-chunked row; 0: whole rows
    per_row: int  # chunks per row (1: whole rows)
    chunk_bytes: int
    row_bytes: int
    n_chunks: int

    @classmethod
    def of(cls, ds: h5py.Dataset) -> _ChunkGrid:
        rows_per_chunk, slab = ds.chunks[0], (ds.chunks[1] if ds.ndim >= 3 else 0)
        per_row = ds.shape[1] // slab if slab else 1
        item_bytes = int(np.prod(ds.chunks[1:], dtype=np.int64)) * ds.dtype.itemsize
        n_chunks = -(-ds.shape[0] // rows_per_chunk) * per_row
        return cls(
            rows_per_chunk,
            slab,
            per_row,
            rows_per_chunk * item_bytes,
            item_bytes * per_row,
            n_chunks,
        )

    def stored(self, ds: h5py.Dataset) -> tuple[list[Chunk], set[int]]:
        """The chunks in the file, and those the compressor left as they were (lzf gives up
        on noise)."""
        chunks: list[Chunk] = []
        plain: set[int] = set()

        def visit(info) -> None:
            at = info.chunk_offset
            k = at[0] // self.rows_per_chunk * self.per_row + (
                at[1] // self.slab if self.slab else 0
            )
            chunks.append((k, info.byte_offset, info.size))
            if info.filter_mask:
                plain.add(k)

        ds.id.chunk_iter(visit)
        return chunks, plain

    def buffer(self, ds: h5py.Dataset, chunks: list[Chunk]) -> np.ndarray:
        """The result's bytes, chunks never written already set to the fill value. The edge
        chunk is stored whole. Fresh zeroed pages cost no more than np.empty's."""
        zero = not np.asarray(ds.fillvalue, dtype=ds.dtype).tobytes().strip(b"\0")  # all bits 0
        flat = (np.zeros if zero else np.empty)(self.n_chunks * self.chunk_bytes, dtype=np.uint8)
        if not zero:
            missing = np.ones(self.n_chunks, dtype=bool)
            for k, _, _ in chunks:
                missing[k] = False
            for i in np.flatnonzero(missing):  # never written: read as the fill value
                region = flat[i * self.chunk_bytes : (i + 1) * self.chunk_bytes].view(ds.dtype)
                region[...] = ds.fillvalue
        return flat


@dataclass
class _ChunkLoader:
    """Reads runs of chunks from `fd` into `flat`, checking each one's fletcher32; returns
    the chunks that failed (HDF5 then reads them again)."""

    fd: int
    flat: np.ndarray
    chunk_bytes: int
    check: Callable[[int, int], int]
    decode: Callable[[np.ndarray, memoryview], bool] | None
    plain: set[int]

    def __post_init__(self) -> None:
        self.tails = np.empty(len(self.flat) // self.chunk_bytes, dtype="<u4")  # stored checksums
        self.data, self.tail = memoryview(self.flat), memoryview(self.tails.view(np.uint8))
        self.base = self.flat.ctypes.data

    def load(self, run: list[Chunk]) -> list[int]:
        """One preadv for chunks stored back to back, then each one's checksum."""
        index, cb = [k for k, _, _ in run], self.chunk_bytes
        iov = []
        for i in index:
            iov += [self.data[i * cb : (i + 1) * cb], self.tail[4 * i : 4 * i + 4]]
        if os.preadv(self.fd, iov, run[0][1]) != len(run) * (cb + 4):
            return index  # short read: let HDF5 read these
        return [i for i in index if self.check(self.base + i * cb, cb) != self.tails[i]]

    def load_compressed(self, run: list[Chunk]) -> list[int]:
        """One pread for chunks stored back to back; each one's checksum, then decompressed."""
        first, end = run[0][1], run[-1][1] + run[-1][2]
        stored = np.empty(end - first, dtype=np.uint8)
        if os.preadv(self.fd, [memoryview(stored)], first) != len(stored):
            return [k for k, _, _ in run]
        return [i for i, offset, size in run if not self._unpack(stored, i, offset - first, size)]

    def _unpack(self, stored: np.ndarray, i: int, pos: int, size: int) -> bool:
        """Chunk i, at stored[pos:pos+size]: checksum checked, then into the result."""
        body = size - 4
        want = int.from_bytes(stored[pos + body : pos + size].tobytes(), "little")
        dest = self.data[i * self.chunk_bytes : (i + 1) * self.chunk_bytes]
        if body <= 0 or self.check(stored.ctypes.data + pos, body) != want:
            return False
        if i in self.plain:  # stored as is
            if body != self.chunk_bytes:
                return False
            dest[:] = stored[pos : pos + body].data
            return True
        return bool(self.decode(stored[pos : pos + body], dest))

    def load_all(self, runs: list[list[Chunk]]) -> list[int]:
        work = self.load if self.decode is None else self.load_compressed
        if len(self.flat) < RUN_BYTES:  # small: threads would cost more than they save
            return [i for run in runs for i in work(run)]
        with ThreadPoolExecutor(max_workers=_threads()) as pool:
            return [i for found in pool.map(work, runs) for i in found]


def _read_chunks_raw(ds: h5py.Dataset, path: Path) -> np.ndarray | None:
    """Chunks read from the file straight into the result, fletcher32 checked per chunk on
    threads (compressed chunks: checked, then decompressed into the result on the same threads).
    None when the layout is not one `create_dataset` writes (then HDF5 reads)."""
    check = _fletcher32()
    codec = _raw_codec(ds)
    decode = _decoder(codec) if codec else None
    if check is None or codec is None or (codec and decode is None):
        return None
    grid = _ChunkGrid.of(ds)
    chunks, plain = grid.stored(ds)
    if not codec and (plain or any(size != grid.chunk_bytes + 4 for _, _, size in chunks)):
        return None
    flat = grid.buffer(ds, chunks)
    try:  # the very file HDF5 has open (a path could name a newer file by now)
        fd = os.dup(ds.file.id.get_vfd_handle())
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    try:
        loader = _ChunkLoader(fd, flat, grid.chunk_bytes, check, decode, plain)
        bad = loader.load_all(_runs(chunks, grid.chunk_bytes))
    finally:
        os.close(fd)
    out = flat[: ds.shape[0] * grid.row_bytes].view(ds.dtype).reshape(ds.shape)
    for i in bad:  # let HDF5 decide: it raises on a real mismatch (-> DamagedCacheError)
        first = i // grid.per_row * grid.rows_per_chunk  # HDF5 reads the chunk's rows again
        rows = slice(first, min(ds.shape[0], first + grid.rows_per_chunk))
        out[rows] = ds[rows]
    return out


def _runs(chunks: list[tuple[int, int, int]], chunk_bytes: int) -> list[list[tuple[int, int, int]]]:
    """Chunks grouped by adjacency in the file (at most RUN_BYTES and 512 chunks: IOV_MAX)."""
    most = max(1, min(512, RUN_BYTES // (chunk_bytes + 4)))
    runs: list[list[tuple[int, int, int]]] = []
    for c in sorted(chunks, key=lambda c: c[1]):
        last = runs[-1][-1] if runs else None
        if last and last[1] + last[2] == c[1] and len(runs[-1]) < most:
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs


def _raw_codec(ds: h5py.Dataset) -> str | None:
    """ "" for the layout whose chunk bytes are the rows themselves (row-chunked, or chunked
    by whole slabs of one row's tokens; fletcher32 as
    the only filter, a plain little-endian number type, in a file without a user block); "lzf"
    or "gzip" for the same with that compressor before fletcher32; None for anything else."""
    if not ds.chunks or ds.shape[0] == 0 or ds.chunks[2:] != ds.shape[2:]:
        return None
    if ds.chunks[1:2] != ds.shape[1:2] and (ds.chunks[0] != 1 or ds.shape[1] % ds.chunks[1]):
        return None  # slabs of tokens: one row per chunk, tiling the row
    if ds.dtype.kind not in "fiub" or ds.dtype.byteorder == ">" or ds.file.userblock_size:
        return None
    if not hasattr(ds.id, "chunk_iter") or ds.file.driver != "sec2":
        return None
    plist = ds.id.get_create_plist()
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if filters == [h5py.h5z.FILTER_FLETCHER32]:
        return ""
    named = {h5py.h5z.FILTER_LZF: "lzf", h5py.h5z.FILTER_DEFLATE: "gzip"}
    if len(filters) == 2 and filters[1] == h5py.h5z.FILTER_FLETCHER32 and filters[0] in named:
        return named[filters[0]]
    return None


def _decoder(codec: str) -> Callable[[np.ndarray, memoryview], bool] | None:
    """decode(stored bytes, where the chunk goes) -> whether it decompressed to exactly that
    size; None when the decompressor is not at hand."""
    if codec == "gzip":
        return _inflate
    if codec == "lzf":
        fn = _lzf_decompress()
        if fn is None:
            return None

        def unlzf(stored: np.ndarray, dest: memoryview) -> bool:
            target = np.frombuffer(dest, dtype=np.uint8)
            return fn(stored.ctypes.data, len(stored), target.ctypes.data, len(dest)) == len(dest)

        return unlzf
    return None


def _inflate(stored: np.ndarray, dest: memoryview) -> bool:
    try:
        raw = zlib.decompress(stored)  # runs without the GIL
    except zlib.error:
        return False
    if len(raw) != len(dest):
        return False
    dest[:] = raw
    return True


@functools.cache
def _lzf_decompress() -> Callable[[int, int, int, int], int] | None:
    """lzf_decompress from h5py's own lzf filter (in h5py.h5z), after checking it gives back
    what HDF5 stored; None when it is not found or disagrees."""
    with contextlib.suppress(OSError, AttributeError):
        fn = ctypes.CDLL(h5py.h5z.__file__).lzf_decompress
        fn.restype = ctypes.c_uint
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint]
        data = np.arange(4000, dtype=np.float32) % 7
        with h5py.File("lzf-check", "w", driver="core", backing_store=False) as f:
            ds = f.create_dataset("x", data=data, chunks=(4000,), compression="lzf")
            _, raw = ds.id.read_direct_chunk((0,))
        src = np.frombuffer(raw, dtype=np.uint8).copy()
        out = np.empty(data.nbytes, dtype=np.uint8)
        n = fn(src.ctypes.data, len(src), out.ctypes.data, len(out))
        if n == len(out) and (out.view(np.float32) == data).all():
            return fn
    return None


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@functools.cache
def _fletcher32() -> Callable[[int, int], int] | None:
    """HDF5's own H5_checksum_fletcher32 from the library h5py loaded, after checking it gives
    what HDF5 stores; None when it is not found or disagrees."""
    for candidate in _hdf5_libraries():
        with contextlib.suppress(OSError, AttributeError):
            fn = ctypes.CDLL(candidate).H5_checksum_fletcher32
            fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_size_t]
            if _agrees_with_hdf5(fn):
                return fn
    return None


def _hdf5_libraries() -> list[str]:
    found: list[str] = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            name = os.path.basename(parts[5].strip()) if len(parts) == 6 else ""
            if name.startswith("libhdf5") and "_hl" not in name and ".so" in name:
                found.append(parts[5].strip())
    here = Path(h5py.__file__).parent
    found += glob.glob(str(here.parent / "h5py.libs" / "libhdf5-*.so*"))
    found += glob.glob(str(here / ".dylibs" / "libhdf5*.dylib"))
    return [p for p in dict.fromkeys(found) if "_hl" not in os.path.basename(p)]


def _agrees_with_hdf5(fn) -> bool:
    data = np.arange(1000, dtype=np.float32)
    with h5py.File("fletcher32-check", "w", driver="core", backing_store=False) as f:
        ds = f.create_dataset("x", data=data, chunks=(1000,), fletcher32=True)
        _, raw = ds.id.read_direct_chunk((0,))
    buf = np.frombuffer(raw[:-4], dtype=np.uint8).copy()
    return fn(buf.ctypes.data, len(buf)) == int.from_bytes(raw[-4:], "little")


def verify_digests(f: h5py.File, path: Path) -> tuple[int, list[str]]:
    """Recomputes the digest of every array recorded in the file (token arrays included,
    streamed). Returns (how many were checked, the names that fail, with why); (0, []) for a
    cache written before digests existed."""
    digests = stored_digests(f, path)
    if digests is None:
        return 0, []
    bad = []
    for name, want in digests.items():
        if name == ATTRS:
            if attrs_digest(f) != want:
                bad.append("attributes (differ from their digest)")
            continue
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset):
            bad.append(f"{name} (missing)")
            continue
        try:
            got = dataset_digest(ds, path)
        except DamagedCacheError:
            bad.append(f"{name} (a chunk checksum fails)")
            continue
        if got != want:
            bad.append(f"{name} (differs from its digest)")
    return len(digests), bad
