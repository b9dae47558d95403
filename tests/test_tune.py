"""`fusebench tune` / `compare --tune N` (fuse/tune.py): nested tuning picks the clearly best
value, never lets an outer fold's scored rows into its trials, resumes after SIGKILL with
exactly the requested trials, and fails in one line on a head without a search space or a
bad --trials. Tiny caches and logreg: the whole file runs in well under a minute."""

from __future__ import annotations

import csv
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from fusebench.fuse.classic import LogRegHead
from fusebench.fuse.head import HEADS
from fusebench.fuse.protocol import StratifiedProtocol
from fusebench.fuse.registry import head_config, list_heads, resolve_params
from fusebench.fuse.search_space import search_space
from fusebench.fuse.tune import CellTuner

from tests.conftest import cli, ok, one_line_error, write_noise_cache

CLASSES = ("negative", "neutral", "positive")


def write_signal_cache(path: Path, n: int = 150, dim: int = 8, seed: int = 0) -> dict:
    """Labels a linear function of the text vector (learnable by logreg with a sane C; a C of
    1e-6 shrinks every weight to nothing and predicts one class), plus 12 unlabelled test
    rows; returns their guid -> true class."""
    from fusebench.cache import TokenFeatures, write_features

    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n, dim))
    label = np.argmax(text[:, :3], axis=1)
    image = rng.normal(size=(n, dim))
    truth = {f"g{i}": CLASSES[label[i]] for i in range(n - 12, n)}
    split = ["train"] * (n - 12) + ["test"] * 12
    label[n - 12 :] = -1
    write_features(
        path,
        guid=[f"g{i}" for i in range(n)],
        split=split,
        label=label,
        classes=CLASSES,
        text=TokenFeatures(None, None, {"pooled": text.astype(np.float16)}),
        image=TokenFeatures(None, None, {"pooled": image.astype(np.float16)}),
    )
    return truth


class ChoiceLogReg(LogRegHead):
    """logreg, registered as logreg_tt (module level: a saved model pickles its class)."""


class SpyLog:
    fold = None  # the outer fold whose study is running (None: outside any study)
    calls: list = []


class SpyLogReg(ChoiceLogReg):
    """Records which guids every fit learns from, stops on and is scored on."""

    def fit(self, train, val, *, quiet=True):
        SpyLog.calls.append(
            {"fold": SpyLog.fold, "fit": set(train.guid), "val": set(val.guid), "pred": []}
        )
        return super().fit(train, val, quiet=quiet)

    def predict_proba(self, rows):
        SpyLog.calls[-1]["pred"].append(set(rows.guid))
        return super().predict_proba(rows)


@pytest.fixture
def choice_head():
    """logreg_tt: logreg whose default C (1e-6) is absurd and whose space is {1e-6, 1.0}."""
    name = "logreg_tt"
    HEADS.register(name, config={"C": 1e-6, "max_iter": 2000, "search": {"C": [1e-6, 1.0]}})(
        ChoiceLogReg
    )
    yield name
    HEADS.unregister(name)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def finished_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir() and not p.name.endswith(".tmp")]
    return run


def counted(db: Path) -> dict[str, int]:
    """study name -> its COMPLETE + PRUNED trials, read from the SQLite file itself."""
    with sqlite3.connect(db, timeout=5) as con:
        rows = con.execute(
            "select s.study_name, count(t.trial_id) from studies s left join trials t on "
            "t.study_id = s.study_id and t.state in ('COMPLETE', 'PRUNED') group by s.study_name"
        ).fetchall()
    return dict(rows)


# ---------------------------------------------------------------- search spaces


def test_search_blocks_leave_the_heads_defaults_alone():
    for name in list_heads():
        assert "search" not in head_config(name)
        assert "search" not in resolve_params(name)
        assert search_space(name)  # every bundled head declares one, and it builds
    assert head_config("logreg") == {"C": 1.0, "max_iter": 2000}


def test_a_bad_search_block_is_named(choice_head):
    HEADS._configs[choice_head]["search"] = {"C": [-1.0]}
    with pytest.raises(ValueError, match=r"search\.C: -1\.0 is not valid"):
        search_space(choice_head)
    HEADS._configs[choice_head]["search"] = {"not_a_param": [1]}
    with pytest.raises(ValueError, match="not a hyperparameter"):
        search_space(choice_head)


# ---------------------------------------------------------------- (1) picks the clearly best


