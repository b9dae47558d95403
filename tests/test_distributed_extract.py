"""Sharded extraction under torchrun (docs/architecture.md §8, extract/distributed.py): 2 ranks with the gloo
backend on CPU write ONE cache equal to a single-process run's, also after a rank is killed
midway and the same command is rerun; a failure on any rank stops every rank with one line.

"Equal" here: every dataset (dtype, shape, chunks, bytes) and every attribute, except the
`created` time stamp and the `@attrs` entry of `digests` (a hash over all attributes, `created`
included). The files' bytes differ only by those.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from fusebench.cache import exclusive_lock, parts_dir
from fusebench.cache.integrity import ATTRS
from fusebench.extract.distributed import Failure, Shard
from fusebench.extract.loop import ExtractError, extract, extract_many

from tests.conftest import REPO, make_lab5

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH = 4  # 18 samples: 5 text and 5 image batches, so each rank gets several of each


def _cli(tiny_models: dict[str, Path], data: Path, out: Path) -> list[str]:
    return [
        "extract",
        "--encoder",
        "clip",
        "--model",
        str(tiny_models["clip"]),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        str(BATCH),
        "--workers",
        "0",
        "--quiet",
    ]


def _torchrun(script: str | Path, args: list[str], ranks: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free port on localhost) of `script` with `args`; the
    timeout turns a hang into a failure."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*cmd, "--nproc-per-node", str(ranks), str(script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _contents(path: Path) -> dict:
    """Every dataset and attribute of a cache but the two that hold its creation time."""
    out = {}
    with h5py.File(path, "r") as f:
        root = {k: repr(v) for k, v in f.attrs.items() if k not in ("created", "digests")}
        digests = json.loads(f.attrs["digests"])
        digests.pop(ATTRS)
        out["/"] = (root, digests)

        def visit(name: str, obj) -> None:
            attrs = {k: repr(v) for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                data = np.asarray(obj[()])  # scalar datasets (the manifest's bytes) too
                raw = data.tobytes() if data.dtype.kind != "O" else repr(data.tolist()).encode()
                out[name] = (attrs, obj.dtype.str, obj.shape, obj.chunks, raw)
            else:
                out[name] = attrs

        f.visititems(visit)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_models, one_torch_thread) -> tuple[Path, dict]:
    """(the dataset, the contents of its single-process clip cache)."""
    root = tmp_path_factory.mktemp("dist")
    data = make_lab5(root / "lab5-dist", n_train=14, n_test=4)
    rep = extract(
        data,
        "clip",
        model=str(tiny_models["clip"]),
        out=root / "single",
        batch_size=BATCH,
        num_workers=0,
        quiet=True,
    )
    assert rep.ok == 18
    return data, _contents(rep.path)


def _same_as_single(
    path: Path, single: dict, arrays: tuple[str, ...] = ("text/tokens", "image/tokens")
) -> None:
    got = _contents(path)
    assert got.keys() == single.keys() and all(name in got for name in arrays)
    for name in got:
        assert got[name] == single[name], f"{name} differs from the single-process cache"


def test_two_ranks_write_one_cache_equal_to_a_single_process_run(tmp_path, tiny_models, corpus):
    data, single = corpus
    out = tmp_path / "features"
    run = _torchrun("cli.py", _cli(tiny_models, data, out))
    assert run.returncode == 0, run.stderr[-3000:]
    final = out / "lab5-dist" / "clip.h5"
    _same_as_single(final, single)
    assert not parts_dir(final).exists()  # the journal is gone once the cache is assembled
    # rank 1: 2 text + 2 image batches of the 5 + 5 (batch b is rank b % 2's); rank 0 reports
    assert "rank 1: computed 4 batches" in run.stdout, run.stdout
    assert "18 ok, 0 failed; computed 36 rows, reused 0" in run.stdout, run.stdout


DIE_AFTER_FIRST_BATCH = """
import os, sys
sys.path.insert(0, {repo!r})
if os.environ["RANK"] == "1":  # rank 1 dies (exit 9) right after journalling its first batch
    import fusebench.cache.journal as journal
    save = journal.Journal.save
    def save_then_die(self, *a, **k):
        save(self, *a, **k)
        os._exit(9)
    journal.Journal.save = save_then_die
