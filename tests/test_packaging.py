"""fusebench installed like a library: a built wheel, installed (not editable) into a fresh
virtual environment, runs `fusebench --version`, `extract` and `compare` on a Parquet manifest
from another directory; configs ship as package data and a missing one is an error, never a
silent default; `hf:<id-or-path>` names one cache in both stages; README's Python API example
runs as written.

The fresh venv has no pip and no dependencies of its own: a .pth line appends this
environment's site-packages (as a plain path, so its editable-install finder for the checkout
is NOT activated), and the wheel goes into the venv's own site-packages, which come first. The
test asserts the modules that run are the installed copies, not the checkout.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from fusebench.cache import TokenFeatures, write_features
from fusebench.cache.naming import cache_file, cache_stem

from tests.conftest import cli

REPO = Path(__file__).resolve().parents[1]
SOURCES = (
    "pyproject.toml",
    "README.md",
    "cli.py",
    "fusebench",
    "extract",
    "cache",
    "fuse",
    "configs",
)
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="120")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# ---------------------------------------------------------------- the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of the checkout's sources (the checkout itself
    stays untouched: no build/ or egg-info written into it)."""
    if find_spec("build") is None or find_spec("setuptools") is None:
        pytest.skip(
            "building a wheel needs the `build` and `setuptools` packages (the [dev] extra)"
        )
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(
            REPO / name, src / name, **({"ignore": skip} if (REPO / name).is_dir() else {})
        )
    start = time.perf_counter()
    ok(
        run(
            [
                sys.executable,
                "-m",
                "build",
                "--wheel",
                "--no-isolation",
                "--outdir",
                str(root / "dist"),
                str(src),
            ],
            cwd=root,
        )
    )
    (whl,) = (root / "dist").glob("fusebench-*.whl")
    print(
        f"\nwheel {whl.name}: {whl.stat().st_size / 1024:.0f} KiB, "
        f"built in {time.perf_counter() - start:.1f}s"
    )
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed into it (not editable)."""
    env = tmp_path_factory.mktemp("venv") / "env"
    ok(run([sys.executable, "-m", "venv", "--without-pip", str(env)], cwd=env.parent))
    python = env / "bin" / "python"
    purelib = Path(
        ok(
            run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=env,
            )
        ).strip()
    )
    # the dependencies, borrowed: appended to sys.path, after the venv's own site-packages
    (purelib / "_fusebench_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    start = time.perf_counter()
    ok(
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(python),
                "install",
                "--no-deps",
                "--no-index",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "-q",
                str(wheel),
            ],
            cwd=env.parent,
        )
    )
    print(f"installed into a fresh venv in {time.perf_counter() - start:.1f}s")
    return env


def test_the_wheel_ships_every_config_and_no_tests(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in ("encoders", "heads"):
        for yaml_file in (REPO / "configs" / kind).glob("*.yaml"):
            assert f"fusebench/configs/{kind}/{yaml_file.name}" in names
    assert "fusebench/configs/demo/vit-random/config.json" in names  # the demo's random ViT
    ours = {"cli.py", "cache/naming.py", "extract/loop.py", "fuse/registry.py", "__init__.py"}
    assert {f"fusebench/{n}" for n in ours} <= names
    # one import name: nothing but fusebench/ and its dist-info lands in site-packages
    assert {n.split("/")[0] for n in names} == {"fusebench", f"fusebench-{VERSION}.dist-info"}
    (top_level,) = [n for n in names if n.endswith("top_level.txt")] or [None]
    if top_level:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["fusebench"]


def _parquet_manifest(folder: Path) -> Path:
    """tweets/tweets.parquet: guid, text, embedded PNG bytes, string label; both modalities
    carry the label, so the heads must score well above chance."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rows = []
    words = {"neg": "awful sad terrible rain", "pos": "great happy lovely sun"}
    for i in range(30):
        label = ("neg", "pos")[i % 2]
        image = Image.new("RGB", (24, 20), (200, 30, 30) if label == "neg" else (30, 200, 30))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        rows.append(
            {
                "guid": f"t{i:02d}",
                "text": f"{words[label]} {i}",
                "image": buf.getvalue(),
                "label": label,
            }
        )
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "tweets.parquet")
    return folder / "tweets.parquet"


