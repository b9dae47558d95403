"""The one experiment runner: cells × folds × seeds, and the run folder it leaves.

`fuse` is a grid of one cell and `compare` a grid of many (fuse.grid: which cells, which
rows); both go through `run_grid`, so both leave the same files:

    config.yaml          the resolved settings (replayable with --config), caches, rows, cells
                         (params, and every fit's model folder), best_cell
    results.json         per cell: mean ± std over folds × seeds and of the per-seed means;
                         per fit: scores, train seconds, parameters, per-epoch history
    results.csv          one row per cell, ranked by mean macro-F1; runs.csv one row per fit
    val_predictions.csv  every scored row of every fit, with each class's probability
    models/<cell-slug>/seed<S>-fold<K>/   every fit's model (fuse.predict.load_head)
    heatmap.png, scores.png, learning_curves.png, confusion.png  (fuse.report.write_plots)

Every cell is fitted and scored on the same folds (the splits are computed once, on the rows
usable in every cache of the grid) and the same model seeds.

Run folders: everything is checked (heads, hyperparameters, seeds, caches, splits) and the
run folder is created and probed for writing BEFORE any training; the run is written into
`<out>/<stamp>-<name>.tmp/` and renamed to `<out>/<stamp>-<name>/` only once every file is in
place (fuse._util.StagedRunDir), so a folder without `.tmp` is always a finished run.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from fusebench.fuse._util import note, plain, versions
from fusebench.fuse.features import FeatureSet, check_inputs
from fusebench.fuse.grid import (
    Cell,
    FeatureBank,
    GridSpec,
    check_seeds,
    describe_common_rows,
    load_bank,
    parse_heads,
    resolve_settings,
)
from fusebench.fuse.metrics import aggregate, score
from fusebench.fuse.protocol import Fold, StratifiedProtocol
from fusebench.fuse.registry import build_head, get_head, head_needs_tokens
from fusebench.fuse.report import write_csv

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
    n_params_meaning: str = ""  # what n_params counts for this head


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
    name: str,
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
) -> list[HeadRun]:
    """Fits head `name` once per (seed, fold): on fold.fit, early-stopped on fold.inner_val,
    then scores fold.scored — rows it has not seen before.

    Torch heads train every (seed, fold) fit together as one stacked model (fuse.batched:
    each fit keeps its own rows, data order, early stopping and best weights);
    one_at_a_time=True fits them one after another (the baseline), as do non-torch heads.
    progress: told when each fit starts and ends (its bar or log line, named `label`, default
    the head); it also decides whether the head's own epoch bar shows. save(seed, fold): the
    folder each fitted model is saved to (none: the models are dropped)."""
    runs: list[HeadRun] = []
    if progress is not None:
        quiet = quiet or progress.inner_quiet
    pairs = [(seed, fold) for seed in seeds for fold in folds]
    heads = [
        build_head(
            name,
            seed=seed,
            overrides=overrides,
            epochs=epochs,
            device=device,
            class_weights=class_weights,
        )
        for seed, _ in pairs
    ]
    batched = not one_at_a_time and _fit_batched(
        heads, fs, pairs, quiet=quiet, progress=progress, label=label or name
    )
    for (seed, fold), head in zip(pairs, heads):
        if progress is not None:
            progress.start(label or name, seed, fold.index)
        start = time.perf_counter() - (head.train_time_ if batched else 0.0)
        if not batched:
            # torch heads label their epoch bar with the fit (cell, seed, fold); the
            # registry contract is fit(train, val, quiet=): only heads taking `desc` get it
            desc = {"desc": progress.where} if progress is not None and _takes_desc(head) else {}
            head.fit(fs.take(fold.fit), fs.take(fold.inner_val), quiet=quiet, **desc)
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
        run = HeadRun(name, seed, fold.index, metrics, fold.scored, proba)
        run.history = list(getattr(head, "history_", None) or [])
        run.n_params_meaning = params_meaning(head)
        if save is not None:
            folder = save(seed, fold.index)
            head.save(folder)
            run.model_dir = str(folder)
        runs.append(run)
        if progress is not None:
            progress.finish(metrics["macro_f1"], time.perf_counter() - start)
    return runs


def _takes_desc(head: Any) -> bool:
    return "desc" in inspect.signature(head.fit).parameters


def _fit_batched(
    heads: Sequence[Any],
    fs: FeatureSet,
    pairs: Sequence[tuple[int, Fold]],
    *,
    quiet: bool,
    progress: FitProgress | None,
    label: str,
) -> bool:
    """Fits `heads` (one per (seed, fold) of `pairs`) together when they are torch heads
    that vmap can run (fuse.batched); False (nothing fitted) when they are to be fitted one
    at a time: non-torch heads, a single fit, or a module vmap refuses (with a note)."""
    from fusebench.fuse import batched

    if not batched.can_batch(heads):
        return False
    if heads[0].needs_tokens and not batched.BATCH_TOKEN_HEADS:
        note(
            f"{label}: its {len(heads)} fits are trained one at a time ({batched.TOKEN_HEADS_NOTE})"
        )
        return False
    if progress is not None:
        progress.start(label, pairs[0][0], pairs[0][1].index)
    try:
        batched.fit_together(
            heads,
            [fs.take(fold.fit) for _, fold in pairs],
            [fs.take(fold.inner_val) for _, fold in pairs],
            quiet=quiet,
            desc=f"{label}: {len(heads)} fits together",
        )
    except batched.NotBatchable as e:
        note(f"{label}: its {len(heads)} fits are trained one at a time ({e})")
        return False
    return True


PARAMS_MEANING = {  # what n_params counts, for heads that are not torch modules
    "lightgbm": "tree nodes (split thresholds + leaf values) up to the best iteration",
    "logreg": "coefficients + intercepts",
}


def params_meaning(head: Any) -> str:
    """What a head's n_params_ counts: trainable weights for torch heads, nodes for trees."""
    if meaning := getattr(head, "n_params_meaning", None):
        return str(meaning)
    if getattr(head, "kind", "") == "torch":
        return "trainable weights"
    return PARAMS_MEANING.get(getattr(head, "name", ""), "as counted by the estimator")


