"""Trust in what lands on disk and in what the data says (issue 14).

A full disk, a file-size limit or a read-only folder at any write of `extract` (journal parts,
plan, the `.tmp` cache, the final rename) or `cache merge`: one line, exit 1, never a
traceback or a signal exit (HDF5 used to crash on its half-closed file: 34 tracebacks, exit
139), nothing under a final name, and a rerun with space resumes. SIGTERM acts as Ctrl-C.
A label outside `--labels` makes a bad sample of split train, never a test row; a URL as a
path is named as a URL; `data check` exits 1 when a sample is fatal."""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fusebench.cache import OK, CacheWriteError, FeatureStore, TokenFeatures, parts_dir, temp_path
from fusebench.cache import writer as cache_writer
from fusebench.cache.sources import rewrite_sources
from fusebench.cache.writer import write_features
from fusebench.extract.datasets import load_dataset

from tests.conftest import REPO, cli, make_lab5, write_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(args: list[object], *, fsize: int | None = None, prelude: str = "", **kw):
    """The real `fusebench` in a child process; `fsize` caps the size of every file it writes
    (RLIMIT_FSIZE: a write past it fails with EFBIG, as on a full disk, without root)."""

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    code = f"import sys\n{prelude}\nimport fusebench.cli as cli\nsys.argv = ['fusebench', *sys.argv[1:]]\ncli.main()\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
        **kw,
    )


def finished(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def one_error_line(err: str) -> str:
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    return errors[0]


def extract_args(data: Path, out: Path, encoders: str, models: str) -> list[object]:
    return ["extract", "--encoder", encoders, "--model", models, "--data", data, "--out", out,
            "--batch-size", 4, "--workers", 0, "--quiet"]  # fmt: skip


def tokens_cache(path: Path, n: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    tok = rng.standard_normal((n, 24, 32)).astype(np.float16)
    feats = TokenFeatures(tok, np.ones((n, 24), bool), {"pooled": tok.mean(1)}, {"pooled": "mean"})
    return write_features(
        path, guid=[f"g{i}" for i in range(n)], split=["train"] * n,
        label=rng.integers(0, 3, n), text=feats,
    )  # fmt: skip


# --------------------------------------------------------------- full disk: the cache writer


@pytest.mark.parametrize("fail_at", [0, 1, 3, 10, 40])  # the file's creation ... finish
def test_a_failed_write_anywhere_in_a_cache_is_one_error_and_leaves_nothing(
    tmp_path, monkeypatch, fail_at
):
    """Every write HDF5 makes goes through the writer's Sink; the first that fails (ENOSPC)
    ends in one CacheWriteError naming the .tmp file, no file under either name, and HDF5
    left able to write the next cache in this same process."""
    calls = {"n": 0}
    real = os.pwrite

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(cache_writer.os, "pwrite", pwrite)
    final = tmp_path / "c.h5"
    with pytest.raises(
        CacheWriteError, match=r"cannot write .*c\.h5\.tmp \(No space left on device\); free space"
    ):
        tokens_cache(final)
    assert not final.exists() and not temp_path(final).exists()
    monkeypatch.setattr(cache_writer.os, "pwrite", real)
    tokens_cache(final)  # the library is not left broken
    assert len(FeatureStore.open(final)) == 64


def test_ctrl_c_during_an_hdf5_write_waits_until_hdf5_returns(tmp_path, monkeypatch):
    """HDF5 writes through Python code (the writer's Sink), where a signal handler would run:
    a KeyboardInterrupt there made HDF5 drop that write unnoticed (a cache that looked
    complete) or crash at exit. Ctrl-C is held while h5py runs and raised once it returns:
    nothing is kept, the handler is restored, and the next cache writes fine."""
    calls = {"n": 0}
    real = os.pwrite

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next Python call: in the Sink
        return real(fd, data, offset)

    monkeypatch.setattr(cache_writer.os, "pwrite", pwrite)
    final = tmp_path / "c.h5"
    with pytest.raises(KeyboardInterrupt):
        tokens_cache(final)
    assert calls["n"] >= 5
    assert not final.exists() and not temp_path(final).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    tokens_cache(final)
    assert len(FeatureStore.open(final)) == 64


def test_rewriting_the_sources_on_a_full_disk_keeps_the_cache(tmp_path, monkeypatch):
    final = tokens_cache(tmp_path / "c.h5")
    before = final.read_bytes()

    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_writer.os, "pwrite", pwrite)
    with pytest.raises(CacheWriteError, match="No space left on device"):
        rewrite_sources(final, {"root": "/elsewhere", "files": {}})
    monkeypatch.undo()
    assert final.read_bytes() == before and not temp_path(final).exists()


# ------------------------------------------- full disk: the real commands, in a child process


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_lab5(tmp_path_factory.mktemp("trust") / "lab5-fs", n_train=40, n_test=8)


@pytest.mark.parametrize("encoders", ["bert", "bert,vit"])
def test_extract_past_a_file_size_limit_is_one_line_exit_1_and_a_rerun_resumes(
    tmp_path, corpus, tiny_models, encoders
):
    """The journal parts fit under the limit, the assembled cache does not: it used to be
    ~23 h5py tracebacks and a segfault (exit 139 / -11)."""
    models = ",".join(str(tiny_models[e]) for e in encoders.split(","))
    args = extract_args(corpus, tmp_path / "f", encoders, models)
    code, _, err = finished(run_cli(args, fsize=64 << 10))
    line = one_error_line(err)
    assert code == 1, err
    assert re.search(r"cannot write \S+bert\.h5\.tmp \(File too large\)", line), line
    assert "every finished batch is kept" in line
    final = tmp_path / "f" / "lab5-fs" / "bert.h5"
    assert not final.exists() and not temp_path(final).exists() and parts_dir(final).is_dir()

    code, out, err = finished(run_cli(args))
    assert code == 0, err
    assert "bert.h5: 48 rows, 48 ok, 0 failed; computed 0 rows, reused 48" in out, out
    assert final.exists() and not parts_dir(final).exists()


def test_cache_merge_past_a_file_size_limit_is_one_line_and_no_output(tmp_path):
    a = tokens_cache(tmp_path / "a.h5", n=256)
    b = tmp_path / "b.h5"
    shutil.copyfile(a, b)
    out = tmp_path / "merged" / "m.h5"
    code, _, err = finished(run_cli(["cache", "merge", a, b, "--out", out], fsize=64 << 10))
    line = one_error_line(err)
    assert code == 1 and "m.h5.tmp (File too large)" in line, err
    assert "batches" not in line  # nothing to resume in a merge
    assert not out.exists() and not temp_path(out).exists()
    assert not out.with_name("m.h5.lock").exists()


# ---------------------------------------------------------------- a real full disk (root)


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/fusebench-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0  # fmt: skip
        if ok:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return ok
    finally:
        probe.rmdir()


@pytest.fixture
def tmpfs():
    """mount(folder, options): a tmpfs there (options with "remount,": changed in place);
    every one is unmounted at the end."""
    if not _can_mount():
        pytest.skip("needs root and a working `mount -t tmpfs`")
    mounted: list[Path] = []

    def mount(where: Path, options: str) -> Path:
        where.mkdir(exist_ok=True)
        if options.startswith("remount,"):
            cmd = ["mount", "-o", options, str(where)]
        else:
            cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]
            mounted.append(where)
        subprocess.run(cmd, check=True, capture_output=True)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], capture_output=True)


