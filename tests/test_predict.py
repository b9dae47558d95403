"""`predict` on run folders written by the grid runner: the fold ensemble (default), the first
fit, and a refit on every labelled row; --proba; which cell; what RUN/predictions.json records.
The last test scores fold0 / ensemble / refit on labelled lab5-dev rows held out from training
(skipped when ../shared/data/lab5-dev is absent)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from fusebench.cache import FAILED, OK
from fusebench.fuse import load_feature_set
from fusebench.fuse.grid import cell_slug
from fusebench.fuse.predict import load_head
from sklearn.metrics import accuracy_score, f1_score, log_loss

from tests.conftest import LAB5_DEV, one_line_error
from tests.conftest import cli as invoke
from tests.test_fuse import CLASSES, synthetic, write

SEEDS = (1, 2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def records(run: Path) -> list[dict]:
    return json.loads((run / "predictions.json").read_text())


def cache_data(signal: float = 0.6) -> tuple[dict, np.ndarray]:
    """The synthetic rows (same guids, splits and labels whatever the signal) and a status
    with one failed test row and one failed training row."""
    data = synthetic(seed=21, signal=signal, tokens=False)
    status = np.full(len(data["guid"]), OK, dtype=np.uint8)
    split = np.array(data["split"])
    status[[np.flatnonzero(split == "test")[3], np.flatnonzero(split == "train")[0]]] = FAILED
    return data, status


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> dict:
    """One compare run (logreg, concat_mlp; 3 folds x 2 seeds) on a synthetic cache."""
    root = tmp_path_factory.mktemp("grid")
    data, status = cache_data()
    write(root / "f" / "syn.h5", data, status=status)
    r = invoke("compare", "--heads", "logreg,concat_mlp", "--features", root / "f",
               "--text", "syn", "--image", "syn", "--folds", 3, "--seeds", ",".join(map(str, SEEDS)),
               "--epochs", 4, "--set", "concat_mlp.hidden=32", "--out", root / "runs", "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    (run,) = (root / "runs").iterdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    return {"root": root, "run": run, "config": config, "data": data, "status": status}


@pytest.fixture()
def run(grid, tmp_path) -> Path:
    """A private copy of the grid's run folder (tests add refits and records to it)."""
    shutil.copytree(grid["run"], tmp_path / "run")
    return tmp_path / "run"


def guids_of_test(grid) -> tuple[list[str], str]:
    """The test guids in cache order, and the one whose features failed."""
    data, status = grid["data"], grid["status"]
    guids = [g for g, s in zip(data["guid"], data["split"]) if s == "test"]
    (failed,) = [
        g for g, s, st in zip(data["guid"], data["split"], status) if s == "test" and st == FAILED
    ]
    return guids, failed


def probas(run: Path, dirs: list[str], grid: dict) -> dict[str, np.ndarray]:
    """guid -> the mean predict_proba of the models in `dirs` over the usable test rows."""
    fs = load_feature_set(grid["root"] / "f", text="syn", image="syn")
    rows = fs.rows_of_split("test")
    p = np.mean([load_head(run / d).predict_proba(fs.take(rows)) for d in dirs], axis=0)
    return dict(zip(fs.guid[rows], p))


def proba_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    return {x["guid"]: np.array([float(x[f"p_{c}"]) for c in CLASSES]) for x in rows if x["tag"]}


# ---------------------------------------------------------------- ensemble, fold0


def test_default_is_the_fold_ensemble_of_the_best_cell(grid, run, tmp_path):
    out = tmp_path / "pred.csv"
    r = invoke("predict", "--run", run, "--out", out, "--proba")
    assert r.exit_code == 0, r.output
    best = grid["config"]["best_cell"]
    assert f"used cell '{best}'" in r.stderr  # said, with how to pick another
    (record,) = records(run)
    fits = grid["config"]["cells"][best]["fits"]
    assert record["cell"] == best and record["mode"] == "ensemble"
    assert record["model_dirs"] == [f["model_dir"] for f in fits]
    assert len(record["model_dirs"]) == 3 * len(SEEDS)  # every fold x seed
    assert record["out"] == str(out.resolve()) and record["split"] == "test"

    rows = read_csv(out)
    guids, failed = guids_of_test(grid)
    assert [x["guid"] for x in rows] == guids  # every test row, in cache order
    assert list(rows[0]) == ["guid", "tag"] + [f"p_{c}" for c in CLASSES]
    got, want = proba_columns(rows), probas(run, record["model_dirs"], grid)
    assert set(got) == set(want) == set(guids) - {failed}
    for g, p in want.items():  # the mean of every model's probabilities, 6 decimals
        assert np.allclose(got[g], p, atol=1e-6), g
        assert rows[guids.index(g)]["tag"] == CLASSES[int(np.argmax(p))]
    empty = rows[guids.index(failed)]
    assert empty["tag"] == "" and all(empty[f"p_{c}"] == "" for c in CLASSES)
    assert failed in r.stderr and "EMPTY tag" in r.stderr


