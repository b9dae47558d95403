"""Dataset readers for stage one: lab5, MVSA-Single/Multiple, and manifests (CSV, JSONL,
Parquet, or a Hugging Face `datasets` folder written by `save_to_disk`).

Every reader returns a `Dataset` whose `samples` hold every row of the index files, in
file order, with its problems attached: nothing is dropped silently (DESIGN §3, §10). The
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
"""

from __future__ import annotations

import codecs
import csv
import errno
import hashlib
import importlib
import io
import json
import math
import os
import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")  # lab5 / MVSA label words
FORMATS: tuple[str, ...] = ("lab5", "mvsa", "manifest")
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
MANIFEST_FILES: tuple[str, ...] = ("manifest.csv", "manifest.jsonl", "manifest.parquet")
HF_MARKERS: tuple[str, ...] = ("dataset_dict.json", "state.json", "dataset_info.json")

# Candidates for a dataset's legacy text encoding, in order of preference (ties keep it).
# The East Asian multi-byte codecs come first: many byte strings are invalid in them, so
# decoding every file strictly is strong evidence (GB18030 is what lab5 was re-saved in).
# Then the two Windows code pages most exports use, Western before Cyrillic; they decode
# almost any bytes, so they win where the multi-byte ones fail, or where charset-normalizer
# finds their text the least messy. Other code pages (cp1250, cp1253-cp1257) are left out on
# purpose: on short texts charset-normalizer rates them as clean as cp1252 (French read as
# cp1257 scores better than the truth), so offering them would mis-read Western data. A
# dataset in one of them says so with --text-encoding.
LEGACY_ENCODINGS: tuple[str, ...] = ("gb18030", "big5", "shift_jis", "euc-kr", "cp1252", "cp1251")

# Leading bytes of the image formats PIL decodes that datasets actually ship.
_IMAGE_MAGIC: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)
_NO_LABEL = ("", "null", "none", "nan")  # tags that mean "unlabelled"
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # fmt: skip
_UNICODE = ("utf-8", "utf-16", "utf-32")  # what a text file can be besides its legacy encoding
_SHOWN_NAME = 60  # longest file or guid name shown in a message before it is cut with "…"


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
    name: str  # folder name, e.g. "lab5-dev"
    root: Path
    format: str  # "lab5" | "mvsa" | "manifest"
    classes: tuple[str, ...]  # the labels of the labelled rows, or exactly `labels=`
    samples: list[Sample]  # dataset order (lab5: train.txt rows, then test_without_label.txt)
    notes: list[str] = field(default_factory=list)  # dataset-level remarks
    text_encoding: str | None = None  # legacy encoding of the non-UTF-8 texts; None: all UTF-8
    modalities: tuple[str, ...] = ("text", "image")  # a manifest may lack either
    columns: dict[str, str] = field(default_factory=dict)  # manifest: key -> column read
    column_map: dict[str, str] = field(default_factory=dict)  # `columns=` as given (--column)
    source: str = ""  # what was read, e.g. "Parquet file manifest.parquet"

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


# --------------------------------------------------------------------------- text


def _decode_unicode(raw: bytes) -> tuple[str, str] | None:
    """UTF-8 (BOM stripped), or UTF-16/32 when the file starts with their BOM; else None."""
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        pass
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(encoding), encoding
            except UnicodeDecodeError:
                return None
    return None


def decode_text(raw: bytes, legacy: str | None = None) -> tuple[str, str]:
    """Decode bytes as UTF-8 (BOM stripped; a UTF-16/32 BOM is honoured), else strictly as
    the `legacy` encoding, else latin-1 (every byte is a character). Never raises."""
    unicode = _decode_unicode(raw)
    if unicode is not None:
        return unicode
    if legacy:
        try:
            return raw.decode(legacy), legacy
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1"), "latin-1"


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def _non_ascii_lines(raws: Sequence[bytes], limit: int) -> list[bytes]:
    """The lines holding non-ASCII bytes, thinned evenly to about `limit` bytes in all.
    Splitting at b"\\n" is safe: no candidate uses 0x0A inside a multi-byte character."""
    lines = [line for raw in raws for line in raw.split(b"\n") if not line.isascii()]
    total = sum(len(line) + 1 for line in lines)
    return lines[:: max(1, math.ceil(total / limit))]


def detect_legacy_encoding(raws: Sequence[bytes]) -> str | None:
    """The one legacy encoding of a dataset's non-UTF-8 texts `raws` (None when there are none).

    Each candidate of LEGACY_ENCODINGS is judged by the text it would give, as `decode_text`
    gives it: the non-ASCII lines decoded strictly by the candidate, or as latin-1 where it
    cannot. The text charset-normalizer finds least messy wins; ties go to the candidate that
    decodes more files strictly, then to the earlier one. "Decodes every file strictly" alone
    cannot settle it: cp1251 decodes almost any bytes, so one damaged file would otherwise
    hand a GB18030 dataset to cp1251 and garble every other text.
    """
    if not raws:
        return None
    from charset_normalizer.md import mess_ratio

    fails = {e: sum(not _decodes(raw, e) for raw in raws) for e in LEGACY_ENCODINGS}
    lines = _non_ascii_lines(raws, limit=1 << 16)

    def score(encoding: str) -> tuple[float, int, int]:
        text = "\n".join(decode_text(line, encoding)[0] for line in lines)
        mess = mess_ratio(text, maximum_threshold=1.0)
        return round(mess, 2), fails[encoding], LEGACY_ENCODINGS.index(encoding)

    return min(LEGACY_ENCODINGS, key=score)


