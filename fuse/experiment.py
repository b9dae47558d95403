"""`fuse` and `compare`: heads × folds × seeds on one FeatureSet, and the run folder they leave.

The FeatureSet is loaded once per command and its splits computed once; every head, fold and
seed reuses them. For `predict`, the run keeps the model fitted on the FIRST model seed and
the FIRST scored split (the holdout under --val-ratio): the very model whose scores open
metrics.json, trained without ever seeing its scored rows. No model is refitted on all rows.

Run folders: everything is checked (heads, seeds, caches, splits) and the run folder is
created and probed for writing BEFORE any training; the run is written into
`<out>/<stamp>-<name>.tmp/` and renamed to `<out>/<stamp>-<name>/` only once every file is in
place (fuse._util.StagedRunDir). A command that fails midway removes its `.tmp` folder, so a
folder without `.tmp` is always a finished run.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fuse._util import StagedRunDir, note, plain, versions
from fuse.features import FeatureSet, check_inputs, load_feature_set
from fuse.metrics import aggregate, score
from fuse.protocol import Fold, StratifiedProtocol
from fuse.registry import build_head, get_head, head_needs_tokens, list_heads
from fuse.report import (
    format_table,
    plot_confusion,
    plot_confusion_grid,
    plot_scores,
    prediction_rows,
    ranked,
    summary_rows,
    write_csv,
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
    model: Any = None  # the fitted estimator, kept for the first (seed, fold) only


@dataclass
class RunResult:
    """What `run_fuse` / `run_compare` return: the folder, and the numbers it holds."""

    run_dir: Path
    summaries: dict[str, dict]  # head -> aggregate() over seeds × folds
    runs: list[HeadRun] = field(repr=False, default_factory=list)
    table: str = ""


class FitProgress:
    """Progress over a grid of fits, for a terminal and for a log file alike.

    On a terminal: one bar over the fits (postfix: head, seed, fold k/K) above each torch
    head's epoch bar. When stderr is not a terminal (`> log 2>&1`, a pipe, a batch job): no
    redrawn bars at all, one plain line per finished fit instead:
        fit 3/18: cross_attn seed 42 fold 3/5: macro-F1 0.6123, 4.2s
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

    def start(self, head: str, seed: int, fold: int) -> None:
        self._where = f"{head} seed {seed} " + (
            f"fold {fold + 1}/{self.n_folds}" if self.n_folds > 1 else "holdout"
        )
        if self.live:
            self.bar.set_postfix_str(self._where)

    @property
    def where(self) -> str:
        """The fit under way, e.g. "cross_attn seed 42 fold 3/5" (labels its epoch bar)."""
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


def parse_heads(spec: str | Sequence[str]) -> tuple[list[str], bool]:
    """'all' or 'a,b,c' -> (names, is_all); unknown names fail, listing the valid ones."""
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    if not spec:
        raise ValueError(f"no heads given; valid heads: {', '.join(list_heads())}")
    if list(spec) == ["all"]:
        return list_heads(), True
    for name in spec:
        get_head(name)
    return list(dict.fromkeys(spec)), False


