"""Stage two on a cache larger than its memory budget (issue 10 item 4; docs/architecture.md §9: peak RSS
within the budget + model): the same token-head fit streamed with `--memory-budget 1GB` and
with the whole cache in RAM, each in a fresh subprocess, peak RSS from the OS.

    .venv/bin/python benchmarks/streaming.py [--dir /tmp/fusebench-streaming] [--quick]

The cache is synthetic, written with cache.CacheWriter (the real layout: row-chunked, fletcher32,
digests): 14,000 rows of ViT-base image tokens [197, 768] float16 (4.24 GB) with a planted
class signal, pooled vectors [768]. It is kept in --dir and reused when present (delete it when
done; it is never written inside the repository). --quick: 2,000 rows (0.6 GB) with a 256 MB
budget, for a check in well under 2 minutes.

Each run (a subprocess: `--child`) loads the cache the way `compare` does (fuse.grid.load_bank
with the budget), makes the --val-ratio 0.1 split (fold 1 of 1) and fits image_only on the
masked mean of the image tokens (use_tokens=true; a token head: statistics, batches and
scoring all read the tokens) for --epochs epochs on the CPU, then scores the held-out rows.
Peak RSS is the child's ru_maxrss (os.wait4), wall time is the child's whole life (imports,
load, fit, scoring). Both runs read a file the page cache may hold (warm); page-cache pages
are not RSS. Timings on a loaded shared machine are noisy; RSS is not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

P, D, POOLED = 197, 768, 768  # ViT-B/16: CLS + 196 patches, width 768
CLASSES = ("negative", "neutral", "positive")


def build_cache(folder: Path, n: int, block: int = 500) -> Path:
    """folder/vit.h5 with n rows, written block by block (never all in RAM); reused when a
    complete one with n rows is there."""
    from fusebench.cache import CacheWriter, TokenFeatures
    from fusebench.cache.reader import FeatureStore

    path = folder / "vit.h5"
    if path.is_file():
        try:
            if len(FeatureStore.open(path, tokens=False)) == n:
                print(f"reusing {path} ({path.stat().st_size / 1e9:.2f} GB)")
                return path
        except Exception as e:  # a stale or broken one: write it again
            print(f"rewriting {path}: {e}")
    need = n * (P * D + 2 * POOLED) * 2
    free = shutil.disk_usage(folder.parent if not folder.exists() else folder).free
    if free < need * 1.1 + (1 << 30):
        sys.exit(
            f"{folder}: {free / 1e9:.1f} GB free, the cache needs {need / 1e9:.1f} GB; pass --dir"
        )
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, n)
    guid = [f"{i:06d}" for i in range(n)]
    split = ["train"] * n
    manifest = [{"guid": g, "split": "train", "label": int(y)} for g, y in zip(guid, label)]
    w = CacheWriter(
        path,
        guid=guid,
        split=split,
        label=label,
        classes=CLASSES,
        manifest=manifest,
        config={"encoder": "vit", "synthetic": n},
        attrs={"encoder": "vit", "model": "", "model_revision": "", "weights": "random"},
    )
    mu = rng.standard_normal((3, D)).astype(np.float32) * 0.005  # a class signal, not trivial
    start = time.perf_counter()
    try:
        w.create_modality("image", tokens=(P, D), mask=False, pooled={"pooled": (POOLED, "cls")})
        for lo in range(0, n, block):
            rows = np.arange(lo, min(n, lo + block))
            tok = rng.standard_normal((len(rows), P, D), dtype=np.float32)
            tok += mu[label[rows]][:, None, :]
            tok = tok.astype(np.float16)  # (b, P, D)
            w.write("image", rows, TokenFeatures(tok, None, {"pooled": tok[:, 0].copy()}))
            print(f"\rwriting {path}: {rows[-1] + 1}/{n} rows", end="", flush=True)
        w.set_status(np.ones(n, dtype=np.uint8))
        w.finish()
    except BaseException:
        w.abort()
        raise
    print(
        f"\nwrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s"
    )
    return path


def child(features: Path, budget: str, epochs: int) -> None:
    """One run, as `compare` loads and fits; prints one JSON line. Training draws the
    block-aware order (fuse.trainer.row_blocks) in RAM and streamed alike."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    from fusebench.fuse import StratifiedProtocol, build_head
    from fusebench.fuse.grid import Cell, load_bank
    from sklearn.metrics import f1_score

    start = time.perf_counter()
    cell = Cell(None, "vit", "image_only", overrides={"use_tokens": True})
    bank = load_bank(features, [cell], allow_stale=False, memory_budget=budget)
    fs = bank.cell_set(cell)
    loaded = time.perf_counter() - start
    (fold,) = StratifiedProtocol(val_ratio=0.1).splits(fs)
    head = build_head(
        "image_only", seed=0, overrides={"use_tokens": True}, epochs=epochs, device="cpu"
    )
    head.fit(fs.take(fold.fit), fs.take(fold.inner_val))
    proba = head.predict_proba(fs.take(fold.scored))
    y = fs.label[fold.scored]
    lazy = fs.image.feats.tokens
    print(
        json.dumps(
            {
                "streamed": fs.image.streamed,
                "load_s": loaded,
                "macro_f1": float(f1_score(y, proba.argmax(1), average="macro")),
                "proba_sum": float(proba.sum()),
                "proba": proba[:50].round(6).tolist(),
                "block_reads": getattr(getattr(lazy, "cache", None), "reads", 0),
                "rows_read": getattr(getattr(lazy, "cache", None), "rows_read", 0),
                "block_cache_mb": getattr(getattr(lazy, "cache", None), "capacity", 0) / 2**20,
            }
        )
    )


