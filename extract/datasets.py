"""Dataset readers for stage one: lab5, MVSA-Single/Multiple and CSV/JSONL manifests.

Every reader returns a `Dataset` whose `samples` hold every row of the index files, in
file order, with its problems attached: nothing is dropped silently (DESIGN §3, §10). The
only rows that are not samples are MVSA lines removed by the label-merge rule, and those
are counted by reason in `Dataset.notes`.

Problem reasons are one line: what is wrong, then "; " and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
FORMATS: tuple[str, ...] = ("lab5", "mvsa", "manifest")

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
_NO_LABEL = ("", "null", "none")  # tags that mean "unlabelled"


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
    text: str | None  # decoded, trailing whitespace stripped; None when missing/unreadable
    text_encoding: str | None  # "utf-8" | "cp1252" | "latin-1" | None
    text_sha: str | None  # sha256 of the raw text bytes (manifest inline text: of its UTF-8)
    image_path: Path | None  # None when the image file does not exist
    image_sha: str | None  # sha256 of the image file bytes
    problems: list[Problem] = field(default_factory=list)

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
    classes: tuple[str, ...]
    samples: list[Sample]  # dataset order (lab5: train.txt rows, then test_without_label.txt)
    notes: list[str] = field(default_factory=list)  # dataset-level remarks

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


# --------------------------------------------------------------------------- text / image


def decode_text(raw: bytes) -> tuple[str, str]:
    """Decode text bytes as UTF-8 (BOM stripped), else cp1252, else latin-1. Never raises."""
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding), encoding.removesuffix("-sig")
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1"), "latin-1"  # every byte is a latin-1 character


def _shown(path: Path) -> str:
    """Short form of a file path for messages, e.g. "data/12.jpg"."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _is_image(head: bytes) -> bool:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return any(head.startswith(magic) for magic in _IMAGE_MAGIC)


def _check_image_bytes(shown: str, data: bytes, *, decode: bool) -> str | None:
    fix = "re-export or remove the sample"
    if not data:
        return f"image {shown} is empty (0 bytes); {fix}"
    if not _is_image(data[:16]):
        return f"image {shown} is not an image (starts with {data[:12]!r}); replace it or remove the sample"
    if decode:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, ... on bad files
            return _decode_failure(shown, err)
    return None


def _decode_failure(shown: str, err: Exception) -> str:
    message = " ".join(str(err).split()) or type(err).__name__
    what = "is truncated" if "truncated" in message else "cannot be decoded"
    return f"image {shown} {what} (PIL: {message}); re-export or remove the sample"


def _unreadable(what: str, path: Path, err: OSError) -> str:
    if isinstance(err, FileNotFoundError):
        return f"{what} {_shown(path)} not found; add the file or remove the sample"
    return f"{what} {_shown(path)} cannot be read ({err.strerror or err}); fix the file or remove the sample"


def check_image(path: Path, *, decode: bool) -> str | None:
    """Return why `path` is not a usable image, or None.

    decode=False reads the bytes only (exists, not empty, a known image signature);
    decode=True also decodes every pixel, which is what catches truncated JPEGs.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        return _unreadable("image", path, err)
    return _check_image_bytes(_shown(path), data, decode=decode)


def load_image(path: Path) -> Image.Image:
    """Open, fully decode and convert to RGB; ValueError(one-line reason) if that fails."""
    path = Path(path)
    reason = check_image(path, decode=False)
    if reason is not None:
        raise ValueError(reason)
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncation fails here, not inside a processor
            return img.convert("RGB")
    except Exception as err:  # see _check_image_bytes
        raise ValueError(_decode_failure(_shown(path), err)) from err


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- shared sample logic


class _Rows:
    """Builds samples in order, flagging duplicate guids against their first row."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self._first_seen: dict[str, str] = {}  # guid -> "row R of FILE"

    def new(self, guid: str, split: str, label: int, where: str) -> Sample:
        sample = Sample(guid, split, label, None, None, None, None, None, [])
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


def _parse_label(sample: Sample, tag: str | None, *, required: bool) -> None:
    """Set sample.label from a class name (any case). No label ("", "null") stays -1 and is
    fatal only where a label is required; a name outside LABELS is always fatal."""
    value = (tag or "").strip().lower()
    if value in LABELS:
        sample.label = LABELS.index(value)
    elif required or value not in _NO_LABEL:
        sample.problems.append(
            Problem(sample.guid, None, f"unknown label {tag!r}; use one of {', '.join(LABELS)}")
        )


def _attach_text_file(sample: Sample, path: Path) -> None:
    try:
        raw = path.read_bytes()
    except OSError as err:
        sample.problems.append(Problem(sample.guid, "text", _unreadable("text", path, err)))
        return
    text, encoding = decode_text(raw)
    _attach_text(sample, text, encoding, _sha256(raw), f"text {_shown(path)}")
    if encoding != "utf-8":
        sample.problems.append(
            Problem(
                sample.guid,
                "text",
                f"text {_shown(path)} is not UTF-8; decoded as {encoding} (re-save as UTF-8 if it reads wrong)",
                fatal=False,
            )
        )


