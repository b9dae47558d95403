"""The one experiment runner: cells × folds × seeds, and the run folder it leaves.

`fuse` is a grid of one cell and `compare` a grid of many (fuse.grid: which cells, which
rows); both go through `run_grid`, so both leave the same files:

    config.yaml          the resolved settings (replayable with --config), caches, rows, cells
                         (params, and every fit's model folder), best_cell
    results.json         per cell: mean ± std over folds × seeds and of the per-seed means;
                         per fit: scores, train seconds, parameters, per-epoch history
    results.csv          one row per cell, ranked by mean macro-F1; runs.csv one row per fit
                         (both: each cell vs the best, fuse.significance; --ensemble K: the
                         row ensemble(topK) last, fuse.ensemble)
    val_predictions.csv  every scored row of every fit, with each class's probability
    models/<cell-slug>/seed<S>-fold<K>/   every fit's model (fuse.predict.load_head)
    heatmap.png, scores.png, learning_curves.png, confusion.png  (fuse.report.write_plots)
    robustness.csv, robustness.png  every fit re-scored with a modality missing or noisy
                         (fuse.robustness; not written with --robustness off)

Every cell is fitted and scored on the same folds (the splits are computed once, on the rows
usable in every cache of the grid) and the same model seeds.

Run folders: everything is checked (heads, hyperparameters, seeds, caches, splits) and the
run folder is created and probed for writing BEFORE any training; the run is written into
`<out>/<stamp>-<name>.tmp/` and renamed to `<out>/<stamp>-<name>/` only once every file is in
place (fuse._util.StagedRunDir), so a folder without `.tmp` is always a finished run.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import fusebench.fuse.distributed as distributed
import fusebench.fuse.ensemble as ensemble
import numpy as np
import yaml
from fusebench.fuse._util import few, note, plain, versions
from fusebench.fuse.bank import describe_common_rows, pooled_digest, rows_digest, trained_rows
from fusebench.fuse.features import FeatureSet, check_inputs
from fusebench.fuse.grid import (
    Cell,
    FeatureBank,
    GridSpec,
    check_seeds,
    describe_replayed_caches,
    load_bank,
    parse_heads,
    resolve_settings,
    shared_fits,
)
from fusebench.fuse.head import FitsTogether, Head, fit_history, fit_label
from fusebench.fuse.metrics import aggregate, score
from fusebench.fuse.protocol import Fold, StratifiedProtocol
from fusebench.fuse.registry import HeadConfig, resolve_head
from fusebench.fuse.report import write_csv
from fusebench.fuse.significance import csv_columns, of_runs

__all__ = [
    "FitProgress",
    "HeadRun",
    "RunResult",
    "check_seeds",
    "evaluate_head",
    "parse_heads",
    "run_compare",
    "run_grid",
    "settings_yaml",
]

METRICS = ("accuracy", "macro_f1", "weighted_f1")
SPREAD = (
    "± is the sample std (ddof 1) over every fit of a cell (folds × seeds: n fits), so it "
    "pools fold and seed variation; seed_means is the mean ± std of the per-seed means (each "
    "averaged over the folds; n seeds): the spread to compare two cells by"
)


@dataclass
class HeadRun:
    """One head fitted on one fold with one model seed, scored on that fold's scored rows."""

    head: str
    seed: int
    fold: int
    metrics: dict  # score() + train_time_s, n_params, best_iteration
    scored: np.ndarray  # (n_scored,) rows of the FeatureSet
    proba: np.ndarray  # (n_scored, C)
    history: list = field(default_factory=list)  # torch: [{epoch, train_loss, val_loss, ...}]
    cell: str = ""  # the cell id (run_grid)
    model_dir: str | None = None  # where the fitted model was saved, relative to the run
    inner_macro_f1: float = float("nan")  # on fold.inner_val: the ensemble row's choice
    robustness: dict = field(default_factory=dict)  # condition -> macro-F1 (fuse.robustness)


