"""`fusebench report RUN [RUN ...]`: one self-contained HTML page from finished run folders.

Self-contained means a file someone can mail or open on an air-gapped machine: the styles
are inline and every plot is a base64 `data:` PNG; nothing is fetched. Each run gets one
section (ranked table, heat map, score plot, learning curves, confusion matrices,
provenance); several runs also get a combined ranking when their protocol, classes and rows
match, and a sentence saying why not otherwise. Every string that comes from a run folder
goes through html.escape: cell names, guids and paths are data, never markup.

The plots are the run folder's own PNGs; one that is missing or damaged is drawn again from
results.json (fuse.report.write_plots), so a report never shows a stale or broken image.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from fusebench.fuse._util import STAGING, OutputError, os_error_line, write_atomic
from fusebench.fuse.report import (
    CELL_HEADER,
    cell_rows,
    ensemble_rows,
    fits_phrase,
    history_cells,
    inline_png,
    mean_pm,
    seed_sd,
    table_footer,
    write_plots,
)

PLOTS = (  # (file, heading, what it shows)
    ("heatmap.png", "Heat map", "mean macro-F1 per head (rows) and encoder pair (columns)"),
    ("scores.png", "Scores", "macro-F1 and accuracy per cell, mean ± std over folds x seeds"),
    ("learning_curves.png", "Learning curves", "torch heads: val macro-F1 and train loss"),
    ("confusion.png", "Confusion matrices", "counts summed over folds x seeds"),
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class RunFolder:
    """A finished run folder, read and checked: what a report section is made from."""

    path: Path
    results: dict
    config: dict
    predictions: list = field(default_factory=list)  # predictions.json records, if any

    @property
    def name(self) -> str:
        return self.path.name


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path} is damaged ({what} is not valid JSON: {e}); rerun the run"
        ) from None


def _check_results(path: Path, results: Any) -> None:
    """The fields a report reads, present and consistent; else one line naming the first gap."""
    where = path / "results.json"
    if not isinstance(results, dict) or not isinstance(results.get("cells"), dict):
        raise ValueError(
            f"{where} has no 'cells': not a run folder of this fusebench version "
            "(an older run?); rerun it with `fusebench fuse` or `fusebench compare`"
        )
    for key in ("ranking", "classes", "runs"):
        if not isinstance(results.get(key), list):
            raise ValueError(f"{where} is damaged: '{key}' is missing or not a list; rerun the run")
    if not results["ranking"]:
        raise ValueError(f"{where} ranks no cells (an empty run); rerun it")
    for cell_id in results["ranking"]:
        cell = results["cells"].get(cell_id)
        try:
            for key in ("accuracy", "macro_f1", "weighted_f1", "train_time_s", "n_params"):
                float(cell["summary"][key]["mean"]), float(cell["summary"][key]["std"])
            cell["head"], cell["summary"]["confusion_matrix"]  # noqa: B018 - presence check
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{where} is damaged: cell {cell_id!r} has no complete summary; rerun the run"
            ) from None
    for k, run in enumerate(results["runs"]):
        if not isinstance(run, dict) or not {"cell", "seed", "fold"} <= run.keys():
            raise ValueError(f"{where} is damaged: runs[{k}] lacks cell/seed/fold; rerun the run")


def load_run(path: str | Path) -> RunFolder:
    """Reads results.json, config.yaml and (if present) predictions.json of a finished run;
    a missing, unfinished or damaged folder is one ValueError/FileNotFoundError line."""
    path = Path(path)
    if path.name.endswith(STAGING):
        raise ValueError(
            f"{path} is an unfinished run (its name ends in {STAGING}: still running, or killed "
            "midway); wait for it, or rerun it"
        )
    if not path.is_dir():
        what = "is a file, not a run folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"{path} {what}; pass a folder that `fusebench fuse` or `compare` wrote (runs/<stamp>-...)"
        )
    for name in ("results.json", "config.yaml"):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path} has no {name}: not a finished fusebench run folder; pass one that "
                "`fusebench fuse` or `compare` wrote, or rerun it"
            )
    results = _read_json(path / "results.json", "results.json")
    _check_results(path, results)
    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        first = " ".join(str(e).split())[:120]
        raise ValueError(f"{path / 'config.yaml'} is damaged ({first}); rerun the run") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.yaml'} is damaged (not a mapping); rerun the run")
    predictions = []
    if (path / "predictions.json").is_file():
        predictions = _read_json(path / "predictions.json", "predictions.json")
        if isinstance(predictions, dict):  # one record, or {"records": [...]}
            predictions = predictions.get("records", [predictions])
        if not isinstance(predictions, list):
            raise ValueError(f"{path / 'predictions.json'} is damaged (not a list of records)")
    return RunFolder(path=path, results=results, config=config, predictions=predictions)


# ------------------------------------------------------------------------------- plots


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == PNG_MAGIC and path.stat().st_size > 100
    except OSError:
        return False


def plot_images(run: RunFolder) -> dict[str, bytes]:
    """file name -> PNG bytes: the run's own plots, or drawn again where one is missing or
    damaged (a run folder is never written to: the redraw goes to a temporary folder)."""
    wanted = [name for name, _, _ in PLOTS]
    if not history_cells(run.results):
        wanted.remove("learning_curves.png")  # no torch cell, no curves
    images = {n: (run.path / n).read_bytes() for n in wanted if _is_png(run.path / n)}
    if len(images) < len(wanted):
        with tempfile.TemporaryDirectory() as tmp:
            for p in write_plots(Path(tmp), run.results):
                images.setdefault(p.name, p.read_bytes())
    return images


# ------------------------------------------------------------------------------- HTML

CSS = """
:root { color-scheme: light; --line: #d8dce3; --muted: #5b6472; --best: #eaf6ea; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1c2330; margin: 0; background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 20px 60px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
          padding: 18px 22px; margin: 22px 0; }
