"""One grid on two ranks (issue 10 item 7): `torchrun --nproc-per-node 2 cli.py compare ...`
splits the cells across ranks (gloo on CPU here) and rank 0 writes ONE run folder whose numbers
are a single process's: results.csv, runs.csv, val_predictions.csv and config.yaml equal but
for the timing columns and the creation time; every fit's model is in place and predict works
from the run. A missing cache fails on both ranks with the one line, without a hang.

Both sides use one thread per process (torchrun's default OMP_NUM_THREADS=1; the single
process, run in this process, gets one torch thread), so their float sums add up in the
same order."""

from __future__ import annotations

import csv
import os
import pickle
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from fusebench.fuse import distributed
from fusebench.fuse._util import OutputError
from fusebench.fuse.distributed import assign

from tests.conftest import cli as invoke
from tests.test_fuse import synthetic, write

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TIMING = {"train_time_s", "train_time_s_mean"}  # wall time: the one thing allowed to differ
# 4 cells: a token head, two pooled torch heads (one reads text only), a classical head
GRID = ["--heads", "cross_attn,concat_mlp,text_only,logreg", "--text", "syn", "--image", "syn"]
GRID += ["--folds", "2", "--seeds", "42,43", "--epochs", "3", "--device", "auto"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, ranks: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node RANKS cli.py ARGS`, gloo on CPU; --tee prefixes each rank's
    lines with [default<rank>]:."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    run += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--tee", "3"]
    run += ["--monitor-interval", "0.1", "cli.py"]
    return subprocess.run(
        run + [str(a) for a in args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_torch_thread) -> dict:
    """The same compare in one process (this one) and on two ranks."""
    root = tmp_path_factory.mktemp("dist")
    data = synthetic(n_train=60, n_test=8, seed=3, dt=8, di=8, lt=6, li=5)
    write(root / "feats" / "syn.h5", data)
    feats = ["--features", root / "feats"]
    one = invoke("compare", *feats, *GRID, "--quiet", "--out", root / "one")
    assert one.exit_code == 0, one.output
    two = torchrun("compare", *feats, *GRID, "--out", root / "two")
    assert two.returncode == 0, two.stdout + two.stderr
    return {
        "root": root,
        "one": only_run(root / "one"),
        "two": only_run(root / "two"),
        "log": two.stdout + two.stderr,
    }


def test_two_ranks_give_the_single_process_numbers(runs):
    one, two = runs["one"], runs["two"]
    assert not two.name.endswith(".tmp")  # finished and renamed into place
    assert len(rows(one / "results.csv")) == 4
    for name in ("results.csv", "runs.csv", "val_predictions.csv"):
        assert rows(two / name) == rows(one / name), name
    a, b = (yaml.safe_load((r / "config.yaml").read_text()) for r in (one, two))
    a.pop("created"), b.pop("created")
    assert {k: v for k, v in a.items() if b.get(k) != v} == {}
    assert a == b  # same settings (device: the flag, not a rank's GPU), fits and model folders


def test_the_cells_were_split_and_only_rank_0_wrote(runs):
    log = runs["log"]
    assert "[default0]:note: rank 0 of 2: 1 of 4 cells (the bar shows these); rank 1: 3" in log
    assert "[default1]:rank 1 of 2: fitted 3 cell(s)" in log  # its one line, not the table
    assert "[default1]:note:" not in log  # the notes are rank 0's alone
    # the token head (estimated 8x a pooled fit) alone on rank 0, whose bar shows its fits
    assert "[default0]:fit 4/4: syn+syn/cross_attn" in log
    assert "[default1]:fit" not in log
    assert log.count(f"run folder: {runs['two']}") == 2  # the same folder on both ranks


def test_every_model_is_in_place_and_predict_runs_from_it(runs, tmp_path):
    config = yaml.safe_load((runs["two"] / "config.yaml").read_text())
    dirs = [f["model_dir"] for c in config["cells"].values() for f in c["fits"]]
    assert len(dirs) == 4 * 2 * 2
    assert all((runs["two"] / d).is_dir() and any((runs["two"] / d).iterdir()) for d in dirs)
    for run in ("one", "two"):
        p = invoke("predict", "--run", runs[run], "--out", tmp_path / f"{run}.txt", "--quiet")
        assert p.exit_code == 0, p.output
    lines = (tmp_path / "two.txt").read_text().splitlines()
    assert len(lines) == 1 + 8  # guid,tag header + the test rows
    assert lines == (tmp_path / "one.txt").read_text().splitlines()


def test_a_missing_cache_is_one_line_once_without_a_hang(tmp_path):
    """Every rank stops (exit 2), and the line is printed once, by rank 0: the terminal that
    torchrun shares between its ranks shows it once, not once per rank (issue 14)."""
    for args in (["--features", tmp_path / "nowhere", *GRID],  # a check in run_grid
                 ["--features", tmp_path, *GRID, "--device", "tpu"]):  # a flag  # fmt: skip
        r = torchrun("compare", *args, "--out", tmp_path)
        assert r.returncode != 0
        log = r.stdout + r.stderr
        zero = [x for x in log.splitlines() if x.startswith("[default0]:")]
        assert len(zero) == 1 and zero[0].startswith("[default0]:error: "), zero
        assert "nowhere" in zero[0] or "tpu" in zero[0]
        assert not [x for x in log.splitlines() if x.startswith("[default1]:")]
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # no run folder was started


def test_the_split_keeps_cells_whole_and_balances_cost():
    # a token head (8) and five pooled (1): the token head alone on one rank
    assert assign([1, 8, 1, 1, 1, 1], 2) == [[1], [0, 2, 3, 4, 5]]
    assert assign([1, 1, 1], 2) == [[0, 2], [1]]
    assert assign([1], 3) == [[0], [], []]  # fuse on 3 ranks: two ranks idle
    split = assign([3, 1, 8, 2, 2, 5], 3)
    assert sorted(i for s in split for i in s) == list(range(6))


# ---------------------------------------------------------------- failures, ranks as threads


class ThreadRanks:
    """cache.ranks for `size` threads of this process, each thread one rank: the collectives
    fuse.distributed uses, over a barrier that breaks (instead of hanging) after 20 s; objects
    travel pickled, as through gloo."""

    def __init__(self, size: int) -> None:
        self.size, self.local = size, threading.local()
        self.barrier = threading.Barrier(size, timeout=20)
        self.slots: list = [None] * size

    def world(self) -> tuple[int, int]:
        return self.local.rank, self.size

    def is_distributed(self) -> bool:
        return True

    def all_gather(self, obj):
        self.barrier.wait()  # everyone has read the last round
        self.slots[self.local.rank] = pickle.dumps(obj)
        self.barrier.wait()
        return [pickle.loads(b) for b in self.slots]

    def broadcast(self, obj, src: int = 0):
        return self.all_gather(obj)[src]

    def gather(self, obj):
        out = self.all_gather(obj)
        return out if self.local.rank == 0 else None

    def run(self, body) -> list:
        """body(rank) on every rank; what each returned or raised, in rank order."""
        got: list = [None] * self.size

        def one(rank: int) -> None:
            self.local.rank = rank
            try:
                got[rank] = body(rank)
            except Exception as e:
                got[rank] = e

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return got


@pytest.fixture
def two_ranks(monkeypatch) -> ThreadRanks:
    fake = ThreadRanks(2)
    monkeypatch.setattr(distributed, "ranks", fake)
    return fake


def grid_runs(rank: int, out: Path, fail_on: int | None = None):
    """A grid of cells a, b, c split over the ranks (rank 0: a, c; rank 1: b), each rank
    saving a model file into the shared staged folder, as run_grid does."""
    cells = [SimpleNamespace(id=c) for c in "abc"]
    mine = {0: "ac", 1: "b"}[rank]
    with distributed.SharedRunDir(out, "compare") as run:

        def fit() -> list:
            if rank == fail_on:
                raise ValueError(f"cell {mine[0]}: no usable row on rank {rank}")
            for c in mine:
                (run.path / c).write_text(c)
            return [SimpleNamespace(cell=c, seed=s) for c in mine for s in (1, 2)]

        runs = distributed.collect(fit, cells)
    return run.final, runs


def test_ranks_fill_one_folder_and_rank_0_gets_every_fit_in_grid_order(two_ranks, tmp_path):
    (final0, runs), (final1, none) = two_ranks.run(lambda r: grid_runs(r, tmp_path))
    assert final0 == final1 and final0.is_dir() and not final0.name.endswith(".tmp")
    assert sorted(p.name for p in final0.iterdir()) == ["a", "b", "c"]
    assert [(r.cell, r.seed) for r in runs] == [(c, s) for c in "abc" for s in (1, 2)]
    assert none is None


def test_a_rank_failing_in_its_fits_stops_every_rank_and_keeps_nothing(two_ranks, tmp_path):
    got = two_ranks.run(lambda r: grid_runs(r, tmp_path, fail_on=1))
    assert [type(e) for e in got] == [ValueError, ValueError]  # no BrokenBarrierError: no hang
    assert str(got[0]) == "rank 1: cell b: no usable row on rank 1"  # rank 0 names rank 1
    assert str(got[1]) == "cell b: no usable row on rank 1"
    assert list(tmp_path.iterdir()) == []  # the staged folder is gone


def test_rank_0_unable_to_make_the_run_folder_stops_every_rank(two_ranks, tmp_path):
    (tmp_path / "runs").write_text("a file where --out should be a folder")
    got = two_ranks.run(lambda r: grid_runs(r, tmp_path / "runs"))
    assert [type(e) for e in got] == [OutputError, OutputError]
    assert all("is a file, not a folder" in str(e) for e in got)


def test_a_check_failing_on_one_rank_fails_every_rank_with_its_line(two_ranks):
    def check(rank: int) -> int:
        if rank == 1:
            raise FileNotFoundError("no cache gone.h5; run extract first")
        return rank

    got = two_ranks.run(lambda r: distributed.agree(lambda: check(r)))
    assert [type(e) for e in got] == [FileNotFoundError, FileNotFoundError]
    assert str(got[0]) == "rank 1: no cache gone.h5; run extract first"
    assert str(got[1]) == "no cache gone.h5; run extract first"


def test_each_rank_fits_on_its_own_gpu_and_config_keeps_the_flag(monkeypatch):
    import torch
    from fusebench.fuse.grid import GridSpec
    from fusebench.fuse.protocol import StratifiedProtocol

    spec = GridSpec("compare", Path("f"), ("t",), ("i",), ("logreg",), StratifiedProtocol(), (1,))
    assert distributed.rank_spec(spec) is spec  # one process: as given
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.rank_spec(spec).device == "cuda:1"  # 4 ranks on 2 GPUs: round robin
    assert spec.device == "auto"  # what config.yaml records
    for given in ("cpu", "cuda:0"):  # a device the user named is kept
        assert distributed.rank_spec(replace(spec, device=given)).device == given
