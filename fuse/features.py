"""Stage two's view of the cache: a text group and an image group joined by guid.

`load_feature_set` opens each cache file once; a `FeatureSet` then hands out row subsets
(folds, batches) as index arrays into those arrays, so no fold copies the tokens. Token arrays
that do not fit the memory budget stay in the file and are read in row blocks on demand
(fuse/streaming.py, cache/lazy.py); everything else is in RAM.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from fusebench.cache import OK, FeatureStore, TokenFeatures
from fusebench.cache.lazy import BlockCache, LazyRows, rows_per_block
from fusebench.cache.naming import cache_file
from fusebench.fuse._util import few, note
from fusebench.fuse.streaming import plan_for

MODALITIES = ("text", "image")


class FeatureMismatchError(ValueError):
    """Two caches that cannot be joined: their guids, splits, labels or classes disagree."""


@dataclass(frozen=True)
class Modality:
    """One modality's features for the rows of a FeatureSet.

    feats holds every row of the cache file (as read; tokens may be a LazyRows streaming from
    the file); index maps this set's rows onto it, so taking a subset copies nothing until a
    batch is gathered. held: device copies of feats (fuse/streaming.py `resident`), shared by
    every subset taken of this Modality, so they are made once.
    """

    name: str  # "text" | "image"
    encoder: str  # cache file stem, e.g. "clip"
    path: Path
    feats: TokenFeatures
    index: np.ndarray  # (n,) int64 rows of feats
    tokens_requested: bool = (
        True  # False: tokens were not loaded (whether or not the file has them)
    )
    held: dict = field(default_factory=dict, compare=False, repr=False)
    # "pooled" / "tokens" / "mask" -> sha256 the cache recorded for that whole array: equal
    # digests (and index) mean byte-identical inputs ({}: a cache older than its digests)
    digests: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def streamed(self) -> bool:
        """Whether the tokens are read from the file on demand (over the memory budget)."""
        return isinstance(self.feats.tokens, LazyRows)

    @property
    def token_row_bytes(self) -> int:
        """Bytes of one row of the token array (0 without tokens)."""
        tokens = self.feats.tokens
        if tokens is None:
            return 0
        return int(np.prod(tokens.shape[1:], dtype=np.int64)) * np.dtype(tokens.dtype).itemsize

    def blocks(self, rows: np.ndarray | None = None) -> np.ndarray | None:
        """(b,) the block of cache rows each row's tokens lie in: the file blocks a streamed
        array is read by (cache/lazy.py), and the same grouping when the tokens are in RAM,
        so training draws one order whatever the memory budget (and gives the same numbers).
        None without tokens."""
        tokens = self.feats.tokens
        if tokens is None:
            return None
        if self.streamed:
            return tokens.block_of(self._rows(rows))
        per = min(rows_per_block(self.token_row_bytes), max(1, len(tokens)))  # token chunk: 1 row
        return self._rows(rows) // per

    def batch_length(self, idx: np.ndarray) -> int | None:
        """Tokens a batch of cache rows `idx` keeps: up to its longest row (None: no mask)."""
        if self.feats.mask is None:
            return None
        used = np.flatnonzero(self.feats.mask[idx].any(axis=0))
        return int(used[-1]) + 1 if used.size else 1

    @property
    def has_tokens(self) -> bool:
        return self.feats.tokens is not None

    @property
    def pooled_dim(self) -> int:
        return int(self.feats.pooled["pooled"].shape[1])

    @property
    def token_dim(self) -> int | None:
        return None if self.feats.tokens is None else int(self.feats.tokens.shape[2])

    def _rows(self, rows: np.ndarray | None) -> np.ndarray:
        return self.index if rows is None else self.index[rows]

    def pooled(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(b, D') float16: the main pooled vector of the given rows (all rows when None)."""
        return self.feats.pooled["pooled"][self._rows(rows)]

    def tokens(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(b, L, D) float16 tokens and (b, L) bool mask (None = every token is real).

        Padding beyond the longest row of the batch is cut off: a batch of short tweets does
        not pay for the cache's Lmax."""
        if self.feats.tokens is None:
            raise ValueError(
                f"{self.path} stores no {self.name} tokens (pooled only); "
                "pick a pooled head or extract again with tokens"
            )
        idx = self._rows(rows)
        length = self.batch_length(idx)
        if length is None:
            return self.feats.tokens[idx], None
        return self.feats.tokens[idx, :length], self.feats.mask[idx, :length]  # (b, l, D), (b, l)

    def lengths(self, rows: np.ndarray | None = None) -> np.ndarray | None:
        """(b,) real tokens per row; None when every row has all L tokens (no mask)."""
        if self.feats.mask is None:
            return None
        return self.feats.mask[self._rows(rows)].sum(axis=1)

    def take(self, rows: np.ndarray) -> Modality:
        return replace(self, index=self.index[rows])


@dataclass(frozen=True)
class Excluded:
    """A cache row left out of the FeatureSet, and why."""

    guid: str
    split: str
    reason: str


@dataclass(frozen=True)
class FeatureSet:
    """Rows that have every requested feature, in the cache's row order.

    guid, split: (n,) str; label: (n,) int64 (-1 = no label). text / image: None when the set
    is unimodal. excluded: rows of the cache that were left out (failed extraction, empty or
    duplicate guid, inf/NaN features), each with its reason.
    """

    guid: np.ndarray
    split: np.ndarray
    label: np.ndarray
    classes: tuple[str, ...]
    text: Modality | None
    image: Modality | None
    excluded: tuple[Excluded, ...] = ()
    sources: dict = field(default_factory=dict)  # modality -> {path, encoder, fingerprint}
    all_guid: np.ndarray = field(default=None, repr=False)  # (N,) every cache row, in order
    all_split: np.ndarray = field(default=None, repr=False)
    stale: dict[str, list[str]] = field(default_factory=dict)  # cache file -> what changed

    def __len__(self) -> int:
        return len(self.guid)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def modality(self, name: str) -> Modality | None:
        return {"text": self.text, "image": self.image}[name]

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities present, in canonical order."""
        return tuple(m for m in MODALITIES if self.modality(m) is not None)

    def take(self, rows: np.ndarray) -> FeatureSet:
        """The subset at positions `rows` (indices into this set), sharing the arrays."""
        rows = np.asarray(rows, dtype=np.int64)
        return replace(
            self,
            guid=self.guid[rows],
            split=self.split[rows],
            label=self.label[rows],
            text=None if self.text is None else self.text.take(rows),
            image=None if self.image is None else self.image.take(rows),
        )

    def rows_of_split(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def cache_order(self, split: str) -> np.ndarray:
        """Guids of `split` in the cache's order, INCLUDING excluded rows (for predictions);
        a guid the cache holds twice is listed once, an empty guid not at all."""
        guids = self.all_guid[self.all_split == split]
        return np.array(list(dict.fromkeys(g for g in guids if str(g).strip())), dtype=object)

    def describe_excluded(self) -> str | None:
        """One line: how many rows were left out, and why; None when none were."""
        if not self.excluded:
            return None
        by_reason = Counter(e.reason.split(" (")[0] for e in self.excluded)
        reasons = "; ".join(f"{n} {r}" for r, n in by_reason.most_common())
        return (
            f"left out {len(self.excluded)} of {len(self.all_guid)} cache rows without usable "
            f"features ({reasons}): {few([e.guid for e in self.excluded])}"
        )


def check_inputs(
    fs: FeatureSet, *, head: str, modalities: tuple[str, ...], require: str, tokens: bool
) -> tuple[str, ...]:
    """The modalities `head` will read from fs; a ValueError that names the fix when fs lacks
    them. require: "all" (every one of `modalities`) or "any" (whichever are present)."""
    present = tuple(m for m in modalities if fs.modality(m) is not None)
    missing = [m for m in modalities if m not in present]
    if require == "all" and missing:
        raise ValueError(
            f"head '{head}' needs {' and '.join(modalities)} features, but none for "
            f"{missing[0]} were given; pass --{missing[0]} ENCODER"
        )
    if not present:
        raise ValueError(
            f"head '{head}' needs {' or '.join(modalities)} features; pass --text or --image"
        )
    if tokens:
        for m in present:
            mod = fs.modality(m)
            if mod.has_tokens:
                continue
            if not mod.tokens_requested:
                raise ValueError(
                    f"head '{head}' needs {m} tokens, but the feature set was loaded without them; "
                    "load it with tokens=True"
                )
            raise ValueError(
                f"head '{head}' needs {m} tokens, but {mod.path} stores pooled {m} features only; "
                "pick a pooled head (concat_mlp, late, gated, clip_match, ...) or extract with tokens"
            )
    return present


def cache_path(features_dir: Path, encoder: str) -> Path:
    """<features_dir>/<encoder>.h5 by cache.naming's rule, the one `extract` writes by
    (hf:org/name -> hf-org--name.h5)."""
    return cache_file(features_dir, encoder)


def load_feature_set(
    features_dir: str | Path,
    *,
    text: str | None = "minilm",
    image: str | None = "vit",
    tokens: bool | Iterable[str] = False,
    allow_stale: bool = False,
    memory_budget: str | int | None = None,
    stream: Iterable[str] | None = None,
    block_cache: BlockCache | None = None,
) -> FeatureSet:
    """Joins the text group of `<dir>/<text>.h5` and the image group of `<dir>/<image>.h5`.

    One file is opened once when text == image. tokens: load token arrays (True = for every
    modality, or an iterable of modality names); pooled vectors are always loaded.
    memory_budget (bytes or "1GB"; None: half the available RAM): token arrays that do not fit
    it are streamed from the file (fuse/streaming.py); stream: the modalities to stream,
    decided by the caller (fuse.grid.load_bank decides once for all its caches), sharing
    `block_cache`.

    Only usable rows join: status ok, a non-empty guid that no other usable row of the file
    shares, and finite features (no inf/NaN) in what is loaded. Every other row is left out
    and listed in `excluded` with its reason — a failed duplicate never blocks the join.
    Raises FeatureMismatchError when the two files disagree on guids, splits, labels or
    classes. Each cache is checked against the dataset it was extracted from
    (cache.ensure_fresh): a cache whose data changed since is refused (StaleCacheError),
    unless allow_stale, which loads it anyway and records what changed in `stale`.
    """
    features_dir = Path(features_dir)
    if text is None and image is None:
        raise ValueError("no features asked for: give --text, --image or both (not both none)")
    _check_features_dir(features_dir)
    want_tokens = set(MODALITIES) if tokens is True else set(tokens or ())
    wanted = {m: enc for m, enc in (("text", text), ("image", image)) if enc is not None}
    _check_caches_exist(features_dir, wanted)
    if stream is None:
        pairs = [(enc, m) for m, enc in wanted.items()]
        plan, block_cache = plan_for(features_dir, pairs, want_tokens, memory_budget)
        stream = {m for (_, m) in plan}
    stores, stale = {}, {}  # encoder -> store: each file read once
    for encoder in dict.fromkeys(wanted.values()):
        mods = [m for m, enc in wanted.items() if enc == encoder]
        stores[encoder], lines = _open_store(
            cache_path(features_dir, encoder),
            mods,
            want_tokens,
            set(stream),
            block_cache,
            allow_stale=allow_stale,
        )
        if lines:
            stale[cache_path(features_dir, encoder).name] = lines
    return _joined({m: stores[enc] for m, enc in wanted.items()}, wanted, want_tokens, stale)


def _joined(
    stores: dict[str, FeatureStore],
    wanted: dict[str, str],
    want_tokens: set[str],
    stale: dict[str, list[str]],
) -> FeatureSet:
    """The FeatureSet of the rows usable in every store (modality -> its store)."""
    ref, index, keep, reasons = _usable_rows(stores)
    return FeatureSet(
        guid=ref.guid[keep],
        split=ref.split[keep],
        label=ref.label[keep].astype(np.int64),
        classes=tuple(ref.classes),
        text=_modality(stores, wanted, "text", index, keep, want_tokens),
        image=_modality(stores, wanted, "image", index, keep, want_tokens),
        excluded=tuple(
            Excluded(str(ref.guid[i]), str(ref.split[i]), reasons[i]) for i in sorted(reasons)
        ),
        sources={
            m: {
                "encoder": enc,
                "path": str(stores[m].path.resolve()),
                "fingerprint": str(stores[m].attrs.get("fingerprint", "")),
            }
            for m, enc in wanted.items()
        },
        all_guid=ref.guid,
        all_split=ref.split,
        stale=stale,
    )


def _check_caches_exist(features_dir: Path, wanted: dict[str, str]) -> None:
    for encoder in dict.fromkeys(wanted.values()):
        path = cache_path(features_dir, encoder)
        if not path.is_file():
            have = sorted(p.stem for p in features_dir.glob("*.h5"))
            raise FileNotFoundError(
                f"no cache {path}; caches in {features_dir}: {', '.join(have) or 'none'} "
                f"(extract it with `fusebench extract --encoder {encoder}`)"
            )


def _open_store(
    path: Path,
    mods: list[str],
    want_tokens: set[str],
    stream: set[str],
    block_cache: BlockCache | None,
    *,
    allow_stale: bool,
) -> tuple[FeatureStore, list[str]]:
    """One cache file opened for the modalities `mods` (tokens only for those in
    want_tokens), checked fresh (or its changes, with allow_stale) and for labels."""
    store = FeatureStore.open(
        path,
        modalities=mods,
        tokens=bool(want_tokens & set(mods)),
        # a shared file's tokens of the other modality are dropped below: never read them
        stream=(stream & want_tokens & set(mods)) | (set(mods) - want_tokens),
        block_cache=block_cache,
    )
    lines = _freshness(store, allow_stale)
    for m in mods:
        if getattr(store, m) is None:
            present = [x for x in MODALITIES if _has_group(path, x)]
            raise ValueError(
                f"{path} has no {m} features (it has: {', '.join(present) or 'none'}); "
                f"pass an encoder that stores {m} as --{m}"
            )
        if m not in want_tokens:  # a shared file may have loaded tokens for the other one
            feats = getattr(store, m)
            setattr(store, m, TokenFeatures(None, None, feats.pooled, feats.pooling))
    _check_labels(store)
    return store, lines


def _usable_rows(
    stores: dict[str, FeatureStore],
) -> tuple[FeatureStore, dict[str, np.ndarray], np.ndarray, dict[int, str]]:
    """(ref, modality -> (N,) row of its store per ref row, the ref rows kept, ref row ->
    why it is left out). ref: the text store (else the image one); a row is kept when it is
    usable in every store, joined by guid."""
    ref = stores["text" if "text" in stores else "image"]
    in_ref = [m for m, store in stores.items() if store is ref]
    ok, reasons = _usable(ref, in_ref)
    index = {m: np.arange(len(ref), dtype=np.int64) for m in in_ref}
    for other_mod in [m for m in stores if m not in index]:
        other = stores[other_mod]
        other_ok, other_why = _usable(other, [other_mod])
        rows = _join(ref, other, ok, other_ok)  # (N,) row of other per row of ref; -1 = none usable
        index[other_mod] = rows
        first = {}  # guid -> first row of other, for the reason a guid has no usable row
        for i, g in enumerate(other.guid):
            first.setdefault(g, i)
        for i in np.flatnonzero(ok & (rows < 0)).tolist():
            reasons[i] = other_why.get(first[ref.guid[i]], f"{other_mod} not usable")
        ok = ok & (rows >= 0)
    keep = np.flatnonzero(ok)
    if len(keep) == 0:
        files = ", ".join(dict.fromkeys(str(s.path) for s in stores.values()))
        raise ValueError(
            f"none of the {len(ref)} rows of {files} has usable features "
            f"({_common_reason(reasons)}); see `fusebench cache info FILE` and extract again"
        )
    return ref, index, keep, reasons


def _modality(
    stores: dict[str, FeatureStore],
    wanted: dict[str, str],
    m: str,
    index: dict[str, np.ndarray],
    keep: np.ndarray,
    want_tokens: set[str],
) -> Modality | None:
    if m not in stores:
        return None
    store = stores[m]
    return Modality(
        name=m,
        encoder=wanted[m],
        path=store.path,
        feats=getattr(store, m),
        index=index[m][keep],
        tokens_requested=m in want_tokens,
        digests=_array_digests(store, m),
    )


def _array_digests(store: FeatureStore, m: str) -> dict[str, str]:
    """The sha256 the cache recorded for each array of modality m (cache/integrity.py), by
    name: "pooled", "tokens", "mask"; {} for a cache written before digests were recorded."""
    try:
        recorded = json.loads(store.attrs.get("digests") or "{}")
    except (TypeError, ValueError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    names = {"pooled": f"{m}/pooled", "tokens": f"{m}/tokens", "mask": f"{m}/mask"}
    return {k: str(recorded[v]) for k, v in names.items() if v in recorded}


def _check_features_dir(features_dir: Path) -> None:
    if features_dir.is_dir():
        return
    if features_dir.is_file():
        raise FileNotFoundError(
            f"--features {features_dir} is a file; pass the folder holding the caches "
            f"(--features {features_dir.parent} --text/--image {features_dir.stem})"
        )
    raise FileNotFoundError(
        f"features folder {features_dir} does not exist; create it with "
        "`fusebench extract --encoder NAME --data DIR --out features` "
        "and pass --features features/DATASET"
    )


def _freshness(store: FeatureStore, allow_stale: bool) -> list[str]:
    """[] when the cache matches its dataset (or the dataset is out of reach); with
    allow_stale, the changes found (noted), else StaleCacheError naming them."""
    from fusebench.cache import check_fresh, ensure_fresh

    if not allow_stale:
        ensure_fresh(store)
        return []
    lines = check_fresh(store)
    if lines:
        note(
            f"--allow-stale: using {store.path} although its data changed since extraction: "
            + few(lines, 3)
        )
    return lines


def _check_labels(store: FeatureStore) -> None:
    """A label outside -1..C-1 is damage (the classes attribute and the labels disagree)."""
    bad = np.flatnonzero((store.label < -1) | (store.label >= len(store.classes)))
    if bad.size:
        i = int(bad[0])
        raise FeatureMismatchError(
            f"{store.path}: guid {store.guid[i]} has label {int(store.label[i])} but the cache "
            f"has {len(store.classes)} classes ({', '.join(store.classes) or 'none'}), "
            f"and {bad.size - 1} more such rows; the file is damaged — extract it again"
        )


def _usable(store: FeatureStore, modalities: list[str]) -> tuple[np.ndarray, dict[int, str]]:
    """(N,) bool: rows of `store` a head may read, and row -> reason for every other row.

    Usable: status ok, a non-empty guid, finite loaded features of `modalities`, and no
    other such row with the same guid (then neither is usable: which one is right?)."""
    n = len(store)
    reasons: dict[int, str] = {}
    ok = store.status == OK
    for i, why in zip(
        np.flatnonzero(~ok).tolist(), _reasons(store, np.flatnonzero(~ok), modalities[0])
    ):
        reasons[i] = why
    empty = np.array([not str(g).strip() for g in store.guid], dtype=bool)
    for i in np.flatnonzero(ok & empty).tolist():
        reasons[i] = f"empty guid in {store.path.name} (row {i})"
    ok &= ~empty
    for m in modalities:
        finite = _finite_rows(getattr(store, m), n)
        for i in np.flatnonzero(ok & ~finite).tolist():
            reasons[i] = f"{m} features not finite (inf/NaN) in {store.path.name}"
        ok &= finite
    uniq, inverse, counts = np.unique(store.guid[ok], return_inverse=True, return_counts=True)
    dup_rows = np.flatnonzero(ok)[counts[inverse] > 1]
    for i in dup_rows.tolist():
        reasons[i] = (
            f"duplicate guid in {store.path.name} "
            f"({int(counts[np.searchsorted(uniq, store.guid[i])])} usable rows share it)"
        )
    ok[dup_rows] = False
    return ok, reasons


def _finite_rows(feats: TokenFeatures, n: int, block_bytes: int = 32 << 20) -> np.ndarray:
    """(n,) bool: rows whose loaded features (main pooled vector, tokens) are all finite.
    Tokens are checked in row blocks of about block_bytes (streamed ones: in their own file
    blocks), so the check never holds a copy of them all."""
    finite = np.isfinite(feats.pooled["pooled"]).all(axis=1)
    if feats.tokens is not None:
        row = max(1, int(np.prod(feats.tokens.shape[1:])) * feats.tokens.dtype.itemsize)
        block = max(1, block_bytes // row)
        if isinstance(feats.tokens, LazyRows):
            block = max(1, block // feats.tokens.block_rows) * feats.tokens.block_rows
        for start in range(0, n, block):
            chunk = feats.tokens[start : start + block]
            finite[start : start + block] &= np.isfinite(chunk).reshape(len(chunk), -1).all(1)
    return finite


def _common_reason(reasons: dict[int, str]) -> str:
    if not reasons:
        return "no rows"
    (reason, count), *_ = Counter(r.split(" (")[0] for r in reasons.values()).most_common(1)
    return f"{count} x {reason}"


def check_one_dataset(
    a: str, a_classes: Sequence[str], a_guid: np.ndarray,
    b: str, b_classes: Sequence[str], b_guid: np.ndarray,
) -> None:  # fmt: skip
    """Refuses two caches (named a and b) that are not of one dataset: other classes, or a
    guid that one of them lacks."""
    if list(a_classes) != list(b_classes):
        raise FeatureMismatchError(
            f"{a} and {b} disagree on classes ({', '.join(a_classes)} vs "
            f"{', '.join(b_classes)}); extract both from the same dataset"
        )
    mine, theirs = set(a_guid.tolist()), set(b_guid.tolist())
    for g, x, y in ((sorted(mine - theirs), a, b), (sorted(theirs - mine), b, a)):
        if g:
            more = f" (and {len(g) - 1} more)" if len(g) > 1 else ""
            raise FeatureMismatchError(
                f"guid {g[0]} is in {x} but not in {y}{more}; extract both from the same dataset"
            )


def check_rows_agree(
    a: str, ref: Any, b: str, other: Any, rows: np.ndarray, both: np.ndarray
) -> None:
    """Refuses two caches whose rows `both` of ref (matched to `rows` of other by guid) disagree
    on split or label. ref / other: anything with guid, split and label arrays."""
    for what in ("split", "label"):
        left, right = getattr(ref, what)[both], getattr(other, what)[rows[both]]
        diff = np.flatnonzero(left != right)
        if diff.size:
            i = int(both[diff[0]])
            raise FeatureMismatchError(
                f"{a} and {b} disagree on the {what} of guid {ref.guid[i]} "
                f"({left[diff[0]]} vs {right[diff[0]]}) and {diff.size - 1} more; "
                "extract both from the same dataset"
            )


def _join(
    ref: FeatureStore, other: FeatureStore, ref_ok: np.ndarray, other_ok: np.ndarray
) -> np.ndarray:
    """(N,) the usable row of `other` for each row of `ref` with the same guid (-1 when it has
    none). Refuses files that are not of one dataset: other classes, guids one file lacks,
    or another split or label for a guid usable in both."""
    a, b = ref.path.name, other.path.name
    check_one_dataset(a, ref.classes, ref.guid, b, other.classes, other.guid)
    pos = {other.guid[i]: i for i in np.flatnonzero(other_ok).tolist()}
    rows = np.fromiter((pos.get(g, -1) for g in ref.guid), dtype=np.int64, count=len(ref))
    both = np.flatnonzero(ref_ok & (rows >= 0))
    check_rows_agree(a, ref, b, other, rows, both)
    return rows


def _reasons(store: FeatureStore, rows: np.ndarray, modality: str) -> list[str]:
    """Why each of `rows` has no usable features: status, file and the logged error if any."""
    logged: dict[str, str] = {}
    for guid, stage, msg in store.errors:
        logged.setdefault(guid, f" ({stage}: {msg})")
    out = []
    for row in rows:
        state = {0: "never extracted", 2: "failed"}.get(int(store.status[row]), "bad status")
        out.append(f"{modality} {state} in {store.path.name}{logged.get(store.guid[row], '')}")
    return out


def _has_group(path: Path, name: str) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        return name in f
