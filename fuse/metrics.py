"""Scores of one fitted head on its scored rows, and mean ± std over seeds × folds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SUMMARY_KEYS = ("accuracy", "macro_f1", "weighted_f1", "train_time_s", "n_params")
SEED_KEYS = ("accuracy", "macro_f1", "weighted_f1")  # seed_means: the scores


def score(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict:
    """accuracy, macro/weighted F1, per-class P/R/F1/support and the confusion matrix
    (rows = true class, columns = predicted), from (n,) labels and (n, C) probabilities."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    labels = list(range(len(classes)))
    y_pred = proba.argmax(axis=1)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "weighted_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        ),
        "per_class": {
            c: {
                "precision": float(p[k]),
                "recall": float(r[k]),
                "f1": float(f[k]),
                "support": int(s[k]),
            }
            for k, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def mean_std(values: Sequence[float]) -> dict:
    """{"mean", "std", "n"}; std is the sample std (ddof=1), 0 for a single value."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "n": len(a),
    }


def seed_means(runs: Sequence[dict]) -> dict:
    """{metric: mean ± std of the per-seed means}: each seed's score averaged over its folds
    first, so std is the spread a reader comparing two heads needs (seed to seed), not the
    fold-to-fold variation the pooled std also holds. n = the number of seeds."""
    seeds = list(dict.fromkeys(r["seed"] for r in runs))
    return {
        k: mean_std([np.mean([r[k] for r in runs if r["seed"] == s]) for s in seeds])
        for k in SEED_KEYS
    }


def aggregate(runs: Sequence[dict], classes: Sequence[str]) -> dict:
    """mean ± std of every summary metric and per-class P/R/F1 over runs (seeds × folds),
    the confusion matrices summed (over the same runs), and `seed_means` (see seed_means)
    when the runs carry their seed."""
    out = {k: mean_std([r[k] for r in runs]) for k in SUMMARY_KEYS}
    out["per_class"] = {
        c: {
            m: mean_std([r["per_class"][c][m] for r in runs]) for m in ("precision", "recall", "f1")
        }
        for c in classes
    }
    out["confusion_matrix"] = np.sum([r["confusion_matrix"] for r in runs], axis=0).tolist()
    if all("seed" in r for r in runs):
        out["seed_means"] = seed_means(runs)
    return out
