"""A finished cache is never replaced behind the user's back (issue 14): a different setting
is refused naming it (or, for --layer, written beside), a refresh happens only when the data
files changed, two datasets never share one cache path, and what a cache records about its
data is enough for `cache verify` and for the command the stale-cache advice names.

Tiny checkpoints and corpora come from tests/conftest.py; the CLI runs in-process."""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
from pathlib import Path

import pytest
from fusebench.cache import FeatureStore, StaleCacheError, check_fresh, ensure_fresh
from fusebench.cache.merge import merge_caches
from fusebench.extract.loop import cache_path
from fusebench.fuse.features import load_feature_set
from typer.testing import Result

from tests.conftest import cli, make_lab5, ok, write_manifest
from tests.conftest import one_line_error as one_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LEGACY = "“引号” и русский…".encode("gb18030")  # one text that is not UTF-8


def extract(data: Path, out: Path, encoder: str, model: Path | str, *extra: object) -> Result:
    return cli("extract", "--encoder", encoder, "--data", data, "--out", out, "--model", model,
               "--batch-size", 4, "--workers", 0, "--quiet", *extra)  # fmt: skip


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".lock", ".parts"))]


def lab5_labels(root: Path) -> dict[str, str]:
    out = {}
    for name in ("train.txt", "test_without_label.txt"):
        for line in (root / name).read_text().splitlines()[1:]:
            guid, tag = line.split(",")
            out[guid] = tag
    return out


# ---------------------------------------------------------------- every setting flag


@pytest.fixture(scope="module")
def finished(tiny_models, tmp_path_factory):
    """A finished clip cache of a lab5 folder (one legacy-encoded text; a manifest.csv of the
    same samples beside train.txt, for --format), built with --batch-size 4."""
    root = make_lab5(tmp_path_factory.mktemp("trust") / "lab5-mini", n_train=6, n_test=2)
    (root / "data" / "101.txt").write_bytes(LEGACY)
    labels = lab5_labels(root)
    write_manifest(root / "manifest.csv", list(labels), labels)
    out = root.parent / "features"
    ok(extract(root, out, "clip", tiny_models["clip"]))
    final = cache_path(out, "lab5-mini", "clip")
    return root, out, final, sha(final)


SETTINGS = [  # extra options, what the one error line must say (None: same cache, up to date)
    (["--limit", 5], "--limit none, now 5"),
    (["--limit", 500], None),  # beyond the data: the whole dataset, as built
    (["--text-encoding", "cp1252"], "--text-encoding none (detected gb18030), now cp1252"),
    (["--text-encoding", "gb18030"], None),  # what was detected
    (["--labels", "positive,neutral,negative"],
     "--labels none (the data's negative,neutral,positive), now positive,neutral,negative"),
    (["--labels", "negative,neutral,positive"], None),  # the data's own classes, in order
    (["--labels", "negative,neutral,positive,other"], "--labels none"),
    (["--column", "label=label"], "--column maps a manifest's columns"),  # lab5: fixed columns
    (["--format", "manifest"], "--format lab5, now manifest"),
    (["--batch-size", 8], "--batch-size 4, now 8"),
    (["--random-init"], "--random-init off, now on"),
    (["--exact-preprocess"], "now the model's processor (--exact-preprocess)"),
    (["--decode", "gpu"], "now the device path, JPEGs decoded by PIL (--decode gpu)"),
    (["--precision", "bf16"], "--precision fp32, now bf16-autocast"),
    (["--precision", "fp32"], None),
    (["--device", "cpu"], None),
    (["--on-error", "fail"], None),
    (["--workers", 1], None),
]  # fmt: skip


def test_every_setting_flag_on_a_finished_cache_leaves_its_bytes(finished, tiny_models):
    """Each extract option against the finished cache: refused in one line naming the setting
    (old: --limit, --text-encoding and --labels silently rebuilt it as a "refresh"), or, when
    the option changes nothing, up to date; the cache's bytes never change. Each option runs
    on the cache as built (restored if a run changed it), and every failure is listed."""
    root, out, final, before = finished
    pristine = final.read_bytes()
    failures = []
    for extra, said in SETTINGS:
        result = extract(root, out, "clip", tiny_models["clip"], *extra)
        try:
            if said is None:
                assert "up to date" in ok(result)
            else:
                line = one_error(result)
                assert said in line, line
                if "--column" not in said:
                    assert str(final) in line and "--overwrite" in line and "--out" in line
            assert sha(final) == before, "the cache's bytes changed"
            assert sorted(p.name for p in final.parent.iterdir()) == ["clip.h5"]
            assert not leftovers(out)
        except AssertionError as e:
            failures.append(f"{' '.join(map(str, extra))}: {' '.join(str(e).split())[:300]}")
            for p in final.parent.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            final.write_bytes(pristine)
    assert not failures, "\n".join(failures)


