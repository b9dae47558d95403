"""Dataset readers for stage one: lab5, MVSA-Single/Multiple, and manifests (CSV, JSONL,
Parquet, or a Hugging Face `datasets` folder written by `save_to_disk`).

Every reader returns a `Dataset` whose `samples` hold every row of the index files, in
file order, with its problems attached: nothing is dropped silently (docs/architecture.md §4). The
only rows that are not samples are blank lines and MVSA lines removed by the label-merge
rule, and those are counted by reason in `Dataset.notes`.

The rules every reader shares:
  - Classes are the labels the labelled rows carry (`Dataset.classes`; `Sample.label`
    indexes it). lab5 and MVSA accept the sentiment words only (any case) and keep them in
    the order negative, neutral, positive; a manifest accepts any string or integer label,
    ordered as the sentiment words when they are a subset of those, numerically when all are
    integers, else sorted (labels that differ only in case are one class). `labels=` (CLI
    `--labels a,b,c`) fixes the set and the order; a row with another label is a fatal
    problem for that sample.
  - Text is decoded UTF-8 first (a BOM is stripped; a UTF-16/32 BOM is honoured). The
    files that are not UTF-8 are in the dataset's ONE legacy encoding (`Dataset.text_encoding`),
    detected once over all of them (`detect_legacy_encoding`) or forced with `text_encoding=`
    (CLI `--text-encoding`). A file that encoding cannot decode is read as latin-1, the last
    resort. Every sample that needed either keeps a non-fatal note naming the encoding.
  - A guid names files `data/<guid>.txt|.jpg` (lab5, MVSA): a guid that holds '/', '\\' or
    NUL could name a file outside data/ and is a fatal problem for its sample; any OSError
    reading a sample's file (missing, a directory, a name too long, ...) is that sample's
    problem too. Errors about the dataset as a whole are one-line ValueError /
    FileNotFoundError.
  - Index files (train.txt, labelResultAll.txt, a manifest) are decoded like the texts; a
    manifest that is not UTF-8 sets the dataset's legacy encoding. CSV is read strictly: an
    unclosed quote is an error naming the line (not a cell that swallows the rest of the
    file), a row whose cell count differs from the header's is a fatal problem for its
    sample, blank rows are skipped, column names are stripped (lab5's also lower-cased).
    `Sample.index_line` numbers lines as the csv module does (at \n, \r\n or \r).
  - Images load as `transformers.image_utils.load_image` and the processors' `convert_to_rgb`
    do, see `to_rgb`.
  - Manifests: one row per sample with columns guid, text and/or text_path, image_path or
    image, label, split (`columns=` / CLI `--column KEY=NAME` maps other names; see
    `COLUMN_KEYS`). A manifest without a text column (or without an image column) is an
    image-only (text-only) dataset: `Dataset.modalities` says which it has. Without a split
    column a labelled row is "train", an unlabelled one "test"; an HF DatasetDict's split
    names are the split column unless it has one. An image is a path relative to the
    manifest's folder, or bytes embedded in a Parquet / Arrow column (binary, or the
    {bytes, path} struct of an HF Image feature); `image_sha` hashes the file or the bytes.
    Embedded bytes are never kept: `Sample.image_ref` says where to re-read them and
    `open_sample_image` does (one Parquet row group per process at most). Parquet needs
    pyarrow, HF folders `datasets`: optional extras, imported only when such data is read.

Problem reasons are one line: what is wrong, then "; " and the fix.

One module per source format, plus the pieces they share (each opens with its contract):
  samples.py   Problem, ImageRef, Sample, Dataset: what every reader returns
  text.py      UTF-8 first, then the dataset's one legacy encoding (detected), then latin-1
  files.py     a sample's file bytes or the error reading them; names in messages
  images.py    images as the reference loader sees them (`to_rgb`), and why a file is none
  embedded.py  image bytes in Parquet / HF files, re-read when needed; the optional extras
  labels.py    label words -> classes
  builder.py   the sample builder every reader shares
  index.py     index files: decoding, strict CSV, required columns
  lab5.py, mvsa.py, manifest.py (CSV / JSONL and the column mapping), tables.py (Parquet, HF):
               the readers, one per source format
  detect.py    detect_format, dataset_name, dataset_identity
  load.py      load_dataset, modality_problem
  report.py    check_report, problem_kind, protocol_notes
This package re-exports the names the rest of fusebench imports.
"""

from __future__ import annotations

from fusebench.extract.datasets.detect import (
    FORMATS,
    HF_MARKERS,
    MANIFEST_FILES,
    dataset_identity,
    dataset_name,
    detect_format,
)
from fusebench.extract.datasets.embedded import read_image_bytes
from fusebench.extract.datasets.files import _read_bytes, _shown, _unreadable
from fusebench.extract.datasets.images import (
    _check_image_bytes,
    _decode_failure,
    _rotated,
    check_image,
    load_image,
    open_sample_image,
    to_rgb,
)
from fusebench.extract.datasets.labels import LABELS, split_labels
from fusebench.extract.datasets.load import load_dataset, modality_problem
from fusebench.extract.datasets.manifest import COLUMN_KEYS, check_columns, parse_columns
from fusebench.extract.datasets.report import check_report, problem_kind, protocol_notes
from fusebench.extract.datasets.samples import Dataset, ImageRef, Problem, Sample
from fusebench.extract.datasets.text import (
    LEGACY_ENCODINGS,
    check_encoding_name,
    decode_text,
    detect_legacy_encoding,
)

__all__ = [
    "COLUMN_KEYS",
    "FORMATS",
    "HF_MARKERS",
    "LABELS",
    "LEGACY_ENCODINGS",
    "MANIFEST_FILES",
    "Dataset",
    "ImageRef",
    "Problem",
    "Sample",
    "check_columns",
    "check_encoding_name",
    "check_image",
    "check_report",
    "dataset_identity",
    "dataset_name",
    "decode_text",
    "detect_format",
    "detect_legacy_encoding",
    "load_dataset",
    "load_image",
    "modality_problem",
    "open_sample_image",
    "parse_columns",
    "problem_kind",
    "protocol_notes",
    "read_image_bytes",
    "split_labels",
    "to_rgb",
    # private helpers extract/fastimage.py and extract/images.py borrow, to load images as
    # `open_sample_image` does and word their problems alike
    "_check_image_bytes",
    "_decode_failure",
    "_read_bytes",
    "_rotated",
    "_shown",
    "_unreadable",
]