MAX_SEED = 2**32 - 1  # numpy, torch, scikit-learn and LightGBM all take 0 .. 2**32 - 1


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The model seeds, each once, in the given order; a seed given twice is counted once
    (with a note) — it would only repeat the same numbers and shrink the reported std."""
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= MAX_SEED:
            raise ValueError(
                f"seed {s!r} is not a whole number from 0 to {MAX_SEED}; pass e.g. --seeds 42,43,44"
            )
    unique = list(dict.fromkeys(int(s) for s in seeds))
    if not unique:
        raise ValueError("no model seeds given; pass e.g. --seeds 42 or --seeds 42,43,44")
    if len(unique) < len(seeds):
        note(
            f"--seeds repeats a seed; each is used once: {','.join(map(str, unique))} "
            "(the same seed gives the same numbers)"
        )
    return unique


def check_heads(
    names: Sequence[str],
    *,
    overrides: dict[str, dict | None] | None = None,
    epochs: int | None = None,
    device: str | None = None,
    class_weights: bool | None = None,
) -> None:
    """Builds each head once (cheap: no weights) so a bad hyperparameter or device fails
    before any cache is read."""
    for name in names:
        head = build_head(
            name,
            overrides=(overrides or {}).get(name),
            epochs=epochs,
            device=device,
            class_weights=class_weights,
        )
        if getattr(head, "kind", "") == "torch":
            from fuse.trainer import resolve_device

            resolve_device(head.train.device)


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


def load_for_heads(
    features: str | Path,
    heads: Sequence[str],
    *,
    text: str | None,
    image: str | None,
    overrides: dict[str, dict] | None = None,
    skip_unusable: bool = False,
    allow_stale: bool = False,
) -> tuple[FeatureSet, list[str]]:
    """Loads the FeatureSet once, with tokens only for modalities some head reads as tokens,
    and checks every head can run on it. skip_unusable: drop (with a note) heads that cannot,
    instead of failing — what `--heads all` wants. allow_stale: see load_feature_set."""
    overrides = overrides or {}
    tokens: set[str] = set()
    for h in heads:
        if head_needs_tokens(h, overrides.get(h)):
            tokens |= set(get_head(h).modalities)
    fs = load_feature_set(features, text=text, image=image, tokens=tokens, allow_stale=allow_stale)
    if (msg := fs.describe_excluded()) is not None:
        note(msg)
    if (msg := describe_unused_labelled(fs)) is not None:
        note(msg)
    usable = []
    for h in heads:
        cls = get_head(h)
        try:
            check_inputs(
                fs,
                head=h,
                modalities=cls.modalities,
                require=cls.require,
                tokens=head_needs_tokens(h, overrides.get(h)),
            )
        except ValueError as e:
            if not skip_unusable:
                raise
            note(f"skipping {h}: {e}")
            continue
        usable.append(h)
    if not usable:
        raise ValueError("none of the heads can run on these features; see the notes above")
    return fs, usable


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
) -> list[HeadRun]:
    """Fits head `name` once per (seed, fold): on fold.fit, early-stopped on fold.inner_val,
    then scores fold.scored — rows it has not seen before. The first run keeps its model.
    progress: told when each fit starts and ends (its bar or log line); it also decides
    whether the head's own epoch bar shows."""
    runs: list[HeadRun] = []
    if progress is not None:
        quiet = quiet or progress.inner_quiet
    for seed in seeds:
        for fold in folds:
            if progress is not None:
                progress.start(name, seed, fold.index)
            start = time.perf_counter()
            head = build_head(
                name,
                seed=seed,
                overrides=overrides,
                epochs=epochs,
                device=device,
                class_weights=class_weights,
            )
            # torch heads label their epoch bar with the fit (head, seed, fold); the registry
            # contract is fit(train, val, quiet=), so only heads that take `desc` get it
            label = {"desc": progress.where} if progress is not None and _takes_desc(head) else {}
            head.fit(fs.take(fold.fit), fs.take(fold.inner_val), quiet=quiet, **label)
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
            runs.append(
                HeadRun(
                    name, seed, fold.index, metrics, fold.scored, proba, head if not runs else None
                )
            )
            if progress is not None:
                progress.finish(metrics["macro_f1"], time.perf_counter() - start)
    return runs


def _takes_desc(head: Any) -> bool:
    return "desc" in inspect.signature(head.fit).parameters


