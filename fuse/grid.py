"""The grid of an experiment: which cells run, with which settings, on which rows.

A cell is (text encoder, image encoder, head, variant). Its id is what it READS:
    f"{text or 'none'}+{image or 'none'}/{head}" + (f"@{variant}" if variant else "")
so text_only on (minilm, vit) and on (minilm, none) are one cell, `minilm+none/text_only`, run
once. A variant is one assignment of the --sweep values of that head ("dim=128",
"dim=128,train.lr=3e-4"); "" means the head's YAML plus --set.

--set / --sweep syntax (also in `fusebench compare --help`):
    --set HEAD.KEY=VALUE        one head's hyperparameter (KEY may be nested: train.lr)
    --set KEY=VALUE             every head of the grid whose YAML has KEY (fuse: its one head)
    --sweep HEAD.KEY=V1,V2,...  one cell per value (several --sweep of a head: every combination)
    --sweep KEY=V1,V2           the same, for every head whose YAML has KEY
A --sweep value wins over a --set of the same key. Values are YAML scalars (128, 3e-4, true).

Settings come from the command line, from a run's config.yaml (`--config`, replay), or the
command's defaults, in that order of precedence (`resolve_settings`).

Caches: `load_bank` opens every cache file of the grid ONCE and keeps only the rows usable in
EVERY loaded cache, so each cell is fitted and scored on the same rows, hence the same folds.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from fusebench.fuse._util import check_device, deep_merge, few, note
from fusebench.fuse.bank import (  # noqa: F401  (load_bank, FeatureBank: also imported from here)
    FeatureBank,
    input_identity,
    load_bank,
)
from fusebench.fuse.features import MODALITIES, FeatureSet
from fusebench.fuse.protocol import StratifiedProtocol
from fusebench.fuse.registry import (
    HeadConfig,
    get_head,
    list_heads,
    resolve_head,
    resolve_params,
)
from fusebench.fuse.search_space import tune_settings

NONE = "none"  # how an absent encoder is written: --image none, cell ids, config.yaml lists


# ---------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One (text, image, head, variant) of the grid; text / image are what the head reads.

    Resolved once, then only run: `config` is the head resolved (its class, hyperparameters
    from its YAML, --set and the variant's --sweep values, and the run-wide options), given by
    GridSpec.cells() or resolved here from head + overrides; `features` the cell's rows of the
    run's caches (FeatureBank.cell_set), set once the caches are loaded (fuse.experiment)."""

    text: str | None
    image: str | None
    head: str
    variant: str = ""
    overrides: dict = field(default_factory=dict, compare=False, hash=False)
    config: HeadConfig = field(default=None, compare=False, hash=False, repr=False)
    features: FeatureSet | None = field(default=None, compare=False, hash=False, repr=False)
    tuned: int = 0  # > 0: nested-tuned with this many trials per study (fuse.tune)

    def __post_init__(self) -> None:
        if self.config is None:
            object.__setattr__(self, "config", resolve_head(self.head, self.overrides))

    @property
    def id(self) -> str:
        pair = f"{self.text or NONE}+{self.image or NONE}/{self.head}"
        if (
            self.tuned
        ):  # variant "[SWEEP, ]tuned, N trials" (fuse.tune) -> "...@SWEEP (tuned, N trials)"
            mark = f"tuned, {self.tuned} trials"
            base = self.variant.removesuffix(mark).rstrip(", ")
            return pair + (f"@{base}" if base else "") + f" ({mark})"
        return pair + (f"@{self.variant}" if self.variant else "")

    @property
    def slug(self) -> str:
        return cell_slug(self.id)

    def encoder(self, modality: str) -> str | None:
        return {"text": self.text, "image": self.image}[modality]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if self.encoder(m) is not None)

    def fit_key(self) -> tuple | None:
        """What one fit of this cell depends on besides seed and fold: its head's resolved
        config and the digests of what it reads (fuse.bank.input_identity). Cells with equal
        keys are one fit; None (features not loaded, or no digests recorded): its own."""
        if self.features is None:
            return None
        reads = input_identity(self.features, self.config.modalities, self.config.tokens)
        if reads is None:
            return None
        params = self.config.prototype.get_config()["params"]
        return (self.head, json.dumps(params, sort_keys=True, default=str), reads)


