"""Sharded extraction under torchrun: the ranks split each cache's batch plan.

    torchrun --no-python --nproc-per-node N fusebench extract --encoder E[,F,...] --data D

Rank 0 does what a single run does — the cache locks, the existing-cache checks, the plans
saved in the journals — and assembles the caches at the end (extract/runner.py). Every rank
(rank 0 too) computes the batches b with b % N == rank that a journal does not hold yet, text
and image plans alike, of every encoder of the pass, and journals each one exactly as a single
run would. Same plan -> same batches -> same float16
bits: the cache is byte-identical to a single-process run's, and rerunning the same command with
any N (also N=1) after a killed rank computes only the batches the journal lacks.

Four collectives (cache/ranks.py, gloo), each reached by every rank whatever happened before:
  1. `checked`: after the checks each rank makes alone (options, --data, --out), an all_gather
     of each rank's error: a bad --data fails on every rank with its one line, never a hang.
  2. `announce` / `receive`: rank 0 broadcasts the work of each cache to build (fingerprint,
     plan, batches already journalled), or its failure, or "all up to date".
  3. `settle`: an all_gather of each rank's outcome (rows computed per cache, or its error):
     one rank's failure stops every rank with that line.
  4. `assembled`: after a settled pass, a barrier once rank 0 has assembled the caches (or
     failed to): the ranks leave together, so none tears down its process group while rank 0
     still holds its end (gloo's threads can then abort it: "terminate called without an
     active exception").
Features never travel between ranks: they go through the journal folder (`<cache>.parts/`),
which is why --out must be on a file system every rank sees.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from fusebench.cache import CacheError, ranks
from fusebench.cache.journal import Journal
from fusebench.extract.options import ExtractError
from fusebench.extract.plan import Plan


@dataclass
class Shard:
    """This process's place among the ranks of one extraction."""

    rank: int = 0
    size: int = 1
    announced: bool = False  # rank 0 told the others what to do (or that it failed)
    settled: bool = False  # every rank's pass succeeded (`settle`): all meet at `assembled`

    @classmethod
    def current(cls) -> Shard:
        """From torchrun's environment (RANK, WORLD_SIZE); rank 0 of 1 outside torchrun."""
        rank, size = ranks.world()
        return cls(rank, size)

    @property
    def many(self) -> bool:
        return self.size > 1

    def mine(self, batch: int) -> bool:
        """Batch b of either modality belongs to rank b % N: a fixed, plan-only rule, so a
        rerun with another N still computes every missing batch exactly once."""
        return batch % self.size == self.rank

    @property
    def tag(self) -> str:
        """' [rank r/N]' for log lines; '' for a single process."""
        return f" [rank {self.rank}/{self.size}]" if self.many else ""


SINGLE = Shard()


@dataclass
class Work:
    """What rank 0 broadcasts once it has planned: everything a rank needs to compute its share."""

    fingerprint: str
    config: dict
    plan: Plan
    done: dict[str, set[int]]  # batches already journalled, per modality (rank 0 scanned them)


@dataclass
class Failure:
    """A rank's error as it crosses to the others: its kind keeps the CLI's exit code."""

    rank: int
    kind: str  # usage | missing | cache | run
    line: str

    @classmethod
    def of(cls, rank: int, e: BaseException) -> Failure:
        if isinstance(e, CacheError):
            kind = "cache"  # also a ValueError: test it first
        elif isinstance(e, FileNotFoundError):
            kind = "missing"
        elif isinstance(e, ValueError):
            kind = "usage"
        else:
            kind = "run"
        return cls(rank, kind, " ".join(str(e).split()) or type(e).__name__)

    def error(self, here: int) -> Exception:
        """The exception to raise on rank `here`: rank 0's line as it is (it is the run's
        error), another rank's prefixed with its rank."""
        line = self.line if self.rank == 0 else f"rank {self.rank}: {self.line}"
        kinds = {"usage": ValueError, "missing": FileNotFoundError, "cache": CacheError}
        return kinds.get(self.kind, ExtractError)(line)


def rank_device(device: str, shard: Shard) -> str:
    """--device auto/cuda under torchrun with CUDA present: this rank's own GPU,
    cuda:LOCAL_RANK (ranks of one machine must not share GPU 0)."""
    if not (shard.many and device in ("auto", "cuda") and torch.cuda.is_available()):
        return device
    local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= gpus:
        raise ValueError(
            f"torchrun started more ranks on {socket.gethostname()} than it has GPUs ({gpus}): "
            f"pass --nproc-per-node {gpus} (one rank per GPU), or --device cpu"
        )
    return f"cuda:{local}"


