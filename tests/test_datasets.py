"""Dataset readers: lab5 with every kind of bad sample, manifests, MVSA merge rules."""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import pytest
from fusebench.extract.datasets import (
    LABELS,
    Dataset,
    Sample,
    check_image,
    check_report,
    decode_text,
    detect_format,
    load_dataset,
    load_image,
)
from PIL import Image, ImageFile

LAB5_DEV = Path(__file__).parents[1].parent / "shared" / "data" / "lab5-dev"
CP1252_TEXT = b"caf\xe9 \x93quoted\x94\r\n"


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    """A small noise image (noise so that half a JPEG is still a truncated JPEG)."""
    pixels = random.Random(seed).randbytes(size[0] * size[1] * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, pixels).save(buffer, fmt)
    return buffer.getvalue()


def write_sample(data: Path, guid: str, text: bytes | None, image: bytes | None) -> None:
    if text is not None:
        (data / f"{guid}.txt").write_bytes(text)
    if image is not None:
        (data / f"{guid}.jpg").write_bytes(image)


# guid, tag, text bytes (None = no file), image bytes (None = no file)
JPEG = image_bytes()
LAB5_TRAIN: list[tuple[str, str, bytes | None, bytes | None]] = [
    ("1", "positive", b"a good day \n", JPEG),
    ("2", "negative", b"no picture", None),  # missing image
    ("3", "neutral", b"zero bytes", b""),  # zero-byte image
    ("4", "positive", b"cut in half", JPEG[: len(JPEG) // 2]),  # truncated JPEG
    ("5", "negative", b"text as jpg", b"hello, I am not a picture\n"),  # .jpg that is text
    ("6", "positive", CP1252_TEXT, image_bytes(seed=6)),  # needs cp1252
    ("7", "neutral", b"  \n\t\n", image_bytes(seed=7)),  # empty text
    ("1", "negative", None, None),  # duplicate of row 2 (files shared with guid 1)
    ("8", "happy", b"unknown label", image_bytes(seed=8)),
    ("9", "positive", None, None),  # neither file
    ("10", "positive", None, image_bytes(seed=10)),  # missing text only
    ("11", "Neutral", b"png inside a .jpg is fine", image_bytes("PNG", seed=11)),
]
LAB5_TEST = [
    ("12", "null", b"unlabelled", image_bytes(seed=12)),
    ("13", "null", b"\xef\xbb\xbfwith a BOM", image_bytes(seed=13)),
]

# guid -> (modality, fatal, words in the reason); guids absent here have no problems.
# Truncation (guid 4) is only seen with check_images=True.
EXPECTED = {
    "2": [("image", True, "data/2.jpg not found")],
    "3": [("image", True, "empty (0 bytes)")],
    "5": [("image", True, "not an image")],
    "6": [("text", False, "decoded as cp1252")],
    "7": [("text", True, "data/7.txt is empty")],
    "8": [(None, True, "unknown label 'happy'; use one of negative, neutral, positive")],
    "9": [(None, True, "no data/9.txt or data/9.jpg")],
    "10": [("text", True, "data/10.txt not found")],
}
DUPLICATE = (None, True, "duplicate guid; first seen at row 2 of train.txt; remove one")
TRUNCATED = ("image", True, "data/4.jpg is truncated (PIL: image file is truncated")


@pytest.fixture
def lab5_root(tmp_path: Path) -> Path:
    root = tmp_path / "lab5-mini"
    (root / "data").mkdir(parents=True)
    for name, rows in (("train.txt", LAB5_TRAIN), ("test_without_label.txt", LAB5_TEST)):
        lines = ["guid,tag"] + [f"{guid},{tag}" for guid, tag, _, _ in rows]
        (root / name).write_text("\n".join(lines) + "\n")
        for guid, _, text, image in rows:
            write_sample(root / "data", guid, text, image)
    return root


def by_guid(dataset: Dataset) -> dict[str, Sample]:
    return {s.guid: s for s in reversed(dataset.samples)}  # first occurrence wins


def found(sample: Sample) -> list[tuple[str | None, bool, str]]:
    return [(p.modality, p.fatal, p.reason) for p in sample.problems]


def assert_problems(sample: Sample, expected: list[tuple[str | None, bool, str]]) -> None:
    got = found(sample)
    assert len(got) == len(expected), got
    for (modality, fatal, reason), (want_mod, want_fatal, words) in zip(got, expected, strict=True):
        assert (modality, fatal) == (want_mod, want_fatal), got
        assert words in reason, got
        assert "\n" not in reason and ";" in reason, reason  # one line: what; the fix


@pytest.mark.parametrize("check_images", [False, True])
def test_lab5_keeps_every_row_in_order_with_its_problems(lab5_root: Path, check_images: bool):
    dataset = load_dataset(lab5_root, check_images=check_images)

    assert (dataset.name, dataset.format, dataset.classes) == ("lab5-mini", "lab5", LABELS)
    rows = LAB5_TRAIN + LAB5_TEST
    assert [s.guid for s in dataset.samples] == [guid for guid, *_ in rows]
    assert [s.split for s in dataset.samples] == ["train"] * 12 + ["test"] * 2
    assert [s.label for s in dataset.samples] == [2, 0, 1, 2, 0, 2, 1, 0, -1, 2, 2, 1, -1, -1]

    samples = by_guid(dataset)
    for guid, sample in samples.items():
        expected = list(EXPECTED.get(guid, []))
        if guid == "4" and check_images:
            expected.append(TRUNCATED)
        assert_problems(sample, expected)
    duplicate = dataset.samples[7]
    assert_problems(duplicate, [DUPLICATE])
    assert dataset.samples[0].problems == []  # the first occurrence keeps going


def test_lab5_sample_fields(lab5_root: Path):
    samples = by_guid(load_dataset(lab5_root))

    good = samples["1"]
    assert good.text == "a good day"  # trailing whitespace stripped
    assert good.text_encoding == "utf-8"
    assert good.text_sha == hashlib.sha256(b"a good day \n").hexdigest()
    assert good.image_path == lab5_root / "data" / "1.jpg"
    assert good.image_sha == hashlib.sha256(JPEG).hexdigest()

    assert (samples["6"].text, samples["6"].text_encoding) == ("café “quoted”", "cp1252")
    assert samples["6"].text_sha == hashlib.sha256(CP1252_TEXT).hexdigest()
    assert (samples["13"].text, samples["13"].text_encoding) == ("with a BOM", "utf-8")
    assert samples["2"].image_path is None and samples["2"].image_sha is None
    assert samples["3"].image_path is not None  # exists, but unusable: reported instead
    assert samples["10"].text is None and samples["10"].text_sha is None
    none = samples["9"]
    assert (none.text, none.text_sha, none.image_path, none.image_sha) == (None, None, None, None)


def test_failed_filters_by_modality(lab5_root: Path):
    samples = by_guid(load_dataset(lab5_root))

    assert samples["6"].failed(["text", "image"]) == []  # a fallback decode is only a note
    assert samples["2"].failed(["text"]) == []  # text-only encoders can use it
    assert [p.modality for p in samples["2"].failed(["image"])] == ["image"]
    assert [p.modality for p in samples["10"].failed(("text", "image"))] == ["text"]
    assert [p.modality for p in samples["9"].failed(["text"])] == [None]  # sample-level
    assert [p.modality for p in samples["8"].failed([])] == [None]


def test_manifest_is_json_and_tracks_file_content(lab5_root: Path):
    before = load_dataset(lab5_root).manifest()
    assert json.loads(json.dumps(before)) == before
    assert before[0] == {
        "guid": "1",
        "split": "train",
        "label": 2,
        "text_sha": hashlib.sha256(b"a good day \n").hexdigest(),
        "image_sha": hashlib.sha256(JPEG).hexdigest(),
    }
    (lab5_root / "data" / "12.txt").write_bytes(b"edited")
    after = load_dataset(lab5_root).manifest()
    changed = [a["guid"] for a, b in zip(after, before, strict=True) if a != b]
    assert changed == ["12"]


def test_check_report_lists_every_bad_guid(lab5_root: Path):
    dataset = load_dataset(lab5_root, check_images=True)
    report = check_report(dataset)
    lines = report.splitlines()

    assert "lab5" in lines[0]
    assert "14 samples" in lines[1] and "train 12, test 2" in lines[1]
    assert "negative 3, neutral 3, positive 5, none 3" in lines[1]
    for guid in [*EXPECTED, "1", "4"]:
        assert any(line.split()[:1] == [guid] for line in lines), guid
    assert "truncated image: 1 (fatal)" in report
    assert "fallback text decode: 1 (note, sample kept)" in report
    # 2 3 4 5 7 8 9 10 and the duplicate are stopped; 6 only has a note
    assert lines[-1] == "14 samples, 9 with fatal problems, 1 notes"


def test_lab5_index_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "train.txt").write_text("guid,tag\n1,positive\n")
    with pytest.raises(FileNotFoundError, match="no data/ folder"):
        load_dataset(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "train.txt").write_text("id,label\n1,positive\n")
    with pytest.raises(ValueError, match="found id, label, need guid, tag"):
        load_dataset(tmp_path)


def test_lab5_train_row_without_label_is_reported(tmp_path: Path):
    (tmp_path / "data").mkdir()
    write_sample(tmp_path / "data", "1", b"x", JPEG)
    (tmp_path / "train.txt").write_text("guid,tag\n1,null\n")
    (sample,) = load_dataset(tmp_path).samples
    assert sample.label == -1
    assert_problems(sample, [(None, True, "unknown label 'null'")])


# --------------------------------------------------------------------------- images


def test_check_image_and_load_image(tmp_path: Path):
    good, half, text, empty = (tmp_path / f"{n}.jpg" for n in ("good", "half", "text", "empty"))
    good.write_bytes(image_bytes("PNG", size=(8, 6)))
    half.write_bytes(JPEG[: len(JPEG) // 2])
    text.write_bytes(b"<html>not found</html>")
    empty.write_bytes(b"")

    assert check_image(good, decode=True) is None
    assert check_image(half, decode=False) is None  # cheap checks cannot see truncation
    assert "is truncated" in (check_image(half, decode=True) or "")
    assert "not an image" in (check_image(text, decode=False) or "")
    assert "empty (0 bytes)" in (check_image(empty, decode=False) or "")
    assert "not found" in (check_image(tmp_path / "gone.jpg", decode=False) or "")

    image = load_image(good)
    assert (image.mode, image.size) == ("RGB", (8, 6))
    for path, words in ((half, "truncated"), (text, "not an image"), (empty, "0 bytes")):
        with pytest.raises(ValueError, match=words):
            load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"plain", ("plain", "utf-8")),
        ("naïve ☺".encode(), ("naïve ☺", "utf-8")),
        (b"\xef\xbb\xbfbom", ("bom", "utf-8")),
        (CP1252_TEXT, ("café “quoted”\r\n", "cp1252")),
        (b"\x81\xe9", ("\x81é", "latin-1")),  # 0x81 is undefined in cp1252: last resort
        (b"", ("", "utf-8")),
        ("utf-16 ☺".encode("utf-16"), ("utf-16 ☺", "utf-16")),  # its BOM says so
    ],
)
def test_decode_text(raw: bytes, expected: tuple[str, str]):
    assert decode_text(raw, "cp1252") == expected
    assert decode_text(raw)[1] in ("utf-8", "utf-16", "latin-1")  # no legacy: UTF or latin-1