h1 { font-size: 1.6rem; margin: 0 0 4px; }
h2 { font-size: 1.3rem; margin: 0 0 6px; overflow-wrap: anywhere; }
h3 { font-size: 1.05rem; margin: 22px 0 6px; }
p, li { max-width: 80ch; }
.muted { color: var(--muted); font-size: 0.9rem; }
.scroll { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; font-size: 0.86rem; width: 100%; }
th, td { padding: 5px 9px; border-bottom: 1px solid var(--line); white-space: nowrap;
         text-align: left; }
th { background: #eef1f5; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: var(--best); font-weight: 600; }
tbody tr:hover td { background: #f2f5fa; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0;
      border: 1px solid var(--line); border-radius: 6px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
dt { font-weight: 600; color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
pre { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.82rem; }
code { font-size: 0.85rem; overflow-wrap: anywhere; }
details { margin: 8px 0; } summary { cursor: pointer; color: var(--muted); }
nav a { margin-right: 14px; }
.warn { color: #9a3b00; font-weight: 600; }
"""

NUMBER = re.compile(r"-|[-+]?[\d,]*\.?\d+(?: ± \d*\.?\d+)?|<0\.001")  # 0.512 ± 0.020, -


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, best: int | None = 0) -> str:
    """A scrollable HTML table; columns of numbers are right-aligned; row `best` stands out."""
    num = {i for i in range(len(header)) if rows and all(NUMBER.fullmatch(str(r[i])) for r in rows)}

    def tag(name: str, i: int, value: Any) -> str:
        return (
            f'<{name} class="num">{esc(value)}</{name}>'
            if i in num
            else f"<{name}>{esc(value)}</{name}>"
        )

    head = "".join(tag("th", i, h) for i, h in enumerate(header))
    body = "".join(
        ("<tr class='best'>" if k == best else "<tr>")
        + "".join(tag("td", i, c) for i, c in enumerate(row))
        + "</tr>"
        for k, row in enumerate(rows)
    )
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # repeated values written out, not &id001
        return True


def _value(value: Any) -> str:
    """A config value as HTML: scalars inline, structures as YAML in a <pre>."""
    if isinstance(value, (dict, list)):
        if not value:
            return "<span class='muted'>none</span>"
        text = yaml.dump(value, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True, width=100)
        return f"<pre>{esc(text.rstrip())}</pre>"
    return f"<code>{esc(value)}</code>"


EXCLUDED_SHOWN = 200  # excluded rows listed in the report; the rest are counted


def _rows(rows: Any) -> str:
    """config.yaml rows: the counts in one line each, the per-fold sizes, and the excluded rows
    (guid, split, reason) folded away in a table."""
    if not isinstance(rows, dict):
        return _value(rows)
    rest = {k: v for k, v in rows.items() if k not in ("per_fold", "excluded")}
    parts = [_value(rest)] if rest else []
    folds = rows.get("per_fold") or []
    if folds:
        sizes = [
            [k, *(f.get(key, "") for key in ("fit", "inner_val", "scored"))]
            for k, f in enumerate(folds)
            if isinstance(f, dict)
        ]
        parts.append(_table(["fold", "fit", "inner val", "scored"], sizes, best=None))
    excluded = rows.get("excluded") or []
    if excluded:
        shown = [
            [e.get("guid", ""), e.get("split", ""), e.get("reason", "")]
            if isinstance(e, dict)
            else [e, "", ""]
            for e in excluded[:EXCLUDED_SHOWN]
        ]
        more = len(excluded) - len(shown)
        tail = f"<p class='muted'>... and {more} more (see config.yaml)</p>" if more > 0 else ""
        parts.append(
            f"<details><summary>{len(excluded)} row(s) excluded</summary>"
            f"{_table(['guid', 'split', 'reason'], shown, best=None)}{tail}</details>"
        )
    else:
        parts.append("<span class='muted'>no rows excluded</span>")
    return "".join(parts)


def _per_class(run: RunFolder) -> str:
    """Per-class F1 (mean ± std) per cell, ranked: folded away, it is wide."""
    classes = run.results["classes"]
    rows = []
    for cell_id in run.results["ranking"]:
        per = run.results["cells"][cell_id]["summary"].get("per_class", {})
        f1 = [per.get(c, {}).get("f1") for c in classes]
        rows.append([cell_id, *(f"{s['mean']:.3f} ± {s['std']:.3f}" if s else "-" for s in f1)])
    return (
        f"<details><summary>per-class F1 per cell</summary>"
        f"{_table(['cell', *classes], rows)}</details>"
    )


def _provenance(run: RunFolder) -> str:
    """Where the numbers come from: caches, protocol, seeds, rows, versions, stale caches,
    and which models `predict` used."""
    cfg = run.config
    stale = cfg.get("stale_caches") or {}
    stale_html = (
        f"<span class='warn'>yes: the data of these caches changed since extraction "
        f"(--allow-stale)</span>{_value(stale)}"
        if stale
        else "<code>no</code> (every cache matched its dataset)"
        + (" — --allow-stale was given" if cfg.get("allow_stale") else "")
    )
    items = [
        ("run folder", _value(run.path.resolve())),
        ("created", _value(cfg.get("created", _mtime(run.path)))),
        ("command", _value(cfg.get("command", "?"))),
        (
            "replay",
            _value(
                f"fusebench {cfg.get('command', 'compare')} --config {run.path / 'config.yaml'}"
            ),
        ),
        (
            "grid",
            _value({k: cfg[k] for k in ("text", "image", "heads", "set", "sweep") if k in cfg}),
        ),
        ("cell settings", _cell_settings(cfg)),
        ("features", _value(cfg.get("features", "?"))),
        ("caches", _value(cfg.get("caches", {}))),
        ("stale caches", stale_html),
        ("protocol", _value(cfg.get("protocol", run.results.get("protocol", "?")))),
        ("seeds", _value(", ".join(map(str, cfg.get("seeds", []))) or "?")),
        ("epochs", _value(cfg.get("epochs"))),
        ("device", _value(cfg.get("device"))),
        ("class weights", _value(cfg.get("class_weights"))),
        ("classes", _value(", ".join(map(str, run.results["classes"])))),
        ("rows", _rows(cfg.get("rows", {}))),
        ("versions", _value(cfg.get("versions", {}))),
        ("predict used", _predictions(run)),
    ]
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f"<h3>Provenance</h3><dl>{dl}</dl>"


def _cell_settings(cfg: dict) -> str:
    """Each cell's overrides and resolved head config (config.yaml cells), folded away."""
    cells = cfg.get("cells")
    if not isinstance(cells, dict) or not cells:
        return "<span class='muted'>not recorded</span>"
    settings = {
        cid: {k: c[k] for k in ("overrides", "params") if k in c} if isinstance(c, dict) else c
        for cid, c in cells.items()
    }
    return f"<details><summary>{len(cells)} cell(s)</summary>{_value(settings)}</details>"


def _predictions(run: RunFolder) -> str:
    if not run.predictions:
        return "<span class='muted'>no predictions made from this run yet</span>"
    rows = []
    for rec in run.predictions:
        rec = rec if isinstance(rec, dict) else {"record": rec}
        models = rec.get("model_dirs") or rec.get("models") or []
        rows.append(
            [
                rec.get("created", ""),
                rec.get("cell", ""),
                rec.get("mode", ""),
                rec.get("split", ""),
                rec.get("out", ""),
                len(models) if isinstance(models, list) else models,
            ]
        )
    return _table(["created", "cell", "mode", "split", "out", "models"], rows, best=None)


def _mtime(path: Path) -> str:
    stamp = dt.datetime.fromtimestamp(path.stat().st_mtime).astimezone()
    return stamp.isoformat(timespec="seconds")


def run_section(run: RunFolder, index: int, cell: str | None = None) -> str:
    res = run.results
    best = res["ranking"][0]
    s = res["cells"][best]["summary"]
    sd = seed_sd(s)
    spread = "" if sd is None else f", seed-sd {sd:.3f}"
    lead = (
        f"<p>{len(res['ranking'])} cell(s), {len(res['runs'])} fits. Best: <b>{esc(best)}</b> "
        f"macro-F1 {mean_pm(s['macro_f1'])}{esc(spread)} "
        f"({esc(fits_phrase(res, best))}).<br><span class='muted'>Protocol: "
        f"{esc(res.get('protocol', '?'))}</span></p>"
    )
    footer = "".join(f"<p class='muted'>{esc(line)}</p>" for line in table_footer(res))
    images = plot_images(run)
    plots = "".join(
        f"<h3>{esc(title)}</h3><p class='muted'>{esc(what)}</p>{inline_png(images[name], title)}"
        for name, title, what in PLOTS
        if name in images
    )
    return (
        f'<section id="run-{index}"><h2>{esc(run.name)}</h2>{lead}'
        f"<h3>Ranking</h3>{_table(CELL_HEADER, cell_rows(res) + ensemble_rows(res))}{footer}"
        f"{_per_class(run)}{plots}{_analysis(run, cell)}{_provenance(run)}</section>"
    )


def _mismatch(runs: Sequence[RunFolder]) -> str | None:
    """Why the runs' cells cannot share one ranking, or None when they can."""
    first = runs[0]
    for run in runs[1:]:
        if run.results.get("protocol") != first.results.get("protocol"):
            return f"protocols differ ({first.name}: {first.results.get('protocol')!s}; {run.name}: {run.results.get('protocol')!s})"
        if run.results["classes"] != first.results["classes"]:
            return f"classes differ ({first.name}: {', '.join(first.results['classes'])}; {run.name}: {', '.join(run.results['classes'])})"
    for run in runs:
        rows = run.config.get("rows")
        if not isinstance(rows, dict) or not rows.get("digest"):
            return (
                f"{run.name} does not record which rows it scored (its config.yaml has no "
                "rows.digest: an older run), so it cannot be shown to share the others' rows; "
                "rerun it to rank it with them"
            )
    for run in runs[1:]:
        rows_a, rows_b = first.config["rows"], run.config["rows"]
        if rows_a["digest"] != rows_b["digest"] or rows_a.get("per_fold") != rows_b.get("per_fold"):
            return (
                f"their rows differ ({first.name} and {run.name} fitted and scored other rows: "
                "another dataset, other labels, or rows left out)"
            )
    return None


def combined_section(runs: Sequence[RunFolder]) -> str:
    """All cells of all runs ranked together, when the runs scored on the same protocol,
    classes and rows; else one sentence saying which differ."""
    if len(runs) < 2:
        return ""
    why = _mismatch(runs)
    if why:
        return (
            f"<section><h2>Combined ranking</h2><p>No combined ranking: {esc(why)}. "
            "Cells of different protocols, classes or rows are not comparable.</p></section>"
        )
    entries = []
    for k, run in enumerate(runs, start=1):
        for cell_id, row in zip(run.results["ranking"], cell_rows(run.results)):
            mean = run.results["cells"][cell_id]["summary"]["macro_f1"]["mean"]
            entries.append((mean, [f"{k}: {run.name}", *row[1:]]))
    entries.sort(key=lambda e: -e[0])
    rows = [[str(i), *row] for i, (_, row) in enumerate(entries, start=1)]
    return (
        "<section><h2>Combined ranking</h2><p>All runs share the protocol "
        f"({esc(runs[0].results.get('protocol', '?'))}), classes and rows (the same guids "
        "with the same labels), so their cells rank together.</p>"
        f"{_table(['#', 'run', *CELL_HEADER[1:]], rows)}</section>"
    )


def _analysis(run: RunFolder, cell: str | None) -> str:
    """Robustness (fuse.robustness) and error galleries of `cell` (fuse.gallery)."""
    from fusebench.fuse.gallery import gallery_section
    from fusebench.fuse.report_tune import tune_section
    from fusebench.fuse.robustness import report_section

    tuning = tune_section(run.path)  # the tuned cells' trial history and importances
    return (
        report_section(run.path) + tuning + gallery_section(run.path, run.results, run.config, cell)
    )


def render(runs: Sequence[RunFolder], cell: str | None = None) -> str:
    """The whole page as one string."""
    created = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    nav = "".join(f'<a href="#run-{k}">{esc(r.name)}</a>' for k, r in enumerate(runs, start=1))
    sections = [run_section(r, k, cell) for k, r in enumerate(runs, start=1)]
    body = combined_section(runs) + "".join(sections)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>fusebench report: {esc(', '.join(r.name for r in runs))}</title>"
        f"<style>{CSS}</style></head><body><main>"
        f"<h1>fusebench report</h1><p class='muted'>{len(runs)} run(s), written {esc(created)}. "
        "Self-contained: open it anywhere, nothing is fetched.</p>"
        f"<nav>{nav}</nav>{body}</main></body></html>\n"
    )


def write_report(
    run_dirs: Sequence[str | Path], out: str | Path = "report.html", cell: str | None = None
) -> Path:
    """Reads every run folder first (one line for the first bad one), then writes one HTML
    file atomically; returns its path."""
    if not run_dirs:
        raise ValueError("give at least one run folder, e.g. fusebench report runs/<stamp>-compare")
    runs = [load_run(p) for p in run_dirs]
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file path such as {out / 'report.html'}")
    page = render(runs, cell)  # cell: the error galleries' (default: each run's best)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda fh: fh.write(page))
    except OSError as e:
        e.filename = str(out)  # the file asked for, not its temporary twin
        line = os_error_line(e, option="--out")
        raise OutputError(f"cannot write the report: {line}", e.errno) from None
    return out