def shared_fits(cells: Sequence[Cell]) -> list[list[Cell]]:
    """The cells grouped by fit: cells whose fit_key is equal (byte-identical inputs, one head
    and config) are one group, fitted once and reported under each id; in grid order."""
    groups: dict[Any, list[Cell]] = {}
    for cell in cells:
        key = cell.fit_key()
        groups.setdefault(cell.id if key is None else key, []).append(cell)
    return list(groups.values())


def cell_slug(cell_id: str) -> str:
    """A cell's folder name: every character outside [A-Za-z0-9_.=-] becomes "_"."""
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", cell_id)


def reads(head: str, text: str | None, image: str | None) -> tuple[str | None, str | None]:
    """The encoders head `head` reads from the pair: text_only ignores the image encoder."""
    mods = get_head(head).modalities
    return (text if "text" in mods else None, image if "image" in mods else None)


def cannot_run(head: str, text: str | None, image: str | None) -> str | None:
    """Why `head` cannot run on the pair it reads (None when it can), in the words of
    fuse.features.check_inputs."""
    cls = get_head(head)
    present = [m for m, e in (("text", text), ("image", image)) if e is not None]
    missing = [m for m in cls.modalities if m not in present]
    if cls.require == "all" and missing:
        return (
            f"head '{head}' needs {' and '.join(cls.modalities)} features, but none for "
            f"{missing[0]} were given; pass --{missing[0]} ENCODER"
        )
    if not present:
        return f"head '{head}' needs {' or '.join(cls.modalities)} features; pass --text or --image"
    return None


# ---------------------------------------------------------------- --set / --sweep


@dataclass(frozen=True)
class Assignment:
    """HEAD.KEY=VALUE(S) from --set / --sweep or a config.yaml; head None = every head with KEY."""

    head: str | None
    path: tuple[str, ...]  # ("dim",) or ("train", "lr")
    value: Any  # a value (--set) or a list of values (--sweep)
    flag: str = "--set"  # where it came from, for messages
    text: str = ""  # as the user wrote it

    @property
    def key(self) -> str:
        return ".".join(self.path)


def parse_assignment(pair: str, flag: str = "--set") -> Assignment:
    """'cross_attn.dim=128' / 'train.lr=3e-4' (--set) or 'cross_attn.dim=128,256' (--sweep)."""
    example = "cross_attn.dim=128 or train.lr=3e-4" + (",1e-3" if flag == "--sweep" else "")
    key, sep, raw = pair.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts) or (flag == "--sweep" and not raw.strip()):
        raise ValueError(f"{flag} wants [HEAD.]KEY=VALUE (e.g. {example}), got {pair!r}")
    head = parts[0] if parts[0] in list_heads() else None
    path = tuple(parts[1:] if head else parts)
    if not path:
        raise ValueError(f"{flag} {pair!r} names head '{head}' but no key; e.g. {example}")
    if flag == "--sweep":
        values = [_scalar(v, pair, flag) for v in raw.split(",") if v.strip()]
        return Assignment(head, path, list(dict.fromkeys(values)), flag, pair)
    return Assignment(head, path, _scalar(raw, pair, flag), flag, pair)


