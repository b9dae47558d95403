"""What `data check` prints: `check_report` (counts, classes, encodings, every problem by
kind, notes), `problem_kind` (a problem's group), and `protocol_notes` (which rows stage two
will fit and score on).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from fusebench.extract.datasets.files import _clip
from fusebench.extract.datasets.samples import Dataset, Problem

# Reason phrase -> group heading in check_report; first match wins, the rest is "other".
_KINDS: tuple[tuple[str, str], ...] = (
    ("' is a URL", "URL, not a local file"),
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
