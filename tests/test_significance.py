"""Is the winner really better? The paired comparison of every row with the best cell
(fuse.significance), and the ensemble row (fuse.ensemble).

The run-level tests build one small grid on synthetic caches: `ta` and `tb` hold the same
text vectors, which carry the class (a planted signal), and `iv` holds image vectors that are
pure noise. So text_only on ta and on tb are equal by construction (one shared fit), and
image_only, which reads only the noise, is clearly worse than the best. The p-values are then
recomputed from runs.csv and config.yaml by an implementation written here (numpy +
scipy.stats.t), not by importing the module under test."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from fusebench.fuse.ensemble import vote
from fusebench.fuse.significance import (
    Design,
    compare_with_best,
    corrected_t_test,
    holm,
    wilcoxon_p,
)
from scipy.stats import t as student_t

from tests.conftest import cli

CLASSES = ("negative", "neutral", "positive")
HEADS = "text_only,image_only,logreg"
K = 2  # --ensemble


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_caches(root: Path, n: int = 160, dim: int = 8) -> Path:
    """ta.h5 and tb.h5: the same text vectors, shifted by the class; iv.h5: image noise."""
    from fusebench.cache import TokenFeatures, write_features

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    text = (rng.normal(size=(n, dim)) + 2.0 * rng.normal(size=(3, dim))[y]).astype(np.float16)
    image = rng.normal(size=(n, dim)).astype(np.float16)
    rows = {"guid": [f"r{i}" for i in range(n)], "split": ["train"] * n, "label": y}
    for name, modality, x in (("ta", "text", text), ("tb", "text", text), ("iv", "image", image)):
        write_features(
            root / f"{name}.h5",
            **rows,
            classes=CLASSES,
            **{modality: TokenFeatures(None, None, {"pooled": x})},
            config={"encoder": name},
            attrs={"encoder": name},
        )
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = write_caches(tmp_path_factory.mktemp("signif"))
    out = root / "runs"
    r = cli("compare", "--features", root, "--text", "ta,tb", "--image", "iv", "--heads", HEADS,
            "--folds", 4, "--seeds", "1,2", "--epochs", 3, "--ensemble", K, "--out", out,
            "--robustness", "off", "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return {
        "r": r,
        "dir": folder,
        "results": json.loads((folder / "results.json").read_text()),
        "rows": {row["cell"]: row for row in read_csv(folder / "results.csv")},
        "runs": read_csv(folder / "runs.csv"),
        "config": yaml.safe_load((folder / "config.yaml").read_text()),
    }


# ---------------------------------------------------------------- the statistics


def test_holm_matches_a_hand_checked_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert np.allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    adjusted = holm([math.nan, 0.01, 0.04])  # NaN: no test, not counted in m (= 2)
    assert math.isnan(adjusted[0]) and np.allclose(adjusted[1:], [0.02, 0.04])
    assert np.allclose(holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1, order kept


def test_corrected_t_test_matches_the_formula_and_zero_variance_is_answered():
    d = [0.01, 0.02, 0.03, 0.04, 0.05]
    se = math.sqrt((1 / 5 + 20 / 80) * np.var(d, ddof=1))
    expected = 2 * student_t.sf(0.03 / se, df=4)
    assert corrected_t_test(d, n_train=80, n_test=20) == pytest.approx(expected)
    assert 0.04 < expected < 0.05  # t = 2.83 on 4 df
    assert corrected_t_test([0.0] * 6, 80, 20) == 1.0  # equal fits: clearly tied
    assert corrected_t_test([-0.1] * 6, 80, 20) == 0.0  # the same gap every fit: not noise
    assert wilcoxon_p([0.0] * 6) == 1.0 and wilcoxon_p([-0.1] * 6) < 0.05
    assert math.isnan(corrected_t_test([0.1], 80, 20))  # one pair: no variance, no p


def test_equal_scores_are_tied_without_sharing_a_fit_and_a_holdout_gives_no_p():
    fits = {(s, f): 0.5 + 0.01 * f for s in (1, 2) for f in range(4)}
    scores = {"best": fits, "twin": dict(fits), "worse": {k: v - 0.2 for k, v in fits.items()}}
    out = compare_with_best(scores, "best", Design(n_train=90, n_test=30, n_folds=4))
    assert out["twin"]["tied_with_best"] is True and out["twin"]["p"] == 1.0
    assert out["worse"]["tied_with_best"] is False and out["worse"]["delta_macro_f1"] < 0
    unpaired = compare_with_best(
        {"best": fits, "other seeds": {(9, f): 0.4 for f in range(4)}},
        "best",
        Design(n_train=90, n_test=30, n_folds=4),
    )["other seeds"]  # fitted on other seeds: no pairs, no test, no crash
    assert unpaired["p"] is None and unpaired["tied_with_best"] is None
    assert "same seeds and folds" in unpaired["why"]
    holdout = compare_with_best(scores, "best", Design(n_train=90, n_test=10, n_folds=1))
    assert holdout["worse"]["p"] is None and holdout["worse"]["tied_with_best"] is None
    assert "holdout" in holdout["worse"]["why"] and holdout["best"]["best"]


# ---------------------------------------------------------------- a real run


def independent_p_values(run: dict) -> dict[str, tuple[float, float]]:
    """cell -> (raw, Holm-adjusted) corrected-t p, from runs.csv and config.yaml alone."""
    per_fold = run["config"]["rows"]["per_fold"]
    n_train = np.mean([f["fit"] + f["inner_val"] for f in per_fold])
    n_test = np.mean([f["scored"] for f in per_fold])
    f1: dict[str, dict] = {}
    for row in run["runs"]:
        f1.setdefault(row["cell"], {})[(row["seed"], row["fold"])] = float(row["macro_f1"])
    best = next(c for c, row in run["rows"].items() if row["rank"] == "1")
    twins = {c for c, e in run["config"]["cells"].items() if e.get("same_fit_as") == best}
    raw = {}
    for cell, fits in f1.items():
        if cell == best or cell in twins:
            continue
        d = np.array([fits[k] - f1[best][k] for k in sorted(fits)])
        if not d.any():  # the documented convention: identical scores are tied, p = 1
            raw[cell] = 1.0
            continue
        t = d.mean() / np.sqrt((1 / len(d) + n_test / n_train) * d.var(ddof=1))
        raw[cell] = 2 * student_t.sf(abs(t), len(d) - 1)
    order = sorted(raw, key=raw.get)
    adjusted, running = {}, 0.0
    for i, cell in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * raw[cell]))
        adjusted[cell] = running
    return {c: (raw[c], adjusted[c]) for c in raw}


def test_p_values_recomputed_from_runs_csv_match_results_csv(run):
    expected = independent_p_values(run)
    assert len(expected) >= 3  # image_only, the logreg twin or text_only, the ensemble
    for cell, (raw, adjusted) in expected.items():
        row = run["rows"][cell]
        assert float(row["p_raw"]) == pytest.approx(raw, abs=2e-6), cell
        assert float(row["p"]) == pytest.approx(adjusted, abs=2e-6), cell
        assert row["tied_with_best"] == str(adjusted >= 0.05).lower(), cell
        sig = run["results"].get("cells", {}).get(cell) or run["results"]["ensemble"]
        assert sig["significance"]["p"] == pytest.approx(adjusted, abs=1e-12)


def test_equal_by_construction_is_tied_and_the_noise_reader_is_not(run):
    rows = run["rows"]
    best = next(c for c, row in rows.items() if row["rank"] == "1")
    assert best.startswith("ta+")  # the signal lives in ta (and tb)
    twin = "tb" + best[2:]  # the same head on the byte-identical cache: one shared fit
    assert run["config"]["cells"][twin]["same_fit_as"] == best
    assert rows[best]["tied_with_best"] == "best"
    assert rows[twin]["tied_with_best"] == "true" and float(rows[twin]["p"]) == 1.0
    assert float(rows[twin]["delta_macro_f1"]) == 0.0
    noise = rows["none+iv/image_only"]
    assert noise["tied_with_best"] == "false" and float(noise["p"]) < 0.05
    assert float(noise["delta_macro_f1"]) < -0.3 and float(noise["p_wilcoxon"]) < 0.05


def test_table_marks_the_rows_and_states_the_test_and_alpha(run):
    lines = run["r"].stdout.splitlines()
    header = lines[0].split()
    assert "vs" in header and "best" in header
    body = [line for line in lines[2:] if "±" in line and line.split()[0][0] in "0123456789-"]
    assert len(body) == len(run["rows"])  # the 5 cells and the ensemble row
    by_head = {line.split()[3]: line for line in body}
    assert " worse " in by_head["image_only"]
    assert sum(" best " in line for line in body) == 1 and any(" tied " in line for line in body)
    assert body[-1].split()[:4] == ["-", "-", "-", "ensemble"]  # the extra row, last
    footer = " ".join(lines[2 + len(body) :])
    assert "Nadeau-Bengio corrected resampled t-test" in footer and "α = 0.05" in footer
    assert "Holm" in footer


def test_the_report_marks_tied_rows(run, tmp_path):
    r = cli("report", run["dir"], "--out", tmp_path / "report.html")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "report.html").read_text()
    assert "<th>vs best</th>" in page and "<td>tied</td>" in page and "<td>worse</td>" in page
    assert "ensemble(top2)" in page or "<td>ensemble</td>" in page
    assert "Nadeau-Bengio" in page


# ---------------------------------------------------------------- the ensemble row


def test_ensemble_members_are_the_top_k_by_inner_score(run):
    cells = list(run["config"]["cells"])  # grid order
    candidates = [c for c in cells if not run["config"]["cells"][c].get("same_fit_as")]
    inner = {(r["cell"], r["seed"], r["fold"]): float(r["inner_macro_f1"]) for r in run["runs"]
             if r["cell"] in candidates}  # fmt: skip
    chosen = run["results"]["ensemble"]["chosen"]
    assert len(chosen) == 4 * 2  # every fold x seed
    for c in chosen:
        fit = (str(c["seed"]), str(c["fold"]))
        ranked = sorted(
            candidates, key=lambda cell, fit=fit: (-inner[(cell, *fit)], cells.index(cell))
        )
        assert c["cells"] == ranked[:K], c
    ens = [r for r in run["runs"] if r["cell"] == f"ensemble(top{K})"]
    assert len(ens) == 8 and run["rows"][f"ensemble(top{K})"]["rank"] == "-"


def test_ensemble_proba_is_the_mean_of_its_members(run):
    preds: dict[tuple, dict] = {}
    for row in read_csv(run["dir"] / "val_predictions.csv"):
        p = np.array([float(row[f"p_{c}"]) for c in CLASSES])
        preds[(row["cell"], row["seed"], row["fold"], row["guid"])] = p
    name = f"ensemble(top{K})"
    for c in run["results"]["ensemble"]["chosen"]:
        seed, fold = str(c["seed"]), str(c["fold"])
        guids = [g for (cell, s, f, g) in preds if (cell, s, f) == (name, seed, fold)]
        assert guids
        for g in guids:
            mean = np.mean([preds[(m, seed, fold, g)] for m in c["cells"]], axis=0)
            assert np.allclose(preds[(name, seed, fold, g)], mean, atol=2e-6)


def test_the_vote_never_looks_at_the_scored_rows():
    """A canary: cell `lucky` is perfect on the scored rows but worst on its inner rows; the
    vote must pass it over, whatever its scored predictions are."""
    y = np.array([0, 1, 2, 0, 1, 2])
    scored = np.arange(6)
    perfect = np.eye(3)[y]
    wrong = np.eye(3)[(y + 1) % 3]

    def fit(cell: str, inner: float, proba: np.ndarray) -> SimpleNamespace:
        metrics = {"train_time_s": 1.0, "n_params": 10}
        return SimpleNamespace(cell=cell, seed=1, fold=0, metrics=metrics, scored=scored,
                               proba=proba, inner_macro_f1=inner)  # fmt: skip

    fits = [fit("lucky", 0.1, perfect), fit("a", 0.9, wrong), fit("b", 0.8, perfect * 0.5 + 0.1)]
    (v,) = vote(fits, ["lucky", "a", "b"], 2, y, CLASSES)
    assert v.cells == ["a", "b"]
    assert np.allclose(v.proba, (wrong + perfect * 0.5 + 0.1) / 2)
    fits[0].proba = wrong  # the scored rows' predictions of a non-member change: same choice
    assert vote(fits, ["lucky", "a", "b"], 2, y, CLASSES)[0].cells == ["a", "b"]
    assert vote(fits, ["lucky", "a"], 3, y, CLASSES) == []  # fewer cells than k: no row


def test_a_holdout_run_says_n_a_instead_of_a_p(run, tmp_path):
    root = run["dir"].parent.parent
    r = cli("compare", "--features", root, "--text", "ta", "--image", "iv,none", "--heads",
            "logreg", "--val-ratio", 0.25, "--seeds", "1,2", "--out", tmp_path / "runs",
            "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "vs best: n/a: a single holdout split" in r.stdout
    (folder,) = (tmp_path / "runs").iterdir()
    rows = read_csv(folder / "results.csv")
    assert [row["tied_with_best"] for row in rows] == ["best", "n/a"]
    assert rows[1]["p"] == rows[1]["p_raw"] == rows[1]["p_wilcoxon"] == "n/a"
    assert " n/a " in r.stdout.splitlines()[3]


@pytest.mark.parametrize("k", [1, -2])
def test_a_bad_ensemble_size_is_one_line(k, tmp_path):
    r = cli("compare", "--features", tmp_path, "--heads", "logreg", "--ensemble", k)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "--ensemble must be 0 (no ensemble row) or at least 2" in r.output
