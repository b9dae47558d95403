"""The head contract (fuse/head.py, issue 15 item 3): every registered head fits, predicts,
saves, loads and describes itself the same way; a head defined here, in one class plus its
YAML, runs through compare, predict and report with no other change; and cells whose inputs
are byte-identical (two caches of one model that differ only in pooling) are fitted once."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from fusebench.cache import TokenFeatures, write_features
from fusebench.fuse import StratifiedProtocol, build_head, list_heads, load_feature_set
from fusebench.fuse.features import FeatureSet
from fusebench.fuse.head import HEADS, BaseHead, Head, register_head
from fusebench.fuse.nets import TorchClassifier
from fusebench.fuse.predict import load_head
from fusebench.fuse.registry import get_head

from tests.conftest import cli as invoke
from tests.test_fuse import synthetic, write

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {  # tiny settings, so a fit takes a moment
    "cross_attn": {"dim": 16, "num_heads": 2, "hidden": 16},
    "lightgbm": {"n_estimators": 20},
}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- a head from outside fusebench


class CentroidHead(BaseHead):
    """Nearest class centroid on the pooled vectors: softmax(-squared distance / temperature).
    All of a plugin head: keyword-only hyperparameters, fit, predict_proba (BaseHead does the
    rest: from_config, get_config, save, load)."""

    params_meaning = "centroid coordinates (classes x features)"

    def __init__(self, *, temperature: float = 1.0, seed: int = 42) -> None:
        self.temperature = temperature
        self.seed = seed

    def _x(self, fs: FeatureSet) -> np.ndarray:
        return np.concatenate([fs.modality(m).pooled() for m in self.modalities_], 1)

    def fit(
        self, train: FeatureSet, val: FeatureSet | None = None, *, quiet: bool = True
    ) -> CentroidHead:
        start = time.perf_counter()
        self.modalities_ = tuple(m for m in self.modalities if train.modality(m) is not None)
        x = self._x(train).astype(np.float64)
        self.centroids_ = np.stack(
            [x[train.label == k].mean(0) for k in range(train.n_classes)]
        )  # (C, D)
        self.classes_ = tuple(train.classes)
        self.n_params_, self.best_iteration_ = int(self.centroids_.size), None
        self.train_time_ = time.perf_counter() - start
        return self

    def predict_proba(self, rows: FeatureSet) -> np.ndarray:
        self._check_fitted()
        x = self._x(rows).astype(np.float64)  # (n, D)
        z = -((x[:, None] - self.centroids_[None]) ** 2).sum(-1) / self.temperature  # (n, C)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)


@pytest.fixture
def toy(tmp_path):
    """CentroidHead registered as 'toy' with its YAML, as a user's module would; removed after."""
    config = tmp_path / "toy.yaml"
    config.write_text("temperature: 8.0  # softmax temperature over squared distances\n")
    register_head("toy", config=config)(CentroidHead)
    yield "toy"
    HEADS.unregister("toy")


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("contract")
    write(root / "syn.h5", synthetic(n_train=90, n_test=10, seed=4, dt=8, di=6))
    return root


# ---------------------------------------------------------------- every head keeps the contract


@pytest.mark.parametrize("name", [*list_heads(), "toy"])
def test_every_registered_head_keeps_the_contract(name, feats, tmp_path, request):
    if name == "toy":
        request.getfixturevalue("toy")
    fs = load_feature_set(feats, text="syn", image="syn", tokens=True)
    fold = StratifiedProtocol(val_ratio=0.2).splits(fs)[0]
    head = build_head(name, seed=3, epochs=2, device="cpu", overrides=SMALL.get(name))
    assert isinstance(head, Head)
    config = head.get_config()  # round trip: from_config(params, seed) rebuilds it
    again = get_head(config["head"]).from_config(config["params"], seed=config["seed"])
    assert again.get_config() == config and config["head"] == name

    assert head.fit(fs.take(fold.fit), fs.take(fold.inner_val)) is head
    scored = fs.take(fold.scored)
    proba = head.predict_proba(scored)
    assert proba.shape == (len(scored), fs.n_classes)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    assert head.n_params_ > 0 and type(head).params_meaning
    assert head.classes_ == fs.classes and head.modalities_

    head.save(tmp_path / "model")
    loaded = load_head(tmp_path / "model", device="cpu")
    np.testing.assert_allclose(loaded.predict_proba(scored), proba, atol=1e-6)
    assert loaded.get_config()["params"] == config["params"]


def test_a_class_without_the_contract_is_refused_at_registration():
    with pytest.raises(TypeError, match="lacks.*from_config.*BaseHead"):
        register_head("incomplete")(type("Incomplete", (), {"modalities": ("text",)}))
    assert "incomplete" not in HEADS


# ---------------------------------------------------------------- the plugin path, end to end


