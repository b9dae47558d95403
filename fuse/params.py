"""Hyperparameters checked before anything is built: each value against its default's type
and its valid range, so a bad `--set` or YAML value is one line naming the head, the key and
what is valid.

A head's hyperparameters are the keyword-only arguments of its constructor (`init_params`);
`check_params` refuses a name it does not take, `check_value` a value of the wrong kind, out
of its `Bound`, or not one of its `choices`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any


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


def init_params(cls: type) -> dict[str, Any]:
    """name -> default of the keyword-only arguments of cls.__init__: its hyperparameters."""
    return {
        p.name: p.default
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def check_params(
    cls: type, params: dict[str, Any], name: str, *, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """params checked against the constructor's keyword-only arguments: an unknown name fails
    listing the valid ones; each value must have its default's type (a number written as
    YAML 1.1 does not parse it, "1e-3", becomes one) and lie in `cls.bounds[key]`, or be one
    of `cls.choices[key]`."""
    valid = {k: v for k, v in init_params(cls).items() if k not in skip}
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise ValueError(
            f"unknown hyperparameter '{unknown[0]}' for head '{name}' "
            f"(configs/heads/{name}.yaml or --set); valid: {', '.join(valid)}"
        )
    bounds = getattr(cls, "bounds", {})
    choices = getattr(cls, "choices", {})
    return check_values(params, valid, f"head '{name}': ", bounds=bounds, choices=choices)


def check_values(
    values: dict[str, Any],
    defaults: dict[str, Any],
    prefix: str,
    *,
    bounds: dict[str, Bound],
    choices: dict[str, tuple],
) -> dict[str, Any]:
    """Every (known) value of `values` checked by check_value against its default, its bound
    and its choices; a ValueError names it as prefix + its key."""
    return {
        k: check_value(
            v,
            like=defaults[k],
            what=f"{prefix}{k}",
            bound=bounds.get(k),
            choices=choices.get(k),
        )
        for k, v in values.items()
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
