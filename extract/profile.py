"""Per-stage time of the compute loop, for profiling a run: FUSEBENCH_PROFILE=1.

    timer = StageTimer(device)             off (free) unless FUSEBENCH_PROFILE is set
    with timer("forward"): ...             adds the block's wall time to that stage; on CUDA
                                           the device is synchronised around the block, so a
                                           stage holds its own kernels, not the next one's
    timer.line() -> str                    "load/decode 1.2s | host->device 0.3s | ..."

Stages of the image loop: "load/decode" (waiting on the loader workers: read, decode,
resize), "host->device" (the copy, and on the device path its decode + resize + normalise),
"forward" (the model, and the features' copy back), "write" (handing the batch to the
journal's writer thread: time only when its queue is full). Text: "forward", "write".
Synchronising costs a little overlap, so the profiled run is a little slower than a plain one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch


def profiling() -> bool:
    return os.environ.get("FUSEBENCH_PROFILE", "") not in ("", "0")


class StageTimer:
    """Wall seconds per stage; a no-op unless FUSEBENCH_PROFILE is set."""

    def __init__(self, device: torch.device) -> None:
        self.on = profiling()
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if not self.on:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def line(self) -> str:
        return " | ".join(f"{k} {v:.2f}s" for k, v in self.totals.items())