@dataclass(frozen=True)
class RunInputs:
    """What a run's numbers were computed from: the spec, the bank, the cells (grouped by fit
    in `fits`: shared_fits), the folds and the seeds."""

    spec: GridSpec
    bank: FeatureBank
    cells: Sequence[Cell]
    fits: Sequence[Sequence[Cell]]
    folds: Sequence[Fold]
    seeds: Sequence[int]


@dataclass
class RunResult:
    """What `run_grid` returns: the folder, the results.json it holds, and the stdout table."""

    run_dir: Path
    results: dict
    runs: list[HeadRun] = field(repr=False, default_factory=list)
    table: str = ""

    @property
    def summaries(self) -> dict[str, dict]:
        """cell id -> aggregate() over seeds × folds, best first."""
        return {c: self.results["cells"][c]["summary"] for c in self.results["ranking"]}


class FitProgress:
    """Progress over a grid of fits, for a terminal and for a log file alike.

    On a terminal: one bar over the fits (postfix: cell, seed, fold k/K) above each torch
    head's epoch bar. When stderr is not a terminal (`> log 2>&1`, a pipe, a batch job): no
    redrawn bars at all, one plain line per finished fit instead:
        fit 3/18: minilm+vit/cross_attn seed 42 fold 3/5: macro-F1 0.6123, 4.2s
    quiet: nothing at all."""

    def __init__(self, total: int, n_folds: int, *, quiet: bool, desc: str) -> None:
        from tqdm.auto import tqdm

        self.total, self.n_folds, self.done = total, n_folds, 0
        self.live = not quiet and sys.stderr.isatty()  # bars are redrawn: terminals only
        self.lines = not quiet and not self.live
        self.bar = tqdm(total=total, unit="fit", desc=desc, disable=not self.live, file=sys.stderr)
        self._where = ""

    @property
    def inner_quiet(self) -> bool:
        """Whether a head's own (epoch) bar stays hidden."""
        return not self.live

    def start(self, label: str, seed: int, fold: int) -> None:
        self._where = f"{label} seed {seed} " + (
            f"fold {fold + 1}/{self.n_folds}" if self.n_folds > 1 else "holdout"
        )
        if self.live:
            self.bar.set_postfix_str(self._where)

    @property
    def where(self) -> str:
        """The fit under way, e.g. "minilm+vit/cross_attn seed 42 fold 3/5"."""
        return self._where

    def finish(self, macro_f1: float, seconds: float) -> None:
        self.done += 1
        self.bar.update(1)
        if self.lines:
            print(
                f"fit {self.done}/{self.total}: {self._where}: macro-F1 {macro_f1:.4f}, "
                f"{seconds:.1f}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> FitProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- one head, folds × seeds


def evaluate_head(
    head: str | HeadConfig,
    fs: FeatureSet,
    folds: Sequence[Fold],
    seeds: Sequence[int],
    *,
    overrides: dict | None = None,
    epochs: int | None = None,
    device: str | None = None,
    class_weights: bool | None = None,
    quiet: bool = True,
    progress: FitProgress | None = None,
    label: str | None = None,
    save: Callable[[int, int], Path] | None = None,
    one_at_a_time: bool = False,
    robustness: bool = False,
) -> list[HeadRun]:
    """Fits a head once per (seed, fold): on fold.fit, early-stopped on fold.inner_val, then
    scores fold.scored — rows it has not seen before.

    head: a resolved head (a grid cell's config), or a name resolved here with `overrides`
    and the run-wide options. Heads with the FitsTogether capability (torch) train every
    (seed, fold) fit together as one stacked model (fuse.batched: each fit keeps its own rows,
    data order, early stopping and best weights); one_at_a_time=True fits them one after
    another (the baseline), as every other head is. progress: told when each fit starts and
    ends (its bar or log line, named `label`, default the head); it also decides whether the
    head's own epoch bar shows. save(seed, fold): the folder each fitted model is saved to
    (none: the models are dropped). robustness: also score each fit with a modality missing
    or noisy (fuse.robustness; HeadRun.robustness)."""
    if isinstance(head, str):
        options = {"epochs": epochs, "device": device, "class_weights": class_weights}
        head = resolve_head(head, overrides, **options)
    label = label or head.name
    if progress is not None:
        quiet = quiet or progress.inner_quiet
    pairs = [(seed, fold) for seed in seeds for fold in folds]
    heads = [head.build(seed) for seed, _ in pairs]
    together = not one_at_a_time and _fit_together(heads, fs, pairs, quiet, progress, label)
    runs: list[HeadRun] = []
    for (seed, fold), est in zip(pairs, heads):
        if progress is not None:
            progress.start(label, seed, fold.index)
        start = time.perf_counter() - (est.train_time_ if together else 0.0)
        if not together:
            with fit_label(progress.where if progress is not None else None):
                est.fit(fs.take(fold.fit), fs.take(fold.inner_val), quiet=quiet)
        inner = ensemble.inner_macro_f1(est, fs, fold)  # the ensemble row's choice; before scoring
        run = scored_run(head.name, est, fs, seed, fold, robustness=robustness)
        run.inner_macro_f1 = inner
        if save is not None:
            folder = save(seed, fold.index)
            est.save(folder)
            run.model_dir = str(folder)
        runs.append(run)
        if progress is not None:
            progress.finish(run.metrics["macro_f1"], time.perf_counter() - start)
    return runs


def scored_run(
    name: str, head: Head, fs: FeatureSet, seed: int, fold: Fold, *, robustness: bool = False
) -> HeadRun:
    """A fitted head scored on fold.scored: its scores, cost and per-epoch history (and, with
    robustness, its macro-F1 per fuse.robustness condition)."""
    scored = fs.take(fold.scored)
    proba = head.predict_proba(scored)  # (n_scored, C)
    metrics = score(scored.label, proba, fs.classes)
    metrics.update(
        seed=seed,
        fold=fold.index,
        train_time_s=float(head.train_time_),
        n_params=int(head.n_params_),
        best_iteration=head.best_iteration_,
    )
    run = HeadRun(name, seed, fold.index, metrics, fold.scored, proba, fit_history(head))
    if robustness:
        from fusebench.fuse.robustness import robustness_scores

        run.robustness = robustness_scores(head, fs, fold, seed=seed, clean=proba)
    return run


def _fit_together(
    heads: Sequence[Head],
    fs: FeatureSet,
    pairs: Sequence[tuple[int, Fold]],
    quiet: bool,
    progress: FitProgress | None,
    label: str,
) -> bool:
    """Fits `heads` (one per (seed, fold) of `pairs`) as one when their head can
    (FitsTogether); False, nothing fitted, when they are to be fitted one at a time."""
    if len(heads) < 2 or not isinstance(heads[0], FitsTogether):
        return False
    if progress is not None:
        progress.start(label, pairs[0][0], pairs[0][1].index)
    trains = [fs.take(fold.fit) for _, fold in pairs]
    vals = [fs.take(fold.inner_val) for _, fold in pairs]
    return type(heads[0]).fit_together(heads, trains, vals, quiet=quiet, label=label)


# ---------------------------------------------------------------- the grid


def run_grid(spec: GridSpec, *, out: str | Path = "runs", quiet: bool = False) -> RunResult:
    """Every cell of `spec` × folds × seeds -> `<out>/<stamp>-<name>/` (see the module
    docstring). Fails before any training on a bad head, hyperparameter, seed, device,
    cache, split or output folder. Cells whose inputs are byte-identical are fitted once
    and reported under each id (fuse.grid.shared_fits).

    Under torchrun the ranks split the fits (fuse.distributed): every rank checks, loads
    and splits alike, fits its share into the one staged folder, and rank 0 writes the run
    from every rank's fits, as one process would; the other ranks get the same folder and
    results, with a one-line table saying what they fitted."""
    seeds, cells, bank, folds, fits = distributed.agree(lambda: prepare(spec))
    mine, share = distributed.my_fits(fits)  # all fits outside torchrun
    if (msg := distributed.split_note(share, len(cells))) is not None:
        note(msg)
    device = distributed.rank_spec(spec).device  # cuda:LOCAL_RANK under torchrun on GPUs
    name = cells[0].head if spec.command == "fuse" else spec.command
    total = len(mine) * len(folds) * len(seeds)
    lead = distributed.is_lead()  # only rank 0 shows a bar (its own fits)
    from fusebench.fuse.tune import run_folder, tune_cells

    with (
        run_folder(spec, out, name, cells) as run,  # a tune's resumes (fuse.tune)
        FitProgress(total, len(folds), quiet=quiet or not lead, desc=spec.command) as progress,
    ):

        def fit_mine() -> list[HeadRun]:
            from fusebench.fuse.overlap import fit_groups  # CPU heads beside CUDA ones

            groups = [[on_device(cell, device) for cell in group] for group in mine]
            runs = fit_groups(
                groups, lambda g, p: fit_group(spec, g, folds, seeds, run.path, p, quiet), progress
            )
            order = {c.id: i for i, c in enumerate(cells)}
            return sorted(runs, key=lambda r: order[r.cell])  # grid order; stable

        runs = distributed.collect(fit_mine, cells)  # None on ranks other than 0
        if runs is not None and spec.tune:  # fuse.tune: the tuned cells, nested, added
            cells, runs = tune_cells(
                spec, cells, runs, folds, seeds, run.path, scored_run=scored_run, quiet=quiet
            )
        if runs is not None:
            inputs = RunInputs(spec, bank, cells, fits, folds, seeds)
            results = write_run(run.path, inputs, runs)
    if runs is None:
        results = json.loads((run.final / "results.json").read_text())
        table = distributed.follower_line(sum(len(g) for g in mine))
        return RunResult(run_dir=run.final, results=results, table=table)
    from fusebench.fuse.report import cells_table

    return RunResult(run_dir=run.final, results=results, runs=runs, table=cells_table(results))


def prepare(spec: GridSpec) -> tuple:
    """Every check before training, on every rank alike (no collective inside): (seeds,
    cells with their features, the bank, folds, the cells grouped by fit)."""
    seeds = check_seeds(spec.seeds)
    cells = plan(spec)
    bank = load_bank(
        spec.features, cells, allow_stale=spec.allow_stale, memory_budget=spec.memory_budget
    )
    cells = runnable(spec, cells, bank)
    fits = shared_fits(cells)
    for message in (
        bank.base.describe_excluded(),
        describe_common_rows(bank, cells),
        describe_replayed_caches(spec, bank),
        describe_unused_labelled(bank.base),
        describe_shared(fits),
    ):
        if message:
            note(message)
    return seeds, cells, bank, splits_of(bank.base, spec.protocol), fits


def describe_shared(fits: Sequence[Sequence[Cell]]) -> str | None:
    """A note naming the cells that share a fit (byte-identical inputs); None when none do."""
    shared = [f"{', '.join(c.id for c in g[1:])} as {g[0].id}" for g in fits if len(g) > 1]
    if not shared:
        return None
    return (
        "cells that read byte-identical inputs (equal array digests in their caches) are "
        f"fitted once and reported under each name: {few(shared, 4)}"
    )


def on_device(cell: Cell, device: str) -> Cell:
    """The cell built for this rank's device (distributed.rank_spec), unless the cell sets
    its own train.device (its options then hold None for it)."""
    own = cell.config.options.get("device")
    if own is None or own == device:
        return cell
    return replace(cell, config=cell.config.with_options(device=device))


def run_compare(*, out: str | Path = "runs", quiet: bool = False, **settings: Any) -> RunResult:
    """`fusebench compare` from Python: settings as the flags (heads="all", features=...,
    text="minilm,bert", image="vit,none", set=[...], sweep=[...], folds=5, seeds="42,43",
    epochs=..., device=..., or protocol=StratifiedProtocol(...))."""
    protocol = settings.pop("protocol", None)
    if protocol is not None:
        settings.update(protocol.to_dict())
        settings.pop("inner_ratio")
    defaults = {"heads": "all", "text": "minilm", "image": "vit", "seeds": "42,43,44"}
    given = {"device": "auto", "class_weights": False, "allow_stale": False, **defaults}
    given.update(settings)
    spec = resolve_settings("compare", given, explicit=settings)
    return run_grid(spec, out=out, quiet=quiet)


def settings_yaml(spec: GridSpec) -> str:
    """--print-config: the resolved settings (what config.yaml replays) and the cells they
    make before any cache is read (the caches may still skip some), as YAML."""
    cells, skipped, _ = spec.cells()
    data = {
        **spec.settings(),
        "planned_cells": [c.id for c in cells],
        "skipped_cells": {c.id: why for c, why in skipped},
    }
    return yaml.safe_dump(plain(data), sort_keys=False, allow_unicode=True)


def plan(spec: GridSpec) -> list[Cell]:
    """The grid's cells, each resolved once (notes for those skipped or shared); builds every
    cell's head once (HeadConfig.prototype), so a bad hyperparameter or device fails before
    any cache is read."""
    cells, skipped, shared = spec.cells()
    _refuse_missing_heads(spec, cells, skipped)
    for cell in cells:
        cell.config.prototype  # noqa: B018  (built and checked; kept for config.yaml)
    overruled = [f"{c.id}: {', '.join(w)}" for c in cells if (w := spec.overruled(c))]
    if overruled:
        shared.append(
            "a cell's own --set/--sweep value wins over the flag; trained as set: "
            + few(overruled, 4)
        )
    for message in [f"skipping {cell.id}: {why}" for cell, why in skipped] + shared:
        note(message)  # only once every cell has passed its checks: an error stays one line
    return cells


def _refuse_missing_heads(
    spec: GridSpec, cells: list[Cell], skipped: list[tuple[Cell, str]]
) -> None:
    """fuse: its one cell must run. compare: a head named in --heads (not 'all') that can
    run in no cell is an error, not a note; so is a grid with no cell at all."""
    if skipped and (spec.strict or not cells):
        raise ValueError(skipped[0][1])
    if spec.heads_all:
        return
    have = {c.head for c in cells}
    for cell, why in skipped:
        if cell.head not in have:
            raise ValueError(why)


def runnable(spec: GridSpec, cells: list[Cell], bank: FeatureBank) -> list[Cell]:
    """The cells whose features the caches hold (tokens for token heads), each with its
    features (bank.cell_set); the others are skipped with one note each (fuse, or a head
    named in --heads with no cell left: error)."""
    ok, skipped = [], []
    for cell in cells:
        fs, head = bank.cell_set(cell), cell.config
        try:
            check_inputs(
                fs,
                head=cell.head,
                modalities=head.modalities,
                require=head.require,
                tokens=head.tokens,
            )
        except ValueError as e:
            skipped.append((cell, str(e)))
            continue
        ok.append(replace(cell, features=fs))
    _refuse_missing_heads(spec, ok, skipped)
    for cell, why in skipped:
        note(f"skipping {cell.id}: {why}")
    return ok


def fit_group(
    spec: GridSpec,
    cells: Sequence[Cell],
    folds: Sequence[Fold],
    seeds: Sequence[int],
    run_dir: Path,
    progress: FitProgress,
    quiet: bool,
) -> list[HeadRun]:
    """Cells that share one fit (byte-identical inputs): the first is fitted × folds ×
    seeds, each fit's model saved to models/<its slug>/seed<S>-fold<K>/; every other is
    reported with those same fits (and models)."""
    first = cells[0]

    def save(seed: int, fold: int) -> Path:
        return run_dir / "models" / first.slug / f"seed{seed}-fold{fold}"

    runs = evaluate_head(
        first.config,
        first.features,
        folds,
        seeds,
        quiet=quiet,
        progress=progress,
        label=first.id,
        save=save,
        one_at_a_time=spec.one_at_a_time,
        robustness=spec.robustness,
    )
    for r in runs:
        r.cell = first.id
        r.model_dir = Path(r.model_dir).relative_to(run_dir).as_posix()
    shared = [replace(r, cell=c.id, history=list(r.history)) for c in cells[1:] for r in runs]
    return runs + shared


def splits_of(fs: FeatureSet, protocol: StratifiedProtocol) -> list[Fold]:
    """protocol.splits(fs), with a note when a class of the cache has no row to learn from
    (the scores still average over every class of the cache, as the cache defines them)."""
    folds = protocol.splits(fs)
    labelled = np.bincount(fs.label[fs.label >= 0], minlength=fs.n_classes)
    if absent := [c for c, n in zip(fs.classes, labelled) if n == 0]:
        note(
            f"class(es) {', '.join(absent)} of the cache have no usable labelled row; "
            "macro-F1 still averages over every class of the cache"
        )
    return folds


def unused_labelled(fs: FeatureSet) -> dict[str, int]:
    """split -> labelled usable rows outside split "train": the protocol never fits or scores
    them (a manifest's own `val` / `dev` rows, say)."""
    outside = fs.split[(fs.label >= 0) & (fs.split != "train")]
    splits, counts = np.unique(outside, return_counts=True)
    return {str(s): int(n) for s, n in zip(splits, counts)}


def describe_unused_labelled(fs: FeatureSet) -> str | None:
    """One note naming the labelled rows the protocol leaves unused, and how to label them."""
    unused = unused_labelled(fs)
    if not unused:
        return None
    n_train = int(((fs.split == "train") & (fs.label >= 0)).sum())
    parts = ", ".join(f"{n} in split '{s}'" for s, n in unused.items())
    first = next(iter(unused))
    return (
        f"labelled rows outside split 'train' are not used ({parts}): fuse and compare fit and "
        f"score only on the {n_train} labelled rows of split 'train'; "
        f"`fusebench predict --run RUN --split {first}` labels them"
    )


# ---------------------------------------------------------------- the run folder


def write_run(run_dir: Path, inputs: RunInputs, runs: Sequence[HeadRun]) -> dict:
    """Every file of the run folder but the models (saved as they were fitted); returns the
    results.json dict."""
    fs = inputs.bank.base
    votes, voted = ensemble_of(inputs, runs)  # none without --ensemble
    every = [*runs, *voted]
    write_csv(run_dir / "val_predictions.csv", prediction_rows(every, fs))
    results = results_of(inputs.spec.protocol, fs.classes, inputs.cells, every, inputs, votes)
    config = run_config(inputs, runs, results["ranking"])
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    )
    (run_dir / "results.json").write_text(json.dumps(plain(results), indent=2))
    write_csv(run_dir / "results.csv", results_rows(results))
    rows = [run_row(r, results["cells"].get(r.cell) or results["ensemble"]) for r in every]
    write_csv(run_dir / "runs.csv", rows)
    from fusebench.fuse.report import write_plots
    from fusebench.fuse.robustness import write_robustness

    write_plots(run_dir, results)
    write_robustness(run_dir, runs)  # robustness.csv/.png; nothing with --robustness off
    return results


