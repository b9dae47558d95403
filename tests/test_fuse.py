"""Stage two on synthetic caches written with cache.write_features: every head learns a planted
signal, the protocol never shows scored rows to a head before scoring, runs are reproducible,
and `fuse` / `compare` / `predict` leave what a researcher expects on disk."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fusebench.cache import FAILED, OK, TokenFeatures, write_features
from fusebench.fuse import (
    FeatureMismatchError,
    StratifiedProtocol,
    build_head,
    list_heads,
    load_feature_set,
)
from fusebench.fuse.experiment import evaluate_head
from fusebench.fuse.metrics import aggregate
from fusebench.fuse.nets import TorchClassifier
from fusebench.fuse.protocol import Fold, scorable_rows
from fusebench.fuse.registry import CONFIG_DIR, HEADS, Registry, UnknownHeadError, get_head
from fusebench.fuse.trainer import batches, class_weight_vector
from sklearn.exceptions import NotFittedError
from sklearn.metrics import f1_score

from tests.conftest import cli as invoke
from tests.conftest import write_noise_cache

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("negative", "neutral", "positive")
EPOCHS = 8  # enough for every torch head on the easy set; early stopping may end sooner
SMALL = {
    "lightgbm": {"n_estimators": 150, "n_jobs": 1}
}  # boosting never stops early on separable data


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- synthetic caches


def synthetic(
    *,
    n_train: int = 240,
    n_test: int = 40,
    signal: float = 0.6,
    seed: int = 0,
    dt: int = 16,
    di: int = 24,
    lt: int = 8,
    li: int = 6,
    tokens: bool = True,
) -> dict:
    """Rows whose text and image features both carry the class (mean shift by signal * mu_y).

    Guids are shuffled numbers (file order != sorted order); test rows are interleaved with
    train rows and keep their true class in "truth" (the cache stores label -1)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = rng.integers(0, 3, n)
    split = np.array(["train"] * n_train + ["test"] * n_test, dtype=object)
    rng.shuffle(split)
    guid = [str(g) for g in rng.permutation(10_000)[:n] + 10_000]
    mu_t, mu_i = rng.normal(size=(3, dt)), rng.normal(size=(3, di))
    lengths = rng.integers(2, lt + 1, n)
    mask = np.arange(lt)[None, :] < lengths[:, None]  # (n, lt)
    t_tok = (rng.normal(size=(n, lt, dt)) + signal * mu_t[y][:, None, :]) * mask[
        ..., None
    ]  # padded = 0
    i_tok = rng.normal(size=(n, li, di)) + signal * mu_i[y][:, None, :]
    text = TokenFeatures(
        t_tok.astype(np.float16) if tokens else None,
        mask if tokens else None,
        {"pooled": (t_tok.sum(1) / lengths[:, None]).astype(np.float16)},
        {"pooled": "mean"},
    )
    image = TokenFeatures(
        i_tok.astype(np.float16) if tokens else None,
        None,
        {"pooled": i_tok[:, 0].astype(np.float16)},
        {"pooled": "cls"},
    )
    label = np.where(split == "train", y, -1)
    return {
        "guid": guid,
        "split": list(split),
        "label": label,
        "text": text,
        "image": image,
        "truth": y,
    }


def write(
    path: Path, data: dict, *, text: bool = True, image: bool = True, rows=None, status=None
) -> Path:
    """One cache file holding the chosen modalities, for the chosen rows (in that order)."""
    rows = np.arange(len(data["guid"])) if rows is None else np.asarray(rows)
    return write_features(
        path,
        guid=[data["guid"][r] for r in rows],
        split=[data["split"][r] for r in rows],
        label=data["label"][rows],
        classes=CLASSES,
        text=data["text"].take(rows) if text else None,
        image=data["image"].take(rows) if image else None,
        status=None if status is None else status[rows],
        config={"encoder": path.stem},
        attrs={"encoder": path.stem},
    )


@pytest.fixture(scope="module")
def easy(tmp_path_factory) -> dict:
    data = synthetic()
    root = tmp_path_factory.mktemp("easy")
    write(root / "syn.h5", data)
    data["dir"] = root
    data["fs"] = load_feature_set(root, text="syn", image="syn", tokens=True)
    data["folds"] = StratifiedProtocol(val_ratio=0.2).splits(data["fs"])
    return data


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> dict:
    """A weak signal: scores well above chance but far from 1, so seeds and epochs matter."""
    data = synthetic(signal=0.12, seed=1, tokens=False)
    root = tmp_path_factory.mktemp("noisy")
    write(root / "syn.h5", data)
    data["fs"] = load_feature_set(root, text="syn", image="syn")
    data["folds"] = StratifiedProtocol(val_ratio=0.2).splits(data["fs"])
    return data