CASES = [
    ("nr_inodes=2", "lab5-fs", "No space"),  # no file can be made: at the very start
    ("size=64k", ".parts/", "No space"),  # the plan or a journal part
    ("size=256k", "bert.h5.tmp", "No space"),  # the journal fits, the assembled cache does not
    ("size=1m,ro", "lab5-fs", "Read-only file system"),  # a read-only folder
]


def test_extract_on_a_real_full_or_read_only_disk(tmp_path, tmpfs, corpus, tiny_models):
    """A real tmpfs, full at each write in turn (or read-only): one line, exit 1, no cache,
    and the same command resumes once there is space."""
    for i, (options, fails_at, why) in enumerate(CASES):
        out = tmpfs(tmp_path / f"disk{i}", options)
        args = extract_args(corpus, out, "bert", tiny_models["bert"])
        code, _, err = finished(run_cli(args))
        line = one_error_line(err)
        assert code == 1 and fails_at in line and why in line, (options, err)
        final = out / "lab5-fs" / "bert.h5"
        assert not final.exists() and not temp_path(final).exists(), options
        tmpfs(out, "remount,rw,size=4m,nr_inodes=1000")
        code, stdout, err = finished(run_cli(args))
        assert code == 0 and "wrote" in stdout, (options, err)
        assert final.exists() and not parts_dir(final).exists(), options


# ------------------------------------------------------------------------ SIGTERM is Ctrl-C

SLOW = """
import time
import fusebench.extract.encoders as e
import fusebench.cache.writer as w
def slowed(f, s):
    def g(*a, **k):
        time.sleep(s)
        return f(*a, **k)
    return g
for cls in (e.TextEncoder, e.ImageEncoder, e.ClipEncoder):
    if hasattr(cls, "{method}"):
        setattr(cls, "{method}", slowed(getattr(cls, "{method}"), {encode}))
w.CacheWriter.write = slowed(w.CacheWriter.write, {write})
"""