def test_another_model_folder_is_refused_and_another_layer_is_written_beside(
    finished, tiny_models, tmp_path
):
    root, out, final, before = finished
    copy = Path(shutil.copytree(tiny_models["clip"], tmp_path / "clip-copy"))
    line = one_error(extract(root, out, "clip", copy))
    assert f"--model {tiny_models['clip']}, now {copy}" in line
    one_pass = cli("extract", "--encoder", "clip,vit", "--model", f"{copy},{tiny_models['vit']}",
                   "--data", root, "--out", out, "--workers", 0, "--batch-size", 4, "--quiet")  # fmt: skip
    assert "--model" in one_error(one_pass)  # the one-pass path refuses the same way
    assert sha(final) == before and not cache_path(out, "lab5-mini", "vit").exists()

    layered = tmp_path / "layered"
    shutil.copytree(out, layered)
    stdout = ok(extract(root, layered, "clip", tiny_models["clip"], "--layer", 1))
    beside = cache_path(layered, "lab5-mini", "clip", 1)
    assert beside.name == "clip-l1.h5" and f"wrote {beside}" in stdout
    assert sha(cache_path(layered, "lab5-mini", "clip")) == before
    fs = load_feature_set(beside.parent, text="clip-l1", image="clip-l1")  # stage two's name
    assert len(fs.guid) == 8


def test_overwrite_replaces_a_limited_cache_reusing_its_rows(tiny_models, tmp_path):
    root = make_lab5(tmp_path / "lab5-mini", n_train=6, n_test=2)
    out = tmp_path / "features"
    ok(extract(root, out, "bert", tiny_models["bert"]))
    line = one_error(extract(root, out, "bert", tiny_models["bert"], "--limit", 3))
    assert "--limit none, now 3" in line
    stdout = ok(extract(root, out, "bert", tiny_models["bert"], "--limit", 3, "--overwrite"))
    assert "replaced" in stdout and "reused 3 unchanged rows" in stdout
    store = FeatureStore.open(cache_path(out, "lab5-mini", "bert"))
    assert len(store) == 3 and store.config["limit"] == 3
    assert "up to date" in ok(extract(root, out, "bert", tiny_models["bert"], "--limit", 3))


def test_a_changed_column_mapping_on_a_manifest_cache_is_refused(tiny_models, tmp_path):
    root = make_lab5(tmp_path / "d", n_train=6, n_test=2)
    labels = lab5_labels(root)
    data = write_manifest(root / "all.csv", list(labels), labels)
    out = tmp_path / "features"
    ok(extract(data, out, "vit", tiny_models["vit"]))
    final = cache_path(out, "d-all", "vit")
    before = sha(final)
    line = one_error(extract(data, out, "vit", tiny_models["vit"], "--column", "label=label"))
    assert "--column none, now label=label" in line
    assert sha(final) == before


# ---------------------------------------------------------------- data that changed on disk


def test_classes_that_change_with_the_data_refresh_but_other_labels_are_refused(
    tiny_models, tmp_path
):
    """Chosen rule: --labels not given both times and the files now carry another class set
    is the data changing (refreshed); a different --labels is another setting (refused)."""
    root = make_lab5(tmp_path / "lab5-mini", n_train=6, n_test=2)
    train = root / "train.txt"
    train.write_text(train.read_text().replace("neutral", "negative"))
    out = tmp_path / "features"
    ok(extract(root, out, "bert", tiny_models["bert"]))
    final = cache_path(out, "lab5-mini", "bert")
    assert FeatureStore.open(final).classes == ["negative", "positive"]
    before = sha(final)
    line = one_error(
        extract(root, out, "bert", tiny_models["bert"], "--labels", "positive,negative")
    )
    assert "--labels none (the data's negative,positive), now positive,negative" in line
    assert sha(final) == before
    train.write_text(train.read_text().replace("101,negative", "101,neutral"))
    stdout = ok(extract(root, out, "bert", tiny_models["bert"]))
    assert "refreshed" in stdout and "reused 8 unchanged rows" in stdout
    assert FeatureStore.open(final).classes == ["negative", "neutral", "positive"]