def _scalar(raw: str, pair: str, flag: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ValueError(
            f"{flag} {pair!r}: {raw!r} is not a value (a number, true/false, or text)"
        ) from None


def _has_key(params: dict, path: Sequence[str]) -> bool:
    node: Any = params
    for p in path[:-1]:
        node = node.get(p) if isinstance(node, dict) else None
    return isinstance(node, dict) and path[-1] in node


def targets(a: Assignment, heads: Sequence[str], *, strict: bool = True) -> list[str]:
    """The heads of the grid `a` applies to. A prefixed head outside the grid is an error
    (strict, the user's flag) or nothing (a replayed config's entry for a dropped head)."""
    if a.head is not None:
        if a.head in heads:
            return [a.head]
        if strict:
            raise ValueError(
                f"{a.flag} {a.text or a.key!r} is for head '{a.head}', which is not in this run "
                f"(heads: {', '.join(heads)})"
            )
        return []
    if len(heads) == 1:  # fuse: the one head, whose own check names a bad key
        return list(heads)
    hit = [h for h in heads if _has_key(resolve_params(h), a.path)]
    if not hit and strict:
        raise ValueError(
            f"{a.flag} {a.text or a.key!r}: no head of this run has '{a.key}' "
            f"(heads: {', '.join(heads)}); prefix the head, e.g. {heads[0]}.{a.key}=..."
        )
    return hit


def nest(path: Sequence[str], value: Any) -> dict:
    """("train", "lr"), 3e-4 -> {"train": {"lr": 3e-4}}."""
    out: Any = value
    for p in reversed(path):
        out = {p: out}
    return out


def resolve_set(assignments: Iterable[Assignment], heads: Sequence[str]) -> dict[str, dict]:
    """head -> nested overrides; later assignments win."""
    out: dict[str, dict] = {}
    for a in assignments:
        for h in targets(a, heads, strict=a.flag == "--set"):
            current = out.get(h, {})
            node = current
            for p in a.path[:-1]:  # `--set train=5 --set train.lr=1` must not nest into 5
                if p in node and not isinstance(node[p], dict):
                    raise ValueError(f"--set {a.text!r}: {p} was already set to a value")
                node = node.get(p, {})
            out[h] = deep_merge(current, nest(a.path, a.value))
    return out


def resolve_sweep(assignments: Iterable[Assignment], heads: Sequence[str]) -> dict[str, list]:
    """{"head.key": values}, in the order given; a later sweep of the same key replaces it."""
    out: dict[str, list] = {}
    for a in assignments:
        if not a.value:
            raise ValueError(f"--sweep {a.text or a.key!r} gives no values")
        for h in targets(a, heads, strict=a.flag == "--sweep"):
            out[f"{h}.{a.key}"] = list(a.value)
    return out


def fmt_value(v: Any) -> str:
    """A sweep value as it appears in a variant name: 128, 0.001, 3e-4, true."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


def variants(head: str, sweep: dict[str, list]) -> list[tuple[str, dict]]:
    """(variant name, nested overrides) for every combination of `head`'s sweeps; [("", {})]
    when it has none."""
    mine = [(k.split(".", 1)[1], vals) for k, vals in sweep.items() if k.split(".", 1)[0] == head]
    if not mine:
        return [("", {})]
    out = []
    for combo in itertools.product(*(vals for _, vals in mine)):
        name = ",".join(f"{key}={fmt_value(v)}" for (key, _), v in zip(mine, combo))
        over: dict = {}
        for (key, _), v in zip(mine, combo):
            over = deep_merge(over, nest(key.split("."), v))
        out.append((name, over))
    return out


# ---------------------------------------------------------------- settings (and replay)


@dataclass(frozen=True)
class GridSpec:
    """The resolved settings of a `fuse` or `compare` run: what config.yaml replays."""

    command: str  # "fuse" | "compare"
    features: Path
    text: tuple[str | None, ...]
    image: tuple[str | None, ...]
    heads: tuple[str, ...]
    protocol: StratifiedProtocol
    seeds: tuple[int, ...]
    set: dict[str, dict] = field(default_factory=dict)  # head -> overrides
    sweep: dict[str, list] = field(default_factory=dict)  # "head.key" -> values
    epochs: int | None = None
    device: str = "auto"
    class_weights: bool = False
    allow_stale: bool = False
    heads_all: bool = False  # --heads all: heads that cannot run anywhere are skipped
    one_at_a_time: bool = False  # torch fits one after another, not stacked (fuse.batched)
    memory_budget: str | None = None  # RAM for features, e.g. "1GB" (None: half the available)
    tune: dict | None = None  # fuse.search_space.tune_settings (None: nothing is tuned)
    robustness: bool = True  # also score every fit with a modality missing/noisy (fuse.robustness)
    ensemble: int = 0  # > 0: an extra row, the soft vote of the top k cells (fuse.ensemble)
    # --config: the replayed run's folder and its caches' fingerprints (encoder -> fingerprint),
    # so a replay on caches extracted again since (or another dataset in their place) says so
    replayed: tuple[str, dict] | None = field(default=None, compare=False)

    @property
    def strict(self) -> bool:
        """fuse: a cell that cannot run is an error, not a skipped cell."""
        return self.command == "fuse"

    def settings(self) -> dict:
        """The replayable part of config.yaml (and what --print-config shows)."""
        return {
            "command": self.command,
            "features": str(Path(self.features).resolve()),
            "text": [e or NONE for e in self.text],
            "image": [e or NONE for e in self.image],
            "heads": list(self.heads),
            "set": self.set,
            "sweep": self.sweep,
            "protocol": {**self.protocol.to_dict(), "description": self.protocol.describe()},
            "seeds": list(self.seeds),
            "epochs": self.epochs,
            "device": self.device,
            "class_weights": self.class_weights,
            "allow_stale": self.allow_stale,
            "one_at_a_time": self.one_at_a_time,
            "memory_budget": self.memory_budget,
            "robustness": self.robustness,
            "ensemble": self.ensemble,
            **({"tune": self.tune} if self.tune else {}),
        }

    def options(self, overrides: dict) -> dict[str, Any]:
        """The run-wide options a cell with these overrides is built with (from_config's
        epochs, device, class_weights). A cell's own --set / --sweep `train.KEY` wins over the
        flag: a sweep of train.epochs=1,8 trains 1 and 8 epochs whatever --epochs says (None:
        keep the cell's value, which the head then checks like the flag)."""
        own = overrides.get("train")
        own = own if isinstance(own, dict) else {}
        flags = {"epochs": self.epochs, "device": self.device, "class_weights": self.class_weights}
        return {k: None if k in own else v for k, v in flags.items()}

    def overruled(self, cell: Cell) -> list[str]:
        """'train.epochs=8 (not --epochs 2)' for each flag the user set that a cell's own
        value overrules (options); [] when none does."""
        own = cell.overrides.get("train")
        own = own if isinstance(own, dict) else {}
        flags = {"epochs": self.epochs, "device": self.device, "class_weights": self.class_weights}
        unset = (None, "auto", False)  # the flags' defaults: nothing typed, nothing overruled
        return [
            f"train.{k}={fmt_value(own[k])} (not --{k.replace('_', '-')}"
            + ("" if isinstance(v, bool) else f" {v}")
            + ")"
            for k, v in flags.items()
            if k in own and v not in unset and own[k] != v
        ]

    def cells(self) -> tuple[list[Cell], list[tuple[Cell, str]], list[str]]:
        """(cells, skipped, notes): the cells to run, each once, in grid order (text, image,
        head, variant); the cells that cannot run on their encoders, with why (a fusion head
        with image 'none'); a note per cell that several encoder pairs share (text_only reads
        no image: one cell for every image encoder)."""
        cells: dict[str, Cell] = {}
        skipped: dict[str, tuple[Cell, str]] = {}
        pairs: dict[str, set] = {}
        for text, image, head in itertools.product(self.text, self.image, self.heads):
            if text is None and image is None:  # --text a,none --image b,none: no features
                continue
            t, i = reads(head, text, image)
            for name, over in variants(head, self.sweep):
                over = deep_merge(self.set.get(head, {}), over)
                config = resolve_head(head, over, **self.options(over))
                cell = Cell(t, i, head, name, over, config)
                if (why := cannot_run(head, t, i)) is not None:
                    skipped.setdefault(cell.id, (cell, why))
                    continue
                cells.setdefault(cell.id, cell)
                pairs.setdefault(cell.id, set()).add((text, image))
        notes = [
            f"{cid} reads only {' and '.join(cells[cid].modalities)}: one cell for "
            f"{len(p)} encoder pairs (run once)"
            for cid, p in pairs.items()
            if len(p) > 1
        ]
        return list(cells.values()), list(skipped.values()), notes


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


def parse_encoders(spec: str | Sequence[str | None] | None, flag: str) -> list[str | None]:
    """'minilm,none' -> ['minilm', None] (each once, in order)."""
    if spec is None:
        spec = [None]
    elif isinstance(spec, str):
        spec = spec.split(",")
    names = [
        None if e is None or str(e).strip().lower() in ("", NONE) else str(e).strip() for e in spec
    ]
    if not names:
        raise ValueError(f"{flag} is empty; pass an encoder name or 'none'")
    return list(dict.fromkeys(names))


def parse_seeds(spec: str | Sequence[int]) -> list[int]:
    """'42,43,44' -> [42, 43, 44]; see check_seeds for the range."""
    if not isinstance(spec, str):
        return list(spec)
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise ValueError(
            f"--seeds must be whole numbers separated by commas, e.g. 42,43,44 (got {spec!r})"
        )
    return seeds


DEFAULT_PROTOCOL = {"fuse": {"val_ratio": 0.1}, "compare": {"folds": 5}, "tune": {"folds": 5}}


def resolve_settings(
    command: str, given: dict[str, Any], explicit: Iterable[str], config: str | Path | None = None
) -> GridSpec:
    """The settings of a run: each flag the user typed (`explicit`), else the replayed
    config.yaml's value, else the command's default (`given` holds every flag's value,
    defaults included). --set assignments add to the config's; a --sweep key replaces the
    config's sweep of that key.

    given keys: features, text, image, heads, set, sweep, val_ratio, folds, split_seed,
    seeds, epochs, device, class_weights, allow_stale, one_at_a_time (strings as typed on the
    command line)."""
    explicit = set(explicit)
    old = read_config(config) if config is not None else {}

    def pick(key: str) -> Any:
        return given.get(key) if key in explicit or key not in old else old[key]

    features = pick("features")
    if features is None:
        raise ValueError(
            "--features is required: the cache folder features/DATASET (or --config RUN/config.yaml)"
        )
    if pick("heads") is None:
        flag = "--head" if command in ("fuse", "tune") else "--heads"
        raise ValueError(f"{flag} is required; valid heads: {', '.join(list_heads())}")
    heads, heads_all = parse_heads(pick("heads"))
    text, image = parse_encoders(pick("text"), "--text"), parse_encoders(pick("image"), "--image")
    if all(e is None for e in (*text, *image)):
        raise ValueError("no features asked for: give --text, --image or both (not both none)")
    if command == "fuse":
        _one_cell(text, image, heads, config)
    sets = _assignments(old.get("set", {}), "--set")  # the replayed run's, then the flags'
    sets += [parse_assignment(p, "--set") for p in given.get("set") or []]
    sweeps = _assignments(old.get("sweep", {}), "--sweep")
    sweeps += [parse_assignment(p, "--sweep") for p in given.get("sweep") or []]
    if command == "fuse" and sweeps:
        raise ValueError("fuse runs one cell; --sweep is for `fusebench compare`")
    return GridSpec(
        command=command,
        features=Path(features),
        text=tuple(text),
        image=tuple(image),
        heads=tuple(heads),
        heads_all=heads_all,
        set=resolve_set(sets, heads),
        sweep=resolve_sweep(sweeps, heads),
        protocol=_protocol(command, given, explicit, old),
        seeds=tuple(check_seeds(parse_seeds(pick("seeds")))),
        epochs=_epochs(pick("epochs")),
        device=check_device(pick("device")),
        class_weights=bool(pick("class_weights")),
        allow_stale=bool(pick("allow_stale")),
        one_at_a_time=bool(pick("one_at_a_time")),
        memory_budget=_budget(pick("memory_budget")),
        tune=tune_settings(command, given, explicit, old),
        robustness=_on_off(pick("robustness"), "--robustness"),
        ensemble=_ensemble(pick("ensemble")),
        replayed=None if config is None else (str(config), recorded_fingerprints(config)),
    )


def _one_cell(text: list, image: list, heads: list, config) -> None:
    for what, values in (("--text", text), ("--image", image), ("--head", heads)):
        if len(values) > 1:
            shown = ",".join(v or NONE for v in values)
            where = f"{config} gives" if config else "got"
            raise ValueError(
                f"fuse runs one cell, but {where} {what} {shown}; pass one {what}, or run "
                "`fusebench compare` for a grid"
            )


def _on_off(value: Any, flag: str) -> bool:
    """An on/off setting as typed (on, off, true, false; None: on) -> bool."""
    if value is None or isinstance(value, bool):
        return value is not False
    word = str(value).strip().lower()
    if word not in ("on", "off", "true", "false"):
        raise ValueError(f"{flag} must be on or off, not {value!r}")
    return word in ("on", "true")


def _ensemble(k: Any) -> int:
    """--ensemble K: how many cells the ensemble row votes with (0 or None: no such row)."""
    if k is None:
        return 0
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k == 1:
        raise ValueError(f"--ensemble must be 0 (no ensemble row) or at least 2, not {k!r}")
    return k


def _budget(budget: Any) -> str | None:
    """--memory-budget as typed (checked now, so a bad size fails before any cache is read)."""
    if budget is None:
        return None
    from fusebench.fuse.streaming import parse_size

    parse_size(budget)
    return str(budget)


def _epochs(epochs: Any) -> int | None:
    if epochs is None:
        return None
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"--epochs must be at least 1, not {epochs}")
    return epochs


def _protocol(command: str, given: dict, explicit: set, old: dict) -> StratifiedProtocol:
    if "val_ratio" in explicit or "folds" in explicit or "protocol" not in old:
        val_ratio, folds = given.get("val_ratio"), given.get("folds")
        if val_ratio is not None and folds is not None:
            raise ValueError("give either --val-ratio or --folds, not both")
        if val_ratio is None and folds is None:
            chosen = DEFAULT_PROTOCOL[command]
        else:
            chosen = {"val_ratio": val_ratio, "folds": folds}
        inner = old.get("protocol", {}).get("inner_ratio", 0.1)
    else:
        chosen = {k: old["protocol"].get(k) for k in ("val_ratio", "folds")}
        inner = old["protocol"].get("inner_ratio", 0.1)
    split_seed = given.get("split_seed")
    if "split_seed" not in explicit and "protocol" in old:
        split_seed = old["protocol"].get("split_seed", split_seed)
    return StratifiedProtocol(
        val_ratio=chosen.get("val_ratio"),
        folds=chosen.get("folds"),
        split_seed=42 if split_seed is None else split_seed,
        inner_ratio=inner,
    )


def _assignments(mapping: dict, flag: str) -> list[Assignment]:
    """A config.yaml `set` ({head: {key: value}}) or `sweep` ({"head.key": [values]})."""
    out = []
    if flag == "--set":
        for head, over in mapping.items():
            for path, value in _leaves(over):
                out.append(Assignment(head, path, value, "config set", f"{head}.{'.'.join(path)}"))
    else:
        for key, values in mapping.items():
            head, _, rest = key.partition(".")
            out.append(Assignment(head, tuple(rest.split(".")), list(values), "config sweep", key))
    return out


def _leaves(node: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for k, v in node.items():
        if isinstance(v, dict) and v:
            out += _leaves(v, (*prefix, str(k)))
        else:
            out.append(((*prefix, str(k)), v))
    return out


def _names(v: Any) -> bool:
    return v is None or (isinstance(v, (str, list)) and bool(v))


def _set_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, dict) for x in v.values())


