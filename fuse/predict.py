"""`predict`: the saved model of a run, applied to the caches the run recorded. Refits nothing.

Output: `guid,tag` then one line per row of the requested split, in the cache's order (for
lab5 that is test_without_label.txt's order). Rows whose features failed in the cache cannot
be scored; they get the run's fallback class (the majority class of its labelled training
rows) and are named in a note on stderr — never dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from fuse._util import few, note
from fuse.features import load_feature_set


@dataclass
class PredictionReport:
    out: Path
    head: str
    n_rows: int
    fallback: list[str]  # guids that got the fallback class
    fallback_tag: str


def load_run_config(run: str | Path) -> dict:
    path = Path(run) / "config.yaml"
    if not Path(run).is_dir():
        raise FileNotFoundError(
            f"no run folder {run}; pass a folder that `fuse` or `compare` wrote under runs/"
        )
    if not path.exists():
        raise FileNotFoundError(f"{run} is not a fusebench run folder (no config.yaml)")
    return yaml.safe_load(path.read_text())


def load_head(folder: str | Path, *, device: str = "auto"):
    """The fitted estimator saved in `folder` (head.json says which kind)."""
    folder = Path(folder)
    meta_path = folder / "head.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no saved model in {folder} (head.json missing)")
    kind = json.loads(meta_path.read_text())["kind"]
    if kind == "torch":
        from fuse.trainer import TorchClassifier

        return TorchClassifier.load(folder, device=device)
    from fuse.classic import PooledEstimator

    return PooledEstimator.load(folder)


def predict_run(
    run: str | Path,
    *,
    split: str = "test",
    out: str | Path = "predictions.txt",
    head: str | None = None,
    features: str | Path | None = None,
    device: str = "auto",
) -> PredictionReport:
    """Writes `guid,tag` lines for every `split` row of the run's caches to `out`.

    head: which head of a compare run (default: its best by macro-F1); features: where the
    caches are now, when the folder recorded in the run has moved."""
    run = Path(run)
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
    fs = load_feature_set(
        features or config["features"],
        text=config["text"],
        image=config["image"],
        tokens=model.modalities_ if model.needs_tokens else False,
    )
    for modality, src in config["caches"].items():
        now = fs.sources[modality]["fingerprint"]
        if now != src["fingerprint"]:
            raise ValueError(
                f"{fs.sources[modality]['path']} is not the cache run {run.name} was trained on "
                "(its fingerprint changed since); predict with that cache, or train a new run on this one"
            )
    order = fs.cache_order(split)
    if len(order) == 0:
        raise ValueError(
            f"the cache has no rows with split '{split}'; splits present: {', '.join(sorted(set(fs.all_split)))}"
        )
    rows = fs.rows_of_split(split)
    proba = model.predict_proba(fs.take(rows))  # (n, C)
    classes = list(config["classes"])
    tags = dict(zip(fs.guid[rows], (classes[k] for k in proba.argmax(axis=1))))
    fallback_tag = config["fallback_class"]
    fallback = [str(g) for g in order if g not in tags]
    if fallback:
        note(
            f"{len(fallback)} {split} row(s) have no usable features in the cache and were given "
            f"the majority class '{fallback_tag}': {few(fallback)}"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        fh.write("guid,tag\n")
        for g in order:
            fh.write(f"{g},{tags.get(g, fallback_tag)}\n")
    return PredictionReport(
        out=out, head=head, n_rows=len(order), fallback=fallback, fallback_tag=fallback_tag
    )
