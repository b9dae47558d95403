"""A head's hyperparameter search space: the `search:` block of configs/heads/<name>.yaml.

    search:
      hidden: [128, 256, 512]                          # a list: one of these values
      dropout: {low: 0.0, high: 0.5}                   # a range (int when the default is)
      train.lr: {low: 1.0e-4, high: 3.0e-3, log: true} # log-uniform; nested keys dotted
      train.epochs: {low: 2, high: 20, step: 2}        # an int range with a step

The block is not a hyperparameter: fuse.registry.head_config leaves it out, so a head's
defaults are unchanged by it. `search_space(name)` reads it and checks every key against the
head (each choice and each end of a range must build the head, as a --set would), so a bad
space fails before anything is tuned. `suggest` draws one assignment from an Optuna trial.

Also here, free of Optuna and of the experiment runner: `tune_settings`, the resolved
tuning settings a GridSpec carries (fuse.grid: `fusebench tune`, `compare --tune N`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusebench.fuse._util import deep_merge
from fusebench.fuse.params import coerce

SEARCH_KEY = "search"  # the block's key in a head's YAML
RANGE_KEYS = ("low", "high", "log", "step")


@dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter: `choices` (categorical) or a [low, high] range."""

    key: str  # dotted: "train.lr"
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.key.split("."))

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.key} in {list(self.choices)}"
        scale = ", log" if self.log else ""
        return f"{self.key} in [{self.low:g}, {self.high:g}{scale}]"


def raw_search(name: str) -> dict | None:
    """The `search:` block of head `name`'s YAML as written (None when it has none)."""
    from fusebench.configs import read_config
    from fusebench.fuse.head import HEADS
    from fusebench.fuse.registry import CONFIG_DIR, get_head

    get_head(name)
    path = CONFIG_DIR / f"{name}.yaml"
    if path.is_file():
        data = read_config(path)
    else:
        given = HEADS.config(name)
        data = read_config(given) if isinstance(given, Path) else dict(given or {})
    return data.get(SEARCH_KEY)


def search_space(name: str, *, overrides: dict | None = None) -> list[Dimension]:
    """Head `name`'s search space, checked: each key a hyperparameter of the head, each choice
    and range end a valid value of it (built with `overrides`, the cell's --set). A head without
    a `search:` block is a ValueError naming the file and the fix."""
    raw = raw_search(name)
    where = f"configs/heads/{name}.yaml"
    if not raw:
        raise ValueError(
            f"head '{name}' has no search space to tune; add a `search:` block to {where} "
            "(e.g. search: {train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}})"
        )
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: `search:` must map hyperparameter -> [values] or {{low, high}}")
    return [_dimension(name, str(k), v, overrides or {}) for k, v in raw.items()]


