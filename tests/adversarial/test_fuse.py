"""Stage two under odd but real inputs (issue 6): every number it reports is right, every
failure is one line with a non-zero exit and never a traceback, and nothing is lost or
half-written. Caches are written directly with cache.write_features (small pooled features),
except where the test is about what `extract` records (classes, sources)."""

from __future__ import annotations

import csv
import errno
import json
import pathlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from fusebench.cache import FAILED, OK, TokenFeatures, write_features
from sklearn.metrics import f1_score

import fusebench.cli as cli
from tests.conftest import cli as invoke
from tests.conftest import one_line_error, write_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_cache(
    path: Path,
    *,
    classes=("negative", "neutral", "positive"),
    n_train: int = 60,
    n_test: int = 10,
    seed: int = 0,
    guid=None,
    label=None,
    split=None,
    status=None,
    text: bool = True,
    image: bool = True,
    edit=None,
) -> dict:
    """A cache of pooled features whose text and image both carry the class. edit(d) may
    change the arrays (d["text"], d["image"]: (n, D) float32) before writing."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = np.arange(n) % len(classes)
    d = {
        "guid": list(guid) if guid is not None else [f"g{i:03d}" for i in range(n)],
        "split": list(split) if split is not None else ["train"] * n_train + ["test"] * n_test,
        "label": np.array(label) if label is not None else np.where(np.arange(n) < n_train, y, -1),
        "truth": y,
        "status": np.full(n, OK, np.uint8) if status is None else np.asarray(status, np.uint8),
        "text": rng.normal(size=(n, 8)) + 2.5 * np.eye(len(classes), 8)[y],
        "image": rng.normal(size=(n, 6)) + 2.5 * np.eye(len(classes), 6)[y],
    }
    if edit is not None:
        edit(d)

    def feats(x):
        return TokenFeatures(None, None, {"pooled": x.astype(np.float16)}, {"pooled": "mean"})

    write_features(
        path,
        guid=d["guid"],
        split=d["split"],
        label=d["label"],
        classes=classes,
        text=feats(d["text"]) if text else None,
        image=feats(d["image"]) if image else None,
        status=d["status"],
        config={"encoder": path.stem},
        attrs={"encoder": path.stem},
    )
    return d


def fuse_cli(feats: Path, out: Path, *extra, head="logreg", text="syn", image="syn"):
    return invoke(
        "fuse", "--head", head, "--features", feats, "--text", text, "--image", image,
        "--out", out, "--quiet", "--epochs", 2, *extra,
    )  # fmt: skip


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir()) if out.exists() else []


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def one_cell(run: Path) -> tuple[dict, dict]:
    """results.json of a `fuse` run (a grid of one cell) and that cell's summary."""
    results = json.loads((run / "results.json").read_text())
    (cell,) = results["ranking"]
    return results, results["cells"][cell]["summary"]


