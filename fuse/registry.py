"""The head registry: name -> head class; hyperparameters live in configs/heads/<name>.yaml.

Calling contract of a registered head class:

* `modalities`: the inputs it reads ("text", "image"); `require`: "all" of them, or "any"
  (it uses whichever the FeatureSet has).
* `uses_tokens(params) -> bool`: whether, with these hyperparameters, it reads token arrays.
* `bounds` / `choices` (optional): key -> `Bound` / tuple of allowed values, checked by
  `check_params` before anything is built, so a bad `--set` fails in one line naming the head,
  the key and what is valid.
* `from_config(params, *, seed, epochs, device, class_weights) -> estimator`, where the
  estimator has `fit(train, val, quiet=) -> self`, `predict_proba(rows) -> (n, C)`,
  `save(folder)`, `needs_tokens`, `get_config()`, and after fit `n_params_`, `train_time_`,
  `best_iteration_`.

Torch heads (fuse/nets.py) are nn.Modules sharing one forward signature and are wrapped by
fuse.trainer.TorchClassifier; LightGBM and logistic regression (fuse/classic.py) are
estimators themselves. Importing this module imports neither torch nor lightgbm.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from dataclasses import dataclass
from typing import Any

import yaml
from fusebench.configs import bundled_path
from fusebench.fuse._util import deep_merge

CONFIG_DIR = bundled_path("heads")  # configs/heads/, package data of the install
BUILTIN_MODULES = ("fusebench.fuse.nets", "fusebench.fuse.classic")  # their heads ship a YAML each


class UnknownHeadError(ValueError):
    """A head name that is not registered; the message lists the valid ones."""


class Registry:
    """name -> object, filled by a decorator; a duplicate name fails at import time."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str):
        def decorator(obj):
            if name in self._items:
                prev = self._items[name]
                raise ValueError(
                    f"{self.kind} '{name}' is already registered by "
                    f"{prev.__module__}.{prev.__qualname__}; pick another name"
                )
            obj.registry_name = name
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownHeadError(
                f"unknown {self.kind} '{name}'; valid {self.kind}s: {', '.join(self.names())}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._items


HEADS = Registry("head")
register_head = HEADS.register


def _load_builtin() -> None:
    import fusebench.fuse.classic  # noqa: F401  (registers lightgbm, logreg)
    import fusebench.fuse.nets  # noqa: F401  (registers the torch heads)


def get_head(name: str) -> type:
    """The registered class for `name`; an unknown name lists the valid ones."""
    _load_builtin()
    return HEADS.get(name)


def list_heads(pattern: str = "*") -> list[str]:
    """Registered head names matching a glob pattern, sorted."""
    _load_builtin()
    return HEADS.names(pattern)


def head_config(name: str) -> dict[str, Any]:
    """The hyperparameters in configs/heads/<name>.yaml. A built-in head without its YAML is a
    broken install (FileNotFoundError naming the file), never a silent fall-back to defaults;
    a plugin head (registered outside fusebench) may have none: {} then, its own defaults."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        if getattr(get_head(name), "__module__", "") in BUILTIN_MODULES:
            raise FileNotFoundError(
                f"{path} is missing: the built-in head '{name}' reads its hyperparameters "
                "there; reinstall fusebench (pip install --force-reinstall fusebench, or "
                "pip install . in a clone)"
            )
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise ValueError(f"{path} is not valid YAML{at}; fix the file") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} must hold a mapping of hyperparameters, not {type(data).__name__}"
        )
    return data


def resolve_params(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The head's YAML updated by overrides (nested `train:` keys merge key by key)."""
    get_head(name)
    return deep_merge(head_config(name), overrides or {})


def head_needs_tokens(name: str, overrides: dict[str, Any] | None = None) -> bool:
    return bool(get_head(name).uses_tokens(resolve_params(name, overrides)))


def build_head(
    name: str,
    *,
    seed: int = 42,
    overrides: dict[str, Any] | None = None,
    epochs: int | None = None,
    device: str | None = None,
    class_weights: bool | None = None,
):
    """An unfitted estimator for head `name`: its YAML, then `overrides`, then the run-wide
    options (epochs, device, class_weights: None keeps the YAML's value)."""
    cls = get_head(name)
    return cls.from_config(
        resolve_params(name, overrides),
        seed=seed,
        epochs=epochs,
        device=device,
        class_weights=class_weights,
    )


@dataclass(frozen=True)
class Bound:
    """The valid values of one numeric hyperparameter (None = no limit on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is not allowed
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if value != value:  # NaN is in no range
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (
            self.high is not None and (value > self.high or (self.high_open and value == self.high))
        )

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "any number"


POSITIVE_INT = Bound(low=1)  # widths, layer and head counts, epochs, batch sizes
NON_NEGATIVE = Bound(low=0)
POSITIVE = Bound(low=0, low_open=True)  # learning rates, regularization strengths
DROPOUT = Bound(low=0, high=1, high_open=True)
SHARE = Bound(low=0, high=1, low_open=True)  # subsample shares: (0, 1]


def check_params(
    cls: type, params: dict[str, Any], name: str, *, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """params checked against the constructor's keyword-only arguments: an unknown name fails
    listing the valid ones; each value must have its default's type (a number written as
    YAML 1.1 does not parse it, "1e-3", becomes one) and lie in `cls.bounds[key]`, or be one
    of `cls.choices[key]`."""
    sig = inspect.signature(cls.__init__)
    valid = {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in skip
    }
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise ValueError(
            f"unknown hyperparameter '{unknown[0]}' for head '{name}' "
            f"(configs/heads/{name}.yaml or --set); valid: {', '.join(valid)}"
        )
    bounds = getattr(cls, "bounds", {})
    choices = getattr(cls, "choices", {})
    return {
        k: check_value(
            v,
            like=valid[k],
            what=f"head '{name}': {k}",
            bound=bounds.get(k),
            choices=choices.get(k),
        )
        for k, v in params.items()
    }


def check_value(
    value: Any,
    *,
    like: Any,
    what: str,
    bound: Bound | None = None,
    choices: tuple | None = None,
) -> Any:
    """value checked (and coerced) against its default `like`: same kind (bool, integer,
    number), within `bound`, or one of `choices`. A ValueError names `what` and what is valid."""
    if choices is not None:
        if value not in choices:
            valid = ", ".join("null" if c is None else str(c) for c in choices)
            raise ValueError(f"{what} must be one of {valid}, not {value!r}")
        return value
    if isinstance(like, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{what} must be true or false, not {value!r}")
        return value
    if not isinstance(like, (int, float)):
        return value
    value = coerce(value, like, what)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, not {value!r}")
    if isinstance(like, int) and not isinstance(value, int):
        raise ValueError(f"{what} must be a whole number, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, not {value!r}")
    if bound is not None and value not in bound:
        raise ValueError(f"{what}={value!r} is out of range; valid: {bound}")
    return float(value) if isinstance(like, float) else value


def coerce(value: Any, like: Any, what: str) -> Any:
    """value as the type of the default `like` (int/float), refusing what is not a number."""
    if isinstance(like, bool) or not isinstance(like, (int, float)) or isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{what} must be a number, not {value!r}") from None
    if isinstance(like, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value
