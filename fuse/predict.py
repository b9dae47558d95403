"""`predict`: a cell of a finished run folder applied to the caches the run recorded.

Which model labels the rows (`mode`):

    ensemble  (default) every fit of the cell — each fold × each model seed — loaded from
              RUN/models/<cell-slug>/seed<S>-fold<K>/; their class probabilities are averaged.
    refit     the cell trained again on ALL labelled training rows, one model per run seed,
              probabilities averaged. No inner split is left for early stopping, so the number
              of epochs (torch heads) or boosting rounds (LightGBM) is the median of the CV
              fits' best iterations. Saved under RUN/refit/<cell-slug>/seed<S>/ with
              refit.json (rows, iterations, a digest of the training data); a later --refit
              reuses them unless that training data changed.
    fold0     the first fit only (first seed, first fold), for comparison.

The cell: --cell CELL_ID, or --head NAME when one cell of the run has that head, or by
default config.yaml's best_cell (best mean macro-F1).

Output: a CSV file (csv module, so a guid holding a comma or a quote is quoted) with the header
`guid,tag` (plus `p_<class>` per class with proba=True), then one line per guid of the
requested split, in the cache's order (for lab5 that is test_without_label.txt's order).
A head predicts every row that has the features IT reads: a text_only head labels a row whose
image failed. A row the head cannot predict (its features failed in the cache, are inf/NaN,
or its guid is held by two usable rows) keeps its line with an EMPTY tag (and empty
probabilities) — never a stand-in class — and is counted and named, with the reason, on
stderr. The file is written under `<out>.tmp` and renamed when complete.

Each prediction appends a record to RUN/predictions.json (out, split, cell, mode, the model
folders used, created), rewritten atomically under a lock.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from fusebench.fuse._util import (
    STAGING,
    OutputError,
    check_device,
    deep_merge,
    few,
    hold_owner_lock,
    note,
    os_error_line,
    plain,
    release_owner_lock,
    remove_tree,
    sweep_abandoned,
    write_atomic,
)
from fusebench.fuse.bank import pooled_digest, rows_digest, trained_rows
from fusebench.fuse.features import MODALITIES, FeatureSet, load_feature_set
from fusebench.fuse.grid import cell_slug, nest
from fusebench.fuse.head import Head
from fusebench.fuse.registry import get_head

UNPREDICTED = ""  # the tag of a row the head has no features for
MODES = ("ensemble", "refit", "fold0")
RECORDS = "predictions.json"  # in the run folder: which models each predict used


class RunFolderError(ValueError):
    """A run folder that cannot be used: missing, unfinished or damaged parts."""


@dataclass
class PredictionReport:
    out: Path
    cell: str
    mode: str
    n_rows: int
    model_dirs: list[str]  # relative to the run folder
    unpredicted: dict[str, str] = field(default_factory=dict)  # guid -> why it has no tag
    refit: dict | None = None  # refit.json of a refit prediction
    extracted: list = field(default_factory=list)  # predict --data: the ExtractReports of NEW


def _damaged(run: Path, what: str) -> RunFolderError:
    return RunFolderError(
        f"run folder {run} is damaged: {what}; rerun the `fusebench fuse` or `compare` "
        "command that made it"
    )


# ---------------------------------------------------------------- the run folder


def load_run_config(run: str | Path) -> dict:
    """config.yaml of a finished run folder, checked for what `predict` reads."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(
            f"no run folder {run}; pass a folder that `fuse` or `compare` wrote under runs/"
        )
    if run.name.endswith(STAGING):
        raise RunFolderError(
            f"{run} is an unfinished run (the command writing it stopped before the end); "
            "rerun that `fuse` or `compare` command"
        )
    path = run / "config.yaml"
    if not path.is_file():
        raise RunFolderError(f"{run} is not a fusebench run folder (no config.yaml)")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        what = " ".join(str(e).split())[:120]
        raise _damaged(run, f"config.yaml does not parse ({what})") from None
    if not isinstance(config, dict):
        raise _damaged(run, f"config.yaml holds {type(config).__name__}, not a mapping")
    if "cells" not in config and isinstance(config.get("heads"), dict):
        raise RunFolderError(
            f"{run} was written by an older fusebench (config.yaml has no cells); rerun its "
            "`fusebench fuse` or `compare` command to get a run folder predict can use"
        )
    _check_config(run, config)
    return config


