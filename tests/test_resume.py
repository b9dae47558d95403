"""SIGKILL part-way through `extract`, rerun: nothing finished is redone or lost, and the
result is byte-identical to an uninterrupted run (docs/architecture.md §10)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from fusebench.cache import parts_dir, temp_path

from tests.conftest import REPO, make_lab5

# The child runs the real CLI; only the encoder's batch call is slowed, so the test can
# reliably kill it in the middle.
SLOW_CLI = """
import sys, time
import fusebench.extract.encoders as e
for cls in (e.TextEncoder, e.ImageEncoder, e.ClipEncoder):
    for name in ("encode_text", "encode_image"):
        orig = getattr(cls, name)
        def slow(self, *a, _orig=orig, **k):
            time.sleep({delay})
            return _orig(self, *a, **k)
        setattr(cls, name, slow)
import fusebench.cli as cli
sys.argv = ["cli.py", *sys.argv[1:]]
cli.main()
"""


def _run(args: list[str], delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI.format(delay=delay), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _journalled_rows(folder: Path) -> int:
    rows = 0
    for part in folder.glob("*.npz"):
        with np.load(part) as z:
            rows += len(z["rows"]) + len(re.findall(r"\[", str(z["failures"]))[1:])
    return rows


def _features(path: Path) -> dict[str, bytes]:
    out = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name.split("/")[0] in (
                "text",
                "image",
                "status",
                "guid",
                "label",
                "split",
            ):
                out[name] = obj[()].tobytes() if obj.dtype.kind != "O" else repr(obj[()]).encode()

        f.visititems(visit)
    return out


@pytest.mark.parametrize("encoder", ["clip"])
def test_sigkill_then_rerun_resumes_without_redoing_and_matches(tmp_path, tiny_models, encoder):
    data = make_lab5(tmp_path / "lab5-kill", n_train=40, n_test=8)
    common = [
        "extract",
        "--encoder",
        encoder,
        "--model",
        str(tiny_models[encoder]),
        "--data",
        str(data),
        "--batch-size",
        "3",
        "--workers",
        "0",
        "--quiet",
    ]
    final = tmp_path / "killed" / "lab5-kill" / f"{encoder}.h5"
    parts = parts_dir(final)

    # Uninterrupted reference run.
    ref = _run([*common, "--out", str(tmp_path / "reference")])
    assert ref.wait(timeout=120) == 0, ref.stderr.read()

    # Run, and SIGKILL once a few batches are journalled.
    victim = _run([*common, "--out", str(tmp_path / "killed")], delay=0.2)
    deadline = time.monotonic() + 60
    while (
        len(list(parts.glob("*.npz"))) < 6 and victim.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    # A second writer meanwhile is refused while the first runs.
    second = _run([*common, "--out", str(tmp_path / "killed")])
    assert second.wait(timeout=60) != 0
    assert "being written by another fusebench process" in second.stderr.read()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not final.exists(), "a cache appeared under its final name before completion"
    done_before = _journalled_rows(parts)
    total = 48 * 2  # clip: every sample once per tower
    assert 0 < done_before < total, f"kill landed outside the run ({done_before} rows journalled)"

    resumed = _run([*common, "--out", str(tmp_path / "killed")])
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    m = re.search(r"computed (\d+) rows, reused (\d+)", out)
    assert m, out
    computed, reused = int(m[1]), int(m[2])
    assert reused == done_before
    assert computed == total - done_before
    assert final.exists() and not parts.exists() and not temp_path(final).exists()

    a, b = _features(final), _features(tmp_path / "reference" / "lab5-kill" / f"{encoder}.h5")
    assert a.keys() == b.keys() and "text/tokens" in a and "image/tokens" in a
    for name in a:
        assert a[name] == b[name], f"{name} differs after resume"


def test_kill_during_assembly_leaves_no_final_file(tmp_path, tiny_models):
    """The cache is assembled under <name>.tmp; killing the writer there leaves nothing final,
    and the rerun rebuilds it from the journal."""
    data = make_lab5(tmp_path / "lab5-asm", n_train=9, n_test=3)
    out = tmp_path / "f"
    final = out / "lab5-asm" / "bert.h5"
    code = f"""
import sys, os, signal
import fusebench.cache.writer as w
orig = w.CacheWriter.finish
def die(self):
    os.kill(os.getpid(), signal.SIGKILL)
w.CacheWriter.finish = die
import fusebench.cli as cli
sys.argv = ["cli.py", "extract", "--encoder", "bert", "--model", {str(tiny_models["bert"])!r},
            "--data", {str(data)!r}, "--out", {str(out)!r}, "--quiet"]
cli.main()
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert not final.exists() and temp_path(final).exists() and parts_dir(final).exists()
    rerun = _run(
        [
            "extract",
            "--encoder",
            "bert",
            "--model",
            str(tiny_models["bert"]),
            "--data",
            str(data),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert "computed 0 rows, reused 12" in stdout
    with h5py.File(final, "r") as f:
        assert bool(f.attrs["complete"]) and (f["status"][:] == 1).all()


def test_background_journal_saves_keep_finished_parts_and_raise_a_failed_save(
    tmp_path, monkeypatch
):
    """Parts are written on a thread while the next batch runs: leaving on Ctrl-C still
    keeps every batch handed over, and a save that fails (disk full) is raised in the loop."""
    from fusebench.cache import TokenFeatures
    from fusebench.cache.journal import Journal

    journal = Journal(tmp_path / "c.h5.parts", "fp")
    feats = TokenFeatures(
        np.ones((1, 3, 4), np.float16), None, {"pooled": np.ones((1, 4), np.float16)}, {}
    )
    with pytest.raises(KeyboardInterrupt), journal.background() as save:
        for b in range(3):
            save("image", b, np.array([b]), feats, [])
        raise KeyboardInterrupt
    assert sorted(p.name for p in journal.folder.glob("*.npz")) == [
        f"image-{b:06d}.npz" for b in range(3)
    ]

    real = Journal.save

    def disk_full(self, modality, batch, *rest):
        if batch == 4:
            raise OSError(28, "No space left on device")
        return real(self, modality, batch, *rest)

    monkeypatch.setattr(Journal, "save", disk_full)
    with pytest.raises(OSError, match="No space left"), journal.background() as save:
        for b in range(3, 6):
            save("image", b, np.array([b]), feats, [])
    assert not (journal.folder / "image-000004.npz").exists()
    assert (journal.folder / "image-000003.npz").exists()
