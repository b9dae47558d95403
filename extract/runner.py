"""The extraction runner: one pass over a dataset writes one cache per encoder; a single
encoder is a list of one.

    every encoder: the checks before any model loads (options, name and YAML, device,
        dataset, --out, lock, the data problems that stop a run, the existing cache)
    -> every model loads -> each cache's plan and journal (extract/plan.py)
    -> one compute pass for all (extract/compute.py) -> each cache assembled (extract/assemble.py)

A SIGKILL at any point loses at most the batches in flight; rerunning the same command reuses
every journalled batch and recomputes nothing else. Locks, resume and refresh are per cache:
an encoder whose cache is up to date is skipped while the others run. The caches are
byte-identical to separate runs of each encoder, and to a single process under torchrun.

Under torchrun (extract/distributed.py) rank 0 leads (locks, plans, assembles) and every rank
computes its share of each plan; ranks > 0 follow (`_follow`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from fusebench.cache import exclusive_lock, fingerprint, parts_dir
from fusebench.cache.journal import Journal
from fusebench.extract import distributed
from fusebench.extract.assemble import finish
from fusebench.extract.compute import compute
from fusebench.extract.datasets import Dataset
from fusebench.extract.distributed import Shard
from fusebench.extract.encoders import EncoderSpec, build_encoder, load_spec, resolve_device
from fusebench.extract.options import (
    ExtractError,
    ExtractInterrupted,
    ExtractOptions,
    ExtractReport,
    StageLog,
    split_encoders,
)
from fusebench.extract.plan import (
    Job,
    cache_path,
    check_output,
    load_encoder,
    prepare,
    read_dataset,
    usable_rows,
)
from fusebench.extract.settings import cache_config, check_existing


@dataclass
class Setup:
    """What the checks before any model loads found: every rank has it."""

    specs: dict[str, EncoderSpec]  # --encoder's names, in the order given
    dev: torch.device
    logs: dict[str, StageLog]  # one per encoder
    ds: Dataset
    finals: dict[str, Path]  # name -> its cache
    request: dict  # the data options as given, recorded in each cache


def run(opts: ExtractOptions) -> list[ExtractReport]:
    """Runs every encoder of `opts.encoders` over `opts.data` in one pass; one cache each,
    the same bytes as a run of each alone. Reports in the order given.

    Everything a user can get wrong (options, every encoder's name and YAML, the device, the
    dataset, every --out location, every lock, the data problems that stop a run, a cache of
    other settings) is checked for EVERY encoder before the first model loads."""
    shard = Shard.current()  # rank 0 of 1 outside torchrun
    t0 = time.perf_counter()
    with distributed.checked(shard):  # under torchrun: one rank failing these fails them all
        setup = _set_up(opts, shard)
    try:
        if shard.rank > 0:  # computes its share of rank 0's plans; rank 0 alone writes
            reports = _follow(setup, opts, shard)
        else:
            reports = _lead(setup, opts, shard, t0)
            distributed.announce_end(shard, None)  # all up to date: the others have nothing to do
    except KeyboardInterrupt:
        raise ExtractInterrupted(_interrupted_line(list(setup.finals.values()))) from None
    except Exception as e:
        distributed.announce_end(shard, e)  # rank 0 stopped before handing out the plans
        raise
    seconds = time.perf_counter() - t0
    for rep in reports:
        rep.seconds = seconds
    return reports


def _set_up(opts: ExtractOptions, shard: Shard) -> Setup:
    """The checks each rank makes alone, in order: options, the encoders' specs (YAML,
    name, hf: path), the device, the dataset index, the --out locations."""
    opts.check()
    chosen, repeated = split_encoders(opts.encoders, opts.model)
    specs = {
        n: load_spec(
            n, model=m, layer=opts.layer, random_init=opts.random_init, precision=opts.precision
        )
        for n, m in chosen.items()
    }
    dev = resolve_device(distributed.rank_device(opts.device, shard))
    names = ",".join(s.name for s in specs.values())
    log = StageLog(f"extract {names}{shard.tag}", opts.quiet)
    for note in repeated:
        log.note(note)
    ds = read_dataset(opts, list(specs.values()), log)
    finals = {n: cache_path(opts.out, ds.name, n, opts.layer) for n in specs}
    for final in finals.values():
        check_output(final)
    logs = {n: StageLog(f"extract {s.name}{shard.tag}", opts.quiet) for n, s in specs.items()}
    return Setup(specs, dev, logs, ds, finals, opts.request())


def _lead(setup: Setup, opts: ExtractOptions, shard: Shard, t0: float) -> list[ExtractReport]:
    """Rank 0 (or the only process): locks, checks, plans, computes its share, assembles."""
    ds, finals = setup.ds, setup.finals
    with contextlib.ExitStack() as locks:
        for final in sorted(finals.values(), key=str):  # one order: no deadlock
            locks.enter_context(exclusive_lock(final))  # before any model loads
        rows = {n: usable_rows(ds, spec, opts) for n, spec in setup.specs.items()}
        for n, spec in setup.specs.items():  # another dataset or setting: refused, no model
            check_existing(finals[n], ds, spec, opts, setup.request)
        encs = {
            n: load_encoder(
                spec,
                setup.dev,
                opts.exact_preprocess,
                setup.logs[n],
                opts.decode_on(setup.dev.type),
            )  # fmt: skip
            for n, spec in setup.specs.items()
        }
        startup = time.perf_counter() - t0
        reports: dict[str, ExtractReport] = {}
        jobs: dict[str, Job] = {}
        for n, enc in encs.items():
            job = prepare(ds, finals[n], enc, rows[n], opts, setup.logs[n],
                          startup=startup, request=setup.request)  # fmt: skip
            if isinstance(job, ExtractReport):  # up to date: nothing to run
                reports[n] = job
            else:
                jobs[n] = job
        if jobs:
            try:
                computed = compute(jobs, opts, setup.logs, shard)
                for n, job in jobs.items():
                    reports[n] = finish(job, computed[n], setup.logs[n])
            finally:  # once settled, the other ranks wait for this, whatever happened here
                distributed.assembled(shard)
    return [reports[n] for n in setup.specs]


def _follow(setup: Setup, opts: ExtractOptions, shard: Shard) -> list[ExtractReport]:
    """A rank > 0: loads the models while rank 0 plans, computes its share of rank 0's plans
    into the shared journals, prints one line and returns; rank 0 assembles the caches."""
    ds = setup.ds
    samples = ds.samples[: opts.limit] if opts.limit else ds.samples
    reports = {
        n: ExtractReport(setup.finals[n], len(samples), 0, 0, 0, 0, 0.0, rank=shard.rank)
        for n in setup.specs
    }
    encs, fps = _follower_models(setup, opts, shard, len(samples))
    finals = ", ".join(str(final) for final in setup.finals.values())
    works = distributed.receive(shard)
    if works is None:
        for rep in reports.values():
            rep.up_to_date = True
        print(f"rank {shard.rank}: computed 0 batches ({finals} is up to date)", flush=True)
        return list(reports.values())
    jobs = {}
    for n, work in works.items():
        journal = Journal(parts_dir(setup.finals[n]), work.fingerprint)
        if problem := distributed.disagreement(shard, work, fps[n], encs[n].config(), journal):
            distributed.settle(shard, error=ExtractError(problem))
        jobs[n] = Job(ds, setup.finals[n], encs[n], samples, {}, work.config, [], journal,
                      work.plan, work.done)  # fmt: skip
    mine = {n: _own_batches(job, shard) for n, job in jobs.items()}  # before compute fills in
    compute(jobs, opts, setup.logs, shard)
    for n, rows in mine.items():
        reports[n].computed = sum(rows)
    batches = sum(map(len, mine.values()))
    print(f"rank {shard.rank}: computed {batches} batches; rank 0 assembles {finals}", flush=True)
    distributed.assembled(shard)
    return list(reports.values())


def _follower_models(
    setup: Setup, opts: ExtractOptions, shard: Shard, rows: int
) -> tuple[dict, dict[str, str]]:
    """(encoder, the fingerprint it would give its cache) per name, on a rank > 0. A failure
    reaches rank 0 in `settle`, unless rank 0 found every cache up to date."""
    try:
        encs = {n: build_encoder(spec, setup.dev) for n, spec in setup.specs.items()}
        fps = {}
        for n, enc in encs.items():
            enc.select_preprocess(
                exact=opts.exact_preprocess, decode=opts.decode_on(setup.dev.type)
            )
            config = cache_config(enc, setup.ds, batch_size=opts.batch_size, limit=opts.limit)
            fps[n] = fingerprint(config, setup.ds.manifest()[:rows])
    except Exception as e:  # rank 0 is planning: it hears of this in `settle`
        if distributed.receive(shard) is None:  # up to date: rank 0 is done, nothing to settle
            raise
        distributed.settle(shard, error=e)
        raise
    return encs, fps


def _own_batches(job: Job, shard: Shard) -> list[int]:
    """The rows of each batch of `job` this rank computes."""
    return [
        len(rows)
        for m, batches in (("text", job.plan.text_batches), ("image", job.plan.image_batches))
        for b, rows in enumerate(batches)
        if b not in job.done.get(m, ()) and shard.mine(b) and m in job.enc.modalities
    ]


def _interrupted_line(finals: list[Path]) -> str:
    """Ctrl-C: what each journal kept, and how to resume."""
    kept = []
    for final in finals:
        parts = parts_dir(final)
        n = len(list(parts.glob("*.npz"))) if parts.is_dir() else 0
        if n:
            kept.append(f"{n} finished batches in {parts}")
    if not kept:
        return "interrupted; nothing was written; rerun the same command to start again"
    return f"interrupted; kept {', '.join(kept)}; rerun the same command to resume"
