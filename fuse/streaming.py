"""Where stage two keeps its features: in RAM, streamed from the cache file, or on the GPU.

Memory budget (`--memory-budget SIZE`, default half of the RAM available when the run starts):
the token arrays a run needs are loaded into RAM when they fit it. When they do not, the
largest are left in the file and read on demand in chunk-aligned row blocks (cache/lazy.py)
until the rest takes at most half the budget; the blocks are cached in one LRU of half of
what the budget has left (the other half is headroom for batches, input statistics and the
model), so peak RSS stays near budget + model. Pooled vectors and masks are small and always
in RAM: pooled-only heads never stream.

Device: when the arrays a head reads fit in half of the GPU's free memory, they are moved
there once (per modality of a loaded feature set: every fold and cell built from it shares the
copy) and `fuse.trainer.gather` indexes them on the device; on the CPU nothing changes.
Streamed arrays are never moved (they did not even fit in RAM).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from fusebench.cache import TokenFeatures
from fusebench.cache.lazy import BlockCache, LazyRows, rows_per_block, stored_nbytes
from fusebench.cache.naming import cache_file

if TYPE_CHECKING:
    import torch

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
RAM_SHARE = 0.5  # default budget: this share of MemAvailable
DEVICE_SHARE = 0.5  # arrays go to the GPU when they take at most this share of its free memory
BUFFER_BLOCKS = 4  # file blocks a streamed training pass shuffles rows across (trainer.batches)


def parse_size(text: str | int) -> int:
    """'1GB', '512MB', '1.5G', '2GiB', '800000000' -> bytes. K/M/G/T are powers of 1024, with
    or without B / iB (as `free -h` and Docker read them)."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        size = int(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.I)
        if m is None:
            raise ValueError(
                f"--memory-budget must be a size like 1GB, 512MB or 2.5G, not {text!r}"
            )
        size = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"--memory-budget must be more than 0 bytes, not {text!r}")
    return size