def ensemble_of(inputs: RunInputs, runs: Sequence[HeadRun]) -> tuple[list, list[HeadRun]]:
    """--ensemble K: the votes of the ensemble row (fuse.ensemble) and its fits as HeadRuns
    (cell "ensemble(topK)"); ([], []) without it, or with fewer than K cells of their own."""
    k, fs = inputs.spec.ensemble, inputs.bank.base
    groups = [[c.id for c in g] for g in inputs.fits]
    names = ensemble.candidates([c.id for c in inputs.cells], groups)
    votes = ensemble.vote(runs, names, k, fs.label, fs.classes) if k else []
    cell = ensemble.ensemble_id(k)
    voted = [
        HeadRun("ensemble", v.seed, v.fold, v.metrics, v.scored, v.proba, cell=cell) for v in votes
    ]
    return votes, voted


def results_of(
    protocol: StratifiedProtocol,
    classes: Sequence[str],
    cells: Sequence[Cell],
    runs: Sequence[HeadRun],
    inputs: RunInputs,
    votes: Sequence[ensemble.Vote] = (),
) -> dict:
    """results.json: per cell its summary over folds × seeds, ranked, and its comparison with
    the best (fuse.significance); the ensemble row (votes: fuse.ensemble), if any; every
    fit's record."""
    out = {}
    for cell in cells:
        mine = [r for r in runs if r.cell == cell.id]
        out[cell.id] = {
            "text": cell.text,
            "image": cell.image,
            "head": cell.head,
            "variant": cell.variant,
            "n_params_meaning": cell.config.prototype.params_meaning,
            "summary": aggregate([r.metrics for r in mine], classes),
        }
    ranking = sorted(out, key=lambda c: -out[c]["summary"]["macro_f1"]["mean"])  # stable
    extra = {"ensemble": ensemble.entry(inputs.spec.ensemble, votes, classes)} if votes else {}
    rows = {**out, **({extra["ensemble"]["id"]: extra["ensemble"]} if votes else {})}
    same = next(([c.id for c in g] for g in inputs.fits if ranking[0] in {c.id for c in g}), [])
    design, tests = of_runs(runs, list(rows), ranking[0], same, inputs.folds)
    for row_id, entry in rows.items():
        entry["significance"] = tests[row_id]
    return plain(
        {
            "protocol": protocol.describe(),
            "spread": SPREAD,
            "significance": design,
            "classes": list(classes),
            "ranking": ranking,
            "cells": {c: out[c] for c in ranking},
            **extra,
            "runs": [run_record(r) for r in runs],
        }
    )


