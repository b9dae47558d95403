"""Parquet files and HF datasets folders: tables of rows, read in batches.

A Parquet file is one `_Table`, an HF folder one per split (a DatasetDict's split names are
the split column unless it has one). Rows go through the manifest's column mapping and
`_manifest_files`; image bytes stay in the file (`ImageRef`), an HF ClassLabel's names give
the class order.
"""

from __future__ import annotations

import importlib
import json
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusebench.extract.datasets.builder import _Builder
from fusebench.extract.datasets.embedded import _load_hf, _open_parquet
from fusebench.extract.datasets.files import _clip
from fusebench.extract.datasets.manifest import (
    COLUMN_KEYS,
    _Blob,
    _cell,
    _check_mapped,
    _column_notes,
    _finish_manifest,
    _manifest_files,
    _resolve_columns,
)
from fusebench.extract.datasets.samples import Dataset, ImageRef, Problem

_BIG_ROW_GROUP = 256 << 20  # bytes: above this a note says how much a loading worker holds


@dataclass
class _Table:
    """One Parquet file, or one split of an HF datasets folder, read in batches of rows."""

    name: str  # in messages: "manifest.parquet", "split 'validation' of my-data"
    columns: list[str]
    types: dict[str, Any]  # column -> pyarrow DataType
    class_names: dict[str, tuple[str, ...]]  # HF ClassLabel column -> its names
    batches: Callable[[list[str]], Iterator[list[dict]]]  # rows as dicts of those columns
    ref: Callable[[int, str], ImageRef]  # (row, column) -> where its image bytes live
    row_files: Callable[[int], tuple[Path, ...]]  # row -> the file(s) holding it
    split: str | None = None  # an HF DatasetDict's split name
    notes: list[str] = field(default_factory=list)


def _hf_class_names(metadata: dict | None) -> dict[str, tuple[str, ...]]:
    """ClassLabel names from the `huggingface` schema metadata that HF writes into Parquet."""
    try:
        features = json.loads((metadata or {})[b"huggingface"])["info"]["features"]
        return {
            column: tuple(map(str, f["names"]))
            for column, f in features.items()
            if isinstance(f, dict) and f.get("_type") == "ClassLabel" and f.get("names")
        }
    except (KeyError, TypeError, ValueError):
        return {}


def _parquet_table(file: Path) -> _Table:
    pf = _open_parquet(file)
    schema = pf.schema_arrow

    def batches(columns: list[str]) -> Iterator[list[dict]]:
        for group in range(pf.metadata.num_row_groups):  # one group in memory at a time
            for batch in pf.read_row_group(group, columns=columns).to_batches(max_chunksize=256):
                yield batch.to_pylist()

    groups = [pf.metadata.row_group(g) for g in range(pf.metadata.num_row_groups)]
    biggest = max((g.total_byte_size for g in groups), default=0)
    notes = []
    if biggest > _BIG_ROW_GROUP:
        notes.append(
            f"{file.name} has row groups of up to {biggest >> 20} MiB: each image-loading "
            "process holds one in memory while extracting; write it with smaller ones "
            "(pyarrow.parquet.write_table(..., row_group_size=1000)) if memory is short"
        )
    return _Table(
        file.name,
        list(schema.names),
        {f.name: f.type for f in schema},
        _hf_class_names(schema.metadata),
        batches,
        lambda row, column: ImageRef("parquet", file, row, column),
        lambda row: (file,),
        notes=notes,
    )


def _hf_tables(folder: Path) -> list[_Table]:
    """One table per split of an HF datasets folder (a Dataset, or a DatasetDict's splits)."""
    loaded = _load_hf(folder)
    splits = list(loaded.items()) if isinstance(loaded, dict) else [(None, loaded)]
    tables = []
    for split, part in splits:

        def batches(columns: list[str], part: Any = part) -> Iterator[list[dict]]:
            for table in part.select_columns(columns).with_format("arrow").iter(batch_size=256):
                yield table.to_pylist()

        names = {
            column: tuple(map(str, feature.names))
            for column, feature in part.features.items()
            if type(feature).__name__ == "ClassLabel"
        }
        tables.append(
            _Table(
                f"split {split!r} of {folder.name}" if split is not None else folder.name,
                list(part.column_names),
                {f.name: f.type for f in part.data.schema},
                names,
                batches,
                lambda row, column, split=split: ImageRef("hf", folder, row, column, split),
                _hf_row_files(part),
                split=None if split is None else str(split),
            )
        )
    return tables


