"""What a run folder shows besides its models: the stdout table, the CSV writer and the plots
(matplotlib, Agg), all drawn from its results.json dict (cells, ranking, runs), so a run on
disk can be tabled and plotted again without retraining (`fusebench report` does).

    cells_table(results)          the ranked table `fuse` and `compare` print: each cell vs
                                  the best (Δ F1, p, best / tied / worse: fuse.significance)
                                  and the ensemble row last (compare --ensemble K)
    write_plots(run_dir, results) heatmap.png, scores.png, learning_curves.png, confusion.png
"""

from __future__ import annotations

import base64
import csv
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from fusebench.fuse.significance import tied_mark


def write_csv(path: Path, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> None:
    """rows as CSV (csv module: quotes any comma or newline a guid may hold)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _draw_confusion(ax, cm: np.ndarray, classes: Sequence[str], title: str) -> None:
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # row-normalized: recall per class
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    classes = [_label(c) for c in classes]
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


# ------------------------------------------------------------------ the table

CELL_METRICS = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("weighted_f1", "weighted-F1"))
CONFUSION_CAP = 12  # confusion matrices and learning curves: the best cells only


def mean_pm(stat: Mapping, fmt: str = "{:.3f}") -> str:
    """'0.512 ± 0.020'; the mean alone for a single fit, which has no spread."""
    if stat.get("n", 2) < 2:
        return fmt.format(stat["mean"])
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"


def seed_sd(summary: Mapping, metric: str = "macro_f1") -> float | None:
    """std of the per-seed means of a metric; None with a single seed (no spread to show)."""
    stat = summary.get("seed_means", {}).get(metric)
    return None if not stat or stat.get("n", 0) < 2 else float(stat["std"])


def fits_phrase(results: Mapping, cell_id: str) -> str:
    """'5 folds x 3 seeds = 15 fits': what a cell's numbers pool over."""
    runs = [r for r in results.get("runs", []) if r.get("cell") == cell_id]
    folds = len({r["fold"] for r in runs})
    seeds = len({r["seed"] for r in runs})
    plural = lambda n, word: f"{n} {word}{'s' * (n != 1)}"  # noqa: E731
    return f"{plural(folds, 'fold')} x {plural(seeds, 'seed')} = {plural(len(runs), 'fit')}"


CELL_HEADER = (
    "#",
    "text",
    "image",
    "head",
    "variant",
    *(title for _, title in CELL_METRICS),
    "Δ F1",
    "p",
    "vs best",
    "n",
    "seed-sd F1",
    "train s",
    "params",
)


def cell_rows(results: Mapping) -> list[list[str]]:
    """The ranked table as strings: one list per cell, columns as in CELL_HEADER."""
    return [
        row_cells(str(rank), results["cells"][cell_id])
        for rank, cell_id in enumerate(results["ranking"], start=1)
    ]


def ensemble_rows(results: Mapping) -> list[list[str]]:
    """The ensemble row (compare --ensemble K; fuse.ensemble) as the table's last row, rank
    "-" (it is not a cell: predict cannot use it); [] for a run without one."""
    ensemble = results.get("ensemble")
    if not ensemble:
        return []
    row = row_cells("-", ensemble)
    row[1:3] = ["-", "-"]  # it reads what its members read: not one encoder pair
    return [row]


def _p(p: float | None) -> str:
    return "n/a" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def vs_best(entry: Mapping | None) -> list[str]:
    """A row's Δ F1, p and mark (fuse.significance.tied_mark); "-" before significance."""
    if not entry:
        return ["-", "-", "-"]
    if entry.get("best"):
        return ["-", "-", "best"]
    return [f"{entry['delta_macro_f1']:+.3f}", _p(entry.get("p")), tied_mark(entry)]


def row_cells(rank: str, cell: Mapping) -> list[str]:
    """One row of the table (a cell's results.json entry, or the ensemble's)."""
    s = cell["summary"]
    sd = seed_sd(s)
    return [
        rank,
        cell.get("text") or "none",
        cell.get("image") or "none",
        cell["head"],
        cell.get("variant") or "-",
        *(mean_pm(s[key]) for key, _ in CELL_METRICS),
        *vs_best(cell.get("significance")),
        str(s["macro_f1"]["n"]),
        "-" if sd is None else f"{sd:.3f}",
        f"{s['train_time_s']['mean']:.2f}",
        f"{round(s['n_params']['mean']):,}",
    ]


def significance_line(results: Mapping) -> str | None:
    """The footer's statement of the test behind "vs best" and its alpha; None for a run
    written before significance (fuse.significance), or of one row (nothing to compare)."""
    design = results.get("significance")
    rows = [results["cells"][c] for c in results["ranking"]]
    rows += [results["ensemble"]] if results.get("ensemble") else []
    if not design or len(rows) < 2:  # one cell (fuse): nothing to compare
        return None
    if design.get("note"):
        return f"vs best: {design['note']}"
    family = sum(1 for r in rows if "why" not in r.get("significance", {"why": 1}))
    return (
        f"vs best: each row vs the best cell, fit by fit (same seed, fold): {design['test']} "
        f"(n_test/n_train = {design['n_test']:.0f}/{design['n_train']:.0f}), Holm-corrected "
        f"over {family} row(s), α = {design['alpha']:g}; p = Holm-adjusted p; tied = cannot "
        "be told apart from the best (p ≥ α); Wilcoxon signed-rank p in results.csv"
    )


def table_footer(results: Mapping) -> list[str]:
    """What ± spans, and what 'params' counts where heads differ (trees vs weights)."""
    lines = [
        "± = std over folds x seeds (n fits); seed-sd F1 = std of the per-seed means of "
        "macro-F1 (the spread to compare two cells by)"
    ]
    if (line := significance_line(results)) is not None:
        lines.insert(0, line)
    meanings = {}
    extra = [results["ensemble"]] if results.get("ensemble") else []
    for cell in [*(results["cells"][c] for c in results["ranking"]), *extra]:
        if cell.get("n_params_meaning"):
            meanings.setdefault(cell["n_params_meaning"], []).append(cell["head"])
    for meaning, heads in meanings.items():
        lines.append(f"params ({', '.join(dict.fromkeys(heads))}): {meaning}")
    return lines


def cells_table(results: Mapping) -> str:
    """The stdout table of a run: one row per cell, best mean macro-F1 first."""
    rows = cell_rows(results) + ensemble_rows(results)
    numeric = {0, *range(5, len(CELL_HEADER))}
    widths = [max(len(r[i]) for r in [CELL_HEADER, *rows]) for i in range(len(CELL_HEADER))]
    lines = [
        "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in [CELL_HEADER, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, *table_footer(results)])


def inline_png(png: bytes, alt: str, css_class: str | None = None) -> str:
    """An <img> holding the PNG itself (base64), so an HTML page needs no other file."""
    data = base64.b64encode(png).decode("ascii")
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img{cls} src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _label(text: object) -> str:
    """Text for matplotlib drawn as typed: a '$' would otherwise start mathtext."""
    return str(text).replace("$", r"\$")


def _short(text: str, n: int = 40) -> str:
    return _label(text if len(text) <= n else text[: n - 1] + "…")


def _save(fig, path: Path, plt, dpi: int = 110) -> Path:
    try:
        fig.savefig(path, dpi=dpi)
    except OSError as e:  # PIL's close() on a full disk names no file: name the plot
        if e.filename is None:
            e.filename = str(path)
        raise
    finally:
        plt.close(fig)
    return path


def row_of(cell: Mapping) -> str:
    """A cell's heat-map row: 'head' or 'head@variant'."""
    return cell["head"] + (f"@{cell['variant']}" if cell.get("variant") else "")


def col_of(cell: Mapping) -> str:
    """A cell's heat-map column: its encoder pair 'text+image'."""
    return f"{cell.get('text') or 'none'}+{cell.get('image') or 'none'}"


def heatmap_grid(results: Mapping) -> tuple[list[str], list[str], np.ndarray]:
    """(row labels, column labels, mean macro-F1 grid with NaN where no cell ran), rows and
    columns in the order the grid's cells come in."""
    cells = results["cells"].values()
    rows = list(dict.fromkeys(row_of(c) for c in cells))
    cols = list(dict.fromkeys(col_of(c) for c in cells))
    grid = np.full((len(rows), len(cols)), np.nan)
    for c in cells:
        grid[rows.index(row_of(c)), cols.index(col_of(c))] = c["summary"]["macro_f1"]["mean"]
    return rows, cols, grid


def plot_heatmap(results: Mapping, path: Path) -> Path:
    """Mean macro-F1: heads (and head@variant) as rows, "text+image" pairs as columns; blank
    where a cell was not run; the best cell boxed."""
    plt = _pyplot()
    rows, cols, grid = heatmap_grid(results)
    fig, ax = plt.subplots(
        figsize=(min(3 + 1.25 * len(cols), 16), min(1.6 + 0.42 * len(rows), 24)),
        layout="constrained",
    )
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="macro-F1 (mean)", shrink=0.8)
    ax.set_xticks(
        range(len(cols)),
        [_short(c) for c in cols],
        rotation=25 if len(cols) > 3 else 0,
        ha="right" if len(cols) > 3 else "center",
    )
    ax.set_yticks(range(len(rows)), [_short(r) for r in rows])
    ax.set_xlabel("text + image encoders")
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    for i, j in zip(*np.nonzero(~np.isnan(grid))):
        light = hi > lo and (grid[i, j] - lo) / (hi - lo) > 0.6
        ax.text(
            j,
            i,
            f"{grid[i, j]:.3f}",
            ha="center",
            va="center",
            fontsize=9,
            color="black" if light else "white",
        )
    best = results["cells"][results["ranking"][0]]
    bi, bj = rows.index(row_of(best)), cols.index(col_of(best))
    ax.add_patch(plt.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, lw=2.5, ec="red"))
    ax.set_title("macro-F1 by head × encoders (red box: best cell; blank: not run)", fontsize=10)
    return _save(fig, path, plt)


