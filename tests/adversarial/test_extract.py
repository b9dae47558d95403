"""Stage one under odd but real inputs (issue 6): the fingerprint covers everything that
changes the numbers, a changed dataset refreshes the cache reusing unchanged rows, features
that overflow float16 fail per sample, and every file-system fault or bad option is one
line with a non-zero exit, no traceback, and no finished work lost.

Tiny checkpoints come from tests/conftest.py; the CLI runs in-process through CliRunner.
Disk-full and read-only faults are injected (OSError with the real errno) at the OS call the
code makes, since a test cannot mount a small or read-only file system."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import fusebench.extract.encoders as encoders
import h5py
import numpy as np
import pytest
import torch
from fusebench.cache import (
    FAILED,
    OK,
    CacheError,
    CacheWriter,
    FeatureStore,
    parts_dir,
    temp_path,
)
from fusebench.cache.journal import Journal
from fusebench.extract.datasets import load_dataset
from fusebench.extract.loop import cache_path, extract
from PIL import Image
from typer.testing import Result

from tests.conftest import cli, make_lab5, ok, write_image
from tests.conftest import one_line_error as one_error

ATOL, RTOL = 2e-3, 4e-3  # float16 storage; another batch padding moves the last bits


def run_extract(data: Path, out: Path, encoder: str, model: Path | None, *extra: object) -> Result:
    args: list[object] = [
        "extract",
        "--encoder",
        encoder,
        "--data",
        data,
        "--out",
        out,
        "--quiet",
        "--workers",
        "0",
    ]
    if model is not None:
        args += ["--model", model]
    return cli(*args, *extra)


def no_stray_files(out: Path) -> None:
    """A failed run leaves no lock and no half-written cache under any name."""
    assert not list(out.rglob("*.lock")), list(out.rglob("*.lock"))
    assert not list(out.rglob("*.h5.tmp")), list(out.rglob("*.h5.tmp"))


def small(tmp_path: Path, name: str = "lab5-mini") -> Path:
    return make_lab5(tmp_path / name, n_train=6, n_test=2)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def arrays(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        for g in ("text", "image"):
            if g in f:
                out.update({f"{g}/{k}": f[g][k][()] for k in f[g]})
    return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- 3. the fingerprint


def test_extra_pooling_change_in_the_encoder_yaml_is_not_up_to_date(
    tiny_models, tmp_path, monkeypatch
):
    configs = Path(shutil.copytree(encoders.CONFIG_DIR, tmp_path / "configs"))
    monkeypatch.setattr(encoders, "CONFIG_DIR", configs)
    data, out = small(tmp_path), tmp_path / "f"
    ok(run_extract(data, out, "bert", tiny_models["bert"]))
    yaml_file = configs / "bert.yaml"
    yaml_file.write_text(
        yaml_file.read_text().replace("extra_pooling: [mean]", "extra_pooling: []")
    )
    line = one_error(run_extract(data, out, "bert", tiny_models["bert"]), code=1)
    assert "extra_pooling" in line and "--overwrite" in line
    store = FeatureStore.open(cache_path(out, "lab5-mini", "bert"))
    assert "pooled_mean" in store.text.pooled  # the old cache is untouched
    stdout = ok(run_extract(data, out, "bert", tiny_models["bert"], "--overwrite"))
    assert "wrote" in stdout
    assert set(FeatureStore.open(store.path).text.pooled) == {"pooled"}


def test_editing_the_tokenizer_vocab_txt_invalidates_the_cache(tiny_models, tmp_path):
    """transformers reads vocab.txt when the folder has no tokenizer.json."""
    model = tmp_path / "bert-vocab"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_models["bert"] / name, model)
    import transformers as T

    vocab = list(T.AutoTokenizer.from_pretrained(tiny_models["bert"]).get_vocab())
    vocab.sort(key=T.AutoTokenizer.from_pretrained(tiny_models["bert"]).get_vocab().get)
    (model / "vocab.txt").write_text("\n".join(vocab) + "\n")
    data, out = small(tmp_path), tmp_path / "f"
    ok(run_extract(data, out, "bert", model))
    assert "up to date" in ok(run_extract(data, out, "bert", model))
    vocab[10], vocab[11] = vocab[11], vocab[10]  # two letters trade ids: other token ids
    (model / "vocab.txt").write_text("\n".join(vocab) + "\n")
    line = one_error(run_extract(data, out, "bert", model), code=1)
    assert "model_revision" in line and "--overwrite" in line


@pytest.mark.parametrize(
    "name",
    ["vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model"],
)
def test_revision_hash_covers_every_tokenizer_file_but_not_docs(tiny_models, tmp_path, name):
    folder = Path(shutil.copytree(tiny_models["bert"], tmp_path / "m"))
    model = SimpleNamespace(config=SimpleNamespace(_commit_hash=None))  # a local folder
    (folder / name).write_bytes(b"one\ntwo\n")
    (folder / "README.md").write_text("model card\n")
    before = encoders.weights_revision(model, str(folder))
    (folder / "README.md").write_text("an edited model card\n")
    assert encoders.weights_revision(model, str(folder)) == before  # docs are not read
    (folder / name).write_bytes(b"one\nthree\n")
    assert encoders.weights_revision(model, str(folder)) != before


def test_cache_config_records_the_datasets_classes_and_text_encoding(tiny_models, tmp_path):
    data = small(tmp_path)
    train = (data / "train.txt").read_text().replace("neutral", "negative")
    (data / "train.txt").write_text(train)  # a two-class dataset
    (data / "data" / "101.txt").write_bytes("“引号” и русский…".encode("gb18030"))
    rep = extract(
        data, "bert", model=str(tiny_models["bert"]), out=tmp_path / "a", quiet=True, num_workers=0
    )
    store = FeatureStore.open(rep.path)
    assert store.config["classes"] == store.classes == ["negative", "positive"]
    assert str(store.config["text_encoding"]).lower() == "gb18030"

    # --labels and --text-encoding reach the dataset reader and the fingerprint
    rep = extract(
        data,
        "bert",
        model=str(tiny_models["bert"]),
        out=tmp_path / "b",
        quiet=True,
        num_workers=0,
        labels=["negative", "neutral", "positive"],
        text_encoding="gbk",
    )
    forced = FeatureStore.open(rep.path)
    assert forced.config["classes"] == forced.classes == ["negative", "neutral", "positive"]
    assert str(forced.config["text_encoding"]).lower() == "gbk"
    assert forced.attrs["fingerprint"] != store.attrs["fingerprint"]


# ---------------------------------------------------------------- 3. refresh on changed data


def test_changed_data_refreshes_the_cache_reusing_every_unchanged_row(tiny_models, tmp_path):
    data, out = small(tmp_path), tmp_path / "f"
    clip = tiny_models["clip"]
    ok(run_extract(data, out, "clip", clip, "--batch-size", "4"))
    (data / "data" / "102.txt").write_text("an edited text\n")  # text changed, image not
    train = (data / "train.txt").read_text().replace("104,neutral", "104,positive")
    (data / "data" / "999.txt").write_text("a new sample\n")
    write_image(data / "data" / "999.jpg", seed=99)
    (data / "train.txt").write_text(train + "999,negative\n")  # a label, and a new row
    from fusebench.cache import check_fresh  # the sources extract records: what stage two checks

    final = cache_path(out, "lab5-mini", "clip")
    assert "102" in " ".join(check_fresh(FeatureStore.open(final)))

    stdout = ok(run_extract(data, out, "clip", clip, "--batch-size", "4"))
    assert "refreshed" in stdout
    # computed: 102's text, 999's text and image; reused: 7 texts and 8 images
    assert "computed 3 rows, reused 15 unchanged rows from the old cache" in stdout
    store = FeatureStore.open(final, manifest=load_dataset(data).manifest())  # fresh: no error
    assert check_fresh(store) == []
    assert "up to date" in ok(run_extract(data, out, "clip", clip, "--batch-size", "4"))

    ref = extract(
        data, "clip", model=str(clip), out=tmp_path / "ref", batch_size=4, quiet=True, num_workers=0
    )
    fresh = FeatureStore.open(ref.path)
    assert store.guid.tolist() == fresh.guid.tolist() and "999" in store.guid
    assert store.label.tolist() == fresh.label.tolist()
    assert store.classes[store.label[store.guid.tolist().index("104")]] == "positive"
    assert (store.status == OK).all()
    a, b = arrays(final), arrays(ref.path)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        np.testing.assert_allclose(
            a[name].astype(np.float32),
            b[name].astype(np.float32),
            atol=ATOL,
            rtol=RTOL,
            err_msg=name,
        )
    # the edited text really was recomputed (its old features differ from the new)
    row = store.guid.tolist().index("102")
    assert not np.allclose(a["text/pooled"][row], 0)


def test_another_legacy_encoding_recomputes_only_the_texts_it_decodes(tiny_models, tmp_path):
    data = small(tmp_path)
    (data / "data" / "101.txt").write_bytes("“引号” и русский…".encode("gb18030"))
    common = dict(model=str(tiny_models["bert"]), out=tmp_path / "f", quiet=True, num_workers=0)
    assert extract(data, "bert", **common).computed == 8
    with pytest.raises(CacheError, match=r"--text-encoding none \(detected gb18030\), now gbk"):
        extract(data, "bert", text_encoding="gbk", **common)  # another setting: refused
    rep = extract(data, "bert", text_encoding="gbk", overwrite=True, **common)
    assert rep.replaced and (rep.computed, rep.kept) == (1, 7)  # the UTF-8 texts read the same
    assert FeatureStore.open(rep.path).config["text_encoding"] == "gbk"


def test_a_refresh_that_fails_in_assembly_keeps_the_old_cache_and_resumes(
    tiny_models, tmp_path, monkeypatch
):
    data, out = small(tmp_path), tmp_path / "f"
    ok(run_extract(data, out, "bert", tiny_models["bert"]))
    final = cache_path(out, "lab5-mini", "bert")
    before = sha(final)
    (data / "data" / "104.txt").write_text("changed after extraction\n")

    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(CacheWriter, "finish", full)
    line = one_error(run_extract(data, out, "bert", tiny_models["bert"]), code=1)
    assert "No space left on device" in line and "rerun" in line
    assert sha(final) == before  # the old cache stays until a new one replaces it
    assert parts_dir(final).is_dir() and not temp_path(final).exists()
    monkeypatch.undo()
    stdout = ok(run_extract(data, out, "bert", tiny_models["bert"]))
    assert (
        "computed 0 rows, reused 7 unchanged rows from the old cache and 1 from an earlier run"
        in stdout
    )
    FeatureStore.open(final, manifest=load_dataset(data).manifest())
    no_stray_files(out)


# ---------------------------------------------------------------- 10. float16 overflow


def _scale_rows(cls, hot, monkeypatch):
    """Patch a transformers model class so rows for which hot(inputs) holds come out x1e6:
    real activations beyond float16's range, through the real conversion to float16."""
    forward = cls.forward

    def patched(self, *args, **kw):
        out = forward(self, *args, **kw)
        rows = hot(kw)
        out.last_hidden_state[rows] = out.last_hidden_state[rows] * 1e6
        return out

    monkeypatch.setattr(cls, "forward", patched)


