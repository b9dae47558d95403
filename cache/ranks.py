"""Ranks under torchrun: which one this process is, how many there are, and the few
collectives both stages need (stage one shards a batch plan, stage two a grid's fits).

Only small Python objects cross between ranks (plans, done-lists, results), so the process
group is always gloo, also on GPU machines: features never travel through it, they go through
the journal or the run folder on the shared file system.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")

# how long a rank waits for the others at a barrier: one rank's share of a long extraction
TIMEOUT = timedelta(hours=float(os.environ.get("FUSEBENCH_DIST_TIMEOUT_H", "24")))


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world()[1] > 1


def init() -> bool:
    """Joins torchrun's process group (gloo) when WORLD_SIZE > 1; True when distributed."""
    if not is_distributed():
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
        # left alive at exit, gloo's threads can abort the process ("terminate called
        # without an active exception") after the command's one line
        atexit.register(shutdown)
    return True


def barrier() -> None:
    if init():
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj: T, src: int = 0) -> T:
    """`obj` of rank `src` on every rank (the others' values are ignored)."""
    if not init():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the other ranks."""
    if not init():
        return [obj]
    import torch.distributed as dist

    rank, size = world()
    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not init():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Leaves the process group (at the end of a command), if one was joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
