"""The head contract: what a head of the registry is, and how one is registered.

A head turns cached features into class probabilities, following scikit-learn's estimator
contract. Everything stage two does with a head (fuse.experiment's runner, fuse.grid's cells,
fuse.batched, fuse.predict) goes through the members below and nothing else:

`HeadType`, what the registry holds (`@register_head("name")` on a class):

* `modalities` ("text", "image") and `require`: "all" of them, or "any" (it uses whichever
  the feature set has);
* `uses_tokens(params) -> bool`: what it reads, with these hyperparameters: token arrays (and
  their masks) of each modality, or else its pooled vectors (never both);
* `from_config(params, *, seed, epochs=None, device=None, class_weights=None) -> Head`: an
  unfitted estimator from its resolved hyperparameters (configs/heads/<name>.yaml, then
  overrides) and the run-wide options (None keeps the hyperparameters' value); it checks them
  all, so a bad `--set` fails before any cache is read;
* `load(folder, *, device="auto") -> Head`: what `Head.save(folder)` wrote.

`Head`, the estimator `from_config` returns:

* `fit(train, val=None, *, quiet=True) -> self`: learns from `train`; `val` (inner-validation
  rows, never scored ones) may pick its epoch or boosting round;
* `predict_proba(rows) -> (n, C)`: rows sum to 1, columns in `rows.classes` order;
* `get_config() -> {"head", "params", "seed"}`: `from_config(params, seed=seed)` rebuilds it;
* `save(folder)`, writing `head.json` (its config, `classes`, `modalities`, ...) beside its
  weights; `needs_tokens`: `uses_tokens` of its hyperparameters;
* class level: `params_meaning`, what `n_params_` counts (reported beside it), and
  `iteration_param`, the hyperparameter `best_iteration_` counts (None: it has none), which a
  refit on every labelled row fixes to the CV fits' median;
* fitted state, ending in `_`: `classes_`, `modalities_`, `n_params_`, `train_time_`,
  `best_iteration_`, and `history_` (per-epoch records; optional, heads without epochs need
  not set it: `fit_history`).

Optional: `FitsTogether`, a head whose fits of one cell (folds x seeds) can train as one.
While a head fits, `fit_label` names the fit for a progress bar it may draw (quiet=False).

An estimator class (LightGBM, logistic regression, a plugin) is both: subclass `BaseHead`,
which supplies `from_config`, `get_config`, `save` and `load`. A torch head registers its
network (fuse.nets.FusionHead), whose `from_config` returns the `TorchClassifier` estimator
around it. Importing this module imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from fusebench.fuse._util import DamagedModelError
from fusebench.fuse.params import check_params, init_params

from fusebench.registry import Registry, UnknownNameError

if TYPE_CHECKING:
    from fusebench.fuse.features import FeatureSet


@runtime_checkable
class Head(Protocol):
    """The estimator: see the module docstring."""

    params_meaning: ClassVar[str]
    iteration_param: ClassVar[str | None]
    needs_tokens: bool
    seed: int

    def fit(
        self, train: FeatureSet, val: FeatureSet | None = None, *, quiet: bool = True
    ) -> Head: ...

    def predict_proba(self, rows: FeatureSet) -> np.ndarray: ...

    def get_config(self) -> dict[str, Any]: ...

    def save(self, folder: str | Path) -> None: ...


class HeadType(Protocol):
    """What the registry holds: see the module docstring."""

    modalities: tuple[str, ...]
    require: str
    registry_name: str

    @classmethod
    def uses_tokens(cls, params: dict[str, Any]) -> bool: ...

    @classmethod
    def from_config(cls, params: dict[str, Any], *, seed: int, **options: Any) -> Head:
        """options: the run-wide `epochs`, `device` and `class_weights` (see above)."""
        ...

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "auto") -> Head: ...


HEAD_TYPE_MEMBERS = ("modalities", "require", "uses_tokens", "from_config", "load")


@runtime_checkable
class FitsTogether(Protocol):
    """Optional: `fit_together` fits `heads` (one head and settings, one per seed × fold) on
    their own trains[i] / vals[i] as one, each ending as its own fit would; False (nothing
    fitted, and a note saying why) when they are to be fitted one at a time."""

    @classmethod
    def fit_together(
        cls,
        heads: Sequence[Head],
        trains: Sequence[FeatureSet],
        vals: Sequence[FeatureSet | None],
        *,
        quiet: bool,
        label: str,
    ) -> bool: ...


def fit_history(head: Head) -> list[dict]:
    """A fitted head's per-epoch records: `history_`, optional in the contract ([] without)."""
    return list(getattr(head, "history_", None) or [])


_FIT_LABEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("fit_label", default=None)


