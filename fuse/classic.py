"""Non-torch heads on pooled features: LightGBM and logistic regression.

Both read the pooled vector of every modality the FeatureSet has, concatenated
([text; image], float32), and follow the scikit-learn estimator habits: keyword-only
hyperparameters stored as given, fit(train, val) -> self, fitted state ending in `_`.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from fusebench.fuse._util import DamagedModelError
from fusebench.fuse.features import FeatureSet, check_inputs
from fusebench.fuse.registry import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SHARE,
    Bound,
    check_params,
    register_head,
)
from sklearn.exceptions import NotFittedError


def pooled_matrix(fs: FeatureSet, modalities: tuple[str, ...]) -> np.ndarray:
    """(n, sum of D') float32: the pooled vectors of `modalities`, side by side."""
    return np.concatenate([fs.modality(m).pooled().astype(np.float32) for m in modalities], axis=1)


def full_proba(proba: np.ndarray, seen: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, C) from the (n, len(seen)) columns of the classes the model saw in training."""
    out = np.zeros((len(proba), n_classes), dtype=np.float64)
    out[:, seen] = proba
    return out


class PooledEstimator:
    """Shared plumbing: input checks, run-wide options, predict_proba, save."""

    kind = "joblib"
    modalities: tuple[str, ...] = ("text", "image")
    require = "any"  # uses whichever modalities the feature set has
    registry_name = ""
    needs_tokens = False  # the estimator-side answer (TorchClassifier has the same attribute)
    choices = {"class_weight": (None, "balanced")}

    @classmethod
    def uses_tokens(cls, params: dict[str, Any]) -> bool:
        return False

    @classmethod
    def from_config(
        cls,
        params: dict[str, Any],
        *,
        seed: int,
        epochs: int | None = None,  # torch heads only; boosting rounds are n_estimators
        device: str | None = None,  # these run on the CPU
        class_weights: bool | None = None,
    ) -> PooledEstimator:
        params = dict(params)
        if class_weights is not None:
            params["class_weight"] = "balanced" if class_weights else None
        params = check_params(cls, params, cls.registry_name, skip=("seed",))
        return cls(**params, seed=seed)

    @property
    def name(self) -> str:
        return self.registry_name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"

    def get_config(self) -> dict[str, Any]:
        params = {k: v for k, v in vars(self).items() if not k.endswith("_") and k != "seed"}
        return {"head": self.name, "params": params, "seed": self.seed}

    def _inputs(self, fs: FeatureSet) -> tuple[str, ...]:
        return check_inputs(
            fs, head=self.name, modalities=self.modalities, require=self.require, tokens=False
        )

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(f"this {self!r} is not fitted yet; call fit(train, val) first")

    def predict_proba(self, rows: FeatureSet) -> np.ndarray:
        """(n, C) class probabilities for every row of `rows`, in order."""
        self._check_fitted()
        if len(rows) == 0:
            return np.zeros((0, len(self.classes_)))
        proba = self.model_.predict_proba(pooled_matrix(rows, self.modalities_))
        return full_proba(proba, self.seen_, len(self.classes_))

    def save(self, folder: str | Path) -> None:
        """folder/model.joblib (the fitted estimator) + folder/head.json (what it is)."""
        import joblib

        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        joblib.dump(self, folder / "model.joblib")
        meta = {
            "kind": self.kind,
            **self.get_config(),
            "modalities": list(self.modalities_),
            "classes": list(self.classes_),
            "needs_tokens": False,
            "best_iteration": self.best_iteration_,
            "n_params": self.n_params_,
        }
        (folder / "head.json").write_text(json.dumps(meta, indent=2, default=str))

    @classmethod
    def load(cls, folder: str | Path, **_: Any) -> PooledEstimator:
        """The estimator saved by save(); a missing or damaged file is a DamagedModelError."""
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
        if not isinstance(model, PooledEstimator) or not hasattr(model, "model_"):
            raise DamagedModelError(
                f"{path} holds {type(model).__name__}, not a fitted fusebench head; rerun the "
                "`fusebench fuse` or `compare` command that made the run"
            )
        return model

    def _fitted(self, train: FeatureSet, modalities: tuple[str, ...], start: float) -> None:
        self.train_time_ = time.perf_counter() - start
        self.modalities_ = modalities
        self.classes_ = tuple(train.classes)


@register_head("logreg")
class LogRegHead(PooledEstimator):
    """Standardized pooled features -> multinomial logistic regression (scikit-learn).

    It has no epochs to choose: `val` is accepted for the common interface and not used."""

    bounds = {"C": POSITIVE, "max_iter": POSITIVE_INT}

    def __init__(
        self,
        *,
        C: float = 1.0,
        max_iter: int = 2000,
        class_weight: str | None = None,
        seed: int = 42,
    ) -> None:
        self.C = C
        self.max_iter = max_iter
        self.class_weight = class_weight
        self.seed = seed

    def fit(
        self, train: FeatureSet, val: FeatureSet | None = None, *, quiet: bool = True
    ) -> LogRegHead:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        modalities = self._inputs(train)
        start = time.perf_counter()
        model = make_pipeline(
            StandardScaler(),
            LogisticRegression(
                C=self.C,
                max_iter=self.max_iter,
                class_weight=self.class_weight,
                random_state=self.seed,
            ),
        )
        model.fit(pooled_matrix(train, modalities), train.label)
        self.model_ = model
        self.seen_ = model.classes_.astype(np.int64)
        lr = model[-1]
        self.n_params_ = int(lr.coef_.size + lr.intercept_.size)
        self.best_iteration_ = int(np.max(lr.n_iter_))
        self._fitted(train, modalities, start)
        return self


@register_head("lightgbm")
class LightGBMHead(PooledEstimator):
    """LightGBM multiclass on pooled features; boosting stops when the multi-logloss on the
    inner validation rows has not improved for `early_stopping_rounds` rounds.

    n_params_ counts tree nodes (split thresholds + leaf values) up to the best iteration."""

    bounds = {
        "n_estimators": POSITIVE_INT,
        "learning_rate": POSITIVE,
        "num_leaves": Bound(low=2),
        "min_child_samples": NON_NEGATIVE,
        "subsample": SHARE,
        "colsample_bytree": SHARE,
        "reg_lambda": NON_NEGATIVE,
        "max_bin": Bound(low=2),
        "early_stopping_rounds": POSITIVE_INT,
        "n_jobs": NON_NEGATIVE,
    }

    def __init__(
        self,
        *,
        n_estimators: int = 500,
        learning_rate: float = 0.1,
        num_leaves: int = 15,
        min_child_samples: int = 10,
        subsample: float = 0.8,
        colsample_bytree: float = 0.5,
        reg_lambda: float = 1.0,
        max_bin: int = 255,
        early_stopping_rounds: int = 30,
        n_jobs: int = 0,
        class_weight: str | None = None,
        seed: int = 42,
    ) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.max_bin = max_bin
        self.early_stopping_rounds = early_stopping_rounds
        self.n_jobs = n_jobs
        self.class_weight = class_weight
        self.seed = seed

    def fit(
        self, train: FeatureSet, val: FeatureSet | None = None, *, quiet: bool = True
    ) -> LightGBMHead:
        import lightgbm as lgb

        modalities = self._inputs(train)
        start = time.perf_counter()
        seen = np.unique(train.label)
        code = {c: k for k, c in enumerate(seen)}  # lightgbm wants labels 0..k-1
        x = pooled_matrix(train, modalities)
        y = np.array([code[c] for c in train.label])
        model = lgb.LGBMClassifier(
            objective="multiclass" if len(seen) > 2 else "binary",
            n_estimators=self.n_estimators,
            learning_rate=self.learning_rate,
            num_leaves=self.num_leaves,
            min_child_samples=self.min_child_samples,
            subsample=self.subsample,
            subsample_freq=1 if self.subsample < 1 else 0,
            colsample_bytree=self.colsample_bytree,
            reg_lambda=self.reg_lambda,
            max_bin=self.max_bin,
            class_weight=self.class_weight,
            random_state=self.seed,
            n_jobs=self.n_jobs or None,
            deterministic=True,  # with a fixed histogram layout, same seed -> same trees
            force_col_wise=True,  # few rows, many feature columns: col-wise is the faster layout
            verbose=-1,
        )
        fit_kw: dict[str, Any] = {}
        if val is not None and len(val):
            keep = np.isin(val.label, seen)
            xv = pooled_matrix(val, modalities)[keep]
            yv = np.array([code[c] for c in val.label[keep]])
            # lightgbm >= 4.6 names the validation data eval_X / eval_y; older ones eval_set
            new_api = "eval_X" in inspect.signature(lgb.LGBMClassifier.fit).parameters
            fit_kw = {"eval_X": (xv,), "eval_y": (yv,)} if new_api else {"eval_set": [(xv, yv)]}
            fit_kw["callbacks"] = [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]
        model.fit(x, y, **fit_kw)
        self.model_ = model
        self.seen_ = seen.astype(np.int64)
        self.best_iteration_ = int(model.best_iteration_ or model.n_estimators_)
        trees = model.booster_.dump_model(num_iteration=self.best_iteration_)["tree_info"]
        self.n_params_ = int(sum(2 * t["num_leaves"] - 1 for t in trees))
        self._fitted(train, modalities, start)
        return self
