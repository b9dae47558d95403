"""`predict --data`, stage two's half: a cell of a finished run applied to a feature folder
that is not the run's own, i.e. caches of NEW data extracted with the run's encoder settings.

Stage two never extracts: `fusebench.newdata` (the CLI and the public API) extracts NEW with
the settings the run's caches record (fusebench/extract/replay.py) and hands the folder here.

    cell_encoders   which caches a cell reads (modality -> encoder: a text_only cell reads
                    text only), and the run's own caches of them, which record the settings
    label_features  every row of a feature folder labelled with the cell: `guid,tag` lines
                    (plus p_<class>), in the cache's row order, all splits, labelled or not

The labels, classes and splits NEW carries play no part: only its features are read. A row
whose features the cell reads failed (an image that does not decode, say) keeps its line
with an EMPTY tag and is counted on stderr, as in `predict --split`. Modes are predict's:
the fold ensemble (default), fold0, or refit (trained on the run's own caches, then applied).
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from fusebench.fuse.features import FeatureSet, cache_path, load_feature_set
from fusebench.fuse.head import Head
from fusebench.fuse.predict import (
    PredictionReport,
    RunFolderError,
    average_proba,
    cell_models,
    finish_prediction,
    fit_dirs,
    load_cell_features,
    load_models,
    load_run_config,
    pick_cell,
    predict_run,
    refit_if_asked,
    without_tag,
)

# predict_run's options but `split`, with their defaults: what predict --data passes along
PREDICT_OPTIONS = {
    name: p.default
    for name, p in inspect.signature(predict_run).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "split"
}


def cell_encoders(
    run: str | Path,
    *,
    cell: str | None = None,
    head: str | None = None,
    features: str | Path | None = None,
) -> tuple[str, dict[str, str], dict[str, dict]]:
    """(cell id, modality -> encoder the cell READS, encoder -> {"path": the run's cache of
    it, "fingerprint": the one the run recorded}).

    What the cell reads comes from its saved model (a text_only head of a text+image cell
    reads text only, so only the text encoder is needed for new data). features: where the
    run's cache folder is now, when it moved."""
    run = Path(run)
    config = load_run_config(run)
    cell_id = pick_cell(run, config, cell=cell, head=head)
    first = fit_dirs(run, config, cell_id, first_only=True)
    model = load_models(run, first, list(config["classes"]), device="cpu")[0]
    entry = config["cells"][cell_id]
    reads = {m: entry.get(m) for m in model.modalities_}
    if any(e in (None, "", "none") for e in reads.values()):
        raise RunFolderError(f"run folder {run} is damaged: cell '{cell_id}' lacks an encoder")
    caches = {}
    for enc in dict.fromkeys(reads.values()):
        src = config["caches"].get(enc) or {}
        path = cache_path(Path(features), enc) if features else Path(src.get("path", ""))
        if not path.is_file():
            raise FileNotFoundError(
                f"the run's {enc} cache {path} is gone, and it records the encoder settings new "
                "data must be extracted with; pass --features with the folder where the run's "
                "caches are now"
            )
        caches[enc] = {"path": path, "fingerprint": src.get("fingerprint")}
    return cell_id, reads, caches


def label_features(
    run: str | Path, new_features: str | Path, *, data: str | Path | None = None, **options: Any
) -> PredictionReport:
    """Writes `guid,tag` lines (plus p_<class> with proba) for EVERY row of the caches in
    `new_features` — extracted with the run's encoder settings — to `out`, labelled by a
    cell of the run, and records the prediction in RUN/predictions.json (with `data`).

    options: predict_run's keywords but `split` (PREDICT_OPTIONS: out, cell, head, mode,
    proba, device as there; features / allow_stale: the run's own caches, read by a refit
    only). One-line errors: a cache of an encoder the cell reads is missing from
    `new_features` (FileNotFoundError), or holds features of another size than the run's
    (ValueError)."""
    if unknown := sorted(set(options) - set(PREDICT_OPTIONS)):
        raise TypeError(f"label_features() got an unexpected keyword argument {unknown[0]!r}")
    o = {**PREDICT_OPTIONS, **options}
    job = cell_models(
        run, o["out"], cell=o["cell"], head=o["head"], mode=o["mode"], device=o["device"]
    )
    new = _new_feature_set(job.run, job.config, job.cell_id, job.models[0], Path(new_features))
    refit = None
    if o["mode"] == "refit":
        model = job.models[0]
        fs = load_cell_features(
            job.run, job.config, job.cell_id, model, features=o["features"],
            allow_stale=o["allow_stale"],
        )  # fmt: skip
        refit = refit_if_asked(job, o["mode"], fs, quiet=o["quiet"])
    labels = label_every_row(job.models, new, cell_id=job.cell_id, out=job.out)
    what = f"all rows of {data if data is not None else new_features}"
    return finish_prediction(job, labels, o["mode"], refit, proba=o["proba"], split=what)


def _new_feature_set(
    run: Path, config: dict, cell_id: str, model: Head, folder: Path
) -> FeatureSet:
    """The caches of `folder` the cell reads, with what `model` reads only (a text head
    ignores failed images); pooled sizes checked against the run's."""
    entry = config["cells"][cell_id]
    reads = tuple(model.modalities_)
    encoders = {m: entry.get(m) for m in reads}
    fs = load_feature_set(
        folder,
        text=encoders.get("text"),
        image=encoders.get("image"),
        tokens=reads if model.needs_tokens else False,
    )
    for m, enc in encoders.items():
        run_cache = Path((config["caches"].get(enc) or {}).get("path", ""))
        want = _pooled_dim(run_cache, m) if run_cache.is_file() else None
        got = fs.modality(m).pooled_dim
        if want is not None and want != got:
            raise ValueError(
                f"{cache_path(folder, enc)} holds {got}-d {m} features, the run's cell "
                f"'{cell_id}' was trained on {want}-d ones; extract the new data with the run's "
                "encoder settings (`fusebench predict --run RUN --data NEW`)"
            )
    # NEW's own labels and classes play no part: the heads size their outputs by the run's
    return replace(fs, classes=tuple(config["classes"]), label=np.full(len(fs), -1, np.int64))


def _pooled_dim(path: Path, modality: str) -> int | None:
    """The size of `modality`'s pooled vectors in a cache (None when unreadable)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return int(f[f"{modality}/pooled"].shape[-1])
    except (OSError, KeyError, ValueError):
        return None


def label_every_row(
    models: list[Head], fs: FeatureSet, *, cell_id: str, out: Path
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, str]]:
    """(every guid of the caches in row order, guid -> averaged class probabilities, guid ->
    why it has none). A guid held twice is listed once (and left without a tag: predict's
    rule), an empty guid not at all."""
    order = np.array(list(dict.fromkeys(g for g in fs.all_guid if str(g).strip())), dtype=object)
    probs: dict[str, np.ndarray] = {}
    if len(fs):
        p = average_proba(models, fs)  # (n, C)
        probs = dict(zip(fs.guid, p))
    return order, probs, without_tag(models, fs, order, probs, cell_id=cell_id, out=out)
