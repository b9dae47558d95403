"""The lab5 layout: train.txt and/or test_without_label.txt (CSV `guid,tag`) beside data/,
which holds data/<guid>.txt and data/<guid>.jpg.

train.txt rows are split "train" and need a label; test_without_label.txt rows are "test".
"""

from __future__ import annotations

from pathlib import Path

from fusebench.extract.datasets.builder import _Builder
from fusebench.extract.datasets.index import (
    _cell_count_problem,
    _csv_rows,
    _decode_index,
    _require_data_dir,
)
from fusebench.extract.datasets.samples import Dataset, Problem

_LAB5_FILES = (("train.txt", "train"), ("test_without_label.txt", "test"))


def _read_lab5(root: Path, builder: _Builder) -> Dataset:
    data = _require_data_dir(root, "lab5")
    notes: list[str] = []
    for filename, split in _LAB5_FILES:
        index = root / filename
        if not index.exists():
            continue
        if not index.is_file():  # skipping it would silently drop a split
            raise ValueError(f"{index} is not a file; make it the {split} split's guid,tag list")
        text, _, index_notes = _decode_index(index, builder)
        notes += index_notes
        columns, rows = _csv_rows(index, text, [("guid",), ("tag",)], lower=True)
        for line, row, cells in rows:
            where = f"row {line} of {filename}"
            guid = (row.get("guid") or "").strip()
            sample = builder.new(guid, split, where, (index, line))
            if cells != len(columns):  # its cells are not where the header says: use none
                sample.problems.append(
                    Problem(guid, None, _cell_count_problem(where, cells, columns))
                )
                continue
            builder.label(sample, row["tag"], required=split == "train")
            builder.data_files(sample, data)
    return builder.finish(root, "lab5", notes)
