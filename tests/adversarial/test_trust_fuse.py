"""Stage two's rough edges (issue 14): a report never ranks runs of other rows together; a
cell's own --set/--sweep value is what trains, checked like the flag; predict's stale-cache
advice works when followed; a full disk, a read-only folder, SIGTERM or a killed process at
any write ends in one line and leaves nothing that looks finished (a rerun removes what a
SIGKILL left); and the smaller refusals and notes (--device, --memory-budget, replayed keys,
in-sample predictions, labelled-row counts)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.adversarial.test_fuse import fuse_cli, make_cache, read_csv, run_dirs
from tests.conftest import cli as invoke
from tests.conftest import one_line_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
ENFORCE_FAIL = (
    "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
    "data/0: file write failed"
)


def compare(feats: Path, out: Path, *extra):
    return invoke("compare", "--features", feats, "--text", "syn", "--image", "syn",
                  "--seeds", 1, "--folds", 2, "--out", out, "--quiet", *extra)  # fmt: skip


def error_line(r, code: int) -> str:
    """The one error line of a failed command (notes may come before it), no traceback."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr
    return errors[0]


def staged(folder: Path) -> list[Path]:
    """Everything under `folder` that a finished write would not leave: *.tmp, *.old."""
    if not folder.exists():
        return []
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]


# ---------------------------------------------------------------- 3. report: same rows only