# --------------------------------------------------------------------------- manifest


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    root = tmp_path / "my-corpus"
    (root / "images").mkdir(parents=True)
    (root / "texts").mkdir()
    (root / "images" / "a.jpg").write_bytes(JPEG)
    (root / "images" / "b.png").write_bytes(image_bytes("PNG"))
    (root / "texts" / "b.txt").write_bytes(CP1252_TEXT)
    return root


def test_manifest_csv(manifest_dir: Path):
    (manifest_dir / "manifest.csv").write_text(
        "guid,text,image_path,label,split\n"
        'a,"hello, world",images/a.jpg,positive,val\n'
        "b,second,images/b.png,,\n"
        "c,third,images/missing.jpg,negative,\n"
        "d,,images/a.jpg,sad,train\n"
    )
    dataset = load_dataset(manifest_dir)  # a folder holding one manifest.csv

    assert (dataset.name, dataset.format, dataset.root) == ("my-corpus", "manifest", manifest_dir)
    # a manifest takes any label; not all sentiment words, so the classes are sorted
    assert dataset.classes == ("negative", "positive", "sad")
    assert [(s.guid, s.split, s.label) for s in dataset.samples] == [
        ("a", "val", 1),
        ("b", "test", -1),  # no label -> test
        ("c", "train", 0),  # a label -> train
        ("d", "train", 2),
    ]
    a, b, c, d = dataset.samples
    assert (a.text, a.text_encoding) == ("hello, world", "utf-8")
    assert a.text_sha == hashlib.sha256(b"hello, world").hexdigest()
    assert a.image_path == manifest_dir / "images" / "a.jpg"  # relative to the manifest
    assert a.problems == [] and b.problems == []
    assert_problems(c, [("image", True, "images/missing.jpg not found")])
    assert_problems(d, [("text", True, "empty")])


