"""Token arrays read from a cache file on demand, in chunk-aligned row blocks, within a byte budget.

Stage two loads a cache into RAM when its token arrays fit the memory budget
(fuse/streaming.py decides); when they do not, each token array becomes a `LazyRows`: an
array-like over the HDF5 dataset that supports what fuse/features.py asks of a token array —
`a[idx]`, `a[idx, :length]`, `a[start:stop]`, `.shape`, `.dtype`, `.ndim`, `len(a)`.

Layout it relies on (cache/integrity.py `create_dataset`): token arrays are chunked by ONE row
(image: the whole row; text: slabs of 16 tokens of one row, all-padding slabs never stored), so
any run of rows is chunk-aligned. A block is `block_rows` consecutive rows (about BLOCK_BYTES,
at most MAX_BLOCK_ROWS); a block is read with one HDF5 call, which checks the fletcher32
checksum of every chunk in it, and kept in a `BlockCache`: an LRU bounded in bytes and shared
by every lazy array of a run, so the whole run stays within its budget.

Rows are read as whole blocks when a request touches at least 1/FEW_ROWS of a block (the
order fuse/trainer.py `batches` draws over streamed sets: blocks shuffled, then rows shuffled
within a buffer of a few blocks); a request that touches only a few rows of an uncached block
(a random order, evaluation sorted by length) reads just those rows and caches nothing, so no
order reads a whole block for one row. An HDF5 read error (a damaged chunk) is one
DamagedCacheError line naming the file and the array.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
from fusebench.cache.integrity import damaged, read_rows
from fusebench.cache.opening import open_h5

BLOCK_BYTES = 8 << 20  # target bytes of one block
MAX_BLOCK_ROWS = 128  # a batch of 64 drawn from a buffer of 4 blocks touches >= 1/8 of each
FEW_ROWS = 8  # a request touching fewer than block_rows / FEW_ROWS rows of a block reads rows


class BlockCache:
    """Least-recently-used row blocks, at most `capacity` bytes in all (at least one block is
    always kept, whatever its size: a read must land somewhere)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.nbytes = 0
        self.reads = 0  # blocks read from the file (for tests and benchmarks)
        self.rows_read = 0  # rows read on their own, outside any block
        self._blocks: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def get(self, key: tuple) -> np.ndarray | None:
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
        return block

    def put(self, key: tuple, block: np.ndarray) -> None:
        self.reads += 1
        self._blocks[key] = block
        self.nbytes += block.nbytes
        while self.nbytes > self.capacity and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self.nbytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._blocks)


class LazyRows:
    """A row-major (N, ...) array in a cache file, read in row blocks through a BlockCache."""

    def __init__(
        self,
        path: str | Path,
        name: str,
        *,
        shape: tuple[int, ...],
        dtype,
        chunk_rows: int,
        cache: BlockCache,
        block_bytes: int = BLOCK_BYTES,
    ) -> None:
        self.path, self.name = Path(path), name
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.block_rows = min(
            rows_per_block(self.row_bytes, chunk_rows, block_bytes), max(1, self.shape[0])
        )
        self.cache = cache
        self._file: h5py.File | None = None

    @classmethod
    def of(cls, ds: h5py.Dataset, path: Path, cache: BlockCache) -> LazyRows:
        return cls(
            path,
            ds.name.lstrip("/"),
            shape=ds.shape,
            dtype=ds.dtype,
            chunk_rows=ds.chunks[0] if ds.chunks else 1,
            cache=cache,
        )

    # ------------------------------------------------------------ array-like

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyRows({self.path.name}:{self.name}, shape={self.shape}, blocks of {self.block_rows})"

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        """(b,) the block each row lies in."""
        return np.asarray(rows, dtype=np.int64) // self.block_rows

    def __getitem__(self, key) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, *more = key
            rest = tuple(more)
        n = self.shape[0]
        if isinstance(key, slice):
            rows = np.arange(*key.indices(n), dtype=np.int64)
        elif np.ndim(key) == 0 and not isinstance(key, (bool, np.bool_)):
            return self.take(np.array([int(key) % max(n, 1)]), rest)[0]
        else:
            rows = np.asarray(key)
            rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
            rows = np.where(rows < 0, rows + n, rows)
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(f"row index out of range for {self!r}")
        return self.take(rows, rest)

    def take(self, rows: np.ndarray, rest: tuple = ()) -> np.ndarray:
        """a[rows][:, *rest] for row indices in any order, block by block."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        inner = (slice(None), *rest)
        shape = np.broadcast_to(np.empty((), self.dtype), self.shape)[(slice(0, 0), *rest)].shape
        out = np.empty((len(rows), *shape[1:]), dtype=self.dtype)
        if not len(rows):
            return out
        blocks = self.block_of(rows)
        order = np.argsort(blocks, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(blocks[order]) != 0])
        for part in np.split(order, starts[1:]):
            b = int(blocks[part[0]])
            block = self._block(b, whole=len(part) * FEW_ROWS >= self.block_rows)
            if block is not None:
                out[part] = block[(rows[part] - b * self.block_rows, *rest)]
            else:  # a few rows of an uncached block: read just those (sorted, then placed)
                sub = np.argsort(rows[part], kind="stable")
                got = read_rows(self._dataset(), rows[part][sub], self.path)
                self.cache.rows_read += len(part)
                out[part[sub]] = got[inner]
        return out

    # ------------------------------------------------------------ reading

    def _block(self, b: int, *, whole: bool) -> np.ndarray | None:
        """Block b from the cache, or read and cached when `whole`; None otherwise."""
        key = (str(self.path), self.name, b)
        block = self.cache.get(key)
        if block is None and whole:
            start = b * self.block_rows
            block = self._read(start, min(self.shape[0], start + self.block_rows))
            self.cache.put(key, block)
        return block

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        try:
            self._dataset().read_direct(out, source_sel=np.s_[start:stop])
        except OSError as e:
            raise damaged(self.path, self.name, e) from None
        return out

    def _dataset(self) -> h5py.Dataset:
        if self._file is None:
            self._file = open_h5(self.path)
        return self._file[self.name]

    def __getstate__(self) -> dict:  # an open HDF5 handle does not cross processes
        return {**self.__dict__, "_file": None}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def rows_per_block(row_bytes: int, chunk_rows: int = 1, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows of a block: about block_bytes, at most MAX_BLOCK_ROWS, a whole number of chunks."""
    per = max(1, int(chunk_rows))
    return int(max(per, min(MAX_BLOCK_ROWS, block_bytes // max(1, row_bytes)) // per * per))


def stored_nbytes(path: Path, name: str) -> tuple[int, int]:
    """(bytes dataset `name` of the cache at `path` takes in RAM, bytes of one row); (0, 0)
    when it has none or the file cannot be read (opening it then reports why)."""
    try:
        with h5py.File(path, "r") as f:
            ds = f.get(name)
            if not isinstance(ds, h5py.Dataset) or ds.ndim == 0:
                return 0, 0
            row = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
            return ds.shape[0] * row, row
    except (OSError, RuntimeError, KeyError, ValueError):
        return 0, 0