def check_encoding_name(name: str) -> str:
    """Python's name for a text encoding given by a user; ValueError naming the fix if unknown."""
    try:
        return codecs.lookup(name.strip()).name
    except LookupError:
        raise ValueError(
            f"unknown text encoding {name!r}; pass a Python codec name such as "
            f"{', '.join(LEGACY_ENCODINGS[:5])}"
        ) from None


# --------------------------------------------------------------------------- images


def _shown(path: Path) -> str:
    """Short form of a file path for messages, e.g. "data/12.jpg"; long names are cut."""
    name = path.name if len(path.name) <= _SHOWN_NAME else f"{path.name[:_SHOWN_NAME]}…"
    return f"{path.parent.name}/{name}" if path.parent.name else name


def _clip(text: str, width: int = _SHOWN_NAME) -> str:
    return text if len(text) <= width else f"{text[:width]}… ({len(text)} characters)"


def _is_image(head: bytes) -> bool:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return any(head.startswith(magic) for magic in _IMAGE_MAGIC)


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image as mode "L", its values SCALED, never
    clipped: I;16* by 255/65535; "I" likewise when its values fit 16 bits (as is when they
    fit 0..255); "F" from 0..1 (as is when it fits 0..255); anything else min-max."""
    pixels = np.asarray(image).astype(np.float64)  # (H, W)
    pixels[~np.isfinite(pixels)] = 0.0
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and 255 < high <= 65535):
        pixels = pixels * (255 / 65535)
    elif image.mode == "F" and low >= 0 and high <= 1:
        pixels = pixels * 255
    elif low < 0 or high > 255:
        pixels = (pixels - low) * (255 / (high - low))
    return Image.fromarray(np.rint(pixels).astype(np.uint8))  # (H, W) uint8 -> "L"


def _rotated(image: Image.Image) -> bool:
    """Whether the EXIF orientation asks for a transpose (reading it is cheap; transposing
    copies the image, so only then)."""
    return image.getexif().get(ExifTags.Base.Orientation, 1) not in (1, None)


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image as the model's reference loader sees it, in RGB.

    As `transformers.image_utils.load_image`: the EXIF orientation is applied. As the
    processors' `convert_to_rgb`: transparency (an alpha band, or a palette / grey image
    with a transparent colour) is composited onto WHITE, so a transparent pixel is white
    whatever colour it hides. Unlike a bare `convert("RGB")`, which clips 16-bit and float
    pixels to 255 (a 16-bit PNG comes out almost white), modes I;16, I and F are scaled to
    0..255 first (see `_scaled_to_8bit`).
    """
    image = ImageOps.exif_transpose(image, in_place=False) if _rotated(image) else image
    if image.mode.startswith("I") or image.mode == "F":
        image = _scaled_to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _decode_image(shown: str, data: bytes) -> Image.Image:
    """Fully decode image bytes to RGB (see `to_rgb`); ValueError(one-line reason) if not."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now so truncation fails here, not inside a processor
            return to_rgb(img)
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, ... on bad files
        raise ValueError(_decode_failure(shown, err)) from err


def _check_image_bytes(shown: str, data: bytes, *, decode: bool) -> str | None:
    fix = "re-export or remove the sample"
    if not data:
        return f"image {shown} is empty (0 bytes); {fix}"
    if not _is_image(data[:16]):
        return f"image {shown} is not an image (starts with {data[:12]!r}); replace it or remove the sample"
    if decode:
        try:
            _decode_image(shown, data)
        except ValueError as err:
            return str(err)
    return None


def _decode_failure(shown: str, err: Exception) -> str:
    message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))  # no address
    message = " ".join(message.split()) or type(err).__name__
    what = "is truncated" if "truncated" in message else "cannot be decoded"
    return f"image {shown} {what} (PIL: {_clip(message, 120)}); re-export or remove the sample"


def _unreadable(what: str, path: Path, err: OSError | ValueError) -> str:
    if isinstance(err, FileNotFoundError):
        return f"{what} {_shown(path)} not found; add the file or remove the sample"
    if isinstance(err, ValueError):  # open() refuses a path holding NUL
        return (
            f"{what} path {_shown(path)!r} holds a NUL character; fix the path or remove the sample"
        )
    if err.errno == errno.ENAMETOOLONG:
        return (
            f"{what} {_shown(path)} cannot be read (file name too long for the file system); "
            "shorten the guid or path, or remove the sample"
        )
    return f"{what} {_shown(path)} cannot be read ({err.strerror or err}); fix the file or remove the sample"


def _too_long(result: bytes | Exception) -> bool:
    return isinstance(result, OSError) and result.errno == errno.ENAMETOOLONG


def _read_bytes(path: Path) -> bytes | OSError | ValueError:
    """The file's bytes, or the error reading it (a per-sample problem, never raised)."""
    try:
        return path.read_bytes()
    except (OSError, ValueError) as err:
        return err


