"""Loading a cache into RAM vs reading the same bytes raw (DESIGN §9 target: <= 1.5x).

    .venv/bin/python benchmarks/cache_load.py [CACHE.h5]

Without an argument it writes a ViT-base-sized synthetic cache (2,000 rows of [197, 768]
float16 tokens, ~600 MiB) to a temp folder. Both reads run warm (file in the page cache),
alternating, best of 3, in one run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import FeatureStore, TokenFeatures, write_features  # noqa: E402


def synthetic_cache(folder: Path, n: int = 2000) -> Path:
    rng = np.random.default_rng(0)
    image = TokenFeatures(
        tokens=rng.standard_normal((n, 197, 768), dtype=np.float32).astype(np.float16),
        mask=None,
        pooled={"pooled": rng.standard_normal((n, 768), dtype=np.float32).astype(np.float16)},
    )
    return write_features(
        folder / "bench" / "vit.h5",
        guid=[str(i) for i in range(n)],
        split=["train"] * n,
        label=[i % 3 for i in range(n)],
        image=image,
    )


def raw_read(path: Path) -> int:
    buf = np.empty(path.stat().st_size, dtype=np.uint8)  # same kind of target as the store's
    with open(path, "rb", buffering=0) as fh:
        fh.readinto(memoryview(buf))
    return len(buf)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else synthetic_cache(Path(tmp))
        size = path.stat().st_size
        raw_read(path)  # warm the page cache
        t_raw, t_load = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            raw_read(path)
            t_raw.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            store = FeatureStore.open(path)
            t_load.append(time.perf_counter() - t0)
            del store
        raw, load = min(t_raw), min(t_load)
        print(f"{path} ({size / 2**20:.0f} MiB)")
        print(f"raw read          {raw:.3f}s  ({size / 2**30 / raw:.2f} GiB/s)")
        print(f"FeatureStore.open {load:.3f}s  (checks + all arrays into RAM)")
        print(f"ratio {load / raw:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