def run_record(r: HeadRun) -> dict:
    """One fit in results.json: its scores, cost and per-epoch history ([] for non-torch)."""
    m = r.metrics
    keep = ("accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix")
    return {
        "cell": r.cell,
        "seed": r.seed,
        "fold": r.fold,
        **{k: m[k] for k in keep},
        "train_time_s": m["train_time_s"],
        "n_params": m["n_params"],
        "best_iteration": m["best_iteration"],
        "inner_macro_f1": _number(r.inner_macro_f1),  # on inner_val: the ensemble's choice
        "history": r.history,
    }


def _number(x: float) -> float | None:
    """x, or None for NaN (the ensemble row's own fits have no inner score): JSON has no NaN."""
    return None if x != x else x


def results_rows(results: dict) -> list[dict]:
    """results.csv: one row per cell, ranked; mean and std over fits, std of the seed means;
    the comparison with the best (fuse.significance.csv_columns); the ensemble row last."""
    rows = []
    extra = results.get("ensemble")
    ids = [*results["ranking"], *([extra["id"]] if extra else [])]
    for rank, cid in enumerate(ids, start=1):
        cell = results["cells"].get(cid) or extra
        s = cell["summary"]
        row = {"rank": rank, "cell": cid}
        row.update({k: cell[k] or "none" for k in ("text", "image")})
        row.update(head=cell["head"], variant=cell["variant"], runs=s["macro_f1"]["n"])
        row["seeds"] = s["seed_means"]["macro_f1"]["n"]
        for key in METRICS:
            row[f"{key}_mean"] = round(s[key]["mean"], 6)
            row[f"{key}_std"] = round(s[key]["std"], 6)
            row[f"{key}_seed_std"] = round(s["seed_means"][key]["std"], 6)
        row["train_time_s_mean"] = round(s["train_time_s"]["mean"], 4)
        row["n_params_mean"] = round(s["n_params"]["mean"], 1)
        row["n_params_meaning"] = cell["n_params_meaning"]
        row.update(csv_columns(cell.get("significance")))
        if cell is extra:
            row["rank"] = "-"
        rows.append(row)
    return rows