def _dimension(name: str, key: str, spec: Any, overrides: dict) -> Dimension:
    from fusebench.fuse.registry import resolve_params

    where = f"configs/heads/{name}.yaml search.{key}"
    default = _lookup(resolve_params(name), key.split("."))
    if default is _MISSING:
        raise ValueError(f"{where}: '{key}' is not a hyperparameter of head '{name}'")
    if isinstance(spec, list) and spec:
        dim = Dimension(key, choices=tuple(spec))
        values = list(spec)
    elif isinstance(spec, dict) and {"low", "high"} <= set(spec) and set(spec) <= set(RANGE_KEYS):
        low, high = (coerce(spec[k], default, f"{where}.{k}") for k in ("low", "high"))
        integer = isinstance(default, int) and not isinstance(default, bool)
        if not all(isinstance(v, (int, float)) for v in (low, high)) or not low < high:
            raise ValueError(f"{where}: want numbers low < high, got {spec}")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise ValueError(f"{where}: a log range needs low > 0, got {low}")
        step = spec.get("step")
        dim = Dimension(key, low=low, high=high, log=log, step=step, integer=integer)
        values = [low, high]
    else:
        raise ValueError(
            f"{where}: want a list of values or {{low: A, high: B[, log: true]}}, got {spec!r}"
        )
    for value in values:  # each must build the head, as `--set {key}={value}` would
        try:
            _build(name, deep_merge(overrides, nest(key.split("."), value)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {value!r} is not valid ({e})") from None
    return dim


def _build(name: str, overrides: dict) -> None:
    from fusebench.fuse.registry import resolve_head

    resolve_head(name, overrides, device="cpu").prototype  # noqa: B018  (built and checked)


_MISSING = object()


def nest(path: tuple[str, ...] | list[str], value: Any) -> dict:
    """("train", "lr"), 3e-4 -> {"train": {"lr": 3e-4}} (as fuse.grid.nest)."""
    out: Any = value
    for p in reversed(path):
        out = {p: out}
    return out


def _lookup(params: dict, path: list[str]) -> Any:
    node: Any = params
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return _MISSING
        node = node[p]
    return node


def suggest(trial: Any, space: list[Dimension]) -> dict:
    """One assignment drawn from an Optuna trial, as nested overrides ({"train": {"lr": ..}})."""
    out: dict = {}
    for d in space:
        if d.choices is not None:
            value = trial.suggest_categorical(d.key, list(d.choices))
        elif d.integer:
            step = int(d.step or 1)
            value = trial.suggest_int(d.key, int(d.low), int(d.high), step=step, log=d.log)
        else:
            value = trial.suggest_float(d.key, d.low, d.high, step=d.step, log=d.log)
        out = deep_merge(out, nest(d.path, value))
    return out


def as_overrides(params: dict) -> dict:
    """Optuna's flat params ({"train.lr": 3e-4}) as nested overrides."""
    out: dict = {}
    for key, value in params.items():
        out = deep_merge(out, nest(key.split("."), value))
    return out


# ---------------------------------------------------------------- settings

TUNE_DEFAULTS = {"trials": 20, "timeout": None, "inner_folds": 3, "target": "all"}


def tune_settings(command: str, given: dict, explicit: set, old: dict) -> dict | None:
    """The tuning settings of a run (None: no tuning). `fusebench tune`: every cell of its
    grid, --trials / --timeout / --inner-folds; `compare --tune N`: the best untuned cell,
    `--tune HEAD:N` the best cell of head HEAD, with N trials. Flags typed win over a
    replayed config.yaml's `tune`."""
    replayed = old.get("tune") if isinstance(old.get("tune"), dict) else None
    if command == "tune":
        out = {**TUNE_DEFAULTS, **(replayed or {}), "target": "all"}
        for key in ("trials", "timeout", "inner_folds"):
            if key in explicit or (replayed is None and given.get(key) is not None):
                out[key] = given.get(key)
    elif command == "compare" and (given.get("tune") is not None or replayed):
        if "tune" in explicit or replayed is None:
            if given.get("tune") is None:
                return None
            target, trials = parse_tune(given["tune"])
            out = {**TUNE_DEFAULTS, "trials": trials, "target": target}
        else:
            out = {**TUNE_DEFAULTS, **replayed}
    else:
        return None
    return check_tune(out)


def parse_tune(value: Any) -> tuple[str, Any]:
    """--tune N -> ("best", N); --tune HEAD:N -> ("head:HEAD", N)."""
    head, sep, count = str(value).strip().rpartition(":")
    try:
        trials = int(count)
    except ValueError:
        raise ValueError(
            f"--tune wants N or HEAD:N (e.g. --tune 20 or --tune concat_mlp:20), not {value!r}"
        ) from None
    if not sep:
        return "best", trials
    from fusebench.fuse.registry import get_head

    get_head(head.strip())  # an unknown head lists the valid ones
    return f"head:{head.strip()}", trials


def check_tune(tune: dict) -> dict:
    """The tuning settings with each value checked (one line naming the flag)."""
    trials, timeout, inner = tune["trials"], tune["timeout"], tune["inner_folds"]
    target = tune.get("target")
    flag = "--trials" if target == "all" else "--tune"
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"{flag} must be a whole number of trials, at least 1, not {trials!r}")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise ValueError(f"--timeout must be a positive number of seconds, not {timeout!r}")
    if isinstance(inner, bool) or not isinstance(inner, int) or inner < 2:
        raise ValueError(f"--inner-folds must be a whole number, at least 2, not {inner!r}")
    if not isinstance(target, str) or not (target in ("all", "best") or target.startswith("head:")):
        raise ValueError(f"tune.target must be all, best or head:HEAD, not {target!r}")
    return {k: tune[k] for k in TUNE_DEFAULTS}
