"""Joining caches of one encoder and settings over parts of one dataset (`fusebench cache merge`).

    merge_caches([A, B, ...], out) -> MergeReport; refusals are one-line CacheErrors

The inputs are caches of ONE dataset (shards, a dataset extracted in parts with --limit or from
part manifests), possibly overlapping. What is checked, before anything is written:
- each input is a complete, undamaged cache (FeatureStore.open: fingerprint, digests);
- the settings are equal: the config without its data keys (DATA_KEYS), and the dataset's
  folder (the folder its manifest or files are in: part manifests beside each other, or
  copies of one dataset folder on several machines); the model's path may differ when its
  revision (the hash of its weight and tokenizer files) is the same; the data keys must agree
  too, except `limit` (the output's is None when any input covers its whole dataset, else the
  largest: the union of --limit prefixes is the longest prefix);
- the layout is equal: modalities, pooled vectors (names, sizes, pooling), token widths;
- a guid in several inputs is the same sample (same manifest entry: split, label, content
  hashes) with the same features (bytes) wherever it is ok in both.

Row order of the output: the first input's rows in its order, then each following input's new
rows in its order. Merging the parts of a dataset in dataset order therefore gives dataset
order, and the fingerprint `extract` would have given the whole (`CacheWriter` computes it over
the merged config + manifest). A guid repeated within one input (a duplicate-guid sample) is
matched by occurrence: its k-th row meets the k-th row of that guid in another input.

Each output row is copied from one input row: the first input where it is ok (a guid ok in any
input is ok in the output), else its first occurrence. Its error-log lines come from that same
input. Text tokens are padded with zeros to the longest input's length. `sources` (the record
of the data files, cache/sources.py) is the union of the inputs'. The output is written through
CacheWriter (temporary name, fletcher32, digests, atomic rename) under `exclusive_lock`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from fusebench.cache.format import (
    DATA_KEYS,
    MODALITIES,
    OK,
    CacheError,
    TokenFeatures,
    canonical_json,
)
from fusebench.cache.integrity import read_rows
from fusebench.cache.reader import FeatureStore, decode_attr, reading
from fusebench.cache.writer import CacheWriter, exclusive_lock

# Root attributes the writer sets itself; every other one is carried over from the first input.
OWN_ATTRS = ("fusebench_format", "complete", "created", "config", "fingerprint", "digests")
BLOCK = 256  # rows copied per read


class MergeError(CacheError):
    """Caches that cannot be merged; the message names the key or guid and the files."""


@dataclass
class MergeReport:
    path: Path
    rows: int
    ok: int
    failed: int
    inputs: int
    overlap: int  # output rows found in more than one input


def merge_caches(
    inputs: Sequence[str | Path], out: str | Path, *, overwrite: bool = False
) -> MergeReport:
    """Writes `out`, the union of the rows of `inputs` (see the module docstring)."""
    paths = [Path(p) for p in inputs]
    out = Path(out)
    _check_paths(paths, out, overwrite)
    stores, layouts = _open_inputs(paths)
    first = stores[0]
    rows = _union(stores)  # [(key, [(input, row), ...])] in output order
    picks = [_pick(stores, where) for _, where in rows]
    _check_overlaps(stores, rows)
    config, manifest, attrs = _merged_header(stores, picks)
    sources = merge_sources([s.sources for s in stores])
    status = np.array([stores[i].status[r] for i, r in picks], dtype=np.uint8)

    with exclusive_lock(out):
        writer = CacheWriter(
            out,
            guid=[m["guid"] for m in manifest],
            split=[stores[i].split[r] for i, r in picks],
            label=[int(stores[i].label[r]) for i, r in picks],
            classes=first.classes,
            manifest=manifest,
            config=config,
            attrs=attrs,
            sources=sources,
            kept="",  # nothing to resume: a rerun merges again
        )
        try:
            for modality in MODALITIES:
                if layouts[0].get(modality) is not None:
                    _copy_modality(writer, modality, stores, layouts, picks)
            writer.set_status(status)
            writer.add_errors(_errors(stores, picks))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    return MergeReport(
        path=out,
        rows=len(picks),
        ok=int((status == OK).sum()),
        failed=int((status != OK).sum()),
        inputs=len(stores),
        overlap=sum(len(where) > 1 for _, where in rows),
    )


def _open_inputs(paths: list[Path]) -> tuple[list[FeatureStore], list[dict]]:
    """The input caches (without token arrays) and their layouts, refused unless every one
    has the first one's settings and layout."""
    stores = [FeatureStore.open(p, tokens=False) for p in paths]
    first = stores[0]
    for s in stores[1:]:
        _check_same_settings(first, s)
    layouts = [_layout(s) for s in stores]
    for s, layout in zip(stores[1:], layouts[1:]):
        _check_same_layout(first, layouts[0], s, layout)
    return stores, layouts


