"""Index files (lab5's train.txt, MVSA's labelResultAll.txt, CSV / JSONL manifests): read,
decoded like the texts, and split into rows.

Errors about an index file as a whole are one-line ValueError / FileNotFoundError. CSV is
read strictly: an unclosed quote is an error naming the line; column names are stripped.
Lines are numbered as the csv module numbers them (at \\n, \\r\\n or \\r).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from fusebench.extract.datasets.builder import _Builder
from fusebench.extract.datasets.text import (
    _UNICODE,
    detect_legacy_encoding,
)

from fusebench.texts import decode_text, decode_unicode


def _read_index(file: Path) -> bytes:
    """An index or manifest file's bytes; ValueError(one line) when it cannot be read."""
    try:
        return file.read_bytes()
    except OSError as err:
        raise ValueError(
            f"cannot read {file} ({err.strerror or err}); check that it is a readable file"
        ) from err


def _decode_index(file: Path, builder: _Builder) -> tuple[str, str, list[str]]:
    """(text, encoding, notes) of an index or manifest file, decoded like the texts."""
    raw = _read_index(file)
    legacy = None
    if decode_unicode(raw) is None:
        legacy = builder.forced or detect_legacy_encoding([raw])
    text, encoding = decode_text(raw, legacy)
    notes = [] if encoding in _UNICODE else [
        f"{file.name} is not UTF-8; read as {encoding}"
    ]  # fmt: skip
    return text, encoding, notes


def _lines(text: str) -> list[str]:
    """Lines split at \\n, \\r\\n or \\r only, as the csv module counts them (str.splitlines
    also splits at U+2028 and other characters that JSON strings may hold)."""
    return [line.rstrip("\r\n") for line in io.StringIO(text, newline="")]


def _csv_rows(
    file: Path, text: str, needed: list[tuple[str, ...]], *, lower: bool
) -> tuple[list[str], list[tuple[int, dict, int]]]:
    """(column names, [(line ending the row, record, number of cells)]); blank rows skipped.
    Strict quoting: an unclosed quote is an error, not a field that swallows the file."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, start = [], 1  # start: the line the row being read begins on
    try:
        header = next(reader, [])
        columns = [c.strip().lower() if lower else c.strip() for c in header]
        _require_columns(file, columns, needed)
        while (start := reader.line_num + 1) and (cells := next(reader, None)) is not None:
            if any(c.strip() for c in cells):
                rows.append((reader.line_num, dict(zip(columns, cells)), len(cells)))
    except csv.Error as err:
        raise ValueError(
            f"{file.name} is not valid CSV in the row starting at line {start} ({err}); fix "
            "that row: a cell holding a comma, a quote or a line break goes in double quotes, "
            'inner quotes doubled ("say ""hi""")'
        ) from err
    return columns, rows


def _cell_count_problem(where: str, cells: int, columns: list[str]) -> str:
    return (
        f"{where} has {cells} cells for {len(columns)} columns ({', '.join(columns)}); "
        "quote cells that hold commas, or fix the row"
    )


def _require_data_dir(root: Path, layout: str) -> Path:
    data = root / "data"
    if not data.is_dir():
        raise FileNotFoundError(
            f"{root} has no data/ folder; the {layout} layout keeps data/<id>.txt and data/<id>.jpg there"
        )
    return data


def _require_columns(file: Path, found: Iterable[str], needed: list[tuple[str, ...]]) -> None:
    found = [c for c in found if c]
    repeated = [c for c, n in Counter(found).items() if n > 1]
    if repeated:
        raise ValueError(f"{file.name} has column {repeated[0]!r} twice; rename one")
    missing = [
        " or ".join(alternatives) for alternatives in needed if not set(alternatives) & set(found)
    ]
    if missing:
        wanted = ", ".join(" or ".join(a) for a in needed)
        raise ValueError(
            f"{file.name} lacks column(s) {', '.join(missing)}; found {', '.join(found) or 'none'}, "
            f"need {wanted}"
        )