def check_image(path: Path, *, decode: bool) -> str | None:
    """Return why `path` is not a usable image, or None.

    decode=False reads the bytes only (exists, not empty, a known image signature);
    decode=True also decodes every pixel and converts it as `load_image` does, which is what
    catches truncated JPEGs.
    """
    path = Path(path)
    data = _read_bytes(path)
    if not isinstance(data, bytes):
        return _unreadable("image", path, data)
    return _check_image_bytes(_shown(path), data, decode=decode)


def load_image(path: Path) -> Image.Image:
    """Read, fully decode and convert to RGB as the model's reference loader does (`to_rgb`:
    EXIF orientation, transparency onto white, 16-bit / float scaled); ValueError(one-line
    reason) if that fails."""
    path = Path(path)
    data = _read_bytes(path)
    if not isinstance(data, bytes):
        raise ValueError(_unreadable("image", path, data))
    reason = _check_image_bytes(_shown(path), data, decode=False)
    if reason is not None:
        raise ValueError(reason)
    return _decode_image(_shown(path), data)


def open_sample_image(sample: Sample) -> Image.Image:
    """A sample's image, file or embedded bytes, decoded as `load_image` does; ValueError
    (one-line reason) if that fails. What the extraction loop and `cache verify` both use."""
    ref = sample.image_ref
    if ref is None:
        if sample.image_path is None:
            raise ValueError(f"sample {sample.guid} has no image; add one or remove the sample")
        return load_image(sample.image_path)
    data = read_image_bytes(ref)
    reason = _check_image_bytes(str(ref), data, decode=False)
    if reason is not None:
        raise ValueError(reason)
    return _decode_image(str(ref), data)


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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- labels


def _label_key(tag: str) -> str:
    """What two spellings of one label share: integers by value, words ignoring case."""
    value = tag.strip()
    return str(int(value)) if re.fullmatch(r"[+-]?\d+", value) else value.casefold()


class _Labels:
    """Label words -> classes. Which words are valid: `given` (--labels) when set, else
    `vocabulary` (lab5/MVSA: the sentiment words), else any."""

    def __init__(self, vocabulary: tuple[str, ...] | None, given: Sequence[str] | None) -> None:
        self.given = _given_labels(given)
        self._given_keys = {_label_key(g) for g in self.given or ()}
        self.vocabulary = vocabulary
        self.spellings: dict[str, list[str]] = {}  # key -> spellings seen, first first
        self.order: tuple[str, ...] | None = None  # an HF ClassLabel's names: the class order

    def parse(self, tag: object, *, required: bool) -> tuple[str | None, str | None]:
        """(class key, or None when unlabelled; the reason when the tag is not a valid label).
        No label ("", "null") is a problem only where a label is `required`."""
        text = _label_text(tag)
        if text.strip().casefold() in _NO_LABEL:
            return None, (self.unknown(text) if required else None)
        key = _label_key(text)
        if self.given is not None:
            if key not in self._given_keys:
                return None, self.unknown(text)
        elif self.vocabulary is not None and key not in self.vocabulary:
            return None, self.unknown(text)
        spellings = self.spellings.setdefault(key, [])
        if text.strip() not in spellings:
            spellings.append(text.strip())
        return key, None

    def unknown(self, text: str) -> str:
        if self.given is not None:
            return (
                f"unknown label {text!r}: not in --labels {', '.join(self.given) or '(none)'}; "
                "fix the row or add the label to --labels"
            )
        return f"unknown label {text!r}; use one of {', '.join(self.vocabulary or ())}"

    def classes(self) -> tuple[str, ...]:
        if self.given is not None:
            return self.given
        keys = list(self.spellings)
        if self.order is not None:  # the dataset's own ClassLabel order, absent names left out
            ordered = [n for n in self.order if _label_key(n) in self.spellings]
            known = {_label_key(n) for n in ordered}
            return (*ordered, *(self.spellings[k][0] for k in sorted(keys) if k not in known))
        if set(keys) <= set(LABELS):
            return tuple(w for w in LABELS if w in self.spellings)
        if all(re.fullmatch(r"[+-]?\d+", k) for k in keys):
            return tuple(sorted(keys, key=int))
        return tuple(self.spellings[k][0] for k in sorted(keys))  # keys ignore case

    def index(self) -> dict[str, int]:
        return {_label_key(name): i for i, name in enumerate(self.classes())}

    def notes(self) -> list[str]:
        notes = []
        if self.given is not None:
            unused = [g for g in self.given if _label_key(g) not in self.spellings]
            if unused:
                notes.append(f"--labels {', '.join(unused)}: no labelled row carries it")
        classes = dict(zip(self.index(), self.classes()))
        for key, spellings in self.spellings.items():
            if len(spellings) > 1 and self.vocabulary is None:  # lab5/MVSA words: any case
                notes.append(
                    f"labels {', '.join(map(repr, spellings))} are one class {classes[key]!r} "
                    "(labels match ignoring case)"
                )
        return notes