def run_row(r: HeadRun, cell: dict) -> dict:
    """runs.csv: one row per fit."""
    m = r.metrics
    return {
        "cell": r.cell,
        "text": cell["text"] or "none",
        "image": cell["image"] or "none",
        "head": r.head,
        "variant": cell["variant"],
        "seed": r.seed,
        "fold": r.fold,
        **{k: m[k] for k in METRICS},
        "train_time_s": round(m["train_time_s"], 4),
        "n_params": m["n_params"],
        "best_iteration": m["best_iteration"],
        "inner_macro_f1": "" if _number(r.inner_macro_f1) is None else round(r.inner_macro_f1, 6),
    }


def prediction_rows(runs: Sequence[HeadRun], fs: FeatureSet) -> list[dict]:
    """val_predictions.csv: every scored row of every fit, with each class's probability."""
    rows = []
    for r in runs:
        pred = r.proba.argmax(axis=1)
        for g, t, p, pr in zip(fs.guid[r.scored], fs.label[r.scored], pred, r.proba):
            row = {"cell": r.cell, "seed": r.seed, "fold": r.fold, "guid": g}
            row.update(true=fs.classes[t], pred=fs.classes[p])
            row.update({f"p_{c}": round(float(v), 6) for c, v in zip(fs.classes, pr)})
            rows.append(row)
    return rows


