"""What lands in a run folder besides the model: tables, CSVs and plots (matplotlib, Agg)."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

COLUMNS = (  # (summary key, table header, format)
    ("accuracy", "accuracy", "{:.3f}"),
    ("macro_f1", "macro-F1", "{:.3f}"),
    ("weighted_f1", "weighted-F1", "{:.3f}"),
    ("train_time_s", "train s", "{:.2f}"),
)


def ranked(summaries: Mapping[str, dict]) -> list[str]:
    """Head names, best mean macro-F1 first."""
    return sorted(summaries, key=lambda h: -summaries[h]["macro_f1"]["mean"])


def format_table(summaries: Mapping[str, dict]) -> str:
    """A plain-text table, one head per line, sorted by macro-F1: mean ± std per column."""
    header = ["head", *(title for _, title, _ in COLUMNS), "params", "runs"]
    rows = []
    for head in ranked(summaries):
        s = summaries[head]
        cells = [head]
        for key, _, fmt in COLUMNS:
            cells.append(f"{fmt.format(s[key]['mean'])} ± {fmt.format(s[key]['std'])}")
        cells += [f"{round(s['n_params']['mean']):,}", str(s["macro_f1"]["n"])]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> None:
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


def summary_rows(summaries: Mapping[str, dict]) -> list[dict]:
    """results.csv: one row per head (ranked), mean and std of each summary metric."""
    out = []
    for rank, head in enumerate(ranked(summaries), start=1):
        s = summaries[head]
        row = {"rank": rank, "head": head, "runs": s["macro_f1"]["n"]}
        for key in ("accuracy", "macro_f1", "weighted_f1", "train_time_s", "n_params"):
            row[f"{key}_mean"] = round(s[key]["mean"], 6)
            row[f"{key}_std"] = round(s[key]["std"], 6)
        out.append(row)
    return out


def prediction_rows(
    head: str,
    seed: int,
    fold: int,
    guid: Iterable[str],
    y_true: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
) -> list[dict]:
    """val_predictions.csv rows: one per scored row, with the probability of every class."""
    pred = proba.argmax(axis=1)
    rows = []
    for g, t, p, pr in zip(guid, y_true, pred, proba):
        row = {
            "head": head,
            "seed": seed,
            "fold": fold,
            "guid": g,
            "true": classes[t],
            "pred": classes[p],
        }
        row.update({f"p_{c}": round(float(v), 6) for c, v in zip(classes, pr)})
        rows.append(row)
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _draw_confusion(ax, cm: np.ndarray, classes: Sequence[str], title: str) -> None:
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # row-normalized: recall per class
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[i, j] > 0.5 else "black",
            )


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    _draw_confusion(ax, cm, classes, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion_grid(cms: Mapping[str, np.ndarray], classes: Sequence[str], path: Path) -> None:
    """One confusion matrix per head (counts summed over seeds × folds), in the given order."""
    plt = _pyplot()
    n = len(cms)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.9 * rows), squeeze=False)
    for ax, (head, cm) in zip(axes.flat, cms.items()):
        _draw_confusion(ax, cm, classes, head)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(summaries: Mapping[str, dict], path: Path) -> None:
    """Grouped bars (accuracy, macro-F1, weighted-F1) per head with ± std error bars."""
    plt = _pyplot()
    heads = ranked(summaries)
    metrics = [(k, t) for k, t, _ in COLUMNS if k != "train_time_s"]
    x = np.arange(len(heads))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(heads) + 2), 4))
    for k, (key, title) in enumerate(metrics):
        means = [summaries[h][key]["mean"] for h in heads]
        stds = [summaries[h][key]["std"] for h in heads]
        ax.bar(
            x + (k - (len(metrics) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            capsize=3,
            label=title,
        )
    ax.set_xticks(x, heads, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (mean ± std over seeds × folds)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