def _sweep_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, list) and "." in k for k, x in v.items())


CONFIG_TYPES = {  # key -> (check, what it must be)
    "features": (lambda v: isinstance(v, str), "a folder path"),
    "text": (_names, "a list of encoder names or 'none'"),
    "image": (_names, "a list of encoder names or 'none'"),
    "heads": (lambda v: isinstance(v, (list, dict)) and bool(v), "a list of head names"),
    "set": (_set_map, "a mapping head -> {key: value}"),
    "sweep": (_sweep_map, 'a mapping "head.key" -> [values]'),
    "protocol": (lambda v: isinstance(v, dict), "a mapping (folds, val_ratio, split_seed)"),
    "seeds": (lambda v: isinstance(v, list) and bool(v), "a list of whole numbers"),
    "epochs": (lambda v: v is None or isinstance(v, int), "a whole number or null"),
    "device": (lambda v: isinstance(v, str), "auto, cpu or cuda"),
    "class_weights": (lambda v: isinstance(v, bool), "true or false"),
    "allow_stale": (lambda v: isinstance(v, bool), "true or false"),
    "one_at_a_time": (lambda v: isinstance(v, bool), "true or false"),
    "memory_budget": (lambda v: v is None or isinstance(v, (str, int)), "a size like 1GB, or null"),
    "tune": (lambda v: v is None or isinstance(v, dict), "a mapping (trials, timeout, ...)"),
    "robustness": (lambda v: isinstance(v, bool), "true or false"),
    "ensemble": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
}


