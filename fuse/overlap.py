"""The cells of a grid fitted in order, or, when torch heads train on a GPU, the CPU heads
(LightGBM, logistic regression, ...) fitted on a thread of their own meanwhile.

Why: on a GPU machine a compare of every head spends its GPU time in the torch heads and
its CPU time in the estimator heads, one after the other; side by side, the CPU's cores work
while the GPU trains (LightGBM and scikit-learn's solvers release the GIL in their loops).
Each group is fitted exactly as alone (same rows, folds, seeds, saved models); only the
order in which fits finish changes, and the caller sorts the runs into grid order anyway.
Without a CUDA torch head (every CPU machine), the groups run one after another in the
grid's order, as they always did: the numbers cannot change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fusebench.fuse.head import FitsTogether

R = TypeVar("R")

__all__ = ["fit_groups", "on_cuda"]


def on_cuda(group: Sequence[Any]) -> bool:
    """Whether a group of cells (fuse.grid.Cell: one fit) is a torch head training on CUDA."""
    head = group[0].config.prototype
    if not isinstance(head, FitsTogether) or not hasattr(head, "train"):
        return False
    from fusebench.devices import resolve_device

    return resolve_device(head.train.device).type == "cuda"


def fit_groups(
    groups: Sequence[Sequence[Any]],
    fit: Callable[[Sequence[Any], Any], list[R]],
    progress: Any,
) -> list[R]:
    """fit(group, progress) for every group; the runs of all, in no set order.

    When some group is a torch head on CUDA (on_cuda), the other groups are fitted on one
    worker thread meanwhile, each thread telling `progress` (fuse.experiment.FitProgress)
    through its own view of it; else in order on this thread."""
    gpu = [on_cuda(g) for g in groups]
    if not any(gpu) or all(gpu):
        return [r for g in groups for r in fit(g, progress)]
    lock = threading.Lock()
    cpu_view, gpu_view = _OwnFit(progress, lock), _OwnFit(progress, lock)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-heads") as pool:
        cpu = pool.submit(
            lambda: [r for g, on in zip(groups, gpu) if not on for r in fit(g, cpu_view)]
        )
        runs = [r for g, on in zip(groups, gpu) if on for r in fit(g, gpu_view)]
        return runs + cpu.result()


class _OwnFit:
    """One thread's view of a shared FitProgress: its own fit under way (`where`), and the
    shared bar and count updated under a lock, so each finished fit is named rightly."""

    def __init__(self, progress: Any, lock: threading.Lock) -> None:
        self._progress, self._lock, self._mine = progress, lock, ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._progress, name)

    def start(self, label: str, seed: int, fold: int) -> None:
        with self._lock:
            self._progress.start(label, seed, fold)
            self._mine = self._progress.where

    @property
    def where(self) -> str:
        return self._mine

    def finish(self, macro_f1: float, seconds: float) -> None:
        with self._lock:
            self._progress._where = self._mine  # the line names this thread's fit
            self._progress.finish(macro_f1, seconds)