def test_nested_tuning_picks_the_clearly_best_value_and_predict_uses_it(tmp_path, choice_head):
    truth = write_signal_cache(tmp_path / "feat" / "sig.h5")
    out = tmp_path / "runs"
    args = ["tune", "--features", tmp_path / "feat", "--text", "sig", "--image", "sig"]
    args += ["--head", choice_head, "--trials", 4, "--inner-folds", 2, "--robustness", "off"]
    args += ["--folds", 3, "--seeds", 1, "--out", out, "-q"]
    table = ok(cli(*args))
    tuned = f"sig+sig/{choice_head} (tuned, 4 trials)"
    assert "tuned, 4 trials" in table
    run = finished_run(out)
    results = json.loads((run / "results.json").read_text())
    assert set(results["cells"]) == {f"sig+sig/{choice_head}", tuned}
    f1 = {c: v["summary"]["macro_f1"]["mean"] for c, v in results["cells"].items()}
    assert f1[tuned] > f1[f"sig+sig/{choice_head}"] + 0.3  # same table, honest and better
    rows = read_csv(run / "tune.csv")
    assert len(rows) == 3 and all(r["cell"] == tuned for r in rows)
    assert sum(float(r["param.C"]) == 1.0 for r in rows) >= 2  # most outer folds
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["cells"][tuned]["params"]["C"] == 1.0  # the folds' consensus (refit's)
    assert len(config["cells"][tuned]["fits"]) == 3
    studies = {f"sig+sig/{choice_head} | seed 1 | fold {k}": 4 for k in range(3)}
    assert counted(run / "tune.sqlite3") == studies  # one study per outer fold x seed
    report = json.loads((run / "tune.json").read_text())[tuned]
    assert [len(s["history"]) for s in report["studies"]] == [4, 4, 4]
    pred = tmp_path / "pred.txt"
    ok(cli("predict", "--run", run, "--cell", tuned, "--out", pred, "-q"))
    tags = dict(line.split(",") for line in pred.read_text().splitlines()[1:])
    assert tags.keys() == truth.keys()  # every test row, by the tuned cell's fold models
    assert sum(tags[g] == truth[g] for g in truth) >= 10  # C=1e-6 would say one class
    from fusebench.fuse.report_tune import tune_section

    html = tune_section(run)
    assert "data:image/png;base64," in html and "C=1.000" in html


def test_the_recorded_params_are_a_consensus_of_valid_choices():
    from fusebench.fuse.tune import consensus_params

    chosen = [{"hidden": 128, "lr": 1e-3, "act": "relu"}, {"hidden": 512, "lr": 3e-3}]
    chosen += [{"hidden": 512, "lr": 2e-3, "act": "gelu"}, {"hidden": 128, "act": "gelu"}]
    # a low median is one of the values chosen (never 320 from a list [128, 256, 512])
    assert consensus_params(chosen) == {"hidden": 128, "lr": 2e-3, "act": "gelu"}


# ---------------------------------------------------------------- (2) leak canary


def test_inner_folds_never_see_the_outer_folds_scored_rows(tmp_path, choice_head, monkeypatch):
    monkeypatch.setitem(HEADS._items, choice_head, SpyLogReg)
    monkeypatch.setattr(SpyLog, "calls", [])
    study = CellTuner.study

    def spied(self, seed, fold):
        SpyLog.fold = fold
        try:
            return study(self, seed, fold)
        finally:
            SpyLog.fold = None

    monkeypatch.setattr(CellTuner, "study", spied)
    write_noise_cache(tmp_path / "feat" / "noise.h5", n=90, dim=8)
    args = ["tune", "--features", tmp_path / "feat", "--text", "noise", "--image", "noise"]
    args += ["--head", choice_head, "--trials", 3, "--inner-folds", 2, "--folds", 3]
    args += ["--robustness", "off"]
    ok(cli(*args, "--seeds", 1, "--out", tmp_path / "runs", "-q"))
    inner = [c for c in SpyLog.calls if c["fold"] is not None]
    assert len(inner) >= 3 * 3 * 2 - 3  # trials x inner folds per study (a few pruned)
    guid = np.array([f"r{i}" for i in range(90)])
    for c in inner:
        fold = c["fold"]
        scored, fit = set(guid[fold.scored]), set(guid[fold.fit])
        assert not c["fit"] & scored and not c["val"] & scored
        assert all(not p & scored for p in c["pred"])
        inner_scored = c["pred"][0]
        assert c["fit"] <= fit and inner_scored <= fit and not c["fit"] & inner_scored
    # the canary can fail: every outer fold's scored rows do reach the refit's scoring
    refits = [c for c in SpyLog.calls if c["fold"] is None][3:]  # after the 3 untuned fits
    assert len(refits) == 3
    assert {frozenset(c["pred"][0]) for c in refits} == {
        frozenset(guid[f.scored])
        for f in StratifiedProtocol(folds=3).splits(_noise_set(tmp_path / "feat"))
    }