def _merged_header(
    stores: list[FeatureStore], picks: list[tuple[int, int]]
) -> tuple[dict, list[dict], dict]:
    """The merged cache's config (limit: the largest, None if any input had none), manifest
    and root attributes (the first input's, its own ones replaced, merged_from added)."""
    first = stores[0]
    config = dict(first.config)
    limits = [s.config.get("limit") for s in stores]
    config["limit"] = None if None in limits else max(limits)
    manifest = [_entry(stores[i], r) for i, r in picks]
    attrs = {k: v for k, v in first.attrs.items() if k not in OWN_ATTRS}
    _merged_identity(attrs, stores, config["limit"])
    attrs["merged_from"] = [
        {"path": str(s.path), "fingerprint": str(s.attrs.get("fingerprint", "")), "rows": len(s)}
        for s in stores
    ]
    return config, manifest, attrs


# ------------------------------------------------------------------------------ checks


def _check_paths(paths: list[Path], out: Path, overwrite: bool) -> None:
    if len(paths) < 2:
        raise MergeError("cache merge needs at least two caches; pass them before --out")
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise MergeError(f"{p} is passed twice (as {seen[key]} and {p}); pass each cache once")
        seen[key] = p
    if out.resolve() in seen:
        raise MergeError(f"--out {out} is one of the inputs; write the merged cache elsewhere")
    if out.is_dir():
        raise MergeError(f"--out {out} is a folder; pass a file path such as {out / 'clip.h5'}")
    if out.exists() and not overwrite:
        raise MergeError(f"{out} already exists; pass --overwrite to replace it, or another --out")


def _differs(a: FeatureStore, b: FeatureStore, what: str, va, vb, fix: str) -> MergeError:
    return MergeError(
        f"cannot merge {a.path} and {b.path}: {what} differs ({a.path.name}: {_short(va)}, "
        f"{b.path.name}: {_short(vb)}); {fix}"
    )


def _check_same_settings(a: FeatureStore, b: FeatureStore) -> None:
    fix = "merge caches extracted with one encoder and the same settings"
    same_weights = a.config.get("model_revision") and canonical_json(
        a.config.get("model_revision")
    ) == canonical_json(b.config.get("model_revision"))
    for key in sorted(set(a.config) | set(b.config)):
        if key == "limit" or (key == "model" and same_weights):  # one model, two paths
            continue
        va, vb = a.config.get(key, "<absent>"), b.config.get(key, "<absent>")
        if canonical_json(va) != canonical_json(vb):
            if key == "classes":
                fix = "extract every part with the same --labels so their classes agree"
            elif key in DATA_KEYS:
                fix = "merge parts of one dataset, read with the same options"
            raise _differs(a, b, f"config '{key}'", va, vb, fix)
    va, vb = a.attrs.get("encoder", "<absent>"), b.attrs.get("encoder", "<absent>")
    if va != vb:
        raise _differs(a, b, "encoder", va, vb, "merge caches of one encoder and one dataset")
    va, vb = _dataset_folder(a), _dataset_folder(b)
    if va != vb:
        raise _differs(a, b, "the dataset", va, vb, "merge caches of one encoder and one dataset")
    if a.classes != b.classes:
        raise _differs(
            a,
            b,
            "the classes",
            a.classes,
            b.classes,
            "extract every part with the same --labels so their classes agree",
        )


def _dataset_folder(s: FeatureStore) -> str:
    """The name of the folder a cache's dataset is in (what a dataset was named after before
    manifest files were named by their stem): parts of one dataset share it."""
    root = (s.sources or {}).get("root") if isinstance(s.sources, dict) else None
    if root:
        return Path(str(root)).name
    return str(s.attrs.get("dataset", "<absent>"))


def _merged_identity(attrs: dict, stores: list[FeatureStore], limit: int | None) -> None:
    """The output's dataset name, data path and data options: the first input's when every
    input has them, else the folder the inputs' data is in (parts of a dataset read from
    several manifests are none of them)."""
    paths = {str(s.attrs.get("data_path", "")) for s in stores}
    if len(paths) > 1:
        roots = {str((s.sources or {}).get("root", "")) for s in stores}
        attrs["dataset"] = _dataset_folder(stores[0])
        if len(roots) == 1 and "" not in roots:
            attrs["data_path"] = roots.pop()
        else:
            attrs.pop("data_path", None)
    request = attrs.get("request")
    try:
        request = json.loads(request) if isinstance(request, str) else request
    except ValueError:
        request = None
    if isinstance(request, dict):
        attrs["request"] = request | {"limit": limit}


