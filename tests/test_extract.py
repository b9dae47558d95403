"""Stage one end to end: tiny ViT / BERT / CLIP checkpoints through `extract` (docs/architecture.md §4),
the cache format v1 (§5), bad samples reported by guid, stale / incomplete caches refused,
and one writer per cache (§10). The CLI is driven with CliRunner; numbers are checked
against a direct forward of the same checkpoint through plain transformers."""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fusebench.cache import (
    FAILED,
    OK,
    FeatureStore,
    FingerprintMismatchError,
    IncompleteCacheError,
    exclusive_lock,
    fingerprint,
    parts_dir,
    temp_path,
)
from fusebench.extract.datasets import LABELS, load_dataset
from fusebench.extract.encoders import create_encoder, list_encoders
from fusebench.extract.loop import cache_path, extract, plan_batches
from fusebench.extract.verify import current_config, rebuild_encoder
from PIL import Image
from typer.testing import Result

from tests.conftest import cli, make_lab5, write_image

# "Equal to float16 precision": a few float16 ulps at |x| ~ 1 (what verify also allows).
ATOL, RTOL = 2e-3, 4e-3
MAX_LENGTH = {"bert": 128, "clip": 77}  # configs/encoders/*.yaml
D, PROJ, IMAGE_TOKENS = 32, 16, 17  # tiny dims: hidden 32, CLIP projection 16, 16 patches + CLS


def run_extract(data: Path, out: Path, encoder: str, model: Path | None, *extra: object) -> Result:
    args: list[object] = ["extract", "--encoder", encoder, "--data", data, "--out", out, "--quiet"]
    if model is not None:
        args += ["--model", model]
    return cli(*args, *extra)


def error_lines(result: Result) -> list[str]:
    """Non-empty lines a failed command printed (progress-bar redraws would count too)."""
    return [line for line in result.output.replace("\r", "\n").splitlines() if line.strip()]


def f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def assert_f16_close(stored: np.ndarray, direct: torch.Tensor | np.ndarray, what: str) -> None:
    direct = direct.detach().float().numpy() if isinstance(direct, torch.Tensor) else direct
    np.testing.assert_allclose(f32(stored), f32(direct), atol=ATOL, rtol=RTOL, err_msg=what)


# ---------------------------------------------------------------- direct forwards (no fusebench)


@functools.cache
def hf_text(path: Path, kind: str):
    """(tokenizer, model) loaded straight from the folder with plain transformers."""
    import transformers as T

    model = T.CLIPModel if kind == "clip" else T.AutoModel
    return T.AutoTokenizer.from_pretrained(path), model.from_pretrained(path).eval()


def token_lengths(path: Path, kind: str, texts: list[str]) -> list[int]:
    tok, _ = hf_text(path, kind)
    return [
        len(ids) for ids in tok(texts, truncation=True, max_length=MAX_LENGTH[kind])["input_ids"]
    ]


@torch.no_grad()
def direct_text(path: Path, kind: str, text: str, **kw):
    """One sample alone: no batching, no sorting, no padding."""
    tok, model = hf_text(path, kind)
    enc = tok([text], truncation=True, max_length=MAX_LENGTH[kind], return_tensors="pt")
    if kind == "clip":
        return model.text_model(**enc, **kw)
    return model(**enc, **kw)


# ---------------------------------------------------------------- corpora

GOOD_TEXT = "a good day number {}\n"
BAD_CORPUS_TRAIN = [  # (guid, tag), train.txt order
    ("200", "positive"),
    ("201", "negative"),
    ("301", "neutral"),  # missing image
    ("302", "positive"),  # zero-byte image
    ("303", "negative"),  # truncated JPEG (only decoding finds it)
    ("304", "neutral"),  # a .jpg that is really text
    ("305", "positive"),  # empty text
    ("306", "happy"),  # unknown label
    ("200", "negative"),  # duplicate guid (second row of 200)
    ("307", "positive"),  # no files at all
    ("308", "neutral"),  # cp1252 text: a note, the sample stays ok
    ("202", "positive"),
]
BAD_CORPUS_TEST = [("400", "null"), ("401", "null")]
# row index -> (guid, phrase its reason must contain); row 8 is the duplicate 200
BAD_ROWS = {
    2: ("301", "not found"),
    3: ("302", "0 bytes"),
    4: ("303", "truncated"),
    5: ("304", "not an image"),
    6: ("305", "is empty"),
    7: ("306", "unknown label"),
    8: ("200", "duplicate guid"),
    9: ("307", "no data/307.txt or data/307.jpg"),
}
NOTE_ROW = (10, "308", "not UTF-8")
IMAGE_ONLY_BAD = {2, 3, 4, 5}  # a text-only encoder must not fail these


