"""Dataset readers for stage one: lab5, MVSA-Single/Multiple and CSV/JSONL manifests.

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

Problem reasons are one line: what is wrong, then "; " and the fix.
"""

from __future__ import annotations

import codecs
import csv
import errno
import hashlib
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")  # lab5 / MVSA label words
FORMATS: tuple[str, ...] = ("lab5", "mvsa", "manifest")

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
    message = " ".join(str(err).split()) or type(err).__name__
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

    def new(self, guid: str, split: str, where: str, index_line: tuple[Path, int]) -> Sample:
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

_MANIFEST_NEEDS = [("guid",), ("text", "text_path"), ("image_path",)]


def _manifest_records(
    file: Path, text: str
) -> tuple[list[str], list[tuple[int, dict, int | None]]]:
    """The column names and [(line ending the record, record, CSV cell count or None)]."""
    if file.suffix.lower() == ".csv":
        return _csv_rows(file, text, _MANIFEST_NEEDS, lower=False)
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
    _require_columns(file, columns, _MANIFEST_NEEDS)
    return list(columns), records


def _cell(record: dict, column: str) -> str:
    return _label_text(record.get(column)).strip()


def _read_manifest(file: Path, builder: _Builder) -> Dataset:
    root = file.parent
    text, encoding, notes = _decode_index(file, builder)
    if encoding not in _UNICODE:
        builder.legacy = encoding  # the dataset's one legacy encoding, for its text files too
    columns, records = _manifest_records(file, text)
    row_word = "row" if file.suffix.lower() == ".csv" else "line"
    for number, record, cells in records:
        guid = _cell(record, "guid")
        where = f"{row_word} {number} of {file.name}"
        sample = builder.new(guid, "", where, (file, number))
        if cells is not None and cells != len(columns):  # cells misplaced: use none
            sample.split = _cell(record, "split") or ("train" if _cell(record, "label") else "test")
            sample.problems.append(Problem(guid, None, _cell_count_problem(where, cells, columns)))
            continue
        labelled = builder.label(sample, record.get("label"), required=False)
        sample.split = _cell(record, "split") or ("train" if labelled else "test")
        _manifest_files(builder, sample, record, root, encoding, where)
    return builder.finish(root, "manifest", notes)


def _manifest_files(
    builder: _Builder, sample: Sample, record: dict, root: Path, encoding: str, where: str
) -> None:
    """Inline `text` wins when it is not blank; otherwise `text_path` is read. Paths are
    relative to the manifest's folder (or absolute): the manifest names them explicitly."""
    inline = "" if record.get("text") is None else str(record["text"])
    text_path, image = _cell(record, "text_path"), _cell(record, "image_path")
    if text_path and not inline.strip():
        if image:
            builder.files(sample, root / text_path, root / image)
        else:
            builder.text_file(sample, root / text_path)
    else:
        builder.inline_text(sample, inline, encoding, where)
        if image:
            builder.image_file(sample, root / image)
    if not image:
        sample.problems.append(
            Problem(sample.guid, "image", "no image_path; fill it in or remove the row")
        )


# --------------------------------------------------------------------------- entry points

_LAYOUTS = (
    "lab5 (a folder with train.txt and/or test_without_label.txt, plus data/), "
    "mvsa (a folder with labelResultAll.txt, plus data/), "
    "or manifest (a .csv/.jsonl file, or a folder with one manifest.csv or manifest.jsonl)"
)


def _manifest_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix.lower() in (".csv", ".jsonl") else None
    found = [path / n for n in ("manifest.csv", "manifest.jsonl") if (path / n).is_file()]
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
        if _manifest_file(path) is not None:
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
) -> Dataset:
    """Read a dataset (see the module docstring for the rules).

    check_images=True also decodes every image (slower, catches truncation);
    text_encoding forces the legacy encoding of the texts that are not UTF-8;
    labels fixes the classes, in that order (other labels are fatal per sample).
    """
    path = Path(path).expanduser().absolute()
    format = format or detect_format(path)
    if format not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}")
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
        file = _manifest_file(path)
        if file is None:
            raise ValueError(f"{path} is not a manifest; expected {_LAYOUTS}")
        return _read_manifest(file, builder)
    except FileNotFoundError:
        raise
    except OSError as err:  # the folder itself unreadable: per-sample reads never raise
        raise _not_readable(path, err) from err


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
    if dataset.notes:
        lines.append("\nnotes:")
        lines += [f"  {note}" for note in dataset.notes]
    n_fatal = sum(1 for s in samples if any(p.fatal for p in s.problems))
    n_notes = sum(1 for p in dataset.problems() if not p.fatal) + len(dataset.notes)
    lines.append(f"\n{len(samples)} samples, {n_fatal} with fatal problems, {n_notes} notes")
    return "\n".join(lines)