def test_a_head_defined_here_runs_through_compare_predict_and_report(toy, feats, tmp_path):
    out = tmp_path / "runs"
    r = invoke("compare", "--features", feats, "--text", "syn", "--image", "syn,none",
               "--heads", f"{toy},logreg", "--sweep", f"{toy}.temperature=2,8", "--folds", 2,
               "--seeds", "1,2", "--out", out, "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    (run,) = out.iterdir()
    rows = {row["cell"]: row for row in read_csv(run / "results.csv")}
    mine = [c for c in rows if f"/{toy}@" in c]
    assert len(mine) == 4  # (syn+syn, syn+none) x 2 temperatures
    assert all(rows[c]["n_params_meaning"].startswith("centroid") for c in mine)
    assert all(float(rows[c]["macro_f1_mean"]) > 0.5 for c in mine)  # a planted signal
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["cells"]["syn+syn/toy@temperature=2"]["params"] == {"temperature": 2}

    cell = "syn+syn/toy@temperature=8"
    for mode in ([], ["--refit"]):
        pred = tmp_path / f"pred{len(mode)}.csv"
        r = invoke("predict", "--run", run, "--cell", cell, "--out", pred, *mode)
        assert r.exit_code == 0, r.output
        tags = [row["tag"] for row in read_csv(pred)]
        assert len(tags) == 10 and set(tags) <= set(config["classes"])

    r = invoke("report", run, "--out", tmp_path / "report.html")
    assert r.exit_code == 0, r.output
    assert cell in (tmp_path / "report.html").read_text()


# ---------------------------------------------------------------- byte-identical inputs: one fit


def two_poolings(root: Path, n: int = 120) -> Path:
    """`mean.h5` and `cls.h5`: one text model's caches that differ only in pooling (as
    minilm and minilm-cls do): byte-identical token arrays and masks, other pooled vectors."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    lengths = rng.integers(2, 7, n)
    mask = np.arange(6)[None, :] < lengths[:, None]  # (n, 6)
    tok = (rng.normal(size=(n, 6, 8)) + 0.8 * rng.normal(size=(3, 8))[y][:, None]) * mask[..., None]
    tok = tok.astype(np.float16)
    img = rng.normal(size=(n, 4, 6)) + 0.8 * rng.normal(size=(3, 6))[y][:, None]
    pooled = {"mean": tok.astype(np.float32).sum(1) / lengths[:, None], "cls": tok[:, 0]}
    for name, vec in pooled.items():
        write_features(
            root / f"{name}.h5",
            guid=[f"g{i}" for i in range(n)],
            split=["train"] * n,
            label=y,
            classes=("negative", "neutral", "positive"),
            text=TokenFeatures(tok, mask, {"pooled": vec.astype(np.float16)}, {"pooled": name}),
            image=TokenFeatures(
                img.astype(np.float16), None, {"pooled": img[:, 0].astype(np.float16)}
            ),
            config={"encoder": name},
            attrs={"encoder": name},
        )
    return root


def test_cells_with_byte_identical_inputs_are_fitted_once(tmp_path, monkeypatch):
    feats = two_poolings(tmp_path / "f")
    fits = []
    real_fit = TorchClassifier.fit

    def counted(self, train, val=None, **kw):
        fits.append(self.name)
        return real_fit(self, train, val, **kw)

    monkeypatch.setattr(TorchClassifier, "fit", counted)
    r = invoke("compare", "--features", feats, "--text", "mean,cls", "--image", "mean",
               "--heads", "cross_attn,concat_mlp", "--set", "cross_attn.dim=16",
               "--set", "cross_attn.num_heads=2", "--folds", 2, "--seeds", "1,2",
               "--epochs", 2, "--one-at-a-time", "--out", tmp_path / "runs", "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    # cross_attn reads tokens only, identical in both caches: 2 folds x 2 seeds, once;
    # concat_mlp reads the pooled vectors, which differ: fitted for each text cache
    assert fits.count("cross_attn") == 4 and fits.count("concat_mlp") == 8
    said = " ".join(r.stderr.split())
    assert (
        "fitted once and reported under each name: cls+mean/cross_attn as mean+mean/cross_attn"
        in said
    )
    (run,) = (tmp_path / "runs").iterdir()
    rows = {row["cell"]: row for row in read_csv(run / "results.csv")}
    assert len(rows) == 4  # one row per cell name
    a, b = rows["mean+mean/cross_attn"], rows["cls+mean/cross_attn"]
    numbers = [k for k in a if k.endswith(("_mean", "_std")) or k == "runs"]
    assert all(a[k] == b[k] for k in numbers)
    f1 = {c: row["macro_f1_mean"] for c, row in rows.items()}
    assert f1["mean+mean/concat_mlp"] != f1["cls+mean/concat_mlp"]  # other pooled vectors

    def per_fit(cell: str) -> list:
        runs = read_csv(run / "runs.csv")
        return [(x["seed"], x["fold"], x["macro_f1"]) for x in runs if x["cell"] == cell]

    assert per_fit("mean+mean/cross_attn") == per_fit("cls+mean/cross_attn")
    config = yaml.safe_load((run / "config.yaml").read_text())
    shared = config["cells"]["cls+mean/cross_attn"]
    assert shared["same_fit_as"] == "mean+mean/cross_attn"
    assert [f["model_dir"] for f in shared["fits"]] == [
        f["model_dir"] for f in config["cells"]["mean+mean/cross_attn"]["fits"]
    ]
    pred = tmp_path / "p.csv"
    r = invoke("predict", "--run", run, "--cell", "cls+mean/cross_attn", "--out", pred,
               "--split", "train")  # fmt: skip
    assert r.exit_code == 0, r.output