def make_bad_lab5(root: Path) -> Path:
    """A lab5 corpus with one sample of every kind of problem among good ones."""
    data = root / "data"
    data.mkdir(parents=True)
    guids = {g for g, _ in BAD_CORPUS_TRAIN + BAD_CORPUS_TEST} - {"307"}
    for seed, guid in enumerate(sorted(guids)):
        (data / f"{guid}.txt").write_text(GOOD_TEXT.format(seed))
        write_image(data / f"{guid}.jpg", seed=seed)
    (data / "301.jpg").unlink()
    (data / "302.jpg").write_bytes(b"")
    write_image(data / "303.jpg", seed=99, size=(64, 64))  # noise: half of it is still truncated
    jpeg = (data / "303.jpg").read_bytes()
    (data / "303.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (data / "304.jpg").write_text("hello, I am not a picture\n")
    (data / "305.txt").write_text("  \n\t\n")
    (data / "308.txt").write_bytes(b"caf\xe9 \x93quoted\x94\r\n")
    for name, rows in (
        ("train.txt", BAD_CORPUS_TRAIN),
        ("test_without_label.txt", BAD_CORPUS_TEST),
    ):
        (root / name).write_text("guid,tag\n" + "".join(f"{g},{t}\n" for g, t in rows))
    return root


@pytest.fixture(scope="module")
def bad_clip(tmp_path_factory, tiny_models):
    """The bad corpus extracted once with clip (default --on-error skip)."""
    root = tmp_path_factory.mktemp("bad")
    data = make_bad_lab5(root / "bad-lab5")
    result = run_extract(data, root / "features", "clip", tiny_models["clip"], "--workers", "0")
    return data, cache_path(root / "features", "bad-lab5", "clip"), result


# ---------------------------------------------------------------- b. shapes and format


@pytest.mark.parametrize("name", ["vit", "bert", "clip"])
def test_tiny_checkpoint_through_cli_writes_design_shapes_and_attrs(
    name, tiny_models, lab5, tmp_path
):
    path = tiny_models[name]
    out = tmp_path / "features"
    result = run_extract(lab5, out, name, path)  # default --workers: real DataLoader workers
    assert result.exit_code == 0, result.output
    final = cache_path(out, "lab5-mini", name)
    assert final == out / "lab5-mini" / f"{name}.h5" and final.exists()
    assert f"wrote {final}: 30 rows, 30 ok, 0 failed" in result.stdout

    ds = load_dataset(lab5)
    n = len(ds.samples)
    store = FeatureStore.open(final, manifest=ds.manifest())

    # rows in dataset order: train.txt rows, then test_without_label.txt rows
    assert store.guid.tolist() == [str(100 + i) for i in range(30)]
    assert store.split.tolist() == ["train"] * 24 + ["test"] * 6
    assert store.label.dtype == np.int8
    assert store.label.tolist() == [i % 3 for i in range(24)] + [-1] * 6
    assert store.classes == list(LABELS)
    assert (store.status == OK).all()

    with h5py.File(final, "r") as f:
        a = f.attrs
        assert a["fusebench_format"] == 1
        assert a["encoder"] == name
        assert a["model"] == str(path)
        assert a["weights"] == "pretrained"
        assert bool(a["complete"]) is True
        config = json.loads(a["config"])
        assert config["encoder"] == name and config["model"] == str(path)
        assert a["model_revision"] and a["model_revision"] == config["model_revision"]
        assert a["fingerprint"] == fingerprint(config, ds.manifest())
        created = dt.datetime.fromisoformat(a["created"])
        assert abs(dt.datetime.now(dt.timezone.utc) - created) < dt.timedelta(minutes=10)
        versions = json.loads(a["versions"])
        assert versions["torch"] == torch.__version__
        assert {"transformers", "fusebench"} <= set(versions)
        groups = {g for g in ("text", "image") if g in f}
        dtypes = {k: f[k].dtype for g in groups for k in (f"{g}/{d}" for d in f[g])}
    assert groups == {"vit": {"image"}, "bert": {"text"}, "clip": {"text", "image"}}[name]
    for key, dtype in dtypes.items():
        assert dtype == (np.bool_ if key.endswith("mask") else np.float16), key

    if "image" in groups:
        img = store.image
        assert img.tokens.shape == (n, IMAGE_TOKENS, D)
        assert img.pooled["pooled"].shape == (n, PROJ if name == "clip" else D)
    if "text" in groups:
        txt = store.text
        lengths = token_lengths(path, name, [s.text for s in ds.samples])
        length = max(lengths)
        assert length <= MAX_LENGTH[name]
        assert txt.tokens.shape == (n, length, D)
        assert txt.mask.shape == (n, length)
        # mask: a prefix of exactly the sample's token count; padded positions exactly 0
        expected_mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
        np.testing.assert_array_equal(txt.mask, expected_mask)
        assert not txt.tokens[~txt.mask].any()
        assert txt.tokens[txt.mask].any(axis=-1).all()
        assert txt.pooled["pooled"].shape == (n, PROJ if name == "clip" else D)

    if name == "vit":  # pooled = CLS token
        np.testing.assert_array_equal(store.image.pooled["pooled"], store.image.tokens[:, 0])
        assert store.image.pooling["pooled"] == "cls"
    if name == "bert":  # pooled = CLS, pooled_mean = masked mean
        txt = store.text
        np.testing.assert_array_equal(txt.pooled["pooled"], txt.tokens[:, 0])
        m = txt.mask[..., None]
        mean = (f32(txt.tokens) * m).sum(1) / m.sum(1)
        assert_f16_close(txt.pooled["pooled_mean"], mean, "pooled_mean")
        assert txt.pooling == {"pooled": "cls", "pooled_mean": "mean"}
    if name == "clip":
        assert_clip_matches_model_embeds(path, ds, store)


@torch.no_grad()
def assert_clip_matches_model_embeds(path: Path, ds, store: FeatureStore) -> None:
    """Cached pooled = CLIPModel's own text_embeds / image_embeds; tokens = its towers' states."""
    import transformers as T

    tok, model = hf_text(path, "clip")
    processor = T.AutoImageProcessor.from_pretrained(path)
    assert store.text.pooling["pooled"] == "text_embeds"
    assert store.image.pooling["pooled"] == "image_embeds"
    for r in (0, 13, 29):
        s = ds.samples[r]
        ids = tok([s.text], truncation=True, max_length=77, return_tensors="pt")
        with Image.open(s.image_path) as im:
            pixels = processor(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"]
        out = model(**ids, pixel_values=pixels)
        assert_f16_close(
            store.text.pooled["pooled"][r], out.text_embeds[0], f"text_embeds {s.guid}"
        )
        assert_f16_close(
            store.image.pooled["pooled"][r], out.image_embeds[0], f"image_embeds {s.guid}"
        )
        n = ids["input_ids"].shape[1]
        assert_f16_close(
            store.text.tokens[r, :n], out.text_model_output.last_hidden_state[0], "text tokens"
        )
        assert_f16_close(
            store.image.tokens[r], out.vision_model_output.last_hidden_state[0], "image tokens"
        )


# ---------------------------------------------------------------- c. batching changes nothing


@pytest.mark.parametrize("name", ["bert", "clip"])
def test_batched_sorted_padded_rows_equal_single_sample_forward(name, tiny_models, lab5, tmp_path):
    path = tiny_models[name]
    report = extract(
        lab5, name, out=tmp_path / "f", model=str(path), batch_size=4, num_workers=0, quiet=True
    )
    ds = load_dataset(lab5)
    texts = [s.text for s in ds.samples]
    lengths = token_lengths(path, name, texts)
    assert len(set(lengths)) > 5  # varied lengths: batches of 4 really pad

    store = FeatureStore.open(report.path)
    for r, (text, length) in enumerate(zip(texts, lengths)):
        out = direct_text(path, name, text)
        hidden = out.last_hidden_state[0]  # (L, D)
        assert store.text.mask[r].sum() == length
        assert_f16_close(store.text.tokens[r, :length], hidden, f"row {r} tokens")
        assert not store.text.tokens[r, length:].any()
        if name == "bert":
            assert_f16_close(store.text.pooled["pooled"][r], hidden[0], f"row {r} cls")
            assert_f16_close(store.text.pooled["pooled_mean"][r], hidden.mean(0), f"row {r} mean")

    # Sorted by token length: batches pad to little more than their own longest (docs/architecture.md §9),
    # where dataset-order batches of the same size would pad far more.
    assert report.real_tokens == sum(lengths)
    in_order = sum(len(b) * max(b) for b in (lengths[i : i + 4] for i in range(0, len(lengths), 4)))
    assert in_order > 1.4 * report.real_tokens  # the corpus makes unsorted batching costly
    assert report.computed_tokens <= 1.15 * report.real_tokens
    enc = create_encoder(name, model=str(path), device="cpu")
    good = {m: list(range(len(texts))) for m in enc.modalities}
    plan = plan_batches(enc, ds.samples, good, batch_size=4)
    planned = [lengths[r] for batch in plan.text_batches for r in batch]
    assert planned == sorted(lengths)


# ---------------------------------------------------------------- e. bad samples


def test_bad_samples_are_reported_by_guid_in_error_log_and_skipped(bad_clip):
    data, final, result = bad_clip
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(final)
    assert store.guid.tolist() == [g for g, _ in BAD_CORPUS_TRAIN + BAD_CORPUS_TEST]

    bad = set(BAD_ROWS)
    expected = [FAILED if r in bad else OK for r in range(len(store))]
    assert store.status.tolist() == expected
    assert f"{len(store) - len(bad)} ok, {len(bad)} failed" in result.stdout

    for guid, phrase in BAD_ROWS.values():
        hits = [e for e in store.errors if e[0] == guid and phrase in e[2]]
        assert hits, f"no error-log entry for {guid} mentioning {phrase!r}: {store.errors}"
        assert not hits[0][1].endswith("-note")
        assert re.search(rf"failed {guid} \(\w[\w-]*\): .*{re.escape(phrase)}", result.stderr), guid
    _, guid, phrase = NOTE_ROW
    assert [e[1] for e in store.errors if e[0] == guid] == ["text-note"]
    assert phrase in next(e[2] for e in store.errors if e[0] == guid)
    # the good rows hold real features in both modalities; failed ones nothing
    good = store.status == OK
    assert (
        store.text.mask[good].any(axis=1).all() and store.image.tokens[good].any(axis=(1, 2)).all()
    )
    assert not store.image.tokens[~good].any() and not store.image.pooled["pooled"][~good].any()


def test_data_check_reports_every_bad_sample(bad_clip):
    data, _, _ = bad_clip
    result = cli("data", "check", "--data", data)
    assert result.exit_code in (0, 1), result.output  # a report, not a crash
    for guid, phrase in [*BAD_ROWS.values(), NOTE_ROW[1:]]:
        assert re.search(rf"^\s+{guid}\s+\w+\s+.*{re.escape(phrase)}", result.stdout, re.M), guid
    for good in ("201", "202", "400", "401"):
        assert not re.search(rf"^\s+{good}\s", result.stdout, re.M)
    assert "14 samples, 8 with fatal problems" in result.stdout


def test_bad_samples_fail_only_the_modalities_an_encoder_reads(tiny_models, tmp_path):
    data = make_bad_lab5(tmp_path / "bad-lab5")
    result = run_extract(data, tmp_path / "f", "bert", tiny_models["bert"])
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(cache_path(tmp_path / "f", "bad-lab5", "bert"))
    expected = [FAILED if r in set(BAD_ROWS) - IMAGE_ONLY_BAD else OK for r in range(len(store))]
    assert store.status.tolist() == expected
    assert not {e[0] for e in store.errors} & {BAD_ROWS[r][0] for r in IMAGE_ONLY_BAD}


def test_on_error_fail_stops_with_one_line_naming_the_first_bad_sample(tiny_models, tmp_path):
    data = make_bad_lab5(tmp_path / "bad-lab5")
    result = run_extract(data, tmp_path / "f", "clip", tiny_models["clip"], "--on-error", "fail")
    assert result.exit_code != 0
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert "301" in lines[0] and "not found" in lines[0] and "Traceback" not in lines[0]
    final = cache_path(tmp_path / "f", "bad-lab5", "clip")
    assert not final.exists()


def test_on_error_fail_on_an_image_only_decoding_finds(tiny_models, tmp_path):
    data = make_lab5(tmp_path / "lab5-mini", n_train=8, n_test=2)
    jpeg = (data / "data" / "105.jpg").read_bytes()
    (data / "data" / "105.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    result = run_extract(data, tmp_path / "f", "vit", tiny_models["vit"], "--on-error", "fail")
    assert result.exit_code != 0
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert "105" in lines[0] and "truncated" in lines[0]
    final = cache_path(tmp_path / "f", "lab5-mini", "vit")
    # fail mode decodes every image before computing anything: no work, no partial file
    assert not final.exists() and not parts_dir(final).exists() and not temp_path(final).exists()
    with pytest.raises(FileNotFoundError):
        FeatureStore.open(final)


def test_cache_info_lists_encoder_rows_shapes_status_and_error_log(bad_clip):
    _, final, _ = bad_clip
    result = cli("cache", "info", final)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert re.search(r"encoder\s+clip\b", out)
    assert re.search(r"rows\s+14\b", out)
    assert re.search(r"\b6 ok, 8 failed\b", out)
    length = FeatureStore.open(final).text.mask.shape[1]
    assert re.search(rf"text/tokens\s+\[14, {length}, 32\]\s+float16", out)
    assert re.search(rf"text/mask\s+\[14, {length}\]\s+bool", out)
    assert re.search(r"image/tokens\s+\[14, 17, 32\]\s+float16", out)
    assert re.search(r"image/pooled\s+\[14, 16\]", out)
    for guid, phrase in BAD_ROWS.values():
        assert re.search(rf"^\s+{guid}\s+\S+\s+.*{re.escape(phrase)}", out, re.M), guid


# ---------------------------------------------------------------- f. refusing stale caches


@pytest.fixture
def bert_cache(tiny_models, lab5, tmp_path):
    """A finished bert cache on a copy of the tiny checkpoint (tests may re-save it)."""
    model = Path(shutil.copytree(tiny_models["bert"], tmp_path / "bert-model"))
    out = tmp_path / "features"
    result = run_extract(lab5, out, "bert", model)
    assert result.exit_code == 0, result.output
    return lab5, model, out, cache_path(out, "lab5-mini", "bert")


def test_incomplete_cache_is_refused(bert_cache):
    data, _, _, final = bert_cache
    FeatureStore.open(final)  # finished: fine

    final.rename(temp_path(final))  # a run that never reached the final rename
    with pytest.raises(IncompleteCacheError, match="not finished|incomplete"):
        FeatureStore.open(final)
    result = cli("cache", "verify", final)
    assert result.exit_code != 0 and len(error_lines(result)) == 1, result.output
    assert "not finished" in result.output or "incomplete" in result.output

    temp_path(final).unlink()
    parts_dir(final).mkdir()  # only the journal of finished batches is left
    with pytest.raises(IncompleteCacheError, match="not finished|incomplete"):
        FeatureStore.open(final)
    parts_dir(final).rmdir()

    result = run_extract(data, final.parents[1], "bert", bert_cache[1])
    assert result.exit_code == 0, result.output
    with h5py.File(final, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(IncompleteCacheError, match="incomplete"):
        FeatureStore.open(final)


def test_cache_refused_when_data_changed_naming_the_guid(bert_cache):
    data, _, _, final = bert_cache
    FeatureStore.open(final, manifest=load_dataset(data).manifest())  # same data: fine
    (data / "data" / "107.txt").write_text("an edited text\n")
    with pytest.raises(FingerprintMismatchError, match=r"\b107\b"):
        FeatureStore.open(final, manifest=load_dataset(data).manifest())


def test_cache_refused_when_model_changed_naming_the_revision(bert_cache):
    import transformers as T

    _, model, _, final = bert_cache
    stored = FeatureStore.open(final).config
    FeatureStore.open(final, config=current_config(rebuild_encoder(stored, "cpu"), stored))

    with torch.random.fork_rng():
        torch.manual_seed(1)
        T.BertModel(T.BertConfig.from_pretrained(model)).save_pretrained(model)  # other weights
    with pytest.raises(FingerprintMismatchError, match="model_revision"):
        FeatureStore.open(final, config=current_config(rebuild_encoder(stored, "cpu"), stored))
    result = cli("cache", "verify", final, "--device", "cpu")
    assert result.exit_code != 0 and "model_revision" in result.output


def test_cache_verify_cli_passes_then_fails_after_a_data_edit(bert_cache):
    data, _, _, final = bert_cache
    result = cli("cache", "verify", final, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "complete, 30 rows (30 ok, 0 failed)" in result.stdout
    assert "fingerprint matches" in result.stdout and "recomputed 4 rows" in result.stdout

    (data / "data" / "111.txt").write_text("edited after extraction\n")
    result = cli("cache", "verify", final, "--device", "cpu")
    assert result.exit_code != 0
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert "111" in lines[0]


def test_rerun_is_up_to_date_and_other_settings_need_overwrite(bert_cache):
    data, model, out, final = bert_cache
    with h5py.File(final, "r") as f:
        created = f.attrs["created"]

    result = run_extract(data, out, "bert", model)
    assert result.exit_code == 0, result.output
    assert "up to date" in result.stdout
    assert FeatureStore.open(final).attrs["created"] == created  # not rewritten

    result = run_extract(data, out, "bert", model, "--batch-size", "8")
    assert result.exit_code != 0
    assert "--overwrite" in result.output and "--batch-size 32, now 8" in result.output
    assert FeatureStore.open(final).config["batch_size"] == 32  # untouched

    result = run_extract(data, out, "bert", model, "--batch-size", "8", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout
    assert FeatureStore.open(final).config["batch_size"] == 8


# ---------------------------------------------------------------- g. one writer per cache


def test_second_writer_refuses_while_the_first_holds_the_lock(tiny_models, lab5, tmp_path):
    out = tmp_path / "features"
    final = cache_path(out, "lab5-mini", "bert")
    with exclusive_lock(final):  # the first writer, mid-run
        result = run_extract(lab5, out, "bert", tiny_models["bert"])
        assert result.exit_code != 0
        lines = error_lines(result)
        assert len(lines) == 1, lines
        assert "another" in lines[0] and "process" in lines[0]
        assert not final.exists()
    result = run_extract(lab5, out, "bert", tiny_models["bert"])
    assert result.exit_code == 0, result.output
    assert FeatureStore.open(final).ok().all()


# ---------------------------------------------------------------- registry and options


def test_hf_path_encoder_works_on_the_tiny_bert_folder(tiny_models, lab5, tmp_path):
    path = tiny_models["bert"]
    out = tmp_path / "features"
    result = run_extract(lab5, out, f"hf:{path}", None)
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(cache_path(out, "lab5-mini", f"hf:{path}"))
    assert store.encoder == f"hf:{path}" and store.image is None
    lengths = token_lengths(path, "bert", [s.text for s in load_dataset(lab5).samples])
    assert store.text.tokens.shape == (30, max(lengths), D)
    assert (store.status == OK).all()
    out0 = direct_text(path, "bert", load_dataset(lab5).samples[0].text)
    assert_f16_close(store.text.tokens[0, : lengths[0]], out0.last_hidden_state[0], "hf: tokens")


def test_layer_option_stores_that_hidden_layer(tiny_models, lab5, tmp_path):
    path = tiny_models["bert"]
    assert run_extract(lab5, tmp_path / "last", "bert", path).exit_code == 0
    result = run_extract(lab5, tmp_path / "l1", "bert", path, "--layer", "1")
    assert result.exit_code == 0, result.output
    last = FeatureStore.open(cache_path(tmp_path / "last", "lab5-mini", "bert"))
    layer1 = FeatureStore.open(cache_path(tmp_path / "l1", "lab5-mini", "bert", 1))
    assert layer1.path.name == "bert-l1.h5"  # another layer, another cache: stage two's bert-l1
    assert layer1.config["layer"] == 1 and last.config["layer"] is None
    assert not np.allclose(f32(layer1.text.tokens), f32(last.text.tokens), atol=ATOL, rtol=RTOL)
    text = load_dataset(lab5).samples[3].text
    out = direct_text(path, "bert", text, output_hidden_states=True)  # 0 = embeddings
    n = out.hidden_states[1].shape[1]
    assert_f16_close(layer1.text.tokens[3, :n], out.hidden_states[1][0], "layer 1")


def test_unknown_encoder_exits_2_listing_valid_names(lab5, tmp_path):
    result = run_extract(lab5, tmp_path / "f", "nosuch", None)
    assert result.exit_code == 2
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert "nosuch" in lines[0]
    for name in [*list_encoders(), "hf:"]:
        assert name in lines[0]
    assert {"vit", "bert", "clip", "minilm"} <= set(list_encoders())


def test_precision_bf16_autocast_is_recorded_and_changes_only_the_low_bits(
    tiny_models, lab5, tmp_path
):
    stores = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        rep = extract(
            lab5,
            "bert",
            model=str(tiny_models["bert"]),
            out=out,
            precision=precision,
            device="cpu",
            quiet=True,
            num_workers=0,
        )
        stores[precision] = FeatureStore.open(rep.path)
    assert stores["fp32"].config["precision"] == "fp32"
    assert stores["bf16"].config["precision"] == "bf16-autocast"
    a = stores["fp32"].text.tokens.astype(np.float32)
    b = stores["bf16"].text.tokens.astype(np.float32)
    assert not np.array_equal(a, b)  # the autocast really ran
    np.testing.assert_allclose(a, b, atol=0.15)  # bf16 keeps ~3 significant digits
    assert cli("cache", "verify", stores["bf16"].path).exit_code == 0


def test_float16_for_storage_has_numpy_astype_bits_overflow_included():
    """Features become float16 where they were computed (the GPU, in a real run): the bits
    must be numpy's astype's, so caches, journals and resumed runs agree whatever converts."""
    from fusebench.extract.encoders import _f16

    rng = np.random.default_rng(0)
    scales = (1e-8, 1e-5, 1e-3, 1.0, 100.0, 3e4, 7e4)  # subnormals .. beyond float16's range
    x = np.concatenate([rng.standard_normal(20_000).astype(np.float32) * s for s in scales])
    edges = [65504, 65519, 65520, -65520, 6e-8, 3e-8, 2.98e-8, 0.0, -0.0]
    x = np.concatenate([x, np.array(edges, dtype=np.float32)])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    got = _f16(torch.from_numpy(x))
    assert got.dtype == np.float16 and np.isinf(got).any()
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    bf16 = torch.from_numpy(x).to(torch.bfloat16)  # autocast outputs: exact in float32 first
    with np.errstate(over="ignore"):
        want = bf16.float().numpy().astype(np.float16)
    assert np.array_equal(_f16(bf16).view(np.uint16), want.view(np.uint16))
