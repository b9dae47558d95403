"""The MVSA-Single / MVSA-Multiple layout: labelResultAll.txt beside data/.

Each line holds a guid and 1 or 3 tab-separated "text,image" annotations, merged into one
label by the CLMLF rule (`_merge_mvsa`); lines the rule drops are no samples, and are
counted by reason in the dataset's notes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from fusebench.extract.datasets.builder import _Builder
from fusebench.extract.datasets.files import _clip
from fusebench.extract.datasets.index import _decode_index, _lines, _require_data_dir
from fusebench.extract.datasets.labels import LABELS
from fusebench.extract.datasets.samples import Dataset, Problem

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