@contextlib.contextmanager
def fit_label(label: str | None) -> Iterator[None]:
    """Names the fit under way ("minilm+vit/cross_attn seed 42 fold 3/5") for the progress
    bar a head may draw while it fits (quiet=False); the runner sets it around fit()."""
    token = _FIT_LABEL.set(label)
    try:
        yield
    finally:
        _FIT_LABEL.reset(token)


def current_fit_label() -> str | None:
    return _FIT_LABEL.get()


# ---------------------------------------------------------------- the base of estimator heads


class BaseHead:
    """The plumbing of an estimator head (non-torch): subclass it, take keyword-only typed
    hyperparameters (plus `seed`) in `__init__` and store them as given, implement `fit`
    (setting the fitted state of the module docstring) and `predict_proba`. Saved with
    joblib (`model.joblib`) beside `head.json`."""

    modalities: ClassVar[tuple[str, ...]] = ("text", "image")
    require: ClassVar[str] = "any"
    registry_name: ClassVar[str] = ""
    params_meaning: ClassVar[str] = "as counted by the estimator"
    iteration_param: ClassVar[str | None] = None
    bounds: ClassVar[dict] = {}  # key -> fuse.params.Bound
    choices: ClassVar[dict] = {}  # key -> allowed values
    seed: int

    @classmethod
    def uses_tokens(cls, params: dict[str, Any]) -> bool:
        return False

    @property
    def needs_tokens(self) -> bool:
        return bool(self.uses_tokens(self.get_config()["params"]))

    @classmethod
    def from_config(
        cls,
        params: dict[str, Any],
        *,
        seed: int,
        epochs: int | None = None,  # torch heads only; boosting rounds are a hyperparameter
        device: str | None = None,  # estimator heads run on the CPU
        class_weights: bool | None = None,
    ) -> BaseHead:
        """params checked (fuse.params.check_params); --class-weights sets `class_weight`
        ("balanced" or None) of a head that takes one."""
        params = dict(params)
        if class_weights is not None and "class_weight" in init_params(cls):
            params["class_weight"] = "balanced" if class_weights else None
        params = check_params(cls, params, cls.registry_name, skip=("seed",))
        return cls(**params, seed=seed)

    @property
    def name(self) -> str:
        return self.registry_name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"

    def get_config(self) -> dict[str, Any]:
        params = {k: getattr(self, k) for k in init_params(type(self)) if k != "seed"}
        return {"head": self.name, "params": params, "seed": self.seed}

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError(f"this {self!r} is not fitted yet; call fit(train, val) first")

    def save(self, folder: str | Path) -> None:
        """folder/model.joblib (the fitted estimator) + folder/head.json (what it is)."""
        import joblib

        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        joblib.dump(self, folder / "model.joblib")
        (folder / "head.json").write_text(json.dumps(describe(self), indent=2, default=str))

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "auto") -> BaseHead:
        """The estimator save() wrote; a missing or damaged file is a DamagedModelError."""
        import joblib

        path = Path(folder) / "model.joblib"
        try:
            model = joblib.load(path)
        except Exception as e:  # unpickling a truncated file raises almost any kind
            what = " ".join(str(e).split())[:160]
            raise DamagedModelError(
                f"{path} cannot be loaded ({type(e).__name__}: {what}); it is missing or "
                "damaged — rerun the `fusebench fuse` or `compare` command that made the run"
            ) from None
        if not isinstance(model, cls) or not hasattr(model, "classes_"):
            raise DamagedModelError(
                f"{path} holds {type(model).__name__}, not a fitted '{cls.registry_name}' head; "
                "rerun the `fusebench fuse` or `compare` command that made the run"
            )
        return model


def describe(head: Head) -> dict[str, Any]:
    """head.json of a fitted head: its config, what it reads and what it learned."""
    return {
        **head.get_config(),
        "modalities": list(head.modalities_),
        "classes": list(head.classes_),
        "needs_tokens": head.needs_tokens,
        "best_iteration": head.best_iteration_,
        "n_params": head.n_params_,
    }


# ---------------------------------------------------------------- the registry


class UnknownHeadError(UnknownNameError):
    """A head name that is not registered; the message lists the valid ones."""


def check_head_type(obj: Any, name: str) -> None:
    """Refuses a class that lacks a member of the HeadType contract, naming them."""
    missing = [m for m in HEAD_TYPE_MEMBERS if not hasattr(obj, m)]
    if missing:
        raise TypeError(
            f"{obj.__qualname__} cannot be registered as head '{name}': it lacks "
            f"{', '.join(missing)}; subclass fusebench.fuse.head.BaseHead (or "
            "fusebench.fuse.nets.FusionHead for a torch network)"
        )


HEADS = Registry("head", check=check_head_type, error=UnknownHeadError)
register_head = HEADS.register