def test_manifest_jsonl_with_text_paths(manifest_dir: Path):
    records = [
        {"guid": 1, "text_path": "texts/b.txt", "image_path": "images/b.png", "label": "Neutral"},
        {"guid": 2, "text_path": "texts/none.txt", "image_path": "images/none.jpg"},
        {"guid": 1, "text_path": "texts/b.txt", "image_path": ""},
    ]
    file = manifest_dir / "pairs.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert detect_format(file) == "manifest"
    dataset = load_dataset(file)

    assert dataset.classes == ("neutral",)  # the only label the rows carry
    assert [(s.guid, s.split, s.label) for s in dataset.samples] == [
        ("1", "train", 0),
        ("2", "test", -1),
        ("1", "test", -1),
    ]
    first, second, third = dataset.samples
    assert (first.text, first.text_encoding) == ("café “quoted”", "cp1252")
    assert first.text_sha == hashlib.sha256(CP1252_TEXT).hexdigest()
    assert_problems(first, [("text", False, "decoded as cp1252")])
    assert_problems(second, [(None, True, "no texts/none.txt or images/none.jpg")])
    assert_problems(
        third,
        [
            (None, True, "duplicate guid; first seen at line 1 of pairs.jsonl"),
            ("text", False, "decoded as cp1252"),
            ("image", True, "no image_path"),
        ],
    )