RECORDED_KEYS = (  # what config.yaml records beside the settings: read by predict and report
    "command",  # replay runs the command typed (fuse or compare)
    "created",
    "caches",
    "stale_caches",
    "classes",
    "rows",
    "versions",
    "cells",
    "best_cell",
    "saved_model",  # runs of the first stage-two version
    "planned_cells",  # --print-config output, saved and replayed
    "skipped_cells",
)
PROTOCOL_KEYS = ("folds", "val_ratio", "split_seed", "inner_ratio", "description")


def recorded_fingerprints(path: str | Path) -> dict[str, str]:
    """encoder -> fingerprint of the caches a run's config.yaml says it used ({} if none);
    read after read_config has checked the file."""
    path = Path(path)
    data = yaml.safe_load((path / "config.yaml" if path.is_dir() else path).read_text("utf-8"))
    caches = data.get("caches") if isinstance(data, dict) else None
    return {
        str(enc): str(src["fingerprint"])
        for enc, src in (caches.items() if isinstance(caches, dict) else ())
        if isinstance(src, dict) and src.get("fingerprint")
    }


def describe_replayed_caches(spec: GridSpec, bank: FeatureBank) -> str | None:
    """A note when a --config replay reads caches other than the replayed run's (extracted
    again since, or another dataset in their place): its numbers will not be that run's."""
    if spec.replayed is None:
        return None
    where, old = spec.replayed
    changed = [
        Path(src["path"]).name
        for enc, src in bank.caches.items()
        if enc in old and old[enc] != src["fingerprint"]
    ]
    if not changed:
        return None
    return (
        f"replaying {where}: {few(changed)} is not the cache that run used (its fingerprint "
        "changed: extracted again since, or another dataset in its place), so the numbers will "
        "differ from that run's"
    )