def perturbed(fs, modality: str, seed: int = 5):
    """fs with every feature of `modality` replaced by noise of the same shapes."""
    rng = np.random.default_rng(seed)
    mod = fs.modality(modality)
    f = mod.feats
    noise = TokenFeatures(
        None if f.tokens is None else rng.normal(size=f.tokens.shape).astype(np.float16),
        f.mask,
        {k: rng.normal(size=v.shape).astype(np.float16) for k, v in f.pooled.items()},
        f.pooling,
    )
    return replace(fs, **{modality: replace(mod, feats=noise)})


def one_run_dir(runs: Path) -> Path:
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    return run_dir


# ---------------------------------------------------------------- a. heads learn; unimodal heads are unimodal


@pytest.mark.parametrize("name", list_heads())
def test_every_head_beats_chance_on_a_planted_signal(name, easy):
    (run,) = evaluate_head(
        name, easy["fs"], easy["folds"], seeds=[0], epochs=EPOCHS, overrides=SMALL.get(name)
    )
    assert run.metrics["macro_f1"] > 0.8, (name, run.metrics["macro_f1"])  # chance is ~0.33
    assert run.metrics["n_params"] > 0
    assert run.proba.shape == (len(easy["folds"][0].scored), 3)


@pytest.mark.parametrize(
    ("name", "own", "other"), [("text_only", "text", "image"), ("image_only", "image", "text")]
)
def test_unimodal_heads_ignore_the_other_modality(name, own, other, easy):
    fs, fold = easy["fs"], easy["folds"][0]
    head = build_head(name, seed=0, epochs=3).fit(fs.take(fold.fit), fs.take(fold.inner_val))
    scored = fs.take(fold.scored)
    base = head.predict_proba(scored)
    assert np.array_equal(base, head.predict_proba(perturbed(scored, other)))
    assert not np.allclose(
        base, head.predict_proba(perturbed(scored, own))
    )  # the check can see a change


def test_unimodal_head_runs_on_a_unimodal_feature_set(easy):
    fs = load_feature_set(easy["dir"], text="syn", image=None)
    (run,) = evaluate_head(
        "text_only", fs, StratifiedProtocol(val_ratio=0.2).splits(fs), seeds=[0], epochs=EPOCHS
    )
    assert fs.image is None and run.metrics["macro_f1"] > 0.8
    with pytest.raises(ValueError, match="needs text and image features.*--image"):
        build_head("concat_mlp").fit(fs, fs)


# ---------------------------------------------------------------- b. protocol hygiene


class SpyHead:
    """Records which guids it is fitted, early-stopped and scored on."""

    modalities = ("text", "image")
    require = "any"
    registry_name = "spy"
    calls: list = []

    def __init__(self, seed: int) -> None:
        self.seed = seed

    @classmethod
    def uses_tokens(cls, params) -> bool:
        return False

    @classmethod
    def from_config(cls, params, *, seed, **_):
        return cls(seed)

    def fit(self, train, val, *, quiet=True):
        SpyHead.calls.append({"seed": self.seed, "fit": set(train.guid), "val": set(val.guid)})
        self.train_time_, self.n_params_, self.best_iteration_ = 0.0, 0, None
        return self

    def predict_proba(self, rows):
        SpyHead.calls[-1]["scored"] = set(rows.guid)
        return np.full((len(rows), 3), 1 / 3)