def _label_text(tag: object) -> str:
    if tag is None:
        return ""
    if isinstance(tag, float) and tag.is_integer():
        return str(int(tag))  # JSON 1.0, as pandas writes an integer column holding nulls
    return str(tag)


def _given_labels(given: Sequence[str] | None) -> tuple[str, ...] | None:
    if given is None:
        return None
    names = tuple(str(g).strip() for g in given)  # () is allowed: no classes, as stored
    if any(n.casefold() in _NO_LABEL for n in names):  # for a dataset without labelled rows
        raise ValueError(
            f"--labels {','.join(names)!r} needs class names, e.g. --labels negative,positive"
        )
    repeated = [n for n, count in Counter(map(_label_key, names)).items() if count > 1]
    if repeated:
        raise ValueError(f"--labels lists {repeated[0]!r} twice; list each class once")
    return names


def split_labels(text: str | None) -> tuple[str, ...] | None:
    """`--labels negative,positive` -> ("negative", "positive"); None stays None."""
    return None if text is None else tuple(name.strip() for name in text.split(","))


# --------------------------------------------------------------------------- building samples


@dataclass
class _PendingText:
    sample: Sample
    raw: bytes
    shown: str  # "text data/12.txt"
    at: int  # where in sample.problems its problems go, so they keep reading order


