"""Label words -> classes.

lab5 and MVSA accept the sentiment words `LABELS` only (any case); a manifest any string or
integer. Classes are ordered as the sentiment words when they are a subset of those,
numerically when all are integers, else sorted (labels that differ only in case are one
class); `--labels` (`split_labels`) fixes the set and the order.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")  # lab5 / MVSA label words
_NO_LABEL = ("", "null", "none", "nan")  # tags that mean "unlabelled"


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


def _has_label(tag: object) -> bool:
    """Whether a label cell holds a label (valid or not) rather than "no label"."""
    return _label_text(tag).strip().casefold() not in _NO_LABEL


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
