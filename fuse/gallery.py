"""Error analysis for `fusebench report`: where a cell fails, and where the image helps.

`gallery_section(run_dir, results, config, cell=None)` returns one HTML fragment:

* errors: the scored rows the cell (default: the run's best) gets wrong, most confident
  first (SHOWN of them), each with its image thumbnail, its text, the true and the predicted
  class and the confidence;
* where the image helps: on the rows both scored, the rows the best text-only cell gets
  wrong and the best fusion cell right (the image helped), and the reverse (it hurt), with
  counts and EXAMPLES of each.

Predictions come from the run's val_predictions.csv: every fit's scored rows, so each row
was scored once per model seed (its fold's fit); a row's probabilities are averaged over
those seeds, and its prediction and confidence are those of the average.

Texts and images are read where extraction read them: each cache of the run (config.yaml
`caches`) records its data files and the guids they fed (cache/sources.py); texts are
decoded by extraction's rule (UTF-8, a UTF-16/32 BOM, else the encoding the cache recorded,
e.g. GB18030 for lab5, else latin-1); inline manifest texts (CSV / JSONL) come from the
row's line. Images become THUMB_PX JPEG thumbnails inline (base64 data URIs), so the page
stays one self-contained file. A cache, dataset or file that is no longer where it was
recorded (the dataset moved) is said in one note; those rows show what is left (the text
without its image, or neither). Stage two reads no dataset module: plain file reads only.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusebench.texts import decode_text

SHOWN = 12  # errors shown, most confident first
EXAMPLES = 6  # examples of each direction of "where the image helps"
THUMB_PX = 96  # longest side of a thumbnail
TEXT_CHARS = 280  # a longer text is cut (the whole text is in the dataset)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
TEXT_SUFFIXES = {".txt"}

CSS = """
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr));
           gap: 10px; margin: 8px 0 14px; }
