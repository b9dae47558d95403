"""Image bytes embedded in a Parquet file or an HF datasets folder, re-read when needed.

Readers never keep embedded bytes: `Sample.image_ref` says where they live and
`read_image_bytes` reads them again, holding at most one Parquet row group per process
(`_EmbeddedReader`). pyarrow and `datasets` are optional extras, imported only here and only
when such data is read (`_optional` names the pip install when one is missing).
"""

from __future__ import annotations

import importlib
import os
from bisect import bisect_right
from pathlib import Path
from typing import Any

from fusebench.extract.datasets.files import _clip
from fusebench.extract.datasets.samples import ImageRef


def read_image_bytes(ref: ImageRef) -> bytes:
    """The embedded image bytes `ref` points at, re-read from its Parquet / Arrow file."""
    try:
        value = _embedded().value(ref)
    except Exception as err:  # pyarrow / datasets raise many types when a file changed
        raise ValueError(
            f"image {ref} cannot be read again ({_clip(' '.join(str(err).split()), 120)}); "
            "the file changed since the dataset was read: rerun the command"
        ) from err
    if isinstance(value, dict):  # HF Image struct {bytes, path}
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(
            f"image {ref} holds no bytes any more; the file changed since the dataset was "
            "read: rerun the command"
        )
    return bytes(value)


class _EmbeddedReader:
    """One per process (a forked DataLoader worker opens its own): the Parquet files and HF
    splits opened so far, and per (file, column) the last Parquet row group read — the most
    image bytes a process holds. Batches come in row order, so each group is read about once."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.parquet: dict[Path, tuple[Any, list[int]]] = {}  # file -> (ParquetFile, group starts)
        self.groups: dict[tuple[Path, str], tuple[int, Any]] = {}  # -> (group, column array)
        self.hf: dict[tuple[Path, str | None, str], Any] = {}  # -> that column of the split

    def value(self, ref: ImageRef) -> Any:
        if ref.kind == "hf":
            key = (ref.file, ref.split, ref.column)
            if key not in self.hf:
                loaded = _load_hf(ref.file)
                split = loaded if ref.split is None else loaded[ref.split]
                self.hf[key] = split.select_columns([ref.column]).with_format("arrow")
            return self.hf[key][ref.row].column(0)[0].as_py()
        if ref.file not in self.parquet:
            pf = _open_parquet(ref.file)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            self.parquet[ref.file] = pf, [sum(sizes[:g]) for g in range(len(sizes))]
        pf, starts = self.parquet[ref.file]
        group = bisect_right(starts, ref.row) - 1
        cached = self.groups.get((ref.file, ref.column))
        if cached is None or cached[0] != group:
            self.groups.pop((ref.file, ref.column), None)
            while len(self.groups) >= 2:  # other files' groups: let them go
                del self.groups[next(iter(self.groups))]
            column = pf.read_row_group(group, columns=[ref.column]).column(0)
            cached = self.groups[(ref.file, ref.column)] = group, column
        return cached[1][ref.row - starts[group]].as_py()


_READER: _EmbeddedReader | None = None


def _embedded() -> _EmbeddedReader:
    global _READER
    if _READER is None or _READER.pid != os.getpid():  # never share open files across a fork
        _READER = _EmbeddedReader()
    return _READER


def _optional(module: str, extra: str, what: str) -> Any:
    """Import an optional extra's module, or fail in one line naming the pip install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ValueError(
            f"reading {what} needs {package}, which is not installed; "
            f"pip install 'fusebench[{extra}]'"
        ) from None


def _open_parquet(file: Path) -> Any:
    pq = _optional("pyarrow.parquet", "parquet", f"the Parquet file {file.name}")
    try:
        return pq.ParquetFile(file)
    except Exception as err:  # ArrowInvalid, OSError, ...
        raise ValueError(
            f"{file} is not a readable Parquet file ({_clip(' '.join(str(err).split()), 120)}); "
            "re-export it (e.g. DataFrame.to_parquet or pyarrow.parquet.write_table)"
        ) from None


def _load_hf(folder: Path) -> Any:
    """`datasets.load_from_disk(folder)`: a Dataset or a DatasetDict, memory-mapped."""
    datasets = _optional("datasets", "hf", f"the HF datasets folder {folder.name}")
    try:
        return datasets.load_from_disk(str(folder))
    except Exception as err:
        raise ValueError(
            f"cannot read {folder} as an HF datasets folder "
            f"({_clip(' '.join(str(err).split()), 120)}); write it with "
            "Dataset.save_to_disk or DatasetDict.save_to_disk"
        ) from None