class _Builder:
    """Builds a dataset's samples in file order. Duplicate guids and label words are checked
    as rows come; label indexes and text decoding wait for `finish`, when the dataset's
    classes and its legacy encoding are known."""

    def __init__(
        self,
        *,
        vocabulary: tuple[str, ...] | None,
        labels: Sequence[str] | None,
        text_encoding: str | None,
        check_images: bool,
    ) -> None:
        self.labels = _Labels(vocabulary, labels)
        self.forced = check_encoding_name(text_encoding) if text_encoding else None
        self.legacy: str | None = None  # set by a non-UTF-8 manifest: the dataset's encoding
        self.check_images = check_images
        self.samples: list[Sample] = []
        self._keys: list[tuple[Sample, str]] = []  # labelled samples and their label keys
        self._texts: list[_PendingText] = []
        self._first_seen: dict[str, str] = {}  # guid -> "row R of FILE"

    def new(self, guid: str, split: str, where: str, index_line: tuple[Path, int] | None) -> Sample:
        sample = Sample(guid, split, -1, index_line=index_line)
        if not guid:
            sample.problems.append(
                Problem(guid, None, f"{where} has no guid; fill it in or remove the row")
            )
        elif guid in self._first_seen:
            first = self._first_seen[guid]
            sample.problems.append(
                Problem(guid, None, f"duplicate guid; first seen at {first}; remove one")
            )
        else:
            self._first_seen[guid] = where
        self.samples.append(sample)
        return sample

    def label(self, sample: Sample, tag: object, *, required: bool) -> bool:
        """Record the sample's label; False when it has none. No label ("", "null") is
        fatal only where a label is required; an invalid label always is."""
        key, reason = self.labels.parse(tag, required=required)
        if reason is not None:
            sample.problems.append(Problem(sample.guid, None, reason))
        if key is not None:
            self._keys.append((sample, key))
        return key is not None

    def text_file(self, sample: Sample, path: Path, raw: bytes | Exception | None = None) -> None:
        raw = _read_bytes(path) if raw is None else raw
        if not isinstance(raw, bytes):
            sample.problems.append(Problem(sample.guid, "text", _unreadable("text", path, raw)))
            return
        sample.text_path, sample.text_sha = path, _sha256(raw)
        self._texts.append(_PendingText(sample, raw, f"text {_shown(path)}", len(sample.problems)))

    def inline_text(self, sample: Sample, text: str, encoding: str, where: str) -> None:
        """Text from a manifest cell; `encoding` is the manifest file's. Only a text with
        non-ASCII characters depended on it (ASCII is UTF-8 too)."""
        sample.text_sha = _sha256(text.encode("utf-8"))
        legacy = encoding not in _UNICODE and not text.isascii()
        if legacy:
            how = "--text-encoding" if self.forced else "detected"
            sample.problems.append(
                _fallback_note(sample.guid, f"text in {where}", encoding, encoding, how)
            )
        sample.problems += _set_text(sample, text, encoding if legacy else "utf-8", "text")

    def image_file(self, sample: Sample, path: Path, data: bytes | Exception | None = None) -> None:
        data = _read_bytes(path) if data is None else data
        if not isinstance(data, bytes):
            sample.problems.append(Problem(sample.guid, "image", _unreadable("image", path, data)))
            return
        sample.image_path, sample.image_sha = path, _sha256(data)
        reason = _check_image_bytes(_shown(path), data, decode=self.check_images)
        if reason is not None:
            sample.problems.append(Problem(sample.guid, "image", reason))

    def text_bytes(self, sample: Sample, raw: bytes, where: str) -> None:
        """Text stored as bytes in a Parquet / Arrow cell: decoded like a text file."""
        sample.text_sha = _sha256(raw)
        self._texts.append(_PendingText(sample, raw, f"text in {where}", len(sample.problems)))

    def image_bytes(self, sample: Sample, data: bytes, ref: ImageRef) -> None:
        """Image bytes embedded in the manifest: hashed and checked now, re-read when needed."""
        sample.image_ref, sample.image_sha = ref, _sha256(data)
        reason = _check_image_bytes(str(ref), data, decode=self.check_images)
        if reason is not None:
            sample.problems.append(Problem(sample.guid, "image", reason))

    def files(self, sample: Sample, text_path: Path, image_path: Path) -> None:
        """Read a sample's text and image files. When both fail alike (neither exists, or
        both names are too long) that is one sample-level problem."""
        raw, data = _read_bytes(text_path), _read_bytes(image_path)
        both = f"{_shown(text_path)} or {_shown(image_path)}"
        if isinstance(raw, FileNotFoundError) and isinstance(data, FileNotFoundError):
            reason = f"no {both}; add the files or remove the row"
        elif _too_long(raw) and _too_long(data):
            reason = (
                f"file names {both} are too long for the file system; shorten the guid or "
                "the paths, or remove the sample"
            )
        else:
            self.text_file(sample, text_path, raw)
            self.image_file(sample, image_path, data)
            return
        sample.problems.append(Problem(sample.guid, None, reason))

    def data_files(self, sample: Sample, data: Path) -> None:
        """data/<guid>.txt and data/<guid>.jpg, unless the guid cannot name a file in data/."""
        unsafe = _unsafe_guid(sample.guid)
        if unsafe:
            sample.problems.append(
                Problem(
                    sample.guid,
                    None,
                    f"guid {_clip(sample.guid)!r} {unsafe}, so data/<guid>.txt could name a file "
                    "outside data/; rename the sample to a plain name",
                )
            )
        elif sample.guid:
            self.files(sample, data / f"{sample.guid}.txt", data / f"{sample.guid}.jpg")

    def finish(self, root: Path, format: str, notes: list[str]) -> Dataset:
        index = self.labels.index()
        for sample, key in self._keys:
            sample.label = index[key]
        text_encoding = self._decode_texts()
        if not self.samples:
            raise ValueError(f"{root} has no samples ({'; '.join(notes) or 'no rows'}); add rows")
        return Dataset(
            root.name,
            root,
            format,
            self.labels.classes(),
            self.samples,
            [*notes, *self.labels.notes()],
            text_encoding,
        )

    def _decode_texts(self) -> str | None:
        legacy_raws = [t.raw for t in self._texts if _decode_unicode(t.raw) is None]
        how = "--text-encoding" if self.forced else "detected"
        legacy = self.forced or self.legacy or detect_legacy_encoding(legacy_raws)
        for t in self._texts:
            text, encoding = decode_text(t.raw, legacy)
            notes = [] if encoding in _UNICODE else [
                _fallback_note(t.sample.guid, t.shown, encoding, legacy, how)
            ]  # fmt: skip
            problems = _set_text(t.sample, text, encoding, t.shown)
            t.sample.problems[t.at : t.at] = notes + problems
        used = {s.text_encoding for s in self.samples} - {None, *_UNICODE}
        return legacy if used else None


def _set_text(sample: Sample, text: str, encoding: str, what: str) -> list[Problem]:
    """Store decoded text; returns the problem (empty text) to file with the sample."""
    sample.text, sample.text_encoding = text.rstrip(), encoding
    if sample.text.strip():
        return []
    return [Problem(sample.guid, "text", f"{what} is empty; write the text or remove the sample")]


def _fallback_note(
    guid: str, what: str, used: str, legacy: str | None, how: str = "detected"
) -> Problem:
    if used == "latin-1":
        tried = f"UTF-8 nor {legacy}" if legacy else "UTF-8"
        reason = (
            f"{what} is neither {tried}; decoded as latin-1, the last resort (some characters "
            "may be wrong); re-save it as UTF-8 or pass --text-encoding"
        )
    else:
        reason = (
            f"{what} is not UTF-8; decoded as {used}, the dataset's legacy encoding ({how}); "
            "pass --text-encoding if it reads wrong"
        )
    return Problem(guid, "text", reason, fatal=False)


