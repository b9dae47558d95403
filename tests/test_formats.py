"""Dataset formats (issue 7): CSV, JSONL, Parquet and HF `datasets` folders; images as paths
or embedded bytes; `--column KEY=NAME`; text-only and image-only datasets; any label set.

Each test writes real files in tmp_path (Parquet with pyarrow, HF folders with
`save_to_disk`) and checks what a researcher would: the same samples whatever the format,
one clear line for every mistake, and `extract` + `fuse` + `predict` end to end."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from fusebench.extract.datasets import (
    Dataset,
    check_report,
    detect_format,
    load_dataset,
    load_image,
    open_sample_image,
    parse_columns,
)
from fusebench.extract.loop import cache_config
from PIL import Image

from tests.conftest import cli as run_cli
from tests.conftest import error_line as one_error_line
from tests.conftest import no_traceback

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
hf = pytest.importorskip("datasets")

WORDS = ["happy", "sad", "great", "awful", "cat", "dog", "sunny", "rain", "love", "hate"]


def png(seed: int, size: tuple[int, int] = (36, 40)) -> bytes:
    """A small noise PNG (lossless, so decoded pixels compare exactly)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def rows_of(labels: list, splits: list[str | None] | None = None) -> list[dict]:
    """One row per label (None: unlabelled), with a text that carries the label's signal."""
    rows = []
    for i, label in enumerate(labels):
        words = [WORDS[hash(str(label)) % len(WORDS)], WORDS[i % len(WORDS)], f"n{i}"]
        row = {"guid": f"g{i}", "text": " ".join(words), "image": png(i), "label": label}
        if splits is not None:
            row["split"] = splits[i]
        rows.append(row)
    return rows


def write_images(root: Path, rows: list[dict]) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for row in rows:
        (root / "images" / f"{row['guid']}.png").write_bytes(row["image"])


def table_rows(rows: list[dict], embed: bool, names: dict[str, str] | None = None) -> list[dict]:
    """Rows as manifest records: the image as bytes (embed) or a relative path; columns
    renamed by `names` (our key -> the dataset's own column name)."""
    out = []
    for row in rows:
        record = {k: v for k, v in row.items() if k != "image"}
        if "image" in row:
            record["image" if embed else "image_path"] = (
                row["image"] if embed else f"images/{row['guid']}.png"
            )
        out.append({(names or {}).get(k, k): v for k, v in record.items()})
    return out