@pytest.mark.parametrize("encoder,precision", [("bert", "fp32"), ("bert", "bf16"), ("vit", "fp32")])
def test_float16_overflow_fails_that_sample_naming_guid_modality_and_fix(
    tiny_models, tmp_path, monkeypatch, encoder, precision
):
    import transformers as T

    data, out = small(tmp_path), tmp_path / "f"
    if encoder == "bert":
        (data / "data" / "102.txt").write_text("zzz\n")  # the only text with a 'z'
        z = T.AutoTokenizer.from_pretrained(tiny_models["bert"]).convert_tokens_to_ids("z")
        _scale_rows(T.BertModel, lambda kw: (kw["input_ids"] == z).any(1), monkeypatch)
        modality, fix = "text", "--precision fp32" if precision != "fp32" else "--layer"
    else:
        Image.new("RGB", (40, 40), (128, 128, 128)).save(data / "data" / "102.jpg", "JPEG")
        flat = lambda kw: kw["pixel_values"].flatten(1).std(1) < 1e-3  # noqa: E731
        _scale_rows(T.ViTModel, flat, monkeypatch)
        modality, fix = "image", "--layer"
    result = run_extract(data, out, encoder, tiny_models[encoder], "--precision", precision)
    assert result.exit_code == 0, result.output
    assert f"failed 102 ({modality}-encode)" in result.stderr and fix in result.stderr
    store = FeatureStore.open(cache_path(out, "lab5-mini", encoder))
    bad = store.guid.tolist().index("102")
    assert store.status[bad] == FAILED and (np.delete(store.status, bad) == OK).all()
    [(guid, stage, why)] = [e for e in store.errors if e[0] == "102"]
    assert stage == f"{modality}-encode" and "float16" in why and fix in why
    feats = getattr(store, modality)
    for a in (feats.tokens, *feats.pooled.values()):
        assert np.isfinite(a).all() and not a[bad].any()  # nothing of it was written