@pytest.mark.parametrize(
    "protocol", [StratifiedProtocol(folds=4), StratifiedProtocol(val_ratio=0.1)]
)
def test_scored_rows_never_reach_fit_or_early_stopping(protocol, easy, monkeypatch):
    monkeypatch.setitem(HEADS._items, "spy", SpyHead)
    monkeypatch.setattr(SpyHead, "calls", [])
    fs = easy["fs"]
    labelled = set(fs.guid[scorable_rows(fs)])
    test_rows = set(fs.guid[fs.split == "test"])
    assert labelled and test_rows
    evaluate_head("spy", fs, protocol.splits(fs), seeds=[1, 2])
    calls = SpyHead.calls
    assert len(calls) == 2 * (protocol.folds or 1)
    for c in calls:
        assert not c["fit"] & c["scored"]
        assert not c["val"] & c["scored"]  # early stopping / model selection never sees scored rows
        assert not c["fit"] & c["val"]
        assert (
            c["fit"] | c["val"] | c["scored"] == labelled
        )  # only labelled train rows, all of them
        assert not (c["fit"] | c["val"] | c["scored"]) & test_rows
        assert c["val"]  # there is an inner split to stop on
    by_seed = [[c["scored"] for c in calls if c["seed"] == s] for s in (1, 2)]
    assert by_seed[0] == by_seed[1]  # model seeds do not move the split
    if protocol.folds:
        assert sorted(g for s in by_seed[0] for g in s) == sorted(
            labelled
        )  # each row scored exactly once


def test_leak_canary_scores_chance_on_unlearnable_labels(tmp_path):
    """Random labels on random 400-dim features: logreg memorizes whatever it fits on, so
    honest scoring is near chance while any scored row that leaked into fitting is right."""
    write_noise_cache(tmp_path / "noise.h5", n=300, dim=200)
    fs = load_feature_set(tmp_path, text="noise", image="noise")
    folds = StratifiedProtocol(folds=5).splits(fs)
    honest = evaluate_head("logreg", fs, folds, seeds=[0], overrides={"C": 100.0})
    assert np.mean([r.metrics["accuracy"] for r in honest]) < 0.5
    # the canary can fail: the same head, fitted with the scored rows, "scores" near 1
    leaky = [Fold(f.index, np.concatenate([f.fit, f.scored]), f.inner_val, f.scored) for f in folds]
    leaked = evaluate_head("logreg", fs, leaky, seeds=[0], overrides={"C": 100.0})
    assert np.mean([r.metrics["accuracy"] for r in leaked]) > 0.9


# ---------------------------------------------------------------- c. seeds


def test_same_seed_same_numbers_other_seeds_differ(noisy):
    fs, folds = noisy["fs"], noisy["folds"]

    def numbers(runs):
        return [
            ({k: v for k, v in r.metrics.items() if k != "train_time_s"}, r.proba) for r in runs
        ]

    a = numbers(evaluate_head("concat_mlp", fs, folds, seeds=[7], epochs=6))
    b = numbers(evaluate_head("concat_mlp", fs, folds, seeds=[7], epochs=6))
    assert a[0][0] == b[0][0] and np.array_equal(a[0][1], b[0][1])
    runs = evaluate_head("concat_mlp", fs, folds, seeds=[1, 2, 3], epochs=6)
    summary = aggregate([r.metrics for r in runs], fs.classes)
    assert summary["macro_f1"]["n"] == 3 and summary["macro_f1"]["std"] > 0
    assert 0.4 < summary["macro_f1"]["mean"] < 0.95  # a task where seeds can matter


def test_trainer_restores_the_best_epoch_and_stops_early(noisy):
    fs, fold = noisy["fs"], noisy["folds"][0]
    train, val = fs.take(fold.fit), fs.take(fold.inner_val)
    head = build_head(
        "concat_mlp", seed=0, overrides={"train": {"patience": 0, "epochs": 12, "lr": 3e-3}}
    )
    head.fit(train, val)
    f1s = [h["val_macro_f1"] for h in head.history_]
    assert len(f1s) == 12 and head.best_iteration_ == 1 + int(np.argmax(f1s))
    assert head.best_iteration_ < 12  # the last epoch was not the best, so restoring matters
    now = f1_score(
        val.label,
        head.predict_proba(val).argmax(1),
        average="macro",
        labels=[0, 1, 2],
        zero_division=0,
    )
    assert now == pytest.approx(max(f1s))
    stopped = build_head(
        "concat_mlp", seed=0, overrides={"train": {"patience": 2, "epochs": 50, "lr": 3e-3}}
    )
    stopped.fit(train, val)
    assert len(stopped.history_) == stopped.best_iteration_ + 2 < 50


def test_length_bucketing_covers_every_row_once_and_cuts_padding():
    lengths = np.random.default_rng(0).integers(1, 128, 1000)
    bucketed = batches(1000, 32, np.random.default_rng(1), lengths)
    plain = batches(1000, 32, np.random.default_rng(1), None)
    ordered = batches(1000, 256, None, lengths)  # evaluation: no rng
    for b in (bucketed, plain, ordered):
        assert sorted(np.concatenate(b).tolist()) == list(range(1000))

    def padded(bs):
        return sum(len(b) * lengths[b].max() for b in bs)

    assert padded(bucketed) < 0.7 * padded(plain)