def available_memory() -> int:
    """Bytes of RAM the OS can give without swapping: MemAvailable of /proc/meminfo, else the
    free pages (os.sysconf), else 8 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return 8 << 30


def resolve_budget(budget: str | int | None) -> int:
    """Bytes of the memory budget: the given size, or RAM_SHARE of the available RAM. A size
    over the RAM available now is clamped to it, with a note (a replayed config.yaml from a
    bigger machine still runs; the budget only decides what streams, never the numbers)."""
    available = available_memory()
    if budget is None:
        return int(available * RAM_SHARE)
    size = parse_size(budget)
    if size > available:
        from fusebench.fuse._util import note

        note(
            f"--memory-budget {budget} is more than the {fmt_bytes(available)} of RAM available "
            f"here; using {fmt_bytes(available)} (token arrays over it stream from the cache)"
        )
        return available
    return size


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def plan_streaming(
    arrays: Mapping[tuple[str, str], int], budget: int, resident: int = 0
) -> tuple[set[tuple[str, str]], int]:
    """(which token arrays to stream, block cache bytes). arrays: (encoder, modality) -> bytes
    in RAM; resident: bytes loaded whatever happens (pooled vectors, masks).

    Nothing streams when every array fits the budget. Else the largest stream until the rest
    takes at most half of it; the cache gets half of what the budget has left."""
    total = sum(arrays.values())
    if total + resident <= budget:
        return set(), 0
    streamed: set[tuple[str, str]] = set()
    kept = total
    for key, size in sorted(arrays.items(), key=lambda kv: (-kv[1], kv[0])):
        if kept + resident <= budget // 2:
            break
        streamed.add(key)
        kept -= size
    return streamed, max(0, (budget - kept - resident) // 2)


def plan_for(
    features_dir: Path,
    pairs: Iterable[tuple[str, str]],
    tokens: Iterable[str] | Mapping[str, Iterable[str]],
    budget: str | int | None,
) -> tuple[set[tuple[str, str]], BlockCache | None]:
    """(the (encoder, modality) token arrays to stream, the run's block cache or None) for
    loading the (encoder, modality) `pairs` from the caches in features_dir (tokens: the
    modalities read as tokens, or encoder -> such modalities), with a note naming what
    streams and why. The cache holds at least two shuffle buffers (BUFFER_BLOCKS blocks of
    every streamed array), whatever the budget: else every batch would read its blocks again."""
    limit = resolve_budget(budget)
    pairs = set(pairs)
    if not isinstance(tokens, Mapping):
        tokens = {enc: set(tokens) for enc, _ in pairs}
    arrays, rows, small = {}, {}, 0
    for enc, m in sorted(pairs):
        path = cache_file(features_dir, enc)
        small += stored_nbytes(path, f"{m}/pooled")[0]
        if m in tokens.get(enc, ()):
            arrays[(enc, m)], rows[(enc, m)] = stored_nbytes(path, f"{m}/tokens")
            small += stored_nbytes(path, f"{m}/mask")[0]
    streamed, capacity = plan_streaming(arrays, limit, small)
    if not streamed:
        return set(), None
    block = sum(rows_per_block(rows[k]) * rows[k] for k in streamed)  # one of each array
    from fusebench.fuse._util import note

    names = ", ".join(
        f"{m} tokens of {cache_file(features_dir, enc).name} ({fmt_bytes(arrays[(enc, m)])})"
        for enc, m in sorted(streamed)
    )
    note(
        f"streaming {names} from disk in row blocks: the token arrays need "
        f"{fmt_bytes(sum(arrays.values()))}, over the memory budget of {fmt_bytes(limit)} "
        f"({'--memory-budget' if budget is not None else 'half the available RAM; set --memory-budget'})"
    )
    return streamed, BlockCache(max(capacity, 2 * BUFFER_BLOCKS * block))


def block_order(blocks: np.ndarray, rng: np.random.Generator, buffer: int) -> list[np.ndarray]:
    """Row positions grouped for a streamed pass: the blocks in a shuffled order, cut into
    groups of `buffer` blocks, each group's rows shuffled. blocks: (n,) block of each row."""
    ids = rng.permutation(np.unique(blocks))
    rank = np.empty(int(ids.max()) + 1 if len(ids) else 0, dtype=np.int64)
    rank[ids] = np.arange(len(ids))
    group = rank[blocks] // max(1, buffer)  # (n,) which buffer each row is drawn in
    order = np.argsort(group, kind="stable")
    cuts = np.flatnonzero(np.diff(group[order])) + 1
    return [rng.permutation(g) for g in np.split(order, cuts)]


# ---------------------------------------------------------------- device-resident features


def fits_on_device(nbytes: int, free: int, share: float = DEVICE_SHARE) -> bool:
    """Whether arrays of `nbytes` go to a device with `free` bytes free."""
    return nbytes <= share * free


def device_free(device: torch.device) -> int | None:
    """Free bytes of a CUDA device (torch.cuda.mem_get_info); None for other devices."""
    if device.type != "cuda":
        return None
    import torch

    return int(torch.cuda.mem_get_info(device)[0])


def resident_nbytes(feats: TokenFeatures, tokens: bool) -> int | None:
    """Bytes of what would move: the main pooled vector, and tokens + mask when `tokens`;
    None when a needed token array is streamed (it stays in the file)."""
    arrays = [feats.pooled["pooled"]]
    if tokens and feats.tokens is not None:
        if isinstance(feats.tokens, LazyRows):
            return None
        arrays += [feats.tokens] + ([feats.mask] if feats.mask is not None else [])
    return int(sum(a.nbytes for a in arrays))


def to_device(feats: TokenFeatures, device: torch.device, tokens: bool) -> TokenFeatures:
    """The arrays of `feats` a head reads, as tensors on `device` (float16 stays float16: half
    the bytes; `gather` makes float32 batches there)."""
    import torch

    def move(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return TokenFeatures(
        tokens=move(feats.tokens) if tokens else None,
        mask=move(feats.mask) if tokens else None,
        pooled={"pooled": move(feats.pooled["pooled"])},
        pooling=dict(feats.pooling),
    )


def resident(
    held: dict,
    feats: TokenFeatures,
    device: torch.device,
    tokens: bool,
    *,
    free: int | None = None,
) -> TokenFeatures | None:
    """The device copy of `feats` (made on first use, then kept in `held`), or None when the
    arrays stay on the host: a CPU device (unless `free` is given, as tests do), streamed
    tokens, or arrays over DEVICE_SHARE of the free memory. held: a Modality's own dict,
    shared by every subset taken of it, so a copy is made once per loaded feature set. A copy
    with tokens serves pooled-only heads too."""
    dev = str(device)
    if held.get((dev, True)) is not None:
        return held[(dev, True)]
    if (dev, tokens) in held:
        return held[(dev, tokens)]
    free = device_free(device) if free is None else free
    size = resident_nbytes(feats, tokens)
    fits = free is not None and size is not None and fits_on_device(size, free)
    held[(dev, tokens)] = to_device(feats, device, tokens) if fits else None
    if tokens and fits:
        held.pop((dev, False), None)  # the token copy holds the pooled vector too
    return held[(dev, tokens)]