def test_every_sample_failing_is_one_error_and_no_cache(tiny_models, tmp_path):
    """A checkpoint whose activations overflow float16 (its last LayerNorm scaled up)."""
    import transformers as T

    model = tmp_path / "bert-huge"
    bert = T.BertModel.from_pretrained(tiny_models["bert"])
    with torch.no_grad():
        bert.encoder.layer[-1].output.LayerNorm.weight.mul_(1e6)
    bert.save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models["bert"] / name, model)
    data, out = small(tmp_path), tmp_path / "f"
    line = one_error(run_extract(data, out, "bert", model), code=1)
    assert "every one of the 8 samples failed" in line and "float16" in line and "--layer" in line
    final = cache_path(out, "lab5-mini", "bert")
    assert not final.exists() and not parts_dir(final).exists()
    no_stray_files(out)


def test_a_dataset_whose_every_sample_is_bad_is_one_error(tiny_models, tmp_path):
    data, out = small(tmp_path), tmp_path / "f"
    for jpg in (data / "data").glob("*.jpg"):
        jpg.write_bytes(b"")
    line = one_error(run_extract(data, out, "vit", tiny_models["vit"]), code=1)
    assert "every one of the 8 samples failed" in line and "0 bytes" in line
    assert "data check" in line
    assert not cache_path(out, "lab5-mini", "vit").exists()


