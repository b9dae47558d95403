"""One grid on many ranks: `torchrun --nproc-per-node N cli.py compare ...` (or `fuse`).

Every rank runs the same checks, loads the same caches and computes the same folds (all
deterministic), then fits its share of the grid's cells: a cell (all its folds × seeds) stays
whole on one rank, because its fits may train as one batched model, and so do cells that share
one fit (byte-identical inputs, fuse.grid.shared_fits). Cells go to ranks by a
fixed greedy split on an estimated cost (`assign`), and every fit is seeded by its own
(seed, fold) only, so which rank fits a cell never changes its numbers.

Rank 0 creates the one staged run folder (`<out>/<stamp>-<name>.tmp/`, fuse._util
StagedRunDir) and broadcasts its path; every rank saves its models under it (so `--out` must
be on a file system every rank sees), then sends its fits (HeadRun lists: numpy arrays, small)
to rank 0, which puts them back in the single-process order and writes the run exactly as one
process does.

No rank is ever left waiting: each rank runs the checks before training alone, before any
collective; from then on a rank that fails still takes part in every collective, carrying its
exception, so every rank stops (with its own error, else the lowest failed rank's as
`rank r: <line>`) and the staged folder is removed. Rank 0 prints that one line; the others
exit with the same code and print nothing (said_by_rank_0), so the terminal torchrun shares
shows it once. Only small Python objects cross between
ranks (cache.ranks: gloo), never features.

Outside torchrun (WORLD_SIZE unset or 1) every function here is the single-process identity:
all cells on rank 0, no collective, the spec's device as given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusebench.cache import ranks
from fusebench.fuse._util import OutputError, StagedRunDir

if TYPE_CHECKING:
    from fusebench.fuse.grid import Cell, GridSpec

HeadRun = Any  # a fit's record (fuse.experiment.HeadRun): here, anything with `.cell`

__all__ = [
    "SharedRunDir",
    "agree",
    "assign",
    "collect",
    "estimated_cost",
    "follower_line",
    "is_lead",
    "my_fits",
    "rank_spec",
    "split_note",
]

TOKEN_COST = 8.0  # a token head's fit vs a pooled one's (cross_attn dominates a compare)


def estimated_cost(cell: Cell) -> float:
    """A cell's relative cost, for balancing only (it never changes a number): token heads
    (attention over every token) cost several pooled or classical fits."""
    return TOKEN_COST if cell.config.tokens else 1.0


def assign(costs: Sequence[float], n_ranks: int) -> list[list[int]]:
    """Cell indices per rank: longest first, each to the least loaded rank (ties: the lower
    rank, then grid order). Deterministic, so every rank computes the same split alone."""
    loads = [0.0] * n_ranks
    share: list[list[int]] = [[] for _ in range(n_ranks)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(n_ranks), key=lambda r: (loads[r], r))
        share[r].append(i)
        loads[r] += costs[i]
    return [sorted(s) for s in share]  # each rank fits its cells in grid order


def my_fits(
    fits: Sequence[Sequence[Cell]],
) -> tuple[list[Sequence[Cell]], list[int]]:
    """This rank's fits (cells grouped by fit, fuse.grid.shared_fits: a group stays whole on
    one rank; all of them outside torchrun) and how many cells each rank reports."""
    rank, size = ranks.world()
    share = assign([estimated_cost(group[0]) for group in fits], size)
    counts = [sum(len(fits[i]) for i in mine) for mine in share]
    return [fits[i] for i in share[rank]], counts


def is_lead() -> bool:
    """Whether this rank speaks for the run (rank 0; the only process outside torchrun)."""
    return ranks.world()[0] == 0


def follower_line(n_cells: int) -> str:
    """What a rank other than 0 prints instead of the table rank 0 prints."""
    rank, size = ranks.world()
    return f"rank {rank} of {size}: fitted {n_cells} cell(s) into the run rank 0 wrote"


def split_note(counts: list[int], n_cells: int) -> str | None:
    """'rank 0 of 2: 3 of 5 cells (the bar shows these); rank 1: 2' — None outside torchrun.
    counts: the cells each rank reports (my_fits)."""
    rank, size = ranks.world()
    if size == 1:
        return None
    others = ", ".join(f"rank {r}: {n}" for r, n in enumerate(counts) if r != rank)
    mine = f"rank {rank} of {size}: {counts[rank]} of {n_cells} cells"
    return f"{mine} (the bar shows these); {others}"


def rank_spec(spec: GridSpec) -> GridSpec:
    """The spec this rank fits with: under torchrun on a CUDA machine, --device auto / cuda
    means this rank's own GPU, cuda:LOCAL_RANK (ranks beyond the GPU count share them round
    robin); any other device, or one process, as given. config.yaml keeps the user's value."""
    if not ranks.is_distributed() or spec.device not in ("auto", "cuda"):
        return spec
    import torch

    if not torch.cuda.is_available():
        return spec
    local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    return dataclasses.replace(spec, device=f"cuda:{local}")


# ---------------------------------------------------------------- failures travel too


class RankLostError(OutputError):
    """A collective failed because another rank is gone (killed, out of memory, a lost
    node): gloo's "Connection closed by peer". One line; torchrun's summary names the rank."""


def _collective(op: Callable[..., Any], *args: Any) -> Any:
    """ranks.<op>(*args), with a rank that vanished mid-run turned into RankLostError."""
    try:
        return op(*args)
    except RuntimeError as e:  # gloo: "Connection closed by peer", "Connection reset", timeouts
        cause = " ".join(str(e).split())[:100]
        raise RankLostError(
            f"rank {ranks.world()[0]}: another rank of this torchrun stopped (killed or "
            f"crashed; torchrun's summary names it): {cause}; nothing was kept, rerun the command"
        ) from None