def _check_config(run: Path, config: dict) -> None:
    def need(key: str, ok: Any, what: str) -> None:
        if not ok:
            raise _damaged(run, f"config.yaml has no valid '{key}' ({what})")

    cells = config.get("cells")
    need("cells", isinstance(cells, dict) and bool(cells), "a mapping cell -> its fits")
    for cid, cell in cells.items():
        need(f"cells.{cid}", isinstance(cell, dict) and isinstance(cell.get("head"), str), "a head")
        need(f"cells.{cid}.params", isinstance(cell.get("params"), dict), "its hyperparameters")
        fits = cell.get("fits")
        need(f"cells.{cid}.fits", isinstance(fits, list) and bool(fits), "a list of fits")
        for fit in fits:
            need(
                f"cells.{cid}.fits",
                isinstance(fit, dict) and isinstance(fit.get("model_dir"), str),
                "each with a model_dir",
            )
        for m in MODALITIES:
            need(f"cells.{cid}.{m}", isinstance(cell.get(m), (str, type(None))), "encoder or null")
    need("features", isinstance(config.get("features"), str), "the cache folder")
    classes = config.get("classes")
    need(
        "classes",
        isinstance(classes, list) and bool(classes) and all(isinstance(c, str) for c in classes),
        "a list of class names",
    )
    caches = config.get("caches")
    need("caches", isinstance(caches, dict), "a mapping encoder -> cache")
    for enc, src in caches.items():
        need(f"caches.{enc}", isinstance(src, dict) and "fingerprint" in src, "with a fingerprint")
    seeds = config.get("seeds")
    need("seeds", isinstance(seeds, list) and bool(seeds), "the model seeds")
    need("best_cell", config.get("best_cell") in (None, *cells), "one of the cells")


def pick_cell(run: Path, config: dict, *, cell: str | None = None, head: str | None = None) -> str:
    """The CELL_ID to predict with: --cell, else the one cell with --head, else best_cell
    (predict_run says so when the run has other cells)."""
    cells = config["cells"]
    if cell is not None and head is not None:
        raise ValueError("give either --cell or --head, not both")
    if cell is not None:
        if cell not in cells:
            raise ValueError(f"run {run} has no cell '{cell}'; its cells: {few(list(cells), 8)}")
        return cell
    if head is not None:
        matches = [c for c, v in cells.items() if v["head"] == head]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            heads = sorted({v["head"] for v in cells.values()})
            raise ValueError(
                f"run {run} has no cell with head '{head}'; its heads: {', '.join(heads)}"
            )
        raise ValueError(
            f"run {run} has {len(matches)} cells with head '{head}'; pick one with --cell: "
            + few(matches, 8)
        )
    return config.get("best_cell") or next(iter(cells))


def _encoder(cell: dict, modality: str) -> str | None:
    enc = cell.get(modality)
    return None if enc in (None, "", "none") else enc


def fit_dirs(run: Path, config: dict, cell_id: str, *, first_only: bool = False) -> list[Path]:
    """The model folders of a cell's fits (every fold × seed), or of the first fit only: the
    first run seed on fold 0."""
    fits = config["cells"][cell_id]["fits"]
    if first_only:
        seed0 = config["seeds"][0]
        first = [f for f in fits if f.get("seed") == seed0 and f.get("fold") == 0]
        fits = first[:1] or fits[:1]
    return [run / f["model_dir"] for f in fits]


# ---------------------------------------------------------------- models