def test_the_installed_wheel_runs_from_another_directory(venv, tmp_path):
    pytest.importorskip("pyarrow")
    work = tmp_path / "elsewhere"
    work.mkdir()
    # the user's own modules with the commonest names must neither shadow nor be shadowed
    (work / "fuse.py").write_text("raise ImportError('a user module, not fusebench')\n")
    for own in ("cache", "configs"):
        (work / own).mkdir()
        (work / own / "__init__.py").write_text("raise ImportError('a user package')\n")
    fusebench = str(venv / "bin" / "fusebench")
    names = ("fusebench", "fusebench.cli", "fusebench.cache", "fusebench.configs")
    names += ("fusebench.extract", "fusebench.fuse")
    where = ok(
        run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import importlib; "
                f"print('\\n'.join(importlib.import_module(m).__file__ for m in {names!r}))",
            ],
            cwd=work,
        )
    ).split()
    site = str(venv / "lib")
    assert all(path.startswith(site) for path in where), where  # the install, not the checkout
    assert not any(path.startswith(str(REPO)) for path in where)

    assert ok(run([fusebench, "--version"], cwd=work)).strip() == f"fusebench {VERSION}"
    assert "extract" in ok(run([fusebench, "-h"], cwd=work))

    manifest = _parquet_manifest(work / "tweets")
    out = ok(
        run(
            [
                fusebench,
                "extract",
                "--encoder",
                "minilm",
                "--data",
                str(manifest.relative_to(work)),
                "--out",
                "features",
                "--device",
                "cpu",
            ],
            cwd=work,
        )
    )
    assert "wrote features/tweets/minilm.h5: 30 rows, 30 ok" in out
    out = ok(
        run(
            [
                fusebench,
                "extract",
                "--encoder",
                "vit",
                "--model",
                "package:fusebench.configs/demo/vit-random",
                "--random-init",
                "--data",
                "tweets/tweets.parquet",
                "--out",
                "features",
                "--device",
                "cpu",
                "--workers",
                "0",
            ],
            cwd=work,
        )
    )
    assert "wrote features/tweets/vit.h5: 30 rows, 30 ok" in out
    out = ok(
        run(
            [
                fusebench,
                "compare",
                "--features",
                "features/tweets",
                "--text",
                "minilm",
                "--image",
                "vit",
                "--heads",
                "concat_mlp,logreg",
                "--folds",
                "2",
                "--seeds",
                "1",
                "--epochs",
                "3",
                "--device",
                "cpu",
                "--out",
                "runs",
            ],
            cwd=work,
        )
    )
    (run_dir,) = (work / "runs").iterdir()
    results = (run_dir / "results.csv").read_text()
    assert "concat_mlp" in results and "logreg" in results
    assert any(" logreg " in line for line in out.splitlines())  # the table on stdout
    with open(run_dir / "results.csv", newline="") as fh:
        logreg = next(row for row in csv.DictReader(fh) if row["head"] == "logreg")
    assert float(logreg["macro_f1_mean"]) > 0.8  # a planted signal, well above chance

    # README's Python example, as written, on these caches (text minilm, image vit)
    example = _readme_python_api().replace("features/lab5", "features/tweets")
    printed = ok(run([str(venv / "bin" / "python"), "-c", example], cwd=work))
    assert float(printed.split("macro-F1")[1]) > 0.5


# ---------------------------------------------------------------- configs: errors, not defaults


def test_a_builtin_head_without_its_yaml_is_an_error_naming_the_file(tmp_path, monkeypatch):
    from fusebench.fuse import registry

    monkeypatch.setattr(registry, "CONFIG_DIR", tmp_path / "heads")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "heads" / "late.yaml"))):
        registry.head_config("late")
    result = cli("fuse", "--head", "late", "--features", str(tmp_path))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "late.yaml is missing" in lines[0] and "reinstall" in lines[0]


def test_a_plugin_head_without_a_yaml_keeps_its_own_defaults(monkeypatch):
    from fusebench.fuse import registry
    from fusebench.fuse.classic import LogRegHead

    class PluginHead(LogRegHead):  # registered outside fusebench: no YAML shipped
        pass

    PluginHead.__module__ = "my_lab.heads"
    monkeypatch.setattr(registry.HEADS, "_items", {**registry.HEADS._items, "mine": PluginHead})
    assert registry.head_config("mine") == {}