# ---------------------------------------------------------------- the grid


def run_grid(spec: GridSpec, *, out: str | Path = "runs", quiet: bool = False) -> RunResult:
    """Every cell of `spec` × folds × seeds -> `<out>/<stamp>-<name>/` (see the module
    docstring). Fails before any training on a bad head, hyperparameter, seed, device,
    cache, split or output folder.

    Under torchrun the ranks split the cells (fuse.distributed): every rank checks, loads
    and splits alike, fits its share into the one staged folder, and rank 0 writes the run
    from every rank's fits, as one process would; the other ranks get the same folder and
    results, with a one-line table saying what they fitted."""
    from fusebench.fuse import distributed

    def prepare() -> tuple:  # every check before training; no collective inside
        seeds = check_seeds(spec.seeds)
        cells, params = plan(spec)
        bank = load_bank(
            spec.features,
            cells,
            allow_stale=spec.allow_stale,
            memory_budget=spec.memory_budget,
        )
        cells = runnable(spec, cells, bank)
        for message in (bank.base.describe_excluded(), describe_common_rows(bank, cells)):
            if message:
                note(message)
        if (msg := describe_unused_labelled(bank.base)) is not None:
            note(msg)
        return seeds, cells, params, bank, splits_of(bank.base, spec.protocol)

    seeds, cells, params, bank, folds = distributed.agree(prepare)
    mine, share = distributed.my_cells(cells)  # all cells outside torchrun
    if (msg := distributed.split_note(share, len(cells))) is not None:
        note(msg)
    fit_spec = distributed.rank_spec(spec)  # cuda:LOCAL_RANK under torchrun on GPUs
    name = cells[0].head if spec.command == "fuse" else "compare"
    total = len(mine) * len(folds) * len(seeds)
    lead = distributed.is_lead()  # only rank 0 shows a bar (its own fits)
    with (
        distributed.SharedRunDir(out, name) as run,
        FitProgress(total, len(folds), quiet=quiet or not lead, desc=spec.command) as progress,
    ):

        def fit_mine() -> list[HeadRun]:
            runs = []
            for cell in mine:
                runs += fit_cell(fit_spec, cell, bank, folds, seeds, run.path, progress, quiet)
            return runs

        runs = distributed.collect(fit_mine, cells)  # None on ranks other than 0
        if runs is not None:
            results = write_run(run.path, spec, bank, cells, params, folds, seeds, runs)
    if runs is None:
        results = json.loads((run.final / "results.json").read_text())
        table = distributed.follower_line(len(mine))
        return RunResult(run_dir=run.final, results=results, table=table)
    from fusebench.fuse.report import cells_table

    return RunResult(run_dir=run.final, results=results, runs=runs, table=cells_table(results))


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


