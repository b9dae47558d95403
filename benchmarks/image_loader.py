"""Image loading + preprocessing, images/s per core: the fast path (extract/fastimage.py) vs
the model's own PIL processor (docs/architecture.md §9: >= 500 images/s per core, >= 2.5x the reference).

    .venv/bin/python benchmarks/image_loader.py [--data ../shared/data/lab5-dev] [--limit 400]
        [--processor vit|clip|both] [--batch-size 32] [--repeats 3]

One process, one thread (BLAS/OpenMP pinned to 1 before numpy loads): files -> RGB images
-> (B, 3, 224, 224) pixels, exactly the work a DataLoader worker does in `extract`: float32
for the reference processor; uint8 for the fast path, whose normalise runs on the device in
`encode_image` (also timed here on the CPU, "fast normalising on the CPU too"). The
processors carry the real configs of the default checkpoints (ViT: 224x224 bilinear,
mean/std 0.5; CLIP: shortest edge 224 bicubic, center crop 224, CLIP mean/std). Each
repeat times both paths back to back; the best repeat of each is printed, by the wall clock
and by this process's CPU time (the per-core cost when other work shares the cores), with
the ratio and the pixel difference (normalised units), all measured in this one run.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusebench.extract.datasets import load_dataset, open_sample_image  # noqa: E402
from fusebench.extract.fastimage import FastImagePath  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def processors() -> dict:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return {
        "vit": ViTImageProcessorPil(
            size={"height": 224, "width": 224},
            resample=2,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        ),
        "clip": CLIPImageProcessorPil(
            size={"shortest_edge": 224},
            resample=3,
            do_center_crop=True,
            crop_size={"height": 224, "width": 224},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ),
    }


def timed(run: Callable[[], np.ndarray]) -> tuple[float, float, np.ndarray]:
    """(wall seconds, CPU seconds of this one-thread process, result). On a shared machine
    the CPU seconds are the per-core cost; the wall clock also counts time other processes
    held the core."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(here.parent / "shared" / "data" / "lab5-dev"))
    ap.add_argument("--limit", type=int, default=400, help="images timed (the first N)")
    ap.add_argument("--processor", choices=("vit", "clip", "both"), default="both")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    samples = [s for s in load_dataset(args.data).samples if s.image_path][: args.limit]
    batches = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    for s in samples:  # warm the page cache: both paths then read from memory
        s.image_path.read_bytes()
    n = len(samples)
    print(f"{n} images from {args.data}, batches of {args.batch_size}, one process, one thread")
    names = ["vit", "clip"] if args.processor == "both" else [args.processor]
    for name in names:
        proc = processors()[name]
        fast = FastImagePath.from_processor(proc)
        assert isinstance(fast, FastImagePath), fast

        def reference(proc=proc) -> np.ndarray:
            out = [
                np.asarray(
                    proc(images=[open_sample_image(s) for s in b], return_tensors="np")[
                        "pixel_values"
                    ],
                    dtype=np.float32,
                )
                for b in batches
            ]
            return np.concatenate(out)

        def fast_path(fast=fast) -> np.ndarray:  # a loader worker's part: uint8 out
            return np.concatenate([fast.preprocess([fast.open(s) for s in b]) for b in batches])

        def fast_cpu_normalised(fast=fast) -> np.ndarray:  # also the float work, on this core
            return np.concatenate(
                [
                    fast.normalize(torch.as_tensor(fast.preprocess([fast.open(s) for s in b])))
                    for b in batches
                ]
            )

        runs = {"reference": reference, "fast": fast_path, "fast+norm": fast_cpu_normalised}
        best = {k: [np.inf, np.inf] for k in runs}  # best (wall, cpu) seconds
        pixels = {}
        for _ in range(args.repeats):
            for k, run in runs.items():
                *t, pixels[k] = timed(run)
                best[k] = [min(a, b) for a, b in zip(best[k], t)]
        diff = np.abs(pixels["fast+norm"] - pixels["reference"])
        for what, i in (("wall", 0), ("cpu ", 1)):
            ref = best["reference"][i]
            print(
                f"{name:4s} {what}: reference {n / ref:6.1f} | fast {n / best['fast'][i]:6.1f} "
                f"(ratio {ref / best['fast'][i]:.2f}x) | fast normalising on the CPU too "
                f"{n / best['fast+norm'][i]:6.1f} (ratio {ref / best['fast+norm'][i]:.2f}x) "
                "images/s per core"
            )
        print(
            f"{name:4s} pixels fast vs reference: max abs diff {diff.max():.3f}, mean {diff.mean():.4f}"
        )


if __name__ == "__main__":
    main()