def _layout(s: FeatureStore) -> dict[str, dict | None]:
    """modality -> what its arrays look like (token width, mask, pooled names/sizes/pooling)."""
    out: dict[str, dict | None] = {}
    with reading(s.path) as f:
        for m in MODALITIES:
            feats: TokenFeatures | None = getattr(s, m)
            if feats is None or m not in f:
                out[m] = None
                continue
            tokens = f[m].get("tokens")
            out[m] = {
                "length": None if tokens is None else int(tokens.shape[1]),
                "width": None if tokens is None else int(tokens.shape[2]),
                "mask": "mask" in f[m],
                "pooled": {
                    k: [int(v.shape[1]), feats.pooling.get(k, "")] for k, v in feats.pooled.items()
                },
            }
    return out


def _check_same_layout(a: FeatureStore, la: dict, b: FeatureStore, lb: dict) -> None:
    fix = "merge caches extracted with one encoder and the same settings"
    for m in MODALITIES:
        x, y = la.get(m), lb.get(m)
        if (x is None) != (y is None):
            has = lambda d: [k for k in MODALITIES if d.get(k) is not None]  # noqa: E731
            raise _differs(a, b, "the modalities", has(la), has(lb), fix)
        if x is None:
            continue
        for key in ("width", "mask", "pooled") + (("length",) if m == "image" else ()):
            if canonical_json(x[key]) != canonical_json(y[key]):
                raise _differs(a, b, f"{m} {key}", x[key], y[key], fix)


# ------------------------------------------------------------------------------ rows


def _union(stores: list[FeatureStore]) -> list[tuple[tuple[str, int], list[tuple[int, int]]]]:
    """(guid, occurrence) -> where it is, as (input, row) pairs; first input's order, then new
    rows of each following input in its order."""
    where: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for i, s in enumerate(stores):
        seen: dict[str, int] = {}
        for r, g in enumerate(s.guid):
            g = str(g)
            k = seen.get(g, 0)
            seen[g] = k + 1
            where.setdefault((g, k), []).append((i, r))
    return list(where.items())


def _pick(stores: list[FeatureStore], where: list[tuple[int, int]]) -> tuple[int, int]:
    """The input row an output row is copied from: the first ok one, else the first."""
    return next(((i, r) for i, r in where if stores[i].status[r] == OK), where[0])


def _entry(s: FeatureStore, r: int) -> dict:
    if s.manifest:
        return s.manifest[r]
    return {"guid": str(s.guid[r]), "split": str(s.split[r]), "label": int(s.label[r])}


def _check_overlaps(
    stores: list[FeatureStore], rows: list[tuple[tuple[str, int], list[tuple[int, int]]]]
) -> None:
    with contextlib.ExitStack() as stack:  # each input opened once for all its shared rows
        files = [stack.enter_context(reading(s.path)) for s in stores]
        for (guid, _), where in rows:
            if len(where) > 1:
                _check_overlap(stores, files, guid, where)


def _check_overlap(
    stores: list[FeatureStore], files: list[h5py.File], guid: str, where: list[tuple[int, int]]
) -> None:
    """One guid found in several inputs: the same sample, with the same features where ok."""
    i0, r0 = where[0]
    a = stores[i0]
    for i, r in where[1:]:
        b = stores[i]
        ea, eb = _entry(a, r0), _entry(b, r)
        if canonical_json(ea) != canonical_json(eb):
            keys = [k for k in sorted(set(ea) | set(eb)) if ea.get(k) != eb.get(k)]
            raise MergeError(
                f"cannot merge {a.path} and {b.path}: sample {guid} differs between them "
                f"({', '.join(keys)}): they were not extracted from the same data; merge "
                "parts of one dataset, or extract again from the current data"
            )
    ok = [(i, r) for i, r in where if stores[i].status[r] == OK]
    if len(ok) > 1:
        _check_same_features(stores, files, guid, ok)


def _check_same_features(
    stores: list[FeatureStore], files: list[h5py.File], guid: str, ok: list[tuple[int, int]]
) -> None:
    (i0, r0), rest = ok[0], ok[1:]
    ref = _row_bytes(stores[i0], files[i0], r0)
    for i, r in rest:
        got = _row_bytes(stores[i], files[i], r)
        name = next((k for k in ref if not np.array_equal(ref[k], got.get(k))), None)
        if name is not None:
            raise MergeError(
                f"cannot merge {stores[i0].path} and {stores[i].path}: sample {guid} is in both "
                f"with different features ({name}); they were computed differently (other "
                "weights, device or batch plan) — extract them again the same way, or merge "
                "only one of them"
            )