def plan(spec: GridSpec) -> tuple[list[Cell], dict[str, dict]]:
    """The grid's cells (notes for those skipped or shared) and each cell's resolved
    hyperparameters; builds every (head, variant) once, so a bad hyperparameter or device
    fails before any cache is read."""
    cells, skipped, shared = spec.cells()
    _refuse_missing_heads(spec, cells, skipped)
    params = {}
    for cell in cells:
        head = build_head(
            cell.head,
            overrides=cell.overrides,
            epochs=spec.epochs,
            device=spec.device,
            class_weights=spec.class_weights,
        )
        if getattr(head, "kind", "") == "torch":
            from fusebench.fuse.trainer import resolve_device

            resolve_device(head.train.device)
        config = head.get_config()
        params[cell.id] = dict(config["params"])
        if "train" in config:  # torch heads: how they are trained
            params[cell.id]["train"] = config["train"]
    for message in [f"skipping {cell.id}: {why}" for cell, why in skipped] + shared:
        note(message)  # only once every cell has passed its checks: an error stays one line
    return cells, params


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
    """The cells whose features the caches hold (tokens for token heads): the others are
    skipped with one note each (fuse, or a head named in --heads with no cell left: error)."""
    ok, skipped = [], []
    for cell in cells:
        cls = get_head(cell.head)
        try:
            check_inputs(
                bank.cell_set(cell),
                head=cell.head,
                modalities=cls.modalities,
                require=cls.require,
                tokens=head_needs_tokens(cell.head, cell.overrides),
            )
        except ValueError as e:
            skipped.append((cell, str(e)))
            continue
        ok.append(cell)
    _refuse_missing_heads(spec, ok, skipped)
    for cell, why in skipped:
        note(f"skipping {cell.id}: {why}")
    return ok


def fit_cell(
    spec: GridSpec,
    cell: Cell,
    bank: FeatureBank,
    folds: Sequence[Fold],
    seeds: Sequence[int],
    run_dir: Path,
    progress: FitProgress,
    quiet: bool,
) -> list[HeadRun]:
    """One cell × folds × seeds, each fit's model saved to models/<slug>/seed<S>-fold<K>/."""

    def save(seed: int, fold: int) -> Path:
        return run_dir / "models" / cell.slug / f"seed{seed}-fold{fold}"

    runs = evaluate_head(
        cell.head,
        bank.cell_set(cell),
        folds,
        seeds,
        overrides=cell.overrides,
        epochs=spec.epochs,
        device=spec.device,
        class_weights=spec.class_weights,
        quiet=quiet,
        progress=progress,
        label=cell.id,
        save=save,
        one_at_a_time=spec.one_at_a_time,
    )
    for r in runs:
        r.cell = cell.id
        r.model_dir = Path(r.model_dir).relative_to(run_dir).as_posix()
    return runs


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


