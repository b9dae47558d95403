"""CSV and JSONL manifests, and the column mapping every manifest shares.

One row per sample with columns guid, text and/or text_path, image_path or image, label,
split; `--column KEY=NAME` (`parse_columns`, `check_columns`) maps other names. Text is a
cell or a file; an image is a path relative to the manifest's folder (`_manifest_files`,
which Parquet / HF rows go through too, with embedded bytes as a `_Blob`). URLs are refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fusebench.extract.datasets.builder import _Builder
from fusebench.extract.datasets.files import _clip
from fusebench.extract.datasets.index import _cell_count_problem, _csv_rows, _decode_index, _lines
from fusebench.extract.datasets.labels import _has_label, _label_text
from fusebench.extract.datasets.samples import Dataset, ImageRef, Problem, Sample
from fusebench.extract.datasets.text import _UNICODE

# What a manifest's columns can hold; `--column KEY=NAME` maps a column of another name.
# "image" and "image_path" both name the one image column (a path, or embedded bytes).
COLUMN_KEYS: tuple[str, ...] = (
    "guid",
    "text",
    "text_path",
    "image",
    "image_path",
    "label",
    "split",
)
_NEED = "guid, text or text_path and/or image or image_path"
_DEFAULT_ORDER = ("guid", "text", "text_path", "image_path", "image", "label", "split")
_MODALITY_KEYS = (("text", ("text", "text_path")), ("image", ("image",)))


def parse_columns(pairs: Sequence[str] | None) -> dict[str, str] | None:
    """`--column text=caption --column label=y` -> {"text": "caption", "label": "y"}."""
    if not pairs:
        return None
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, name = (part.strip() for part in pair.partition("="))
        if not sep or not key or not name:
            raise ValueError(f"--column wants KEY=NAME, e.g. --column text=caption (got {pair!r})")
        if out.get(key, name) != name:
            raise ValueError(f"--column {key} is given twice ({out[key]}, {name}); give it once")
        out[key] = name
    return check_columns(out)


def check_columns(columns: dict[str, str] | None) -> dict[str, str]:
    """A column mapping (key -> column name), checked: known keys, one image column."""
    columns = dict(columns or {})
    for key, name in columns.items():
        if key not in COLUMN_KEYS:
            raise ValueError(f"unknown --column key {key!r}; use one of {', '.join(COLUMN_KEYS)}")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"--column {key} needs a column name, e.g. --column {key}=NAME")
    if "image" in columns and "image_path" in columns:
        raise ValueError(
            "--column image and --column image_path both name the image column; give one"
        )
    return {key: columns[key] for key in COLUMN_KEYS if key in columns}


def _check_mapped(name: str, found: Sequence[str], given: dict[str, str]) -> None:
    for key, column in given.items():
        if column not in found:
            raise ValueError(
                f"--column {key}={column}: {name} has no column {column!r}; found "
                f"{', '.join(c for c in found if c) or 'none'}"
            )


def _resolve_columns(name: str, found: Sequence[str], given: dict[str, str]) -> dict[str, str]:
    """key -> the column it is read from, for the keys this manifest has: `given` first, then
    the columns named as the keys (a column mapped to one key is read for no other). The image
    column is under "image" whether it is image_path (preferred) or image."""
    found = [c for c in found if c]
    resolved = {("image" if k == "image_path" else k): c for k, c in given.items() if c in found}
    taken = set(given.values())
    for key in _DEFAULT_ORDER:
        slot = "image" if key == "image_path" else key
        if slot not in resolved and key in found and key not in taken:
            resolved[slot] = key
    missing = [] if "guid" in resolved else ["guid"]
    if not {"text", "text_path", "image"} & set(resolved):
        missing.append("text or text_path and/or image or image_path")
    if missing:
        raise ValueError(
            f"{name} lacks column(s) {', '.join(missing)}; found {', '.join(found) or 'none'}, "
            f"need {_NEED}; name yours with --column KEY=NAME (e.g. --column guid=id)"
        )
    return {key: resolved[key] for key in ("guid", *COLUMN_KEYS[1:]) if key in resolved}


def _column_notes(found: Sequence[str], given: dict[str, str]) -> list[str]:
    if "image_path" in found and "image" in found and not {"image", "image_path"} & set(given):
        return [
            "columns image_path and image both exist: images are read from image_path; "
            "pass --column image=image to read the other"
        ]
    return []


def _manifest_records(
    file: Path, text: str
) -> tuple[list[str], list[tuple[int, dict, int | None]]]:
    """The column names and [(line ending the record, record, CSV cell count or None)]."""
    if file.suffix.lower() == ".csv":
        return _csv_rows(file, text, [], lower=False)
    records, columns = [], {}
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{file.name} line {number} is not valid JSON ({err.msg}); fix that line"
            ) from err
        if not isinstance(record, dict):
            raise ValueError(
                f"{file.name} line {number} is not a JSON object; write one object per line"
            )
        records.append((number, record, None))
        columns.update(dict.fromkeys(record))
    return list(columns), records


def _cell(record: dict, column: str) -> str:
    return _label_text(record.get(column)).strip()


def _read_manifest(file: Path, builder: _Builder, given: dict[str, str]) -> Dataset:
    """A CSV or JSONL manifest."""
    root = file.parent
    text, encoding, notes = _decode_index(file, builder)
    if encoding not in _UNICODE:
        builder.legacy = encoding  # the dataset's one legacy encoding, for its text files too
    found, records = _manifest_records(file, text)
    _check_mapped(file.name, found, given)
    columns = _resolve_columns(file.name, found, given)
    csv_file = file.suffix.lower() == ".csv"
    for number, record, cells in records:
        row = {key: record.get(column) for key, column in columns.items()}
        where = f"{'row' if csv_file else 'line'} {number} of {file.name}"
        sample = builder.new(_cell(row, "guid"), "", where, (file, number))
        if cells is not None and cells != len(found):  # cells misplaced: use none
            sample.split = _cell(row, "split") or (
                "train" if _has_label(row.get("label")) else "test"
            )
            sample.problems.append(
                Problem(sample.guid, None, _cell_count_problem(where, cells, found))
            )
            continue
        labelled = builder.label(sample, row.get("label"), required=False)
        sample.split = _cell(row, "split") or ("train" if labelled else "test")
        _manifest_files(builder, sample, row, root, encoding, where, columns)
    source = f"{'CSV' if csv_file else 'JSONL'} file {file.name}"
    return _finish_manifest(
        builder, root, notes + _column_notes(found, given), columns, given, source
    )


def _finish_manifest(
    builder: _Builder,
    root: Path,
    notes: list[str],
    columns: dict[str, str],
    given: dict[str, str],
    source: str,
) -> Dataset:
    dataset = builder.finish(root, "manifest", notes)
    dataset.modalities = tuple(m for m, keys in _MODALITY_KEYS if set(keys) & set(columns))
    dataset.columns, dataset.column_map, dataset.source = columns, given, source
    return dataset


@dataclass
class _Blob:
    """Image bytes from a Parquet / Arrow cell, on their way to being hashed and checked."""

    data: bytes
    ref: ImageRef


def _manifest_files(
    builder: _Builder,
    sample: Sample,
    row: dict,
    root: Path,
    encoding: str,
    where: str,
    columns: dict[str, str],
) -> None:
    """Inline `text` wins when it is not blank; otherwise `text_path` is read. Paths are
    relative to the manifest's folder (or absolute): the manifest names them explicitly.
    `row` holds the keys of `columns`; its image is a path, a _Blob, or None."""
    inline, image = row.get("text"), row.get("image")
    image = image.strip() if isinstance(image, str) else image
    text_path = _cell(row, "text_path")
    image_url = isinstance(image, str) and bool(_URL.match(image))
    image_read = False
    if text_path and not isinstance(inline, bytes) and not _label_text(inline).strip():
        if _URL.match(text_path):
            sample.problems.append(_url_problem(sample, "text", columns["text_path"], text_path))
        elif image and isinstance(image, str) and not image_url:
            builder.files(sample, root / text_path, root / image)
            image_read = True
        else:
            builder.text_file(sample, root / text_path)
    elif isinstance(inline, bytes):
        builder.text_bytes(sample, inline, where)
    elif "text" in columns or "text_path" in columns:
        builder.inline_text(sample, "" if inline is None else str(inline), encoding, where)
    if "image" not in columns or image_read:
        return
    if isinstance(image, _Blob):
        builder.image_bytes(sample, image.data, image.ref)
    elif image_url:
        sample.problems.append(_url_problem(sample, "image", columns["image"], image))
    elif image and isinstance(image, str):
        builder.image_file(sample, root / image)
    else:
        sample.problems.append(
            Problem(
                sample.guid,
                "image",
                f"no {columns['image']} (no image); fill it in or remove the row",
            )
        )


_URL = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)  # http://, https://, s3://, file://


def _url_problem(sample: Sample, modality: str, column: str, url: str) -> Problem:
    return Problem(
        sample.guid,
        modality,
        f"{column} {_clip(url)!r} is a URL; fusebench reads local files only: download it "
        "first and put its local path (relative to the manifest's folder) in the manifest",
    )