@pytest.mark.parametrize("stage", ["compute", "assemble"])
def test_sigterm_acts_as_ctrl_c_and_a_rerun_resumes(tmp_path, corpus, tiny_models, stage):
    args = extract_args(corpus, tmp_path / "f", "bert", tiny_models["bert"])
    final = tmp_path / "f" / "lab5-fs" / "bert.h5"
    encode, write = (0.3, 0) if stage == "compute" else (0, 1.0)
    slow = SLOW.format(method="encode_text", encode=encode, write=write)
    proc = run_cli(args, prelude=slow)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        parts = len(list(parts_dir(final).glob("*.npz"))) if parts_dir(final).is_dir() else 0
        if (stage == "compute" and parts >= 2) or temp_path(final).exists():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    code, _, err = finished(proc)
    line = one_error_line(err)
    assert code == 130 and "interrupted" in line and "rerun the same command" in line, err
    assert not final.exists() and not temp_path(final).exists()
    kept = len(list(parts_dir(final).glob("*.npz")))
    assert kept > 0

    code, out, err = finished(run_cli(args))
    assert code == 0, err
    m = re.search(r"computed (\d+) rows, reused (\d+)", out)
    assert m and int(m[2]) > 0 and int(m[1]) + int(m[2]) == 48, out


def test_sigterm_to_the_process_group_with_image_workers_is_one_line(tmp_path, corpus, tiny_models):
    """`kill -TERM -PGID` (a batch system stopping a job) reaches the loader's workers too:
    torch's SIGCHLD watch used to raise "DataLoader worker ... killed by signal" tracebacks
    into the shutdown; now it is the same one line and exit 130."""
    args = extract_args(corpus, tmp_path / "f", "vit", tiny_models["vit"])
    args[args.index("--workers") + 1] = 2
    final = tmp_path / "f" / "lab5-fs" / "vit.h5"
    slow = SLOW.format(method="encode_image", encode=0.4, write=0)
    proc = run_cli(args, prelude=slow, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if parts_dir(final).is_dir() and len(list(parts_dir(final).glob("*.npz"))) >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    code, _, err = finished(proc)
    line = one_error_line(err)
    assert code == 130 and "interrupted" in line, err
    assert not final.exists() and not temp_path(final).exists()


# ------------------------------------------------------------------- labels, splits, URLs


def manifest(root: Path, rows: list[tuple[str, str, str]], ext: str = "csv") -> Path:
    """(guid, image path, label) rows, no split column; a text and an image per guid."""
    root.mkdir(parents=True)
    for i, (_, image, _) in enumerate(rows):
        if "://" not in image:
            write_image(root / image, seed=i)
    if ext == "csv":
        lines = ["guid,text,image_path,label", *(f"{g},tweet {g},{p},{y}" for g, p, y in rows)]
    else:
        import json

        lines = [
            json.dumps({"guid": g, "text": f"tweet {g}", "image_path": p, "label": y or None})
            for g, p, y in rows
        ]
    (root / f"manifest.{ext}").write_text("\n".join(lines) + "\n")
    return root / f"manifest.{ext}"


def test_a_label_outside_labels_is_a_bad_train_row_never_a_test_row(tmp_path):
    """Without a split column only a row with no label is `test`; `neutral` under --labels
    negative,positive is a bad sample of `train` (it used to become a test row, and predict
    wrote training guids into the submission). lab5 and MVSA already kept such rows in train."""
    rows = [("1", "1.jpg", "positive"), ("2", "2.jpg", "negative"), ("3", "3.jpg", "neutral"),
            ("4", "4.jpg", "Neutral"), ("5", "5.jpg", ""), ("6", "6.jpg", "positive")]  # fmt: skip
    for ext in ("csv", "jsonl"):
        data = manifest(tmp_path / ext, rows, ext)
        ds = load_dataset(data, labels=["negative", "positive"])
        split = {s.guid: s.split for s in ds.samples}
        assert split == {"1": "train", "2": "train", "3": "train", "4": "train", "5": "test",
                         "6": "train"}, ext  # fmt: skip
        for s in ds.samples[2:4]:
            assert s.label == -1 and s.failed(["text", "image"])
            assert "unknown label" in s.problems[0].reason
        result = cli("data", "check", "--data", data, "--labels", "negative,positive")
        out = result.output
        assert result.exit_code == 1 and "split: train 5, test 1" in out, out
        assert re.search(r"^  3 +sample +unknown label 'neutral'", out, re.M), out

    root = make_lab5(tmp_path / "lab5", n_train=6, n_test=2)
    ds = load_dataset(root, labels=["negative", "positive"])
    neutral = [s for s in ds.samples if s.label == -1 and s.split == "train"]
    assert neutral and all(s.failed(["text"]) for s in neutral)
    assert sum(s.split == "test" for s in ds.samples) == 2
    mvsa = tmp_path / "mvsa"
    (mvsa / "data").mkdir(parents=True)
    lines = ["ID\ttext,image", "1\tpositive,positive", "2\tneutral,neutral", "3\tnegative,neutral"]
    (mvsa / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    for i in (1, 2, 3):
        (mvsa / "data" / f"{i}.txt").write_text(f"tweet {i}")
        write_image(mvsa / "data" / f"{i}.jpg", seed=i)
    ds = load_dataset(mvsa, labels=["negative", "positive"])
    assert [s.split for s in ds.samples] == ["train"] * 3
    assert [s.label for s in ds.samples] == [1, -1, 0] and ds.samples[1].failed(["text"])


def test_an_unknown_label_extracts_as_a_failed_train_row(tmp_path, tiny_models):
    rows = [(str(i), f"{i}.jpg", ("negative", "positive", "neutral", "")[i % 4]) for i in range(12)]
    data = manifest(tmp_path / "d", rows)
    result = cli(*extract_args(data, tmp_path / "f", "bert", tiny_models["bert"]),
                 "--labels", "negative,positive")  # fmt: skip
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(tmp_path / "f" / "d" / "bert.h5", tokens=False)
    by_guid = dict(zip(store.guid, zip(store.split, store.status)))
    for guid, _, label in rows:
        split, status = by_guid[guid]
        assert split == ("test" if not label else "train"), guid
        assert (status == OK) == (label != "neutral"), guid  # neutral: failed, not a test row


def test_a_url_as_a_path_is_named_as_a_url_one_line_per_sample(tmp_path):
    rows = [("1", "1.jpg", "positive"), ("2", "https://example.com/a.jpg", "negative"),
            ("3", "http://example.com/b.png", "positive")]  # fmt: skip
    data = manifest(tmp_path / "d", rows)
    result = cli("data", "check", "--data", data)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [x for x in result.output.splitlines() if "example.com" in x]
    assert len(lines) == 2 and all("not found" not in x for x in lines), result.output
    for guid, x in zip("23", lines):
        assert x.split()[0] == guid and "is a URL; fusebench reads local files only" in x
        assert "download" in x
    assert "URL, not a local file: 2 (fatal)" in result.output

    (tmp_path / "t.csv").write_text(
        "guid,text_path,image_path,label\n1,https://x.org/1.txt,d/1.jpg,positive\n"
    )
    ds = load_dataset(tmp_path / "t.csv")
    (problem,) = [p for p in ds.samples[0].problems if p.modality == "text"]
    assert "text_path 'https://x.org/1.txt' is a URL" in problem.reason


def test_data_check_exits_1_on_fatal_samples_and_0_on_notes_only(tmp_path):
    root = make_lab5(tmp_path / "ok", n_train=6, n_test=2)
    (root / "data" / "101.txt").write_bytes("caf\xe9 ol\xe9".encode("cp1252"))  # a note only
    result = cli("data", "check", "--data", root)
    assert result.exit_code == 0 and "0 with fatal problems" in result.output, result.output
    (root / "data" / "102.jpg").unlink()
    result = cli("data", "check", "--data", root)
    assert result.exit_code == 1 and "1 with fatal problems" in result.output, result.output
    assert "Traceback" not in result.output and "error:" not in result.output


def test_tune_on_a_full_or_read_only_disk_is_one_line_exit_1(tmp_path, tmpfs):
    """The tuning studies are SQLite (Optuna's storage): a full disk under them is one line
    naming tune.sqlite3, a read-only --out one line naming the folder; exit 1, no traceback,
    no run folder left."""
    from tests.conftest import one_line_error, write_noise_cache

    write_noise_cache(tmp_path / "feat" / "noise.h5", n=60, dim=4)
    args = ["tune", "--features", tmp_path / "feat", "--text", "noise", "--image", "noise"]
    args += ["--head", "logreg", "--trials", 2, "--inner-folds", 2, "--robustness", "off"]
    args += ["--folds", 2, "--seeds", 1, "-q"]
    full = tmpfs(tmp_path / "full", "size=160k")
    line = one_line_error(cli(*args, "--out", full / "runs"), 1)
    assert "tune.sqlite3" in line and "disk is full" in line, line
    assert not list((full / "runs").glob("*"))
    # no handle into the run folder outlives the command (the studies' engine is closed)
    assert subprocess.run(["umount", str(full)], capture_output=True).returncode == 0
    read_only = tmpfs(tmp_path / "ro", "size=4m,ro")
    line = one_line_error(cli(*args, "--out", read_only / "runs"), 1)
    assert str(read_only) in line and "read-only" in line.lower(), line