def test_manifest_errors(manifest_dir: Path):
    csv_file = manifest_dir / "bad.csv"
    csv_file.write_text("id,caption,image_path\nx,y,z\n")
    with pytest.raises(
        ValueError, match="found id, caption, image_path, need guid, text or text_path"
    ):
        load_dataset(csv_file)
    jsonl = manifest_dir / "bad.jsonl"
    jsonl.write_text('{"guid": "a", "text": "t", "image_path": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_dataset(jsonl)


# --------------------------------------------------------------------------- mvsa


def write_mvsa(root: Path, header: str, lines: list[str]) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "labelResultAll.txt").write_text("\n".join([header, *lines]) + "\n")
    for line in lines:
        guid = line.split("\t")[0]
        write_sample(root / "data", guid, f"tweet {guid}".encode(), JPEG)
    return root


def test_mvsa_single_merge_rule(tmp_path: Path):
    root = write_mvsa(
        tmp_path / "MVSA_Single",
        "ID\ttext,image",
        [
            "1\tpositive,positive",
            "2\tneutral,negative",  # one neutral: the other wins
            "3\tpositive,neutral",
            "4\tpositive,negative",  # conflict: dropped
            "5\tneutral,neutral",
            "6\tnegative,positive",  # conflict: dropped
            "7\tpositive,happy",  # malformed: kept and reported
        ],
    )
    assert detect_format(root) == "mvsa"
    dataset = load_dataset(root)

    assert [(s.guid, s.label) for s in dataset.samples] == [
        ("1", 2),
        ("2", 0),
        ("3", 2),
        ("5", 1),
        ("7", -1),
    ]
    assert {s.split for s in dataset.samples} == {"train"}
    assert dataset.samples[0].text == "tweet 1" and dataset.samples[0].problems == []
    assert_problems(dataset.samples[-1], [(None, True, "line 8 of labelResultAll.txt")])
    assert "6 lines MVSA-Single, 1 annotation each" in dataset.notes[0]
    assert dataset.notes[1].startswith("dropped 2 lines")
    assert "2 positive-vs-negative conflict (e.g. 4, 6)" in dataset.notes[1]
    assert "no majority" not in dataset.notes[1]