def peak_rss(features: Path, budget: str, epochs: int) -> dict:
    """One run in a fresh interpreter, under os.wait4, so ru_maxrss is this child's own peak
    (RUSAGE_CHILDREN would give the max over every child): its JSON line + wall_s, peak_rss_gb."""
    cmd = [sys.executable, __file__, "--child", str(features), "--budget", budget]
    out_path = features / f".child-{os.getpid()}.out"
    err_path = features / f".child-{os.getpid()}.err"
    start = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        pid = subprocess.Popen([*cmd, "--epochs", str(epochs)], stdout=out, stderr=err).pid
        _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    text, notes = out_path.read_text(), err_path.read_text()
    out_path.unlink(), err_path.unlink()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"run with budget {budget} failed:\n{notes[-3000:]}")
    result = json.loads(text.strip().splitlines()[-1])
    result.update(wall_s=wall, peak_rss_gb=usage.ru_maxrss * 1024 / 2**30)  # Linux: KiB
    result["notes"] = [line for line in notes.splitlines() if line.startswith("note:")]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fusebench-streaming"))
    ap.add_argument(
        "--rows", type=int, default=None, help="cache rows (default 14,000; quick 2,000)"
    )
    ap.add_argument("--budget", default=None, help="memory budget (default 1GB; quick 256MB)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child, args.budget, args.epochs)
    rows = args.rows or (2_000 if args.quick else 14_000)
    budget = args.budget or ("256MB" if args.quick else "1GB")
    features = args.dir / f"rows{rows}"
    features.mkdir(parents=True, exist_ok=True)
    path = build_cache(features, rows)
    gb = rows * P * D * 2 / 2**30
    print(f"cache: {path} — image tokens {gb:.2f} GiB ({rows} x {P} x {D} float16)")
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (a shared machine: times are noisy)"
    )
    streamed = peak_rss(features, budget, args.epochs)
    in_ram = peak_rss(features, "1TB", args.epochs)
    runs = ((f"streamed, --memory-budget {budget}", streamed), ("in RAM", in_ram))
    for name, r in runs:
        print(
            f"{name:38s} peak RSS {r['peak_rss_gb']:5.2f} GiB   wall {r['wall_s']:6.1f} s   "
            f"(load {r['load_s']:.1f} s)   streamed={r['streamed']} "
            f"blocks read {r['block_reads']}, rows read alone {r['rows_read']}   macro-F1 {r['macro_f1']:.3f}"
        )
    for line in streamed["notes"]:
        print(f"  {line}")
    same = np.abs(np.array(streamed["proba"]) - np.array(in_ram["proba"])).max()
    print(
        f"peak RSS streamed / in RAM: {streamed['peak_rss_gb'] / in_ram['peak_rss_gb']:.2f}x; "
        f"wall streamed / in RAM: {streamed['wall_s'] / in_ram['wall_s']:.2f}x; "
        f"max |proba diff| on 50 scored rows: {same:.2g} (the same block-aware order: 0 expected)"
    )
    target = 2.0
    print(
        f"target: peak RSS <= {target} GiB with a 1 GB budget on a >= 4 GB cache: "
        + ("met" if streamed["peak_rss_gb"] <= target else "NOT met")
        + ("" if not args.quick else " (quick run: smaller cache and budget, indicative only)")
    )


if __name__ == "__main__":
    main()