def test_fold0_is_the_first_fit_alone(grid, run, tmp_path):
    out = tmp_path / "pred.csv"
    cell = "syn+syn/concat_mlp"
    r = invoke("predict", "--run", run, "--out", out, "--cell", cell, "--model", "fold0", "--proba")
    assert r.exit_code == 0, r.output
    (record,) = records(run)
    first = f"models/{cell_slug(cell)}/seed{SEEDS[0]}-fold0"
    assert record["mode"] == "fold0" and record["model_dirs"] == [first]
    got, want = proba_columns(read_csv(out)), probas(run, [first], grid)
    assert all(np.allclose(got[g], p, atol=1e-6) for g, p in want.items())
    ensemble = probas(run, [f["model_dir"] for f in grid["config"]["cells"][cell]["fits"]], grid)
    assert any(not np.allclose(got[g], ensemble[g], atol=1e-4) for g in got)  # not the same


def test_without_proba_the_file_is_guid_tag(run, tmp_path):
    out = tmp_path / "pred.csv"
    r = invoke("predict", "--run", run, "--out", out, "--head", "logreg")
    assert r.exit_code == 0, r.output
    assert out.read_text().splitlines()[0] == "guid,tag"
    assert records(run)[0]["cell"] == "syn+syn/logreg"


# ---------------------------------------------------------------- refit


def test_refit_trains_on_every_labelled_row_with_the_median_best_epoch(grid, run, tmp_path):
    cell = "syn+syn/concat_mlp"
    out = tmp_path / "pred.csv"
    r = invoke("predict", "--run", run, "--out", out, "--cell", cell, "--refit", "--proba")
    assert r.exit_code == 0, r.output
    slug = "syn_syn_concat_mlp"
    saved = json.loads((run / "refit" / slug / "refit.json").read_text())
    data, status = grid["data"], grid["status"]
    labelled = sum(1 for s, st in zip(data["split"], status) if s == "train" and st == OK)
    assert saved["n_rows"] == labelled  # every usable labelled row, no inner split held back
    best = [f["best_iteration"] for f in grid["config"]["cells"][cell]["fits"]]
    assert saved["cv_best_iterations"] == best
    epochs = int(np.ceil(np.median(best)))
    assert saved["iterations"] == {"epochs": epochs}
    (record,) = records(run)
    assert record["mode"] == "refit"
    assert record["model_dirs"] == [f"refit/{slug}/seed{s}" for s in SEEDS]
    assert record["refit"]["n_rows"] == labelled and record["refit"]["reused"] is False
    for s in SEEDS:
        meta = json.loads((run / "refit" / slug / f"seed{s}" / "head.json").read_text())
        assert meta["seed"] == s and meta["train"]["epochs"] == epochs
        assert meta["best_iteration"] == epochs  # no early stopping: the last epoch is kept
    got = proba_columns(read_csv(out))
    assert all(
        np.allclose(got[g], p, atol=1e-6)
        for g, p in probas(run, record["model_dirs"], grid).items()
    )


def test_a_refit_is_reused_until_its_training_data_changes(grid, run, tmp_path):
    cell, slug = "syn+syn/logreg", "syn_syn_logreg"
    args = ("predict", "--run", run, "--out", tmp_path / "p.csv", "--cell", cell, "--refit")
    assert invoke(*args).exit_code == 0
    state = run / "refit" / slug / f"seed{SEEDS[0]}" / "model.joblib"
    before = state.stat().st_mtime_ns
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert "(reused)" in r.stdout and "refitting" not in r.stderr
    assert state.stat().st_mtime_ns == before and records(run)[-1]["refit"]["reused"] is True
    assert json.loads((run / "refit" / slug / "refit.json").read_text())["iterations"] == {}

    # re-extracted with the same settings: same fingerprint (predict accepts the cache),
    # other feature values: the saved refit no longer matches its training data
    feats = tmp_path / "f"
    data, status = cache_data(signal=0.9)
    write(feats / "syn.h5", data, status=status)
    r = invoke(*args, "--features", feats)
    assert r.exit_code == 0, r.output
    assert "refitting" in r.stderr and records(run)[-1]["refit"]["reused"] is False
    assert state.stat().st_mtime_ns != before

    (run / "refit" / slug / f"seed{SEEDS[1]}" / "model.joblib").unlink()  # damaged: refit again
    r = invoke(*args, "--features", feats)
    assert r.exit_code == 0 and "refitting" in r.stderr, r.output


