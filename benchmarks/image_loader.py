"""Image loading + preprocessing, images/s per core and token fidelity: the CPU fast path
(extract/fastimage.py), its draft rule of before, and the device path's code run on the CPU
(extract/devicepath.py) vs the model's own PIL processor.

    .venv/bin/python benchmarks/image_loader.py [--data ../shared/data/lab5-dev] [--limit 400]
        [--processor vit|clip|both] [--batch-size 32] [--repeats 3]

One process, one thread (BLAS/OpenMP pinned to 1 before numpy loads): files -> RGB images
-> (B, 3, 224, 224) pixels, exactly the work a DataLoader worker does in `extract`: float32
for the reference processor; uint8 for the fast path, whose normalise runs on the device in
`encode_image` (not timed here). The
processors carry the real configs of the default checkpoints (ViT: 224x224 bilinear,
mean/std 0.5; CLIP: shortest edge 224 bicubic, center crop 224, CLIP mean/std). Each
repeat times every path back to back; the best repeat of each is printed, by the wall clock
and by this process's CPU time (the per-core cost when other work shares the cores). Then per
path the pooled and token cosine (per image the mean over its tokens; mean and min over the
images) of a random-init 2-layer tower's features against the processor's, and the pixel
difference (normalised units).
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
from fusebench.extract.devicepath import DevicePath  # noqa: E402
from fusebench.extract.fastimage import FastImagePath  # noqa: E402
from fusebench.extract.fidelity import cosines, features, processors, tower  # noqa: E402


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

        before = FastImagePath(fast.size, fast.shortest_edge, fast.resample, fast.crop,
                               fast.lut, margin=1)  # fmt: skip
        device = DevicePath(fast)  # --decode gpu's code, run on this CPU

        def uint8_path(path) -> Callable[[], np.ndarray]:  # a loader worker's part: uint8 out
            return lambda: np.concatenate(
                [np.asarray(path.preprocess([path.open(s) for s in b])) for b in batches]
            )

        runs = {
            "reference": reference,
            "fast": uint8_path(fast),
            "fast-before": uint8_path(before),
            "device-cpu": uint8_path(device),
        }
        best = {k: [np.inf, np.inf] for k in runs}  # best (wall, cpu) seconds
        pixels = {}
        for _ in range(args.repeats):
            for k, run in runs.items():
                *t, pixels[k] = timed(run)
                best[k] = [min(a, b) for a, b in zip(best[k], t)]
        _report(name, n, best, pixels, fast)


def _report(name: str, n: int, best: dict, pixels: dict, fast: FastImagePath) -> None:
    """images/s per core (wall and CPU time) and, per path, pooled / token cosine of a
    random-init 2-layer tower's features against the processor's, and the pixel gap."""
    model = tower(name)
    as_float = {
        k: v if k == "reference" else fast.normalize(torch.as_tensor(v)).numpy()
        for k, v in pixels.items()
    }
    ref = _features(model, as_float["reference"])
    for what, i in (("wall", 0), ("cpu ", 1)):
        rates = " | ".join(f"{k} {n / best[k][i]:6.1f}" for k in best)
        print(f"{name:4s} {what}: {rates} images/s per core")
    for k in best:
        if k == "reference":
            continue
        c = cosines(_features(model, as_float[k]), ref)
        diff = np.abs(as_float[k] - as_float["reference"])
        print(
            f"{name:4s} {k:11s} vs reference: pooled cos mean {c['pooled_mean']:.6f} min "
            f"{c['pooled_min']:.6f} | token cos mean {c['token_mean']:.6f} min "
            f"{c['token_min']:.6f} | pixels max abs diff {diff.max():.3f} mean {diff.mean():.4f}"
        )


def _features(model, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    parts = [
        features(model, torch.as_tensor(pixels[i : i + 64])) for i in range(0, len(pixels), 64)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


if __name__ == "__main__":
    main()
