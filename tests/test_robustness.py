"""Robustness scores (fuse/robustness.py): a modality missing or noisy on a fit's scored rows.

Consistency: a head that does not read the image scores exactly its clean score with the
image missing; a head that reads only the image drops to a constant prediction (chance
level); noise hurts more as it grows on a planted signal; streamed tokens give the numbers
RAM gives; `--robustness off` writes no robustness.csv."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from fusebench.fuse.experiment import evaluate_head
from fusebench.fuse.features import load_feature_set
from fusebench.fuse.protocol import StratifiedProtocol
from fusebench.fuse.report_html import write_report
from fusebench.fuse.robustness import CONDITIONS, robustness_rows

from tests.conftest import cli
from tests.test_fuse import synthetic, write


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """Text and image both carry the class; tokens stored (text masked, image not)."""
    data = synthetic(n_train=180, n_test=6, signal=0.5, seed=5)
    root = tmp_path_factory.mktemp("robust")
    write(root / "syn.h5", data)
    data["dir"] = root
    both = load_feature_set(root, text="syn", image="syn", tokens=True)
    data["folds"] = StratifiedProtocol(folds=2).splits(both)
    data["both"] = both
    return data


SMALL = {"hidden": 16}  # small torch heads: the tests check the scoring, not the learning


def fits(head, fs, folds, *, epochs: int = 3, **kw):
    return evaluate_head(head, fs, folds, [42], robustness=True, epochs=epochs, **kw)


def constant_scores(fs, rows) -> set[float]:
    """Macro-F1 of predicting one class for every row, for each class (the chance levels)."""
    from sklearn.metrics import f1_score

    y = fs.label[rows]
    labels = list(range(fs.n_classes))
    return {
        round(f1_score(y, np.full_like(y, c), labels=labels, average="macro", zero_division=0), 12)
        for c in labels
    }


def test_every_condition_is_scored_and_clean_is_the_fit_score(planted):
    runs = fits("logreg", planted["both"], planted["folds"])
    for r in runs:
        assert list(r.robustness) == list(CONDITIONS)
        assert r.robustness["clean"] == r.metrics["macro_f1"]
        assert all(0.0 <= v <= 1.0 for v in r.robustness.values())
    again = fits("logreg", planted["both"], planted["folds"])
    assert [r.robustness for r in again] == [r.robustness for r in runs]  # seeded noise


def test_text_only_cell_is_untouched_by_a_missing_image(planted):
    """logreg on a text-only set and the text_only torch head on a set that has images."""
    text_set = load_feature_set(planted["dir"], text="syn", image=None)
    for head, fs in (("logreg", text_set), ("text_only", planted["both"])):
        for r in fits(head, fs, planted["folds"], overrides=SMALL if head != "logreg" else None):
            assert r.robustness["image_missing"] == r.robustness["clean"], head
            for lv in ("0.5", "1", "2"):
                assert r.robustness[f"image_noise_{lv}"] == r.robustness["clean"], head
            assert r.robustness["text_missing"] < r.robustness["clean"], head


@pytest.mark.parametrize("head", ["logreg", "image_only_tokens"])
def test_image_only_cell_drops_to_chance_without_its_image(planted, head):
    """Every row then gets the same input: one class for all, a constant prediction's score
    (pooled: the training mean vector; tokens: the mean image's patches)."""
    image_set = load_feature_set(planted["dir"], text=None, image="syn", tokens=True)
    kw = {"overrides": {"use_tokens": True}} if head.endswith("tokens") else {}
    for r, fold in zip(
        fits(head.split("_tokens")[0], image_set, planted["folds"], **kw), planted["folds"]
    ):
        chance = constant_scores(image_set, fold.scored)
        assert round(r.robustness["image_missing"], 12) in chance
        assert r.robustness["clean"] > max(chance) + 0.2  # it was far above chance before
        assert r.robustness["text_missing"] == r.robustness["clean"]


def test_missing_text_tokens_are_masked_out_for_token_heads(planted):
    """cross_attn (tokens): text missing = no real token; it still predicts, worse or equal."""
    tiny = {"dim": 16, "num_heads": 2, **SMALL}
    for r in fits("cross_attn", planted["both"], planted["folds"], epochs=1, overrides=tiny):
        assert set(r.robustness) == set(CONDITIONS)
        assert r.robustness["text_missing"] <= r.robustness["clean"] + 0.02


def test_noise_hurts_more_as_it_grows(planted):
    image_set = load_feature_set(planted["dir"], text=None, image="syn")
    runs = fits("logreg", image_set, planted["folds"])
    rows = {r["condition"]: r["macro_f1_mean"] for r in robustness_rows(runs)}
    chain = [rows["clean"], rows["image_noise_0.5"], rows["image_noise_1"], rows["image_noise_2"]]
    assert all(b <= a + 0.03 for a, b in zip(chain, chain[1:])), chain  # monotone-ish
    assert chain[-1] < chain[0] - 0.1, chain  # 2 std of noise clearly hurts


def test_streamed_tokens_give_the_numbers_ram_gives(planted):
    streamed = load_feature_set(
        planted["dir"], text="syn", image="syn", tokens=True, memory_budget=1
    )
    assert streamed.image.streamed
    kw = {"epochs": 1, "overrides": {"use_tokens": True, **SMALL}}
    a = fits("image_only", planted["both"], planted["folds"], **kw)
    b = fits("image_only", streamed, planted["folds"], **kw)
    for x, y in zip(a, b):
        assert x.robustness.keys() == y.robustness.keys()
        assert np.allclose(list(x.robustness.values()), list(y.robustness.values()), atol=1e-6)


def test_robustness_flag_writes_or_skips_the_csv_and_changes_no_number(planted, tmp_path):
    """on: robustness.csv/.png for every cell; off: neither. The fits' numbers are the same
    (torch fits one at a time, so robustness scoring runs between fits)."""
    runs = {}
    for flag in ("on", "off"):
        args = ["compare", "--features", planted["dir"], "--text", "syn", "--image", "syn,none",
                "--heads", "logreg,concat_mlp", "--folds", 2, "--seeds", 1, "--epochs", 1, "--set", "concat_mlp.hidden=16",
                "--one-at-a-time", "--robustness", flag, "--out", tmp_path / flag, "--quiet"]  # fmt: skip
        r = cli(*args)
        assert r.exit_code == 0, r.output
        (runs[flag],) = (tmp_path / flag).iterdir()
    off, on = runs["off"], runs["on"]
    assert not (off / "robustness.csv").exists() and not (off / "robustness.png").exists()
    assert "robustness: false" in (off / "config.yaml").read_text()
    assert (on / "runs.csv").read_text() != "" and _scores(on) == _scores(off)
    with open(on / "robustness.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ranked = json.loads((on / "results.json").read_text())["ranking"]
    assert {r["cell"] for r in rows} == set(ranked) and len(ranked) == 3
    assert len(rows) == 3 * len(CONDITIONS)
    assert (on / "robustness.png").stat().st_size > 1000
    assert "robustness: true" in (on / "config.yaml").read_text()
    shown = write_report([on], tmp_path / "on.html").read_text()
    table = shown.split("<h3>Robustness</h3>")[1].split("</table>")[0]
    assert all(f"<td>{cell}</td>" in table for cell in ranked) and "image noise 2" in table
    assert shown.count('class="robustness-plot" src="data:image/png;base64,') == 1
    assert "<h3>Robustness</h3>" not in write_report([off], tmp_path / "off.html").read_text()


def _scores(run) -> list[tuple]:
    with open(run / "runs.csv", newline="") as fh:
        return [(r["cell"], r["fold"], r["macro_f1"], r["accuracy"]) for r in csv.DictReader(fh)]


def test_a_bad_robustness_value_is_one_line(planted, tmp_path):
    r = cli("fuse", "--features", planted["dir"], "--text", "syn", "--image", "syn",
            "--head", "logreg", "--robustness", "maybe", "--out", tmp_path)  # fmt: skip
    assert r.exit_code != 0 and "--robustness must be on or off" in r.output
    assert "Traceback" not in r.output


def test_a_copy_that_would_not_fit_is_skipped_with_a_note(planted, monkeypatch, capsys):
    import fusebench.fuse.robustness as robustness

    monkeypatch.setattr(robustness, "available_memory", lambda: 1000)  # bytes: nothing fits
    (r, *_) = fits("logreg", planted["both"], planted["folds"][:1])
    assert list(r.robustness) == ["clean"] and r.robustness["clean"] == r.metrics["macro_f1"]
    err = capsys.readouterr().err
    assert "robustness: image conditions skipped" in err and "text conditions skipped" in err
    assert robustness_rows([r]) == [
        {"cell": "", "condition": "clean", "macro_f1_mean": round(r.metrics["macro_f1"], 6),
         "macro_f1_std": 0.0, "delta_vs_clean": 0.0, "n": 1}
    ]  # fmt: skip