def test_class_weights_reach_every_kind_of_head():
    assert np.allclose(class_weight_vector(np.array([0, 0, 0, 1]), 3), [4 / 9, 4 / 3, 0.0])
    assert build_head("late", class_weights=True).train.class_weights is True
    assert build_head("lightgbm", class_weights=True).class_weight == "balanced"
    assert build_head("logreg", class_weights=False).class_weight is None


# ---------------------------------------------------------------- registry and configs


def test_registry_and_configs_match():
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} == set(list_heads())
    assert {
        "cross_attn",
        "concat_mlp",
        "late",
        "gated",
        "clip_match",
        "text_only",
        "image_only",
        "lightgbm",
        "logreg",
    } <= set(list_heads())


def test_registry_refuses_duplicates_and_lists_valid_names():
    reg = Registry("head")
    reg.register("a")(type("A", (), {}))
    with pytest.raises(ValueError, match="'a' is already registered"):
        reg.register("a")(type("B", (), {}))
    with pytest.raises(ValueError, match="already registered"):
        HEADS.register("concat_mlp")(type("Impostor", (), {}))
    assert get_head("concat_mlp").__name__ == "ConcatMLP"
    with pytest.raises(UnknownHeadError, match="unknown head 'nope'; valid heads: .*concat_mlp"):
        get_head("nope")
    with pytest.raises(ValueError, match="unknown hyperparameter 'widht'.*valid: hidden, dropout"):
        build_head("concat_mlp", overrides={"widht": 3})
    with pytest.raises(ValueError, match="unknown training option 'train.lrr'"):
        build_head("concat_mlp", overrides={"train": {"lrr": 1}})


@pytest.mark.parametrize("name", list_heads())
def test_predict_proba_before_fit_says_to_fit(name, easy):
    with pytest.raises(NotFittedError, match=r"call fit\(train, val\) first"):
        build_head(name).predict_proba(easy["fs"])


# ---------------------------------------------------------------- loading and joining caches


def test_join_by_guid_across_files_and_drop_failed_rows_loudly(tmp_path):
    data = synthetic(n_train=60, n_test=10, seed=2, tokens=False)
    n = len(data["guid"])
    status = np.full(n, OK, dtype=np.uint8)
    status[[3, 7]] = FAILED
    write(tmp_path / "txt.h5", data, image=False)
    order = np.random.default_rng(0).permutation(n)  # the image file lists rows in another order
    write(tmp_path / "img.h5", data, text=False, rows=order, status=status)
    fs = load_feature_set(tmp_path, text="txt", image="img")
    assert len(fs) == n - 2 and {e.guid for e in fs.excluded} == {data["guid"][3], data["guid"][7]}
    assert all("image failed in img.h5" in e.reason for e in fs.excluded)
    assert "left out 2 of" in fs.describe_excluded()
    for k in range(len(fs)):
        i = data["guid"].index(fs.guid[k])
        assert np.array_equal(fs.image.pooled(np.array([k]))[0], data["image"].pooled["pooled"][i])
        assert np.array_equal(fs.text.pooled(np.array([k]))[0], data["text"].pooled["pooled"][i])
    assert list(fs.cache_order("test")) == [
        g for g, s in zip(data["guid"], data["split"]) if s == "test"
    ]


def test_caches_that_disagree_are_refused(tmp_path):
    data = synthetic(n_train=30, n_test=5, seed=4, tokens=False)
    write(tmp_path / "txt.h5", data, image=False)
    other = dict(data, label=data["label"].copy(), split=list(data["split"]))
    k = int(np.flatnonzero(data["label"] >= 0)[3])
    other["label"][k] = (other["label"][k] + 1) % 3
    write(tmp_path / "img.h5", other, text=False)
    with pytest.raises(FeatureMismatchError, match=f"label of guid {data['guid'][k]}"):
        load_feature_set(tmp_path, text="txt", image="img")
    write(tmp_path / "img.h5", data, text=False, rows=np.arange(1, len(data["guid"])))
    with pytest.raises(
        FeatureMismatchError, match=f"guid {data['guid'][0]} is in txt.h5 but not in img.h5"
    ):
        load_feature_set(tmp_path, text="txt", image="img")