def _noise_set(feat: Path):
    from fusebench.fuse.features import load_feature_set

    return load_feature_set(feat, text="noise", image="noise")


# ---------------------------------------------------------------- (3) SIGKILL and resume


def test_a_killed_tune_resumes_and_ends_with_exactly_the_requested_trials(tmp_path):
    write_noise_cache(tmp_path / "feat" / "noise.h5", n=90, dim=8)
    out = tmp_path / "runs"
    args = ["tune", "--features", tmp_path / "feat", "--text", "noise", "--image", "noise"]
    args += ["--head", "logreg", "--trials", 5, "--inner-folds", 2, "--robustness", "off"]
    args += ["--folds", 2, "--seeds", 1, "--out", out, "-q"]
    code = "from fusebench.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=tmp_path)
    stored: dict = {}
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            dbs = list(out.glob("*.tmp/tune.sqlite3"))
            if dbs:
                try:
                    stored = counted(dbs[0])
                except sqlite3.Error:  # being created this instant
                    stored = {}
                if sum(stored.values()) >= 2:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the tune finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    (db,) = out.glob("*.tmp/tune.sqlite3")
    before = counted(db)
    assert 2 <= sum(before.values()) < 10
    ok(cli(*args))  # the same command: adopts the unfinished run
    run = finished_run(out)
    assert run.name + ".tmp" == db.parent.name  # the same folder, finished
    after = counted(run / "tune.sqlite3")
    assert sorted(after.values()) == [5, 5]  # exactly --trials per study
    tune = json.loads((run / "tune.json").read_text())
    (record,) = tune.values()
    assert [s["n_complete"] + s["n_pruned"] for s in record["studies"]] == [5, 5]
    resumed = [s for s in record["studies"] if before.get(s["study"], 0) > 0]
    assert resumed  # the trials stored before the kill were kept, not run again
    assert not list(out.glob("*.tmp"))


# ---------------------------------------------------------------- (4) the CLI


def test_cli_refuses_a_head_without_search_space_and_bad_trials(tmp_path, choice_head):
    write_noise_cache(tmp_path / "feat" / "noise.h5", n=60, dim=4)
    base = ["tune", "--features", tmp_path / "feat", "--text", "noise", "--image", "noise"]
    base += ["--folds", 2, "--seeds", 1, "--out", tmp_path / "runs"]
    HEADS._configs[choice_head].pop("search")
    line = one_line_error(cli(*base, "--head", choice_head, "--trials", 2))
    assert f"head '{choice_head}' has no search space" in line and "search:" in line
    line = one_line_error(cli(*base, "--head", "logreg", "--trials", 0))
    assert "--trials must be a whole number of trials, at least 1" in line
    line = one_line_error(cli(*base, "--head", "logreg", "--inner-folds", 1))
    assert "--inner-folds" in line
    line = one_line_error(cli("compare", *base[1:], "--heads", "logreg", "--tune", -3))
    assert "--tune must be a whole number of trials, at least 1" in line
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # nothing trained, nothing left


def test_compare_tune_adds_the_best_cell_of_a_head_tuned(tmp_path):
    write_signal_cache(tmp_path / "feat" / "sig.h5", n=90)
    out = tmp_path / "runs"
    args = ["compare", "--features", tmp_path / "feat", "--text", "sig", "--image", "sig"]
    args += ["--heads", "logreg", "--folds", 2, "--seeds", 1, "--out", out, "-q"]
    args += ["--robustness", "off"]
    line = one_line_error(cli(*args, "--tune", "lightgbm:2"))
    assert "no cell of this run has head 'lightgbm'" in line
    ok(cli(*args, "--tune", "logreg:2"))
    results = json.loads((finished_run(out) / "results.json").read_text())
    assert set(results["cells"]) == {"sig+sig/logreg", "sig+sig/logreg (tuned, 2 trials)"}