SCORE_METRICS = (("macro_f1", "macro-F1"), ("accuracy", "accuracy"))


def score_range(results: Mapping) -> tuple[float, float]:
    """The score axis: mean ± std of every plotted metric and cell, padded, within [0, 1] —
    zoomed to the data so that differences of 0.01 stay visible."""
    ends = [
        (s[key]["mean"] - s[key]["std"], s[key]["mean"] + s[key]["std"])
        for s in (results["cells"][c]["summary"] for c in results["ranking"])
        for key, _ in SCORE_METRICS
    ]
    lo, hi = min(e[0] for e in ends), max(e[1] for e in ends)
    pad = max(0.08 * (hi - lo), 0.005)
    return max(0.0, lo - pad), min(1.0, hi + pad)


def plot_cell_scores(results: Mapping, path: Path) -> Path:
    """macro-F1 and accuracy per cell with ± std bars, best cell on top (one row per cell, so
    54 cells stay legible); the score axis is zoomed to the data, the protocol is the title."""
    import textwrap

    plt = _pyplot()
    ids = results["ranking"]
    y = np.arange(len(ids))
    fig, ax = plt.subplots(figsize=(9.5, 1.5 + 0.3 * len(ids)), layout="constrained")
    for k, (key, title) in enumerate(SCORE_METRICS):
        means = np.array([results["cells"][c]["summary"][key]["mean"] for c in ids])
        stds = np.array([results["cells"][c]["summary"][key]["std"] for c in ids])
        ax.errorbar(means, y + (k - 0.5) * 0.3, xerr=stds, fmt="o", ms=5, capsize=3, label=title)
    ax.set_xlim(*score_range(results))
    ax.set_yticks(y, [_short(c, 48) for c in ids], fontsize=8)
    ax.set_ylim(len(ids) - 0.5, -0.5)  # best first, at the top
    ax.set_xlabel("score: mean ± std over folds x seeds (axis zoomed to the data)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    protocol = str(results.get("protocol", ""))
    ax.set_title(
        "\n".join(textwrap.wrap(_label(f"cells ranked by macro-F1 — {protocol}"), 90)), fontsize=10
    )
    return _save(fig, path, plt)


def history_cells(results: Mapping) -> list[str]:
    with_history = {r["cell"] for r in results.get("runs", []) if r.get("history")}
    return [c for c in results["ranking"] if c in with_history]


def _mean_curve(curves: list[list[float]]) -> np.ndarray:
    """Mean per epoch over the fits that reached that epoch (early stopping ends some early)."""
    longest = max(len(c) for c in curves)
    padded = np.full((len(curves), longest), np.nan)
    for k, c in enumerate(curves):
        padded[k, : len(c)] = c
    return np.nanmean(padded, axis=0)


def _draw_history(ax, runs: list[dict], title: str) -> None:
    loss_ax = ax.twinx()
    for key, axis, color in (
        ("val_macro_f1", ax, "tab:blue"),
        ("train_loss", loss_ax, "tab:orange"),
    ):
        curves = [[h[key] for h in r["history"] if h.get(key) is not None] for r in runs]
        curves = [c for c in curves if c]
        if not curves:
            continue
        for c in curves:
            axis.plot(range(1, len(c) + 1), c, color=color, lw=0.6, alpha=0.35)
        mean = _mean_curve(curves)
        axis.plot(range(1, len(mean) + 1), mean, color=color, lw=2)
    ax.set_ylabel("val macro-F1", color="tab:blue", fontsize=8)
    loss_ax.set_ylabel("train loss", color="tab:orange", fontsize=8)
    ax.set_xlabel("epoch", fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(_short(title, 48), fontsize=9)
    ax.tick_params(labelsize=7)
    loss_ax.tick_params(labelsize=7)


def plot_learning_curves(results: Mapping, path: Path) -> Path | None:
    """Per torch cell (the best CONFUSION_CAP): val macro-F1 and train loss per epoch, the mean
    over fits thick and each fit thin. None when no cell saved a history (trees only)."""
    ids = history_cells(results)
    if not ids:
        return None
    shown = ids[:CONFUSION_CAP]
    plt = _pyplot()
    cols = min(len(shown), 3)
    nrows = -(-len(shown) // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(4.6 * cols, 3.3 * nrows + 0.6), squeeze=False, layout="constrained"
    )
    for ax, cell_id in zip(axes.flat, shown):
        runs = [r for r in results["runs"] if r["cell"] == cell_id and r.get("history")]
        _draw_history(ax, runs, cell_id)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    more = f" (best {len(shown)} of {len(ids)} torch cells)" if len(ids) > len(shown) else ""
    fig.suptitle(f"learning curves: mean over fits (thick), each fit (thin){more}", fontsize=11)
    return _save(fig, path, plt)


def plot_cell_confusions(results: Mapping, path: Path) -> Path:
    """One confusion matrix per cell (the best CONFUSION_CAP), counts summed over folds x seeds,
    each title saying how many fits it sums."""
    plt = _pyplot()
    ids = results["ranking"]
    shown = ids[:CONFUSION_CAP]
    cols = min(len(shown), 3)
    nrows = -(-len(shown) // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(4.4 * cols, 4.2 * nrows + 0.5), squeeze=False, layout="constrained"
    )
    for ax, cell_id in zip(axes.flat, shown):
        cm = np.asarray(results["cells"][cell_id]["summary"]["confusion_matrix"])
        title = f"{_short(cell_id, 44)}\nsummed over {fits_phrase(results, cell_id)}"
        _draw_confusion(ax, cm, results["classes"], title)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    more = f"; best {len(shown)} of {len(ids)} cells shown" if len(ids) > len(shown) else ""
    fig.suptitle(f"confusion matrices (count and share of the true class){more}", fontsize=11)
    return _save(fig, path, plt)


def write_plots(run_dir: Path, results: Mapping) -> list[Path]:
    """heatmap.png, scores.png, learning_curves.png (torch cells only) and confusion.png
    into run_dir, from a results.json dict; returns the files written."""
    run_dir = Path(run_dir)
    written = [
        plot_heatmap(results, run_dir / "heatmap.png"),
        plot_cell_scores(results, run_dir / "scores.png"),
        plot_learning_curves(results, run_dir / "learning_curves.png"),
        plot_cell_confusions(results, run_dir / "confusion.png"),
    ]
    return [p for p in written if p is not None]
