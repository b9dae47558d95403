"""The ablation grid (issue 8): `compare --text a,b --image x,none --heads ...` scores every
valid (text, image, head, variant) cell once, on identical folds and seeds, from caches each
opened once; `fuse` is the same runner with one cell; a run replays from its config.yaml.

Tiny pooled caches written with cache.write_features (tests/test_fuse.py's `synthetic`)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from fusebench.cache import FAILED, OK, FeatureStore
from fusebench.fuse.grid import parse_assignment
from fusebench.fuse.metrics import mean_std
from fusebench.fuse.predict import load_head
from fusebench.fuse.protocol import StratifiedProtocol

from tests.conftest import cli as invoke
from tests.test_fuse import synthetic, write

HEADS = "concat_mlp,text_only,image_only,logreg"
CELLS = {  # what `compare --text ta,tb --image iv,none --heads HEADS` must run, each once
    "ta+iv/concat_mlp",
    "tb+iv/concat_mlp",
    "ta+none/text_only",
    "tb+none/text_only",
    "none+iv/image_only",
    "ta+iv/logreg",
    "ta+none/logreg",
    "tb+iv/logreg",
    "tb+none/logreg",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict:
    """ta.h5 and tb.h5 (text; tb has one failed training row), iv.h5 (image, rows shuffled)."""
    data = synthetic(n_train=90, n_test=10, seed=5, tokens=False)
    n = len(data["guid"])
    root = tmp_path_factory.mktemp("grid") / "feats"
    write(root / "ta.h5", data, image=False)
    status = np.full(n, OK, np.uint8)
    failed = int(np.flatnonzero(np.array(data["split"]) == "train")[3])
    status[failed] = FAILED
    write(root / "tb.h5", data, image=False, status=status)
    write(root / "iv.h5", data, text=False, rows=np.random.default_rng(2).permutation(n))
    return {"dir": root, "data": data, "failed": data["guid"][failed]}


@pytest.fixture(scope="module")
def grid(caches, tmp_path_factory) -> dict:
    """One 2 text x 2 image (one 'none') compare, with every FeatureStore.open counted."""
    out = tmp_path_factory.mktemp("runs")
    opened = []
    real = FeatureStore.open.__func__

    def counting(cls, path, **kw):
        opened.append(Path(path).name)
        return real(cls, path, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FeatureStore, "open", classmethod(counting))
        r = invoke("compare", "--features", caches["dir"], "--text", "ta,tb", "--image", "iv,none",
                   "--heads", HEADS, "--folds", 3, "--seeds", "1,2", "--epochs", 2,
                   "--out", out, "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    run = only_run(out)
    return {
        "r": r,
        "run": run,
        "opened": opened,
        "results": json.loads((run / "results.json").read_text()),
        "config": yaml.safe_load((run / "config.yaml").read_text()),
    }


def test_every_valid_cell_once_and_one_note_per_skipped_cell(grid):
    rows = read_csv(grid["run"] / "results.csv")
    assert sorted(row["cell"] for row in rows) == sorted(CELLS)  # one row per cell
    assert set(grid["results"]["cells"]) == CELLS == set(grid["config"]["cells"])
    assert [int(row["rank"]) for row in rows] == list(range(1, len(CELLS) + 1))
    f1 = [float(row["macro_f1_mean"]) for row in rows]
    assert f1 == sorted(f1, reverse=True) and grid["config"]["best_cell"] == rows[0]["cell"]
    err = " ".join(grid["r"].stderr.split())
    for skipped in ("ta+none/concat_mlp", "tb+none/concat_mlp", "none+none/image_only"):
        assert err.count(f"skipping {skipped}:") == 1, skipped
    assert "needs text and image features" in err
    # text_only ignores the image encoder: one cell per text encoder, named by what it reads
    assert "ta+none/text_only reads only text" in err
    assert not any(c.endswith("/text_only") and "+iv/" in c for c in grid["results"]["cells"])
    assert all(row["runs"] == "6" and row["seeds"] == "2" for row in rows)  # 3 folds x 2 seeds
    lines = [line for line in grid["r"].stdout.splitlines() if "±" in line]
    assert len(lines) == len(CELLS) + 1  # one table row per cell, and the footer saying what ± is


def test_each_cache_file_is_opened_once(grid):
    assert sorted(grid["opened"]) == ["iv.h5", "ta.h5", "tb.h5"]


def test_every_cell_is_scored_on_identical_folds(grid, caches):
    """val_predictions.csv: the scored guids of each (seed, fold) are the same for every cell,
    and the row that failed in tb.h5 is left out of every cell, not only tb's."""
    folds: dict[str, dict] = defaultdict(lambda: defaultdict(set))
    for row in read_csv(grid["run"] / "val_predictions.csv"):
        folds[row["cell"]][(row["seed"], row["fold"])].add(row["guid"])
    assert set(folds) == CELLS
    reference = folds["ta+iv/logreg"]
    assert len(reference) == 6 and all(folds[c] == reference for c in CELLS)
    scored = set().union(*reference.values())
    assert caches["failed"] not in scored
    assert len(scored) == 89  # every other labelled row is scored exactly once per seed
    for seed in ("1", "2"):
        per_seed = [reference[(seed, k)] for k in ("0", "1", "2")]
        assert sum(len(s) for s in per_seed) == len(set().union(*per_seed)) == 89
    assert "rows usable in all 3 caches" in " ".join(grid["r"].stderr.split())


