"""Loading a cache into RAM vs reading the same bytes raw (docs/architecture.md §9 target: <= 1.5x), and what
compressing padded text tokens costs and saves (issue 10 item 6).

    .venv/bin/python benchmarks/cache_load.py [CACHE.h5]
    .venv/bin/python benchmarks/cache_load.py --codecs CACHE.h5

Without an argument it writes a ViT-base-sized synthetic cache (2,000 rows of [197, 768]
float16 tokens, ~600 MiB) to a temp folder. Both reads run warm (file in the page cache),
alternating, best of 3, in one run.

--codecs rewrites CACHE.h5 (e.g. the minilm cache of lab5-dev, from `fusebench extract
--encoder minilm --data /work/shared/data/lab5-dev --out /tmp/l/feat`) with its text tokens
in whole-row chunks uncompressed (the layout before issue 10), lzf and gzip-1, and in slabs of
TOKEN_CHUNK tokens (all-padding slabs never stored) without and with lzf; prints per layout: file size, write time (assembly by
`write_features`: datasets, digests, rename), FeatureStore.open time with the raw-chunk reader
(cache/integrity.py) and with HDF5's own read path, and the open time over a raw read of the
uncompressed file ("raw read" as above: the whole file into one numpy buffer, warm) — the
same uncompressed bytes every codec gives back.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusebench.cache import FeatureStore, TokenFeatures, integrity, write_features  # noqa: E402

# name -> (compressor, tokens per chunk) of the text token array; "none" is the layout before
# issue 10 (whole-row chunks, no compressor), "slabs" the one writers use now.
CODECS = {
    "none": (None, None),
    "lzf": ("lzf", None),
    "gzip-1": ("gzip", None),
    "slabs": (None, integrity.TOKEN_CHUNK),
    "slabs+lzf": ("lzf", integrity.TOKEN_CHUNK),
}


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


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def load_ratio(path: Path) -> None:
    size = path.stat().st_size
    raw_read(path)  # warm the page cache
    t_raw, t_load = [], []
    for _ in range(3):
        t_raw.append(best(lambda: raw_read(path), 1))
        t_load.append(best(lambda: FeatureStore.open(path), 1))
    raw, load = min(t_raw), min(t_load)
    print(f"{path} ({size / 2**20:.0f} MiB)")
    print(f"raw read          {raw:.3f}s  ({size / 2**30 / raw:.2f} GiB/s)")
    print(f"FeatureStore.open {load:.3f}s  (checks + all arrays into RAM)")
    print(f"ratio {load / raw:.2f}x (target <= 1.5x)")
    with h5py.File(path, "r") as f:
        arrays: list[int] = []
        f.visititems(lambda _, o: arrays.append(o.nbytes) if isinstance(o, h5py.Dataset) else None)
    if sum(arrays) > 1.2 * size:
        print(
            f"(the file stores {sum(arrays) / 2**20:.0f} MiB of arrays in {size / 2**20:.0f} "
            "MiB: all-padding slabs or compressed chunks; --codecs compares with a raw read of "
            "the same bytes uncompressed)"
        )


def rewrite(store: FeatureStore, path: Path, codec: tuple[str | None, int | None]) -> Path:
    """The same cache written again, its padded token arrays stored as `codec` says."""
    keep = ("encoder", "model", "model_revision", "weights", "versions", "pooling")
    return write_features(
        path,
        guid=list(store.guid),
        split=list(store.split),
        label=list(store.label),
        classes=store.classes,
        text=store.text,
        image=store.image,
        status=store.status,
        errors=store.errors,
        config=store.config,
        manifest=store.manifest,
        attrs={k: v for k, v in store.attrs.items() if k in keep},
        compression=codec[0],
        token_chunk=codec[1],
    )


def compare_codecs(source: Path) -> None:
    store = FeatureStore.open(source)
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        paths, writes = {}, {}
        for name, codec in CODECS.items():
            path = Path(tmp) / f"{name}.h5"
            writes[name] = best(lambda p=path, c=codec: rewrite(store, p, c))
            paths[name] = path
        for path in paths.values():
            raw_read(path)  # warm the page cache
        raw = best(lambda: raw_read(paths["none"]), 5)
        with mock.patch.object(integrity, "_read_chunks_raw", lambda ds, path: None):
            hdf5 = {n: best(lambda p=p: FeatureStore.open(p)) for n, p in paths.items()}
        fast = {n: best(lambda p=p: FeatureStore.open(p)) for n, p in paths.items()}
        raw_each = {n: best(lambda p=p: raw_read(p)) for n, p in paths.items()}
        for name, path in paths.items():
            got = FeatureStore.open(path).text
            assert got is None or np.array_equal(got.tokens, store.text.tokens), name
        tokens = store.text.tokens if store.text is not None else None
        real = int(store.text.mask.sum()) * tokens.shape[2] * 2 if tokens is not None else 0
        size0 = paths["none"].stat().st_size
        print(
            f"{source}: {len(store)} rows; text tokens {tokens.shape if tokens is not None else '-'}"
        )
        print(f"real (unpadded) token bytes {real / 2**20:.1f} MiB")
        print(f"raw read of the uncompressed file ({size0 / 2**20:.1f} MiB): {raw:.3f}s")
        print(
            f"{'codec':8} {'MiB':>7} {'vs none':>7} {'write s':>8} {'open s':>7} "
            f"{'hdf5 s':>7} {'raw own s':>9} {'open/raw':>8}"
        )
        for name, path in paths.items():
            size = path.stat().st_size
            print(
                f"{name:8} {size / 2**20:7.1f} {size / size0:7.2f} {writes[name]:8.3f} "
                f"{fast[name]:7.3f} {hdf5[name]:7.3f} {raw_each[name]:9.3f} "
                f"{fast[name] / raw:7.2f}x"
            )
        print(
            "open: FeatureStore.open with the raw-chunk reader; hdf5: the same through HDF5's "
            "read path; raw own: a raw read of that codec's file; open/raw: open over a raw "
            "read of the uncompressed file (target <= 1.5x)"
        )


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--codecs"]:
        if len(args) != 2:
            sys.exit("usage: cache_load.py --codecs CACHE.h5")
        compare_codecs(Path(args[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        load_ratio(Path(args[0]) if args else synthetic_cache(Path(tmp)))


if __name__ == "__main__":
    main()
