"""Estimator heads on pooled features: LightGBM and logistic regression.

Both read the pooled vector of every modality the FeatureSet has, concatenated
([text; image], float32), and implement the head contract (fuse/head.py) as scikit-learn
estimators do: keyword-only hyperparameters stored as given, fit(train, val) -> self, fitted
state ending in `_`; fuse.head.BaseHead saves and loads them.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import numpy as np
from fusebench.fuse.features import FeatureSet, check_inputs
from fusebench.fuse.head import BaseHead, register_head
from fusebench.fuse.params import NON_NEGATIVE, POSITIVE, POSITIVE_INT, SHARE, Bound


def pooled_matrix(fs: FeatureSet, modalities: tuple[str, ...]) -> np.ndarray:
    """(n, sum of D') float32: the pooled vectors of `modalities`, side by side."""
    return np.concatenate([fs.modality(m).pooled().astype(np.float32) for m in modalities], axis=1)


def full_proba(proba: np.ndarray, seen: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, C) from the (n, len(seen)) columns of the classes the model saw in training."""
    out = np.zeros((len(proba), n_classes), dtype=np.float64)
    out[:, seen] = proba
    return out


class PooledEstimator(BaseHead):
    """Estimator heads on the concatenated pooled vectors of whichever modalities the feature
    set has: fuse.head.BaseHead (from_config, get_config, save, load) plus their input check,
    predict_proba over the classes seen in training, and the fitted state they share."""

    require = "any"  # uses whichever modalities the feature set has
    choices = {"class_weight": (None, "balanced")}

    def _inputs(self, fs: FeatureSet) -> tuple[str, ...]:
        return check_inputs(
            fs, head=self.name, modalities=self.modalities, require=self.require, tokens=False
        )

    def predict_proba(self, rows: FeatureSet) -> np.ndarray:
        """(n, C) class probabilities for every row of `rows`, in order."""
        self._check_fitted()
        if len(rows) == 0:
            return np.zeros((0, len(self.classes_)))
        proba = self.model_.predict_proba(pooled_matrix(rows, self.modalities_))
        return full_proba(proba, self.seen_, len(self.classes_))

    def _fitted(self, train: FeatureSet, modalities: tuple[str, ...], start: float) -> None:
        self.train_time_ = time.perf_counter() - start
        self.modalities_ = modalities
        self.classes_ = tuple(train.classes)
        self.history_ = []  # no epochs


@register_head("logreg")
class LogRegHead(PooledEstimator):
    """Standardized pooled features -> multinomial logistic regression (scikit-learn).

    It has no epochs to choose: `val` is accepted for the common interface and not used."""

    params_meaning = "coefficients + intercepts"
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

    params_meaning = "tree nodes (split thresholds + leaf values) up to the best iteration"
    iteration_param = "n_estimators"  # best_iteration_: the best boosting round
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