# ---------------------------------------------------------------- 7. file-system faults


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a model starts loading: the check must come before it."""
    import transformers as T

    def refuse(*args, **kw):
        raise AssertionError("the model loaded before the output location was checked")

    monkeypatch.setattr(T.AutoModel, "from_pretrained", refuse)


def read_only(monkeypatch, folder: Path) -> None:
    """Every create / open-for-writing / mkdir under `folder` fails with EROFS, as on a
    read-only mount (root ignores chmod, so a test cannot rely on permissions)."""
    folder = folder.resolve()
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path) -> bool:
        p = Path(os.fsdecode(path)).absolute()
        return p == folder or folder in p.parents

    def guarded_open(path, flags, *args, **kw):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return real_open(path, flags, *args, **kw)

    def guarded_mkdir(path, *args, **kw):
        if inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return real_mkdir(path, *args, **kw)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def test_out_that_is_a_file_is_one_line_before_the_model_loads(
    tiny_models, tmp_path, no_model_load
):
    data, out = small(tmp_path), tmp_path / "features"
    out.write_text("not a folder\n")
    line = one_error(run_extract(data, out, "bert", tiny_models["bert"]))
    assert str(out) in line and "not a folder" in line and "--out" in line
    assert out.read_text() == "not a folder\n"


@pytest.mark.parametrize("exists", [True, False])
def test_read_only_out_is_one_line_before_the_model_loads(
    tiny_models, tmp_path, monkeypatch, no_model_load, exists
):
    data, out = small(tmp_path), tmp_path / "ro"
    out.mkdir()
    if exists:
        (out / "lab5-mini").mkdir()
    read_only(monkeypatch, out)
    line = one_error(run_extract(data, out, "bert", tiny_models["bert"]))
    assert str(out) in line and "Read-only file system" in line and "--out" in line


def test_disk_full_while_journalling_is_one_line_and_the_rerun_resumes(
    tiny_models, tmp_path, monkeypatch
):
    data, out = small(tmp_path), tmp_path / "f"
    final = cache_path(out, "lab5-mini", "bert")
    save, saved = Journal.save, []

    def save_until_full(self, modality, batch, *args, **kw):
        if len(saved) == 2:
            where = self.folder / f"{modality}-{batch:06d}.npz"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
        saved.append(batch)
        return save(self, modality, batch, *args, **kw)

    monkeypatch.setattr(Journal, "save", save_until_full)
    line = one_error(
        run_extract(data, out, "bert", tiny_models["bert"], "--batch-size", "2"), code=1
    )
    assert str(parts_dir(final)) in line and "No space left on device" in line
    assert "free space" in line and "rerun the same command" in line
    assert len(list(parts_dir(final).glob("*.npz"))) == 2 and not final.exists()
    no_stray_files(out)
    monkeypatch.undo()
    stdout = ok(run_extract(data, out, "bert", tiny_models["bert"], "--batch-size", "2"))
    assert "computed 4 rows, reused 4 from an earlier run" in stdout


def test_disk_full_during_assembly_keeps_the_journal_and_no_partial_file(
    tiny_models, tmp_path, monkeypatch
):
    data, out = small(tmp_path), tmp_path / "f"
    final = cache_path(out, "lab5-mini", "clip")

    def full(self, *args, **kw):  # what h5py raises: no errno attribute, errno in the text
        raise OSError(
            "Can't synchronously write data (file write failed: time = now, filename = "
            f"'{temp_path(final)}', errno = 28, error message = 'No space left on device')"
        )

    monkeypatch.setattr(CacheWriter, "write", full)
    line = one_error(run_extract(data, out, "clip", tiny_models["clip"]), code=1)
    assert "No space left on device" in line and "free space" in line and "rerun" in line
    assert not final.exists() and not temp_path(final).exists()
    assert parts_dir(final).is_dir()
    no_stray_files(out)
    monkeypatch.undo()
    stdout = ok(run_extract(data, out, "clip", tiny_models["clip"]))
    assert "computed 0 rows, reused 16 from an earlier run" in stdout
    assert FeatureStore.open(final).ok().all()


def test_a_300_character_guid_fails_that_sample_only(tiny_models, tmp_path):
    data, out = small(tmp_path), tmp_path / "f"
    long = "g" * 300  # data/<guid>.txt is longer than a file name may be (ENAMETOOLONG)
    (data / "train.txt").write_text((data / "train.txt").read_text() + f"{long},positive\n")
    result = run_extract(data, out, "bert", tiny_models["bert"])
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(cache_path(out, "lab5-mini", "bert"))
    row = store.guid.tolist().index(long)
    assert store.status[row] == FAILED and (np.delete(store.status, row) == OK).all()
    assert any(e[0] == long for e in store.errors)


def test_ctrl_c_midway_is_one_line_keeps_the_journal_and_the_rerun_resumes(
    tiny_models, tmp_path, monkeypatch
):
    data, out = small(tmp_path), tmp_path / "f"
    final = cache_path(out, "lab5-mini", "clip")
    encode, calls = encoders.ClipEncoder.encode_image, []

    def interrupted(self, pixels):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(self, pixels)

    monkeypatch.setattr(encoders.ClipEncoder, "encode_image", interrupted)
    result = run_extract(
        data, out, "clip", tiny_models["clip"], "--batch-size", "4", "--workers", "1"
    )
    line = one_error(result, code=130)
    assert "interrupted" in line and str(parts_dir(final)) in line and "rerun" in line
    assert len(list(parts_dir(final).glob("*.npz"))) == 3  # 2 text batches + 1 image batch
    no_stray_files(out)
    monkeypatch.undo()
    stdout = ok(run_extract(data, out, "clip", tiny_models["clip"], "--batch-size", "4"))
    assert "computed 4 rows, reused 12 from an earlier run" in stdout


# ---------------------------------------------------------------- options and model folders


def test_limit_beyond_the_dataset_is_the_whole_dataset(tiny_models, tmp_path):
    data, out = small(tmp_path), tmp_path / "f"
    assert "8 rows" in ok(run_extract(data, out, "bert", tiny_models["bert"], "--limit", "1000"))
    assert FeatureStore.open(cache_path(out, "lab5-mini", "bert")).config["limit"] is None
    assert "up to date" in ok(run_extract(data, out, "bert", tiny_models["bert"]))


def test_a_larger_limit_replaces_with_overwrite_computing_only_the_new_rows(tiny_models, tmp_path):
    data, out = small(tmp_path), tmp_path / "f"
    ok(run_extract(data, out, "bert", tiny_models["bert"], "--limit", "3"))
    line = one_error(run_extract(data, out, "bert", tiny_models["bert"]))
    assert "--limit 3, now none" in line and "--overwrite" in line
    stdout = ok(run_extract(data, out, "bert", tiny_models["bert"], "--overwrite"))
    assert "replaced" in stdout
    assert "computed 5 rows, reused 3 unchanged rows from the old cache" in stdout
    assert len(FeatureStore.open(cache_path(out, "lab5-mini", "bert"))) == 8


def test_layer_out_of_range_is_refused_before_any_work(tiny_models, tmp_path):
    data, out = small(tmp_path), tmp_path / "f"
    line = one_error(run_extract(data, out, "bert", tiny_models["bert"], "--layer", "9"), code=2)
    assert "--layer 9" in line and "0..2" in line
    assert not parts_dir(cache_path(out, "lab5-mini", "bert")).exists()
    no_stray_files(out)


@pytest.mark.parametrize(
    "yaml_text,phrase",
    [
        ("kind: text\nmodel: m\npoolnig: mean\n", "unknown key 'poolnig'"),
        ("kind: text\nmodel: m\n  pooling: [\n", "not valid YAML"),
        ("kind: text\nmodel: m\npooling: max\n", "'pooling' must be"),
        ("kind: txt\nmodel: m\n", "'kind' must be"),
        ("- kind\n- text\n", "mapping"),
    ],
    ids=["unknown-key", "bad-syntax", "bad-pooling", "bad-kind", "not-a-mapping"],
)
def test_a_broken_encoder_yaml_is_one_line_naming_the_file(
    tmp_path, monkeypatch, yaml_text, phrase
):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "mine.yaml").write_text(yaml_text)
    monkeypatch.setattr(encoders, "CONFIG_DIR", configs)
    line = one_error(run_extract(small(tmp_path), tmp_path / "f", "mine", None), code=2)
    assert str(configs / "mine.yaml") in line and phrase in line


def test_an_encoder_name_cannot_reach_a_yaml_outside_configs_encoders(tmp_path):
    line = one_error(run_extract(small(tmp_path), tmp_path / "f", "../heads/late", None), code=2)
    assert "unknown encoder '../heads/late'" in line and "minilm" in line


def _incomplete_folder(tiny_models, tmp_path, kind: str) -> tuple[str, Path, str]:
    """(encoder, model folder, phrase the error must contain)."""
    folder = tmp_path / kind
    if kind == "no-tokenizer":  # transformers 5 "loads" it: a vocabulary of special tokens
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(tiny_models["bert"] / name, folder)
        return "bert", folder, "no tokenizer vocabulary"
    if kind == "clip-no-tokenizer":
        folder.mkdir()
        for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
            shutil.copy(tiny_models["clip"] / name, folder)
        return "clip", folder, "no tokenizer vocabulary"
    if kind == "no-config":
        shutil.copytree(tiny_models["bert"], folder)
        (folder / "config.json").unlink()
        return "bert", folder, "no config.json"
    shutil.copytree(tiny_models["bert"], folder)  # truncated weights
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return "bert", folder, "damaged"


@pytest.mark.parametrize("kind", ["no-tokenizer", "clip-no-tokenizer", "no-config", "truncated"])
def test_a_model_folder_missing_or_damaging_files_is_one_line(tiny_models, tmp_path, kind):
    encoder, folder, phrase = _incomplete_folder(tiny_models, tmp_path, kind)
    out = tmp_path / "f"
    line = one_error(run_extract(small(tmp_path), out, encoder, folder), code=2)
    assert str(folder) in line and phrase in line
    assert not cache_path(out, "lab5-mini", encoder).exists()
    no_stray_files(out)


def test_hf_path_that_does_not_exist_says_so(tmp_path):
    line = one_error(
        run_extract(small(tmp_path), tmp_path / "f", f"hf:{tmp_path}/nope", None), code=2
    )
    assert f"{tmp_path}/nope" in line and "does not exist" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_refused_before_anything_is_written(tiny_models, tmp_path):
    out = tmp_path / "f"
    line = one_error(
        run_extract(small(tmp_path), out, "bert", tiny_models["bert"], "--device", "cuda"), code=2
    )
    assert "--device cpu" in line
    assert not out.exists()  # no folder, no lock: checked before the output is touched


@pytest.mark.parametrize("device", ["cuda:3", "cuda:x"])
def test_a_gpu_index_the_machine_lacks_is_one_line(tiny_models, tmp_path, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, as torch sees it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "f"
    line = one_error(
        run_extract(small(tmp_path), out, "bert", tiny_models["bert"], "--device", device), code=2
    )
    assert f"--device {device}" in line or f"--device '{device}'" in line
    assert not out.exists()