def test_summary_has_seed_means_params_meaning_and_history(grid):
    results = grid["results"]
    for cid, cell in results["cells"].items():
        runs = [r for r in results["runs"] if r["cell"] == cid]
        summary = cell["summary"]
        for metric in ("accuracy", "macro_f1", "weighted_f1"):
            per_seed = [np.mean([r[metric] for r in runs if r["seed"] == s]) for s in (1, 2)]
            assert summary["seed_means"][metric] == pytest.approx(mean_std(per_seed))
            assert summary[metric]["n"] == 6
        torch_head = cell["head"] != "logreg"
        assert cell["n_params_meaning"] == (
            "trainable weights" if torch_head else "coefficients + intercepts"
        )
        assert all(bool(r["history"]) == torch_head for r in runs)
        assert {"text", "image", "head", "variant"} <= set(cell)
    assert "seed" in results["spread"] and "folds × seeds" in results["spread"]


def test_every_fit_saves_its_model_where_config_says(grid):
    config = grid["config"]
    fits = [f for cell in config["cells"].values() for f in cell["fits"]]
    assert len(fits) == len(CELLS) * 6
    for f in fits:
        assert (grid["run"] / f["model_dir"] / "head.json").is_file()
    cell = config["cells"]["ta+iv/concat_mlp"]
    assert cell["fits"][0]["model_dir"] == "models/ta_iv_concat_mlp/seed1-fold0"
    assert cell["params"]["train"]["epochs"] == 2 and "hidden" in cell["params"]
    model = load_head(grid["run"] / cell["fits"][-1]["model_dir"], device="cpu")
    assert model.classes_ == tuple(config["classes"])


