"""Text padding: tokens the model computes vs tokens that carry text, and the speed-up of
length-sorted batches over padding every text to max_length (docs/architecture.md §4, §9).

    .venv/bin/python benchmarks/text_padding.py [--data ../shared/data/lab5-dev] [--encoder minilm]

Prints computed/real tokens for the plan `extract` uses, and the wall time of the encoder's
forward over the same texts two ways (sorted batches vs fixed-length padding), measured in
one run on this machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusebench.extract.datasets import load_dataset  # noqa: E402
from fusebench.extract.encoders import create_encoder  # noqa: E402
from fusebench.extract.loop import plan_batches  # noqa: E402


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(here.parent / "shared" / "data" / "lab5-dev"))
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="only the first N samples")
    args = ap.parse_args()

    ds = load_dataset(args.data)
    samples = ds.samples[: args.limit] if args.limit else ds.samples
    enc = create_encoder(args.encoder, device="cpu")
    good = [i for i, s in enumerate(samples) if not s.failed(["text"])]
    plan = plan_batches(enc, samples, {"text": good}, args.batch_size)
    real = sum(len(v) for v in plan.text_ids.values())
    computed = sum(len(b) * max(len(plan.text_ids[r]) for r in b) for b in plan.text_batches)
    fixed = len(good) * enc.spec.max_length

    def run_sorted() -> None:
        for b in plan.text_batches:
            enc.encode_text([plan.text_ids[r] for r in b])

    def run_fixed() -> None:  # the naive way: dataset order, every text padded to max_length
        for i in range(0, len(good), args.batch_size):
            rows = good[i : i + args.batch_size]
            batch = enc.tokenizer(
                [samples[r].text for r in rows],
                padding="max_length",
                truncation=True,
                max_length=enc.spec.max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                enc.model(**batch)

    run_sorted()  # warm-up
    t0 = time.perf_counter()
    run_sorted()
    t_sorted = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_fixed()
    t_fixed = time.perf_counter() - t0

    print(
        f"data {ds.root} ({len(good)} texts), encoder {args.encoder}, batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"real tokens              {real}")
    print(f"computed (sorted plan)   {computed}   ratio {computed / real:.3f}  (target <= 1.15)")
    print(f"computed (pad to {enc.spec.max_length})    {fixed}   ratio {fixed / real:.3f}")
    print(
        f"forward time sorted {t_sorted:.2f}s, fixed {t_fixed:.2f}s: "
        f"speed-up {t_fixed / t_sorted:.2f}x"
    )


if __name__ == "__main__":
    main()
