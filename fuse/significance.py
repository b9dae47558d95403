"""Is a cell really worse than the best, or within noise? Paired tests over a run's fits.

Every cell of a run is fitted on the same folds x model seeds (fuse.protocol: the splits are
computed once, on the rows usable in every cache), so two cells can be compared fit by fit:
d_j = macro-F1(cell, seed, fold) - macro-F1(best, seed, fold), j = 1..J (J = folds x seeds).

The test: the Nadeau–Bengio corrected resampled t-test (Nadeau & Bengio 2003, "Inference for
the generalization error"; the corrected repeated k-fold test of Bouckaert & Frank 2004). A
plain paired t-test over the J fits is far too liberal, because the fits share training rows
(two folds' training parts overlap by most of their rows) and, across seeds, the very same
scored rows. Nadeau and Bengio widen the variance by the overlap:

    t = mean(d) / sqrt((1/J + n_test/n_train) * var(d)),   var: sample variance (ddof 1)
    p = 2 * P(T_{J-1} > |t|)                                (two-sided, Student t, J-1 df)

    n_train  rows a fit learns from: the outer training part of a fold (fuse.protocol's
             `fit` + `inner_val`: both are used to make the model), averaged over the folds
    n_test   rows a fit is scored on (`scored`), averaged over the folds

A Wilcoxon signed-rank test on the same d_j (scipy.stats.wilcoxon) is reported as a second
opinion; it makes no normality assumption but knows nothing of the overlap, so it is the more
liberal of the two. Both are Holm-corrected (`holm`) across the cells compared with the best,
and a cell is "tied with the best" when its Holm-adjusted corrected-t p is at least
alpha (default DEFAULT_ALPHA = 0.05): the data cannot tell it apart from the best.

Where the answer is clear no test runs: differences that are all exactly zero (a cell that
shares the best's fits, fuse.grid.shared_fits, or simply equal scores) give p = 1; a constant
non-zero difference (variance 0) gives p = 0. Where no answer exists, p is NaN, never a
made-up number: a holdout protocol has one split, so fold-to-fold variation, which the test
is about, cannot be estimated (seeds alone only measure the model's randomness on the same
rows); fewer than 2 paired fits likewise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_ALPHA = 0.05
TEST = "Nadeau-Bengio corrected resampled t-test"
SECOND = "Wilcoxon signed-rank"
HOLDOUT_NOTE = (
    "n/a: a single holdout split gives no fold-to-fold variation to test with; "
    "use --folds K for significance"
)

FitKey = tuple[int, int]  # (seed, fold)


def corrected_t_test(d: Sequence[float], n_train: float, n_test: float) -> float:
    """Two-sided p of the Nadeau–Bengio corrected resampled t-test on paired differences d
    (see the module docstring); 1.0 when every difference is 0, 0.0 for a constant non-zero
    difference, NaN for fewer than 2 differences."""
    from scipy.stats import t as student_t

    d = np.asarray(d, dtype=np.float64)
    if len(d) < 2:
        return math.nan
    if not np.any(d):
        return 1.0
    if np.ptp(d) == 0.0:  # the same non-zero gap on every fit: infinitely significant
        return 0.0  # (tested on the values: their float variance need not come out 0)
    var = float(d.var(ddof=1))
    stat = float(d.mean()) / math.sqrt((1.0 / len(d) + n_test / n_train) * var)
    return float(2.0 * student_t.sf(abs(stat), df=len(d) - 1))


def wilcoxon_p(d: Sequence[float]) -> float:
    """Two-sided p of scipy's Wilcoxon signed-rank test on d (zero differences dropped, the
    test's own rule); 1.0 when every difference is 0, NaN for fewer than 2 differences."""
    from scipy.stats import wilcoxon

    d = np.asarray(d, dtype=np.float64)
    if len(d) < 2:
        return math.nan
    if not np.any(d):
        return 1.0
    with warnings.catch_warnings():  # "exact p not possible with ties": scipy falls back itself
        warnings.simplefilter("ignore")
        return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment (Holm 1979) of m p-values, for a family-wise error rate.

    Sort the p-values ascending, p_(1) <= ... <= p_(m); the adjusted value of the i-th is
        max over j <= i of min(1, (m - j + 1) * p_(j))
    (the running maximum keeps the adjusted values in the order of the raw ones). Rejecting
    where adjusted p < alpha is Holm's procedure. NaN entries (no test) stay NaN and do not
    count in m. Returned in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    order = tested[np.argsort(p[tested], kind="stable")]
    running = 0.0
    for j, idx in enumerate(order):  # j = 0..m-1, multiplier m - j
        running = max(running, min(1.0, (m - j) * p[idx]))
        out[idx] = running
    return out


@dataclass(frozen=True)
class Design:
    """What the test needs to know about the protocol: sizes (module docstring) and folds."""

    n_train: float
    n_test: float
    n_folds: int
    alpha: float = DEFAULT_ALPHA

    @property
    def testable(self) -> bool:
        return self.n_folds >= 2

    def describe(self) -> dict:
        """results.json's `significance` block: the test, its parameters, and what tied means."""
        return {
            "test": TEST,
            "second_opinion": SECOND,
            "correction": "Holm (step-down), across the cells compared with the best",
            "alpha": self.alpha,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "n_folds": self.n_folds,
            "variance": "(1/J + n_test/n_train) * var(d), d = per-fit macro-F1 minus the best's",
            "tied_with_best": "Holm-adjusted corrected-t p >= alpha",
            "note": None if self.testable else HOLDOUT_NOTE,
        }


