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

`read_dataset` loads a whole numeric dataset the way a raw read would: the chunks' bytes go
straight from the file into the result array, and each chunk's fletcher32 is checked with
HDF5's own checksum function on a few threads (it runs without the GIL). Where that function
cannot be found, the normal HDF5 read path (which checks the same checksums) is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from cache.format import DamagedCacheError

CHUNK_BYTES = 1 << 20  # target bytes per chunk (whole rows)
DIGEST_BLOCK_BYTES = 64 << 20  # rows hashed per read when streaming a digest
RUN_BYTES = 16 << 20  # bytes the bulk reader asks of one preadv


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


def create_dataset(
    group: h5py.Group, name: str, *, shape: tuple[int, ...], dtype, fillvalue=0, data=None
) -> h5py.Dataset:
    """A row-chunked numeric dataset with the fletcher32 filter (contiguous when it has no
    rows: HDF5 cannot chunk an empty fixed-size dataset)."""
    dtype = np.dtype(dtype)
    if 0 in shape:
        return group.create_dataset(name, shape=shape, dtype=dtype, data=data)
    chunks = (chunk_rows(shape, dtype.itemsize), *shape[1:])
    return group.create_dataset(
        name,
        shape=shape,
        dtype=dtype,
        data=data,
        chunks=chunks,
        fletcher32=True,
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


def dataset_digest(ds: h5py.Dataset, path: Path) -> str:
    """`digest` of a stored dataset, read in chunk-aligned blocks (never all of it at once)."""
    name = ds.name.lstrip("/")
    try:
        if ds.dtype.kind in "OS" or ds.shape == ():
            return digest(np.asarray(ds.asstr()[()] if ds.dtype.kind in "OS" else ds[()]))
        h = hashlib.sha256()
        step = _block_rows(ds)
        buf = np.empty((step, *ds.shape[1:]), dtype=ds.dtype)
        for start in range(0, ds.shape[0], step):
            stop = min(ds.shape[0], start + step)
            view = buf[: stop - start]
            if view.size:
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


def _read_chunks_raw(ds: h5py.Dataset, path: Path) -> np.ndarray | None:
    """Chunks read from the file straight into the result, fletcher32 checked per chunk on
    threads. None when the layout is not the one `create_dataset` writes (then HDF5 reads)."""
    check = _fletcher32()
    if check is None or not _raw_readable(ds):
        return None
    rows_per_chunk = ds.chunks[0]
    row_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    chunk_bytes = rows_per_chunk * row_bytes
    n_chunks = -(-ds.shape[0] // rows_per_chunk)
    chunks: list[tuple[int, int, int]] = []  # (first row, file offset, stored size)
    ds.id.chunk_iter(lambda s: chunks.append((s.chunk_offset[0], s.byte_offset, s.size)))
    if any(size != chunk_bytes + 4 for _, _, size in chunks):
        return None
    flat = np.empty(n_chunks * chunk_bytes, dtype=np.uint8)  # the edge chunk is stored whole
    missing = np.ones(n_chunks, dtype=bool)
    for row, _, _ in chunks:
        missing[row // rows_per_chunk] = False
    for i in np.flatnonzero(missing):  # never written: HDF5 reads them as the fill value
        region = flat[i * chunk_bytes : (i + 1) * chunk_bytes].view(ds.dtype)
        region[...] = ds.fillvalue
    tails = np.empty(n_chunks, dtype="<u4")  # each chunk's stored checksum
    data, tail, base = memoryview(flat), memoryview(tails.view(np.uint8)), flat.ctypes.data

    def load(run: list[tuple[int, int, int]]) -> list[int]:
        """One preadv for chunks stored back to back, then each one's checksum."""
        index = [row // rows_per_chunk for row, _, _ in run]
        iov = []
        for i in index:
            iov += [data[i * chunk_bytes : (i + 1) * chunk_bytes], tail[4 * i : 4 * i + 4]]
        if os.preadv(fd, iov, run[0][1]) != len(run) * (chunk_bytes + 4):
            return index  # short read: let HDF5 read these
        return [i for i in index if check(base + i * chunk_bytes, chunk_bytes) != tails[i]]

    try:  # the very file HDF5 has open (a path could name a newer file by now)
        fd = os.dup(ds.file.id.get_vfd_handle())
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    try:
        runs = _runs(chunks, chunk_bytes)
        if len(flat) < RUN_BYTES:  # small: threads would cost more than they save
            bad = [i for run in runs for i in load(run)]
        else:
            with ThreadPoolExecutor(max_workers=_threads()) as pool:
                bad = [i for found in pool.map(load, runs) for i in found]
    finally:
        os.close(fd)
    out = flat[: ds.shape[0] * row_bytes].view(ds.dtype).reshape(ds.shape)
    for i in bad:  # let HDF5 decide: it raises on a real mismatch (-> DamagedCacheError)
        rows = slice(i * rows_per_chunk, min(ds.shape[0], (i + 1) * rows_per_chunk))
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


def _raw_readable(ds: h5py.Dataset) -> bool:
    """Row-chunked, fletcher32 as the only filter, a plain little-endian number type, in a
    file without a user block: the layout whose chunk bytes are the rows themselves."""
    if not ds.chunks or ds.chunks[1:] != ds.shape[1:] or ds.shape[0] == 0:
        return False
    if ds.dtype.kind not in "fiub" or ds.dtype.byteorder == ">" or ds.file.userblock_size:
        return False
    if not hasattr(ds.id, "chunk_iter") or ds.file.driver != "sec2":
        return False
    plist = ds.id.get_create_plist()
    return plist.get_nfilters() == 1 and plist.get_filter(0)[0] == h5py.h5z.FILTER_FLETCHER32


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
