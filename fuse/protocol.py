"""Which rows a head learns from, which pick its epoch, and which score it.

Only rows with split "train" and a label take part. Each scored split has three disjoint
parts, all stratified by label:

    scored     the holdout (--val-ratio) or the held-out fold (--folds K); seen only at scoring
    inner_val  a slice of the rest (inner_ratio) for early stopping and model selection
    fit        everything else: what the head learns from

Split seeds are fixed (42 unless --split-seed says otherwise, the common lab protocol), so
every cell and every model seed is scored on the same rows; model seeds only change the model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from fusebench.fuse.features import FeatureSet


@dataclass(frozen=True)
class Fold:
    """One scored split, as row positions in the FeatureSet it was made from."""

    index: int  # 0-based fold number (0 for the single holdout split)
    fit: np.ndarray  # (n_fit,) rows the head learns from
    inner_val: np.ndarray  # (n_val,) rows for early stopping / model selection
    scored: np.ndarray  # (n_scored,) rows scored once, after fitting


class ProtocolError(ValueError):
    """The data cannot be split as asked; the message says how to change the protocol."""


def scorable_rows(fs: FeatureSet) -> np.ndarray:
    """Positions of the labelled training rows: the only rows any protocol uses."""
    return np.flatnonzero((fs.split == "train") & (fs.label >= 0))


@dataclass(frozen=True)
class StratifiedProtocol:
    """--val-ratio R (one stratified holdout) or --folds K (stratified K-fold, shuffled)."""

    val_ratio: float | None = 0.1
    folds: int | None = None
    split_seed: int = 42
    inner_ratio: float = 0.1  # share of the training part held out for early stopping

    def __post_init__(self) -> None:
        seed = self.split_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(
                f"--split-seed must be a whole number from 0 to {2**32 - 1}, not {seed!r}"
            )
        if self.folds is not None:
            if isinstance(self.folds, bool) or not isinstance(self.folds, int):
                raise ValueError(f"--folds must be a whole number, not {self.folds!r}")
            if self.folds < 2:
                raise ValueError(f"--folds must be at least 2, not {self.folds}")
            object.__setattr__(self, "val_ratio", None)  # folds win over the default ratio
        elif (
            isinstance(self.val_ratio, bool)
            or not isinstance(self.val_ratio, (int, float))
            or not 0 < self.val_ratio < 1
        ):
            raise ValueError(f"--val-ratio must be between 0 and 1, not {self.val_ratio}")
        if not 0 < self.inner_ratio < 1:
            raise ValueError(f"inner_ratio must be between 0 and 1, not {self.inner_ratio}")

    def describe(self) -> str:
        inner = f"inner early-stopping split {self.inner_ratio:g} of the training part"
        if self.folds:
            return f"stratified {self.folds}-fold (seed {self.split_seed}), {inner}"
        return f"stratified holdout {self.val_ratio:g} (seed {self.split_seed}), {inner}"

    def to_dict(self) -> dict:
        return asdict(self)

    def splits(self, fs: FeatureSet) -> list[Fold]:
        """The scored splits of fs's labelled training rows (deterministic)."""
        rows = scorable_rows(fs)
        y = fs.label[rows]
        if len(rows) == 0:
            splits = ", ".join(f"{s} ({n})" for s, n in Counter(fs.split.tolist()).most_common())
            raise ProtocolError(
                "no usable labelled rows with split 'train' to fit and score on (usable rows "
                f"by split: {splits or 'none'}); extract a dataset with labelled training rows"
            )
        present = np.unique(y)
        if len(present) < 2:
            raise ProtocolError(
                f"every labelled training row has class '{fs.classes[present[0]]}'; a classifier "
                "needs at least two classes — extract a dataset with more than one label"
            )
        _check_counts(y, fs.classes, need=self.folds or 2, what=self.describe())
        try:
            return self._splits(rows, y, fs.classes)
        except ProtocolError:
            raise
        except (
            ValueError
        ) as e:  # sklearn's own refusal, e.g. a holdout smaller than the class count
            raise ProtocolError(
                f"cannot make a {self.describe()} of {len(rows)} rows: {e}"
            ) from None

    def _splits(self, rows: np.ndarray, y: np.ndarray, classes: tuple[str, ...]) -> list[Fold]:
        from sklearn.model_selection import StratifiedKFold, train_test_split

        positions = np.arange(len(rows))
        if self.folds:
            cv = StratifiedKFold(self.folds, shuffle=True, random_state=self.split_seed)
            outer = list(cv.split(positions, y))
        else:
            outer = [
                train_test_split(
                    positions, test_size=self.val_ratio, stratify=y, random_state=self.split_seed
                )
            ]
        folds = []
        for k, (train_part, scored) in enumerate(outer):
            _check_counts(y[train_part], classes, need=2, what="the inner early-stopping split")
            fit, inner = train_test_split(
                train_part,
                test_size=self.inner_ratio,
                stratify=y[train_part],
                random_state=(self.split_seed + k) % 2**32,
            )
            folds.append(
                Fold(
                    index=k,
                    fit=np.sort(rows[fit]),
                    inner_val=np.sort(rows[inner]),
                    scored=np.sort(rows[scored]),
                )
            )
        return folds


def _check_counts(y: np.ndarray, classes: tuple[str, ...], *, need: int, what: str) -> None:
    counts = np.bincount(y, minlength=len(classes))
    for c, n in enumerate(counts):
        if 0 < n < need:
            raise ProtocolError(
                f"class '{classes[c]}' has only {n} labelled training row(s); {what} needs at least "
                f"{need} per class — use fewer folds or more data"
            )
