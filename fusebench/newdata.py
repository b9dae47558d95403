"""`predict --data NEW` and `fusebench.predict_pairs`: label data the run never saw.

The one place that puts the two stages together for new data (stage two never imports stage
one): the cell's encoders and the run's caches of them (fuse/predict_new.py `cell_encoders`)
-> the settings those caches record, the model files checked against their recorded hashes,
NEW extracted with exactly those settings into a cache folder of its own (extract/replay.py)
-> every row of that folder labelled with the cell (fuse/predict_new.py `label_features`).

NEW's caches go to RUN/new/<dataset>/<encoder>.h5 (or --features-out/<dataset>/...): normal
caches (`cache verify` accepts them), reused by the next call on the same data.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

NEW_FOLDER = "new"  # RUN/new/<dataset>/: the caches of new data, by default


def predict_data(
    run: str | Path,
    data: str | Path,
    *,
    features_out: str | Path | None = None,
    model_dirs: Mapping[str, str | Path] | None = None,
    **options: Any,
):
    """Extracts `data` (any format `extract` reads) with the encoder settings of the run's
    caches the cell reads, then writes `guid,tag` lines for every row of it; returns the
    PredictionReport, whose `extracted` holds the ExtractReports.

    options: fusebench.predict_run's keywords but `split` (out, cell, head, mode, proba,
    features, device, allow_stale, quiet), with its defaults; `features` is where the run's
    caches are now (they record the settings). features_out: the root of NEW's caches
    (default RUN/new); model_dirs: encoder -> a folder holding the recorded model files on
    this machine (checked against the recorded hash)."""
    from fusebench.extract.replay import (
        check_model_files,
        check_replayed,
        recorded_settings,
        replay_options,
    )
    from fusebench.extract.runner import run as extract
    from fusebench.fuse.predict_new import cell_encoders, label_features

    pick = {k: options.get(k) for k in ("cell", "head", "features")}
    device, quiet = options.get("device", "auto"), options.get("quiet", True)
    _, _, caches = cell_encoders(run, **pick)
    dirs = {k: str(v) for k, v in (model_dirs or {}).items()}
    if unknown := sorted(set(dirs) - set(caches)):
        raise ValueError(
            f"--model-dir {unknown[0]}=...: the cell reads no {unknown[0]} features; it reads "
            f"{', '.join(caches)}"
        )
    recorded = {e: recorded_settings(c["path"], c["fingerprint"]) for e, c in caches.items()}
    for enc, rec in recorded.items():  # every encoder before the first model loads
        check_model_files(rec, dirs.get(enc))
    root = Path(features_out) if features_out is not None else Path(run) / NEW_FOLDER
    reports = []
    for enc, rec in recorded.items():
        opts = replay_options(data, rec, out=root, model=dirs.get(enc), device=device, quiet=quiet)
        (rep,) = _extract(extract, opts)
        check_replayed(rep.path, rec, model=dirs.get(enc))
        reports.append(rep)
    report = label_features(run, reports[0].path.parent, data=data, **options)
    report.extracted = reports
    return report


def _extract(extract, opts) -> list:
    """The runner, its advice about an existing cache said in predict's options: NEW's
    cache folder already holds another dataset of the same name, or other settings."""
    from fusebench.cache import CacheError

    try:
        return extract(opts)
    except CacheError as e:
        line = str(e)
        for was, now in ADVICE.items():
            line = line.replace(was, now)
        raise type(e)(line) from None


# extract's advice -> predict --data's (predict has no --overwrite: NEW's caches are its own)
ADVICE = {
    "pass --out elsewhere, or --overwrite to replace it": (
        "pass --features-out elsewhere, or delete that cache"
    ),
    "pass --overwrite to replace it, or --out elsewhere to keep both": (
        "delete that cache, or pass --features-out elsewhere to keep both"
    ),
    "pass --overwrite to replace it, or --out elsewhere": (
        "delete that cache, or pass --features-out elsewhere"
    ),
}


def parse_model_dirs(pairs: Sequence[str] | None) -> dict[str, str]:
    """`--model-dir vit=/models/vit` (repeatable) -> {"vit": "/models/vit"}."""
    out: dict[str, str] = {}
    for pair in pairs or ():
        enc, sep, folder = (p.strip() for p in pair.partition("="))
        if not sep or not enc or not folder:
            raise ValueError(
                f"--model-dir wants ENCODER=FOLDER, e.g. --model-dir vit=/models/vit (got {pair!r})"
            )
        out[enc] = folder
    return out


def predict_pairs(
    run: str | Path,
    pairs: Iterable[tuple[str | None, str | Path | None]],
    *,
    cell: str | None = None,
    mode: str = "ensemble",
    proba: bool = False,
    features: str | Path | None = None,
    model_dirs: Mapping[str, str | Path] | None = None,
    device: str = "auto",
) -> list[str] | list[dict[str, Any]]:
    """Labels (text, image path) pairs with a cell of `run` (default: its best cell's fold
    ensemble): one label per pair, in order; "" where the cell cannot read the pair (its
    image does not decode, say). proba=True: one dict per pair, {"tag", "p_<class>": float
    or None}.

    Goes through `predict --data`'s path: the pairs become a temporary JSONL manifest, which
    is extracted with the run's encoder settings and labelled; nothing is kept but the
    record in RUN/predictions.json. A None text or image leaves that part out."""
    pairs = list(pairs)
    if not pairs:
        return []
    tmp = Path(tempfile.mkdtemp(prefix="fusebench-pairs-"))
    try:
        manifest = tmp / "pairs" / "pairs.jsonl"
        manifest.parent.mkdir()
        with open(manifest, "w", encoding="utf-8") as fh:
            for i, (text, image) in enumerate(pairs):
                row = {"guid": str(i)}
                row |= {"text": str(text)} if text is not None else {}
                row |= {"image_path": str(Path(image).absolute())} if image is not None else {}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        out = tmp / "predictions.csv"
        predict_data(
            run, manifest, out=out, cell=cell, mode=mode, proba=proba, features=features,
            features_out=tmp / "features", model_dirs=model_dirs, device=device,
        )  # fmt: skip
        with open(out, newline="", encoding="utf-8") as fh:
            rows = {r["guid"]: r for r in csv.DictReader(fh)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [rows.get(str(i), {"tag": ""}) for i in range(len(pairs))]
    if not proba:
        return [r["tag"] for r in lines]
    # an unlabelled pair: "" as its tag, None as its probabilities
    return [{k: v if k == "tag" else float(v) if v else None for k, v in r.items() if k != "guid"}
            for r in lines]  # fmt: skip


def predict_any(
    run: str | Path,
    *,
    data: str | Path | None,
    split: str | None,
    features_out: str | Path | None,
    model_dir: Sequence[str] | None,
    **options: Any,
):
    """The `predict` command: --data NEW (predict_data) or a split of the run's own caches
    (fuse.predict.predict_run, --split, default test). --split with --data is refused: NEW is
    labelled whole, every split of it."""
    if data is None:
        if features_out is not None or model_dir:
            raise ValueError("--features-out and --model-dir go with --data NEW; add --data")
        from fusebench.fuse.predict import predict_run

        return predict_run(run, split=split or "test", **options)
    if split is not None:
        raise ValueError(
            f"--split {split} picks rows of the run's own caches, --data labels every row of "
            f"{data}; drop --split (or --data)"
        )
    return predict_data(
        run, data, features_out=features_out, model_dirs=parse_model_dirs(model_dir), **options
    )