def run_fuse(
    *,
    head: str,
    features: str | Path,
    text: str | None = "minilm",
    image: str | None = "vit",
    protocol: StratifiedProtocol | None = None,
    seeds: Sequence[int] = (42,),
    epochs: int | None = None,
    out: str | Path = "runs",
    device: str = "auto",
    class_weights: bool = False,
    overrides: dict | None = None,
    allow_stale: bool = False,
    quiet: bool = False,
) -> RunResult:
    """One head × folds × seeds -> runs/<timestamp>-<head>/ with config.yaml, metrics.json,
    model/ (for predict), val_predictions.csv and confusion.png."""
    protocol = protocol or StratifiedProtocol()
    (name,), _ = parse_heads([head])
    seeds = check_seeds(seeds)
    check_heads(
        [name],
        overrides={name: overrides},
        epochs=epochs,
        device=device,
        class_weights=class_weights,
    )
    fs, _ = load_for_heads(
        features,
        [name],
        text=text,
        image=image,
        overrides={name: overrides or {}},
        allow_stale=allow_stale,
    )
    folds = splits_of(fs, protocol)
    with (
        StagedRunDir(out, name) as run,
        FitProgress(len(folds) * len(seeds), len(folds), quiet=quiet, desc=name) as progress,
    ):
        runs = evaluate_head(
            name,
            fs,
            folds,
            seeds,
            overrides=overrides,
            epochs=epochs,
            device=device,
            class_weights=class_weights,
            quiet=quiet,
            progress=progress,
        )
        summary = aggregate([r.metrics for r in runs], fs.classes)
        model = runs[0].model
        model.save(run.path / "model")
        config = _run_config(
            "fuse",
            fs,
            protocol,
            seeds,
            features=features,
            text=text,
            image=image,
            epochs=epochs,
            device=device,
            class_weights=class_weights,
            allow_stale=allow_stale,
            folds=folds,
            heads={
                name: {
                    "config": model.get_config(),
                    "model_dir": "model",
                    "seed": runs[0].seed,
                    "fold": runs[0].fold,
                }
            },
        )
        _write_yaml(run.path / "config.yaml", config)
        metrics = {
            "head": name,
            "protocol": protocol.describe(),
            "classes": list(fs.classes),
            "summary": summary,
            "runs": [_run_record(r) for r in runs],
        }
        (run.path / "metrics.json").write_text(json.dumps(plain(metrics), indent=2))
        write_csv(run.path / "val_predictions.csv", _predictions(runs, fs))
        plot_confusion(
            np.array(summary["confusion_matrix"]),
            fs.classes,
            run.path / "confusion.png",
            f"{name}: {len(runs)} run(s), macro-F1 {summary['macro_f1']['mean']:.3f}",
        )
    table = format_table({name: summary})
    return RunResult(run_dir=run.final, summaries={name: summary}, runs=runs, table=table)


def run_compare(
    *,
    heads: str | Sequence[str] = "all",
    features: str | Path,
    text: str | None = "minilm",
    image: str | None = "vit",
    protocol: StratifiedProtocol | None = None,
    seeds: Sequence[int] = (42, 43, 44),
    epochs: int | None = None,
    out: str | Path = "runs",
    device: str = "auto",
    class_weights: bool = False,
    allow_stale: bool = False,
    quiet: bool = False,
) -> RunResult:
    """Every head × fold × seed on one FeatureSet -> runs/<timestamp>-compare/ with
    results.csv (ranked by macro-F1), runs.csv, results.json, scores.png,
    confusion_grid.png, val_predictions.csv and models/<head>/ (first seed and fold)."""
    protocol = protocol or StratifiedProtocol()
    names, is_all = parse_heads(heads)
    seeds = check_seeds(seeds)
    check_heads(names, epochs=epochs, device=device, class_weights=class_weights)
    fs, names = load_for_heads(
        features, names, text=text, image=image, skip_unusable=is_all, allow_stale=allow_stale
    )
    folds = splits_of(fs, protocol)
    all_runs: list[HeadRun] = []
    summaries: dict[str, dict] = {}
    models: dict[str, Any] = {}
    with StagedRunDir(out, "compare") as run:
        with FitProgress(
            len(names) * len(folds) * len(seeds), len(folds), quiet=quiet, desc="compare"
        ) as bar:
            for name in names:
                runs = evaluate_head(
                    name,
                    fs,
                    folds,
                    seeds,
                    epochs=epochs,
                    device=device,
                    class_weights=class_weights,
                    quiet=quiet,
                    progress=bar,
                )
                summaries[name] = aggregate([r.metrics for r in runs], fs.classes)
                models[name] = runs[0].model
                all_runs += runs
        _write_compare(
            run.path,
            fs,
            protocol,
            seeds,
            folds,
            summaries,
            models,
            all_runs,
            features=features,
            text=text,
            image=image,
            epochs=epochs,
            device=device,
            class_weights=class_weights,
            allow_stale=allow_stale,
        )
    return RunResult(
        run_dir=run.final, summaries=summaries, runs=all_runs, table=format_table(summaries)
    )


