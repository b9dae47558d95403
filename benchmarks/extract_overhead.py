"""Extraction overhead: wall time of `extract` (dataset read, image decode in workers,
journal, HDF5 assembly, model load included) over the encoder's pure forward time on the
same batches, measured in one run (DESIGN §9 target: <= 1.10). The loop ratio (everything
after the model is loaded) is the target; the ratio with startup is printed too.

    .venv/bin/python benchmarks/extract_overhead.py [--data DIR] [--limit N]

Text: minilm (real weights). Image: the demo's random-weight ViT (same FLOPs as trained).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from extract.datasets import load_dataset, load_image  # noqa: E402
from extract.encoders import create_encoder  # noqa: E402
from extract.loop import extract, plan_batches  # noqa: E402

CASES = {
    "text (minilm)": dict(encoder="minilm"),
    "image (vit, random weights)": dict(
        encoder="vit", model=str(REPO / "configs/demo/vit-random"), random_init=True
    ),
}


def pure_forward(data: str, limit: int | None, batch_size: int, **enc_kw) -> float:
    """Forward passes only, on the batches extract plans, inputs prepared beforehand."""
    ds = load_dataset(data)
    samples = ds.samples[:limit] if limit else ds.samples
    kw = dict(enc_kw)
    enc = create_encoder(kw.pop("encoder"), device="cpu", **kw)
    good = {
        m: [i for i, s in enumerate(samples) if not s.failed(enc.modalities)]
        for m in enc.modalities
    }
    plan = plan_batches(enc, samples, good, batch_size)
    text = [[plan.text_ids[r] for r in b] for b in plan.text_batches]
    pixels = [
        torch.as_tensor(enc.preprocess([load_image(samples[r].image_path) for r in b]))
        for b in plan.image_batches
    ]
    t0 = time.perf_counter()
    for ids in text:
        enc.encode_text(ids)
    for px in pixels:
        enc.encode_image(px)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lab5-dev"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    print(
        f"data {args.data}, limit {args.limit}, batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )
    for name, kw in CASES.items():
        loops, walls, fwds = [], [], []
        for _ in range(2):  # alternate, best of 2: both sides get a warm process
            fwds.append(pure_forward(args.data, args.limit, args.batch_size, **kw))
            out = Path(tempfile.mkdtemp())
            try:
                rep = extract(
                    args.data,
                    out=out,
                    batch_size=args.batch_size,
                    limit=args.limit,
                    device="cpu",
                    quiet=True,
                    **kw,
                )
            finally:
                shutil.rmtree(out)
            walls.append(rep.seconds)
            loops.append(rep.seconds - rep.startup_seconds)
        fwd, loop, wall = min(fwds), min(loops), min(walls)
        print(
            f"{name:<28} pure forward {fwd:6.2f}s | extract loop {loop:6.2f}s, ratio "
            f"{loop / fwd:.3f} (target <= 1.10) | with startup (index + model load) "
            f"{wall:6.2f}s, ratio {wall / fwd:.3f}"
        )


if __name__ == "__main__":
    main()
