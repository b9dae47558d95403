"""`load_dataset`: read the dataset at a path, whatever its layout.

Checks the request (format, `--column`, `--labels`, `--text-encoding`) before reading
anything, dispatches to the layout's reader (lab5.py, mvsa.py, manifest.py, tables.py) and
names the result after what was read. Errors about the dataset as a whole are one-line
ValueError / FileNotFoundError; per-sample reads never raise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from fusebench.extract.datasets.builder import _Builder
from fusebench.extract.datasets.detect import (
    _LAYOUTS,
    FORMATS,
    _manifest_source,
    _not_readable,
    dataset_identity,
    dataset_name,
    detect_format,
)
from fusebench.extract.datasets.lab5 import _LAB5_FILES, _read_lab5
from fusebench.extract.datasets.labels import LABELS
from fusebench.extract.datasets.manifest import _read_manifest, check_columns
from fusebench.extract.datasets.mvsa import _read_mvsa
from fusebench.extract.datasets.samples import Dataset
from fusebench.extract.datasets.tables import _hf_tables, _parquet_table, _read_tables


def load_dataset(
    path: str | Path,
    format: str | None = None,
    *,
    check_images: bool = False,
    text_encoding: str | None = None,
    labels: Sequence[str] | None = None,
    columns: dict[str, str] | None = None,
) -> Dataset:
    """Read a dataset (see the package docstring for the rules).

    check_images=True also decodes every image (slower, catches truncation);
    text_encoding forces the legacy encoding of the texts that are not UTF-8;
    labels fixes the classes, in that order (other labels are fatal per sample);
    columns maps a manifest's column names ({"text": "caption"}; keys: COLUMN_KEYS).
    """
    given = check_columns(columns)
    path = Path(path).expanduser().absolute()
    format = format or detect_format(path)
    if format not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}")
    if given and format != "manifest":
        raise ValueError(
            f"--column maps a manifest's columns, but {path} is a {format} dataset with fixed "
            "columns; drop --column"
        )
    builder = _Builder(
        vocabulary=None if format == "manifest" else LABELS,
        labels=labels,
        text_encoding=text_encoding,
        check_images=check_images,
    )
    try:
        if not path.exists():
            raise FileNotFoundError(
                f"dataset path {path} does not exist; pass --data pointing at the dataset"
            )
        return _read(path, format, builder, given)
    except FileNotFoundError:
        raise
    except OSError as err:  # the folder itself unreadable: per-sample reads never raise
        raise _not_readable(path, err) from err


def _read(path: Path, format: str, builder: _Builder, given: dict[str, str]) -> Dataset:
    """The dataset of `format` at `path`, which exists."""
    if format == "lab5":
        if not any((path / n).is_file() for n, _ in _LAB5_FILES):
            raise FileNotFoundError(
                f"{path} has neither train.txt nor test_without_label.txt; expected {_LAYOUTS}"
            )
        return _named(_read_lab5(path, builder), path)
    if format == "mvsa":
        if not (path / "labelResultAll.txt").is_file():
            raise FileNotFoundError(f"{path} has no labelResultAll.txt; expected {_LAYOUTS}")
        return _named(_read_mvsa(path, builder), path)
    return _read_manifest_source(path, builder, given)


def _read_manifest_source(path: Path, builder: _Builder, given: dict[str, str]) -> Dataset:
    """The manifest at `path`: a CSV / JSONL / Parquet file (or a folder holding one), or an
    HF datasets folder."""
    source = _manifest_source(path)
    if source is None:
        raise ValueError(f"{path} is not a manifest; expected {_LAYOUTS}")
    kind, file = source
    if kind in ("csv", "jsonl"):
        return _named(_read_manifest(file, builder, given), file)
    if kind == "parquet":
        tables = [_parquet_table(file)]
        dataset = _read_tables(file.parent, tables, builder, given, f"Parquet file {file.name}")
        return _named(dataset, file)
    tables = _hf_tables(file)
    splits = ", ".join(t.split for t in tables if t.split is not None)
    what = f"DatasetDict with splits {splits}" if splits else "one Dataset"
    dataset = _read_tables(file, tables, builder, given, f"HF datasets folder ({what})")
    return _named(dataset, file)


def _named(dataset: Dataset, read: Path) -> Dataset:
    """The dataset with its name and identity taken from what was read (`dataset_name`)."""
    dataset.name = dataset_name(read)
    dataset.path = dataset_identity(read, dataset.format)
    return dataset


def modality_problem(dataset: Dataset, modalities: Iterable[str], encoder: str) -> str | None:
    """One line when `encoder` reads a modality the dataset does not have (a text-only or
    image-only manifest), else None."""
    for modality in modalities:
        if modality in dataset.modalities:
            continue
        what, keys, other = (
            ("images", "image or image_path", "a text encoder (minilm, bert)")
            if modality == "image"
            else ("text", "text or text_path", "an image encoder (vit)")
        )
        key = keys.split(" or ")[0]
        return (
            f"encoder {encoder!r} reads {what}, but dataset {dataset.name} has none "
            f"({dataset.source or 'its manifest'} has no {keys} column); use {other}, or name "
            f"the column with --column {key}=NAME"
        )
    return None
