"""Image paths vs the model's own processor, judged on pooled AND token cosine.

    python benchmarks/image_fidelity.py --data DIR [--device cpu|cuda] [--limit N]
        [--encoder vit|clip] [--size tiny|base] [--before]

For each path (cpu: the default CPU fast path; device: full decode + torch resize/normalise,
JPEGs decoded by nvJPEG on CUDA when torchvision is installed; exact: the processor itself)
one line: pooled cosine and token cosine (per image the mean over its tokens), mean and min
over the images, against the processor's features. The tower is random-init from a config
(seed 0, no download): tiny = 2 layers of width 192, base = ViT-B/16 / CLIP ViT-B/32 shape.
--before adds the CPU fast path's draft rule of before (decode down to the target size).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusebench.extract.datasets import load_dataset  # noqa: E402
from fusebench.extract.devicepath import gpu_decode_available  # noqa: E402
from fusebench.extract.fidelity import (  # noqa: E402
    PATHS,
    cosines,
    features,
    path_pixels,
    processors,
    tower,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a dataset folder or manifest")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--limit", type=int, default=60, help="images compared (the first N)")
    ap.add_argument("--encoder", default="vit", choices=("vit", "clip"))
    ap.add_argument("--size", default="tiny", choices=("tiny", "base"))
    ap.add_argument("--before", action="store_true", help="also the draft rule of before")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    device = torch.device(args.device)
    samples = [s for s in load_dataset(args.data).samples if s.image_path][: args.limit]
    proc = processors()[args.encoder]
    model = tower(args.encoder, args.size).to(device)
    batches = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    paths = (("cpu-before",) if args.before else ()) + PATHS

    def run(path: str):
        import numpy as np

        parts = [features(model, path_pixels(path, proc, b, device)) for b in batches]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    ref = run("exact")
    print(f"{len(samples)} images from {args.data}, {args.encoder} ({args.size}, random "
          f"init), {device}; cosine vs the processor's features")  # fmt: skip
    nvjpeg = device.type == "cuda" and gpu_decode_available()
    decoder = {"device": "nvJPEG" if nvjpeg else "PIL", "exact": "PIL"}
    for path in paths:
        t = time.perf_counter()
        c = cosines(run(path), ref)
        print(
            f"{args.encoder} {path:10s} pooled cos mean {c['pooled_mean']:.6f} min "
            f"{c['pooled_min']:.6f} | token cos mean {c['token_mean']:.6f} min "
            f"{c['token_min']:.6f} | JPEG decode {decoder.get(path, 'PIL, draft >= 2x target')} | "
            f"{time.perf_counter() - t:.1f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