@contextmanager
def checked(shard: Shard) -> Iterator[None]:
    """Wraps the checks each rank makes alone, before any collective. If any rank fails them,
    every rank fails: its own error where it has one, else the first failing rank's line."""
    try:
        yield
    except Exception as e:
        if shard.many:
            ranks.all_gather(Failure.of(shard.rank, e))
        raise
    if shard.many:
        _raise_first(ranks.all_gather(None), shard)


def announce(shard: Shard, works: dict[str, Work]) -> None:
    """Rank 0, plans saved: the others may start (on the caches named, the others being up
    to date)."""
    if shard.many and shard.rank == 0:
        ranks.broadcast(works)
        shard.announced = True


def announce_end(shard: Shard, error: BaseException | None) -> None:
    """Rank 0 stopped before `announce` (its error), or found the cache up to date (None)."""
    if shard.many and shard.rank == 0 and not shard.announced:
        ranks.broadcast(Failure.of(0, error) if error is not None else None)
        shard.announced = True


def receive(shard: Shard) -> dict[str, Work] | None:
    """Ranks > 0: rank 0's work per cache to build, or None when every cache is up to date;
    rank 0's failure is raised here with its line."""
    got = ranks.broadcast(None)
    if isinstance(got, Failure):
        raise got.error(shard.rank)
    return got


def settle(
    shard: Shard, rows: dict[str, int] | None = None, error: BaseException | None = None
) -> dict[str, int]:
    """Every rank's outcome, exchanged: raises this rank's own error, or another rank's line;
    else returns the rows every rank computed together, per cache."""
    if not shard.many:
        if error is not None:
            raise error
        return rows or {}
    outcomes = ranks.all_gather(Failure.of(shard.rank, error) if error is not None else rows)
    if error is not None:
        raise error
    _raise_first(outcomes, shard)
    shard.settled = True  # the same outcomes on every rank: every rank goes on to `assembled`
    return {n: sum(got.get(n, 0) for got in outcomes) for n in rows or {}}


def assembled(shard: Shard) -> None:
    """Every rank, after a settled pass: waits until rank 0 has assembled the caches, or
    failed to (4.). Nothing to wait for when the pass did not settle: every rank raised."""
    if shard.many and shard.settled:
        ranks.barrier()


def missing_parts(journal: Journal, plan: Plan, modalities: tuple[str, ...]) -> str:
    """Rank 0 after `settle`: '' when every planned batch is journalled, else one line: the
    other ranks wrote parts rank 0 cannot see, so --out is not on a shared file system."""
    present = {p.stem for p in journal.folder.glob("*.npz")}  # names only: assembly reads them
    lost = [
        f"{m}-{b:06d}"  # the journal's part name
        for m in modalities
        for b in range(len(plan.text_batches if m == "text" else plan.image_batches))
        if f"{m}-{b:06d}" not in present
    ]
    if not lost:
        return ""
    return (
        f"{len(lost)} batches the ranks reported done are not in {journal.folder} (first: "
        f"{lost[0]}): --out must be a folder every rank sees (a shared file system); "
        "rerun the same command to compute them"
    )


def disagreement(shard: Shard, work: Work, fp: str, config: dict, journal: Journal) -> str:
    """Why this rank cannot compute rank 0's plan ('' when it can). `config`: this rank's
    encoder settings, to name the ones that differ from rank 0's."""
    where = f"rank {shard.rank} on {socket.gethostname()}"
    if journal.plan is None:
        return (
            f"{where} does not see the plan rank 0 saved in {journal.folder}: --out must be a "
            "folder every rank sees (a shared file system)"
        )
    if fp != work.fingerprint:
        keys = sorted(k for k in {*config, *work.config} if config.get(k) != work.config.get(k))
        what = f"settings {', '.join(keys)} differ" if keys else "its data files differ"
        return (
            f"{where} would compute other features than rank 0 ({what}); give every rank the "
            "same data, model and software"
        )
    return ""


def _raise_first(outcomes: list, shard: Shard) -> None:
    for got in outcomes:
        if isinstance(got, Failure):
            raise got.error(shard.rank)