def test_missing_encoder_configs_are_an_error_naming_the_folder(tmp_path, monkeypatch):
    from fusebench.extract import encoders

    monkeypatch.setattr(encoders, "CONFIG_DIR", tmp_path / "encoders")
    with pytest.raises(FileNotFoundError, match="no encoder configs in"):
        encoders.load_spec("minilm")
    result = cli("extract", "--encoder", "minilm", "--data", str(tmp_path))
    assert result.exit_code == 2
    assert str(tmp_path / "encoders") in result.output and "reinstall fusebench" in result.output
    assert "choose one of  or" not in result.output  # the old, empty list


def test_version_and_short_help():
    result = cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"fusebench {VERSION}"
    for args in (["-h"], ["compare", "-h"], ["cache", "info", "-h"]):
        result = cli(*args)
        assert result.exit_code == 0 and "Usage:" in result.output, args


def test_messages_and_readme_say_fusebench_not_python_cli_py():
    """User-facing text names the console script; only README's one note on running from a
    clone may mention `python cli.py`."""
    offenders = []
    for path in [
        REPO / "cli.py",
        *REPO.glob("scripts/*.sh"),
        *(p for d in ("extract", "fuse", "cache") for p in (REPO / d).rglob("*.py")),
    ]:
        if "python cli.py" in path.read_text():
            offenders.append(str(path.relative_to(REPO)))
    readme = (REPO / "README.md").read_text()
    assert offenders == [] and readme.count("python cli.py") <= 1
    assert "fusebench compare" in readme and "fusebench extract" in readme


# ---------------------------------------------------------------- hf: names one cache


def test_cache_naming_rule():
    assert cache_stem("clip") == "clip"
    assert cache_stem("hf:org/name") == "hf-org--name"
    assert cache_stem("hf:/models/snap/") == cache_stem("hf:/models/snap")
    assert cache_stem(cache_stem("hf:org/name")) == "hf-org--name"  # the stem names it too
    assert cache_file("f/lab5", "hf:a/b").name == "hf-a--b.h5"


def test_an_hf_cache_written_by_extract_is_found_by_fuse(tiny_models, lab5, tmp_path):
    from fusebench.extract.loop import extract
    from fusebench.fuse import load_feature_set

    bert = f"hf:{tiny_models['bert']}"
    report = extract(lab5, bert, out=tmp_path / "f", device="cpu", quiet=True, num_workers=0)
    assert report.path.name == f"{cache_stem(bert)}.h5" and report.path.is_file()
    fs = load_feature_set(report.path.parent, text=bert, image=None)
    assert len(fs) == report.ok and fs.text.path == report.path
    result = cli(
        *[
            "fuse",
            "--head",
            "logreg",
            "--features",
            str(report.path.parent),
            "--text",
            f"{bert}/",
            "--image",
            "none",
            "--out",
            str(tmp_path / "runs"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "logreg" in result.output and "run folder:" in result.output


# ---------------------------------------------------------------- README's Python API


def _readme_python_api() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "README's Python API section holds one ```python block"
    return blocks[0]


def test_the_readme_python_api_example_runs(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    n, classes = 90, ("negative", "neutral", "positive")
    y = np.arange(n) % 3
    split = ["train"] * 80 + ["test"] * 10
    label = np.where(np.array(split) == "train", y, -1)
    guid = [f"g{i}" for i in range(n)]
    folder = tmp_path / "features" / "lab5"
    for name, dim, modality in (("minilm", 12, "text"), ("vit", 8, "image")):
        pooled = rng.normal(size=(n, dim)) + 2 * np.eye(3)[y] @ rng.normal(size=(3, dim))
        feats = TokenFeatures(None, None, {"pooled": pooled.astype(np.float16)}, {"pooled": "cls"})
        write_features(
            folder / f"{name}.h5",
            guid=guid,
            split=split,
            label=label,
            classes=classes,
            config={"encoder": name},
            attrs={"encoder": name},
            **{modality: feats},
        )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_python_api(), "README.md", "exec"), namespace)
    assert namespace["proba"].shape == (len(namespace["fold"].scored), 3)
    assert sorted(namespace["predicted"]) == [f"g{i}" for i in range(80, 90)]
    assert set(namespace["predicted"].values()) <= set(classes)
