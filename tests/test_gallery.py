"""Error analysis in the report (fuse/gallery.py): the galleries of a cell's errors and of the
rows where the image helps or hurts, with thumbnails and texts read where extraction read them.

The run folder is made by hand (results.json, config.yaml, val_predictions.csv) over two
caches whose recorded sources point at a small lab5 corpus, so the predictions, and which of
them are wrong, are known exactly."""

from __future__ import annotations

import base64
import csv
import io
import re
import subprocess

import numpy as np
import pytest
from fusebench.cache import TokenFeatures, record_sources, write_features
from fusebench.fuse.gallery import SHOWN, gallery_section
from fusebench.fuse.report_html import load_run, write_report
from PIL import Image

from tests.conftest import cli, make_lab5
from tests.test_report import CLASSES, _chromium, make_results, write_run

TEXT_CELL, FUSION = "txt+none/logreg", "txt+img/concat_mlp"
CHINESE = "今天天气很好"  # written as GB18030, as lab5's texts are


def _cache(path, root, guids, kind, **config):
    """A cache of `kind` (text / image) over guids, recording the corpus files they came from."""
    suffix = ".txt" if kind == "text" else ".jpg"
    rows = [(g, [root / "data" / f"{g}{suffix}"], None) for g in guids]
    feats = TokenFeatures(None, None, {"pooled": np.zeros((len(guids), 4), np.float16)}, {})
    write_features(
        path, guid=guids, split=["train"] * len(guids), label=[0] * len(guids),
        **{kind: feats}, config={"encoder": path.stem, **config}, attrs={"encoder": path.stem},
        sources=record_sources(root, rows),
    )  # fmt: skip
    return {"path": str(path), "fingerprint": "fp", "modalities": [kind]}


def _predictions(guids):
    """val_predictions.csv rows with planted outcomes, two seeds each (averaged by the report):
    text-only wrong on guids[:8], fusion right on guids[:5] of those (image helps: 5) and wrong
    on guids[10:13] where text-only is right (image hurts: 3); confidence grows with the index."""
    rows = []
    for k, g in enumerate(guids):
        true = CLASSES[k % 3]
        for cell, wrong in ((TEXT_CELL, k < 8), (FUSION, 5 <= k < 8 or 10 <= k < 13)):
            pred = CLASSES[(k + 1) % 3] if wrong else true
            conf = 0.5 + 0.02 * k
            p = {c: (conf if c == pred else (1 - conf) / 2) for c in CLASSES}
            for seed in (42, 43):
                rows.append({"cell": cell, "seed": seed, "fold": k % 2, "guid": g, "true": true,
                             "pred": pred, **{f"p_{c}": p[c] for c in CLASSES}})  # fmt: skip
    return rows


@pytest.fixture
def run(tmp_path):
    root = make_lab5(tmp_path / "lab5", n_train=24, n_test=0)
    guids = [str(100 + i) for i in range(24)]
    (root / "data" / "100.txt").write_bytes(CHINESE.encode("gb18030"))
    caches = {
        "txt": _cache(tmp_path / "f" / "txt.h5", root, guids, "text", text_encoding="gb18030"),
        "img": _cache(tmp_path / "f" / "img.h5", root, guids, "image"),
    }
    results = make_results([("txt", None, "logreg", ""), ("txt", "img", "concat_mlp", "")])
    folder = write_run(tmp_path / "runs" / "20250101-000000-compare", results, caches=caches)
    rows = _predictions(guids)
    with open(folder / "val_predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"dir": folder, "root": root, "guids": guids, "results": results}


def _fragment(run, cell=None) -> str:
    r = load_run(run["dir"])
    return gallery_section(r.path, r.results, r.config, cell)


def _thumbs(page: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r'class="gallery-thumb" src="data:image/jpeg;base64,([^"]+)"', page)
    ]