def write_manifest(root: Path, rows: list[dict], kind: str, names: dict | None = None) -> Path:
    """The dataset `rows` in one format; returns what --data gets."""
    root.mkdir(parents=True, exist_ok=True)
    embed = kind in ("parquet-bytes", "hf", "hf-dict")
    if not embed and any("image" in r for r in rows):
        write_images(root, rows)
    records = table_rows(rows, embed, names)
    if kind == "csv":
        with open(root / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in records)
        return root / "manifest.csv"
    if kind == "jsonl":
        (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return root / "data.jsonl"
    if kind.startswith("parquet"):
        pq.write_table(pa.Table.from_pylist(records), root / "manifest.parquet", row_group_size=4)
        return root  # a folder holding manifest.parquet
    dataset = hf.Dataset.from_list(records)
    image = (names or {}).get("image", "image")
    if image in dataset.column_names:
        dataset = dataset.cast_column(image, hf.Image())
    if kind == "hf-dict":  # split names from the DatasetDict, not a column
        splits = [r.pop("split") for r in records]
        dataset = dataset.remove_columns("split")
        parts = {s: [i for i, x in enumerate(splits) if x == s] for s in dict.fromkeys(splits)}
        dataset = hf.DatasetDict({s: dataset.select(rows) for s, rows in parts.items()})
    folder = root / "hf-data"
    dataset.save_to_disk(str(folder))
    return folder


def cli(*args: object) -> tuple[int, str]:
    """Invoke the CLI; (exit code, stdout + stderr); never a traceback."""
    result = no_traceback(run_cli(*args))
    return result.exit_code, result.output


def identity(dataset: Dataset) -> list[tuple]:
    """What must not depend on the format: guid, split, label name, text, content hashes."""
    return [
        (
            s.guid,
            s.split,
            dataset.classes[s.label] if s.label >= 0 else None,
            s.text,
            s.text_sha,
            s.image_sha,
        )
        for s in dataset.samples
    ]


# --------------------------------------------------------------------------- formats

SPLITS = ["train"] * 6 + ["val", "val", "test", "test"]
LABELS_10 = ["pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg", None, None]
KINDS = ["csv", "jsonl", "parquet-paths", "parquet-bytes", "hf", "hf-dict"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_reads_the_same_samples(tmp_path: Path, kind: str):
    rows = rows_of(LABELS_10, SPLITS)
    reference = load_dataset(write_manifest(tmp_path / "ref", rows, "csv"))
    data = write_manifest(tmp_path / kind, rows, kind)
    assert detect_format(data) == "manifest"
    dataset = load_dataset(data, check_images=True)

    assert identity(dataset) == identity(reference)  # image_sha: the file or the bytes alike
    assert dataset.classes == ("neg", "pos") and dataset.modalities == ("text", "image")
    assert all(s.problems == [] for s in dataset.samples)
    embedded = kind in ("parquet-bytes", "hf", "hf-dict")
    for sample, ref in zip(dataset.samples, reference.samples):
        assert (sample.image_ref is not None) == embedded
        assert (sample.image_path is None) == embedded
        pixels = np.asarray(open_sample_image(sample))
        assert np.array_equal(pixels, np.asarray(load_image(ref.image_path)))
    if kind.startswith(("parquet", "hf")):  # the row's file is recorded for the stale check
        assert all(s.row_files and s.row_files[0].is_file() for s in dataset.samples)
        assert all(s.index_line is None for s in dataset.samples)
    report = check_report(dataset)
    image = "image=image (embedded bytes)" if embedded else "image=image_path (paths)"
    assert image in report, report


def test_embedded_images_are_reread_one_row_group_at_a_time(tmp_path: Path):
    rows = rows_of([i % 2 for i in range(10)])
    dataset = load_dataset(write_manifest(tmp_path / "d", rows, "parquet-bytes"))
    from fusebench.extract.datasets import embedded as module  # where the reader lives

    for i in (9, 0, 5, 4, 1):  # any order; row groups hold 4 rows
        assert np.array_equal(np.asarray(open_sample_image(dataset.samples[i])),
                              np.asarray(Image.open(io.BytesIO(rows[i]["image"])).convert("RGB")))  # fmt: skip
    file = dataset.samples[0].image_ref.file
    group, column = module._embedded().groups[(file, "image")]
    assert group == 0 and len(column) == 4  # the last row group read, not the whole column


def test_folder_detection_and_ambiguity(tmp_path: Path):
    rows = rows_of(["a", "b"])
    folder = write_manifest(tmp_path / "p", rows, "parquet-bytes")
    assert load_dataset(folder / "manifest.parquet").name == "p"  # the file works too
    (folder / "manifest.csv").write_text("guid,text\nx,y\n")
    code, output = cli("data", "check", "--data", folder)
    assert code == 2 and "cannot tell the dataset layout" in one_error_line(output)


# --------------------------------------------------------------------------- column mapping

NAMES = {"guid": "id", "text": "caption", "image": "img", "label": "y", "split": "part"}
FLAGS = [a for k, v in NAMES.items() for a in ("--column", f"{k}={v}")]


@pytest.mark.parametrize("kind", ["csv", "parquet-bytes", "hf"])
def test_column_flags_map_other_names(tmp_path: Path, kind: str):
    rows = rows_of(LABELS_10, SPLITS)
    names = dict(NAMES, image="img" if kind != "csv" else "img_file")
    data = write_manifest(tmp_path / kind, rows, kind, names={**names, "image_path": "img_file"})
    flags = [*FLAGS[:4], "--column", f"image={names['image']}", *FLAGS[6:]]
    code, output = cli("data", "check", "--data", data, *flags)
    assert code == 0, output
    assert f"columns: guid=id, text=caption, image={names['image']}" in output
    assert "label=y, split=part" in output
    assert "10 samples, 0 with fatal problems" in output

    mapped = load_dataset(data, columns=parse_columns(flags[1::2]))
    reference = load_dataset(write_manifest(tmp_path / "ref", rows, "csv"))
    assert identity(mapped) == identity(reference)
    assert mapped.column_map == {"guid": "id", "text": "caption", "image": names["image"],
                                 "label": "y", "split": "part"}  # fmt: skip

    code, output = cli("data", "check", "--data", data)  # without the flags: one line, the fix
    line = one_error_line(output)
    assert code == 2 and "lacks column(s) guid" in line and "--column" in line
    assert "found id, caption" in line


def test_column_flag_mistakes_are_one_line(tmp_path: Path, lab5: Path):
    data = write_manifest(tmp_path / "d", rows_of(["a", "b"]), "csv", names={"text": "caption"})
    cases = [
        (["--column", "caption=text"], "unknown --column key 'caption'; use one of guid, text"),
        (["--column", "text"], "--column wants KEY=NAME"),
        (["--column", "text=body"], "--column text=body: manifest.csv has no column 'body'; "
                                    "found guid, caption, label, image_path"),
        (["--column", "text=caption", "--column", "text=guid"], "--column text is given twice"),
        (["--column", "image=a", "--column", "image_path=b"], "both name the image column"),
    ]  # fmt: skip
    for flags, expected in cases:
        code, output = cli("data", "check", "--data", data, *flags)
        assert code == 2 and expected in one_error_line(output), (flags, output)
    code, output = cli("data", "check", "--data", lab5, "--column", "text=caption")
    assert code == 2 and "lab5 dataset with fixed columns" in one_error_line(output)


class _StubEncoder:
    def config(self) -> dict:
        return {"encoder": "stub", "weights": "random"}


def test_column_mapping_is_part_of_the_cache_config(tmp_path: Path):
    from fusebench.cache import fingerprint

    rows = rows_of(["a", "b"])
    plain = load_dataset(write_manifest(tmp_path / "plain", rows, "csv"))
    data = write_manifest(tmp_path / "named", rows, "csv", names={"text": "caption"})
    named = load_dataset(data, columns={"text": "caption"})
    assert identity(named) == identity(plain)  # same samples ...

    plain_config = cache_config(_StubEncoder(), plain, batch_size=4, limit=None)
    named_config = cache_config(_StubEncoder(), named, batch_size=4, limit=None)
    assert "columns" not in plain_config  # caches built without --column keep their fingerprint
    assert named_config["columns"] == {"text": "caption"}
    manifest = plain.manifest()
    assert fingerprint(plain_config, manifest) != fingerprint(named_config, manifest)


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("labels", "classes"),
    [
        (["yes", "no"] * 4, ("no", "yes")),  # 2 classes, words: sorted
        ([1, 0] * 4, ("0", "1")),  # 2 classes, integers
        (["positive", "negative"] * 4, ("negative", "positive")),  # sentiment words: that order
        ([5, 3, 1, 4, 2, 10] * 2, ("1", "2", "3", "4", "5", "10")),  # integers numerically
        (["e", "d", "c", "b", "a"] * 2, ("a", "b", "c", "d", "e")),  # 5 classes, words
    ],
)
@pytest.mark.parametrize("kind", ["jsonl", "parquet-bytes"])
def test_any_label_set_in_a_documented_order(tmp_path: Path, labels, classes, kind: str):
    rows = rows_of([*labels, None])
    dataset = load_dataset(write_manifest(tmp_path / kind, rows, kind))
    assert dataset.classes == classes
    named = [dataset.classes[s.label] if s.label >= 0 else None for s in dataset.samples]
    assert named == [*map(str, labels), None]
    assert [s.split for s in dataset.samples] == ["train"] * len(labels) + ["test"]


def test_labels_flag_fixes_the_order_and_rejects_a_stray_label_by_guid(tmp_path: Path):
    rows = rows_of([1, 2, 3, 4, 5, 7, 1])
    data = write_manifest(tmp_path / "d", rows, "parquet-bytes")
    code, output = cli("data", "check", "--data", data, "--labels", "5,4,3,2,1")
    assert code == 1, output  # a fatal sample: data check exits 1
    assert "classes: 5, 4, 3, 2, 1" in output
    assert "unknown label: 1 (fatal)" in output
    (line,) = [x for x in output.splitlines() if x.startswith("  ") and "unknown label" in x]
    assert line.split()[0] == "g5" and "unknown label '7': not in --labels 5, 4, 3, 2, 1" in line
    assert "7 samples, 1 with fatal problems" in output
    dataset = load_dataset(data, labels=["5", "4", "3", "2", "1"])
    assert [s.label for s in dataset.samples] == [4, 3, 2, 1, 0, -1, 4]


def test_hf_class_label_names_order_and_unlabelled_rows(tmp_path: Path):
    """An HF ClassLabel stores integers: the names are the classes, in the ClassLabel's own
    order (absent names left out), and -1 is an unlabelled row."""
    names = ["not_hateful", "hateful", "unsure"]
    records = [{"guid": f"m{i}", "text": f"meme {i}", "label": v}
               for i, v in enumerate([1, 0, 1, -1, 0, 1])]  # fmt: skip
    dataset = hf.Dataset.from_list(records).cast_column("label", hf.ClassLabel(names=names))
    dataset.save_to_disk(str(tmp_path / "memes"))
    dataset.to_parquet(str(tmp_path / "memes.parquet"))  # the names travel in its metadata
    for data in (tmp_path / "memes", tmp_path / "memes.parquet"):
        loaded = load_dataset(data)
        assert loaded.classes == ("not_hateful", "hateful")  # not sorted; "unsure" absent
        assert [s.label for s in loaded.samples] == [1, 0, 1, -1, 0, 1]
        assert [s.split for s in loaded.samples] == ["train"] * 3 + ["test"] + ["train"] * 2


def test_datasetdict_splits_and_labelled_rows_outside_train(tmp_path: Path):
    rows = rows_of(LABELS_10, SPLITS)
    data = write_manifest(tmp_path / "dd", rows, "hf-dict")
    dataset = load_dataset(data)
    assert [s.split for s in dataset.samples] == SPLITS  # the DatasetDict's split names
    assert dataset.labelled_outside_train() == {"val": 2}
    code, output = cli("data", "check", "--data", data)
    assert code == 0, output
    assert "DatasetDict with splits train, val, test" in output
    assert (
        "labelled rows outside split 'train' (2 in split 'val') are not used for fitting or "
        "scoring" in output
    )
    assert "`fusebench predict --split val`" in output


# --------------------------------------------------------------------------- optional extras


@pytest.mark.parametrize(
    ("kind", "module", "extra"),
    [("parquet-bytes", "pyarrow.parquet", "parquet"), ("hf", "datasets", "hf")],
)
def test_a_missing_extra_is_one_line_naming_the_install(tmp_path: Path, monkeypatch, kind,
                                                        module, extra):  # fmt: skip
    data = write_manifest(tmp_path / kind, rows_of(["a", "b"]), kind)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    code, output = cli("data", "check", "--data", data)
    assert code == 2
    assert f"pip install 'fusebench[{extra}]'" in one_error_line(output)


def test_an_image_column_of_another_type_is_one_line(tmp_path: Path):
    records = [{"guid": "a", "text": "x", "image": 3}, {"guid": "b", "text": "y", "image": 4}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "bad.parquet")
    code, output = cli("data", "check", "--data", tmp_path / "bad.parquet")
    line = one_error_line(output)
    assert code == 2 and "column 'image' of bad.parquet holds int64, not images" in line


def test_embedded_image_problems_name_the_row(tmp_path: Path):
    rows = rows_of(["a", "b", "a"])
    rows[1]["image"] = rows[1]["image"][: len(rows[1]["image"]) // 2]  # truncated
    rows[2]["image"] = b""
    data = write_manifest(tmp_path / "d", rows, "parquet-bytes")
    code, output = cli("data", "check", "--data", data)
    assert code == 1  # fatal samples: data check exits 1
    assert (
        "g1  image   image in row 1 (0-based) of manifest.parquet (column image) is truncated"
        in output
    )
    assert (
        "g2  image   image in row 2 (0-based) of manifest.parquet (column image) is empty" in output
    )


# --------------------------------------------------------------------------- end to end


def test_text_only_five_integer_classes_extract_fuse_predict(tmp_path: Path):
    """A text-only JSONL with star ratings 1..5 and its own column names: minilm extracts
    it, an image encoder is refused in one line, and predict writes the ratings."""
    labels = [(i % 5) + 1 for i in range(50)] + [None] * 5
    rows = [{k: v for k, v in r.items() if k != "image"} for r in rows_of(labels)]
    data = write_manifest(
        tmp_path / "reviews", rows, "jsonl", names={"text": "body", "label": "stars"}
    )
    flags = ["--column", "text=body", "--column", "label=stars"]
    out, runs = tmp_path / "features", tmp_path / "runs"

    code, output = cli("extract", "--encoder", "vit", "--data", data, "--out", out, *flags)
    assert (
        code == 2
        and "encoder 'vit' reads images, but dataset reviews-data has none"
        in one_error_line(output)
    )
    code, output = cli(
        "extract", "--encoder", "minilm", "--data", data, "--out", out, "--quiet", *flags
    )
    assert code == 0, output
    code, output = cli("fuse", "--head", "text_only", "--features", out / "reviews-data", "--text",
                       "minilm", "--image", "none", "--epochs", 3, "--out", runs, "--quiet")  # fmt: skip
    assert code == 0, output
    (run,) = runs.iterdir()
    code, output = cli("predict", "--run", run, "--out", tmp_path / "pred.txt", "--quiet")
    assert code == 0, output
    lines = (tmp_path / "pred.txt").read_text().splitlines()
    assert lines[0] == "guid,tag" and [x.split(",")[0] for x in lines[1:]] == [
        f"g{i}" for i in range(50, 55)
    ]
    assert {x.split(",")[1] for x in lines[1:]} <= {"1", "2", "3", "4", "5"}  # names, not 0..4


def test_image_only_parquet_with_an_image_encoder(tmp_path: Path, tiny_models):
    rows = [{k: v for k, v in r.items() if k != "text"} for r in rows_of(["a", "b"] * 4)]
    data = write_manifest(tmp_path / "pics", rows, "parquet-bytes")
    assert load_dataset(data).modalities == ("image",)
    out = tmp_path / "features"
    code, output = cli("extract", "--encoder", "bert", "--model", tiny_models["bert"], "--data",
                       data, "--out", out)  # fmt: skip
    assert code == 2 and "encoder 'bert' reads text, but dataset pics has none" in one_error_line(
        output
    )
    code, output = cli("extract", "--encoder", "vit", "--model", tiny_models["vit"], "--data",
                       data, "--out", out, "--quiet", "--workers", 1)  # fmt: skip
    assert code == 0 and "8 rows, 8 ok, 0 failed" in output, output


def test_extract_and_fuse_on_parquet_with_embedded_images(tmp_path: Path, tiny_models):
    labels = ["neg", "pos"] * 12 + [None] * 4
    data = write_manifest(tmp_path / "memes", rows_of(labels), "parquet-bytes")
    out, runs = tmp_path / "features", tmp_path / "runs"
    for encoder in ("bert", "vit"):
        code, output = cli("extract", "--encoder", encoder, "--model", tiny_models[encoder],
                           "--data", data, "--out", out, "--quiet", "--workers", 1)  # fmt: skip
        assert code == 0 and "28 rows, 28 ok, 0 failed" in output, output
    import h5py

    with h5py.File(out / "memes" / "vit.h5", "r") as f:
        sources = json.loads(f["sources"][()])
    assert "manifest.parquet" in sources["files"]  # what the stale check watches

    fuse = ["fuse", "--head", "concat_mlp", "--features", out / "memes", "--text", "bert",
            "--image", "vit", "--epochs", 2, "--out", runs, "--quiet"]  # fmt: skip
    code, output = cli(*fuse)
    assert code == 0, output
    assert (next(runs.iterdir()) / "results.json").is_file()

    rows = rows_of(labels)
    rows[3]["image"] = png(99)  # the data changes after extraction
    write_manifest(tmp_path / "memes", rows, "parquet-bytes")
    code, output = cli(*fuse)
    assert code == 1 and "is stale" in one_error_line(output)