def test_an_image_cache_is_not_stale_when_a_text_file_changes(tiny_models, tmp_path):
    root = make_lab5(tmp_path / "lab5-mini", n_train=6, n_test=2)
    out = tmp_path / "features"
    ok(extract(root, out, "vit", tiny_models["vit"]))
    ok(extract(root, out, "bert", tiny_models["bert"]))
    (root / "data" / "102.txt").write_text("an edited text\n")
    assert check_fresh(FeatureStore.open(cache_path(out, "lab5-mini", "vit"))) == []
    assert "102" in " ".join(check_fresh(FeatureStore.open(cache_path(out, "lab5-mini", "bert"))))


# ---------------------------------------------------------------- one dataset, one cache path


def test_two_manifests_in_one_folder_get_two_caches(tiny_models, tmp_path):
    root = make_lab5(tmp_path / "d", n_train=6, n_test=2)
    labels = lab5_labels(root)
    guids = list(labels)
    every, part = (
        write_manifest(root / "all.csv", guids, labels),
        write_manifest(root / "part1.csv", guids[:4], labels),
    )
    out = tmp_path / "features"
    ok(extract(every, out, "vit", tiny_models["vit"]))
    whole = cache_path(out, "d-all", "vit")
    before = sha(whole)
    stdout = ok(extract(part, out, "vit", tiny_models["vit"]))
    assert f"wrote {cache_path(out, 'd-part1', 'vit')}: 4 rows" in stdout
    assert sha(whole) == before and len(FeatureStore.open(whole)) == 8


def test_another_dataset_of_the_same_name_is_refused_not_refreshed(tiny_models, tmp_path):
    first = make_lab5(tmp_path / "one" / "lab5-mini", n_train=6, n_test=2)
    other = make_lab5(tmp_path / "two" / "lab5-mini", n_train=5, n_test=2, seed=4)
    out = tmp_path / "features"
    ok(extract(first, out, "bert", tiny_models["bert"]))
    final = cache_path(out, "lab5-mini", "bert")
    before = sha(final)
    line = one_error(extract(other, out, "bert", tiny_models["bert"]))
    assert f"holds dataset lab5-mini ({first.resolve()}), not lab5-mini ({other.resolve()})" in line
    assert "--out elsewhere" in line and "--overwrite" in line
    assert sha(final) == before
    moved = Path(shutil.copytree(first, tmp_path / "three" / "lab5-mini"))
    assert "up to date" in ok(extract(moved, out, "bert", tiny_models["bert"]))  # same samples


# ---------------------------------------------------------------- what a cache records


def test_verify_and_the_stale_advice_work_for_a_manifest_file(tiny_models, tmp_path):
    """A cache of one of two manifests in a folder: `cache verify` needs no --data, and the
    command the stale-cache line names runs (it rebuilds the same cache, with its options)."""
    root = make_lab5(tmp_path / "d", n_train=6, n_test=2)
    labels = lab5_labels(root)
    data = write_manifest(root / "all.csv", list(labels), labels)
    write_manifest(root / "part1.csv", list(labels)[:3], labels)
    out = tmp_path / "features"
    ok(extract(data, out, "bert", tiny_models["bert"], "--limit", 7))
    final = cache_path(out, "d-all", "bert")
    store = FeatureStore.open(final)
    assert store.attrs["data_path"] == str(data.resolve())
    verified = ok(cli("cache", "verify", final, "--rows", 1, "--device", "cpu"))
    assert "7 rows" in verified

    (root / "data" / "102.txt").write_text("edited after extraction\n")
    with pytest.raises(StaleCacheError) as stale:
        ensure_fresh(FeatureStore.open(final))
    command = re.search(r"rerun `([^`]+)`", str(stale.value))[1]
    args = shlex.split(command)
    assert args[:2] == ["fusebench", "extract"] and "--limit" in args and "--batch-size" in args
    stdout = ok(cli(*args[1:], "--quiet", "--workers", 0))
    assert f"refreshed {final}" in stdout
    assert check_fresh(FeatureStore.open(final)) == []


def test_merge_accepts_the_same_weights_at_another_path(tiny_models, tmp_path):
    root = make_lab5(tmp_path / "d", n_train=6, n_test=2)
    labels = lab5_labels(root)
    guids = list(labels)
    copy = Path(shutil.copytree(tiny_models["vit"], tmp_path / "vit-copy"))
    parts = []
    for name, rows, model in (("p1", guids[:4], tiny_models["vit"]), ("p2", guids[4:], copy)):
        data = write_manifest(root / f"{name}.csv", rows, labels)
        ok(extract(data, tmp_path / "f", "vit", model, "--labels", "negative,neutral,positive"))
        parts.append(cache_path(tmp_path / "f", f"d-{name}", "vit"))
    rep = merge_caches(parts, tmp_path / "merged.h5")
    assert rep.rows == 8 and rep.inputs == 2