def _attach_text(sample: Sample, text: str, encoding: str, sha: str, what: str) -> None:
    sample.text, sample.text_encoding, sample.text_sha = text.rstrip(), encoding, sha
    if not sample.text.strip():
        sample.problems.append(
            Problem(sample.guid, "text", f"{what} is empty; write the text or remove the sample")
        )


def _attach_image_file(sample: Sample, path: Path, check_images: bool) -> None:
    try:
        data = path.read_bytes()
    except OSError as err:
        sample.problems.append(Problem(sample.guid, "image", _unreadable("image", path, err)))
        return
    sample.image_path, sample.image_sha = path, _sha256(data)
    reason = _check_image_bytes(_shown(path), data, decode=check_images)
    if reason is not None:
        sample.problems.append(Problem(sample.guid, "image", reason))


def _attach_files(sample: Sample, text_path: Path, image_path: Path, check_images: bool) -> None:
    """Read a sample's text and image files; neither existing is one sample-level problem."""
    if not text_path.exists() and not image_path.exists():
        sample.problems.append(
            Problem(
                sample.guid,
                None,
                f"no {_shown(text_path)} or {_shown(image_path)}; add the files or remove the row",
            )
        )
        return
    _attach_text_file(sample, text_path)
    _attach_image_file(sample, image_path, check_images)


def _require_data_dir(root: Path, layout: str) -> Path:
    data = root / "data"
    if not data.is_dir():
        raise FileNotFoundError(
            f"{root} has no data/ folder; the {layout} layout keeps data/<id>.txt and data/<id>.jpg there"
        )
    return data


# --------------------------------------------------------------------------- lab5

_LAB5_FILES = (("train.txt", "train"), ("test_without_label.txt", "test"))


def _read_lab5(root: Path, check_images: bool) -> Dataset:
    data = _require_data_dir(root, "lab5")
    rows = _Rows()
    for filename, split in _LAB5_FILES:
        index = root / filename
        if not index.exists():
            continue
        with index.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            _require_columns(index, reader.fieldnames or [], [("guid",), ("tag",)])
            for row in reader:
                guid = (row["guid"] or "").strip()
                sample = rows.new(guid, split, -1, f"row {reader.line_num} of {filename}")
                _parse_label(sample, row["tag"], required=split == "train")
                if guid:
                    _attach_files(sample, data / f"{guid}.txt", data / f"{guid}.jpg", check_images)
    return Dataset(root.name, root, "lab5", LABELS, rows.samples, [])


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


def _read_mvsa(root: Path, check_images: bool) -> Dataset:
    data = _require_data_dir(root, "mvsa")
    index = root / "labelResultAll.txt"
    lines = decode_text(index.read_bytes())[0].splitlines()
    rows = _Rows()
    dropped: dict[str, list[str]] = {_POS_NEG: [], _NO_MAJORITY: []}
    annotators: Counter[int] = Counter()
    for number, line in enumerate(lines, start=1):
        cells = [c.strip() for c in line.split("\t")]
        if not line.strip() or (number == 1 and cells[0].lower() == "id"):
            continue
        guid, columns = cells[0], cells[1:]
        where = f"line {number} of labelResultAll.txt"
        pairs = _mvsa_pairs(columns)
        if pairs is None:
            sample = rows.new(guid, "train", -1, where)
            sample.problems.append(
                Problem(
                    guid,
                    None,
                    f"{where} has labels {' '.join(columns)!r}; "
                    f"write 1 or 3 tab-separated 'text,image' pairs of {', '.join(LABELS)}",
                )
            )
        else:
            annotators[len(pairs)] += 1
            label, why = _merge_mvsa(pairs)
            if label is None:
                dropped[why].append(guid)
                continue
            sample = rows.new(guid, "train", LABELS.index(label), where)
        if guid:
            _attach_files(sample, data / f"{guid}.txt", data / f"{guid}.jpg", check_images)
    return Dataset(root.name, root, "mvsa", LABELS, rows.samples, _mvsa_notes(annotators, dropped))


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


def _require_columns(file: Path, found: Iterable[str], needed: list[tuple[str, ...]]) -> None:
    found = [c for c in found if c]
    missing = [
        " or ".join(alternatives) for alternatives in needed if not set(alternatives) & set(found)
    ]
    if missing:
        wanted = ", ".join(" or ".join(a) for a in needed)
        raise ValueError(
            f"{file.name} lacks column(s) {', '.join(missing)}; found {', '.join(found) or 'none'}, "
            f"need {wanted}"
        )


def _manifest_records(file: Path) -> tuple[list[tuple[int, dict]], list[str], str]:
    """(row number, record) pairs, the column names, and the file's text encoding."""
    text, encoding = decode_text(file.read_bytes())
    if file.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        records = [(reader.line_num, row) for row in reader]
        return records, list(reader.fieldnames or []), encoding
    records, columns = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
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
        records.append((number, record))
        columns.update(dict.fromkeys(record))
    return records, list(columns), encoding


def _cell(record: dict, column: str) -> str:
    value = record.get(column)
    return "" if value is None else str(value).strip()