# ---------------------------------------------------------------- e. CLI: fuse, predict, compare


def test_fuse_then_predict_writes_guid_tag_in_cache_order(tmp_path):
    data = synthetic(seed=6)
    status = np.full(len(data["guid"]), OK, dtype=np.uint8)
    failed_test = int(np.flatnonzero(np.array(data["split"]) == "test")[2])
    failed_train = int(np.flatnonzero(np.array(data["split"]) == "train")[0])
    status[[failed_test, failed_train]] = FAILED
    feats = tmp_path / "features" / "ds"
    write(feats / "syn.h5", data, status=status)
    r = invoke(
        "fuse",
        "--head",
        "concat_mlp",
        "--features",
        feats,
        "--text",
        "syn",
        "--image",
        "syn",
        "--epochs",
        5,
        "--out",
        tmp_path / "runs",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert "left out 2 of 280 cache rows" in r.stderr
    run_dir = one_run_dir(tmp_path / "runs")
    assert run_dir.name.endswith("-concat_mlp")
    model = "models/syn_syn_concat_mlp/seed42-fold0"  # the contract: models/<slug>/seedS-foldK
    for name in (
        "config.yaml",
        "results.json",
        "results.csv",
        "runs.csv",
        "val_predictions.csv",
        "confusion.png",
        f"{model}/head.json",
        f"{model}/state.pt",
    ):
        assert (run_dir / name).stat().st_size > 0, name
    metrics = json.loads((run_dir / "results.json").read_text())
    assert metrics["ranking"] == ["syn+syn/concat_mlp"]
    assert metrics["cells"]["syn+syn/concat_mlp"]["summary"]["macro_f1"]["mean"] > 0.8
    with open(run_dir / "val_predictions.csv") as fh:
        val = list(csv.DictReader(fh))
    assert len(val) == metrics["runs"][0]["per_class"]["negative"]["support"] + sum(
        metrics["runs"][0]["per_class"][c]["support"] for c in CLASSES[1:]
    )
    assert set(val[0]) >= {"guid", "true", "pred", "p_negative", "p_neutral", "p_positive"}

    out = tmp_path / "predictions.txt"
    r = invoke("predict", "--run", run_dir, "--split", "test", "--out", out)
    assert r.exit_code == 0, r.output
    lines = out.read_text().splitlines()
    assert lines[0] == "guid,tag"
    rows = [line.split(",") for line in lines[1:]]
    test_guids = [g for g, s in zip(data["guid"], data["split"]) if s == "test"]
    assert [g for g, _ in rows] == test_guids  # every test row, in the cache's order
    tags = dict(rows)
    assert tags[data["guid"][failed_test]] == ""  # marked: no features, no stand-in class
    assert {t for g, t in rows if g != data["guid"][failed_test]} <= set(CLASSES)
    assert data["guid"][failed_test] in r.stderr and "EMPTY tag" in r.stderr
    truth = {data["guid"][i]: CLASSES[data["truth"][i]] for i in range(len(data["guid"]))}
    hits = [t == truth[g] for g, t in rows if g != data["guid"][failed_test]]
    assert np.mean(hits) > 0.8  # the saved model is the trained one, not a fresh init


def test_compare_ranks_heads_and_writes_results(tmp_path):
    data = synthetic(seed=8, tokens=False)
    feats = tmp_path / "ds"
    write(feats / "txt.h5", data, image=False)
    write(
        feats / "img.h5",
        data,
        text=False,
        rows=np.random.default_rng(1).permutation(len(data["guid"])),
    )
    r = invoke(
        "compare",
        "--heads",
        "logreg,text_only,concat_mlp",
        "--features",
        feats,
        "--text",
        "txt",
        "--image",
        "img",
        "--folds",
        2,
        "--seeds",
        "1,2",
        "--epochs",
        3,
        "--out",
        tmp_path / "runs",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    run_dir = one_run_dir(tmp_path / "runs")
    with open(run_dir / "results.csv") as fh:
        results = list(csv.DictReader(fh))
    f1 = [float(row["macro_f1_mean"]) for row in results]
    assert f1 == sorted(f1, reverse=True) and {row["head"] for row in results} == {
        "logreg",
        "text_only",
        "concat_mlp",
    }
    assert all(row["runs"] == "4" and float(row["macro_f1_std"]) >= 0 for row in results)
    table = [line.split()[3] for line in r.stdout.splitlines()[2:5]]  # rank, text, image, head
    assert table == [row["head"] for row in results]  # stdout table in the same (ranked) order
    assert "±" in r.stdout
    saved = json.loads((run_dir / "results.json").read_text())
    assert len(saved["runs"]) == 3 * 2 * 2
    assert saved["ranking"] == [row["cell"] for row in results]
    assert [saved["cells"][c]["head"] for c in saved["ranking"]] == table
    for name in (
        "scores.png",
        "confusion.png",
        "runs.csv",
        "config.yaml",
        "models/txt_img_logreg/seed1-fold0/model.joblib",
        "models/txt_img_logreg/seed2-fold1/model.joblib",
    ):
        assert (run_dir / name).stat().st_size > 0, name
    out = tmp_path / "pred.txt"
    r = invoke("predict", "--run", run_dir, "--head", "logreg", "--out", out)
    assert r.exit_code == 0, r.output
    assert len(out.read_text().splitlines()) == 1 + data["split"].count("test")


def test_compare_all_skips_heads_the_features_cannot_feed(tmp_path):
    data = synthetic(
        n_train=90, n_test=5, seed=9, signal=0.0, tokens=False
    )  # boosting stops at once
    write(tmp_path / "syn.h5", data)
    r = invoke(
        "compare",
        "--features",
        tmp_path,
        "--text",
        "syn",
        "--image",
        "syn",
        "--seeds",
        "1",
        "--epochs",
        1,
        "--out",
        tmp_path / "runs",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert "skipping syn+syn/cross_attn: head 'cross_attn' needs text tokens" in " ".join(
        r.stderr.split()
    )
    assert "cross_attn" not in r.stdout and "logreg" in r.stdout


# ---------------------------------------------------------------- CLI errors


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    data = synthetic(n_train=30, n_test=5, seed=10, tokens=False)
    write(tmp_path / "syn.h5", data)
    r = invoke("fuse", "--head", "nope", "--features", tmp_path, "--text", "syn", "--image", "syn")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "unknown head 'nope'" in r.stderr and "concat_mlp" in r.stderr and "lightgbm" in r.stderr
    r = invoke(
        "compare",
        "--heads",
        "logreg,nope",
        "--features",
        tmp_path,
        "--text",
        "syn",
        "--image",
        "syn",
    )
    assert r.exit_code == 2 and "unknown head 'nope'" in r.stderr
    r = invoke(
        "fuse", "--head", "cross_attn", "--features", tmp_path, "--text", "syn", "--image", "syn"
    )
    assert r.exit_code == 2 and "stores pooled text features only" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = invoke(
        "fuse",
        "--head",
        "logreg",
        "--features",
        tmp_path / "missing",
        "--text",
        "syn",
        "--image",
        "syn",
    )
    assert r.exit_code == 2 and "does not exist" in r.stderr
    r = invoke(
        "fuse", "--head", "logreg", "--features", tmp_path, "--text", "bert", "--image", "syn"
    )
    assert r.exit_code == 2 and "caches in" in r.stderr and "syn" in r.stderr
    r = invoke(
        "fuse",
        "--head",
        "logreg",
        "--features",
        tmp_path,
        "--text",
        "syn",
        "--image",
        "syn",
        "--val-ratio",
        0.2,
        "--folds",
        3,
    )
    assert r.exit_code == 2 and "either --val-ratio or --folds" in r.stderr
    r = invoke("predict", "--run", tmp_path / "no-run")
    assert r.exit_code == 2 and "no run folder" in r.stderr


def test_cli_refuses_caches_with_mismatched_labels(tmp_path):
    data = synthetic(n_train=30, n_test=5, seed=11, tokens=False)
    write(tmp_path / "txt.h5", data, image=False)
    k = int(np.flatnonzero(data["label"] >= 0)[0])
    bad = dict(data, label=data["label"].copy())
    bad["label"][k] = (bad["label"][k] + 1) % 3
    write(tmp_path / "img.h5", bad, text=False)
    r = invoke(
        "fuse",
        "--head",
        "logreg",
        "--features",
        tmp_path,
        "--text",
        "txt",
        "--image",
        "img",
        "--out",
        tmp_path / "runs",
    )
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"guid {data['guid'][k]}" in r.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- f. stage two never loads stage one


def test_importing_fuse_leaves_extract_and_transformers_out():
    modules = sorted(p.stem for p in (ROOT / "fuse").glob("*.py") if p.stem != "__init__")
    code = (
        f"import fusebench.fuse, {', '.join('fusebench.fuse.' + m for m in modules)}; "
        "import sys; bad = [m for m in sys.modules if m == 'transformers' "
        "or m.startswith('transformers.') or m == 'fusebench.extract' "
        "or m.startswith('fusebench.extract.')]; assert not bad, bad"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert len(modules) >= 8  # every fuse module was imported, not just the package


def test_labelled_rows_outside_train_are_named_not_silently_unused(tmp_path):
    """A manifest's own `val` rows carry labels; the protocol fits and scores on split 'train'
    only, so a run must say so (stderr note + config.yaml), never leave them silently unused."""
    data = synthetic(n_train=90, n_test=0, tokens=False, seed=3)
    data["split"] = ["val" if k < 12 else s for k, s in enumerate(data["split"])]
    write(tmp_path / "feats" / "syn.h5", data)
    result = invoke(
        "fuse",
        "--head",
        "logreg",
        "--features",
        str(tmp_path / "feats"),
        "--text",
        "syn",
        "--image",
        "syn",
        "--out",
        str(tmp_path / "runs"),
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert "12 in split 'val'" in result.output
    assert "--split val" in result.output
    config = yaml_load(next((tmp_path / "runs").iterdir()) / "config.yaml")
    assert config["rows"]["labelled_unused"] == {"val": 12}
    assert config["rows"]["labelled_train"] == 78


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_standardized_inputs_keep_a_head_from_collapsing_on_outlier_dimensions(tmp_path):
    """A few huge, uninformative dimensions (as MiniLM's middle layers have) made the torch
    heads predict the majority class; inputs standardised with the FIT rows' statistics learn
    the signal. The statistics are the fit rows' own (never the scored rows'), saved with the
    weights, and a loaded model predicts the same."""
    data = synthetic(seed=5, tokens=False, n_train=300, n_test=0)
    pooled = data["text"].pooled["pooled"].astype(np.float32)
    rng = np.random.default_rng(0)
    pooled[:, :3] = 600 + 300 * rng.standard_normal((len(pooled), 3))  # noise, huge scale
    data["text"] = TokenFeatures(
        None, None, {"pooled": pooled.astype(np.float16)}, {"pooled": "mean"}
    )
    write(tmp_path / "syn.h5", data, image=False)
    fs = load_feature_set(tmp_path, text="syn", image=None)
    fold = StratifiedProtocol(val_ratio=0.3).splits(fs)[0]
    scores = {}
    for standardize in (False, True):
        head = build_head(
            "text_only",
            seed=0,
            epochs=15,
            device="cpu",
            overrides={"train": {"standardize": standardize}},
        )
        head.fit(fs.take(fold.fit), fs.take(fold.inner_val))
        scored = fs.take(fold.scored)
        proba = head.predict_proba(scored)
        scores[standardize] = f1_score(scored.label, proba.argmax(1), average="macro")
    assert scores[True] > 0.8 > scores[False] + 0.2, scores
    fit_rows = fs.take(fold.fit).text.pooled().astype(np.float64)
    np.testing.assert_allclose(
        head.module_.text_pooled_mean.numpy(), fit_rows.mean(0), rtol=1e-4, atol=1e-3
    )
    head.save(tmp_path / "model")
    again = TorchClassifier.load(tmp_path / "model", device="cpu")
    np.testing.assert_allclose(again.predict_proba(scored), proba, atol=1e-6)


def test_standardized_tokens_keep_padding_zero():
    import torch
    from fusebench.fuse.trainer import Standardized

    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, **inputs):
            seen.update(inputs)
            return torch.zeros(2, 3)

    module = Standardized(Probe(), {"text_tokens": 4}).set_stats(
        {"text_tokens": (np.full(4, 5.0), np.full(4, 2.0))}
    )
    tokens = torch.full((2, 3, 4), 7.0)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    module(text_tokens=tokens * mask.unsqueeze(-1), text_mask=mask)
    assert torch.equal(seen["text_tokens"][mask], torch.ones(3, 4))  # (7 - 5) / 2
    assert torch.equal(seen["text_tokens"][~mask], torch.zeros(3, 4))
