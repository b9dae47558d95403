"""The caches of a grid, each loaded once, on the rows usable in every one of them; what a
run trained on (digests config.yaml records); and which cells read byte-identical inputs.

`load_bank` opens every cache file the cells read ONCE and keeps only the rows usable in
EVERY loaded cache, so each cell is fitted and scored on the same rows, hence the same folds.
A cell here is anything with `modalities`, `encoder(modality)`, `text`, `image` and a resolved
`config` (fuse.grid.Cell).

Byte-identical inputs (`input_identity`): two cells whose head reads arrays with equal sha256
digests (recorded in each cache at extraction, cache/integrity.py) over the same rows get the
same features, so one fit serves both (fuse.experiment). Two caches of one text model that
differ only in pooling (minilm, minilm-cls) store identical token arrays: a token head on
either is one fit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from fusebench.fuse._util import few
from fusebench.fuse.features import (
    MODALITIES,
    Excluded,
    FeatureSet,
    Modality,
    cache_path,
    check_one_dataset,
    check_rows_agree,
    load_feature_set,
)
from fusebench.fuse.streaming import plan_for

# ---------------------------------------------------------------- what a run trained on


def trained_rows(fs: FeatureSet, excluded: Iterable[str] = ()) -> np.ndarray:
    """The rows a run fits and scores: labelled rows of split "train" (minus guids in
    `excluded`: rows the run left out because another cache of its grid had none)."""
    rows = (fs.split == "train") & (fs.label >= 0)
    if excluded := set(excluded):
        rows &= np.fromiter((g not in excluded for g in fs.guid.tolist()), bool, len(fs))
    return np.flatnonzero(rows)


def rows_digest(fs: FeatureSet, rows: np.ndarray) -> str:
    """sha256 of the guids and class names of `rows`, in order: which rows a run fitted and
    scored (config.yaml rows.digest). Equal digests and protocols mean equal folds."""
    pairs = [[str(g), fs.classes[int(y)]] for g, y in zip(fs.guid[rows], fs.label[rows])]
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def pooled_digest(modality: Modality, rows: np.ndarray) -> str:
    """sha256 of the pooled vectors of `rows`: whether a cache still holds the features a run
    was trained on (a refreshed cache keeps every unchanged row's bytes)."""
    return hashlib.sha256(np.ascontiguousarray(modality.pooled(rows)).tobytes()).hexdigest()


# ---------------------------------------------------------------- caches: each loaded once


@dataclass
class FeatureBank:
    """Every cache of a grid, loaded once, on the rows usable in all of them.

    base: the shared rows (guid, split, label; no modality); cell_set(cell) adds the cell's
    text and image features without copying them."""

    base: FeatureSet
    modalities: dict[tuple[str, str], Modality]  # (modality, encoder) -> features
    sources: dict[tuple[str, str], dict]  # (modality, encoder) -> {encoder, path, fingerprint}
    caches: dict[str, dict]  # encoder -> {path, fingerprint, modalities}

    def cell_set(self, cell: Any) -> FeatureSet:
        pick = {m: (m, cell.encoder(m)) for m in cell.modalities}
        return replace(
            self.base,
            text=self.modalities.get(pick["text"]) if "text" in pick else None,
            image=self.modalities.get(pick["image"]) if "image" in pick else None,
            sources={m: self.sources[k] for m, k in pick.items()},
        )


def load_bank(
    features: str | Path,
    cells: Sequence[Any],
    *,
    allow_stale: bool,
    memory_budget: str | int | None = None,
) -> FeatureBank:
    """Opens each cache the cells read once (tokens only for modalities some cell's head
    reads as tokens) and keeps the rows usable in every one of them. Token arrays that do
    not fit memory_budget (None: half the available RAM) stream from their files through one
    block cache (fuse/streaming.py), decided once for all the caches."""
    wanted: dict[str, set[str]] = {}  # encoder -> modalities read from it
    tokens: dict[str, set[str]] = {}
    for cell in cells:
        needs = cell.config.tokens
        for m in cell.modalities:
            wanted.setdefault(cell.encoder(m), set()).add(m)
            if needs:
                tokens.setdefault(cell.encoder(m), set()).add(m)
    order = sorted(wanted, key=lambda e: ("text" not in wanted[e], list(wanted).index(e)))
    streamed, block_cache = _stream_plan(features, wanted, tokens, memory_budget)
    sets = {
        enc: load_feature_set(
            features,
            text=enc if "text" in wanted[enc] else None,
            image=enc if "image" in wanted[enc] else None,
            tokens=tokens.get(enc, set()),
            allow_stale=allow_stale,
            stream={m for e, m in streamed if e == enc},
            block_cache=block_cache,
        )
        for enc in order
    }
    base, rows = join_sets(sets)
    mods, sources = {}, {}
    for enc, fs in sets.items():
        for m in wanted[enc]:
            mods[(m, enc)] = fs.modality(m).take(rows[enc])
            sources[(m, enc)] = fs.sources[m]
    caches = {
        enc: {
            "path": fs.sources[next(iter(fs.sources))]["path"],
            "fingerprint": fs.sources[next(iter(fs.sources))]["fingerprint"],
            "modalities": [m for m in MODALITIES if m in wanted[enc]],
        }
        for enc, fs in sets.items()
    }
    return FeatureBank(base, mods, sources, caches)


def _stream_plan(
    features: str | Path,
    wanted: dict[str, set[str]],
    tokens: dict[str, set[str]],
    memory_budget: str | int | None,
):
    """plan_for over every (encoder, modality) of the bank; nothing to plan without caches
    (load_feature_set then names what is missing)."""
    pairs = [(enc, m) for enc, mods in wanted.items() for m in sorted(mods)]
    if not Path(features).is_dir() or not all(
        cache_path(Path(features), e).is_file() for e, _ in pairs
    ):
        return set(), None
    return plan_for(Path(features), pairs, tokens, memory_budget)


def join_sets(sets: dict[str, FeatureSet]) -> tuple[FeatureSet, dict[str, np.ndarray]]:
    """The rows of the first set whose guid is usable in every set, in the first set's order;
    and, per set, the positions of those rows in it. Sets that are not of one dataset (other
    classes, guids, splits or labels) are refused."""
    (ref_enc, ref), *others = sets.items()
    keep = np.ones(len(ref), dtype=bool)
    positions = {ref_enc: np.arange(len(ref))}
    why: dict[int, str] = {}  # row of ref -> why it is left out
    for enc, fs in others:
        rows = _same_dataset(ref, fs)
        reasons = {}
        for e in fs.excluded:
            reasons.setdefault(e.guid, e.reason)
        for i in np.flatnonzero(keep & (rows < 0)).tolist():
            why[i] = reasons.get(ref.guid[i], f"not usable in {_file(fs)}")
        keep &= rows >= 0
        positions[enc] = rows
    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        raise ValueError(
            f"no row is usable in every cache ({', '.join(_file(fs) for fs in sets.values())}); "
            "see `fusebench cache info FILE` and extract again"
        )
    excluded = (
        *ref.excluded,
        *(Excluded(str(ref.guid[i]), str(ref.split[i]), why[i]) for i in sorted(why)),
    )
    stale = {k: v for fs in sets.values() for k, v in fs.stale.items()}
    base = replace(
        ref.take(kept), text=None, image=None, excluded=excluded, sources={}, stale=stale
    )
    return base, {enc: pos[kept] for enc, pos in positions.items()}


def _file(fs: FeatureSet) -> str:
    return Path(next(iter(fs.sources.values()))["path"]).name


def _same_dataset(ref: FeatureSet, other: FeatureSet) -> np.ndarray:
    """(len(ref),) the row of `other` with each ref row's guid (-1: none usable); refuses
    caches of different datasets, as fuse.features does for a text and an image file."""
    check_one_dataset(
        _file(ref), ref.classes, ref.all_guid, _file(other), other.classes, other.all_guid
    )
    pos = {g: i for i, g in enumerate(other.guid.tolist())}
    rows = np.fromiter((pos.get(g, -1) for g in ref.guid.tolist()), np.int64, len(ref))
    both = np.flatnonzero(rows >= 0)
    check_rows_agree(_file(ref), ref, _file(other), other, rows, both)
    return rows


def describe_common_rows(bank: FeatureBank, cells: Sequence[Any]) -> str | None:
    """A note when some cell reads fewer caches than the grid loaded: it is still fitted and
    scored only on the rows usable in every cache, so that all cells share the same folds."""
    if all(len(set(filter(None, (c.text, c.image)))) == len(bank.caches) for c in cells):
        return None
    base = bank.base
    labelled = int(((base.split == "train") & (base.label >= 0)).sum())
    return (
        f"every cell is fitted and scored on the {labelled} labelled rows usable in all "
        f"{len(bank.caches)} caches ({few(list(bank.caches), 8)}), so all cells share the same folds"
    )


# ---------------------------------------------------------------- byte-identical inputs


def input_identity(fs: FeatureSet, modalities: Sequence[str], tokens: bool) -> tuple | None:
    """What a head reading `modalities` of fs (tokens and masks, or else pooled vectors)
    gets, as digests: per modality, the recorded sha256 of each array it reads, its shape and
    dtype, and digests of the rows it takes from it (and, for tokens, of their file blocks,
    which order training). Equal identities mean byte-identical
    inputs. None when a cache recorded no digest for one of them (written before digests):
    such a cell shares no fit."""
    out = []
    for m in modalities:
        mod = fs.modality(m)
        if mod is None:
            continue
        arrays = {"tokens": mod.feats.tokens, "mask": mod.feats.mask} if tokens else {}
        arrays = arrays or {"pooled": mod.feats.pooled["pooled"]}
        for name, a in arrays.items():
            if a is None:  # image tokens without a mask: none on either side, or not equal
                out.append((m, name, None))
                continue
            if name not in mod.digests:
                return None
            out.append((m, name, mod.digests[name], tuple(a.shape), str(a.dtype)))
        out.append((m, "rows", _sha(mod.index)))
        if tokens and mod.feats.tokens is not None:  # the block-aware training order
            out.append((m, "blocks", _sha(mod.blocks())))
    return tuple(out)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()