def _read_manifest(file: Path, check_images: bool) -> Dataset:
    root = file.parent
    records, columns, encoding = _manifest_records(file)
    _require_columns(file, columns, [("guid",), ("text", "text_path"), ("image_path",)])
    notes = [] if encoding == "utf-8" else [f"{file.name} is not UTF-8; read as {encoding}"]
    rows = _Rows()
    row_word = "row" if file.suffix.lower() == ".csv" else "line"
    for number, record in records:
        guid = _cell(record, "guid")
        sample = rows.new(guid, "", -1, f"{row_word} {number} of {file.name}")
        _parse_label(sample, _cell(record, "label"), required=False)
        sample.split = _cell(record, "split") or ("train" if sample.label >= 0 else "test")
        _attach_manifest_files(sample, record, root, encoding, check_images)
    return Dataset(root.name, root, "manifest", LABELS, rows.samples, notes)


def _attach_manifest_files(
    sample: Sample, record: dict, root: Path, encoding: str, check_images: bool
) -> None:
    """Inline `text` wins when it is not blank; otherwise `text_path` is read."""
    inline = "" if record.get("text") is None else str(record["text"])
    text_path, image = _cell(record, "text_path"), _cell(record, "image_path")
    if text_path and not inline.strip():
        if image:
            _attach_files(sample, root / text_path, root / image, check_images)
        else:
            _attach_text_file(sample, root / text_path)
    else:
        _attach_text(sample, inline, encoding, _sha256(inline.encode("utf-8")), "text")
        if image:
            _attach_image_file(sample, root / image, check_images)
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


def detect_format(path: Path) -> str:
    """Name the layout at `path`: "lab5", "mvsa" or "manifest"; ValueError if none fits."""
    path = Path(path)
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
    raise ValueError(f"cannot tell the dataset layout of {path}; expected {_LAYOUTS}")


def load_dataset(
    path: str | Path, format: str | None = None, *, check_images: bool = False
) -> Dataset:
    """Read a dataset; check_images=True also decodes every image (slower, catches truncation)."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(
            f"dataset path {path} does not exist; pass --data pointing at the dataset"
        )
    format = format or detect_format(path)
    if format == "lab5":
        if not any((path / n).is_file() for n, _ in _LAB5_FILES):
            raise FileNotFoundError(
                f"{path} has neither train.txt nor test_without_label.txt; expected {_LAYOUTS}"
            )
        return _read_lab5(path, check_images)
    if format == "mvsa":
        if not (path / "labelResultAll.txt").is_file():
            raise FileNotFoundError(f"{path} has no labelResultAll.txt; expected {_LAYOUTS}")
        return _read_mvsa(path, check_images)
    if format == "manifest":
        file = _manifest_file(path)
        if file is None:
            raise ValueError(f"{path} is not a manifest; expected {_LAYOUTS}")
        return _read_manifest(file, check_images)
    raise ValueError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------- report

# Reason phrase -> group heading in check_report; first match wins, the rest is "other".
_KINDS: tuple[tuple[str, str], ...] = (
    ("duplicate guid", "duplicate guid"),
    ("unknown label", "unknown label"),
    ("has no guid", "missing guid"),
    ("has labels", "malformed label line"),
    ("is empty (0 bytes)", "zero-byte image"),
    ("is empty", "empty text"),
    ("is not an image", "not an image"),
    ("is truncated", "truncated image"),
    ("cannot be decoded", "undecodable image"),
    ("cannot be read", "unreadable file"),
    ("is not UTF-8", "fallback text decode"),
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
    """Human report for `data check`: counts, every problem by kind, notes, summary line."""
    samples = dataset.samples
    labels = Counter(s.label for s in samples)
    label_counts = [f"{c} {labels[i]}" for i, c in enumerate(dataset.classes)]
    label_counts += [f"none {labels[-1]}"] if labels[-1] else []
    lines = [
        f"{dataset.name}: {dataset.format} dataset at {dataset.root}",
        f"{len(samples)} samples; split: {_counts(s.split for s in samples) or '-'}; "
        f"label: {', '.join(label_counts)}",
    ]
    groups: dict[tuple[bool, str], list[Problem]] = {}
    for problem in dataset.problems():
        groups.setdefault((not problem.fatal, problem_kind(problem)), []).append(problem)
    width = max((len(p.guid) for p in dataset.problems()), default=0)
    for (is_note, kind), problems in sorted(groups.items(), key=lambda item: item[0][0]):
        lines.append(f"\n{kind}: {len(problems)} ({'note, sample kept' if is_note else 'fatal'})")
        lines += [f"  {p.guid:<{width}}  {p.modality or 'sample':<6}  {p.reason}" for p in problems]
    if dataset.notes:
        lines.append("\nnotes:")
        lines += [f"  {note}" for note in dataset.notes]
    n_fatal = sum(1 for s in samples if any(p.fatal for p in s.problems))
    n_notes = sum(1 for p in dataset.problems() if not p.fatal) + len(dataset.notes)
    lines.append(f"\n{len(samples)} samples, {n_fatal} with fatal problems, {n_notes} notes")
    return "\n".join(lines)
