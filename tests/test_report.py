"""The stdout table, the plots and `fusebench report` — all from a run folder's results.json
and config.yaml (THE RUN FOLDER CONTRACT), so each test builds such a folder by hand: cells
with known numbers, fits with histories, and hostile strings where a run can carry them."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from fusebench.fuse.metrics import aggregate, mean_std, score
from fusebench.fuse.report import (
    CONFUSION_CAP,
    cells_table,
    heatmap_grid,
    score_range,
    write_plots,
)
from fusebench.fuse.report_html import load_run, write_report
from PIL import Image

from tests.conftest import cli

CLASSES = ["negative", "neutral", "positive"]
TORCH = ("cross_attn", "concat_mlp")
HOSTILE = "<img src=x onerror=alert(1)>"  # a guid or variant that must stay text


def cell_id(text: str | None, image: str | None, head: str, variant: str = "") -> str:
    return f"{text or 'none'}+{image or 'none'}/{head}" + (f"@{variant}" if variant else "")


def make_results(specs, *, folds: int = 2, seeds=(42, 43), n: int = 40, seed: int = 0) -> dict:
    """results.json for cells (text, image, head, variant); each cell's fits score a planted
    skill, torch cells carry per-epoch histories of different lengths (early stopping)."""
    rng = np.random.default_rng(seed)
    cells, runs = {}, []
    for text, image, head, variant in specs:
        cid, skill, fits = cell_id(text, image, head, variant), rng.uniform(0.3, 0.9), []
        for s in seeds:
            for fold in range(folds):
                y = rng.integers(0, len(CLASSES), n)
                proba = rng.dirichlet(np.ones(len(CLASSES)), n)
                hit = rng.random(n) < skill
                proba[hit, y[hit]] += 2
                m = score(y, proba, CLASSES)
                epochs = int(rng.integers(2, 6)) if head in TORCH else 0
                history = [
                    {
                        "epoch": e,
                        "train_loss": 1 / e,
                        "val_loss": 1 / e,
                        "val_macro_f1": skill - 0.1 / e,
                    }
                    for e in range(1, epochs + 1)
                ]
                m.update(
                    cell=cid,
                    seed=s,
                    fold=fold,
                    train_time_s=0.5,
                    best_iteration=epochs or 7,
                    n_params=1000 if head in TORCH else 31,
                    history=history,
                )
                fits.append(m)
        summary = aggregate(fits, CLASSES)
        summary["seed_means"] = {
            k: mean_std([np.mean([f[k] for f in fits if f["seed"] == s]) for s in seeds])
            for k in ("accuracy", "macro_f1", "weighted_f1")
        }
        meaning = "trainable weights" if head in TORCH else "leaves over all trees"
        cells[cid] = {
            "text": text,
            "image": image,
            "head": head,
            "variant": variant,
            "n_params_meaning": meaning,
            "summary": summary,
        }
        runs += fits
    ranking = sorted(cells, key=lambda c: -cells[c]["summary"]["macro_f1"]["mean"])
    protocol = f"stratified {folds}-fold CV, split seed 42; early stopping on an inner 10%"
    return {
        "protocol": protocol,
        "classes": CLASSES,
        "ranking": ranking,
        "cells": cells,
        "runs": runs,
    }


def write_run(folder: Path, results: dict, **config) -> Path:
    """A finished run folder: results.json, config.yaml and the plots."""
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    cfg = {
        "command": "compare", "created": "2025-01-01T00:00:00+00:00", "features": "/f/lab5-dev",
        "caches": {"minilm": {"path": "/f/lab5-dev/minilm.h5", "fingerprint": "fp-minilm-123"}},
        "classes": results["classes"], "seeds": [42, 43], "epochs": 5, "device": "cpu",
        "protocol": {"folds": 2, "split_seed": 42, "description": results["protocol"]},
        "allow_stale": False, "stale_caches": {}, "versions": {"fusebench": "0.1.0"},
        "rows": {"usable": 80, "per_fold": [{"fit": 36, "inner_val": 4, "scored": 40}] * 2,
                 "digest": "sha256-of-the-scored-guids-and-labels",
                 "excluded": [{"guid": HOSTILE, "split": "train", "reason": "failed"}]},
        "best_cell": results["ranking"][0],
    }  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump({**cfg, **config}, sort_keys=False))
    write_plots(folder, results)
    return folder


SMALL = [
    ("minilm", "vit", "cross_attn", ""),
    ("minilm", "vit", "concat_mlp", ""),
    ("minilm", "none", "lightgbm", ""),
    ("minilm", "vit", "concat_mlp", f"dim={HOSTILE}"),
    ("bert$x$", "vit", "lightgbm", ""),  # '$' would start matplotlib mathtext
]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_run(
        tmp_path_factory.mktemp("runs") / "20250101-000000-compare", make_results(SMALL)
    )


def test_cells_table_ranks_cells_and_says_what_the_spread_spans():
    results = make_results(SMALL)
    lines = cells_table(results).splitlines()
    body = lines[2 : 2 + len(SMALL)]
    f1 = [float(re.findall(r"(\d\.\d{3}) ± ", line)[1]) for line in body]  # 2nd ±: macro-F1
    assert f1 == sorted(f1, reverse=True) and len(f1) == len(SMALL)
    best = results["cells"][results["ranking"][0]]
    assert body[0].split()[1:4] == [best["text"], best["image"], best["head"]]
    sd = best["summary"]["seed_means"]["macro_f1"]["std"]
    assert f"{sd:.3f}" in body[0]  # the spread of the per-seed means
    assert any("std over folds x seeds" in line for line in lines[-3:])
    assert any("leaves over all trees" in line for line in lines[-3:])
    one_seed = make_results(SMALL[:1], seeds=(42,))
    assert cells_table(one_seed).splitlines()[2].split()[-3] == "-"  # no seed spread with 1 seed


def test_heatmap_has_heads_by_encoder_pairs_blank_where_not_run():
    results = make_results(SMALL)
    rows, cols, grid = heatmap_grid(results)
    assert cols == ["minilm+vit", "minilm+none", "bert$x$+vit"]
    assert rows == ["cross_attn", "concat_mlp", "lightgbm", f"concat_mlp@dim={HOSTILE}"]
    assert np.isnan(grid[rows.index("cross_attn"), cols.index("minilm+none")])  # not run
    cell = results["cells"]["minilm+none/lightgbm"]["summary"]["macro_f1"]["mean"]
    assert grid[rows.index("lightgbm"), cols.index("minilm+none")] == cell


def test_score_axis_is_zoomed_to_the_data():
    results = make_results(SMALL)
    lo, hi = score_range(results)
    ends = [
        (s[k]["mean"] - s[k]["std"], s[k]["mean"] + s[k]["std"])
        for s in (c["summary"] for c in results["cells"].values())
        for k in ("macro_f1", "accuracy")
    ]
    assert lo <= min(e[0] for e in ends) and hi >= max(e[1] for e in ends)
    assert (lo, hi) != (0.0, 1.0) and hi - lo < 0.9


def test_plots_render_a_54_cell_grid_and_cap_the_confusion_matrices(tmp_path):
    specs = [
        (t, i, h, v)
        for t in ("minilm", "bert")
        for i in ("vit", "clip", "none")
        for h in ("cross_attn", "concat_mlp", "lightgbm")
        for v in ("", "dim=128", "dim=256")
    ]
    results = make_results(specs, folds=2, seeds=(42,), n=20)
    paths = write_plots(tmp_path, results)
    assert [p.name for p in paths] == [
        "heatmap.png",
        "scores.png",
        "learning_curves.png",
        "confusion.png",
    ]
    sizes = {p.name: Image.open(p).size for p in paths}
    rows_of_matrices = -(-CONFUSION_CAP // 3)
    assert sizes["confusion.png"][1] < (rows_of_matrices + 1) * 4.2 * 110  # 12 shown, not 54
    (tmp_path / "trees").mkdir()
    trees_only = make_results([("minilm", "vit", "lightgbm", "")])
    names = [p.name for p in write_plots(tmp_path / "trees", trees_only)]
    assert "learning_curves.png" not in names and "confusion.png" in names


def test_report_is_self_contained_escaped_and_has_every_cell(small, tmp_path):
    out = write_report([small], tmp_path / "r.html")
    page = out.read_text()
    srcs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\' >]+)', page)
    assert srcs and not [s for s in srcs if re.match(r"(https?:)?//", s)]
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 4 and all(i.startswith("data:image/png;base64,") for i in images)
    for uri in images:
        assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in page.lower() and HOSTILE not in page  # never markup
    assert page.count(html.escape(HOSTILE)) >= 3  # as text: excluded guid, variant, cell name
    for cid in make_results(SMALL)["ranking"]:
        assert f"<td>{html.escape(cid)}</td>" in page
    assert "fp-minilm-123" in page and "/f/lab5-dev/minilm.h5" in page  # provenance
    assert "std over folds x seeds" in page and "<table" in page


def test_report_redraws_a_missing_plot_without_touching_the_run(small, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small, run)
    (run / "heatmap.png").unlink()
    (run / "scores.png").write_bytes(b"not a png")
    page = write_report([run], tmp_path / "r.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 4
    assert not (run / "heatmap.png").exists()  # the run folder is read, never written


def test_several_runs_rank_together_only_when_comparable(small, tmp_path):
    other = write_run(tmp_path / "other", make_results(SMALL[:2], seed=1))
    page = write_report([small, other], tmp_path / "r.html").read_text()
    assert "All runs share the protocol" in page and page.count('id="run-') == 2
    third = write_run(tmp_path / "third", make_results(SMALL[:2], folds=3))
    page = write_report([small, third], tmp_path / "r2.html").read_text()
    assert "No combined ranking: protocols differ" in page


def test_report_shows_which_models_predict_used(small, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small, run)
    record = {
        "out": "pred.txt",
        "split": "test",
        "cell": "minilm+vit/cross_attn",
        "mode": "ensemble",
        "model_dirs": ["models/a/seed42-fold0", "models/a/seed42-fold1"],
        "created": "2025-01-02",
    }
    (run / "predictions.json").write_text(json.dumps([record]))
    page = write_report([run], tmp_path / "r.html").read_text()
    assert "<td>ensemble</td>" in page and "<td>pred.txt</td>" in page
    assert load_run(run).predictions == [record]


def _bad_runs(tmp_path: Path, good: Path) -> dict[str, Path]:
    bad = {"missing": tmp_path / "nope", "unfinished": tmp_path / "20250101-compare.tmp"}
    shutil.copytree(good, bad["unfinished"])
    for name, text in (("not-json", "{"), ("no-cells", '{"heads": {}}'), ("truncated-cell", None)):
        bad[name] = tmp_path / name
        shutil.copytree(good, bad[name])
        if text is None:
            results = json.loads((good / "results.json").read_text())
            del results["cells"][results["ranking"][0]]["summary"]["macro_f1"]
            text = json.dumps(results)
        (bad[name] / "results.json").write_text(text)
    bad["no-config"] = tmp_path / "no-config"
    shutil.copytree(good, bad["no-config"])
    (bad["no-config"] / "config.yaml").unlink()
    return bad


def test_a_missing_or_damaged_run_folder_is_one_line(small, tmp_path):
    for name, path in _bad_runs(tmp_path, small).items():
        result = cli("report", path, "--out", tmp_path / "r.html")
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2, (name, result.output)
        assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in result.output, name
        assert not (tmp_path / "r.html").exists(), name  # nothing half-written
    result = cli("report", small, "--out", tmp_path / "ok.html")
    assert result.exit_code == 0 and (tmp_path / "ok.html").is_file()


def _chromium() -> str | None:
    return next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))),
        None,
    )


@pytest.mark.skipif(_chromium() is None, reason="no Chromium binary (apt-get install chromium)")
def test_report_renders_in_headless_chromium(small, tmp_path):
    page = write_report([small], tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1366,900", page.resolve().as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (900, 1366)
    assert pixels.std() > 10 and (pixels < 100).mean() > 0.005  # text and a table, not blank


def test_report_of_a_real_compare_run(tmp_path):
    """The runner's own run folder (not a hand-made one) reports: the contract holds."""
    from tests.test_fuse import synthetic, write

    data = synthetic(n_train=120, n_test=10, seed=3, tokens=False)
    write(tmp_path / "ds" / "txt.h5", data, image=False)
    write(tmp_path / "ds" / "img.h5", data, text=False)
    args = ["compare", "--features", tmp_path / "ds", "--text", "txt", "--image", "img,none",
            "--heads", "logreg,concat_mlp", "--folds", 2, "--seeds", 1, "--epochs", 2,
            "--out", tmp_path / "runs", "--quiet"]  # fmt: skip
    r = cli(*args)
    assert r.exit_code == 0, r.output
    (run,) = (tmp_path / "runs").iterdir()
    r = cli("report", run, "--out", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text()
    results = json.loads((run / "results.json").read_text())
    assert len(results["ranking"]) == 3  # concat_mlp needs an image: no txt+none/concat_mlp
    for cid in results["ranking"]:
        assert f"<td>{html.escape(cid)}</td>" in page
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 4
