"""What every reader returns: a `Dataset` of `Sample`s, each with its `Problem`s attached, and
the `ImageRef` saying where an embedded image's bytes live.

Plain data: no reading here. A `Sample` holds every row of the index files, readable or not;
its fatal problems stop it for the encoders reading that modality (`Sample.failed`), its
non-fatal ones are notes. `Dataset.manifest()` is the input to the cache fingerprint.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    guid: str
    modality: str | None  # "text", "image", or None for the whole sample
    reason: str  # one line: what is wrong; the fix
    fatal: bool = True  # False for notes that do not stop the sample (e.g. fallback decode)


@dataclass(frozen=True)
class ImageRef:
    """Where an embedded image's bytes live, to re-read them when needed (`read_image_bytes`)
    instead of holding every image of a big dataset in memory."""

    kind: str  # "parquet" | "hf"
    file: Path  # the .parquet file, or the HF datasets folder
    row: int  # 0-based row in that file (Parquet) or in its split (HF)
    column: str
    split: str | None = None  # the split of an HF DatasetDict

    def __str__(self) -> str:  # "in row 3 (0-based) of manifest.parquet (column img)"
        where = f"split {self.split!r} of {self.file.name}" if self.split else self.file.name
        return f"in row {self.row} (0-based) of {where} (column {self.column})"


@dataclass
class Sample:
    guid: str
    split: str  # "train" / "test" (lab5), or the manifest's split column
    label: int  # index into Dataset.classes, -1 = none
    text: str | None = None  # decoded, trailing whitespace stripped; None when missing/unreadable
    text_encoding: str | None = None  # "utf-8", the dataset's legacy encoding, "latin-1", None
    text_sha: str | None = None  # sha256 of the raw text bytes (manifest inline text: of its UTF-8)
    image_path: Path | None = None  # None when the image file could not be read
    image_sha: str | None = None  # sha256 of the image file bytes
    problems: list[Problem] = field(default_factory=list)
    text_path: Path | None = None  # the text file read; None for inline text or none read
    index_line: tuple[Path, int] | None = None  # index file and 1-based line ending the row
    image_ref: ImageRef | None = None  # embedded image bytes (Parquet / HF); image_path is None
    row_files: tuple[Path, ...] = ()  # Parquet / Arrow file(s) holding the row (no index_line)

    def source_files(self) -> list[Path]:
        """The files this sample was read from, for the cache's record of its sources."""
        return [p for p in (self.text_path, self.image_path, *self.row_files) if p is not None]

    def failed(self, modalities: Iterable[str]) -> list[Problem]:
        """Fatal problems that stop this sample for an encoder reading `modalities`."""
        wanted = set(modalities)
        return [
            p for p in self.problems if p.fatal and (p.modality is None or p.modality in wanted)
        ]


@dataclass
class Dataset:
    name: str  # its cache folder's name: see `dataset_name` ("lab5-dev", "part1")
    root: Path  # the folder relative paths start from (a manifest's folder)
    format: str  # "lab5" | "mvsa" | "manifest"
    classes: tuple[str, ...]  # the labels of the labelled rows, or exactly `labels=`
    samples: list[Sample]  # dataset order (lab5: train.txt rows, then test_without_label.txt)
    notes: list[str] = field(default_factory=list)  # dataset-level remarks
    text_encoding: str | None = None  # legacy encoding of the non-UTF-8 texts; None: all UTF-8
    modalities: tuple[str, ...] = ("text", "image")  # a manifest may lack either
    columns: dict[str, str] = field(default_factory=dict)  # manifest: key -> column read
    column_map: dict[str, str] = field(default_factory=dict)  # `columns=` as given (--column)
    source: str = ""  # what was read, e.g. "Parquet file manifest.parquet"
    path: Path | None = None  # its identity: the manifest file read, or the dataset's folder

    def manifest(self) -> list[dict]:
        """JSON-able identity of every sample, in order: the input to the cache fingerprint."""
        return [
            {
                "guid": s.guid,
                "split": s.split,
                "label": s.label,
                "text_sha": s.text_sha,
                "image_sha": s.image_sha,
            }
            for s in self.samples
        ]

    def problems(self) -> list[Problem]:
        return [p for s in self.samples for p in s.problems]

    def labelled_outside_train(self) -> dict[str, int]:
        """Labelled rows per split other than "train": stage two fits and scores on the
        labelled "train" rows only, so these are not used for either."""
        return dict(Counter(s.split for s in self.samples if s.label >= 0 and s.split != "train"))
