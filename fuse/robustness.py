"""Robustness of a fitted head: its scored rows again, with one modality missing or noisy.

Every fit of a run is scored once more on its own scored rows under each condition of
CONDITIONS (predict_proba only: nothing is refitted), giving {condition: macro-F1}
(HeadRun.robustness); `robustness_rows` averages them per cell into robustness.csv, and
`plot_robustness` draws robustness.png (macro-F1 per condition per cell).

What a head sees for a modality that is "missing". A row whose image (or text) failed at
extraction never reaches a head: the FeatureSet leaves it out (fuse.features `excluded`), so
no head has a learned "no image" input. A missing modality is therefore given as the most
neutral input each head already understands:

* pooled vectors (LightGBM, logistic regression, pooled torch heads): the mean of that
  modality's pooled vectors over the fold's fit rows (the training mean: what a mean-imputing
  pipeline feeds, and for standardized heads the all-zero input);
* token sequences with a mask (text tokens): no real token at all (an all-False mask, zero
  tokens), which the torch heads already reduce to zeros (fuse.nets `masked_mean`; attention
  falls back to the first, zero, key);
* token sequences without a mask (image patches): every patch set to its position's mean
  over (a sample of) the fit rows: the average image's patch tokens.

Noise: Gaussian noise of `level` × the per-feature std over the fit rows (pooled vectors:
each dimension's std over every fit row; tokens: each dimension's std over the real tokens of
a sample of STAT_ROWS fit rows), on real tokens only (padding stays exactly 0), drawn from a
generator seeded by (model seed, fold, condition), so a rerun gives the same numbers.

A head that does not read a modality (a text-only cell, for "image missing") scores exactly
its clean score under that modality's conditions: nothing it reads changed.

Cost and memory: predict_proba once per condition on about CHUNK_BYTES of float32 copies at
a time (pooled heads: every scored row at once; token heads: as many rows as fit, a number set
by the arrays' shapes, never by the memory budget, so the noise is the same everywhere),
tokens read in row blocks when the cache streams them (fuse/streaming.py); when one chunk's
copies would not fit in a quarter of the available RAM, that modality's conditions are
skipped with a note, not crashed on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from fusebench.cache import TokenFeatures
from fusebench.fuse._util import note
from fusebench.fuse.metrics import mean_std, score
from fusebench.fuse.report import inline_png
from fusebench.fuse.streaming import available_memory

if TYPE_CHECKING:
    from fusebench.fuse.features import FeatureSet, Modality
    from fusebench.fuse.head import Head
    from fusebench.fuse.protocol import Fold

LEVELS = (0.5, 1.0, 2.0)  # noise std, in units of each feature's std over the fit rows
MODALITY_ORDER = ("image", "text")
CONDITIONS = (
    "clean",
    *(f"{m}_missing" for m in MODALITY_ORDER),
    *(f"{m}_noise_{lv:g}" for m in MODALITY_ORDER for lv in LEVELS),
)
CHUNK_BYTES = 64 << 20  # float32 copies perturbed and predicted at a time (about)
STAT_ROWS = 256  # fit rows the token statistics are computed from (evenly spaced)
CSV_NAME, PLOT_NAME = "robustness.csv", "robustness.png"


@dataclass(frozen=True)
class Stats:
    """One modality's statistics over a fold's fit rows (float32): pooled mean / std (D',),
    token mean (L, D) per position and std (D,) per dimension (None without tokens)."""

    pooled_mean: np.ndarray
    pooled_std: np.ndarray
    token_mean: np.ndarray | None = None
    token_std: np.ndarray | None = None


def robustness_scores(
    head: Head, fs: FeatureSet, fold: Fold, *, seed: int, clean: np.ndarray | None = None
) -> dict[str, float]:
    """{condition: macro-F1} of a fitted head on fold.scored under every condition of
    CONDITIONS (see the module docstring); clean: its (n_scored, C) probabilities on the
    untouched rows, if already computed. A modality skipped for memory is left out."""
    scored = fs.take(fold.scored)
    if clean is None:
        clean = head.predict_proba(scored)  # (n_scored, C)
    out = {"clean": score(scored.label, clean, fs.classes)["macro_f1"]}
    reads = getattr(head, "modalities_", None) or fs.modalities
    tokens = bool(getattr(head, "needs_tokens", False))
    for k, m in enumerate(MODALITY_ORDER):
        names = [f"{m}_missing", *(f"{m}_noise_{lv:g}" for lv in LEVELS)]
        if m not in reads or fs.modality(m) is None:
            out.update(dict.fromkeys(names, out["clean"]))  # the head never reads m
            continue
        rows = chunk_rows(fs.modality(m), tokens)
        if 3 * rows * _row_bytes(fs.modality(m), tokens) > available_memory() // 4:
            note(
                f"robustness: {m} conditions skipped for fold {fold.index}: a perturbed copy of "
                f"{rows} row(s) of {m} features would not fit the available RAM"
            )
            continue
        stats = modality_stats(fs.modality(m), fold.fit, tokens)
        for j, (name, level) in enumerate(zip(names, (None, *LEVELS))):
            rng = np.random.default_rng([seed, fold.index, k, j])
            proba = _perturbed_proba(head, scored, m, stats, (level, rows), tokens, rng)
            out[name] = score(scored.label, proba, fs.classes)["macro_f1"]
    return {c: float(out[c]) for c in CONDITIONS if c in out}


def _row_bytes(mod: Modality, tokens: bool) -> int:
    """Bytes of one row's float32 copy (pooled, and tokens when the head reads them)."""
    return mod.pooled_dim * 4 + (mod.token_row_bytes * 2 if tokens else 0)  # float16 -> 32


def chunk_rows(mod: Modality, tokens: bool) -> int:
    """Rows perturbed at a time: about CHUNK_BYTES of copies (at least one row)."""
    return max(1, CHUNK_BYTES // _row_bytes(mod, tokens))


def modality_stats(mod: Modality, fit: np.ndarray, tokens: bool) -> Stats:
    """Stats of mod over the rows `fit` (tokens: an evenly spaced sample of STAT_ROWS)."""
    pooled = mod.pooled(fit).astype(np.float32)  # (n_fit, D')
    stats = Stats(pooled.mean(axis=0), pooled.std(axis=0))
    if not tokens or not mod.has_tokens:
        return stats
    pick = np.unique(np.linspace(0, len(fit) - 1, min(STAT_ROWS, len(fit))).astype(np.int64))
    tok, mask = mod.tokens(np.sort(fit[pick]))  # (s, l, D), (s, l) or None
    tok = tok.astype(np.float32)
    real = tok.reshape(-1, tok.shape[-1]) if mask is None else tok[mask]  # (r, D)
    return replace(stats, token_mean=tok.mean(axis=0), token_std=real.std(axis=0))


def _perturbed_proba(
    head: Head,
    scored: FeatureSet,
    m: str,
    stats: Stats,
    at: tuple[float | None, int],
    tokens: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """(n, C) the head's probabilities on `scored` with modality m missing (level None) or
    noisy (level × std); at = (level, rows perturbed at a time)."""
    level, step = at
    parts = []
    for start in range(0, len(scored), step):
        chunk = scored.take(np.arange(start, min(start + step, len(scored))))
        mod = perturbed(chunk.modality(m), stats, level, tokens, rng)
        parts.append(head.predict_proba(replace(chunk, **{m: mod})))
    return np.concatenate(parts) if parts else np.zeros((0, scored.n_classes))


def perturbed(
    mod: Modality, stats: Stats, level: float | None, tokens: bool, rng: np.random.Generator
) -> Modality:
    """A copy of mod's rows (pooled, and tokens when the head reads them) missing (level None)
    or with noise; its own arrays (index 0..b-1) and no device copies (held)."""
    pooled = mod.pooled().astype(np.float32)  # (b, D')
    if level is None:
        pooled = np.broadcast_to(stats.pooled_mean, pooled.shape).copy()
    else:
        pooled += rng.standard_normal(pooled.shape, dtype=np.float32) * level * stats.pooled_std
    tok = mask = None
    if tokens and mod.has_tokens:
        tok, mask = mod.tokens()  # (b, l, D), (b, l) or None
        tok = tok.astype(np.float32)
        if level is None and mask is not None:  # text: no real token at all
            tok, mask = (
                np.zeros((len(tok), 1, tok.shape[2]), np.float32),
                np.zeros((len(tok), 1), bool),
            )
        elif level is None:  # image patches: the average image's
            tok = np.broadcast_to(stats.token_mean, tok.shape).copy()
        else:
            noise = rng.standard_normal(tok.shape, dtype=np.float32) * level * stats.token_std
            tok += noise if mask is None else noise * mask[..., None]  # padding stays 0
    feats = TokenFeatures(
        tokens=tok, mask=mask, pooled={"pooled": pooled}, pooling=mod.feats.pooling
    )
    index = np.arange(len(pooled), dtype=np.int64)
    return replace(mod, feats=feats, index=index, held={}, digests={})


# ---------------------------------------------------------------- the run folder


def robustness_rows(runs: Sequence) -> list[dict]:
    """robustness.csv: per cell (grid order) and condition, macro-F1 mean ± std over its fits
    (those that scored the condition), and the drop from the clean score."""
    cells = list(dict.fromkeys(r.cell for r in runs if getattr(r, "robustness", None)))
    rows = []
    for cell in cells:
        mine = [r.robustness for r in runs if r.cell == cell and r.robustness]
        clean = mean_std([r["clean"] for r in mine])["mean"]
        for cond in CONDITIONS:
            values = [r[cond] for r in mine if cond in r]
            if not values:
                continue
            s = mean_std(values)
            rows.append(
                {
                    "cell": cell,
                    "condition": cond,
                    "macro_f1_mean": round(s["mean"], 6),
                    "macro_f1_std": round(s["std"], 6),
                    "delta_vs_clean": round(s["mean"] - clean, 6),
                    "n": s["n"],
                }
            )
    return rows


def write_robustness(run_dir: Path, runs: Sequence) -> list[Path]:
    """robustness.csv and robustness.png into run_dir when any fit was scored for robustness
    (none with --robustness off: nothing written); returns the files written."""
    from fusebench.fuse.report import write_csv

    rows = robustness_rows(runs)
    if not rows:
        return []
    write_csv(run_dir / CSV_NAME, rows)
    return [run_dir / CSV_NAME, plot_robustness(rows, run_dir / PLOT_NAME)]


def read_rows(run_dir: Path) -> list[dict]:
    """robustness.csv of a run folder ([] when absent: --robustness off, or an older run);
    a damaged file is a ValueError naming it."""
    import csv

    path = Path(run_dir) / CSV_NAME
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        for r in rows:
            r["macro_f1_mean"], r["macro_f1_std"] = (
                float(r["macro_f1_mean"]),
                float(r["macro_f1_std"]),
            )
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}); rerun the run") from None
    return rows


def plot_robustness(rows: Sequence[Mapping], path: Path) -> Path:
    """robustness.png: macro-F1 (mean ± std over fits) per condition (x) for each cell (one
    colour each, best clean score first in the legend)."""
    from fusebench.fuse.report import _pyplot, _save, _short

    plt = _pyplot()
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    clean = {r["cell"]: float(r["macro_f1_mean"]) for r in rows if r["condition"] == "clean"}
    cells.sort(key=lambda c: -clean.get(c, 0.0))
    x = np.arange(len(CONDITIONS))
    fig, ax = plt.subplots(figsize=(9.5, 4.8), layout="constrained")
    for k, cell in enumerate(cells):
        got = {r["condition"]: r for r in rows if r["cell"] == cell}
        at = [i for i, c in enumerate(CONDITIONS) if c in got]
        mean = [float(got[CONDITIONS[i]]["macro_f1_mean"]) for i in at]
        std = [float(got[CONDITIONS[i]]["macro_f1_std"]) for i in at]
        shift = (k - (len(cells) - 1) / 2) * 0.06  # cells side by side, bars apart
        ax.errorbar(x[at] + shift, mean, yerr=std, fmt="o", ms=4, capsize=2, label=_short(cell, 44))
    for edge in (0.5, 2.5, 5.5):  # clean | missing | image noise | text noise
        ax.axvline(edge, color="0.8", lw=0.8)
    ax.set_xticks(x, [c.replace("_", " ") for c in CONDITIONS], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("macro-F1 (mean ± std over fits)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(
        "robustness: scored rows with a modality missing or noisy (noise in feature std)",
        fontsize=10,
    )
    return _save(fig, path, plt)


def report_section(run_dir: Path) -> str:
    """The report's robustness part (HTML): a table (cells × conditions, macro-F1 mean ±
    std over fits) and robustness.png, drawn again when missing; "" without robustness.csv."""
    import html
    import tempfile

    rows = read_rows(run_dir)
    if not rows:
        return ""
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    got = {(r["cell"], r["condition"]): r for r in rows}
    head = "".join(f"<th class='num'>{html.escape(c.replace('_', ' '))}</th>" for c in CONDITIONS)
    body = "".join(
        f"<tr><td>{html.escape(cell)}</td>"
        + "".join(
            f"<td class='num'>{got[(cell, c)]['macro_f1_mean']:.3f} ± "
            f"{got[(cell, c)]['macro_f1_std']:.3f}</td>"
            if (cell, c) in got
            else "<td class='num'>-</td>"
            for c in CONDITIONS
        )
        + "</tr>"
        for cell in cells
    )
    png_path = Path(run_dir) / PLOT_NAME
    with tempfile.TemporaryDirectory() as tmp:
        if not png_path.is_file() or png_path.stat().st_size < 100:
            png_path = plot_robustness(rows, Path(tmp) / PLOT_NAME)
        png = png_path.read_bytes()
    return (
        "<h3>Robustness</h3><p class='muted'>macro-F1 of every fit on its scored rows with a "
        "modality missing (pooled heads: its training mean; token heads: no text token / the "
        "mean image's patches) or with Gaussian noise of 0.5, 1 and 2 × each feature's std "
        "over the fit rows (mean ± std over fits; fuse/robustness.py). A cell that does not "
        "read a modality keeps its clean score under that modality's conditions.</p>"
        f"<div class='scroll'><table><thead><tr><th>cell</th>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
        + inline_png(png, "robustness plot", "robustness-plot")
    )