def load_head(folder: str | Path, *, device: str = "auto") -> Head:
    """The fitted estimator saved in `folder`: head.json names its head, whose `load` (the
    head contract) reads the rest. A missing or damaged file is a RunFolderError naming it;
    a bad --device a ValueError."""
    folder = Path(folder)
    meta_path = folder / "head.json"
    if not meta_path.is_file():
        raise RunFolderError(
            f"no saved model in {folder} (head.json missing); rerun the `fusebench fuse` or "
            "`compare` command that made the run"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(
            f"{meta_path} is damaged ({e}); rerun the `fusebench fuse` or `compare` command "
            "that made the run"
        ) from None
    name = meta.get("head") if isinstance(meta, dict) else None
    if not isinstance(name, str):
        raise RunFolderError(
            f"{meta_path} is damaged (it names no head); rerun the `fusebench fuse` or "
            "`compare` command that made the run"
        )
    try:
        cls = get_head(name)
    except ValueError as e:  # a plugin head this process has not registered
        raise RunFolderError(
            f"{meta_path} was saved by head '{name}', which is not registered here ({e}); "
            "import the module that registers it, or rerun the `fusebench fuse` or "
            "`compare` command that made the run"
        ) from None
    return cls.load(folder, device=device)


def load_models(run: Path, dirs: list[Path], classes: list[str], *, device: str) -> list[Head]:
    """Every model in `dirs`; all must have the run's classes and read the same inputs."""
    models = [load_head(d, device=device) for d in dirs]
    for d, m in zip(dirs, models):
        if list(m.classes_) != classes:
            raise _damaged(run, f"the model in {d} has other classes than config.yaml")
        if tuple(m.modalities_) != tuple(models[0].modalities_):
            raise _damaged(run, f"the models of one cell read different inputs ({d})")
    return models


def average_proba(models: list[Head], rows: FeatureSet) -> np.ndarray:
    """(n, C) class probabilities averaged over `models` (a soft vote)."""
    return np.mean([m.predict_proba(rows) for m in models], axis=0)


# ---------------------------------------------------------------- features


def load_cell_features(
    run: Path,
    config: dict,
    cell_id: str,
    model: Head,
    *,
    features: str | Path | None,
    allow_stale: bool,
) -> FeatureSet:
    """The rows of the caches the cell was trained on, with only what `model` reads (a text
    head ignores failed images); refuses a cache other than the run's."""
    cell = config["cells"][cell_id]
    reads = tuple(model.modalities_)
    encoders = {m: _encoder(cell, m) for m in reads}
    if any(e is None for e in encoders.values()):
        raise _damaged(run, f"cell '{cell_id}' reads {' and '.join(reads)}, its config lacks one")
    if features is None and not Path(config["features"]).is_dir():
        raise FileNotFoundError(
            f"the run's cache folder {config['features']} is gone; pass --features with the "
            "folder where those caches are now"
        )
    from fusebench.cache import StaleCacheError

    try:
        fs = load_feature_set(
            features or config["features"],
            text=encoders.get("text"),
            image=encoders.get("image"),
            tokens=reads if model.needs_tokens else False,
            allow_stale=allow_stale,
        )
    except StaleCacheError as e:
        raise StaleCacheError(_stale_advice(run, config, str(e)), e.changes) from None
    if list(fs.classes) != list(config["classes"]):
        raise ValueError(
            f"the cache's classes ({', '.join(fs.classes)}) are not the run's "
            f"({', '.join(config['classes'])}); predict with the cache the run was trained on"
        )
    for m, enc in encoders.items():
        src = config["caches"].get(enc) or config["caches"].get(m) or {}
        if fs.sources[m]["fingerprint"] != src.get("fingerprint"):
            _check_refreshed(run, config, fs, m, src)
    return fs


def _retrain(run: Path, config: dict) -> str:
    return f"`fusebench {config.get('command', 'compare')} --config {run / 'config.yaml'}`"


def _stale_advice(run: Path, config: dict, message: str) -> str:
    """The stale-cache line of stage two, with what works for predict: the run's models were
    trained on the cache as it is, so --allow-stale predicts from those features; a refreshed
    cache is accepted when the rows the run trained on kept their features (only test samples
    changed, say), else the run must be trained again."""
    head, sep, rest = message.partition("; rerun `")
    command = rest.partition("`")[0] if sep else "fusebench extract ... (the same options)"
    return (
        f"{head}; the run's models were trained on the features as they are: pass "
        "--allow-stale to predict from them, or rerun "
        f"`{command}` (it recomputes only the changed rows) and predict again, which works "
        "when no row the run was trained on changed (only test samples, say); when one did, "
        f"retrain with {_retrain(run, config)}"
    )


def _check_refreshed(run: Path, config: dict, fs: FeatureSet, modality: str, src: dict) -> None:
    """A cache whose fingerprint is not the one the run recorded: accepted (with a note) when
    the rows the run fitted and scored are the same rows with the same pooled features (a
    refresh that changed only other rows, e.g. test samples); otherwise one line saying to
    retrain or to use the run's own cache."""
    path = fs.sources[modality]["path"]
    rows_info = config.get("rows") if isinstance(config.get("rows"), dict) else {}
    want_rows, want_features = (
        rows_info.get("digest"),
        (src.get("trained_digest") or {}).get(modality),
    )
    if want_rows is None or want_features is None:
        raise ValueError(
            f"{path} is not the cache run {run.name} was trained on (its fingerprint changed "
            "since, and this run is older than the record of which rows it trained on); retrain "
            f"on it with {_retrain(run, config)}, or predict with the cache the run was trained on"
        )
    excluded = [e.get("guid") for e in rows_info.get("excluded") or [] if isinstance(e, dict)]
    rows = trained_rows(fs, excluded)
    if rows_digest(fs, rows) != want_rows or pooled_digest(fs.modality(modality), rows) != (
        want_features
    ):
        raise ValueError(
            f"{path} is not the cache run {run.name} was trained on: it was extracted again "
            "since, and the rows the run trained on (or their features) changed; retrain on it "
            f"with {_retrain(run, config)}, or predict with the cache the run was trained on"
        )
    note(
        f"{path} was extracted again after run {run.name}, but the {len(rows)} rows the run "
        "trained on kept their features: predicting from it"
    )


def labelled_rows(fs: FeatureSet) -> np.ndarray:
    """Every labelled row of split "train" the cell can read: what a refit learns from."""
    return np.flatnonzero((fs.split == "train") & (fs.label >= 0))


def training_digest(fs: FeatureSet, rows: np.ndarray) -> str:
    """sha256 of what a refit trains on: guids, labels and pooled features of `rows` (a
    re-extracted cache changes its pooled vectors along with its tokens)."""
    h = hashlib.sha256()
    h.update("\0".join(map(str, fs.guid[rows])).encode())
    h.update(np.ascontiguousarray(fs.label[rows], dtype=np.int64).tobytes())
    for m in fs.modalities:
        h.update(np.ascontiguousarray(fs.modality(m).pooled(rows)).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- refit


def refit_plan(config: dict, cell_id: str, fs: FeatureSet) -> dict:
    """What a refit of the cell trains: rows, seeds, the cell's resolved hyperparameters
    (config.yaml `params`) and the iteration count: the median of the CV fits' best
    iterations, put in the hyperparameter the head's best_iteration_ counts
    (`iteration_param`: torch train.epochs, LightGBM n_estimators; none for logreg)."""
    cell = config["cells"][cell_id]
    rows = labelled_rows(fs)
    param = _probe(cell["head"], cell["params"]).iteration_param
    best = [f.get("best_iteration") for f in cell["fits"]]
    best = [int(b) for b in best if isinstance(b, (int, float)) and b > 0]
    median = int(np.ceil(np.median(best))) if best else None
    iterations = {} if median is None or param is None else {param: median}
    return {
        "cell": cell_id,
        "head": cell["head"],
        "params": cell["params"],
        "seeds": list(config["seeds"]),
        # "epochs" / "n_estimators" -> the median best iteration of the CV fits
        "iterations": {k.rsplit(".", 1)[-1]: v for k, v in iterations.items()},
        "cv_best_iterations": best,
        "n_rows": int(len(rows)),
        "training_digest": training_digest(fs, rows),
    }


def _build(plan: dict, *, seed: int, device: str | None) -> Head:
    """An unfitted head of the plan's cell: its resolved hyperparameters, the iteration
    count put in the hyperparameter its best_iteration_ counts."""
    cls = get_head(plan["head"])
    params = plan["params"]
    if plan["iterations"]:
        (count,) = plan["iterations"].values()
        param = _probe(plan["head"], params).iteration_param
        params = deep_merge(params, nest(param.split("."), count))
    return cls.from_config(params, seed=seed, device=device)


def _probe(head: str, params: dict) -> Head:
    """An unfitted head, to read what it declares (built on the CPU: any machine has one)."""
    return get_head(head).from_config(params, seed=0, device="cpu")


def refit_cell(
    run: Path,
    plan: dict,
    fs: FeatureSet,
    *,
    device: str,
    quiet: bool,
) -> tuple[list[Path], list[Any], bool]:
    """(model folders, models, reused): the refit models of the plan's cell, trained on every
    labelled row and saved under RUN/refit/<slug>/, or the saved ones when refit.json matches
    the plan (same training data, hyperparameters and seeds)."""
    folder = run / "refit" / cell_slug(plan["cell"])
    dirs = [folder / f"seed{s}" for s in plan["seeds"]]
    saved = _saved_plan(folder)
    if saved is not None and {**saved, "created": None} == {**_json_round(plan), "created": None}:
        with contextlib.suppress(ValueError):
            return dirs, [load_head(d, device=device) for d in dirs], True
    its = ", ".join(f"{k}={v}" for k, v in plan["iterations"].items())
    how = (
        f"{its} (median best of {len(plan['cv_best_iterations'])} CV fits)"
        if its
        else "no early stopping to replace"
    )
    _check_refit_writable(folder)  # before training, not after
    note(
        f"refitting '{plan['cell']}' on all {plan['n_rows']} labelled rows, "
        f"{len(plan['seeds'])} seed(s), {how}"
    )
    train = fs.take(labelled_rows(fs))
    quiet = quiet or not sys.stderr.isatty()  # epoch bars are redrawn: terminals only
    models = []
    for seed in plan["seeds"]:
        head = _build(plan, seed=seed, device=device)
        models.append(head.fit(train, None, quiet=quiet))
    _save_refit(folder, plan, models)
    return dirs, models, False


def _json_round(obj: Any) -> Any:
    """obj as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(plain(obj)))


def _saved_plan(folder: Path) -> dict | None:
    try:
        saved = json.loads((folder / "refit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _check_refit_writable(folder: Path) -> None:
    """Fails before a refit trains when RUN/refit/ cannot be written (read-only, full)."""
    probe = folder.parent / f".write-probe.{os.getpid()}{STAGING}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
    except OSError as e:
        raise OutputError(
            f"cannot save the refit models in {folder}: " + os_error_line(e), e.errno
        ) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def _save_refit(folder: Path, plan: dict, models: list[Any]) -> None:
    """Writes the models and refit.json into a staging folder, then swaps it in. Any failure
    (a full disk, Ctrl-C, SIGTERM) removes the staging folder; one left by a process killed
    outright is removed by the next refit (its owner lock died with it)."""
    stage = folder.with_name(f"{folder.name}.{os.getpid()}{STAGING}")
    old = folder.with_name(f"{folder.name}.{os.getpid()}.old")
    owner = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        sweep_abandoned(folder.parent, f"{folder.name}.*{STAGING}")
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        owner = hold_owner_lock(stage)
        for seed, model in zip(plan["seeds"], models):
            model.save(stage / f"seed{seed}")
        created = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        (stage / "refit.json").write_text(json.dumps(plain({**plan, "created": created}), indent=2))
        if folder.exists():
            os.replace(folder, old)
        os.replace(stage, folder)
        release_owner_lock(folder, owner)
    except BaseException as e:
        remove_tree(stage)
        release_owner_lock(None, owner)
        if old.exists() and not folder.exists():  # the previous refit stays as it was
            with contextlib.suppress(OSError):
                os.replace(old, folder)
        if not isinstance(e, OSError):
            raise
        raise OutputError(
            f"cannot save the refit models in {folder}: " + os_error_line(e), e.errno
        ) from None
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- predict


@dataclass
class CellModels:
    """What labelling with a cell of a run starts from: the run's config, the cell, and its
    models as `mode` picks them (refit: the CV fits it learns from until it is refitted)."""

    run: Path
    out: Path
    config: dict
    cell_id: str
    classes: list[str]
    dirs: list[Path]
    models: list[Head]
    device: str  # resolved (check_device)
    picked: bool  # the cell was the run's best, not named by --cell / --head


def cell_models(
    run: str | Path,
    out: str | Path,
    *,
    cell: str | None,
    head: str | None,
    mode: str,
    device: str,
) -> CellModels:
    """The run's cell (default its best) and its models, with every check that needs no
    features: the mode, the device, the run folder, and that `out` can be written."""
    if mode not in MODES:
        raise ValueError(f"--model must be one of {', '.join(MODES)}, not {mode!r}")
    device = check_device(device)
    run, out = Path(run), Path(out)
    config = load_run_config(run)
    cell_id = pick_cell(run, config, cell=cell, head=head)
    classes = list(config["classes"])
    dirs = fit_dirs(run, config, cell_id, first_only=mode != "ensemble")  # refit: what it reads
    models = load_models(run, dirs, classes, device=device)
    _check_writable(out)
    picked = cell is None and head is None and len(config["cells"]) > 1
    return CellModels(run, out, config, cell_id, classes, dirs, models, device, picked)


def refit_if_asked(job: CellModels, mode: str, fs: FeatureSet, *, quiet: bool) -> dict | None:
    """With mode refit: the cell refitted on every labelled row of fs (or the saved refit
    reused), replacing job's models; its plan, or None for the other modes."""
    if mode != "refit":
        return None
    plan = refit_plan(job.config, job.cell_id, fs)
    job.dirs, job.models, reused = refit_cell(job.run, plan, fs, device=job.device, quiet=quiet)
    return {**plan, "reused": reused}


def finish_prediction(
    job: CellModels,
    labels: tuple[np.ndarray, dict[str, np.ndarray], dict[str, str]],
    mode: str,
    refit: dict | None,
    *,
    proba: bool,
    split: str,
) -> PredictionReport:
    """Writes the `guid,tag` file and records the prediction in RUN/predictions.json. labels:
    (the guids in output order, guid -> class probabilities, guid -> why it has none)."""
    order, probs, unpredicted = labels
    write_predictions(job.out, order, probs, job.classes, proba=proba)
    if job.picked:
        note(
            f"used cell '{job.cell_id}' (best mean macro-F1 of this run); pick another with --cell"
        )
    report = PredictionReport(
        out=job.out,
        cell=job.cell_id,
        mode=mode,
        n_rows=len(order),
        model_dirs=[_relative(d, job.run) for d in job.dirs],
        unpredicted=unpredicted,
        refit=refit,
    )
    record_prediction(job.run, report, split=split, proba=proba)
    return report


def predict_run(
    run: str | Path,
    *,
    split: str = "test",
    out: str | Path = "predictions.txt",
    cell: str | None = None,
    head: str | None = None,
    mode: str = "ensemble",
    proba: bool = False,
    features: str | Path | None = None,
    device: str = "auto",
    allow_stale: bool = False,
    quiet: bool = True,
) -> PredictionReport:
    """Writes `guid,tag` lines (plus p_<class> columns with proba) for every `split` guid of
    the run's caches to `out`, and records the models used in RUN/predictions.json.

    mode: ensemble | refit | fold0 (module docstring); cell / head: which cell (default the
    run's best); features: where the caches are now, when the recorded folder has moved;
    allow_stale: predict from a cache whose dataset changed since extraction."""
    job = cell_models(run, out, cell=cell, head=head, mode=mode, device=device)
    fs = load_cell_features(
        job.run, job.config, job.cell_id, job.models[0], features=features, allow_stale=allow_stale
    )
    order = fs.cache_order(split)
    if len(order) == 0:
        raise ValueError(
            f"the cache has no rows with split '{split}'; splits present: "
            f"{', '.join(sorted(set(fs.all_split)))} (pick one with --split)"
        )
    refit = refit_if_asked(job, mode, fs, quiet=quiet)
    probs, unpredicted = label_rows(
        job.models, fs, split, run=job.run, cell_id=job.cell_id, out=job.out
    )
    labels = (order, probs, unpredicted)
    return finish_prediction(job, labels, mode, refit, proba=proba, split=split)


def label_rows(
    models: list[Head], fs: FeatureSet, split: str, *, run: Path, cell_id: str, out: Path
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(guid -> averaged class probabilities, guid -> why it has none) for the `split` rows
    of the cache, with a note for in-sample rows (split train) and rows left unlabelled."""
    order = fs.cache_order(split)
    rows = fs.rows_of_split(split)
    if in_sample := int((fs.label[rows] >= 0).sum()) if split == "train" else 0:
        note(
            f"{in_sample} of the {split} rows are labelled rows the run trained on (each "
            "model saw all or most of them): their predictions are in-sample, not held-out; "
            f"the held-out predictions of every fit are in {run / 'val_predictions.csv'}"
        )
    p = average_proba(models, fs.take(rows))  # (n, C)
    probs = dict(zip(fs.guid[rows], p))
    return probs, without_tag(models, fs, order, probs, cell_id=cell_id, out=out, what=f"{split} ")


def without_tag(
    models: list[Head],
    fs: FeatureSet,
    order: np.ndarray,
    probs: dict[str, np.ndarray],
    *,
    cell_id: str,
    out: Path,
    what: str = "",
) -> dict[str, str]:
    """guid -> why it has no probabilities, for the guids of `order` missing from `probs`
    (their features failed, or the guid is held twice), with one note naming a few."""
    why = {e.guid: e.reason for e in fs.excluded}
    unpredicted = {str(g): why.get(g, "no usable row") for g in order if g not in probs}
    if unpredicted:
        reads = " and ".join(models[0].modalities_)
        note(
            f"{len(unpredicted)} of {len(order)} {what}row(s) have no usable {reads} features "
            f"for cell '{cell_id}' and are left with an EMPTY tag in {out}: "
            + few([f"{g} ({r})" for g, r in unpredicted.items()], 3)
        )
    return unpredicted


def write_predictions(
    out: Path, order: np.ndarray, probs: dict[str, np.ndarray], classes: list[str], *, proba: bool
) -> None:
    """guid,tag[,p_<class>...] lines for `order`; a guid without probabilities gets empty
    fields. Written atomically (see write_atomic)."""

    def line(g: str) -> list[str]:
        p = probs.get(g)
        if p is None:
            return [g, UNPREDICTED] + ([""] * len(classes) if proba else [])
        return [g, classes[int(np.argmax(p))]] + ([f"{x:.6f}" for x in p] if proba else [])

    def write(fh) -> None:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["guid", "tag"] + ([f"p_{c}" for c in classes] if proba else []))
        writer.writerows(line(g) for g in order)

    try:
        write_atomic(out, write)
    except OSError as e:
        raise OutputError(
            "cannot write the predictions: " + os_error_line(e, option="--out"), e.errno
        ) from None


def record_prediction(run: Path, report: PredictionReport, *, split: str, proba: bool) -> None:
    """Appends what this prediction used to RUN/predictions.json (a JSON list), under a lock
    so two predicts at once both land. A run folder that cannot be written keeps the
    predictions and says so."""
    record = {
        "out": str(report.out.resolve()),
        "split": split,
        "cell": report.cell,
        "mode": report.mode,
        "model_dirs": report.model_dirs,
        "n_rows": report.n_rows,
        "n_unpredicted": len(report.unpredicted),
        "proba": proba,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if report.refit is not None:
        keep = ("n_rows", "iterations", "cv_best_iterations", "reused")
        record["refit"] = {k: report.refit[k] for k in keep}
    path = run / RECORDS
    try:
        with _locked(run / ".predictions.lock"):
            records = _read_records(path)
            records.append(plain(record))
            write_atomic(path, lambda fh: json.dump(records, fh, indent=2))
    except OSError as e:
        note(f"predictions written, but not recorded in {path}: {os_error_line(e)}")


def _read_records(path: Path) -> list:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (ValueError, UnicodeDecodeError):
        note(f"{path} was damaged; starting a new list of prediction records")
        return []
    return records if isinstance(records, list) else []


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive POSIX record lock on `path` for the block (no lock where fcntl is absent)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _relative(path: Path, run: Path) -> str:
    try:
        return str(path.relative_to(run))
    except ValueError:
        return str(path)


def _check_writable(out: Path) -> None:
    """Fails before any prediction when `out` cannot be written: a folder, or a place
    without write permission or space."""
    if out.is_dir():
        raise OutputError(
            f"--out {out} is a folder; pass a file path such as {out}/predictions.txt"
        )
    probe = out.with_name(out.name + STAGING)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)
    except OSError as e:
        raise OutputError(
            "cannot write the predictions: " + os_error_line(e, option="--out"), e.errno
        ) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