def _unsafe_guid(guid: str) -> str | None:
    """Why `guid` cannot be a file name inside data/, or None."""
    if "\x00" in guid:
        return "holds a NUL character"
    for char in ("/", "\\"):
        if char in guid:
            return f"holds {char!r}"
    return None


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
    if _decode_unicode(raw) is None:
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


# --------------------------------------------------------------------------- lab5

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


# --------------------------------------------------------------------------- mvsa

_POS_NEG = "positive-vs-negative conflict"
_NO_MAJORITY = "no majority"


def _majority(labels: list[str]) -> str | None:
    label, count = Counter(labels).most_common(1)[0]
    return label if count * 2 > len(labels) else None


def _merge_pair(text: str, image: str) -> str | None:
    """CLMLF rule: equal labels keep it; one neutral takes the other; pos vs neg is dropped."""
    if text == image:
        return text
    if "neutral" in (text, image):
        return image if text == "neutral" else text
    return None


def _merge_mvsa(pairs: list[tuple[str, str]]) -> tuple[str | None, str]:
    """Merge one line's (text, image) annotations to a label, or (None, why it is dropped)."""
    text = _majority([t for t, _ in pairs])
    image = _majority([i for _, i in pairs])
    if text is None or image is None:
        return None, _NO_MAJORITY
    merged = _merge_pair(text, image)
    return merged, ("" if merged else _POS_NEG)


def _mvsa_pairs(columns: list[str]) -> list[tuple[str, str]] | None:
    """[(text, image), ...] from "text,image" cells; None unless 1 or 3 valid pairs."""
    pairs = []
    for cell in columns:
        text, _, image = cell.lower().replace(" ", "").partition(",")
        if text not in LABELS or image not in LABELS:
            return None
        pairs.append((text, image))
    return pairs if len(pairs) in (1, 3) else None


def _read_mvsa(root: Path, builder: _Builder) -> Dataset:
    data = _require_data_dir(root, "mvsa")
    index = root / "labelResultAll.txt"
    text, _, notes = _decode_index(index, builder)
    dropped: dict[str, list[str]] = {_POS_NEG: [], _NO_MAJORITY: []}
    annotators: Counter[int] = Counter()
    for number, line in enumerate(_lines(text), start=1):
        cells = [c.strip() for c in line.split("\t")]
        if not line.strip() or (number == 1 and cells[0].lower() == "id"):
            continue
        guid, columns = cells[0], cells[1:]
        where = f"line {number} of labelResultAll.txt"
        pairs = _mvsa_pairs(columns)
        if pairs is None:
            sample = builder.new(guid, "train", where, (index, number))
            sample.problems.append(
                Problem(
                    guid,
                    None,
                    f"{where} has labels {_clip(' '.join(columns))!r}; "
                    f"write 1 or 3 tab-separated 'text,image' pairs of {', '.join(LABELS)}",
                )
            )
        else:
            annotators[len(pairs)] += 1
            label, why = _merge_mvsa(pairs)
            if label is None:
                dropped[why].append(guid)
                continue
            sample = builder.new(guid, "train", where, (index, number))
            builder.label(sample, label, required=True)
        builder.data_files(sample, data)
    return builder.finish(root, "mvsa", notes + _mvsa_notes(annotators, dropped))


def _mvsa_notes(annotators: Counter[int], dropped: dict[str, list[str]]) -> list[str]:
    kinds = {1: "MVSA-Single, 1 annotation", 3: "MVSA-Multiple, 3 annotations"}
    read = ", ".join(f"{n} lines {kinds[k]} each" for k, n in sorted(annotators.items()))
    total = sum(len(guids) for guids in dropped.values())
    notes = [f"labelResultAll.txt: {read or 'no label lines'}"]
    counts = ", ".join(
        f"{len(guids)} {why} (e.g. {', '.join(guids[:5])})"
        for why, guids in dropped.items()
        if guids
    )
    notes.append(
        f"dropped {total} lines by the label-merge rule" + (f": {counts}" if counts else "")
    )
    return notes


# --------------------------------------------------------------------------- manifest

_NEED = "guid, text or text_path and/or image or image_path"
_DEFAULT_ORDER = ("guid", "text", "text_path", "image_path", "image", "label", "split")
_MODALITY_KEYS = (("text", ("text", "text_path")), ("image", ("image",)))
_BIG_ROW_GROUP = 256 << 20  # bytes: above this a note says how much a loading worker holds


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
            sample.split = _cell(row, "split") or ("train" if _cell(row, "label") else "test")
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
    image_read = False
    if text_path and not isinstance(inline, bytes) and not _label_text(inline).strip():
        if image and isinstance(image, str):
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
    if names is not None and isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < len(names):
            label = names[label]
        else:  # -1 is how HF marks an unlabelled row; anything else is not a class
            if label != -1:
                sample.problems.append(
                    Problem(
                        sample.guid,
                        None,
                        f"label {label} in {where} is not a class of ClassLabel column "
                        f"{columns['label']!r} ({', '.join(names)}); fix the row",
                    )
                )
            label = None
    labelled = builder.label(sample, label, required=False)
    sample.split = _cell(values, "split") or table.split or ("train" if labelled else "test")
    image = values.get("image")
    if isinstance(image, dict):  # HF Image struct: the bytes when stored, else the path
        image = image.get("bytes") if image.get("bytes") is not None else image.get("path")
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = _Blob(bytes(image), table.ref(row, columns["image"]))
    values["image"] = image
    _manifest_files(builder, sample, values, root, "utf-8", where, columns)