.gallery figure { margin: 0; border: 1px solid var(--line, #d8dce3); border-radius: 6px;
                  padding: 8px; display: flex; gap: 8px; background: #fbfcfd; }
.gallery img.gallery-thumb { width: 96px; height: 96px; object-fit: cover; margin: 0;
                             flex: none; }
.gallery .noimg { width: 96px; height: 96px; flex: none; display: flex; align-items: center;
                  justify-content: center; text-align: center; font-size: 0.75rem;
                  color: #5b6472; border: 1px dashed #d8dce3; border-radius: 6px; }
.gallery figcaption { font-size: 0.8rem; overflow-wrap: anywhere; min-width: 0; }
.gallery .lab { font-weight: 600; } .gallery .bad { color: #9a3b00; }
.gallery .txt { display: block; margin-top: 3px; color: #1c2330; }
"""


@dataclass(frozen=True)
class Scored:
    """One scored row of a cell, averaged over the seeds that scored it."""

    guid: str
    true: str
    pred: str
    confidence: float  # the averaged probability of `pred`
    seeds: int

    @property
    def wrong(self) -> bool:
        return self.pred != self.true


def cell_rows(run_dir: Path, cell: str, classes: list[str]) -> dict[str, Scored]:
    """guid -> Scored for `cell`, from val_predictions.csv ({} when the file is absent)."""
    path = Path(run_dir) / "val_predictions.csv"
    if not path.is_file():
        return {}
    sums: dict[str, list] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row.get("cell") != cell:
                continue
            p = np.array([float(row[f"p_{c}"]) for c in classes])
            entry = sums.setdefault(row["guid"], [row["true"], np.zeros(len(classes)), 0])
            entry[1] += p
            entry[2] += 1
    out = {}
    for guid, (true, total, n) in sums.items():
        mean = total / n
        k = int(mean.argmax())
        out[guid] = Scored(guid, true, classes[k], float(mean[k]), n)
    return out


# ---------------------------------------------------------------- the dataset's files


def decode(raw: bytes, legacy: str | None) -> str:
    """A text as extraction decoded it (fusebench.texts: UTF-8, a UTF-16/32 BOM, else
    `legacy` strictly, else latin-1; never raises)."""
    return decode_text(raw, legacy)[0]


@dataclass
class Sources:
    """Where each guid's image and text were read from, per the run's caches."""

    images: dict[str, Path] = field(default_factory=dict)
    texts: dict[str, Path] = field(default_factory=dict)
    inline: dict[str, tuple[Path, int, str]] = field(default_factory=dict)  # file, line, column
    legacy: str | None = None  # the recorded encoding of non-UTF-8 texts
    notes: list[str] = field(default_factory=list)
    missing_images: int = 0
    missing_texts: int = 0

    def image(self, guid: str) -> str | None:
        """A data URI of the guid's thumbnail; None when it is not found (counted)."""
        path = self.images.get(guid)
        if path is None:
            return None
        uri = thumbnail(path)
        self.missing_images += uri is None
        return uri

    def text(self, guid: str) -> str | None:
        """The guid's text (cut to TEXT_CHARS); None when it is not found (counted)."""
        try:
            if guid in self.texts:
                text = decode(self.texts[guid].read_bytes(), self.legacy)
            elif guid in self.inline:
                text = inline_text(*self.inline[guid], self.legacy)
            else:
                return None
        except (OSError, ValueError, KeyError, IndexError):
            self.missing_texts += 1
            return None
        text = " ".join(text.split())
        return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…"


def thumbnail(path: Path) -> str | None:
    """A THUMB_PX JPEG of the image at path as a base64 data URI; None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=75)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def inline_text(path: Path, line: int, column: str, legacy: str | None) -> str:
    """The text of a manifest row (CSV or JSONL) ending on 1-based `line` of path."""
    lines = path.read_bytes().splitlines()
    raw = decode(lines[line - 1], legacy)
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return str(json.loads(raw)[column])
    header = decode(lines[0], legacy)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    return str(next(csv.DictReader([header, raw], delimiter=delimiter))[column])


def read_sources(config: Mapping) -> Sources:
    """The data files of every cache of a run (config.yaml `caches`); notes for a cache that
    is gone or records no sources."""
    from fusebench.cache.opening import reading
    from fusebench.cache.reader import read_header

    out = Sources()
    for enc, entry in (config.get("caches") or {}).items():
        path = Path(str((entry or {}).get("path", "")))
        if not path.is_file():
            out.notes.append(f"cache {enc} is no longer at {path}")
            continue
        try:
            with reading(path) as f:
                _, cache_config, _ = read_header(f, path)
                raw = f["sources"][()] if "sources" in f else None
        except Exception as e:  # a damaged cache: the report goes on without its files
            out.notes.append(f"cache {path} cannot be read ({type(e).__name__})")
            continue
        if raw is None:
            out.notes.append(f"{path} records no data files (a cache older than that)")
            continue
        sources = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        out.legacy = out.legacy or cache_config.get("text_encoding")
        _add_files(out, sources, cache_config, entry.get("modalities") or [])
    return out


def _add_files(out: Sources, sources: Mapping, cache_config: Mapping, modalities: list) -> None:
    """Files of one cache's `sources` record into out, by guid and kind."""
    root = Path(str(sources.get("root", "")))
    if not root.is_dir():
        out.notes.append(
            f"the dataset is no longer at {root} (moved or removed; put it back there, or "
            "extract it again where it is now, to see its texts and images)"
        )
    column = (cache_config.get("columns") or {}).get("text", "text")
    for key, rec in (sources.get("files") or {}).items():
        if not isinstance(rec, dict):
            continue
        path = root / key
        suffix = path.suffix.lower()
        for guid in rec.get("guids", []):
            if suffix in IMAGE_SUFFIXES and "image" in modalities:
                out.images.setdefault(str(guid), path)
            elif suffix in TEXT_SUFFIXES and "text" in modalities:
                out.texts.setdefault(str(guid), path)
        if "text" in modalities and suffix in (".csv", ".tsv", ".jsonl", ".json", ".ndjson"):
            for guid, line, _ in rec.get("lines", []):
                out.inline.setdefault(str(guid), (path, int(line), column))


# ---------------------------------------------------------------- HTML


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _figure(row: Scored, src: Sources, *, wrong: bool = True) -> str:
    uri, text = src.image(row.guid), src.text(row.guid)
    img = (
        f'<img class="gallery-thumb" src="{uri}" alt="image of {_esc(row.guid)}">'
        if uri
        else "<span class='noimg'>image not found</span>"
    )
    shown = _esc(text) if text is not None else "<i class='muted'>text not found</i>"
    mark = "bad" if wrong else "lab"
    return (
        f"<figure>{img}<figcaption><span class='lab'>true {_esc(row.true)}</span> · "
        f"<span class='{mark}'>predicted {_esc(row.pred)}</span> "
        f"({row.confidence:.2f})<br><span class='muted'>guid {_esc(row.guid)}</span>"
        f"<span class='txt'>{shown}</span></figcaption></figure>"
    )


def _gallery(rows: list[Scored], src: Sources, *, wrong: bool = True) -> str:
    if not rows:
        return "<p class='muted'>none</p>"
    return "<div class='gallery'>" + "".join(_figure(r, src, wrong=wrong) for r in rows) + "</div>"


def pick_cell(results: Mapping, cell: str | None) -> str:
    """`cell`, checked against the run's cells, or the run's best."""
    if cell is None:
        return results["ranking"][0]
    if cell not in results["cells"]:
        shown = ", ".join(results["ranking"][:8])
        raise ValueError(f"--cell {cell!r} is not a cell of this run; its cells: {shown}")
    return cell


def best_of(results: Mapping, *, image: bool) -> str | None:
    """The best-ranked cell with text and (image=True) an image, or (False) text only."""
    for cid in results["ranking"]:
        c = results["cells"][cid]
        if c.get("text") and bool(c.get("image")) == image:
            return cid
    return None


def errors_html(run_dir: Path, results: Mapping, cell: str, src: Sources) -> str:
    rows = cell_rows(run_dir, cell, list(results["classes"]))
    wrong = sorted((r for r in rows.values() if r.wrong), key=lambda r: (-r.confidence, r.guid))
    return (
        f"<h3>Errors of {_esc(cell)}</h3><p class='muted'>{len(wrong)} of {len(rows)} scored "
        f"rows wrong (probabilities averaged over the seeds that scored each row); the "
        f"{min(SHOWN, len(wrong))} most confident errors first.</p>{_gallery(wrong[:SHOWN], src)}"
    )


def image_helps_html(run_dir: Path, results: Mapping, src: Sources) -> str:
    text_cell, fusion = best_of(results, image=False), best_of(results, image=True)
    if text_cell is None or fusion is None:
        return (
            "<h3>Where the image helps</h3><p class='muted'>Needs a text-only cell and a "
            "text+image cell in the run (e.g. --image vit,none).</p>"
        )
    classes = list(results["classes"])
    a, b = cell_rows(run_dir, text_cell, classes), cell_rows(run_dir, fusion, classes)
    both = sorted(set(a) & set(b))
    helps = [b[g] for g in both if a[g].wrong and not b[g].wrong]
    hurts = [b[g] for g in both if not a[g].wrong and b[g].wrong]
    n_both_wrong = sum(a[g].wrong and b[g].wrong for g in both)
    helps.sort(key=lambda r: (-r.confidence, r.guid))
    hurts.sort(key=lambda r: (-r.confidence, r.guid))
    return (
        f"<h3>Where the image helps</h3><p>Best text-only cell <b>{_esc(text_cell)}</b> vs "
        f"best fusion cell <b>{_esc(fusion)}</b>, on the {len(both)} rows both scored: the "
        f"image <b>helps on {len(helps)}</b> rows (text-only wrong, fusion right) and "
        f"<b>hurts on {len(hurts)}</b> (the reverse); both are wrong on {n_both_wrong}.</p>"
        f"<h4>Image helps: {len(helps)} rows (fusion's prediction shown)</h4>"
        f"{_gallery(helps[:EXAMPLES], src, wrong=False)}"
        f"<h4>Image hurts: {len(hurts)} rows (fusion's prediction shown)</h4>"
        f"{_gallery(hurts[:EXAMPLES], src)}"
    )


def gallery_section(
    run_dir: Path, results: Mapping, config: Mapping, cell: str | None = None
) -> str:
    """The HTML fragment (see the module docstring): errors of `cell` (default: the best),
    where the image helps, and a note when the dataset's files were not found."""
    cell = pick_cell(results, cell)
    if not (Path(run_dir) / "val_predictions.csv").is_file():
        return "<h3>Error analysis</h3><p class='muted'>No val_predictions.csv in this run.</p>"
    src = read_sources(config)
    body = errors_html(run_dir, results, cell, src) + image_helps_html(run_dir, results, src)
    return f"<style>{CSS}</style>{_missing_note(src)}{body}"


def _missing_note(src: Sources) -> str:
    """One note when caches, the dataset or some of its files were not found (filled in once
    the galleries were drawn: the counts are known then). Drawn first, so put before them."""
    lines = list(dict.fromkeys(src.notes))
    if src.missing_images:
        lines.append(f"{src.missing_images} image file(s) not found")
    if src.missing_texts:
        lines.append(f"{src.missing_texts} text(s) not found")
    if not lines:
        return ""
    return (
        "<p class='warn'>Dataset files not found: " + _esc("; ".join(lines)) + ". Rows show "
        "what was found (texts without images, or neither); the numbers above are unaffected."
        "</p>"
    )