def test_errors_most_confident_first_with_thumbnails_and_texts(run):
    page = _fragment(run, FUSION)
    errors = page.split("<h3>Where the image helps")[0]
    guids = re.findall(r"guid (\d+)</span>", errors)
    assert guids == ["112", "111", "110", "107", "106", "105"]  # wrong rows, by confidence
    assert "6 of 24 scored rows wrong" in errors
    thumbs = _thumbs(errors)
    assert len(thumbs) == 6
    for jpeg in thumbs:
        with Image.open(io.BytesIO(jpeg)) as im:
            assert im.format == "JPEG" and 0 < max(im.size) <= 96
    text_112 = (run["root"] / "data" / "112.txt").read_text().split()
    assert " ".join(text_112) in errors


def test_where_the_image_helps_counts_and_examples(run):
    page = _fragment(run)  # default cell: the run's best; the comparison is always the same
    helps = page.split("<h3>Where the image helps")[1]
    assert "helps on 5</b>" in helps and "hurts on 3</b>" in helps
    assert "both are wrong on 3" in helps
    shown = helps.split("Image hurts")[0]
    assert re.findall(r"guid (\d+)</span>", shown) == ["104", "103", "102", "101", "100"]
    assert CHINESE in page  # the GB18030 text decoded by the encoding the cache recorded


def test_the_best_cell_is_the_default_and_a_bad_cell_is_one_line(run, tmp_path):
    best = run["results"]["ranking"][0]
    assert f"<h3>Errors of {best}</h3>" in _fragment(run)
    r = cli("report", run["dir"], "--cell", "nope/logreg", "--out", tmp_path / "r.html")
    assert r.exit_code != 0 and "--cell 'nope/logreg' is not a cell of this run" in r.output
    assert not (tmp_path / "r.html").exists() and "Traceback" not in r.output
    r = cli("report", run["dir"], "--cell", TEXT_CELL, "--out", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    assert f"<h3>Errors of {TEXT_CELL}</h3>" in (tmp_path / "r.html").read_text()


def test_moved_images_give_texts_only_with_a_note(run):
    for jpg in (run["root"] / "data").glob("*.jpg"):
        jpg.rename(jpg.with_suffix(".moved"))
    page = _fragment(run, FUSION)
    assert not _thumbs(page)
    assert "Dataset files not found" in page and "image file(s) not found" in page
    assert page.count("image not found") >= 6
    assert " ".join((run["root"] / "data" / "112.txt").read_text().split()) in page


def test_a_moved_dataset_is_said_and_the_report_still_renders(run, tmp_path):
    run["root"].rename(tmp_path / "elsewhere")
    page = _fragment(run, FUSION)
    assert f"the dataset is no longer at {run['root'].resolve()}" in page
    assert not _thumbs(page) and "text not found" in page
    assert write_report([run["dir"]], tmp_path / "r.html").is_file()


@pytest.mark.skipif(_chromium() is None, reason="no Chromium binary (apt-get install chromium)")
def test_report_with_galleries_renders_in_headless_chromium(run, tmp_path):
    """Chromium decodes every thumbnail: the DOM has them all with a non-zero natural width."""
    page = write_report([run["dir"]], tmp_path / "report.html").read_text()
    n = len(_thumbs(page))
    errors = 8 if run["results"]["ranking"][0] == TEXT_CELL else 6  # of the run's best cell
    assert n == min(errors, SHOWN) + 5 + 3  # + the image-helps and image-hurts examples
    probe = tmp_path / "probe.html"  # the report plus a script that counts decoded thumbnails
    probe.write_text(
        page.replace(
            "</body>",
            "<script>window.addEventListener('load', () => { const ok = [...document."
            "querySelectorAll('img.gallery-thumb')].filter(i => i.naturalWidth > 0).length;"
            "document.body.insertAdjacentHTML('beforeend', `<p id=probe>decoded=${ok}</p>`);"
            "});</script></body>",
        )
    )
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]  # fmt: skip
    dom = subprocess.run(
        [*base, "--dump-dom", probe.resolve().as_uri()], capture_output=True, text=True, timeout=90
    ).stdout
    assert f"decoded={n}" in dom, dom[-400:]
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,1600",
                    (tmp_path / "report.html").resolve().as_uri()], capture_output=True, timeout=90)  # fmt: skip
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10