# --------------------------------------------------------------------------- entry points

_LAYOUTS = (
    "lab5 (a folder with train.txt and/or test_without_label.txt, plus data/), "
    "mvsa (a folder with labelResultAll.txt, plus data/), "
    "or manifest (a .csv/.jsonl/.parquet file, a folder with one manifest.csv, manifest.jsonl "
    "or manifest.parquet, or an HF datasets folder written by save_to_disk)"
)


def _manifest_source(path: Path) -> tuple[str, Path] | None:
    """("csv" | "jsonl" | "parquet", file) or ("hf", folder) for the manifest at `path`; None
    when there is none, or when a folder holds several (reading one would be a guess)."""
    if path.is_file():
        kind = path.suffix.lower().lstrip(".")
        return (kind, path) if kind in ("csv", "jsonl", "parquet") else None
    found = [(n.rsplit(".", 1)[1], path / n) for n in MANIFEST_FILES if (path / n).is_file()]
    if any((path / marker).is_file() for marker in HF_MARKERS):
        found.append(("hf", path))
    return found[0] if len(found) == 1 else None


def _not_readable(path: Path, err: OSError) -> ValueError:
    return ValueError(
        f"cannot read dataset path {path} ({err.strerror or err}); check that it exists and "
        "that you may read it"
    )


def detect_format(path: Path) -> str:
    """Name the layout at `path`: "lab5", "mvsa" or "manifest"; ValueError if none fits."""
    path = Path(path)
    try:
        if not path.exists():
            raise FileNotFoundError(
                f"dataset path {path} does not exist; pass --data pointing at the dataset"
            )
        if path.is_dir() and any((path / n).is_file() for n, _ in _LAB5_FILES):
            return "lab5"
        if path.is_dir() and (path / "labelResultAll.txt").is_file():
            return "mvsa"
        if _manifest_source(path) is not None:
            return "manifest"
    except FileNotFoundError:
        raise
    except OSError as err:
        raise _not_readable(path, err) from err
    raise ValueError(f"cannot tell the dataset layout of {path}; expected {_LAYOUTS}")