def first_model(run: Path) -> Path:
    """The folder of a run's first fit (config.yaml: cells -> fits -> model_dir)."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    cell = config["cells"][config["best_cell"]]
    return run / cell["fits"][0]["model_dir"]


# ---------------------------------------------------------------- 1. exactly the data's classes


def test_two_class_macro_f1_equals_sklearn_over_saved_predictions(tmp_path):
    """Done-criterion c: per run and as the mean, the reported macro-F1 is sklearn's over the
    cache's two classes, recomputed from val_predictions.csv; nothing mentions a third class."""
    classes = ("negative", "positive")

    def blur(d):  # overlapping classes, so runs make different mistakes
        d["text"] += np.random.default_rng(2).normal(0, 2.5, d["text"].shape)
        d["image"] += np.random.default_rng(3).normal(0, 2.5, d["image"].shape)

    make_cache(tmp_path / "f" / "syn.h5", classes=classes, n_train=80, seed=1, edit=blur)
    r = fuse_cli(tmp_path / "f", tmp_path / "runs", "--folds", 3, "--seeds", "1,2", head="gated")
    assert r.exit_code == 0, r.output
    (run,) = run_dirs(tmp_path / "runs")
    metrics, summary = one_cell(run)
    rows = read_csv(run / "val_predictions.csv")
    assert {k for k in rows[0] if k.startswith("p_")} == {"p_negative", "p_positive"}
    per_run = []
    for rec in metrics["runs"]:
        mine = [x for x in rows if int(x["seed"]) == rec["seed"] and int(x["fold"]) == rec["fold"]]
        assert mine and {x["pred"] for x in mine} | {x["true"] for x in mine} <= set(classes)
        f1 = f1_score([x["true"] for x in mine], [x["pred"] for x in mine],
                      labels=list(classes), average="macro", zero_division=0)  # fmt: skip
        assert rec["macro_f1"] == pytest.approx(f1, abs=1e-12)
        assert np.array(rec["confusion_matrix"]).shape == (2, 2)
        per_run.append(f1)
    assert len(per_run) == 6 and len(set(per_run)) > 1  # a case where a wrong average would show
    assert summary["macro_f1"]["mean"] == pytest.approx(np.mean(per_run), abs=1e-12)
    assert metrics["classes"] == list(classes)
    assert yaml.safe_load((run / "config.yaml").read_text())["classes"] == list(classes)


def test_extract_then_fuse_on_a_two_class_dataset_scores_over_two_classes(tmp_path, tiny_models):
    """End to end: a lab5 folder whose labels are only negative/positive gives a 2-class cache,
    and fuse's macro-F1 is sklearn's over those two classes (not a third, absent one)."""
    root = tmp_path / "two"
    (root / "data").mkdir(parents=True)
    lines = []
    for i in range(40):
        (root / "data" / f"{i}.txt").write_text(
            ("good happy day" if i % 2 else "sad awful rain") + "\n"
        )
        write_image(root / "data" / f"{i}.jpg", seed=i)
        lines.append(f"{i},{'positive' if i % 2 else 'negative'}")
    (root / "train.txt").write_text("guid,tag\n" + "\n".join(lines) + "\n")
    (root / "test_without_label.txt").write_text("guid,tag\n")
    r = invoke("extract", "--encoder", "bert", "--model", tiny_models["bert"], "--data", root,
               "--out", tmp_path / "feats", "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = fuse_cli(
        tmp_path / "feats" / "two", tmp_path / "runs", "--val-ratio", 0.5, text="bert", image="none"
    )
    assert r.exit_code == 0, r.output
    (run,) = run_dirs(tmp_path / "runs")
    metrics, _ = one_cell(run)
    assert metrics["classes"] == ["negative", "positive"]
    rows = read_csv(run / "val_predictions.csv")
    f1 = f1_score([x["true"] for x in rows], [x["pred"] for x in rows],
                  labels=["negative", "positive"], average="macro", zero_division=0)  # fmt: skip
    assert metrics["runs"][0]["macro_f1"] == pytest.approx(f1, abs=1e-12)


