"""A cache's settings and what to do with a cache already at its path.

Refresh: when the data changed on disk since a cache was built with the same settings (files
edited, rows added or removed, labels changed), `extract` builds the new cache reusing the
stored features of every row that was ok and whose inputs did not change (extract/plan.py).

A different setting is a different cache and is refused without --overwrite, naming the
setting (`existing_cache`): every config key, and of the options that follow the data
(--limit, --labels, --text-encoding) the value given, recorded in the cache's `request`
attribute. So a class set or a detected legacy encoding that changed because the files
changed is refreshed, while a different --limit / --labels / --text-encoding is refused. A
cache of another dataset (the `data_path` it records: the manifest file, or the folder) at the
same path is refused too. --layer K names its own cache (`<encoder>-l<K>.h5`). With
--overwrite, a cache whose only differences are those data options and --column is replaced
reusing its unchanged rows as a refresh does; any other --overwrite rebuilds every row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import h5py
from fusebench.cache import CacheError
from fusebench.cache.format import canonical_json
from fusebench.cache.reader import read_header
from fusebench.extract.datasets import Dataset, dataset_identity
from fusebench.extract.encoders import Encoder, EncoderSpec
from fusebench.extract.options import ExtractOptions


def cache_config(enc: Encoder, ds: Dataset, *, batch_size: int, limit: int | None) -> dict:
    """Everything that changes the cached numbers or their meaning, as stored in the cache's
    `config` attribute and hashed into its fingerprint: the encoder's own config and
    `data_config`."""
    return enc.config() | data_config(ds, batch_size=batch_size, limit=limit)


def data_config(ds: Dataset, *, batch_size: int, limit: int | None) -> dict:
    """The config keys that are not the encoder's: the batch size (padding changes float16
    bits), the dataset's format, classes and legacy text encoding, --limit (None when it
    covers the whole dataset), and the manifest's --column mapping (only when one is given,
    so caches built without it keep their fingerprint)."""
    return {
        "batch_size": batch_size,
        "format": ds.format,
        "limit": limit if limit and limit < len(ds.samples) else None,
        "classes": list(ds.classes),
        "text_encoding": ds.text_encoding,
    } | ({"columns": ds.column_map} if ds.column_map else {})  # --column: absent when not used


def existing_cache(
    final: Path,
    fp: str | None,
    config: dict,
    manifest: list[dict],
    overwrite: bool,
    *,
    ds: Dataset | None = None,
    request: dict | None = None,
    keys: Sequence[str] | None = None,
) -> str:
    """What to do with a cache already at `final`: "same" (complete, same data and settings),
    "refresh" (same dataset and settings, its files changed), "replace" (--overwrite) or
    "reuse" (--overwrite over a cache that differs only in the data options, REUSABLE: replace
    it, copying its unchanged rows as a refresh does). A cache of another dataset, or built
    with another setting, is refused (CacheError naming the dataset or each setting).

    fp None: the check before the model loads, over the config `keys` known by then."""
    try:
        with h5py.File(final, "r") as f:
            attrs, old_cfg, old_man = read_header(f)
        complete = bool(attrs.get("complete"))
    except (OSError, ValueError, KeyError):
        attrs, old_cfg, old_man, complete = {}, {}, [], False
    if complete and fp is not None and attrs.get("fingerprint") == fp:
        return "replace" if overwrite else "same"
    if not complete:
        if overwrite:  # the old file stays until the new one replaces it
            return "replace"
        raise CacheError(
            f"{final} already exists but is unreadable or unfinished; pass --overwrite to "
            "replace it, or --out elsewhere"
        )
    other = _other_dataset(final, attrs, old_cfg, old_man, ds, manifest)
    diffs = setting_differences(old_cfg, stored_request(attrs), config, request, keys)
    if overwrite:
        return "reuse" if diffs and not other and set(diffs) <= set(REUSABLE) else "replace"
    if other:
        raise CacheError(other)
    if diffs:
        raise CacheError(
            f"{final} was built with {'; '.join(diffs.values())}; pass --overwrite to replace "
            "it, or --out elsewhere to keep both"
        )
    return "refresh"


def check_existing(
    final: Path, ds: Dataset, spec: EncoderSpec, opts: ExtractOptions, request: dict
) -> None:
    """Before the model loads: `existing_cache`'s refusals that need no model (another
    dataset; another --model, --layer, --random-init, --batch-size, --format, --column,
    --limit, --labels or --text-encoding), so a refused run costs no model load."""
    if opts.overwrite or not final.exists():
        return
    planned = {
        "encoder": spec.name,
        "model": spec.model,
        "weights": "random" if spec.random_init else "pretrained",
        "layer": spec.layer,
    } | data_config(ds, batch_size=opts.batch_size, limit=opts.limit)
    n = min(opts.limit, len(ds.samples)) if opts.limit else len(ds.samples)
    keys = [*planned, "columns"]
    existing_cache(
        final, None, planned, ds.manifest()[:n], False, ds=ds, request=request, keys=keys
    )


# config key -> the extract option that sets it (the others come from the encoder's YAML)
OPTIONS = {
    "encoder": "--encoder",
    "model": "--model",
    "weights": "--random-init",
    "layer": "--layer",
    "batch_size": "--batch-size",
    "precision": "--precision",
    "preprocess": "--exact-preprocess / --decode",
    "format": "--format",
    "limit": "--limit",
    "classes": "--labels",
    "text_encoding": "--text-encoding",
    "columns": "--column",
}


# config keys whose value follows the data, and the option (request key) that can fix them:
# the cache differs in the setting only when the option as given differs
REQUESTED = {"limit": "limit", "classes": "labels", "text_encoding": "text_encoding"}


# settings that change which rows and what they hold, not how a row is computed: --overwrite
# over a cache that differs only in these copies its unchanged rows
REUSABLE = ("limit", "classes", "text_encoding", "columns")


_ABSENT = "<absent>"


def stored_request(attrs: dict) -> dict | None:
    """The data options a cache was built with (`ExtractOptions.request`); None for a cache written
    before they were recorded (then its config is all there is to compare)."""
    raw = attrs.get("request")
    try:
        req = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except ValueError:
        return None
    return req if isinstance(req, dict) and set(REQUESTED.values()) <= set(req) else None


def setting_differences(
    old_cfg: dict,
    old_request: dict | None,
    config: dict,
    request: dict | None,
    keys: Sequence[str] | None = None,
) -> dict[str, str]:
    """config key -> one phrase ("--limit none, now 30") for each setting a cache was built
    with that differs now. A key that follows the data (REQUESTED) differs only when the
    option as given differs too: classes or a detected encoding that changed with the files
    are the data changing, not a setting."""
    out: dict[str, str] = {}
    for key in keys or sorted(set(old_cfg) | set(config)):
        a, b = old_cfg.get(key, _ABSENT), config.get(key, _ABSENT)
        if canonical_json(a) == canonical_json(b):
            continue
        r = REQUESTED.get(key)
        if r and old_request is not None and request is not None:
            if canonical_json(old_request.get(r)) == canonical_json(request.get(r)):
                continue
            out[key] = (
                f"{OPTIONS[key]} {_given(key, old_request, a)}, now {_given(key, request, b)}"
            )
        elif r:  # a cache that did not record the options: its config is what it holds
            out[key] = f"{key} {_shown(a)}, now {_shown(b)} ({OPTIONS[key]})"
        elif key == "weights":
            out[key] = f"--random-init {_on(a == 'random')}, now {_on(b == 'random')}"
        elif key == "preprocess":  # absent: the model's own processor
            out[key] = f"image preprocessing {_image_path(a)}, now {_image_path(b)}"
        elif key == "image_processor" and a == _ABSENT and str(b).endswith("Pil"):
            continue  # made before the class was recorded: always the PIL-backend class
        elif key == "model_revision":
            out[key] = (
                f"model_revision {_shown(a)[:12]}, now {_shown(b)[:12]} (the files of "
                f"{config.get('model')} changed since)"
            )
        elif key in OPTIONS:
            out[key] = f"{OPTIONS[key]} {_shown(a)}, now {_shown(b)}"
        else:
            yaml = f"configs/encoders/{config.get('encoder')}.yaml"
            out[key] = f"config '{key}' {_shown(a)}, now {_shown(b)} (the encoder's {yaml})"
    return out


# the fingerprint's `preprocess` value -> what the user reads (and the option that makes it)
IMAGE_PATHS = {
    _ABSENT: "the model's processor (--exact-preprocess)",
    "fast": "the CPU fast path of before (JPEG draft decode down to the target size)",
    "fast-draft2x": "the CPU fast path (--decode cpu)",
    "device:pil": "the device path, JPEGs decoded by PIL (--decode gpu)",
    "device:nvjpeg": "the device path, JPEGs decoded by nvJPEG (--decode gpu)",
}


def _image_path(value) -> str:
    return IMAGE_PATHS.get(value, str(value))


def _given(key: str, request: dict, effective) -> str:
    """An option as given, and what it gave when it was not."""
    value = request.get(REQUESTED[key])
    if value is not None:
        return _shown(value)
    if key == "classes":
        return f"none (the data's {_shown(effective)})"
    if key == "text_encoding" and effective not in (None, _ABSENT):
        return f"none (detected {effective})"
    return "none"


def _shown(v) -> str:
    if v is None or v == _ABSENT:
        return "none"
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, dict):
        return " ".join(f"{k}={x}" for k, x in v.items()) or "none"
    text = str(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _other_dataset(
    final: Path,
    attrs: dict,
    old_cfg: dict,
    old_man: list[dict],
    ds: Dataset | None,
    manifest: list[dict],
) -> str | None:
    """One line when the cache at `final` holds another dataset than `ds` (another manifest
    file or folder, and other samples: the same samples moved or copied elsewhere are the same
    data); else None."""
    recorded = attrs.get("data_path")
    if ds is None or ds.path is None or not recorded:
        return None
    was = dataset_identity(str(recorded), old_cfg.get("format"))
    if was == ds.path or canonical_json(old_man) == canonical_json(manifest):
        return None
    name = attrs.get("dataset") or was.name
    return (
        f"{final} holds dataset {name} ({was}), not {ds.name} ({ds.path}); pass --out "
        "elsewhere, or --overwrite to replace it"
    )
