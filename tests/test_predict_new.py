"""`predict --data NEW` and `fusebench.predict_pairs`: a run trained on one dataset labels a
manifest it never saw, extracted with the encoder settings its caches record.

The honest comparison: the same run labels NEW's rows (1) through `predict --data NEW` and
(2) through `predict --features AB --split test`, where AB is ONE dataset holding the
training rows and NEW's rows (as unlabelled test rows), extracted together. predict accepts
AB for the run because the training rows' features are bit-identical there (it checks their
digest), so both paths use the same models on features of the same rows: the labels and the
probabilities must agree exactly. Also: changed or missing model files are refused in one
line before anything is extracted; the caches of NEW are normal caches, reused next time."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import yaml
from fusebench.extract.datasets import dataset_name

from tests.conftest import cli as invoke
from tests.conftest import make_lab5, one_line_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_NEW = 8
BAD = "new-3"  # its image does not decode


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models) -> dict:
    """A (lab5 folder, 45 labelled + 6 test rows), NEW (a CSV manifest of 8 other tweets, no
    label or split column, one broken image), AB.csv (A's rows and NEW's as test rows, one
    dataset), private copies of the tiny models, A's caches and one compare run on them."""
    root = tmp_path_factory.mktemp("newdata")
    models = {
        e: Path(shutil.copytree(tiny_models[e], root / "models" / e)) for e in ("bert", "vit")
    }
    a = make_lab5(root / "lab5", n_train=45, n_test=6)
    b = make_lab5(root / "newset", n_train=0, n_test=N_NEW, seed=1)
    new_rows = [(f"new-{i}", f"data/{100 + i}.txt", f"data/{100 + i}.jpg") for i in range(N_NEW)]
    (b / "data" / "103.jpg").write_bytes(b"not a jpeg")  # new-3
    new = b / "new.csv"
    new.write_text(
        "guid,text_path,image_path\n" + "".join(f"{g},{t},{i}\n" for g, t, i in new_rows)
    )
    ab = ["guid,text_path,image_path,label,split"]
    for line in (a / "train.txt").read_text().splitlines()[1:]:
        g, tag = line.split(",")
        ab.append(f"{g},lab5/data/{g}.txt,lab5/data/{g}.jpg,{tag},train")
    for line in (a / "test_without_label.txt").read_text().splitlines()[1:]:
        g = line.split(",")[0]
        ab.append(f"{g},lab5/data/{g}.txt,lab5/data/{g}.jpg,,test")
    ab += [f"{g},newset/{t},newset/{i},,test" for g, t, i in new_rows]
    (root / "ab.csv").write_text("\n".join(ab) + "\n")  # one dataset: A and NEW together
    for data, out in ((a, root / "f"), (root / "ab.csv", root / "f-ab")):
        ok(invoke("extract", "--data", data, "--encoder", "bert,vit", "--model",
                  f"{models['bert']},{models['vit']}", "--out", out, "--quiet"))  # fmt: skip
    ok(invoke("compare", "--heads", "logreg,text_only,concat_mlp", "--features", root / "f" / "lab5",
              "--text", "bert", "--image", "vit", "--folds", 3, "--seeds", 1, "--epochs", 3,
              "--out", root / "runs", "--robustness", "off", "--quiet"))  # fmt: skip
    (run,) = (root / "runs").iterdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    joint = root / "f-ab" / dataset_name(root / "ab.csv")
    return {"run": run, "new": new, "models": models, "config": config, "a": a, "joint": joint}


def test_new_manifest_gets_the_labels_of_extracting_both_together(world, tmp_path):
    run = world["run"]
    out = tmp_path / "new.csv"
    r = invoke("predict", "--run", run, "--data", world["new"], "--out", out, "--proba")
    ok(r)
    got = read_csv(out)
    assert [x["guid"] for x in got] == [f"new-{i}" for i in range(N_NEW)]  # every row, in order
    best = world["config"]["best_cell"]
    assert f"of cell '{best}'" in r.stdout
    fusion = world["config"]["cells"][best]["image"] not in (None, "none")
    assert {x["guid"] for x in got if not x["tag"]} == ({BAD} if fusion else set())

    joint = tmp_path / "joint.csv"  # the same run on the caches of A and NEW extracted together
    ok(invoke("predict", "--run", run, "--features", world["joint"], "--split", "test",
              "--out", joint, "--proba"))  # fmt: skip
    want = {x["guid"]: x for x in read_csv(joint) if x["guid"].startswith("new-")}
    assert got == [want[x["guid"]] for x in got]  # same tags, same probabilities (6 decimals)
    assert len({x["tag"] for x in got if x["tag"]}) >= 1

    # the caches of NEW: normal caches, in RUN/new/<dataset>/, reused by the next call
    caches = sorted((run / "new" / "newset-new").glob("*.h5"))
    assert [c.name for c in caches] == (["bert.h5", "vit.h5"] if fusion else ["bert.h5"])
    for c in caches:
        ok(invoke("cache", "verify", c))
    again = tmp_path / "again.csv"
    r = invoke("predict", "--run", run, "--data", world["new"], "--out", again, "--proba")
    assert "up to date" in ok(r) and again.read_text() == out.read_text()


