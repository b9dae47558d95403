"""`predict`: the saved model of a run, applied to the caches the run recorded. Refits nothing.

Output: a CSV file (written with the csv module, so a guid holding a comma or a quote is
quoted) with the header `guid,tag`, then one line per guid of the requested split, in the
cache's order (for lab5 that is test_without_label.txt's order).

A head predicts every row that has the features IT reads: a text_only head labels a row
whose image failed. A row the head cannot predict (its features failed in the cache, are
inf/NaN, or its guid is held by two usable rows) keeps its line with an EMPTY tag — never a
stand-in class — and is counted and named, with the reason, on stderr. The file is written
under `<out>.tmp` and renamed when complete, so `out` is never half-written.
"""

from __future__ import annotations

import contextlib
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fuse._util import STAGING, OutputError, few, note, os_error_line, write_atomic
from fuse.features import MODALITIES, load_feature_set

UNPREDICTED = ""  # the tag of a row the head has no features for


class RunFolderError(ValueError):
    """A run folder that cannot be used: missing, unfinished or damaged parts."""


@dataclass
class PredictionReport:
    out: Path
    head: str
    n_rows: int
    unpredicted: dict[str, str] = field(default_factory=dict)  # guid -> why it has no tag


def _damaged(run: Path, what: str) -> RunFolderError:
    return RunFolderError(
        f"run folder {run} is damaged: {what}; rerun the `fusebench fuse` or `compare` "
        "command that made it"
    )


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
    _check_config(run, config)
    return config


def _check_config(run: Path, config: dict) -> None:
    def need(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise _damaged(run, f"config.yaml has no valid '{key}' ({what})")

    heads = config.get("heads")
    need("heads", isinstance(heads, dict) and bool(heads), "a mapping head -> model")
    for name, entry in heads.items():
        need(
            f"heads.{name}.model_dir",
            isinstance(entry, dict) and isinstance(entry.get("model_dir"), str),
            "a folder name",
        )
    need("features", isinstance(config.get("features"), str), "the cache folder")
    for m in MODALITIES:
        need(m, isinstance(config.get(m), (str, type(None))), "an encoder name or null")
    need("text", config.get("text") or config.get("image"), "text or image must be set")
    classes = config.get("classes")
    need(
        "classes",
        isinstance(classes, list) and bool(classes) and all(isinstance(c, str) for c in classes),
        "a list of class names",
    )
    caches = config.get("caches")
    need("caches", isinstance(caches, dict), "a mapping modality -> cache")
    for m, src in caches.items():
        need(f"caches.{m}", isinstance(src, dict) and "fingerprint" in src, "with a fingerprint")
    best = config.get("best_head")
    need("best_head", best is None or best in heads, "one of the heads")


def load_head(folder: str | Path, *, device: str = "auto") -> Any:
    """The fitted estimator saved in `folder` (head.json says which kind). A missing or
    damaged file is a RunFolderError naming it; a bad --device a ValueError."""
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
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == "torch":
        from fuse.trainer import TorchClassifier

        return TorchClassifier.load(folder, device=device)
    if kind == "joblib":
        from fuse.classic import PooledEstimator

        return PooledEstimator.load(folder)
    raise RunFolderError(
        f"{meta_path} is damaged (kind {kind!r}, expected 'torch' or 'joblib'); rerun the "
        "`fusebench fuse` or `compare` command that made the run"
    )


def predict_run(
    run: str | Path,
    *,
    split: str = "test",
    out: str | Path = "predictions.txt",
    head: str | None = None,
    features: str | Path | None = None,
    device: str = "auto",
    allow_stale: bool = False,
) -> PredictionReport:
    """Writes `guid,tag` lines for every `split` guid of the run's caches to `out`; rows the
    head cannot predict get an empty tag (see the module docstring).

    head: which head of a compare run (default: its best by macro-F1); features: where the
    caches are now, when the folder recorded in the run has moved; allow_stale: predict from
    a cache whose dataset changed since extraction (see load_feature_set)."""
    run = Path(run)
    out = Path(out)
    config = load_run_config(run)
    heads = config["heads"]
    if head is None:
        head = config.get("best_head") or next(iter(heads))
        if len(heads) > 1:
            note(
                f"using head '{head}' (best macro-F1 of this compare run); pick another with --head"
            )
    elif head not in heads:
        raise ValueError(f"run {run} has no model for head '{head}'; it has: {', '.join(heads)}")
    model = load_head(run / heads[head]["model_dir"], device=device)
    classes = list(config["classes"])
    if list(model.classes_) != classes:
        raise _damaged(run, f"the model of head '{head}' has other classes than config.yaml")
    reads = tuple(model.modalities_)
    if any(config.get(m) is None for m in reads):
        raise _damaged(run, f"head '{head}' reads {' and '.join(reads)}, config.yaml lacks one")
    _check_writable(out)

    if features is None and not Path(config["features"]).is_dir():
        raise FileNotFoundError(
            f"the run's cache folder {config['features']} is gone; pass --features with the "
            "folder where those caches are now"
        )
    fs = load_feature_set(  # only what this head reads: a text head ignores failed images
        features or config["features"],
        text=config["text"] if "text" in reads else None,
        image=config["image"] if "image" in reads else None,
        tokens=reads if model.needs_tokens else False,
        allow_stale=allow_stale,
    )
    for modality in reads:
        recorded = config["caches"].get(modality, {}).get("fingerprint")
        if fs.sources[modality]["fingerprint"] != recorded:
            raise ValueError(
                f"{fs.sources[modality]['path']} is not the cache run {run.name} was trained on "
                "(its fingerprint changed since); predict with that cache, or train a new run on this one"
            )
    if list(fs.classes) != classes:
        raise ValueError(
            f"the cache's classes ({', '.join(fs.classes)}) are not the run's "
            f"({', '.join(classes)}); predict with the cache the run was trained on"
        )
    order = fs.cache_order(split)
    if len(order) == 0:
        raise ValueError(
            f"the cache has no rows with split '{split}'; splits present: "
            f"{', '.join(sorted(set(fs.all_split)))} (pick one with --split)"
        )
    rows = fs.rows_of_split(split)
    proba = model.predict_proba(fs.take(rows))  # (n, C)
    tags = dict(zip(fs.guid[rows], (classes[k] for k in proba.argmax(axis=1))))
    why = {e.guid: e.reason for e in fs.excluded}
    unpredicted = {str(g): why.get(g, "no usable row") for g in order if g not in tags}
    if unpredicted:
        note(
            f"{len(unpredicted)} of {len(order)} {split} row(s) have no usable "
            f"{' and '.join(reads)} features for head '{head}' and are left with an EMPTY tag "
            f"in {out}: " + few([f"{g} ({r})" for g, r in unpredicted.items()], 3)
        )

    def write(fh) -> None:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["guid", "tag"])
        writer.writerows((g, tags.get(g, UNPREDICTED)) for g in order)

    try:
        write_atomic(out, write)
    except OSError as e:
        raise OutputError(
            "cannot write the predictions: " + os_error_line(e, option="--out"), e.errno
        ) from None
    return PredictionReport(out=out, head=head, n_rows=len(order), unpredicted=unpredicted)


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
