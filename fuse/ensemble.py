"""The ensemble row of a run: a soft vote of the top k cells, chosen on inner folds only.

For every (seed, fold) of the run, the cells are ranked by their macro-F1 on that fit's
inner-validation rows (fuse.protocol's `inner_val`: part of the training side, never the
scored rows), the top k are taken, and their predicted probabilities on the fold's scored
rows are averaged (a soft vote). The vote is then scored on the scored rows like any fit, so
its number is honest: nothing of the scored rows went into choosing the members.

Cells that share one fit (fuse.grid.shared_fits: byte-identical inputs) are one candidate,
named by the first id of their group, so a model is never counted twice in a vote. Every
member of a vote was scored on the same rows (the folds come from the rows usable in every
cache of the run); `vote` checks it rather than assuming it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from fusebench.fuse._util import note
from fusebench.fuse.features import FeatureSet
from fusebench.fuse.head import Head
from fusebench.fuse.metrics import aggregate, score
from fusebench.fuse.protocol import Fold


class Fit(Protocol):
    """What a vote reads of a fit (fuse.experiment.HeadRun)."""

    cell: str
    seed: int
    fold: int
    metrics: dict
    scored: np.ndarray  # (n_scored,) row positions
    proba: np.ndarray  # (n_scored, C)
    inner_macro_f1: float  # macro-F1 on the fit's inner-validation rows


@dataclass
class Vote:
    """One (seed, fold) of the ensemble row: the members chosen, and the scored vote."""

    seed: int
    fold: int
    cells: list[str]  # the members, best inner macro-F1 first
    inner_macro_f1: list[float]  # theirs, in the same order
    scored: np.ndarray  # (n_scored,) rows of the FeatureSet
    proba: np.ndarray  # (n_scored, C): the mean of the members' proba
    metrics: dict  # score() + seed, fold, train_time_s / n_params (the members' sums)


def inner_macro_f1(head: Head, fs: FeatureSet, fold: Fold) -> float:
    """A fitted head's macro-F1 on its fold's inner-validation rows (fuse.protocol.Fold
    .inner_val of FeatureSet fs): what a vote ranks the cells by. fuse.experiment calls it
    before scoring, so the last rows a head predicts are still its scored ones."""
    if len(fold.inner_val) == 0:  # no inner rows (a protocol without early stopping): no score
        return math.nan
    inner = fs.take(fold.inner_val)
    return float(score(inner.label, head.predict_proba(inner), fs.classes)["macro_f1"])


def ensemble_id(k: int) -> str:
    """The row's id in tables, results and runs.csv: "ensemble(top3)"."""
    return f"ensemble(top{k})"


def candidates(cells: Sequence[str], fit_groups: Sequence[Sequence[str]]) -> list[str]:
    """The cells that may vote, in grid order: each cell but those reported with another's
    fits (fuse.grid.shared_fits groups after their first), so no model votes twice."""
    shared = {c for group in fit_groups for c in group[1:]}
    return [c for c in cells if c not in shared]


def choose(fits: Sequence[Fit], k: int) -> list[Fit]:
    """The k fits with the highest inner-validation macro-F1; ties keep the given (grid)
    order, so the choice is deterministic. A fit without an inner score (NaN: one not made
    by fuse.experiment.evaluate_head, e.g. a nested-tuned refit) is never chosen."""
    scored = [i for i, f in enumerate(fits) if not math.isnan(f.inner_macro_f1)]
    order = sorted(scored, key=lambda i: -fits[i].inner_macro_f1)  # stable
    return [fits[i] for i in order[:k]]


def vote(
    runs: Sequence[Fit],
    names: Sequence[str],
    k: int,
    labels: np.ndarray,
    classes: Sequence[str],
) -> list[Vote]:
    """The ensemble row's fits: per (seed, fold) of `runs`, the soft vote of the top k of
    the candidate cells `names` (one per fit, in grid order) by inner-validation macro-F1
    (module docstring); [] when there are fewer than k candidates. labels: the FeatureSet's
    (n,) class indices, to score the vote."""
    if k < 1:
        return []
    if len(names) < k:
        note(
            f"no {ensemble_id(k)} row: it needs {k} cells with fits of their own, not {len(names)}"
        )
        return []
    rank = {c: i for i, c in enumerate(names)}
    by_fit: dict[tuple[int, int], list[Fit]] = {}
    for r in runs:
        if r.cell in rank:
            by_fit.setdefault((r.seed, r.fold), []).append(r)
    votes = []
    for (seed, fold), fits in by_fit.items():
        members = choose(sorted(fits, key=lambda r: rank[r.cell]), k)
        if len(members) < k:
            note(f"no {ensemble_id(k)} row: fewer than {k} cells have inner-validation scores")
            return []
        scored = members[0].scored
        if any(not np.array_equal(m.scored, scored) for m in members):
            raise RuntimeError(  # folds are made once for every cell: this is a bug, not data
                f"cannot vote seed {seed} fold {fold}: the cells were scored on different rows"
            )
        proba = np.mean([m.proba for m in members], axis=0)  # (n_scored, C)
        metrics = score(labels[scored], proba, classes)
        metrics.update(
            seed=seed,
            fold=fold,
            train_time_s=float(sum(m.metrics["train_time_s"] for m in members)),
            n_params=int(sum(m.metrics["n_params"] for m in members)),
            best_iteration=None,
        )
        cells = [m.cell for m in members]
        inner = [float(m.inner_macro_f1) for m in members]
        votes.append(Vote(seed, fold, cells, inner, scored, proba, metrics))
    return votes


def entry(k: int, votes: Sequence[Vote], classes: Sequence[str]) -> dict:
    """results.json's `ensemble` block (fuse.experiment adds its significance): the row's
    fields as a cell's, its summary over the votes, and the members chosen per fit."""
    return {
        "id": ensemble_id(k),
        "text": None,
        "image": None,
        "head": "ensemble",
        "variant": f"top{k}",
        "k": k,
        "chosen_by": "macro-F1 on each fit's inner-validation rows (never the scored rows)",
        "n_params_meaning": "the sum over the member fits",
        "summary": aggregate([v.metrics for v in votes], classes),
        "chosen": [
            {"seed": v.seed, "fold": v.fold, "cells": v.cells, "inner_macro_f1": v.inner_macro_f1}
            for v in votes
        ],
    }