def write_run(
    run_dir: Path,
    spec: GridSpec,
    bank: FeatureBank,
    cells: Sequence[Cell],
    params: dict[str, dict],
    folds: Sequence[Fold],
    seeds: Sequence[int],
    runs: Sequence[HeadRun],
) -> dict:
    """Every file of the run folder but the models (saved as they were fitted); returns the
    results.json dict."""
    fs = bank.base
    write_csv(run_dir / "val_predictions.csv", prediction_rows(runs, fs))
    results = results_of(spec.protocol, fs.classes, cells, runs)
    config = run_config(spec, bank, cells, params, folds, seeds, runs, results["ranking"])
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    )
    (run_dir / "results.json").write_text(json.dumps(plain(results), indent=2))
    write_csv(run_dir / "results.csv", results_rows(results))
    write_csv(run_dir / "runs.csv", [run_row(r, results["cells"][r.cell]) for r in runs])
    from fusebench.fuse.report import write_plots

    write_plots(run_dir, results)
    return results


def results_of(
    protocol: StratifiedProtocol,
    classes: Sequence[str],
    cells: Sequence[Cell],
    runs: Sequence[HeadRun],
) -> dict:
    """results.json: per cell its summary over folds × seeds, ranked; every fit's record."""
    out = {}
    for cell in cells:
        mine = [r for r in runs if r.cell == cell.id]
        out[cell.id] = {
            "text": cell.text,
            "image": cell.image,
            "head": cell.head,
            "variant": cell.variant,
            "n_params_meaning": mine[0].n_params_meaning,
            "summary": aggregate([r.metrics for r in mine], classes),
        }
    ranking = sorted(out, key=lambda c: -out[c]["summary"]["macro_f1"]["mean"])  # stable
    return plain(
        {
            "protocol": protocol.describe(),
            "spread": SPREAD,
            "classes": list(classes),
            "ranking": ranking,
            "cells": {c: out[c] for c in ranking},
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
        "history": r.history,
    }


def results_rows(results: dict) -> list[dict]:
    """results.csv: one row per cell, ranked; mean and std over fits, std of the seed means."""
    rows = []
    for rank, cid in enumerate(results["ranking"], start=1):
        cell = results["cells"][cid]
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


def run_config(
    spec: GridSpec,
    bank: FeatureBank,
    cells: Sequence[Cell],
    params: dict[str, dict],
    folds: Sequence[Fold],
    seeds: Sequence[int],
    runs: Sequence[HeadRun],
    ranking: Sequence[str],
) -> dict:
    """config.yaml: the replayable settings, then what the numbers were computed from."""
    fs = bank.base
    settings = spec.settings()
    settings["heads"] = list(dict.fromkeys(c.head for c in cells))  # the heads that ran
    settings["seeds"] = list(seeds)
    labelled = fs.label[(fs.split == "train") & (fs.label >= 0)]
    return plain(
        {
            **settings,
            "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "caches": bank.caches,
            # cache file -> how its data changed since extraction; {} = every cache was fresh
            "stale_caches": fs.stale,
            "classes": list(fs.classes),
            "rows": {
                "usable": len(fs),
                "usable_in": "every cache of the run (all cells share these rows and folds)",
                "labelled_train": len(labelled),
                "labelled_unused": unused_labelled(fs),
                "per_fold": [
                    {"fit": len(f.fit), "inner_val": len(f.inner_val), "scored": len(f.scored)}
                    for f in folds
                ],
                "excluded": [
                    {"guid": e.guid, "split": e.split, "reason": e.reason} for e in fs.excluded
                ],
            },
            "versions": versions(),
            "cells": {c.id: cell_entry(c, params[c.id], runs) for c in cells},
            "best_cell": ranking[0],
        }
    )


def cell_entry(cell: Cell, params: dict, runs: Sequence[HeadRun]) -> dict:
    return {
        "text": cell.text,
        "image": cell.image,
        "head": cell.head,
        "variant": cell.variant,
        "overrides": cell.overrides,
        "params": params,
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