def read_config(path: str | Path) -> dict:
    """The replayable settings of a run's config.yaml (--config), each checked; a missing or
    malformed file, or a key replay does not know (a typo would be ignored silently), is one
    line naming it and the key."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file; pass RUN/config.yaml of a run")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ValueError(f"--config {path} is not valid YAML; pass a run's config.yaml") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} holds no settings mapping; pass a run's config.yaml")
    for key in data:
        if key not in CONFIG_TYPES and key not in RECORDED_KEYS:
            raise ValueError(
                f"--config {path}: unknown key '{key}'; valid keys: {', '.join(CONFIG_TYPES)} "
                "(besides what a run records about itself)"
            )
    protocol = data.get("protocol")
    for key in protocol if isinstance(protocol, dict) else ():
        if key not in PROTOCOL_KEYS:
            raise ValueError(
                f"--config {path}: unknown key 'protocol.{key}'; valid keys: "
                + ", ".join(PROTOCOL_KEYS)
            )
    out = {}
    for key, (ok, what) in CONFIG_TYPES.items():
        if key not in data:
            continue
        if not ok(data[key]):
            raise ValueError(f"--config {path}: '{key}' must be {what}, not {data[key]!r}")
        out[key] = list(data[key]) if key == "heads" else data[key]  # issue-7 runs: a mapping
    return out
