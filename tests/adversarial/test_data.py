"""Adversarial inputs for the dataset readers (issue 6, data side): classes from the data,
images as the reference loader sees them, legacy text encodings, guids that are not file
names, and odd index files. Each test builds real files in tmp_path and asserts the rule:
a correct result, or one clear line naming the sample or path, never a traceback."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from fusebench.extract.datasets import (
    LABELS,
    detect_legacy_encoding,
    load_dataset,
    load_image,
)
from PIL import Image

from tests.conftest import LAB5_DEV, cli, no_traceback, write_image
from tests.conftest import error_line as one_error_line


def lab5(root: Path, train: list[tuple[str, str]], texts: dict[str, bytes] | None = None) -> Path:
    """A lab5 folder: train.txt rows (guid, tag), a text and an image per guid."""
    (root / "data").mkdir(parents=True)
    (root / "train.txt").write_text("guid,tag\n" + "".join(f"{g},{t}\n" for g, t in train))
    for i, (guid, _) in enumerate(train):
        if "/" in guid or len(guid) > 200:
            continue
        text = (texts or {}).get(guid, f"tweet {guid}".encode())
        (root / "data" / f"{guid}.txt").write_bytes(text)
        write_image(root / "data" / f"{guid}.jpg", seed=i)
    return root


def check(*args: str) -> tuple[int, str]:
    """`fusebench data check ...` -> (exit code, stdout + stderr); never a traceback."""
    result = no_traceback(cli("data", "check", *args))
    return result.exit_code, result.output  # stdout and stderr, as a terminal shows them


# --------------------------------------------------------------------------- 1. classes


def test_lab5_classes_are_the_labels_its_rows_carry(tmp_path: Path):
    two = load_dataset(lab5(tmp_path / "two", [("1", "positive"), ("2", "negative")]))
    assert two.classes == ("negative", "positive")  # canonical order, no absent neutral
    assert [s.label for s in two.samples] == [1, 0]

    one = load_dataset(lab5(tmp_path / "one", [("1", "Positive"), ("2", "positive")]))
    assert one.classes == ("positive",) and [s.label for s in one.samples] == [0, 0]


def test_labels_option_fixes_set_and_order_and_rejects_others(tmp_path: Path):
    root = lab5(tmp_path / "d", [("1", "positive"), ("2", "negative"), ("3", "neutral")])

    fixed = load_dataset(root, labels=["positive", "negative", "neutral"])
    assert fixed.classes == ("positive", "negative", "neutral")
    assert [s.label for s in fixed.samples] == [0, 1, 2]

    narrow = load_dataset(root, labels=["negative", "positive", "mixed"])
    assert narrow.classes == ("negative", "positive", "mixed")
    bad = narrow.samples[2]
    assert bad.label == -1 and bad.failed(["text"])
    assert (
        "unknown label 'neutral': not in --labels negative, positive, mixed"
        in bad.problems[0].reason
    )
    assert any("mixed: no labelled row carries it" in n for n in narrow.notes)

    code, output = check("--data", str(root), "--labels", "negative,positive")
    assert code == 1 and "classes: negative, positive" in output  # a fatal sample: exit 1
    assert re.search(r"^  3 +sample +unknown label 'neutral'", output, re.M), output
    for bad_labels in ("a,a", "", "positive,,negative"):
        code, output = check("--data", str(root), "--labels", bad_labels)
        assert code == 2 and "--labels" in one_error_line(output)


def test_manifest_takes_any_label_in_a_documented_order(tmp_path: Path):
    (tmp_path / "a.jpg").write_bytes(b"")  # images do not matter for labels
    rows = [
        {"guid": "a", "text": "x", "image_path": "a.jpg", "label": 10},
        {"guid": "b", "text": "x", "image_path": "a.jpg", "label": 2},
        {"guid": "c", "text": "x", "image_path": "a.jpg", "label": "1"},
        {"guid": "d", "text": "x", "image_path": "a.jpg", "label": 2.0},  # pandas int + NaN
        {"guid": "e", "text": "x", "image_path": "a.jpg", "label": None},
    ]
    ints = tmp_path / "ints.jsonl"
    ints.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = load_dataset(ints)
    assert dataset.classes == ("1", "2", "10")  # integers numerically, not "1", "10", "2"
    assert [(s.label, s.split) for s in dataset.samples] == [
        (2, "train"), (1, "train"), (0, "train"), (1, "train"), (-1, "test")
    ]  # fmt: skip

    words = tmp_path / "words.csv"
    words.write_text(
        "guid,text,image_path,label\n"
        "a,x,a.jpg,Hateful\nb,x,a.jpg,not_hateful\nc,x,a.jpg,hateful\nd,x,a.jpg,nan\n"
    )
    dataset = load_dataset(words)
    assert dataset.classes == ("Hateful", "not_hateful")  # sorted; case variants are one class
    assert [s.label for s in dataset.samples] == [0, 1, 0, -1]
    assert any("'Hateful', 'hateful' are one class" in note for note in dataset.notes)

    sentiment = tmp_path / "sentiment.csv"
    sentiment.write_text("guid,text,image_path,label\na,x,a.jpg,positive\nb,x,a.jpg,negative\n")
    assert load_dataset(sentiment).classes == ("negative", "positive")


# --------------------------------------------------------------------------- 2. images


def saved(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_16bit_and_float_images_are_scaled_not_clipped(tmp_path: Path):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))  # (8, 64)
    png = saved(Image.fromarray(ramp), tmp_path / "ramp16.png")
    assert Image.open(png).mode == "I;16"
    pixels = np.asarray(load_image(png))  # (8, 64, 3)
    expected = np.rint(ramp / 257).astype(np.uint8)
    assert np.abs(pixels[..., 0].astype(int) - expected).max() <= 1
    assert 120 < pixels.mean() < 135  # a mid-grey ramp, not "almost white"

    big_endian = Image.frombytes("I;16B", (64, 8), ramp.astype(">u2").tobytes())
    tif = saved(big_endian.convert("I"), tmp_path / "ramp32.tif")
    assert np.abs(np.asarray(load_image(tif))[..., 0].astype(int) - expected).max() <= 1

    floats = Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    f_tif = saved(floats, tmp_path / "float.tif")
    assert Image.open(f_tif).mode == "F"
    grey = np.asarray(load_image(f_tif))[..., 0]
    assert (grey[0, 0], grey[-1, -1]) == (0, 255) and 100 < grey.mean() < 155


def test_exif_orientation_is_applied(tmp_path: Path):
    picture = np.zeros((20, 40, 3), dtype=np.uint8)  # (H, W, 3): wide, red left half
    picture[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    jpg = saved(Image.fromarray(picture), tmp_path / "rotated.jpg", exif=exif.tobytes())

    shown = load_image(jpg)
    assert shown.size == (20, 40)  # tall, as a phone shows it
    top, bottom = np.asarray(shown)[2, 10], np.asarray(shown)[-3, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[0] < 60  # red half on top after the turn


def test_transparency_is_composited_onto_white(tmp_path: Path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    p_png = saved(palette, tmp_path / "p.png", transparency=0)
    rgb = np.asarray(load_image(p_png))
    assert tuple(rgb[1, 1]) == (255, 255, 255)  # transparent black -> white
    assert tuple(rgb[0, 0]) == (255, 0, 0)  # opaque red stays red

    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((0, 0), (0, 255))
    la_rgb = np.asarray(load_image(saved(la, tmp_path / "la.png")))
    assert tuple(la_rgb[1, 1]) == (255, 255, 255) and tuple(la_rgb[0, 0]) == (0, 0, 0)

    half = Image.new("RGBA", (4, 4), (0, 0, 255, 128))
    blue = np.asarray(load_image(saved(half, tmp_path / "half.png")))[0, 0]
    assert blue[2] == 255 and 120 <= blue[0] <= 135  # half-transparent blue over white


# --------------------------------------------------------------------------- 11. encodings

GB_TEXTS = {
    "1": "Great match… “what a goal” #football",
    "2": "сегодня последний день",
    "3": "今日はいい天気 ’quoted’",
    "4": "plain ascii stays utf-8",
    "5": "café in UTF-8",
}


def gb_lab5(root: Path) -> Path:
    texts = {g: t.encode("utf-8" if g in "45" else "gb18030") for g, t in GB_TEXTS.items()}
    return lab5(root, [(g, "positive") for g in GB_TEXTS], texts)


def test_legacy_texts_decode_in_the_datasets_one_encoding(tmp_path: Path):
    dataset = load_dataset(gb_lab5(tmp_path / "gb"))

    assert dataset.text_encoding == "gb18030"
    assert [s.text for s in dataset.samples] == list(GB_TEXTS.values())  # no mojibake
    assert [s.text_encoding for s in dataset.samples] == ["gb18030"] * 3 + ["utf-8"] * 2
    for sample in dataset.samples[:3]:
        (note,) = sample.problems
        assert not note.fatal and "decoded as gb18030" in note.reason
    assert all(s.problems == [] for s in dataset.samples[3:])


def test_text_encoding_can_be_forced_and_latin1_is_the_last_resort(tmp_path: Path):
    root = gb_lab5(tmp_path / "gb")
    (root / "data" / "4.txt").write_bytes(b"broken \xff byte")  # not valid GB18030
    dataset = load_dataset(root, text_encoding="GB18030")
    assert dataset.text_encoding == "gb18030"
    assert [s.text for s in dataset.samples[:3]] == list(GB_TEXTS.values())[:3]
    assert "(--text-encoding)" in dataset.samples[0].problems[0].reason
    broken = dataset.samples[3]
    assert (broken.text, broken.text_encoding) == ("broken ÿ byte", "latin-1")
    (note,) = broken.problems
    assert not note.fatal and "neither UTF-8 nor gb18030; decoded as latin-1" in note.reason

    forced = load_dataset(root, text_encoding="cp1251")
    assert forced.text_encoding == "cp1251" and forced.samples[0].text_encoding == "cp1251"

    with pytest.raises(ValueError, match="unknown text encoding 'klingon'"):
        load_dataset(root, text_encoding="klingon")
    code, output = check("--data", str(root), "--text-encoding", "klingon")
    assert code == 2 and "unknown text encoding" in one_error_line(output)


def test_one_damaged_file_does_not_flip_the_datasets_encoding():
    texts = [f"tweet {i}… “quoted” сегодня".encode("gb18030") for i in range(150)]
    assert detect_legacy_encoding(texts) == "gb18030"
    # cp1251 decodes that file too, so "decodes every file" alone would now pick it
    assert detect_legacy_encoding([*texts, b"broken \xff byte"]) == "gb18030"
    assert detect_legacy_encoding([*texts[:3], b"broken \xff byte"]) == "gb18030"
    western = [t.encode("cp1252") for t in ("café “quoted”", "naïve résumé — déjà vu")]
    assert detect_legacy_encoding([*western, b"0x81 is not cp1252 \x81"]) == "cp1252"


def test_western_text_is_not_read_in_a_look_alike_code_page():
    western = [
        "Ça va très bien, merci! L’été est là… “Voilà” déjà",
        "Perché è così difficile? Però va bene",
        "Schöne Grüße aus München",
        "El niño comió piña en Málaga",
        "Não sei o que fazer… ação rápida",
    ]
    assert detect_legacy_encoding([t.encode("cp1252") for t in western] * 50) == "cp1252"


def test_all_utf8_dataset_records_no_legacy_encoding(tmp_path: Path):
    root = lab5(tmp_path / "u", [("1", "positive")], {"1": "naïve ☺".encode()})
    assert load_dataset(root).text_encoding is None
    assert load_dataset(root, text_encoding="cp1252").text_encoding is None  # nothing used it


@pytest.mark.parametrize(
    ("encoding", "texts"),
    [
        ("gb18030", ["你好，世界…", "“Hello” said he…", "我爱北京天安门"]),
        ("cp1252", ["café “quoted”\r\n", "naïve résumé — déjà vu", "Straße über Ärger"]),
        ("cp1251", ["Привет, как дела?", "Москва — столица России", "Всё хорошо"]),
        ("shift_jis", ["こんにちは世界", "日本語のテキストです", "今日はいい天気ですね"]),
        ("euc-kr", ["안녕하세요 세계", "한국어 텍스트", "오늘 날씨가 좋네요"]),
    ],
)
def test_detect_legacy_encoding_settles_ambiguity(encoding: str, texts: list[str]):
    assert detect_legacy_encoding([t.encode(encoding) for t in texts]) == encoding


def test_utf16_text_with_bom_is_read_as_utf16(tmp_path: Path):
    root = lab5(tmp_path / "d", [("1", "positive")], {"1": "Notepad ☺ export".encode("utf-16")})
    sample = load_dataset(root).samples[0]
    assert (sample.text, sample.text_encoding, sample.problems) == (
        "Notepad ☺ export",
        "utf-16",
        [],
    )


def test_non_utf8_manifest_and_index_files_are_read(tmp_path: Path):
    write_image(tmp_path / "a.jpg", seed=0)
    manifest = tmp_path / "export.csv"
    manifest.write_bytes(
        "guid,text,image_path\na,“Великолепно”…,a.jpg\nb,ascii,a.jpg\n".encode("gb18030")
    )
    dataset = load_dataset(manifest)
    a, b = dataset.samples
    assert (a.text, a.text_encoding, b.text_encoding) == ("“Великолепно”…", "gb18030", "utf-8")
    assert dataset.text_encoding == "gb18030"
    assert any("export.csv is not UTF-8; read as gb18030" in n for n in dataset.notes)
    assert [p.fatal for p in a.problems] == [False] and b.problems == []

    root = lab5(tmp_path / "lab5", [("café", "positive")])
    (root / "train.txt").write_bytes("guid,tag\ncafé,positive\n".encode("cp1252"))
    (root / "data" / "café.txt").write_text("ok")
    code, output = check("--data", str(root))  # was a UnicodeDecodeError traceback
    assert code == 0 and "train.txt is not UTF-8; read as cp1252" in output


def test_lab5_dev_legacy_texts_all_decode_as_gb18030():
    if not LAB5_DEV.is_dir():
        pytest.skip(f"{LAB5_DEV} is absent")
    dataset = load_dataset(LAB5_DEV)
    legacy = [s for s in dataset.samples if s.text_encoding != "utf-8"]

    raw_not_utf8 = 0
    for path in sorted((LAB5_DEV / "data").glob("*.txt")):
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raw_not_utf8 += 1
    assert dataset.text_encoding == "gb18030"
    assert len(legacy) == raw_not_utf8 == 304  # 23 % of this subset
    assert {s.text_encoding for s in legacy} == {"gb18030"}
    text = "\n".join(s.text or "" for s in legacy)
    assert text.count("…") > 200 and "“" in text and "’" in text
    assert re.search("[\u0400-\u04ff]{4,}", text) and re.search("[\u3040-\u30ff]", text)
    assert "¡­" not in text and "§" not in text  # the cp1252 mojibake of "…" and Cyrillic


# --------------------------------------------------------------------------- 12. guids and files


def test_guid_that_leaves_data_is_a_fatal_problem_and_reads_nothing(tmp_path: Path):
    root = lab5(tmp_path / "d", [("1", "positive")])
    (root / "secret.txt").write_text("outside data/")
    (root / "secret.jpg").write_bytes((root / "data" / "1.jpg").read_bytes())
    (root / "train.txt").write_text(
        "guid,tag\n1,positive\n../secret,positive\n/etc/hostname,negative\nsub\\x,negative\n"
    )
    dataset = load_dataset(root)

    for sample in dataset.samples[1:]:
        (problem,) = sample.problems
        assert problem.fatal and problem.modality is None
        assert problem.reason.startswith(f"guid {sample.guid!r} holds ")
        assert "outside data/; rename" in problem.reason
        assert (sample.text, sample.image_path, sample.text_path) == (None, None, None)
    code, output = check("--data", str(root))
    assert code == 1 and "unsafe guid: 3 (fatal)" in output


def test_a_300_character_guid_is_one_problem_not_a_traceback(tmp_path: Path):
    long = "a" * 300
    root = lab5(tmp_path / "d", [("1", "positive"), (long, "positive")])
    dataset = load_dataset(root)
    (problem,) = dataset.samples[1].problems
    assert problem.fatal and problem.modality is None
    assert "too long for the file system" in problem.reason
    assert len(problem.reason) < 300  # the name is cut in messages

    code, output = check("--data", str(root))
    assert code == 1 and "1 with fatal problems" in output
    assert "file name too long: 1 (fatal)" in output


def test_any_oserror_reading_a_sample_is_that_samples_problem(tmp_path: Path, monkeypatch):
    root = lab5(tmp_path / "d", [("1", "positive"), ("2", "positive"), ("3", "negative")])
    (root / "data" / "2.txt").unlink()
    (root / "data" / "2.txt").mkdir()  # a folder where the text should be
    real_read, real_stat = Path.read_bytes, Path.stat

    def flaky_read(path: Path) -> bytes:
        if path.name == "3.txt":
            raise OSError(5, "Input/output error")
        return real_read(path)

    def flaky_stat(path: Path, *args, **kwargs):
        if path.name == "3.txt":  # a bad disk sector fails stat() too (old: a traceback)
            raise OSError(5, "Input/output error")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", flaky_read)
    monkeypatch.setattr(Path, "stat", flaky_stat)
    samples = load_dataset(root).samples
    assert samples[0].problems == []
    assert [(p.modality, p.fatal) for p in samples[1].problems] == [("text", True)]
    assert "cannot be read" in samples[1].problems[0].reason
    assert "data/3.txt cannot be read (Input/output error)" in samples[2].problems[0].reason


def test_an_unreadable_dataset_folder_is_one_line(tmp_path: Path, monkeypatch):
    root = lab5(tmp_path / "d", [("1", "positive")])
    real = Path.read_bytes

    def denied(path: Path) -> bytes:
        if path.name == "train.txt":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    code, output = check("--data", str(root))
    assert code == 2 and "train.txt (Permission denied)" in one_error_line(output)

    def stat_denied(path: Path, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "stat", stat_denied)
    code, output = check("--data", str(root))
    assert code == 2 and "Permission denied" in one_error_line(output)


# --------------------------------------------------------------------------- odd index files


def test_unclosed_quote_is_an_error_not_swallowed_rows(tmp_path: Path):
    write_image(tmp_path / "a.jpg", seed=0)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        'guid,text,image_path\na,"she said hi,a.jpg\nb,second,a.jpg\nc,third,a.jpg\n'
    )
    with pytest.raises(
        ValueError, match=r"m.csv is not valid CSV in the row starting at line 2 .*quot"
    ):
        load_dataset(manifest)  # was: one sample, rows b and c silently inside a's text


def test_row_with_extra_cells_is_a_fatal_problem(tmp_path: Path):
    root = lab5(tmp_path / "d", [("1", "positive"), ("2", "negative")])
    (root / "train.txt").write_text("guid,tag\n1,positive\n2,negative,positive\n")
    first, second = load_dataset(root).samples
    assert first.problems == []
    (problem,) = second.problems
    assert problem.fatal and "row 3 of train.txt has 3 cells for 2 columns" in problem.reason


def test_header_spacing_case_bom_crlf_and_blank_lines_are_tolerated(tmp_path: Path):
    root = lab5(tmp_path / "d", [("1", "positive"), ("2", "negative")])
    (root / "train.txt").write_bytes(
        b"\xef\xbb\xbfGUID, Tag\r\n1,positive\r\n\r\n   \r\n2, negative\r\n"
    )
    dataset = load_dataset(root)
    assert [(s.guid, s.label, s.problems) for s in dataset.samples] == [
        ("1", 1, []),
        ("2", 0, []),
    ]
    assert [s.index_line for s in dataset.samples] == [
        (root / "train.txt", 2),
        (root / "train.txt", 5),
    ]


def test_index_with_a_header_and_no_rows_is_one_line(tmp_path: Path):
    root = lab5(tmp_path / "d", [])
    code, output = check("--data", str(root))
    assert code == 2 and "has no samples" in one_error_line(output)


def test_an_index_that_is_a_folder_is_one_line_not_a_dropped_split(tmp_path: Path):
    root = lab5(tmp_path / "d", [("1", "positive")])
    (root / "test_without_label.txt").write_text("guid,tag\n1,null\n")
    (root / "train.txt").unlink()
    (root / "train.txt").mkdir()  # was: the train split silently skipped
    code, output = check("--data", str(root))
    assert code == 2 and "train.txt is not a file" in one_error_line(output)


def test_jsonl_text_may_hold_line_separator_characters(tmp_path: Path):
    write_image(tmp_path / "a.jpg", seed=0)
    text = "first\u2028second\u0085third\x1cfourth"
    line = json.dumps({"guid": "a", "text": text, "image_path": "a.jpg"}, ensure_ascii=False)
    (tmp_path / "m.jsonl").write_text(line + "\n" + line.replace('"a"', '"b"') + "\n")
    dataset = load_dataset(tmp_path / "m.jsonl")
    assert [(s.guid, s.text, s.index_line[1]) for s in dataset.samples] == [
        ("a", text, 1),
        ("b", text, 2),
    ]


def test_manifest_with_a_repeated_column_is_one_line(tmp_path: Path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("guid,text,image_path,text\na,x,a.jpg,y\n")
    with pytest.raises(ValueError, match="has column 'text' twice"):
        load_dataset(manifest)


def test_sample_fields_for_the_cache_sources(tmp_path: Path):
    root = lab5(tmp_path / "d", [("1", "positive")])
    (sample,) = load_dataset(root).samples
    assert sample.text_path == root / "data" / "1.txt"
    assert sample.index_line == (root / "train.txt", 2)

    write_image(tmp_path / "a.jpg", seed=0)
    (tmp_path / "t.txt").write_text("from a file")
    buffer = io.StringIO()
    buffer.write('guid,text,text_path,image_path\na,"multi\nline",,a.jpg\nb,,t.txt,a.jpg\n')
    (tmp_path / "m.csv").write_text(buffer.getvalue())
    inline, from_file = load_dataset(tmp_path / "m.csv").samples
    assert (inline.text_path, inline.index_line) == (None, (tmp_path / "m.csv", 3))
    assert (from_file.text_path, from_file.index_line) == (
        tmp_path / "t.txt",
        (tmp_path / "m.csv", 4),
    )


def test_synth_refuses_a_folder_holding_other_data(tmp_path: Path):
    real = lab5(tmp_path / "real", [("1", "positive")])
    result = cli("data", "synth", "--out", real, "--n-train", 10)
    assert result.exit_code == 2 and "not an earlier synthetic dataset" in result.output
    assert (real / "train.txt").read_text() == "guid,tag\n1,positive\n"  # untouched

    synth = tmp_path / "synth"
    for _ in range(2):  # writing over an earlier synthetic dataset is fine
        result = cli("data", "synth", "--out", synth, "--n-train", 10, "--n-test", 2)
        assert result.exit_code == 0, result.output
    assert set(load_dataset(synth).classes) <= set(LABELS)