import fusebench.cli as cli
sys.argv = ["cli.py", *sys.argv[1:]]
cli.main()
"""


def test_killed_rank_then_the_same_command_resumes_and_matches(tmp_path, tiny_models, corpus):
    data, single = corpus
    out = tmp_path / "features"
    final = out / "lab5-dist" / "clip.h5"
    script = tmp_path / "die.py"
    script.write_text(DIE_AFTER_FIRST_BATCH.format(repo=str(REPO)))
    killed = _torchrun(script, _cli(tiny_models, data, out))
    assert killed.returncode != 0
    parts = sorted(parts_dir(final).glob("*.npz"))
    kept = 0
    for p in parts:
        with np.load(p) as z:
            kept += len(z["rows"])
    assert 0 < kept < 36 and not final.exists(), (kept, killed.stderr[-2000:])

    rerun = _torchrun("cli.py", _cli(tiny_models, data, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reports = re.findall(r"18 ok, 0 failed; computed (\d+) rows, reused (\d+)", rerun.stdout)
    assert reports == [(str(36 - kept), str(kept))], rerun.stdout  # nothing redone, nothing lost
    _same_as_single(final, single)


def test_bad_data_fails_on_every_rank_with_one_line(tmp_path, tiny_models):
    run = _torchrun("cli.py", _cli(tiny_models, tmp_path / "missing", tmp_path / "out"))
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and lines[0] == lines[1], run.stderr[-3000:]  # one per rank
    assert "does not exist" in lines[0] and str(tmp_path / "missing") in lines[0]
    ours = [f'File "{REPO / d}' for d in ("cli.py", "extract", "cache")]
    assert not any(frame in run.stderr for frame in ours)  # torchrun's own summary aside


def test_rank_0_failing_alone_stops_the_other_rank_with_its_line(tmp_path, tiny_models, corpus):
    """Rank 0 cannot take the cache lock (another writer holds it): rank 1, which passed every
    check and loaded its model, hears rank 0's line instead of waiting for a plan."""
    data, _ = corpus
    out = tmp_path / "features"
    final = out / "lab5-dist" / "clip.h5"
    with exclusive_lock(final):
        run = _torchrun("cli.py", _cli(tiny_models, data, out))
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode != 0
    assert len(lines) == 2 and lines[0] == lines[1], run.stderr[-3000:]
    assert "being written by another fusebench" in lines[0]


def test_batches_split_over_ranks_once_each_whatever_the_rank_count():
    """b % N: every batch has exactly one owner for any N, so a rerun with another N after a
    kill still computes each missing batch once."""
    for size in (1, 2, 3, 5):
        owners = [[r for r in range(size) if Shard(r, size).mine(b)] for b in range(17)]
        assert all(len(o) == 1 for o in owners)


def test_another_ranks_failure_keeps_its_kind_and_names_the_rank():
    usage = Failure.of(1, ValueError("--batch-size must be at least 1")).error(0)
    assert type(usage) is ValueError and str(usage) == "rank 1: --batch-size must be at least 1"
    lost = Failure.of(0, FileNotFoundError("no such data")).error(1)
    assert type(lost) is FileNotFoundError and str(lost) == "no such data"  # rank 0's as is
    run = Failure.of(2, RuntimeError("disk\nfull")).error(0)
    assert isinstance(run, ExtractError) and str(run) == "rank 2: disk full"


def test_two_ranks_extract_two_encoders_in_one_pass_as_one_process(tmp_path, tiny_models, corpus):
    """`--encoder bert,vit` under torchrun: each rank computes its share (b % 2) of BOTH plans
    in one pass over the data; rank 0 assembles both caches, equal to a single process's."""
    data, _ = corpus
    names = ("bert", "vit")
    single = extract_many(
        data,
        ",".join(names),
        model=",".join(str(tiny_models[n]) for n in names),
        out=tmp_path / "single",
        batch_size=BATCH,
        num_workers=0,
        quiet=True,
    )
    assert [rep.ok for rep in single] == [18, 18]
    out = tmp_path / "features"
    args = _cli(tiny_models, data, out)
    args[args.index("clip")] = ",".join(names)
    args[args.index(str(tiny_models["clip"]))] = ",".join(str(tiny_models[n]) for n in names)
    run = _torchrun("cli.py", args)
    assert run.returncode == 0, run.stderr[-3000:]
    for rep in single:
        final = out / "lab5-dist" / rep.path.name
        _same_as_single(
            final,
            _contents(rep.path),
            ("text/tokens",) if "bert" in rep.path.name else ("image/tokens",),
        )
        assert not parts_dir(final).exists()
    # rank 1: bert's text batches 1, 3 and vit's image batches 1, 3 of the 5 + 5
    assert "rank 1: computed 4 batches" in run.stdout, run.stdout
    assert run.stdout.count("18 ok, 0 failed; computed 18 rows, reused 0") == 2, run.stdout
