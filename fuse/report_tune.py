"""The report's tuning section: for each tuned cell of a run (RUN/tune.json, fuse.tune), its
trial history (best inner macro-F1 so far per trial, one line per outer fold × seed study),
its parameter importances (fANOVA, averaged over the studies that have them) and the
parameters chosen per outer fold with their inner and outer scores.

`tune_section(run_dir)` returns an HTML fragment ("" for a run without tuning) with the plot
inline as a PNG, so report.html stays one file; `tune_plot` is that PNG. Reads JSON only:
rendering needs neither Optuna nor the studies' SQLite file.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from fusebench.fuse.report import inline_png


def load_tune(run_dir: str | Path) -> dict:
    """RUN/tune.json ({} when the run tuned nothing, or the file is unreadable)."""
    path = Path(run_dir) / "tune.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def best_so_far(history: list[dict]) -> list[float]:
    """Per counted trial (COMPLETE or PRUNED, in trial order), the best COMPLETE value so far
    (NaN until one has completed)."""
    out, best = [], -np.inf
    for t in sorted(history, key=lambda t: t["number"]):
        if t["state"] == "COMPLETE" and t["value"] is not None:
            best = max(best, float(t["value"]))
        out.append(best if np.isfinite(best) else float("nan"))
    return out


def mean_importances(studies: list[dict]) -> tuple[dict[str, float], int]:
    """param -> mean importance over the studies that have importances, and how many do."""
    have = [s["importances"] for s in studies if s.get("importances")]
    keys = sorted({k for imp in have for k in imp})
    means = {k: float(np.mean([imp.get(k, 0.0) for imp in have])) for k in keys}
    return dict(sorted(means.items(), key=lambda kv: -kv[1])), len(have)


def tune_plot(cell: str, record: dict) -> bytes:
    """PNG: trial history (left) and mean parameter importances (right) of one tuned cell."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), width_ratios=(3, 2))
    curves = [best_so_far(s["history"]) for s in record["studies"]]
    for curve in curves:
        left.plot(range(1, len(curve) + 1), curve, color="#9aa7b8", lw=1, alpha=0.8)
    longest = max((len(c) for c in curves), default=0)
    if longest:
        padded = np.full((len(curves), longest), np.nan)
        for i, c in enumerate(curves):
            padded[i, : len(c)] = c
        with np.errstate(all="ignore"):
            mean = np.nanmean(padded, axis=0)
        left.plot(range(1, longest + 1), mean, color="#1f5fbf", lw=2.2, label="mean of studies")
        left.legend(loc="lower right", fontsize=8)
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_xlabel("trial")
    left.set_ylabel("best inner macro-F1 so far")
    left.set_title("trial history (one line per outer fold × seed)", fontsize=10)
    means, n = mean_importances(record["studies"])
    if means:
        keys = list(means)[::-1]
        right.barh(keys, [means[k] for k in keys], color="#1f5fbf", height=0.5)
        right.set_ylim(-0.75, max(len(keys), 3) - 0.25)  # thin bars, even for one parameter
        right.set_xlim(0, 1)
        right.set_title(f"parameter importance (fANOVA, mean of {n} studies)", fontsize=10)
    else:
        right.axis("off")
        right.text(0.5, 0.5, "importances: too few trials", ha="center", va="center")
    fig.suptitle(cell, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e3 else f"{value:.3f}"
    return str(value)


def _study_rows(record: dict) -> str:
    rows = []
    for s in record["studies"]:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(s["params"].items())) or "defaults"
        inner = "-" if s["inner_macro_f1"] is None else f"{s['inner_macro_f1']:.3f}"
        cells = (
            s["seed"],
            s["fold"],
            params,
            inner,
            f"{s['outer_macro_f1']:.3f}",
            f"{s['n_complete']} / {s['n_pruned']}",
        )
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = ("seed", "outer fold", "chosen parameters", "inner F1", "outer F1", "done / pruned")
    header = "".join(f"<th>{h}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _importance_line(record: dict) -> str:
    means, n = mean_importances(record["studies"])
    if not means:
        why = next((s["importances_note"] for s in record["studies"] if s["importances_note"]), "")
        return f"<p class='muted'>Parameter importances: not available ({html.escape(why)}).</p>"
    parts = ", ".join(f"{html.escape(k)} {v:.2f}" for k, v in means.items())
    return f"<p>Parameter importance (fANOVA, mean of {n} studies): {parts}.</p>"


def tune_section(run_dir: str | Path) -> str:
    """The HTML fragment of a run's tuned cells ("" when it tuned none)."""
    data = load_tune(run_dir)
    if not data:
        return ""
    parts = [
        "<h3>Tuning (nested)</h3><p class='muted'>Each outer fold × seed ran its own Optuna "
        "study (TPE; trials scored on inner folds of that fold's training rows only); the best "
        "trial was refitted on the training rows and scored once on the outer fold, so the "
        "tuned row of the table is scored like the untuned ones.</p>"
    ]
    for cell, record in data.items():
        space = "; ".join(record.get("space", []))
        parts.append(
            f"<h4>{html.escape(cell)}</h4><p class='muted'>{record['trials']} trials per study, "
            f"{record['inner_folds']} inner folds; space: {html.escape(space)}</p>"
            f"{inline_png(tune_plot(cell, record), f'tuning of {cell}')}"
            f"{_importance_line(record)}{_study_rows(record)}"
        )
    return "".join(parts)