def test_fuse_is_a_grid_of_one_cell_with_the_same_files(grid, caches, tmp_path):
    r = invoke("fuse", "--head", "concat_mlp", "--features", caches["dir"], "--text", "ta",
               "--image", "iv", "--epochs", 2, "--seeds", "1", "--out", tmp_path, "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    run = only_run(tmp_path)
    assert {p.name for p in run.iterdir()} == {p.name for p in grid["run"].iterdir()}
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["command"] == "fuse" and list(config["cells"]) == ["ta+iv/concat_mlp"]
    assert config["protocol"]["val_ratio"] == 0.1  # fuse keeps the holdout default
    assert [p.name for p in (run / "models").iterdir()] == ["ta_iv_concat_mlp"]


@pytest.fixture(scope="module")
def swept(caches, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("swept")
    r = invoke("compare", "--features", caches["dir"], "--text", "ta", "--image", "iv",
               "--heads", "concat_mlp,logreg", "--sweep", "concat_mlp.hidden=8,16",
               "--set", "logreg.C=0.5", "--set", "dropout=0.0", "--folds", 2, "--seeds", "3,4",
               "--epochs", 3, "--out", out, "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    return only_run(out)


def test_a_sweep_makes_one_cell_per_value(swept):
    config = yaml.safe_load((swept / "config.yaml").read_text())
    assert list(config["cells"]) == [
        "ta+iv/concat_mlp@hidden=8",
        "ta+iv/concat_mlp@hidden=16",
        "ta+iv/logreg",
    ]
    cells = config["cells"]
    assert cells["ta+iv/concat_mlp@hidden=8"]["params"]["hidden"] == 8
    assert cells["ta+iv/concat_mlp@hidden=16"]["params"]["hidden"] == 16
    assert cells["ta+iv/concat_mlp@hidden=16"]["variant"] == "hidden=16"
    # --set dropout=0.0 (no head prefix): every head with that key, here concat_mlp only
    assert all(cells[c]["params"]["dropout"] == 0.0 for c in cells if "concat_mlp" in c)
    assert (
        cells["ta+iv/logreg"]["params"]["C"] == 0.5
        and "dropout" not in cells["ta+iv/logreg"]["params"]
    )
    assert config["sweep"] == {"concat_mlp.hidden": [8, 16]}
    assert config["set"] == {"concat_mlp": {"dropout": 0.0}, "logreg": {"C": 0.5}}
    assert (swept / "models" / "ta_iv_concat_mlp_hidden=16" / "seed4-fold1" / "state.pt").is_file()
    n_params = {
        c["variant"]: c["summary"]["n_params"]["mean"]
        for c in json.loads((swept / "results.json").read_text())["cells"].values()
        if c["head"] == "concat_mlp"
    }
    assert n_params["hidden=8"] < n_params["hidden=16"]  # the variant reached the model


def test_replay_from_config_gives_identical_metrics(swept, tmp_path):
    r = invoke("compare", "--config", swept / "config.yaml", "--out", tmp_path, "--quiet")
    assert r.exit_code == 0, r.output
    replay = only_run(tmp_path)

    def fits(run: Path) -> list[tuple]:
        runs = json.loads((run / "results.json").read_text())["runs"]
        return [(x["cell"], x["seed"], x["fold"], x["accuracy"], x["macro_f1"], x["weighted_f1"],
                 x["confusion_matrix"], x["best_iteration"]) for x in runs]  # fmt: skip

    assert fits(replay) == fits(swept) and len(fits(swept)) == 3 * 2 * 2
    same = read_csv(replay / "val_predictions.csv") == read_csv(swept / "val_predictions.csv")
    assert same  # the same rows, predictions and probabilities
    old, new = (yaml.safe_load((p / "config.yaml").read_text()) for p in (swept, replay))
    for key in ("text", "image", "heads", "set", "sweep", "protocol", "seeds", "epochs"):
        assert new[key] == old[key], key


def test_print_config_shows_resolved_settings_and_trains_nothing(swept, tmp_path):
    r = invoke("compare", "--config", swept, "--seeds", "9", "--set", "concat_mlp.hidden=4",
               "--print-config", "--out", tmp_path / "runs")  # fmt: skip
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.stdout)
    assert shown["seeds"] == [9]  # a flag typed on the command line overrides the config
    assert shown["epochs"] == 3 and shown["protocol"]["folds"] == 2  # the rest is replayed
    assert shown["set"] == {"concat_mlp": {"dropout": 0.0, "hidden": 4}, "logreg": {"C": 0.5}}
    assert shown["planned_cells"][0] == "ta+iv/concat_mlp@hidden=8"  # the sweep wins over --set
    assert not (tmp_path / "runs").exists()
    r = invoke("compare", "--features", tmp_path, "--heads", "logreg", "--split-seed", 7,
               "--print-config")  # fmt: skip
    shown = yaml.safe_load(r.stdout)
    assert shown["protocol"]["folds"] == 5 and shown["protocol"]["split_seed"] == 7  # defaults


def test_split_seed_changes_the_folds(caches):
    from fusebench.fuse import load_feature_set

    fs = load_feature_set(caches["dir"], text="ta", image=None)
    a, b = (StratifiedProtocol(folds=3, split_seed=s).splits(fs) for s in (42, 7))
    assert not np.array_equal(a[0].scored, b[0].scored)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["compare", "--heads", "concat_mlp", "--image", "none"], "needs text and image"),
        (
            ["compare", "--heads", "logreg,late", "--set", "nope=1"],
            "no head of this run has 'nope'",
        ),
        (["compare", "--heads", "logreg", "--sweep", "late.dropout=0.1"], "not in this run"),
        (["compare", "--heads", "logreg", "--sweep", "logreg.C="], "--sweep wants"),
        (["compare", "--heads", "logreg", "--sweep", "logreg.C=-1,1"], "C=-1"),
        (["fuse", "--head", "logreg", "--text", "ta,tb"], "fuse runs one cell"),
        (["compare", "--config", "missing/config.yaml"], "no such file"),
        (["compare", "--heads", "logreg", "--split-seed", "-3"], "--split-seed"),
    ],
)
def test_grid_mistakes_are_one_line_before_any_training(args, needle, caches, tmp_path):
    flags = {"--features": caches["dir"], "--text": "ta", "--image": "iv", "--out": tmp_path / "r"}
    base = [x for flag, value in flags.items() if flag not in args for x in (flag, value)]
    r = invoke(*args, *base)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "r").exists()


def test_set_and_sweep_syntax():
    a = parse_assignment("cross_attn.train.lr=3e-4")
    assert (a.head, a.path, a.value) == ("cross_attn", ("train", "lr"), "3e-4")
    b = parse_assignment("dim=128,256", "--sweep")
    assert (b.head, b.path, b.value) == (None, ("dim",), [128, 256])