def _write_compare(
    run_dir: Path,
    fs: FeatureSet,
    protocol: StratifiedProtocol,
    seeds: Sequence[int],
    folds: Sequence[Fold],
    summaries: dict[str, dict],
    models: dict[str, Any],
    all_runs: list[HeadRun],
    **options: Any,
) -> None:
    """A compare run's files: the models, config.yaml, results and plots."""
    for name, model in models.items():
        model.save(run_dir / "models" / name)
    order = ranked(summaries)
    config = _run_config(
        "compare",
        fs,
        protocol,
        seeds,
        folds=folds,
        heads={
            n: {
                "config": models[n].get_config(),
                "model_dir": f"models/{n}",
                "seed": seeds[0],
                "fold": folds[0].index,
            }
            for n in order
        },
        **options,
    )
    config["best_head"] = order[0]
    _write_yaml(run_dir / "config.yaml", config)
    write_csv(run_dir / "results.csv", summary_rows(summaries))
    write_csv(run_dir / "runs.csv", [_flat(r) for r in all_runs])
    results = {
        "protocol": protocol.describe(),
        "classes": list(fs.classes),
        "ranking": order,
        "summary": {n: summaries[n] for n in order},
        "runs": [_run_record(r) for r in all_runs],
    }
    (run_dir / "results.json").write_text(json.dumps(plain(results), indent=2))
    write_csv(run_dir / "val_predictions.csv", _predictions(all_runs, fs))
    plot_scores(summaries, run_dir / "scores.png")
    plot_confusion_grid(
        {n: np.array(summaries[n]["confusion_matrix"]) for n in order},
        fs.classes,
        run_dir / "confusion_grid.png",
    )


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


def _run_config(
    command: str,
    fs: FeatureSet,
    protocol: StratifiedProtocol,
    seeds: Sequence[int],
    *,
    features,
    text,
    image,
    epochs,
    device,
    class_weights,
    allow_stale,
    folds: Sequence[Fold],
    heads: dict,
) -> dict:
    """config.yaml: everything needed to understand the numbers and to `predict` with the run."""
    labelled = fs.label[(fs.split == "train") & (fs.label >= 0)]
    return plain(
        {
            "command": command,
            "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "features": str(Path(features).resolve()),
            "text": text,
            "image": image,
            "caches": fs.sources,
            "allow_stale": allow_stale,
            # cache file -> how its data changed since extraction; {} = every cache was fresh
            "stale_caches": fs.stale,
            "classes": list(fs.classes),
            "protocol": {**protocol.to_dict(), "description": protocol.describe()},
            "seeds": list(seeds),
            "epochs": epochs,
            "device": device,
            "class_weights": class_weights,
            "heads": heads,
            "rows": {
                "usable": len(fs),
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
            "saved_model": "each head's model fitted on the first seed and the first scored split "
            "(the holdout under --val-ratio); predict refits nothing",
            "versions": versions(),
        }
    )


def _run_record(r: HeadRun) -> dict:
    rec = dict(r.metrics)
    rec["head"] = r.head
    if r.model is not None and getattr(r.model, "history_", None):
        rec["history"] = r.model.history_
    return rec


def _flat(r: HeadRun) -> dict:
    m = r.metrics
    return {
        "head": r.head,
        "seed": r.seed,
        "fold": r.fold,
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "weighted_f1": m["weighted_f1"],
        "train_time_s": round(m["train_time_s"], 4),
        "n_params": m["n_params"],
        "best_iteration": m["best_iteration"],
    }


def _predictions(runs: Sequence[HeadRun], fs: FeatureSet) -> list[dict]:
    rows = []
    for r in runs:
        rows += prediction_rows(
            r.head, r.seed, r.fold, fs.guid[r.scored], fs.label[r.scored], r.proba, fs.classes
        )
    return rows


def _write_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
