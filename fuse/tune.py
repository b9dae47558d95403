"""Nested hyperparameter tuning of grid cells: `fusebench tune`, `compare --tune N`.

For every outer fold × model seed of the run's protocol, one Optuna study (TPE, seeded)
searches the head's space (fuse.search_space, the `search:` block of its YAML). A trial is
scored on inner stratified K-folds of that fold's TRAINING part only (fold.fit; each inner fit
early-stops on fold.inner_val, as the cell's own fits do) — never on fold.scored. After each
inner fold the trial reports its running mean macro-F1, so a MedianPruner stops trials that
trail the others. The best trial's hyperparameters are then refitted on fold.fit (early
stopping on fold.inner_val) and scored once on fold.scored: the tuned cell's number is as
honest as an untuned cell's and sits in the same table, as `<cell id> (tuned, N trials)`.
Its fits are saved like any cell's (models/<slug>/seed<S>-fold<K>/), so predict uses them.

Files it adds to the run folder:
    tune.sqlite3   the studies (Optuna RDB storage), one per cell × seed × outer fold, named
                   "<cell id> | seed S | fold K"
    tune.json      per tuned cell: space, and per study the chosen parameters, inner and
                   outer scores, the trial history and parameter importances (fuse.report_tune)
    tune.csv       one row per cell × seed × outer fold: the chosen parameters and the scores

Resuming: the run folder is staged as `<out>/<stamp>-<name>.tmp/` like any run, with the
run's settings in tune-settings.json. A tune killed outright (SIGKILL, a lost node) or
interrupted (Ctrl-C, SIGTERM) leaves that folder; rerunning the same command with the same
--out adopts it (settings equal, its writer dead): every study continues from its stored
trials, so each ends with exactly --trials COMPLETE + PRUNED trials. The untuned cells are
refitted (deterministic on CPU), the finished studies are only read.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import fusebench.fuse.distributed as distributed
import numpy as np
from fusebench.fuse._util import (
    OWNER,
    STAGING,
    OutputError,
    StagedRunDir,
    deep_merge,
    note,
    plain,
    release_owner_lock,
    remove_tree,
    sweep_abandoned,
    take_abandoned,
)
from fusebench.fuse.features import FeatureSet
from fusebench.fuse.grid import Cell, GridSpec
from fusebench.fuse.metrics import score
from fusebench.fuse.protocol import Fold
from fusebench.fuse.registry import HeadConfig, resolve_head
from fusebench.fuse.report import write_csv
from fusebench.fuse.search_space import Dimension, as_overrides, search_space, suggest

STUDY_FILE = "tune.sqlite3"
SETTINGS_FILE = "tune-settings.json"  # the staged run's settings: what a rerun must match
KEEP_ON_RESUME = (STUDY_FILE, SETTINGS_FILE, OWNER)  # and the study's -journal/-wal files

ScoredRun = Callable[..., Any]  # fuse.experiment.scored_run (passed in: no import circle)


# ---------------------------------------------------------------- the resumable run folder


class TuneRunDir(StagedRunDir):
    """StagedRunDir that adopts an unfinished tune of the same settings instead of starting
    a new folder (see the module docstring), and keeps its folder on Ctrl-C / SIGTERM so the
    rerun resumes; any other failure removes it as StagedRunDir does."""

    def __init__(self, out: str | Path, suffix: str, settings: dict) -> None:
        super().__init__(out, suffix)
        self.settings = json.loads(json.dumps(plain(settings), sort_keys=True, default=str))

    def __enter__(self) -> TuneRunDir:
        adopted = self._adopt()
        if adopted is None:
            super().__enter__()
            text = json.dumps(self.settings, indent=2, sort_keys=True)
            (self.path / SETTINGS_FILE).write_text(text, encoding="utf-8")
            return self
        for old in sweep_abandoned(self.out, keep=self.path):
            note(f"removed {old}: a run that was killed before it finished left it")
        return self

    def _adopt(self) -> Path | None:
        """The unfinished tune in --out with these settings whose writer is dead, now owned by
        this process (its folder emptied but for the studies), or None."""
        if not self.out.is_dir():
            return None
        for folder in sorted(self.out.glob(f"*-{self.suffix}*{STAGING}"), reverse=True):
            try:
                saved = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if (fd := take_abandoned(folder)) is None:
                continue
            if saved != self.settings or not (folder / STUDY_FILE).is_file():
                os.close(fd)
                continue
            self._owner, self.path = fd, folder
            self.final = folder.with_name(folder.name[: -len(STAGING)])
            for item in folder.iterdir():  # the grid is refitted; the studies are kept
                if item.name.startswith(KEEP_ON_RESUME):  # a hot -journal is SQLite's to undo
                    continue
                if item.is_dir():
                    remove_tree(item)
                else:
                    item.unlink()
            note(f"resuming the unfinished tune {folder} (same settings): its studies continue")
            return folder
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        kept = self.path is not None and (self.path / STUDY_FILE).is_file()
        if isinstance(exc, KeyboardInterrupt) and kept:
            release_owner_lock(None, self._owner)  # kept unlocked: the rerun adopts it
            self._owner = None
            note(f"kept {self.path}: rerun the same command with the same --out to resume")
            return False
        return super().__exit__(exc_type, exc, tb)


def run_folder(spec: GridSpec, out: str | Path, name: str, cells: Sequence[Cell]) -> Any:
    """The staged run folder of a grid run (fuse.distributed.SharedRunDir), or of a tuning
    run: a TuneRunDir, after checking that every cell to be tuned has a search space
    (`fusebench tune`: all of them), so a missing one fails before any training."""
    if not spec.tune:
        return distributed.SharedRunDir(out, name)
    if distributed.ranks.is_distributed():
        raise ValueError("tuning runs in one process; run `fusebench tune` without torchrun")
    target = spec.tune["target"]
    head = target.removeprefix("head:") if target.startswith("head:") else None
    for cell in cells:
        if target == "all" or cell.head == head:
            search_space(cell.head, overrides=cell.overrides)
    if head is not None and all(c.head != head for c in cells):
        raise ValueError(
            f"--tune {head}:N: no cell of this run has head '{head}'; add it to --heads"
        )
    return TuneRunDir(out, name, spec.settings())


# ---------------------------------------------------------------- tuning cells


def tune_cells(
    spec: GridSpec,
    cells: Sequence[Cell],
    runs: list,
    folds: Sequence[Fold],
    seeds: Sequence[int],
    run_path: Path,
    *,
    scored_run: ScoredRun,
    quiet: bool = False,
) -> tuple[list[Cell], list]:
    """(cells, runs) of the grid plus the tuned cells and their fits (HeadRun, cell = the
    tuned id, model_dir saved); tune.json and tune.csv written to run_path."""
    targets = _targets(spec, cells, runs)
    tuned_cells, tuned_runs, records = [], [], {}
    for cell in targets:
        space = search_space(cell.head, overrides=cell.overrides)
        fits = []
        with open_storage(run_path) as storage:
            tuner = CellTuner(spec, cell, space, storage, quiet=quiet)
            for seed in seeds:
                for fold in folds:
                    fits.append(tuner.fold(seed, fold, run_path, scored_run))
        new = tuned_cell(cell, spec, [f["params"] for f in fits])
        for f in fits:
            f["run"].cell = new.id
        tuned_cells.append(new)
        tuned_runs += [f["run"] for f in fits]
        records[new.id] = cell_record(cell, new, space, spec.tune, fits)
    write_tune_files(run_path, records)
    return [*cells, *tuned_cells], [*runs, *tuned_runs]


@contextmanager
def open_storage(run_path: Path) -> Iterator[Any]:
    """The run's SQLite studies (one Optuna RDBStorage: one engine for every study), closed
    when the block ends, so no handle into the run folder outlives the tuning; a failed write
    is one line (study_storage)."""
    import optuna

    with study_storage(run_path):
        url = f"sqlite:///{(run_path / STUDY_FILE).resolve()}"
        storage = optuna.storages.RDBStorage(url)
        try:
            yield storage
        finally:
            storage.engine.dispose()


@contextmanager
def study_storage(run_path: Path) -> Iterator[None]:
    """Turns a failed write of the SQLite studies (a full disk, a read-only folder: SQLAlchemy's
    OperationalError, or Optuna's StorageInternalError around it) into one line naming the
    file and the fix (exit 1; the staged run folder is removed like any failed run's)."""
    try:
        yield
    except Exception as e:
        from optuna.exceptions import StorageInternalError
        from sqlalchemy.exc import SQLAlchemyError

        if not isinstance(e, (SQLAlchemyError, StorageInternalError)):
            raise
        cause = e.__cause__ if isinstance(e, StorageInternalError) and e.__cause__ else e
        reason = str(getattr(cause, "orig", None) or cause).splitlines()[0]
        raise OutputError(
            f"cannot write the tuning studies {run_path / STUDY_FILE} ({reason}); free some "
            "space or pass --out a writable folder, then run the same command again",
            errno.ENOSPC if "full" in reason else None,
        ) from None


def _targets(spec: GridSpec, cells: Sequence[Cell], runs: Sequence) -> list[Cell]:
    """Every cell (`fusebench tune`), or the best untuned cell by mean macro-F1 whose head
    declares a search space (`compare --tune N`), of head HEAD (`--tune HEAD:N`)."""
    target = spec.tune["target"]
    if target == "all":
        return list(cells)
    mean = {
        c.id: float(np.mean([r.metrics["macro_f1"] for r in runs if r.cell == c.id])) for c in cells
    }
    head = target.removeprefix("head:") if target.startswith("head:") else None
    mine = [c for c in cells if head is None or c.head == head]  # run_folder: not empty
    for cell in sorted(mine, key=lambda c: -mean[c.id]):
        try:
            search_space(cell.head, overrides=cell.overrides)
        except ValueError as e:
            note(f"--tune: not tuning {cell.id}: {e}")
            continue
        note(f"--tune: tuning the best cell {cell.id} ({spec.tune['trials']} trials per study)")
        return [cell]
    return []


def tuned_cell(cell: Cell, spec: GridSpec, chosen: Sequence[dict]) -> Cell:
    """The tuned cell: id `<cell id> (tuned, N trials)`, its config the consensus of the
    parameters chosen per outer fold (consensus_params: what config.yaml records as its
    params, and predict --model refit trains; each fold model keeps its own)."""
    over = deep_merge(cell.overrides, as_overrides(consensus_params(chosen)))
    config = resolve_head(cell.head, over, **spec.options(over))
    n = spec.tune["trials"]
    mark = f"tuned, {n} trials"  # the table's variant column; Cell.id writes it in brackets
    variant = f"{cell.variant}, {mark}" if cell.variant else mark
    return replace(cell, variant=variant, overrides=over, config=config, tuned=n)


def consensus_params(chosen: Sequence[dict]) -> dict:
    """Per parameter over the outer folds' choices: the low median of a number (always one of
    the values chosen, so valid for a list of choices or a stepped range too), the most
    frequent value of anything else (first chosen on a tie)."""
    import statistics

    out = {}
    for key in dict.fromkeys(k for p in chosen for k in p):
        values = [p[key] for p in chosen if key in p]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = statistics.median_low(values)
        else:
            out[key] = Counter(json.dumps(v) for v in values).most_common(1)[0][0]
            out[key] = json.loads(out[key])
    return out


class CellTuner:
    """The studies of one cell: one per (seed, outer fold), in one SQLite storage."""

    def __init__(
        self, spec: GridSpec, cell: Cell, space: list[Dimension], storage: Any, *, quiet: bool
    ) -> None:
        self.spec, self.cell, self.space, self.storage = spec, cell, space, storage
        self.trials, self.timeout = spec.tune["trials"], spec.tune["timeout"]
        self.inner_folds, self.quiet = spec.tune["inner_folds"], quiet
        self.fs: FeatureSet = cell.features

    def config(self, params: dict) -> HeadConfig:
        """The cell's head with `params` (flat Optuna names) over its own overrides."""
        over = deep_merge(self.cell.overrides, as_overrides(params))
        return resolve_head(self.cell.head, over, **self.spec.options(over))

    def study_name(self, seed: int, fold: Fold) -> str:
        return f"{self.cell.id} | seed {seed} | fold {fold.index}"

    def fold(self, seed: int, fold: Fold, run_path: Path, scored_run: ScoredRun) -> dict:
        """One outer fold × seed: the study run (or resumed) to --trials, then the best
        trial refitted on fold.fit and scored on fold.scored."""
        study = self.study(seed, fold)
        params = best_params(study)
        est = self.config(params).build(seed)
        est.fit(self.fs.take(fold.fit), self.fs.take(fold.inner_val), quiet=True)
        run = scored_run(self.cell.head, est, self.fs, seed, fold, robustness=self.spec.robustness)
        folder = run_path / "models" / tuned_cell(self.cell, self.spec, [{}]).slug
        folder = folder / f"seed{seed}-fold{fold.index}"
        est.save(folder)
        run.model_dir = folder.relative_to(run_path).as_posix()
        self.say(f"{self.study_name(seed, fold)}: outer macro-F1 {run.metrics['macro_f1']:.4f}")
        return {"seed": seed, "fold": fold.index, "params": params, "run": run, "study": study}

    def study(self, seed: int, fold: Fold) -> Any:
        """The study of (seed, fold), created or loaded, run until it holds --trials
        COMPLETE + PRUNED trials (or --timeout seconds pass in this call)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name=self.study_name(seed, fold),
            storage=self.storage,
            load_if_exists=True,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=(seed * 1009 + fold.index) % 2**32),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
        )
        fail_stale(study)
        left = self.trials - counted(study)
        if left > 0:
            inner = self.inner_splits(seed, fold)
            objective = self.objective(seed, fold, inner)
            study.optimize(objective, n_trials=left, timeout=self.timeout, catch=())
        return study

    def inner_splits(self, seed: int, fold: Fold) -> list[tuple[np.ndarray, np.ndarray]]:
        """Stratified K-fold of fold.fit (row positions of the FeatureSet): (train, score)."""
        from sklearn.model_selection import StratifiedKFold

        y = self.fs.label[fold.fit]
        cv = StratifiedKFold(self.inner_folds, shuffle=True, random_state=(seed + fold.index))
        try:
            return [(fold.fit[a], fold.fit[b]) for a, b in cv.split(fold.fit, y)]
        except ValueError as e:
            raise ValueError(
                f"cannot split outer fold {fold.index}'s {len(fold.fit)} training rows into "
                f"{self.inner_folds} inner folds ({e}); pass a smaller --inner-folds"
            ) from None

    def objective(self, seed: int, fold: Fold, inner: list) -> Callable[[Any], float]:
        """A trial: the drawn parameters fitted on each inner training part (early-stopped
        on fold.inner_val) and scored on its inner part; the running mean is reported after
        each inner fold so the pruner can stop a trial that trails."""
        import optuna

        val = self.fs.take(fold.inner_val)

        def objective(trial: Any) -> float:
            config = self.config(as_flat(suggest(trial, self.space)))
            scores = []
            for k, (train, scored) in enumerate(inner):
                est = config.build(seed)
                est.fit(self.fs.take(train), val, quiet=True)
                proba = est.predict_proba(self.fs.take(scored))  # (n_scored, C)
                scores.append(score(self.fs.label[scored], proba, self.fs.classes)["macro_f1"])
                trial.report(float(np.mean(scores)), k)
                if k < len(inner) - 1 and trial.should_prune():
                    self.say(f"{self.study_name(seed, fold)}: trial {trial.number} pruned")
                    raise optuna.TrialPruned()
            value = float(np.mean(scores))
            self.say(f"{self.study_name(seed, fold)}: trial {trial.number} macro-F1 {value:.4f}")
            return value

        return objective

    def say(self, line: str) -> None:
        if not self.quiet:
            print(f"tune {line}", file=sys.stderr, flush=True)


def as_flat(nested: dict, prefix: str = "") -> dict:
    """{"train": {"lr": x}} -> {"train.lr": x} (Optuna's parameter names)."""
    out = {}
    for k, v in nested.items():
        if isinstance(v, dict):
            out.update(as_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def counted(study: Any) -> int:
    """The trials that count toward --trials: COMPLETE and PRUNED."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def fail_stale(study: Any) -> None:
    """Marks trials left RUNNING by a killed tune as FAIL: this process owns the run folder,
    so no one else runs them; they neither count nor guide the sampler."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)


def best_params(study: Any) -> dict:
    """The best COMPLETE trial's parameters; {} (the cell's defaults, with a note) when no
    trial completed (every one pruned or cut by --timeout)."""
    try:
        return dict(study.best_trial.params)
    except ValueError:
        note(f"study '{study.study_name}' has no completed trial; refitting the defaults")
        return {}


# ---------------------------------------------------------------- records


def cell_record(cell: Cell, new: Cell, space: list[Dimension], tune: dict, fits: list) -> dict:
    """tune.json's entry of a tuned cell."""
    return {
        "base_cell": cell.id,
        "head": cell.head,
        "trials": tune["trials"],
        "timeout": tune["timeout"],
        "inner_folds": tune["inner_folds"],
        "space": [d.describe() for d in space],
        "params_recorded": as_flat(new.overrides),
        "studies": [study_record(f) for f in fits],
    }


def study_record(fit: dict) -> dict:
    """One study: the chosen parameters, inner and outer scores, history, importances."""
    from optuna.trial import TrialState

    study, run = fit["study"], fit["run"]
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    importances, why = param_importances(study)
    return {
        "study": study.study_name,
        "seed": fit["seed"],
        "fold": fit["fold"],
        "params": fit["params"],
        "inner_macro_f1": max((t.value for t in completed), default=None),
        "outer_macro_f1": run.metrics["macro_f1"],
        "n_complete": states.get("COMPLETE", 0),
        "n_pruned": states.get("PRUNED", 0),
        "n_failed": states.get("FAIL", 0),
        "history": [
            {"number": t.number, "state": t.state.name, "value": t.value}
            for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        ],
        "importances": importances,
        "importances_note": why,
    }


def param_importances(study: Any) -> tuple[dict | None, str | None]:
    """optuna.importance.get_param_importances (fANOVA), or (None, why) when it cannot say:
    too few completed trials, or nothing varied."""
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return None, f"{len(done)} completed trial(s); importances need at least 2"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError) as e:
        return None, f"not computable ({e})"
    return {k: float(v) for k, v in values.items()}, None


def write_tune_files(run_path: Path, records: dict) -> None:
    """tune.json (every tuned cell's studies) and tune.csv (one row per study)."""
    (run_path / "tune.json").write_text(json.dumps(plain(records), indent=2), encoding="utf-8")
    rows = []
    for cid, rec in records.items():
        for s in rec["studies"]:
            row = {"cell": cid, "seed": s["seed"], "fold": s["fold"]}
            row.update(n_complete=s["n_complete"], n_pruned=s["n_pruned"])
            row.update(inner_macro_f1=s["inner_macro_f1"], outer_macro_f1=s["outer_macro_f1"])
            row.update({f"param.{k}": v for k, v in sorted(s["params"].items())})
            rows.append(row)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(run_path / "tune.csv", [{k: r.get(k, "") for k in keys} for r in rows])