def test_four_classes_with_other_names_flow_through_compare_and_predict(tmp_path):
    classes = ("cat", "dog", "bird", "fish")
    make_cache(tmp_path / "f" / "syn.h5", classes=classes, n_train=80)
    r = invoke("compare", "--heads", "logreg,late", "--features", tmp_path / "f", "--text", "syn",
               "--image", "syn", "--seeds", "1", "--epochs", 2, "--out", tmp_path / "runs", "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    (run,) = run_dirs(tmp_path / "runs")
    results = json.loads((run / "results.json").read_text())
    assert results["classes"] == list(classes)
    assert all(set(c["summary"]["per_class"]) == set(classes) for c in results["cells"].values())
    assert "fallback_class" not in yaml.safe_load((run / "config.yaml").read_text())
    out = tmp_path / "pred.csv"
    r = invoke("predict", "--run", run, "--out", out, "--head", "logreg")
    assert r.exit_code == 0, r.output
    tags = [row["tag"] for row in read_csv(out)]
    assert len(tags) == 10 and set(tags) <= set(classes)


# ---------------------------------------------------------------- 3. stale caches


def test_stage_two_refuses_a_cache_whose_data_changed_unless_allow_stale(tmp_path, tiny_models):
    from tests.conftest import make_lab5

    data = make_lab5(tmp_path / "lab", n_train=24, n_test=6)
    r = invoke("extract", "--encoder", "bert", "--model", tiny_models["bert"], "--data", data,
               "--out", tmp_path / "feats", "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    feats = tmp_path / "feats" / "lab"
    r = fuse_cli(feats, tmp_path / "runs", text="bert", image="none")
    assert r.exit_code == 0, r.output
    (run,) = run_dirs(tmp_path / "runs")
    (data / "data" / "105.txt").write_text("a completely different tweet\n")
    for args in (
        ("fuse", "--head", "logreg", "--features", feats, "--text", "bert", "--image", "none",
         "--out", tmp_path / "runs2", "--quiet"),
        ("compare", "--heads", "logreg", "--features", feats, "--text", "bert", "--image", "none",
         "--seeds", "1", "--out", tmp_path / "runs2", "--quiet"),
        ("predict", "--run", run, "--out", tmp_path / "p.csv"),
    ):  # fmt: skip
        line = one_line_error(invoke(*args))
        assert "105" in line and "--allow-stale" in line and "extract" in line, line
    assert not (tmp_path / "runs2").exists() and not (tmp_path / "p.csv").exists()

    r = fuse_cli(feats, tmp_path / "runs2", "--allow-stale", text="bert", image="none")
    assert r.exit_code == 0, r.output
    assert "105" in r.stderr  # the stale use is said
    (stale_run,) = run_dirs(tmp_path / "runs2")
    config = yaml.safe_load((stale_run / "config.yaml").read_text())
    assert config["allow_stale"] is True
    assert "105" in json.dumps(config["stale_caches"])
    r = invoke("predict", "--run", run, "--out", tmp_path / "p.csv", "--allow-stale")
    assert r.exit_code == 0, r.output
    assert len(read_csv(tmp_path / "p.csv")) == 6


# ---------------------------------------------------------------- 5. duplicate and empty guids


def test_failed_duplicates_and_empty_guids_do_not_block_the_join(tmp_path):
    n = 70
    guid = [f"g{i:03d}" for i in range(n)]
    status = np.full(n, OK, np.uint8)
    guid[5], status[5] = guid[4], FAILED  # a failed duplicate of a usable row: g004 stays
    guid[9] = guid[8] = "twice"  # two usable rows, one guid: which is right? neither is used
    guid[12], status[12] = "", FAILED  # an empty guid
    guid[66], status[66] = guid[65], FAILED  # a test row's failed duplicate
    make_cache(tmp_path / "f" / "syn.h5", guid=guid, status=status)
    r = fuse_cli(tmp_path / "f", tmp_path / "runs")
    assert r.exit_code == 0, r.output
    assert "duplicate" in r.stderr and "twice" in r.stderr
    (run,) = run_dirs(tmp_path / "runs")
    excluded = yaml.safe_load((run / "config.yaml").read_text())["rows"]["excluded"]
    assert sorted(e["guid"] for e in excluded) == sorted(["g004", "twice", "twice", "", "g065"])
    assert yaml.safe_load((run / "config.yaml").read_text())["rows"]["usable"] == n - 5
    out = tmp_path / "pred.csv"
    r = invoke("predict", "--run", run, "--out", out)
    assert r.exit_code == 0, r.output
    rows = read_csv(out)
    assert [x["guid"] for x in rows] == list(dict.fromkeys(guid[60:]))  # each once, in order
    assert all(x["tag"] for x in rows)  # g065 has a usable row: it is predicted


def test_a_duplicate_in_the_image_file_only_leaves_that_row_out(tmp_path):
    n = 70
    make_cache(tmp_path / "f" / "txt.h5", image=False)
    guid = [f"g{i:03d}" for i in range(n)] + ["g010"]  # the image file has g010 twice ...
    status = np.r_[np.full(n, OK), FAILED].astype(np.uint8)  # ... once failed
    make_cache(tmp_path / "f" / "img.h5", text=False, guid=guid, status=status, n_train=n + 1 - 10,
               label=np.r_[np.arange(60) % 3, [-1] * 10, 1], split=["train"] * 60 + ["test"] * 10 + ["train"])  # fmt: skip
    r = fuse_cli(tmp_path / "f", tmp_path / "runs", text="txt", image="img")
    assert r.exit_code == 0, r.output
    (run,) = run_dirs(tmp_path / "runs")
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["rows"]["usable"] == n and config["rows"]["excluded"] == []


# ---------------------------------------------------------------- 7. file-system faults


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if any head is trained."""
    import fusebench.fuse.experiment as experiment

    def boom(*a, **k):
        raise AssertionError("trained before checking the run folder")

    monkeypatch.setattr(experiment, "evaluate_head", boom)


def test_out_that_is_a_file_fails_before_training(tmp_path, no_training):
    make_cache(tmp_path / "f" / "syn.h5")
    (tmp_path / "runs").write_text("not a folder")
    line = one_line_error(fuse_cli(tmp_path / "f", tmp_path / "runs"), code=1)
    assert str(tmp_path / "runs") in line and "folder" in line


def test_unwritable_out_fails_before_training(tmp_path, monkeypatch, no_training):
    """Read-only --out (injected: the tests may run as root, who can write anywhere)."""
    make_cache(tmp_path / "f" / "syn.h5")
    out = tmp_path / "ro"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(out)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    line = one_line_error(fuse_cli(tmp_path / "f", out), code=1)
    assert "Permission denied" in line and str(out) in line and "--out" in line


def test_disk_full_while_writing_leaves_no_run_folder(tmp_path, monkeypatch):
    import fusebench.fuse.experiment as experiment

    make_cache(tmp_path / "f" / "syn.h5")

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(experiment, "write_csv", full)
    line = one_line_error(fuse_cli(tmp_path / "f", tmp_path / "runs"), code=1)
    assert "No space left on device" in line and "val_predictions.csv" in line
    assert run_dirs(tmp_path / "runs") == []  # nothing that looks like a run, not even .tmp


def test_a_run_is_written_under_tmp_and_renamed_when_finished(tmp_path, monkeypatch):
    import fusebench.fuse.experiment as experiment

    make_cache(tmp_path / "f" / "syn.h5")
    seen = []
    real = experiment.write_csv

    def spy(path, *a, **k):
        seen.append(Path(path).parent.name)
        return real(path, *a, **k)

    monkeypatch.setattr(experiment, "write_csv", spy)
    r = fuse_cli(tmp_path / "f", tmp_path / "runs")
    assert r.exit_code == 0, r.output
    (run,) = run_dirs(tmp_path / "runs")
    assert set(seen) == {run.name + ".tmp"} and (run / "val_predictions.csv").exists()
    tmp_run = tmp_path / "runs" / (run.name + "-x.tmp")
    shutil.copytree(run, tmp_run)  # what a killed run leaves: predict will not use it
    line = one_line_error(invoke("predict", "--run", tmp_run, "--out", tmp_path / "p.csv"))
    assert "unfinished" in line


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A cache and two finished runs on it (torch and joblib heads), for predict tests."""
    root = tmp_path_factory.mktemp("runs")
    n = 70
    status = np.full(n, OK, np.uint8)
    data = make_cache(root / "f" / "syn.h5", status=status,
                      guid=[f"g{i:03d}" for i in range(60)] + ["a,b", 'q"uote'] + [f"t{i}" for i in range(8)])  # fmt: skip
    out = {"root": root, "data": data}
    for head in ("concat_mlp", "logreg"):
        r = fuse_cli(root / "f", root / head, head=head)
        assert r.exit_code == 0, r.output
        (out[head],) = run_dirs(root / head)
    return out


def test_predict_out_problems_are_one_line_and_keep_the_old_file(runs, tmp_path, monkeypatch):
    line = one_line_error(invoke("predict", "--run", runs["logreg"], "--out", tmp_path), code=1)
    assert "is a folder" in line
    out = tmp_path / "pred.csv"
    out.write_text("old\n")
    real_open = open

    def full_open(file, mode="r", *a, **k):
        if str(file).startswith(str(out)) and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_open)
    line = one_line_error(invoke("predict", "--run", runs["logreg"], "--out", out), code=1)
    assert "No space left on device" in line and str(out) in line
    monkeypatch.undo()
    assert out.read_text() == "old\n" and not out.with_name("pred.csv.tmp").exists()


def test_main_turns_os_errors_and_usage_errors_into_one_line(monkeypatch, capsys):
    def raises(exc):
        def app_(*a, **k):
            raise exc

        return app_

    monkeypatch.setattr(cli, "app", raises(OSError(errno.EROFS, "Read-only file system", "/ro/x")))
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err == [
        "error: Read-only file system: /ro/x; that file system is read-only"
    ]
    monkeypatch.setattr(cli, "app", raises(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # programming errors still surface
        cli.main()
    monkeypatch.undo()
    for argv in (["fuse", "--head", "logreg", "--features", ".", "--bogus"],
                 ["fuse", "--head", "logreg", "--features", ".", "--folds", "x"]):  # fmt: skip
        monkeypatch.setattr(sys, "argv", ["fusebench", *argv])
        with pytest.raises(SystemExit) as e:
            cli.main()
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        assert "--help" in err[0]


# ---------------------------------------------------------------- 9. damaged run folders


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "config empty": lambda run: (run / "config.yaml").write_text(""),
    "config truncated": lambda run: _truncate(run / "config.yaml"),
    "config a list": lambda run: (run / "config.yaml").write_text("- a\n- b\n"),
    "config not yaml": lambda run: (run / "config.yaml").write_bytes(b"heads: [\x00\xff"),
    "config without heads": lambda run: (run / "config.yaml").write_text("features: x\n"),
    "model dir missing": lambda run: shutil.rmtree(first_model(run)),
    "head.json garbage": lambda run: (first_model(run) / "head.json").write_text("{not json"),
    "head.json without keys": lambda run: (first_model(run) / "head.json").write_text(
        '{"kind": "torch"}'
    ),
    "state.pt truncated": lambda run: _truncate(first_model(run) / "state.pt"),
    "state.pt missing": lambda run: (first_model(run) / "state.pt").unlink(),
    "model.joblib truncated": lambda run: _truncate(first_model(run) / "model.joblib"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_predict_refuses_a_damaged_run_folder_in_one_line(damage, runs, tmp_path):
    head = "logreg" if "joblib" in damage else "concat_mlp"
    run = tmp_path / "run"
    shutil.copytree(runs[head], run)
    DAMAGE[damage](run)
    line = one_line_error(invoke("predict", "--run", run, "--out", tmp_path / "p.csv"))
    assert str(run) in line and "rerun" in line, line
    assert not (tmp_path / "p.csv").exists()


def test_predict_says_where_to_point_when_the_caches_moved(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["logreg"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["features"] = str(tmp_path / "gone")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    line = one_line_error(invoke("predict", "--run", run, "--out", tmp_path / "p.csv"), code=2)
    assert "--features" in line
    r = invoke(
        "predict", "--run", run, "--out", tmp_path / "p.csv", "--features", runs["root"] / "f"
    )
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------- 10. no silent stand-ins


def test_predict_labels_what_the_head_can_read_and_marks_the_rest(tmp_path):
    """text_only predicts test rows whose IMAGE failed; rows whose TEXT failed get an empty
    tag (never the majority class) and are named on stderr."""
    n = 70
    img_status = np.full(n, OK, np.uint8)
    img_status[[61, 62]] = FAILED
    txt_status = np.full(n, OK, np.uint8)
    txt_status[64] = FAILED
    make_cache(tmp_path / "f" / "txt.h5", image=False, status=txt_status)
    make_cache(tmp_path / "f" / "img.h5", text=False, status=img_status)
    r = fuse_cli(tmp_path / "f", tmp_path / "runs", head="text_only", text="txt", image="img")
    assert r.exit_code == 0, r.output
    (run,) = run_dirs(tmp_path / "runs")
    out = tmp_path / "pred.csv"
    r = invoke("predict", "--run", run, "--out", out)
    assert r.exit_code == 0, r.output
    tags = {x["guid"]: x["tag"] for x in read_csv(out)}
    assert len(tags) == 10
    assert tags["g061"] and tags["g062"]  # image failed, text is all text_only reads
    assert tags["g064"] == ""  # no text: marked, not a stand-in class
    assert "g064" in r.stderr and "g061" not in r.stderr and "EMPTY tag" in r.stderr
    assert "1 with an empty tag" in r.stdout


def test_inf_and_nan_features_never_reach_a_head(tmp_path):
    def spoil(d):
        d["text"][3, 0] = np.inf  # a training row
        d["image"][7, 2] = np.nan
        d["text"][65, 1] = np.nan  # a test row

    make_cache(tmp_path / "f" / "syn.h5", edit=spoil)
    r = fuse_cli(tmp_path / "f", tmp_path / "runs", head="concat_mlp")
    assert r.exit_code == 0, r.output
    assert "not finite" in r.stderr
    (run,) = run_dirs(tmp_path / "runs")
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert {e["guid"] for e in config["rows"]["excluded"]} == {"g003", "g007", "g065"}
    metrics, _ = one_cell(run)
    assert metrics["runs"][0]["history"]  # every torch fit keeps its per-epoch history
    assert all(np.isfinite(h["train_loss"]) for h in metrics["runs"][0]["history"])
    out = tmp_path / "pred.csv"
    r = invoke("predict", "--run", run, "--out", out)
    assert r.exit_code == 0, r.output
    tags = {x["guid"]: x["tag"] for x in read_csv(out)}
    assert tags["g065"] == "" and all(t for g, t in tags.items() if g != "g065")
    assert "g065" in r.stderr and "not finite" in r.stderr


# ---------------------------------------------------------------- 12. flags and CSVs


def test_guids_with_commas_and_quotes_round_trip_through_predictions(runs, tmp_path):
    out = tmp_path / "pred.csv"
    r = invoke("predict", "--run", runs["logreg"], "--out", out)
    assert r.exit_code == 0, r.output
    rows = read_csv(out)
    assert [x["guid"] for x in rows] == ["a,b", 'q"uote'] + [f"t{i}" for i in range(8)]
    assert all(x["tag"] and set(x) == {"guid", "tag"} for x in rows)


def test_a_seed_given_twice_counts_once(tmp_path):
    make_cache(tmp_path / "f" / "syn.h5")
    r = fuse_cli(tmp_path / "f", tmp_path / "runs", "--seeds", "42,42")
    assert r.exit_code == 0, r.output
    assert "repeats a seed" in r.stderr
    (run,) = run_dirs(tmp_path / "runs")
    metrics, summary = one_cell(run)
    assert len(metrics["runs"]) == 1 and summary["macro_f1"]["n"] == 1


BAD_FLAGS = {
    "hidden=-5": (["--head", "concat_mlp", "--set", "hidden=-5"], ["concat_mlp", "hidden", ">= 1"]),
    "hidden=1.5": (["--head", "concat_mlp", "--set", "hidden=1.5"], ["hidden", "whole number"]),
    "dropout=2": (["--head", "late", "--set", "dropout=2"], ["late", "dropout", "[0, 1)"]),
    "bool=maybe": (
        ["--head", "late", "--set", "learned_weight=maybe"],
        ["learned_weight", "true or false"],
    ),
    "train=5": (["--head", "late", "--set", "train=5"], ["train must be a mapping"]),
    "lr=0": (["--head", "late", "--set", "train.lr=0"], ["train.lr", "> 0"]),
    "C=-1": (["--head", "logreg", "--set", "C=-1"], ["logreg", "C=-1", "> 0"]),
    "num_heads": (["--head", "cross_attn", "--set", "dim=10"], ["divisible"]),
    "epochs 0": (["--head", "logreg", "--epochs", "0"], ["--epochs", "at least 1"]),
    "val-ratio": (["--head", "logreg", "--val-ratio", "1.5"], ["--val-ratio", "between 0 and 1"]),
    "folds 1": (["--head", "logreg", "--folds", "1"], ["--folds", "at least 2"]),
    "negative seed": (["--head", "logreg", "--seeds", "-1"], ["seed -1"]),
    "bogus head": (["--head", "bogus"], ["unknown head 'bogus'", "logreg"]),
    "no modality": (
        ["--head", "logreg", "--text", "none", "--image", "none"],
        ["--text", "--image"],
    ),
    "cuda": (["--head", "late", "--device", "cuda"], ["--device cuda", "no GPU"]),
    "cuda:99": (["--head", "late", "--device", "cuda:99"], ["cuda:99"]),
    "tpu": (["--head", "late", "--device", "tpu"], ["--device must be"]),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flags_are_one_line_before_any_training(case, tmp_path, monkeypatch, no_training):
    import torch

    if case == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make_cache(tmp_path / "f" / "syn.h5", n_train=30, n_test=3)
    args, needles = BAD_FLAGS[case]
    cmd = ["fuse", "--features", tmp_path / "f", "--out", tmp_path / "runs", "--quiet"]
    if "--text" not in args:
        cmd += ["--text", "syn", "--image", "syn"]
    line = one_line_error(invoke(*cmd, *args), code=2)
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (tmp_path / "runs").exists()


def test_compare_bad_heads_and_seeds_are_one_line(tmp_path, no_training):
    make_cache(tmp_path / "f" / "syn.h5", n_train=30, n_test=3)
    base = [
        "compare",
        "--features",
        tmp_path / "f",
        "--text",
        "syn",
        "--image",
        "syn",
        "--out",
        tmp_path / "r",
    ]
    assert "unknown head 'bogus'" in one_line_error(invoke(*base, "--heads", "logreg,bogus"), 2)
    assert "seed" in one_line_error(invoke(*base, "--heads", "logreg", "--seeds", "1,x"), 2)


# ---------------------------------------------------------------- beyond the list


def test_every_labelled_row_one_class_is_refused(tmp_path):
    """Base trained on it and reported macro-F1 0.5 for a classifier that cannot be wrong."""
    make_cache(tmp_path / "f" / "syn.h5", classes=("negative", "positive"),
               label=[1] * 60 + [-1] * 10)  # fmt: skip
    line = one_line_error(fuse_cli(tmp_path / "f", tmp_path / "runs", head="concat_mlp"), code=2)
    assert "positive" in line and "two classes" in line


def test_a_label_outside_the_classes_is_refused_not_a_torch_traceback(tmp_path):
    make_cache(tmp_path / "f" / "syn.h5", label=[0, 1, 2, 5] * 15 + [-1] * 10)
    line = one_line_error(fuse_cli(tmp_path / "f", tmp_path / "runs", head="concat_mlp"))
    assert "g003" in line and "label 5" in line


def test_features_given_as_the_cache_file_says_which_folder(tmp_path):
    make_cache(tmp_path / "f" / "syn.h5", n_train=30, n_test=3)
    line = one_line_error(fuse_cli(tmp_path / "f" / "syn.h5", tmp_path / "runs"), code=2)
    assert f"--features {tmp_path / 'f'}" in line


def test_a_cache_with_no_usable_row_says_so(tmp_path):
    make_cache(tmp_path / "f" / "syn.h5", n_train=30, n_test=3, status=np.full(33, FAILED))
    line = one_line_error(fuse_cli(tmp_path / "f", tmp_path / "runs"), code=2)
    assert "none of the 33 rows" in line