def test_text_only_cell_extracts_text_only_and_labels_the_broken_image_row(world, tmp_path):
    (cell,) = [c for c, v in world["config"]["cells"].items() if v["head"] == "text_only"]
    out = tmp_path / "p.csv"
    ok(invoke("predict", "--run", world["run"], "--data", world["new"], "--cell", cell,
              "--features-out", tmp_path / "feats", "--out", out))  # fmt: skip
    assert [p.name for p in (tmp_path / "feats" / "newset-new").glob("*.h5")] == ["bert.h5"]
    rows = read_csv(out)
    assert len(rows) == N_NEW and all(x["tag"] for x in rows)  # new-3's text is fine


def test_the_training_data_as_new_data_gets_its_own_labels(world, tmp_path):
    """NEW may be the training dataset itself (another cache, same features): A's test rows
    get the labels `predict --split test` gives them from the run's own cache."""
    run = world["run"]
    ok(invoke("predict", "--run", run, "--out", tmp_path / "own.csv"))
    ok(invoke("predict", "--run", run, "--data", world["a"], "--out", tmp_path / "again.csv",
              "--features-out", tmp_path / "feats"))  # fmt: skip
    again = {x["guid"]: x["tag"] for x in read_csv(tmp_path / "again.csv")}
    own = read_csv(tmp_path / "own.csv")
    assert len(again) == 51 and {x["guid"]: again[x["guid"]] for x in own} == {
        x["guid"]: x["tag"] for x in own
    }


def test_predict_pairs_goes_the_same_way(world, tmp_path):
    import fusebench

    cell = world["config"]["best_cell"]
    data = world["new"].parent / "data"
    pairs = [((data / f"{100 + i}.txt").read_text(), data / f"{100 + i}.jpg") for i in range(N_NEW)]
    labels = fusebench.predict_pairs(world["run"], pairs, cell=cell)
    ok(invoke("predict", "--run", world["run"], "--data", world["new"], "--cell", cell,
              "--out", tmp_path / "p.csv"))  # fmt: skip
    assert labels == [x["tag"] for x in read_csv(tmp_path / "p.csv")]
    probs = fusebench.predict_pairs(world["run"], pairs[:2], cell=cell, proba=True)
    assert [p["tag"] for p in probs] == labels[:2]
    assert abs(sum(v for k, v in probs[0].items() if k.startswith("p_")) - 1) < 1e-4


def test_changed_or_missing_model_files_are_refused(world, tmp_path):
    run, bert = world["run"], world["models"]["bert"]
    weights = bert / "model.safetensors"
    original = weights.read_bytes()
    out = tmp_path / "p.csv"
    args = ("predict", "--run", run, "--data", world["new"], "--out", out,
            "--features-out", tmp_path / "feats")  # fmt: skip
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one weight bit
        line = one_line_error(invoke(*args), code=2)
        assert str(bert) in line and "changed since" in line and "restore" in line
        assert "model.safetensors" in line and "config.json" not in line  # the file that changed
        weights.write_bytes(original)
        bert.rename(bert.with_name("bert-moved"))
        line = one_line_error(invoke(*args), code=2)
        assert str(bert) in line and "not on this machine" in line and "--model-dir" in line
        # the files, elsewhere on this machine: --model-dir, checked against the recorded hash
        ok(invoke(*args, "--model-dir", f"bert={bert.with_name('bert-moved')}"))
    finally:
        if bert.with_name("bert-moved").exists():
            bert.with_name("bert-moved").rename(bert)
        weights.write_bytes(original)
    assert not (tmp_path / "feats").exists() or not list((tmp_path / "feats").rglob("*.tmp"))
    assert len(read_csv(out)) == N_NEW


def test_split_with_data_is_refused(world, tmp_path):
    r = invoke("predict", "--run", world["run"], "--data", world["new"], "--split", "test",
               "--out", tmp_path / "p.csv")  # fmt: skip
    assert "drop --split" in one_line_error(r, code=2)
    r = invoke(
        "predict", "--run", world["run"], "--features-out", tmp_path, "--out", tmp_path / "p"
    )
    assert "add --data" in one_line_error(r, code=2)


def test_broken_image_of_new_data_is_counted(world, tmp_path):
    """Only for a cell that reads images: the row is named on stderr with an empty tag."""
    cells = world["config"]["cells"]
    (cell,) = [c for c, v in cells.items() if v["head"] == "logreg"]
    r = invoke("predict", "--run", world["run"], "--data", world["new"], "--cell", cell,
               "--out", tmp_path / "p.csv")  # fmt: skip
    assert "1 with an empty tag" in ok(r) and BAD in r.stderr


def test_refit_labels_new_data_and_is_recorded(world, tmp_path):
    """--refit trains on the run's own caches, then labels NEW; predictions.json says so."""
    import json

    run = shutil.copytree(world["run"], tmp_path / "run")  # the refit is saved in the run
    ok(invoke("predict", "--run", run, "--data", world["new"], "--refit", "--cell",
              world["config"]["best_cell"], "--out", tmp_path / "p.csv"))  # fmt: skip
    record = json.loads((run / "predictions.json").read_text())[-1]
    assert record["mode"] == "refit" and record["n_rows"] == N_NEW
    assert str(world["new"]) in record["split"] and record["model_dirs"][0].startswith("refit/")
    assert len(read_csv(tmp_path / "p.csv")) == N_NEW
