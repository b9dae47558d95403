"""Ctrl-C in the middle of stage two (issue 6): one line and exit 130, no traceback, and no
run folder left behind that could pass for a finished one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_fuse import synthetic, write

REPO = Path(__file__).resolve().parents[2]


def test_ctrl_c_during_compare_is_one_line_and_leaves_no_run(tmp_path):
    write(tmp_path / "feats" / "syn.h5", synthetic(n_train=400, n_test=0, tokens=False))
    cmd = [sys.executable, str(REPO / "cli.py"), "compare", "--features", str(tmp_path / "feats"),
           "--text", "syn", "--image", "syn", "--heads", "concat_mlp,late,gated",
           "--folds", "5", "--seeds", "1,2,3,4,5,6,7,8",
           "--out", str(tmp_path / "runs")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = "", time.monotonic() + 120
    while "fit 1/" not in seen and time.monotonic() < deadline:  # one line per fit (not a tty)
        seen += proc.stdout.readline()
    assert "fit 1/" in seen, seen
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + rest
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted" in errors[0], rest
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