def run_config(inputs: RunInputs, runs: Sequence[HeadRun], ranking: Sequence[str]) -> dict:
    """config.yaml: the replayable settings, then what the numbers were computed from."""
    bank, cells = inputs.bank, inputs.cells
    fs = bank.base
    settings = inputs.spec.settings()
    settings["heads"] = list(dict.fromkeys(c.head for c in cells))  # the heads that ran
    settings["seeds"] = list(inputs.seeds)
    trained = trained_rows(fs)
    fitted_as = {c.id: group[0].id for group in inputs.fits for c in group[1:]}
    caches = {  # + per modality, a digest of the pooled features it was trained on (predict)
        enc: {
            **src,
            "trained_digest": {
                m: pooled_digest(bank.modalities[(m, enc)], trained) for m in src["modalities"]
            },
        }
        for enc, src in bank.caches.items()
    }
    return plain(
        {
            **settings,
            "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "caches": caches,
            # cache file -> how its data changed since extraction; {} = every cache was fresh
            "stale_caches": fs.stale,
            "classes": list(fs.classes),
            "rows": {
                "usable": len(fs),
                "usable_in": "every cache of the run (all cells share these rows and folds)",
                "labelled_train": len(trained),
                # sha256 of the guids and classes of those rows, in order (report: same rows?)
                "digest": rows_digest(fs, trained),
                "labelled_unused": unused_labelled(fs),
                "per_fold": [
                    {"fit": len(f.fit), "inner_val": len(f.inner_val), "scored": len(f.scored)}
                    for f in inputs.folds
                ],
                "excluded": [
                    {"guid": e.guid, "split": e.split, "reason": e.reason} for e in fs.excluded
                ],
            },
            "versions": versions(),
            "cells": {c.id: cell_entry(c, runs, fitted_as.get(c.id)) for c in cells},
            "best_cell": ranking[0],
        }
    )


def cell_entry(cell: Cell, runs: Sequence[HeadRun], same_fit_as: str | None) -> dict:
    """config.yaml's entry of a cell: what it reads, its resolved hyperparameters (what it
    trained with), the cell whose fits it shares (byte-identical inputs), its fits."""
    shared = {"same_fit_as": same_fit_as} if same_fit_as else {}
    return {
        "text": cell.text,
        "image": cell.image,
        "head": cell.head,
        "variant": cell.variant,
        "overrides": cell.overrides,
        "params": cell.config.prototype.get_config()["params"],
        **shared,
        "fits": [
            {
                "seed": r.seed,
                "fold": r.fold,
                "model_dir": r.model_dir,
                "best_iteration": r.metrics["best_iteration"],
            }
            for r in runs
            if r.cell == cell.id
        ],
    }