def _row_bytes(s: FeatureStore, f: h5py.File, r: int) -> dict[str, np.ndarray]:
    """Every array of one row, text tokens and mask trimmed to the row's real tokens."""
    out: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        feats: TokenFeatures | None = getattr(s, m)
        if feats is None:
            continue
        for k, v in feats.pooled.items():
            out[f"{m}/{k}"] = v[r]
        if "tokens" in f[m]:
            tokens = read_rows(f[m]["tokens"], [r], s.path)[0]
            if "mask" in f[m]:
                mask = read_rows(f[m]["mask"], [r], s.path)[0]
                n = int(mask.sum())
                out[f"{m}/mask"], tokens = mask[:n], tokens[:n]
            out[f"{m}/tokens"] = tokens
    return out


# ------------------------------------------------------------------------------ writing


def _copy_modality(
    writer: CacheWriter,
    modality: str,
    stores: list[FeatureStore],
    layouts: list[dict],
    picks: list[tuple[int, int]],
) -> None:
    """Creates the modality in the output (text tokens as long as the longest input's) and
    copies each output row from its input row, BLOCK rows per read, input by input."""
    layout = layouts[0][modality]
    length = max(lay[modality]["length"] or 0 for lay in layouts)
    writer.create_modality(
        modality,
        tokens=None if layout["length"] is None else (length, layout["width"]),
        mask=layout["mask"],
        pooled={k: (d, how) for k, (d, how) in layout["pooled"].items()},
    )
    for i, s in enumerate(stores):
        mine = sorted((r, out) for out, (j, r) in enumerate(picks) if j == i)  # by input row
        if not mine:
            continue
        feats: TokenFeatures = getattr(s, modality)
        with reading(s.path) as f:
            g = f[modality]
            for start in range(0, len(mine), BLOCK):
                src = [r for r, _ in mine[start : start + BLOCK]]
                dest = np.asarray([o for _, o in mine[start : start + BLOCK]])
                writer.write(
                    modality,
                    dest,
                    TokenFeatures(
                        tokens=read_rows(g["tokens"], src, s.path) if "tokens" in g else None,
                        mask=read_rows(g["mask"], src, s.path) if "mask" in g else None,
                        pooled={k: v[src] for k, v in feats.pooled.items()},
                    ),
                )


def _errors(stores: list[FeatureStore], picks: list[tuple[int, int]]) -> list[tuple[str, str, str]]:
    """The error-log lines of each output row's guid, from the input it was copied from, in
    output order (each line once)."""
    by_input: list[dict[str, list[tuple[str, str, str]]]] = []
    for s in stores:
        lines: dict[str, list[tuple[str, str, str]]] = {}
        for e in s.errors:
            lines.setdefault(str(e[0]), []).append(tuple(str(x) for x in e))
        by_input.append(lines)
    out: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    for i, r in picks:
        for e in by_input[i].get(str(stores[i].guid[r]), []):
            if e not in seen:
                seen.add(e)
                out.append(e)
    return out


# ------------------------------------------------------------------------------ sources


def merge_sources(records: Sequence[dict | None]) -> dict | None:
    """The union of `sources` records (cache/sources.py): every file once, with the guids and
    index lines of every input. Files of an input recorded under another data root are keyed by
    their absolute path. None when no input recorded its sources."""
    records = [r for r in records if isinstance(r, dict) and isinstance(r.get("files"), dict)]
    if not records:
        return None
    root = str(records[0].get("root", ""))
    files: dict[str, dict] = {}
    for rec in records:
        other_root = str(rec.get("root", "")) != root
        for key, e in rec["files"].items():
            if other_root and not Path(key).is_absolute():
                key = str(Path(str(rec.get("root", ""))) / key)
            if key not in files:
                files[key] = {k: list(v) if isinstance(v, list) else v for k, v in e.items()}
                continue
            have = files[key]
            guids = have.setdefault("guids", []) if "guids" in e else None
            if guids is not None:
                guids += [g for g in e["guids"] if g not in set(guids)]
            if "lines" in e:
                lines = have.setdefault("lines", [])
                known = {canonical_json(x) for x in lines}
                lines += [x for x in e["lines"] if canonical_json(x) not in known]
            if "other_lines" in e:  # lines no input's samples came from: in every input's list
                mine = list(have.get("other_lines", []))
                keep = []
                for sha in e["other_lines"]:
                    if sha in mine:
                        mine.remove(sha)
                        keep.append(sha)
                have["other_lines"] = sorted(keep)
    return {"version": records[0].get("version", 1), "root": root, "files": files}


def _short(v, n: int = 60) -> str:
    s = canonical_json(decode_attr(v)) if not isinstance(v, str) else v
    return s if len(s) <= n else s[: n - 3] + "..."


__all__ = ["DATA_KEYS", "MergeError", "MergeReport", "merge_caches", "merge_sources"]