def test_report_does_not_rank_runs_of_other_rows_together(tmp_path):
    """Two 120-row datasets with the same shape (row counts, fold sizes) but other guids
    are not ranked together; two runs on the same rows are."""
    make_cache(tmp_path / "a" / "syn.h5", n_train=120, guid=[f"a{i}" for i in range(130)])
    make_cache(tmp_path / "b" / "syn.h5", n_train=120, guid=[f"b{i}" for i in range(130)])
    for feats in ("a", "b", "a"):
        assert fuse_cli(tmp_path / feats, tmp_path / feats / "runs", "--folds", 3).exit_code == 0
    (a1, a2), (b1,) = run_dirs(tmp_path / "a" / "runs"), run_dirs(tmp_path / "b" / "runs")
    r = invoke("report", a1, b1, "--out", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text()
    assert "No combined ranking: their rows differ" in page and "All runs share" not in page
    assert invoke("report", a1, a2, "--out", tmp_path / "r2.html").exit_code == 0
    page = (tmp_path / "r2.html").read_text()
    assert "All runs share the protocol" in page and f"<td>2: {a2.name}</td>" in page


def test_report_does_not_rank_an_older_run_that_lacks_the_rows_digest(tmp_path):
    make_cache(tmp_path / "f" / "syn.h5")
    for _ in range(2):
        assert fuse_cli(tmp_path / "f", tmp_path / "runs").exit_code == 0
    old, new = run_dirs(tmp_path / "runs")
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["rows"]["digest"]  # as a run written before the digest was recorded
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    assert invoke("report", old, new, "--out", tmp_path / "r.html").exit_code == 0
    page = (tmp_path / "r.html").read_text()
    assert "No combined ranking" in page and "rows.digest" in page and old.name in page


# ---------------------------------------------------------------- 4. a cell's own settings


def test_a_cells_own_epochs_win_over_the_flag_and_are_recorded(tmp_path):
    make_cache(tmp_path / "f" / "syn.h5")
    r = compare(tmp_path / "f", tmp_path / "runs", "--heads", "concat_mlp", "--epochs", 2,
                "--sweep", "concat_mlp.train.epochs=1,3", "--set", "concat_mlp.train.patience=0")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "wins over the flag" in r.stderr and "not --epochs 2" in r.stderr
    (run,) = run_dirs(tmp_path / "runs")
    config = yaml.safe_load((run / "config.yaml").read_text())
    trained = {c["variant"]: c["params"]["train"]["epochs"] for c in config["cells"].values()}
    assert trained == {"train.epochs=1": 1, "train.epochs=3": 3}
    results = json.loads((run / "results.json").read_text())
    epochs = {r["cell"].split("@")[1]: len(r["history"]) for r in results["runs"]}
    assert epochs == {"train.epochs=1": 1, "train.epochs=3": 3}  # what was trained


@pytest.mark.parametrize(
    "flags",
    [["--set", "concat_mlp.train.epochs=0"], ["--sweep", "concat_mlp.train.epochs=0,3"]],
    ids=["set", "sweep"],
)
def test_a_cells_epochs_are_checked_like_the_flag(flags, tmp_path):
    make_cache(tmp_path / "f" / "syn.h5")
    r = compare(tmp_path / "f", tmp_path / "runs", "--heads", "concat_mlp", "--epochs", 2, *flags)
    line = one_line_error(r, code=2)
    assert "train.epochs=0" in line and ">= 1" in line
    assert run_dirs(tmp_path / "runs") == []


# ---------------------------------------------------------------- flags and replay


def test_an_unknown_device_is_refused_for_every_head_and_by_predict(tmp_path):
    make_cache(tmp_path / "f" / "syn.h5")
    line = one_line_error(fuse_cli(tmp_path / "f", tmp_path / "runs", "--device", "tpu"), code=2)
    assert "tpu" in line and "cpu" in line and "cuda:N" in line
    assert fuse_cli(tmp_path / "f", tmp_path / "runs").exit_code == 0
    (run,) = run_dirs(tmp_path / "runs")
    r = invoke("predict", "--run", run, "--out", tmp_path / "p.csv", "--device", "tpu")
    assert "tpu" in one_line_error(r, code=2) and not (tmp_path / "p.csv").exists()


def test_an_unknown_key_in_a_replayed_config_is_refused(tmp_path):
    make_cache(tmp_path / "f" / "syn.h5")
    assert fuse_cli(tmp_path / "f", tmp_path / "runs").exit_code == 0
    (run,) = run_dirs(tmp_path / "runs")
    config = yaml.safe_load((run / "config.yaml").read_text())
    for key, edit in (("epoch", {"epoch": 3}), ("protocol.fold", {"protocol": {"fold": 3}})):
        changed = tmp_path / f"{key}.yaml"
        merged = {**config, **edit}
        if key.startswith("protocol"):
            merged["protocol"] = {**config["protocol"], **edit["protocol"]}
        changed.write_text(yaml.safe_dump(merged))
        r = invoke("fuse", "--config", changed, "--out", tmp_path / "replay", "--quiet")
        line = one_line_error(r, code=2)
        assert f"unknown key '{key}'" in line and ("epochs" in line or "folds" in line), line
    assert run_dirs(tmp_path / "replay") == []
    r = invoke("fuse", "--config", run, "--out", tmp_path / "replay", "--quiet")  # as written
    assert r.exit_code == 0, r.output


def test_a_memory_budget_over_the_ram_is_clamped_with_a_note(tmp_path):
    make_cache(tmp_path / "f" / "syn.h5")
    r = fuse_cli(tmp_path / "f", tmp_path / "runs", "--memory-budget", "10TB")
    assert r.exit_code == 0, r.output
    assert "--memory-budget 10TB is more than the" in r.stderr and "using" in r.stderr


def test_predict_on_split_train_says_the_rows_are_in_sample(tmp_path):
    make_cache(tmp_path / "f" / "syn.h5")
    assert fuse_cli(tmp_path / "f", tmp_path / "runs").exit_code == 0
    (run,) = run_dirs(tmp_path / "runs")
    r = invoke("predict", "--run", run, "--split", "train", "--out", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    assert "in-sample, not held-out" in r.stderr and "60 of the train rows" in r.stderr
    r = invoke("predict", "--run", run, "--out", tmp_path / "p.csv")  # test rows: no such note
    assert r.exit_code == 0 and "in-sample" not in r.stderr


def test_the_common_rows_note_counts_labelled_rows(tmp_path):
    """60 labelled train rows and 10 unlabelled test rows: the folds hold the 60."""
    make_cache(tmp_path / "f" / "syn.h5")
    make_cache(tmp_path / "f" / "img.h5", text=False)
    r = invoke("compare", "--features", tmp_path / "f", "--text", "syn", "--image", "img",
               "--heads", "text_only,logreg", "--seeds", 1, "--folds", 2, "--epochs", 1,
               "--out", tmp_path / "runs", "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "fitted and scored on the 60 labelled rows usable in all 2 caches" in r.stderr


# ---------------------------------------------------------------- 8. full disk, read-only


@pytest.fixture
def torch_save_fails(monkeypatch):
    """torch.save as it fails on a full disk: a RuntimeError from its zip writer."""
    import torch

    def save(obj, f, *a, **k):
        Path(f).write_bytes(b"PK\x03\x04 half")  # what it leaves behind
        raise RuntimeError(ENFORCE_FAIL)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("command", ["fuse", "compare"])
def test_torch_save_failing_is_one_line_and_keeps_no_run(command, tmp_path, torch_save_fails):
    make_cache(tmp_path / "f" / "syn.h5")
    if command == "fuse":
        r = fuse_cli(tmp_path / "f", tmp_path / "runs", head="concat_mlp")
    else:
        r = compare(tmp_path / "f", tmp_path / "runs", "--heads", "logreg,concat_mlp")
    line = one_line_error(r, code=1)
    assert "state.pt" in line and "nothing was kept" in line
    assert run_dirs(tmp_path / "runs") == []


def test_a_plot_on_a_full_disk_names_the_plot(tmp_path, monkeypatch):
    """PIL's close() raises ENOSPC without a file name: the line still says which file."""
    import matplotlib.figure

    def savefig(self, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    make_cache(tmp_path / "f" / "syn.h5")
    line = one_line_error(fuse_cli(tmp_path / "f", tmp_path / "runs"), code=1)
    assert "No space left on device: " in line and ".png" in line
    assert run_dirs(tmp_path / "runs") == []


@pytest.fixture
def torch_run(tmp_path) -> Path:
    make_cache(tmp_path / "f" / "syn.h5")
    r = fuse_cli(tmp_path / "f", tmp_path / "runs", "--folds", 2, head="concat_mlp")
    assert r.exit_code == 0, r.output
    (run,) = run_dirs(tmp_path / "runs")
    return run


def test_refit_failing_to_save_leaves_no_staging_folder(torch_run, tmp_path, monkeypatch):
    import torch

    real_save = torch.save

    def full(*a, **k):
        raise RuntimeError(ENFORCE_FAIL)

    monkeypatch.setattr(torch, "save", full)
    r = invoke("predict", "--run", torch_run, "--refit", "--out", tmp_path / "p.csv")
    line = error_line(r, 1)
    assert "refit" in line and "state.pt" in line
    assert staged(torch_run / "refit") == [] and not (tmp_path / "p.csv").exists()

    from fusebench.fuse.nets import TorchClassifier

    monkeypatch.setattr(torch, "save", real_save)
    real = TorchClassifier.save

    def interrupted(self, folder):  # Ctrl-C / SIGTERM while the refit models are written
        real(self, folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(TorchClassifier, "save", interrupted)
    r = invoke("predict", "--run", torch_run, "--refit", "--out", tmp_path / "p.csv")
    assert r.exit_code == 130
    assert staged(torch_run / "refit") == [] and not (torch_run / "refit" / "syn_syn_concat_mlp").exists()  # fmt: skip


def test_refit_into_a_read_only_run_fails_before_training(torch_run, tmp_path, monkeypatch):
    from fusebench.fuse import nets as trainer  # TorchClassifier lives in fuse.nets

    real_write = Path.write_bytes

    def read_only(self, data):
        if "refit" in str(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write(self, data)

    def no_fit(*a, **k):
        raise AssertionError("trained before checking that the refit can be saved")

    monkeypatch.setattr(Path, "write_bytes", read_only)
    monkeypatch.setattr(trainer.TorchClassifier, "fit", no_fit)
    r = invoke("predict", "--run", torch_run, "--refit", "--out", tmp_path / "p.csv")
    assert "Read-only file system" in one_line_error(r, code=1)


def test_a_refit_staging_folder_left_by_a_killed_predict_is_removed(torch_run, tmp_path):
    """A refit killed outright (SIGKILL) leaves refit/<cell>.<pid>.tmp/; its owner lock died
    with it, so the next refit removes it."""
    left = torch_run / "refit" / "syn_syn_concat_mlp.999999.tmp"
    (left / "seed42").mkdir(parents=True)
    (left / "seed42" / "state.pt").write_bytes(b"half")
    (left / ".owner.lock").write_bytes(b"")  # unlocked: its process is gone
    r = invoke("predict", "--run", torch_run, "--refit", "--out", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    assert staged(torch_run / "refit") == [] and (torch_run / "refit" / "syn_syn_concat_mlp").is_dir()  # fmt: skip


# ---------------------------------------------------------------- signals and killed processes


def start_compare(feats: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A compare long enough to be stopped midway; returns once its first fit is logged."""
    cmd = [sys.executable, str(REPO / "cli.py"), "compare", "--features", str(feats),
           "--text", "syn", "--image", "syn", "--heads", "concat_mlp,late,gated", "--folds", "5",
           "--seeds", "1,2,3,4,5,6,7,8", "--out", str(out), *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = "", time.monotonic() + 120
    while "fit 1/" not in seen and time.monotonic() < deadline:  # one line per fit (not a tty)
        seen += proc.stdout.readline()
    assert "fit 1/" in seen, seen
    return proc


def test_sigterm_during_compare_is_one_line_exit_130_and_leaves_no_run(tmp_path):
    make_cache(tmp_path / "f" / "syn.h5", n_train=400, n_test=0)
    proc = start_compare(tmp_path / "f", tmp_path / "runs")
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "terminated (SIGTERM)" in errors[0], rest
    assert run_dirs(tmp_path / "runs") == []


def test_a_run_killed_outright_is_removed_by_the_next_run(tmp_path):
    make_cache(tmp_path / "f" / "syn.h5", n_train=400, n_test=0)
    proc = start_compare(tmp_path / "f", tmp_path / "runs")
    proc.kill()
    proc.communicate(timeout=60)
    (left,) = run_dirs(tmp_path / "runs")
    assert left.name.endswith(".tmp")  # SIGKILL: nothing can clean up
    r = compare(tmp_path / "f", tmp_path / "runs", "--heads", "logreg")
    assert r.exit_code == 0, r.output
    assert f"removed {left}" in r.stderr
    (run,) = run_dirs(tmp_path / "runs")
    assert not run.name.endswith(".tmp") and (run / "results.json").is_file()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank by /proc")
def test_a_rank_killed_under_torchrun_leaves_nothing_after_the_rerun(tmp_path):
    """torchrun stops rank 0 with SIGTERM when rank 1 dies: rank 0 removes the staged
    folder (or, killed outright itself, the next run does). One line, no traceback of ours."""
    from tests.test_distributed_compare import free_port

    make_cache(tmp_path / "f" / "syn.h5", n_train=200, n_test=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--tee", "3",
           "--monitor-interval", "0.1", "cli.py", "compare", "--features", str(tmp_path / "f"),
           "--text", "syn", "--image", "syn", "--heads", "concat_mlp,late,gated,clip_match",
           "--folds", "5", "--seeds", "1,2,3,4,5,6", "--out", str(tmp_path / "runs")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    seen, deadline = "", time.monotonic() + 120
    while "[default0]:fit 1/" not in seen and time.monotonic() < deadline:
        seen += proc.stdout.readline()
    assert "[default0]:fit 1/" in seen, seen

    def rank_of(pid: int) -> str | None:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return None
        return next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)

    children = subprocess.run(["pgrep", "-f", f"cli.py compare --features {tmp_path}"],
                              capture_output=True, text=True).stdout.split()  # fmt: skip
    (rank1,) = [int(p) for p in children if rank_of(int(p)) == "1"]
    os.kill(rank1, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=120)
    log = seen + rest
    assert proc.returncode != 0
    ours = [x for x in log.splitlines() if x.startswith("[default0]:")]
    assert not [x for x in ours if "Traceback" in x], log
    r = compare(tmp_path / "f", tmp_path / "runs", "--heads", "logreg")  # the rerun
    assert r.exit_code == 0, r.output
    (run,) = run_dirs(tmp_path / "runs")
    assert not run.name.endswith(".tmp")


# ---------------------------------------------------------------- 6. stale caches and predict


def test_predict_stale_advice_works_when_followed(tmp_path, tiny_models):
    """The data changed after a run: predict's line says what works. Only test samples
    changed: extract again, and predict uses the refreshed cache. A training sample changed:
    predict says to retrain, and the replay it names trains a run predict then uses."""
    from tests.conftest import make_lab5

    data = make_lab5(tmp_path / "lab", n_train=24, n_test=6)
    extract = ["extract", "--encoder", "bert", "--model", tiny_models["bert"], "--data", data,
               "--out", tmp_path / "feats", "--quiet"]  # fmt: skip
    assert invoke(*extract).exit_code == 0
    feats, out = tmp_path / "feats" / "lab", tmp_path / "p.csv"
    assert fuse_cli(feats, tmp_path / "runs", text="bert", image="none").exit_code == 0
    (run,) = run_dirs(tmp_path / "runs")

    (data / "data" / "127.txt").write_text("a test tweet, edited\n")  # a test sample
    line = one_line_error(invoke("predict", "--run", run, "--out", out))
    assert "127" in line and "--allow-stale" in line and "extract" in line and "retrain" in line
    assert invoke(*extract).exit_code == 0  # the advice: extract again ...
    r = invoke("predict", "--run", run, "--out", out)  # ... and predict again
    assert r.exit_code == 0, r.output
    assert "extracted again" in r.stderr and len(read_csv(out)) == 6

    (data / "data" / "105.txt").write_text("a training tweet, edited\n")  # a training sample
    assert invoke(*extract).exit_code == 0
    line = one_line_error(invoke("predict", "--run", run, "--out", out))
    replay = line.split("retrain on it with `")[1].split("`")[0]
    assert replay == f"fusebench fuse --config {run / 'config.yaml'}"
    r = invoke(*replay.split()[1:], "--out", tmp_path / "runs2", "--quiet")  # the advice
    assert r.exit_code == 0, r.output
    (run2,) = run_dirs(tmp_path / "runs2")
    r = invoke("predict", "--run", run2, "--out", out)
    assert r.exit_code == 0 and len(read_csv(out)) == 6


def test_a_replay_on_another_dataset_in_the_same_place_says_so(tmp_path):
    """--config replays the settings, not the data: when the cache at the recorded path is
    no longer the one the run used, the replay says its numbers will differ."""
    make_cache(tmp_path / "f" / "syn.h5")
    assert fuse_cli(tmp_path / "f", tmp_path / "runs").exit_code == 0
    (run,) = run_dirs(tmp_path / "runs")
    r = invoke("fuse", "--config", run, "--out", tmp_path / "same", "--quiet")
    assert r.exit_code == 0 and "replaying" not in r.stderr  # same cache: nothing to say
    (tmp_path / "f" / "syn.h5").unlink()
    make_cache(tmp_path / "f" / "syn.h5", guid=[f"other{i}" for i in range(70)], seed=5)
    r = invoke("fuse", "--config", run, "--out", tmp_path / "replay", "--quiet")
    assert r.exit_code == 0, r.output
    assert f"replaying {run}: syn.h5 is not the cache that run used" in r.stderr
