"""The sample builder every reader shares (`_Builder`).

A reader creates each sample with `new(guid, split, where, index_line)`, then records its
label (`label`) and its text and image (`files` / `data_files`, `text_file`, `inline_text`,
`text_bytes`, `image_file`, `image_bytes`); problems attach to samples, never raise.
`finish` then sets the label indexes, once the classes are known, and decodes the texts,
once the dataset's legacy encoding is known, and returns the `Dataset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fusebench.extract.datasets.files import (
    _clip,
    _read_bytes,
    _sha256,
    _shown,
    _too_long,
    _unreadable,
)
from fusebench.extract.datasets.images import _check_image_bytes
from fusebench.extract.datasets.labels import _has_label, _Labels
from fusebench.extract.datasets.samples import Dataset, ImageRef, Problem, Sample
from fusebench.extract.datasets.text import (
    _UNICODE,
    check_encoding_name,
    detect_legacy_encoding,
)

from fusebench.texts import decode_text, decode_unicode


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
        """Record the sample's label. Returns whether the row carries a label at all: a label
        outside the classes counts (it is a bad sample, never an unlabelled row); False only
        for no label ("", "null"), which is fatal only where a label is required."""
        key, reason = self.labels.parse(tag, required=required)
        if reason is not None:
            sample.problems.append(Problem(sample.guid, None, reason))
        if key is not None:
            self._keys.append((sample, key))
        return key is not None or _has_label(tag)

    def text_file(self, sample: Sample, path: Path, raw: bytes | Exception | None = None) -> None:
        raw = _file_bytes(sample, "text", path, raw)
        if raw is None:
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
        data = _file_bytes(sample, "image", path, data)
        if data is None:
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
        legacy_raws = [t.raw for t in self._texts if decode_unicode(t.raw) is None]
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


def _file_bytes(
    sample: Sample, modality: str, path: Path, got: bytes | Exception | None
) -> bytes | None:
    """The bytes of the sample's `modality` file at `path` (`got`: already read, or the error
    reading it; None: read now), or None with the problem recorded when it is unreadable."""
    got = _read_bytes(path) if got is None else got
    if not isinstance(got, bytes):
        sample.problems.append(Problem(sample.guid, modality, _unreadable(modality, path, got)))
        return None
    return got


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
