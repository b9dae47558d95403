"""Logs that read well in a file: `fusebench compare ... > log 2>&1` and `fusebench extract`
run as real subprocesses with stderr in a file. No carriage-return redraws; one plain line
per finished fit (head, seed, fold, macro-F1, seconds) and per extraction stage (samples/s);
--quiet silences them. On a terminal the bar names head, seed and fold instead."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fusebench.cache import TokenFeatures, write_features

from tests.conftest import make_lab5

REPO = Path(__file__).resolve().parents[1]
FIT_LINE = re.compile(
    r"^fit (\d+)/(\d+): (\S+) seed (\d+) (fold \d+/\d+|holdout): macro-F1 [01]\.\d{4}, \d+\.\ds$"
)


def run_logged(args: list[str], cwd: Path) -> tuple[int, str]:
    """`python cli.py ARGS > log 2>&1`: stdout and stderr into one real file, as a batch job
    writes them (not a terminal, not a pipe the test reads)."""
    log = cwd / "log.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    with log.open("wb") as fh:
        proc = subprocess.run(
            [sys.executable, str(REPO / "cli.py"), *args],
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=300,
        )
    return proc.returncode, log.read_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """features/tiny/syn.h5: 60 labelled rows whose pooled text and image carry the class."""
    rng = np.random.default_rng(0)
    n = 60
    y = np.arange(n) % 3
    text = rng.normal(size=(n, 8)) + y[:, None]
    image = rng.normal(size=(n, 6)) - y[:, None]
    folder = tmp_path_factory.mktemp("features") / "tiny"
    write_features(
        folder / "syn.h5",
        guid=[f"g{i}" for i in range(n)],
        split=["train"] * n,
        label=y,
        classes=("negative", "neutral", "positive"),
        text=TokenFeatures(None, None, {"pooled": text.astype(np.float16)}, {"pooled": "mean"}),
        image=TokenFeatures(None, None, {"pooled": image.astype(np.float16)}, {"pooled": "cls"}),
        config={"encoder": "syn"},
        attrs={"encoder": "syn"},
    )
    return folder


def fit_lines(log: str) -> list[re.Match]:
    return [m for line in log.splitlines() if (m := FIT_LINE.match(line))]


def test_compare_to_a_file_writes_one_line_per_fit_and_no_redraws(tiny_cache, tmp_path):
    code, log = run_logged(
        [
            "compare",
            "--features",
            str(tiny_cache),
            "--text",
            "syn",
            "--image",
            "syn",
            "--heads",
            "concat_mlp,logreg",
            "--folds",
            "3",
            "--seeds",
            "1,2",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "runs"),
        ],
        tmp_path,
    )
    assert code == 0, log
    assert "\r" not in log and "\x1b[" not in log  # no bar redraws, no cursor moves
    fits = fit_lines(log)
    assert len(fits) == 2 * 3 * 2  # heads x folds x seeds, each exactly once
    assert {(m[3], m[4], m[5]) for m in fits} == {  # the fit's cell: text+image/head
        (h, s, f"fold {k}/3")
        for h in ("syn+syn/concat_mlp", "syn+syn/logreg")
        for s in ("1", "2")
        for k in (1, 2, 3)
    }
    assert [int(m[1]) for m in fits] == list(range(1, 13)) and {m[2] for m in fits} == {"12"}
    assert "run folder:" in log  # the table and the run folder still follow


def test_fuse_to_a_file_writes_one_line_per_fit_and_quiet_silences_them(tiny_cache, tmp_path):
    args = [
        "fuse",
        "--head",
        "logreg",
        "--features",
        str(tiny_cache),
        "--text",
        "syn",
        "--image",
        "syn",
        "--seeds",
        "7",
        "--out",
        str(tmp_path / "runs"),
    ]
    code, log = run_logged(args, tmp_path)
    assert code == 0, log
    assert "\r" not in log
    assert [(m[3], m[4], m[5]) for m in fit_lines(log)] == [("syn+syn/logreg", "7", "holdout")]
    code, log = run_logged([*args, "--quiet"], tmp_path)
    assert code == 0, log
    assert fit_lines(log) == [] and "run folder:" in log


def test_extract_to_a_file_writes_one_line_per_stage_with_samples_per_second(tiny_models, tmp_path):
    data = make_lab5(tmp_path / "lab5-mini", n_train=12, n_test=4)
    args = [
        "extract",
        "--encoder",
        "clip",
        "--model",
        str(tiny_models["clip"]),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "f"),
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    code, log = run_logged(args, tmp_path)
    assert code == 0, log
    assert "\r" not in log and "\x1b[" not in log
    lines = [line for line in log.splitlines() if line.startswith("extract clip: ")]
    rate = r"(\d+) samples in \d+\.\ds \(\d+(\.\d)? samples/s\)$"
    for stage in ("read dataset lab5-mini", "text features", "image features"):
        hits = [re.search(rf": {stage}: {rate}", line) for line in lines]
        hits = [h for h in hits if h]
        assert len(hits) == 1, (stage, log)  # exactly one line per stage
        assert int(hits[0][1]) == 16
    assert sum("load model" in line for line in lines) == 1
    assert (
        sum(re.search(r": write .*clip\.h5: 16 rows in", line) is not None for line in lines) == 1
    )
    assert log.rstrip().splitlines()[-1].startswith("wrote ")
    code, log = run_logged([*args, "--overwrite", "--quiet"], tmp_path)
    assert code == 0 and not [line for line in log.splitlines() if line.startswith("extract ")]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_names_head_seed_and_fold_and_no_lines_are_printed(monkeypatch):
    from fusebench.fuse.experiment import FitProgress

    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    with FitProgress(6, 3, quiet=False, desc="compare") as progress:
        assert progress.live and not progress.inner_quiet  # epoch bars show too
        for fold in range(3):
            progress.start("cross_attn", 43, fold)
            if fold == 1:
                assert "cross_attn seed 43 fold 2/3" in screen.getvalue()
            progress.finish(0.5, 1.0)
    assert "\r" in screen.getvalue()  # a redrawn bar...
    assert not fit_lines(screen.getvalue().replace("\r", "\n"))  # ...instead of log lines