def test_mvsa_multiple_majority_then_merge(tmp_path: Path):
    root = write_mvsa(
        tmp_path / "MVSA",
        "ID\ttext,image\ttext,image\ttext,image",
        [
            "1\tpositive,positive\tpositive,negative\tneutral,positive",  # pos, pos -> pos
            "2\tpositive,neutral\tnegative,neutral\tneutral,neutral",  # text: no majority
            "3\tpositive,negative\tpositive,negative\tnegative,positive",  # pos vs neg
            "4\tneutral,negative\tneutral,negative\tpositive,negative",  # neu, neg -> neg
            "5\tneutral,neutral\tneutral,positive\tpositive,positive",  # neu, pos -> pos
            "6\tnegative,positive\tneutral,negative\tpositive,neutral",  # both: no majority
        ],
    )
    dataset = load_dataset(root, format="mvsa")

    assert dataset.classes == ("negative", "positive")  # no line merged to neutral
    assert [(s.guid, s.label) for s in dataset.samples] == [("1", 1), ("4", 0), ("5", 1)]
    assert "6 lines MVSA-Multiple, 3 annotations each" in dataset.notes[0]
    assert dataset.notes[1].startswith("dropped 3 lines")
    assert "1 positive-vs-negative conflict (e.g. 3)" in dataset.notes[1]
    assert "2 no majority (e.g. 2, 6)" in dataset.notes[1]
    assert "dropped 3 lines" in check_report(dataset)


# --------------------------------------------------------------------------- layout detection


def test_detect_format(tmp_path: Path):
    lab5 = tmp_path / "lab5"
    lab5.mkdir()
    (lab5 / "test_without_label.txt").write_text("guid,tag\n")
    assert detect_format(lab5) == "lab5"

    both = tmp_path / "both"
    both.mkdir()
    (both / "manifest.csv").write_text("guid,text,image_path\n")
    assert detect_format(both) == "manifest"
    (both / "manifest.jsonl").write_text("")
    with pytest.raises(ValueError, match="expected lab5 .* mvsa .* manifest"):
        detect_format(both)  # two manifests: which one is ambiguous

    with pytest.raises(ValueError, match="cannot tell the dataset layout"):
        detect_format(tmp_path / "lab5" / "test_without_label.txt")  # a file, not a manifest
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="labelResultAll.txt"):
        load_dataset(empty)
    with pytest.raises(FileNotFoundError, match="no labelResultAll.txt"):
        load_dataset(lab5, format="mvsa")
    with pytest.raises(ValueError, match="unknown dataset format 'coco'"):
        load_dataset(lab5, format="coco")


# --------------------------------------------------------------------------- real data


def test_lab5_dev_real_data():
    if not LAB5_DEV.is_dir():
        pytest.skip(f"{LAB5_DEV} is absent")
    dataset = load_dataset(LAB5_DEV)
    train_ids = [line.split(",")[0] for line in (LAB5_DEV / "train.txt").read_text().split()[1:]]

    assert len(dataset.samples) == 1300
    assert [s.guid for s in dataset.samples[:1200]] == train_ids
    assert [s.split for s in dataset.samples] == ["train"] * 1200 + ["test"] * 100
    counts = [sum(s.label == i for s in dataset.samples) for i in range(3)]
    assert counts == [364, 121, 715]
    assert all(s.label == -1 for s in dataset.samples[1200:])
    assert all(s.failed(["text", "image"]) == [] for s in dataset.samples)
    assert dataset.classes == LABELS
    assert dataset.text_encoding == "gb18030"
    assert {s.text_encoding for s in dataset.samples} == {"utf-8", "gb18030"}
    fallbacks = [s for s in dataset.samples if s.text_encoding != "utf-8"]
    assert fallbacks and all(any(not p.fatal for p in s.problems) for s in fallbacks)