def load_dataset(
    path: str | Path,
    format: str | None = None,
    *,
    check_images: bool = False,
    text_encoding: str | None = None,
    labels: Sequence[str] | None = None,
    columns: dict[str, str] | None = None,
) -> Dataset:
    """Read a dataset (see the module docstring for the rules).

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
        if format == "lab5":
            if not any((path / n).is_file() for n, _ in _LAB5_FILES):
                raise FileNotFoundError(
                    f"{path} has neither train.txt nor test_without_label.txt; expected {_LAYOUTS}"
                )
            return _read_lab5(path, builder)
        if format == "mvsa":
            if not (path / "labelResultAll.txt").is_file():
                raise FileNotFoundError(f"{path} has no labelResultAll.txt; expected {_LAYOUTS}")
            return _read_mvsa(path, builder)
        source = _manifest_source(path)
        if source is None:
            raise ValueError(f"{path} is not a manifest; expected {_LAYOUTS}")
        kind, file = source
        if kind in ("csv", "jsonl"):
            return _read_manifest(file, builder, given)
        if kind == "parquet":
            tables = [_parquet_table(file)]
            return _read_tables(file.parent, tables, builder, given, f"Parquet file {file.name}")
        tables = _hf_tables(file)
        splits = ", ".join(t.split for t in tables if t.split is not None)
        what = f"DatasetDict with splits {splits}" if splits else "one Dataset"
        return _read_tables(file, tables, builder, given, f"HF datasets folder ({what})")
    except FileNotFoundError:
        raise
    except OSError as err:  # the folder itself unreadable: per-sample reads never raise
        raise _not_readable(path, err) from err


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


# --------------------------------------------------------------------------- report

# Reason phrase -> group heading in check_report; first match wins, the rest is "other".
_KINDS: tuple[tuple[str, str], ...] = (
    ("duplicate guid", "duplicate guid"),
    ("unknown label", "unknown label"),
    ("has no guid", "missing guid"),
    ("has labels", "malformed label line"),
    ("could name a file outside", "unsafe guid"),
    ("too long for the file system", "file name too long"),
    ("cells for", "malformed row"),
    ("is empty (0 bytes)", "zero-byte image"),
    ("is empty", "empty text"),
    ("is not an image", "not an image"),
    ("is truncated", "truncated image"),
    ("cannot be decoded", "undecodable image"),
    ("cannot be read", "unreadable file"),
    ("holds a NUL", "unreadable file"),
    ("is not UTF-8", "fallback text decode"),
    ("is neither UTF-8", "last-resort text decode"),
    ("not found", "missing file"),
    ("no image_path", "missing file"),
    ("(no image)", "missing image"),
    ("is not a class of ClassLabel", "unknown label"),
    ("cannot be read again", "unreadable file"),
    (" or ", "no files"),  # "no data/1.txt or data/1.jpg"
)


def problem_kind(problem: Problem) -> str:
    """Short group name for a problem, e.g. "truncated image"."""
    head = problem.reason.split(";")[0]
    return next((kind for phrase, kind in _KINDS if phrase in head), "other")


def _counts(values: Iterable[str]) -> str:
    return ", ".join(f"{key} {n}" for key, n in Counter(values).items())


def check_report(dataset: Dataset) -> str:
    """Human report for `data check`: counts, classes, text encodings, every problem by kind,
    notes, summary line."""
    samples = dataset.samples
    labels = Counter(s.label for s in samples)
    label_counts = [f"{c} {labels[i]}" for i, c in enumerate(dataset.classes)]
    label_counts += [f"none {labels[-1]}"] if labels[-1] else []
    lines = [
        f"{dataset.name}: {dataset.format} dataset at {dataset.root}",
        f"{len(samples)} samples; split: {_counts(s.split for s in samples) or '-'}; "
        f"label: {', '.join(label_counts)}",
        f"classes: {', '.join(dataset.classes) or 'none (no labelled rows)'}",
        f"text encoding: {_counts(s.text_encoding for s in samples if s.text_encoding) or '-'}"
        + (f" (legacy encoding: {dataset.text_encoding})" if dataset.text_encoding else ""),
    ]
    if dataset.format == "manifest":
        lines.append(_columns_line(dataset))
    groups: dict[tuple[bool, str], list[Problem]] = {}
    for problem in dataset.problems():
        groups.setdefault((not problem.fatal, problem_kind(problem)), []).append(problem)
    width = min(max((len(p.guid) for p in dataset.problems()), default=0), 24)
    for (is_note, kind), problems in sorted(groups.items(), key=lambda item: item[0][0]):
        lines.append(f"\n{kind}: {len(problems)} ({'note, sample kept' if is_note else 'fatal'})")
        lines += [
            f"  {_clip(p.guid, 24):<{width}}  {p.modality or 'sample':<6}  {p.reason}"
            for p in problems
        ]
    notes = dataset.notes + protocol_notes(dataset)
    if notes:
        lines.append("\nnotes:")
        lines += [f"  {note}" for note in notes]
    n_fatal = sum(1 for s in samples if any(p.fatal for p in s.problems))
    n_notes = sum(1 for p in dataset.problems() if not p.fatal) + len(notes)
    lines.append(f"\n{len(samples)} samples, {n_fatal} with fatal problems, {n_notes} notes")
    return "\n".join(lines)


def _columns_line(dataset: Dataset) -> str:
    """ "columns: guid=id, text=caption, image=img (embedded), label=y; read from ..."."""
    embedded = sum(1 for s in dataset.samples if s.image_ref is not None)
    files = sum(1 for s in dataset.samples if s.image_path is not None)
    how = {
        "image": f" ({embedded} embedded, {files} files)"
        if embedded and files
        else " (embedded bytes)"
        if embedded
        else " (paths)"
        if files
        else ""
    }
    mapped = ", ".join(f"{k}={c}{how.get(k, '')}" for k, c in dataset.columns.items())
    only = [m for m in ("text", "image") if m not in dataset.modalities]
    lacking = f"; no {only[0]} column: a {dataset.modalities[0]}-only dataset" if only else ""
    return f"columns: {mapped}{lacking}; read from the {dataset.source}"


def protocol_notes(dataset: Dataset) -> list[str]:
    """What stage two will do with the rows: labelled rows outside split "train" are used for
    neither fitting nor scoring, and a dataset without labelled "train" rows cannot be fit."""
    outside = dataset.labelled_outside_train()
    n = sum(1 for s in dataset.samples if s.label >= 0 and s.split == "train")
    used = (
        f"fuse and compare fit and score only on the {n} labelled row{'' if n == 1 else 's'} "
        "of split 'train' (a stratified holdout or K folds of them)"
        if n
        else "fuse and compare fit and score only on labelled rows of split 'train', and there "
        "are none"
    )
    if not outside:
        return [] if n or not dataset.samples else [f"{used}; label some rows of split 'train'"]
    counts = ", ".join(f"{count} in split {split!r}" for split, count in outside.items())
    return [
        f"labelled rows outside split 'train' ({counts}) are not used for fitting or scoring: "
        f"{used}; `fusebench predict --split {next(iter(outside))}` labels them with a trained "
        "head; to train on them, set their split to train"
    ]