def _hf_row_files(part: Any) -> Callable[[int], tuple[Path, ...]]:
    """row -> the Arrow shard holding it; every shard when that cannot be told."""
    files = tuple(Path(c["filename"]) for c in part.cache_files)
    if len(files) <= 1 or getattr(part, "_indices", None) is not None:
        return lambda row: files
    pa = importlib.import_module("pyarrow")
    try:
        sizes = []
        for file in files:
            with pa.memory_map(str(file)) as source:
                sizes.append(pa.ipc.open_stream(source).read_all().num_rows)
    except Exception:  # not the stream format this version of datasets writes
        return lambda row: files
    if sum(sizes) != len(part):
        return lambda row: files
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return lambda row: (files[bisect_right(starts, row) - 1],)


def _check_image_type(table: _Table, column: str) -> None:
    """An image column holds paths, bytes, or HF Image structs; anything else is a mistake."""
    pa = importlib.import_module("pyarrow")
    kind = table.types.get(column)
    tests = (
        "is_null",
        "is_string",
        "is_large_string",
        "is_string_view",
        "is_binary",
        "is_large_binary",
        "is_binary_view",
        "is_fixed_size_binary",
    )
    if kind is None or any(getattr(pa.types, t, lambda _: False)(kind) for t in tests):
        return
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return
    raise ValueError(
        f"column {column!r} of {table.name} holds {kind}, not images; an image column holds "
        "paths (strings), image bytes (binary) or {bytes, path} structs as HF Image features "
        "store them; name the right one with --column image=NAME"
    )


def _rows(table: _Table, columns: list[str]) -> Iterator[dict]:
    """The table's rows; a read failure (a damaged file) is one line."""
    batches = table.batches(columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:  # ArrowInvalid, OSError, ... from a damaged file
            raise ValueError(
                f"{table.name} cannot be read ({_clip(' '.join(str(err).split()), 120)}); "
                "re-export it"
            ) from None
        yield from batch


def _read_tables(
    root: Path, tables: list[_Table], builder: _Builder, given: dict[str, str], source: str
) -> Dataset:
    """A Parquet file (one table) or an HF datasets folder (one table per split)."""
    found = list(dict.fromkeys(c for t in tables for c in t.columns))
    _check_mapped(tables[0].name if len(tables) == 1 else root.name, found, given)
    notes = _column_notes(found, given) + [n for t in tables for n in t.notes]
    used: dict[str, str] = {}
    for table in tables:
        mapped = {k: c for k, c in given.items() if c in table.columns}
        columns = _resolve_columns(table.name, table.columns, mapped)
        if "image" in columns:
            _check_image_type(table, columns["image"])
        names = table.class_names.get(columns.get("label", ""))
        if names is not None:
            builder.labels.order = builder.labels.order or names
        if table.split is not None and "split" in columns:
            notes.append(f"column {columns['split']!r} gives the splits, not the DatasetDict's")
        for row, record in enumerate(_rows(table, list(dict.fromkeys(columns.values())))):
            _table_row(builder, table, row, record, columns, names, root)
        used.update(columns)
    used = {key: used[key] for key in ("guid", *COLUMN_KEYS[1:]) if key in used}
    return _finish_manifest(builder, root, list(dict.fromkeys(notes)), used, given, source)


def _table_row(
    builder: _Builder,
    table: _Table,
    row: int,
    record: dict,
    columns: dict[str, str],
    names: tuple[str, ...] | None,
    root: Path,
) -> None:
    values = {key: record.get(column) for key, column in columns.items()}
    where = f"row {row} (0-based) of {table.name}"
    sample = builder.new(_cell(values, "guid"), "", where, None)
    sample.row_files = table.row_files(row)
    label = values.get("label")
    bad_class = False  # a ClassLabel index that is no class: a bad sample, not unlabelled
    if names is not None and isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < len(names):
            label = names[label]
        else:  # -1 is how HF marks an unlabelled row; anything else is not a class
            if label != -1:
                bad_class = True
                sample.problems.append(
                    Problem(
                        sample.guid,
                        None,
                        f"label {label} in {where} is not a class of ClassLabel column "
                        f"{columns['label']!r} ({', '.join(names)}); fix the row",
                    )
                )
            label = None
    labelled = builder.label(sample, label, required=False) or bad_class
    sample.split = _cell(values, "split") or table.split or ("train" if labelled else "test")
    image = values.get("image")
    if isinstance(image, dict):  # HF Image struct: the bytes when stored, else the path
        image = image.get("bytes") if image.get("bytes") is not None else image.get("path")
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = _Blob(bytes(image), table.ref(row, columns["image"]))
    values["image"] = image
    _manifest_files(builder, sample, values, root, "utf-8", where, columns)