# ---------------------------------------------------------------- which cell; errors


def test_cell_choice_errors_name_the_cells(grid, run, tmp_path):
    out = tmp_path / "p.csv"
    line = one_line_error(invoke("predict", "--run", run, "--out", out, "--cell", "nope"), code=2)
    assert "syn+syn/logreg" in line and "syn+syn/concat_mlp" in line
    line = one_line_error(invoke("predict", "--run", run, "--out", out, "--head", "late"), code=2)
    assert "concat_mlp" in line and "logreg" in line
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["cells"]["syn+syn/logreg@C=0.5"] = config["cells"]["syn+syn/logreg"]
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    line = one_line_error(invoke("predict", "--run", run, "--out", out, "--head", "logreg"), code=2)
    assert "--cell" in line and "syn+syn/logreg@C=0.5" in line
    line = one_line_error(invoke("predict", "--run", run, "--out", out, "--model", "best"), code=2)
    assert "ensemble" in line and "refit" in line and "fold0" in line
    line = one_line_error(
        invoke("predict", "--run", run, "--out", out, "--model", "fold0", "--refit")
    )
    assert "--refit" in line
    assert not out.exists() and not (run / "predictions.json").exists()


def test_a_missing_fit_model_is_one_line_naming_it(grid, run, tmp_path):
    cell = grid["config"]["best_cell"]
    gone = run / grid["config"]["cells"][cell]["fits"][-1]["model_dir"]
    shutil.rmtree(gone)
    line = one_line_error(invoke("predict", "--run", run, "--out", tmp_path / "p.csv"))
    assert str(gone) in line and "rerun" in line
    r = invoke("predict", "--run", run, "--out", tmp_path / "p.csv", "--model", "fold0")
    assert r.exit_code == 0, r.output  # the first fit is still there


def test_a_run_folder_of_an_older_fusebench_says_rerun(run, tmp_path):
    (run / "config.yaml").write_text(yaml.safe_dump({"heads": {"logreg": {"model_dir": "model"}}}))
    line = one_line_error(invoke("predict", "--run", run, "--out", tmp_path / "p.csv"))
    assert "older fusebench" in line and "rerun" in line


def test_records_append_and_a_damaged_record_file_starts_anew(run, tmp_path):
    for k in range(2):
        assert invoke("predict", "--run", run, "--out", tmp_path / f"p{k}.csv").exit_code == 0
    assert [x["out"] for x in records(run)] == [str(tmp_path / f"p{k}.csv") for k in range(2)]
    (run / "predictions.json").write_text("[{truncated")
    r = invoke("predict", "--run", run, "--out", tmp_path / "p2.csv")
    assert r.exit_code == 0 and "damaged" in r.stderr, r.output
    assert [x["out"] for x in records(run)] == [str(tmp_path / "p2.csv")]
    assert not list(run.glob("predictions.json.tmp"))


# ---------------------------------------------------------------- lab5-dev: unseen labelled rows

HELD_OUT = 300


@pytest.fixture(scope="session")
def lab5_held_out(tmp_path_factory) -> dict:
    """lab5-dev with HELD_OUT labelled training rows moved to test_without_label.txt (their
    labels kept aside), and a minilm cache of it."""
    if not LAB5_DEV.is_dir():
        pytest.skip(f"{LAB5_DEV} is absent")
    root = tmp_path_factory.mktemp("lab5-held-out")
    data = root / "lab5-held-out"
    data.mkdir()
    (data / "data").symlink_to(LAB5_DEV / "data")
    with open(LAB5_DEV / "train.txt", newline="") as fh:
        train = list(csv.reader(fh))[1:]
    with open(LAB5_DEV / "test_without_label.txt", newline="") as fh:
        test = list(csv.reader(fh))[1:]
    held = set(np.random.default_rng(0).choice(len(train), HELD_OUT, replace=False).tolist())
    truth = {g: t for k, (g, t) in enumerate(train) if k in held}
    kept = [(g, t) for k, (g, t) in enumerate(train) if k not in held]
    (data / "train.txt").write_text("guid,tag\n" + "".join(f"{g},{t}\n" for g, t in kept))
    unlabelled = [g for g in truth] + [g for g, _ in test]
    (data / "test_without_label.txt").write_text(
        "guid,tag\n" + "".join(f"{g},null\n" for g in unlabelled)
    )
    r = invoke("extract", "--encoder", "minilm", "--data", data, "--out", root / "feat", "--quiet")
    assert r.exit_code == 0, r.output
    return {
        "root": root,
        "features": root / "feat" / data.name,
        "truth": truth,
        "n_train": len(kept),
    }


