"""Extract new data exactly as a finished run's caches were extracted (`predict --data`,
stage one's half; fusebench/newdata.py puts it together with stage two).

A cache records every setting that changes its numbers in its `config` attribute (cache
format v1; extract/settings.py `cache_config`): the encoder, its model files (`model`, and
`model_revision`: the hub commit, or the sha256 of every file from_pretrained reads in a
local folder), the layer, random or pretrained weights, max_length, pooling, precision, the
image path (`preprocess`: the model's processor, the CPU fast path or the device path), the
batch size (padding changes float16 bits) and the text encoding the data was read with.

`replay_options` turns one such cache into the ExtractOptions that reproduce it on NEW;
`check_model_files` refuses, before any model loads, a local model folder whose files are
missing or no longer hash to the recorded revision, naming the changed file (the
`model_files` attribute, extract/modelfiles.py, records each file's sha256);
`check_replayed` compares the new cache's config with the recorded one after extraction (a
hub model, or an encoder YAML edited since) and removes a cache that differs. What follows
the data (its format, classes, --limit, --column) is NEW's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import h5py
from fusebench.cache.format import DATA_KEYS, CacheError
from fusebench.cache.reader import read_header
from fusebench.extract.encoders import resolve_model_path, weights_revision
from fusebench.extract.modelfiles import changed_files, readable_files
from fusebench.extract.options import ExtractOptions
from fusebench.extract.settings import setting_differences

# config keys that describe the data NEW is, not how a row is computed
NEW_DATA_KEYS = (*DATA_KEYS, "format")
# precision as a cache records it -> the --precision that gives it again
PRECISION = {"fp32": "fp32", "fp16-autocast": "fp16", "bf16-autocast": "bf16"}


def recorded_settings(cache: str | Path, fingerprint: str | None = None) -> dict:
    """{"config", "request", "modalities", "path"} of one of a run's caches. fingerprint:
    the one the run recorded; a cache extracted again since (another fingerprint) is refused,
    since the settings it records may not be the ones the run was trained with."""
    path = Path(cache)
    try:
        with h5py.File(path, "r") as f:
            attrs, config, _ = read_header(f, path)
            modalities = [m for m in ("text", "image") if m in f]
    except OSError as e:
        raise CacheError(f"cannot read the run's cache {path} ({e}); pass --features") from None
    if fingerprint is not None and attrs.get("fingerprint") != fingerprint:
        raise CacheError(
            f"{path} was extracted again after the run was trained (its fingerprint is not the "
            "one the run recorded), so it no longer records the run's encoder settings; pass "
            "--features with the caches the run was trained on, or retrain the run on this one"
        )
    request, files = (_json_attr(attrs.get(k)) for k in ("request", "model_files"))
    return {
        "config": config,
        "request": request or {},
        "model_files": files or {},  # file name -> sha256 (caches written since it is recorded)
        "modalities": modalities,
        "path": path,
    }


def _json_attr(value):
    try:
        return json.loads(value) if isinstance(value, (str, bytes)) else value
    except ValueError:
        return None


def replay_options(
    data: str | Path,
    recorded: dict,
    *,
    out: str | Path,
    model: str | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> ExtractOptions:
    """The ExtractOptions that extract `data` with the settings of one recorded cache
    (`recorded_settings`), into <out>/<dataset>/<encoder>.h5. model: a folder that holds the
    recorded model files on this machine (default: the recorded path)."""
    cfg, request = recorded["config"], recorded["request"]
    precision = PRECISION.get(str(cfg.get("precision")))
    if precision is None:
        raise CacheError(
            f"{recorded['path']} records precision {cfg.get('precision')!r}, which this "
            "fusebench cannot reproduce; update fusebench"
        )
    text, image = "text" in recorded["modalities"], "image" in recorded["modalities"]
    preprocess = cfg.get("preprocess") if image else None
    if preprocess == "fast":  # FastImagePath margin 1: only `cache verify` rebuilds it
        raise CacheError(
            f"{recorded['path']} was extracted with the CPU fast image path of an older "
            "fusebench, which new data cannot be extracted with any more; extract the run's "
            "data again and retrain the run, then predict"
        )
    return ExtractOptions(
        data=data,
        encoders=[str(cfg["encoder"])],
        out=out,
        model=model or cfg.get("model"),
        layer=cfg.get("layer"),
        random_init=cfg.get("weights") == "random",
        batch_size=int(cfg.get("batch_size", 32)),
        device=device,
        precision=precision,
        quiet=quiet,
        # absent: the model's own image processor; "device:...": the device path (--decode gpu;
        # on a machine without CUDA it decodes with PIL, and check_replayed says if that differs)
        exact_preprocess=image and preprocess is None,
        decode="gpu" if str(preprocess).startswith("device:") else "cpu",
        # the rule texts were read with: UTF-8 first, then this legacy encoding
        text_encoding=(request.get("text_encoding") or cfg.get("text_encoding")) if text else None,
    )


def check_model_files(recorded: dict, model: str | None = None) -> None:
    """Before any model loads: the model folder of a recorded cache exists on this machine
    and its files hash to the recorded revision (a local folder's sha256; a hub commit is
    checked after loading, by check_replayed). ValueError / FileNotFoundError, one line,
    naming the folder and the fix."""
    cfg = recorded["config"]
    enc, revision = cfg.get("encoder"), str(cfg.get("model_revision") or "")
    given = model or str(cfg.get("model"))
    if not revision.startswith("sha256:"):
        return
    folder = Path(resolve_model_path(given)).expanduser()
    fix = f"--model-dir {enc}=FOLDER with a copy of the files the run used"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the run's {enc} features were extracted with the model files in {folder}, which "
            f"is not on this machine; copy that folder there, or pass {fix}"
        )
    # the revision of a local folder is its files' sha256; a hub commit is never set on one
    now = weights_revision(SimpleNamespace(config=SimpleNamespace()), str(folder))
    if now == revision:
        return
    recorded_files = recorded.get("model_files") or {}
    changed = changed_files(folder, recorded_files) if recorded_files else []
    which = (
        ", ".join(changed)
        if changed
        else "one of " + ", ".join(p.name for p in readable_files(folder))
    )
    raise ValueError(
        f"model files in {folder} changed since the run's {enc} features were extracted "
        f"({which}: they hash to {now}, the caches record {revision}); restore the files the "
        f"run used, pass {fix}, or retrain the run with these"
    )


def check_replayed(new_cache: str | Path, recorded: dict, *, model: str | None = None) -> None:
    """After extraction: the new cache's config equals the recorded one in every setting
    that is not NEW's own data (and not the model path when `model` moved it). A cache that
    differs is removed (so the next call extracts again) and refused in one line naming
    each setting."""
    new = recorded_settings(new_cache)["config"]
    old = recorded["config"]
    skip = {*NEW_DATA_KEYS, *(("model",) if model else ())}
    keys = sorted(k for k in set(old) | set(new) if k not in skip)
    diffs = setting_differences(old, None, new, None, keys)
    if diffs:
        Path(new_cache).unlink(missing_ok=True)
        raise ValueError(
            f"extracting the new data did not reproduce the run's {old.get('encoder')} settings "
            f"({'; '.join(diffs.values())}); restore the model files and encoder YAML the run "
            "used, or retrain the run with these"
        )