def paired_differences(cell: Mapping[FitKey, float], best: Mapping[FitKey, float]) -> np.ndarray:
    """cell minus best, fit by fit, in (seed, fold) order; the two must have the same fits."""
    if set(cell) != set(best):
        raise ValueError(
            "cannot pair fits: the cells were not fitted on the same seeds and folds "
            f"({sorted(set(cell) ^ set(best))[:3]} in one only)"
        )
    keys = sorted(best)
    return np.array([cell[k] - best[k] for k in keys], dtype=np.float64)


def compare_with_best(
    scores: Mapping[str, Mapping[FitKey, float]],
    best: str,
    design: Design,
    same_fit: Sequence[str] = (),
) -> dict[str, dict]:
    """Per row id of `scores` (cells, and the ensemble row), its comparison with `best`:
    delta_macro_f1 (mean of the paired differences, negative = worse), p_raw and p (corrected
    t, raw and Holm-adjusted), p_wilcoxon_raw and p_wilcoxon (Holm-adjusted), n_pairs and
    tied_with_best (True / False; None where no test is possible, as are its p values).
    `best` is tied with itself by definition (best: True); the ids in `same_fit` share its
    fits (fuse.grid.shared_fits), so they are tied by construction (p = 1) and are left out
    of Holm's family. A row not fitted on the best's seeds and folds cannot be paired: n/a."""
    nan4 = {"p_raw": math.nan, "p": math.nan, "p_wilcoxon_raw": math.nan, "p_wilcoxon": math.nan}
    out: dict[str, dict] = {}
    tested: list[str] = []
    for cid, fits in scores.items():
        try:
            d = paired_differences(fits, scores[best])
        except ValueError as e:
            gap = float(np.mean(list(fits.values())) - np.mean(list(scores[best].values())))
            out[cid] = {"delta_macro_f1": gap, "n_pairs": 0, "best": False, **nan4, "why": str(e)}
            continue
        entry = {"delta_macro_f1": float(d.mean()), "n_pairs": len(d), "best": cid == best}
        if cid == best or cid in same_fit:
            entry.update(p_raw=1.0, p=1.0, p_wilcoxon_raw=1.0, p_wilcoxon=1.0)
            entry["why"] = "the best cell" if cid == best else "the same fits as the best cell"
        elif not design.testable:
            entry.update(nan4, why=HOLDOUT_NOTE)
        else:
            entry["p_raw"] = corrected_t_test(d, design.n_train, design.n_test)
            entry["p_wilcoxon_raw"] = wilcoxon_p(d)
            tested.append(cid)
        out[cid] = entry
    for key in ("p", "p_wilcoxon"):
        adjusted = holm([out[c][f"{key}_raw"] for c in tested])
        for cid, p in zip(tested, adjusted):
            out[cid][key] = float(p)
    for entry in out.values():
        p = entry["p"]
        entry["tied_with_best"] = None if math.isnan(p) else bool(p >= design.alpha)
        for key in ("p_raw", "p", "p_wilcoxon_raw", "p_wilcoxon"):  # JSON: null, not NaN
            entry[key] = None if math.isnan(entry[key]) else entry[key]
    return out


def of_runs(
    runs: Sequence,
    rows: Sequence[str],
    best: str,
    same_fit: Sequence[str],
    folds: Sequence,
    alpha: float = DEFAULT_ALPHA,
) -> tuple[dict, dict[str, dict]]:
    """(results.json's `significance` block, compare_with_best per row id) from a run's fits
    (fuse.experiment.HeadRun: cell, seed, fold, metrics["macro_f1"]) and its folds
    (fuse.protocol.Fold: n_train = fit + inner_val rows, n_test = scored rows, averaged)."""
    scores: dict[str, dict[FitKey, float]] = {row: {} for row in rows}
    for r in runs:
        if r.cell in scores:
            scores[r.cell][(r.seed, r.fold)] = float(r.metrics["macro_f1"])
    design = Design(
        n_train=float(np.mean([len(f.fit) + len(f.inner_val) for f in folds])),
        n_test=float(np.mean([len(f.scored) for f in folds])),
        n_folds=len(folds),
        alpha=alpha,
    )
    return design.describe(), compare_with_best(scores, best, design, same_fit)


def csv_columns(entry: Mapping | None) -> dict:
    """results.csv's comparison with the best: delta_macro_f1, p (corrected t, Holm-adjusted),
    p_raw, p_wilcoxon (Holm-adjusted), tied_with_best (best / true / false; n/a where no
    test is possible, as are its p values); {} for a run written before them."""
    if not entry:
        return {}
    fmt = lambda p: "n/a" if p is None else round(p, 6)  # noqa: E731
    tied = entry["tied_with_best"]
    flag = "best" if entry["best"] else "n/a" if tied is None else str(tied).lower()
    return {
        "delta_macro_f1": round(entry["delta_macro_f1"], 6),
        "p": fmt(entry["p"]),
        "p_raw": fmt(entry["p_raw"]),
        "p_wilcoxon": fmt(entry["p_wilcoxon"]),
        "tied_with_best": flag,
    }


def tied_mark(entry: Mapping | None) -> str:
    """A row's mark in the tables: "best", "tied" (cannot be told apart from the best),
    "worse" / "better" (told apart at alpha, after Holm), "n/a" (no test possible), "" (a
    run written before significance was computed)."""
    if not entry:
        return ""
    if entry.get("best"):
        return "best"
    tied = entry.get("tied_with_best")
    if tied is None:
        return "n/a"
    if tied:
        return "tied"
    return "better" if entry.get("delta_macro_f1", 0.0) > 0 else "worse"