def test_fold_ensemble_and_refit_on_held_out_lab5_rows(lab5_held_out, capsys):
    """MiniLM text, text_only head, 5 folds x 3 seeds on the kept rows; each model kind labels
    the held-out rows, scored against their true labels."""
    lab = lab5_held_out
    root, truth = lab["root"], lab["truth"]
    r = invoke("fuse", "--head", "text_only", "--features", lab["features"], "--text", "minilm",
               "--image", "none", "--folds", 5, "--seeds", "42,43,44", "--out", root / "runs",
               "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    (run,) = (root / "runs").iterdir()
    scores = {}
    for mode in ("fold0", "ensemble", "refit"):
        out = root / f"{mode}.csv"
        r = invoke("predict", "--run", run, "--out", out, "--model", mode, "--proba", "--quiet")
        assert r.exit_code == 0, r.output
        rows = [x for x in read_csv(out) if x["guid"] in truth]
        assert len(rows) == len(truth) and all(x["tag"] for x in rows)
        y, p = [truth[x["guid"]] for x in rows], [x["tag"] for x in rows]
        classes = [c[2:] for c in rows[0] if c.startswith("p_")]
        proba = np.array([[float(x[f"p_{c}"]) for c in classes] for x in rows])
        proba /= proba.sum(1, keepdims=True)  # written to 6 decimals
        scores[mode] = (
            accuracy_score(y, p),
            f1_score(y, p, average="macro"),
            log_loss(y, proba, labels=classes),
        )
    config = yaml.safe_load((run / "config.yaml").read_text())
    (cell,) = config["cells"].values()
    f1s, losses = single_fit_scores(run, cell, lab)
    with capsys.disabled():
        print(f"\nheld-out lab5-dev rows: {len(truth)} (trained on {lab['n_train']})")
        for mode, (acc, f1, ll) in scores.items():
            print(f"  {mode:9s} accuracy {acc:.4f}  macro-F1 {f1:.4f}  log-loss {ll:.4f}")
        print(f"  each of the {len(f1s)} CV fits alone: macro-F1 {np.mean(f1s):.4f} ± "
              f"{np.std(f1s):.4f} (min {min(f1s):.4f}, max {max(f1s):.4f}), "
              f"log-loss {np.mean(losses):.4f}")  # fmt: skip

    (refit,) = [x for x in records(run) if x["mode"] == "refit"]
    assert refit["refit"]["n_rows"] == lab["n_train"]  # every labelled row of train.txt
    (ensemble,) = [x for x in records(run) if x["mode"] == "ensemble"]
    assert len(ensemble["model_dirs"]) == 5 * 3
    # averaged probabilities: log-loss is convex, so the ensemble's can be at most the mean
    # of its members' (exact; 1e-3 covers the 6 decimals of the file)
    assert scores["ensemble"][2] <= np.mean(losses) + 1e-3
    assert scores["ensemble"][2] < scores["fold0"][2]
    # macro-F1 on 300 rows is noisy: fold0 is ONE draw from the single fits' spread (their std,
    # measured above, is ~0.02). Measured on 12 other held-out draws of lab5-dev (text_only and
    # logreg): the ensemble beat fold0 10 times (by +0.03 on average) and trailed it by at most
    # 0.009. So: it must not trail by more than that std (on CPU this draw gives +0.023)
    assert scores["ensemble"][1] >= scores["fold0"][1] - np.std(f1s)


def single_fit_scores(run: Path, cell: dict, lab: dict) -> tuple[list[float], list[float]]:
    """Held-out macro-F1 and log-loss of each CV fit of the cell alone."""
    fs = load_feature_set(lab["features"], text="minilm", image=None)
    rows = np.flatnonzero(np.isin(fs.guid, list(lab["truth"])))
    y = [lab["truth"][g] for g in fs.guid[rows]]
    f1s, losses = [], []
    for fit in cell["fits"]:
        proba = load_head(run / fit["model_dir"]).predict_proba(fs.take(rows))
        f1s.append(f1_score(y, [fs.classes[k] for k in proba.argmax(1)], average="macro"))
        losses.append(log_loss(y, proba, labels=list(fs.classes)))
    return f1s, losses