def _tell_others(outcome: Any) -> None:
    """Rank 0 broadcasts how the run folder ended; a rank that is gone no longer needs to know
    (rank 0's own outcome stands)."""
    with contextlib.suppress(RankLostError):
        _collective(ranks.broadcast, outcome)


def _portable(e: BaseException) -> BaseException:
    """e itself when it survives pickling (ValueError, CacheError, OutputError do), else a
    RuntimeError carrying its one line."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


SAID_BY_RANK_0 = "fusebench_said_by_rank_0"  # attribute of an error rank 0 reports too


def said_by_rank_0(e: BaseException) -> BaseException:
    """Marks `e` as an error rank 0 also raises (it passed through a collective), so the
    command line prints it once, on rank 0, not once per rank (cli: _run_stage_two)."""
    if ranks.is_distributed():
        setattr(e, SAID_BY_RANK_0, True)
    return e


def _raise_first(errors: Sequence[BaseException | None], own: BaseException | None) -> None:
    """Raise this rank's own error, else the lowest failed rank's, its line prefixed with
    `rank r: ` as extraction's are; nothing when no rank failed. Every rank then knows every
    rank's error, so rank 0 has the line to print."""
    if own is not None:
        raise said_by_rank_0(own)
    for r, e in enumerate(errors):
        if e is None:
            continue
        if len(e.args) == 1 and isinstance(e.args[0], str):
            e.args = (f"rank {r}: {e.args[0]}",)
        raise said_by_rank_0(e)


def agree(run: Callable[[], Any]) -> Any:
    """run() on every rank; if it raises on any rank, every rank raises (its own error, else
    the lowest failed rank's). The checks before training go through here: each rank checks
    alone (no collective inside run), then one all_gather tells every rank how the others did."""
    own = None
    try:
        value = run()
    except Exception as e:
        if not ranks.is_distributed():
            raise
        own = e
    if ranks.is_distributed():
        _raise_first(_collective(ranks.all_gather, None if own is None else _portable(own)), own)
    return value


def collect(fit_mine: Callable[[], list[HeadRun]], cells: Sequence[Cell]) -> list[HeadRun] | None:
    """fit_mine() on every rank, then every rank's fits on rank 0 in the single-process order
    (grid order of cells; a cell's own fits in the order it made them). Other ranks: None.
    A rank whose fits failed sends its error instead; then every rank raises."""
    if not ranks.is_distributed():
        return fit_mine()
    own = None
    try:
        mine: list[HeadRun] | BaseException = fit_mine()
    except Exception as e:
        own = e
        mine = _portable(e)
    parts = _collective(ranks.gather, mine)
    if parts is None:  # not rank 0: rank 0 says how it ended when the run folder closes
        if own is not None:
            raise said_by_rank_0(own)
        return None
    _raise_first([p if isinstance(p, BaseException) else None for p in parts], own)
    order = {c.id: i for i, c in enumerate(cells)}
    runs = [r for part in parts for r in part]
    return sorted(runs, key=lambda r: order[r.cell])  # stable: each cell's fits stay in order


# ---------------------------------------------------------------- the one run folder


class SharedRunDir:
    """StagedRunDir on rank 0, its staging path on every rank.

    Entering: rank 0 creates `<out>/<stamp>-<suffix>.tmp/` and broadcasts its path (or why it
    could not); every other rank checks it sees that folder (a node-local --out would not).
    Leaving: rank 0 finishes the folder as StagedRunDir does (renamed into place, or removed
    on any error) and broadcasts the outcome, so every rank ends the same way. `final` is the
    finished folder on every rank. One process: exactly StagedRunDir."""

    def __init__(self, out: str | Path, suffix: str) -> None:
        self.rank = ranks.world()[0]
        self.staged = StagedRunDir(out, suffix)
        self.path: Path | None = None
        self.final: Path | None = None

    def __enter__(self) -> SharedRunDir:
        if not ranks.is_distributed():
            self.staged.__enter__()
            self.path, self.final = self.staged.path, self.staged.final
            return self
        made: Any = None
        if self.rank == 0:
            try:
                self.staged.__enter__()
                made = (self.staged.path, self.staged.final)
            except Exception as e:
                made = _portable(e)
        made = _collective(ranks.broadcast, made)
        if isinstance(made, BaseException):
            raise said_by_rank_0(made)
        self.path, self.final = made

        def visible() -> None:
            if not self.path.is_dir():
                raise OutputError(
                    f"rank {self.rank} does not see the run folder {self.path} that rank 0 "
                    "created; pass --out a folder on a file system every node shares"
                )

        try:
            agree(visible)
        except BaseException:
            if self.rank == 0:
                self.staged._discard()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not ranks.is_distributed():
            out = self.staged.__exit__(exc_type, exc, tb)
            self.path = self.staged.path
            return out
        if self.rank != 0:
            try:
                ended = _collective(ranks.broadcast, None)
            except RankLostError:
                if exc is None:
                    raise
                return False  # this rank's own error goes on
            if exc is None and isinstance(ended, BaseException):
                raise said_by_rank_0(ended)
            return False  # this rank's own error, if any, goes on
        try:
            self.staged.__exit__(exc_type, exc, tb)  # an OSError comes back as OutputError
        except BaseException as e:
            _tell_others(_portable(e))
            raise
        _tell_others(None if exc is None else _portable(exc))
        self.path = self.staged.path
        return False
