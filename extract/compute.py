"""The compute stage: every planned batch the journal lacks runs through its encoder and is
journalled (cache/journal.py), for every cache of the run in one pass over the data.

    text:   each encoder's planned text batches, in plan order
    images: one loader (extract/images.py) over the rows any encoder still needs, in dataset
            order; the main process buffers each encoder's pixels and runs one of its
            planned batches as soon as every row of it has arrived

Each encoder keeps its own plan (text sorted by its own token lengths; image batches = its
good rows in dataset order, in chunks of --batch-size), so every batch it runs holds the same
rows, pixels and padding as a run of its own: the caches are byte-identical whichever
encoders share the pass.

Under torchrun (extract/distributed.py) each rank runs only its own batches (b % N) of every
cache; rank 0 first hands the plans to the others, and every rank's outcome is exchanged at
the end, so one rank's failure stops them all.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from fusebench.cache import TokenFeatures
from fusebench.extract import distributed
from fusebench.extract.datasets import Sample
from fusebench.extract.devicepath import DeviceBatch
from fusebench.extract.distributed import SINGLE, Shard
from fusebench.extract.encoders import Encoder
from fusebench.extract.images import BatchImages, SharedImages, loader
from fusebench.extract.options import ExtractError, ExtractOptions, StageLog
from fusebench.extract.plan import KEPT, Job, fail_line, os_error_line
from fusebench.extract.profile import StageTimer
from tqdm import tqdm


def compute(
    jobs: dict[str, Job], opts: ExtractOptions, logs: dict[str, StageLog], shard: Shard = SINGLE
) -> dict[str, int]:
    """Every batch of `shard` not in a job's journal; returns the rows each job computed, on
    every rank together. Rank 0 announces the plans first; ranks > 0 have received them."""
    if not shard.many:
        return _compute_share(jobs, opts, logs, shard)
    works = {
        n: distributed.Work(job.journal.fingerprint, job.enc.config(), job.plan, job.done)
        for n, job in jobs.items()
    }
    distributed.announce(shard, works)
    try:
        rows = _compute_share(jobs, opts, logs, shard)
    except Exception as e:  # the others hear of it, then it surfaces here as it would alone
        distributed.settle(shard, error=e)
        raise
    total = distributed.settle(shard, rows)
    for job in jobs.values() if shard.rank == 0 else ():
        if lost := distributed.missing_parts(job.journal, job.plan, job.enc.modalities):
            raise ExtractError(lost)
    return total


def _compute_share(
    jobs: dict[str, Job], opts: ExtractOptions, logs: dict[str, StageLog], shard: Shard
) -> dict[str, int]:
    """`compute` on one rank: text per job, then one image pass for all."""
    computed = dict.fromkeys(jobs, 0)
    live = shard.rank == 0  # rank 0 alone draws bars: N bars on one terminal garble them
    for n, job in jobs.items():
        if job.plan.text_batches:
            computed[n] += _text_stage(job, opts.on_error, logs[n], shard, live)
    imaging = {n: job for n, job in jobs.items() if "image" in job.enc.modalities}
    if imaging:
        for n, rows in _image_stage(imaging, opts, logs, shard, live).items():
            computed[n] += rows
    return computed


def _text_stage(job: Job, on_error: str, log: StageLog, shard: Shard, live: bool) -> int:
    """The text batches of `shard` not journalled; rows computed."""
    done = job.done.get("text", set())
    mine = [(b, rows) for b, rows in enumerate(job.plan.text_batches) if shard.mine(b)]
    todo = [(b, rows) for b, rows in mine if b not in done]
    total = sum(len(rows) for _, rows in mine)
    reused = total - sum(len(rows) for _, rows in todo)
    bar = _bar(f"{job.enc.spec.name} {job.ds.name}", total, reused, live and log.live)
    computed, start, timer = 0, time.perf_counter(), StageTimer(job.enc.device)
    try:
        with tqdm(**bar) as progress, job.journal.background() as save:
            for b, rows in todo:  # parts are written while the next batch runs
                with timer("forward"):
                    feats = job.enc.encode_text([job.plan.text_ids[r] for r in rows])
                ok_rows, feats, failures = _split_nonfinite(
                    job.enc, "text", np.asarray(rows), feats
                )
                _stop_if_failed(on_error, job.samples, failures)
                with timer("write"):
                    save("text", b, ok_rows, feats, failures)
                computed += len(rows)
                progress.update(len(rows))
    except OSError as e:
        raise ExtractError(os_error_line(e, job.journal.folder, KEPT)) from None
    if timer.on:
        print(f"profile {job.enc.spec.name} text: {timer.line()}", file=sys.stderr, flush=True)
    _log_modality(log, "text", job.plan.text_batches, job.done, computed, start)
    return computed


def _bar(desc: str, total: int, initial: int, live: bool) -> dict:
    """tqdm arguments of a progress bar over `total` rows, `initial` of them done before."""
    return dict(unit="sample", file=sys.stderr, dynamic_ncols=True, total=total,
                initial=initial, disable=not live, desc=desc)  # fmt: skip


def _image_stage(
    jobs: dict[str, Job],
    opts: ExtractOptions,
    logs: dict[str, StageLog],
    shard: Shard,
    live: bool,
) -> dict[str, int]:
    """The image batches of `shard` not journalled, of every job, in one pass over the data;
    rows each job computed."""
    pending = {
        n: deque(
            (b, rows)
            for b, rows in enumerate(job.plan.image_batches)
            if b not in job.done.get("image", ()) and shard.mine(b)
        )
        for n, job in jobs.items()
    }
    computed = dict.fromkeys(jobs, 0)
    start = time.perf_counter()
    if any(pending.values()):
        total = sum(len(rows) for queue in pending.values() for _, rows in queue)
        live = live and any(log.live for log in logs.values())
        desc = f"{','.join(j.enc.spec.name for j in jobs.values())} images"
        bar = _bar(f"{desc} {next(iter(jobs.values())).ds.name}", total, 0, live)
        with tqdm(**bar) as progress:
            for n, rows in _run_images(jobs, pending, opts):
                computed[n] += rows
                progress.update(rows)
    for n, job in jobs.items():
        _log_modality(logs[n], "image", job.plan.image_batches, job.done, computed[n], start)
    return computed


def _run_images(
    jobs: dict[str, Job], pending: dict[str, deque], opts: ExtractOptions
) -> Iterator[tuple[str, int]]:
    """Runs each pending image batch as its rows arrive and journals it (on one writer
    thread per journal); yields (job, rows) per batch."""
    first = next(iter(jobs.values()))
    folder, timer = first.journal.folder, StageTimer(first.enc.device)
    try:
        with contextlib.ExitStack() as stack:
            saves = {n: stack.enter_context(job.journal.background()) for n, job in jobs.items()}
            arrivals = _arrivals(jobs, pending, opts)
            while True:
                with timer("load/decode"):  # waiting on the loader workers
                    got = next(arrivals, None)
                if got is None:
                    break
                n, b, ok_rows, pixels, failures = got
                job, folder = jobs[n], jobs[n].journal.folder
                with timer("host->device"):
                    if isinstance(pixels, DeviceBatch):  # decoded + resized on the device
                        ok_rows, pixels, failures = _device_pixels(
                            job.enc, ok_rows, pixels, failures
                        )
                    pixels = job.enc.device_pixels(torch.as_tensor(pixels)) if ok_rows else None
                with timer("forward"):
                    feats = job.enc.encode_image(pixels) if ok_rows else None
                rows = len(ok_rows) + len(failures)
                ok, feats, more = _split_nonfinite(job.enc, "image", np.asarray(ok_rows), feats)
                failures = failures + more  # inf/NaN features: failures too
                _stop_if_failed(opts.on_error, job.samples, failures)
                with timer("write"):
                    saves[n]("image", b, ok, feats, failures)
                yield n, rows
    except OSError as e:
        raise ExtractError(os_error_line(e, folder, KEPT)) from None
    if timer.on:
        print(f"profile {','.join(jobs)} images: {timer.line()}", file=sys.stderr, flush=True)


def _arrivals(
    jobs: dict[str, Job], pending: dict[str, deque], opts: ExtractOptions
) -> Iterator[tuple[str, int, list[int], torch.Tensor | None, list]]:
    """(job, batch, ok rows, pixels (B, 3, H, W), failures) of each pending batch once all its
    rows are loaded: one job's batches as its loader makes them; several jobs' from one
    loader over the union of their rows, each image decoded once."""
    names = list(jobs)
    first = jobs[names[0]]
    if len(names) == 1:
        images = BatchImages(list(pending[names[0]]), first.samples, first.enc)
        for b, ok_rows, pixels, failures in loader(images, opts.num_workers, first.enc.device):
            yield names[0], b, ok_rows, pixels, failures
        return
    wants = [{r for _, rows in pending[n] for r in rows} for n in names]
    union = sorted(set().union(*wants))
    chunks = [union[i : i + opts.batch_size] for i in range(0, len(union), opts.batch_size)]
    encs = [jobs[n].enc for n in names]
    images = SharedImages(chunks, first.samples, encs, wants)
    arrived: dict[str, dict] = {n: {} for n in names}  # row -> its (3, H, W) pixels, or failure
    undecoded = {n: bool(getattr(jobs[n].enc.device_image, "on_device", False)) for n in names}
    for per_encoder in loader(images, opts.num_workers, encs[0].device):
        for n, (ok_rows, pixels, failures) in zip(names, per_encoder):
            for j, r in enumerate(ok_rows):
                arrived[n][r] = pixels[j]  # (3, H, W)
            for r, stage, why in failures:
                arrived[n][r] = (r, stage, why)
            while pending[n] and all(r in arrived[n] for r in pending[n][0][1]):
                b, rows = pending[n].popleft()
                yield (n, b, *_stacked(rows, arrived[n], undecoded[n]))


def _stacked(
    rows: list[int], arrived: dict, undecoded: bool = False
) -> tuple[list[int], torch.Tensor | DeviceBatch | None, list]:
    """A planned batch's arrived rows: (ok rows, their pixels stacked in plan order
    (B, 3, H, W), failures), taken out of `arrived`. `undecoded`: the rows are a GPU-decode
    device path's items (JPEG bytes, full-size tensors), gathered into a DeviceBatch."""
    got = [arrived.pop(r) for r in rows]
    ok_rows = [r for r, g in zip(rows, got) if not isinstance(g, tuple)]
    failures = [g for g in got if isinstance(g, tuple)]  # (row, stage, why)
    pixels = [g for g in got if not isinstance(g, tuple)]
    if undecoded:
        return ok_rows, (DeviceBatch(pixels) if pixels else None), failures
    return ok_rows, (torch.stack(pixels) if pixels else None), failures


def _device_pixels(
    enc: Encoder, ok_rows: list[int], batch: DeviceBatch, failures: list
) -> tuple[list[int], torch.Tensor | None, list]:
    """A DeviceBatch decoded and resized on the encoder's device; a row no decoder could
    read becomes a per-sample failure, as the CPU path's would."""
    pixels, bad = enc.device_image.pixels(batch, enc.device)
    dropped = {i for i, _ in bad}
    failures = failures + [(ok_rows[i], "image-load", why) for i, why in bad]
    return [r for i, r in enumerate(ok_rows) if i not in dropped], pixels, failures


def _log_modality(
    log: StageLog, modality: str, batches: list, done: dict[str, set[int]], n: int, start: float
) -> None:
    """The stage line of one modality (none when the encoder has no such tower)."""
    if not batches:
        return
    reused = sum(len(rows) for b, rows in enumerate(batches) if b in done.get(modality, ()))
    extra = f"; {reused} reused from an earlier run" if reused else ""
    log.stage(f"{modality} features", n, time.perf_counter() - start, extra=extra)


def _stop_if_failed(on_error: str, samples: Sequence[Sample], failures: list) -> None:
    if failures and on_error == "fail":
        r, _, why = failures[0]
        raise ExtractError(fail_line(samples[r].guid, why))


def _split_nonfinite(
    enc: Encoder, modality: str, rows: np.ndarray, feats: TokenFeatures | None
) -> tuple[np.ndarray, TokenFeatures | None, list[tuple[int, str, str]]]:
    """Rows whose float16 features hold inf or NaN (activations beyond float16's ±65504, or
    an fp16 forward that overflowed) become per-sample failures, never stored features."""
    if feats is None or not len(rows):
        return rows, feats, []
    finite = np.ones(len(rows), dtype=bool)
    for a in (feats.tokens, *feats.pooled.values()):
        if a is not None:
            finite &= np.isfinite(a.reshape(len(rows), -1)).all(axis=1)
    if finite.all():
        return rows, feats, []
    if enc.precision != "fp32":
        fix = f"rerun with --precision fp32 (the {enc.precision} forward overflowed)"
    else:
        fix = "pick a --layer with smaller activations, or another model"
    why = f"{modality} features are inf/NaN (beyond float16's range ±65504); {fix}"
    failures = [(int(r), f"{modality}-encode", why) for r in rows[~finite]]
    keep = np.flatnonzero(finite)
    return rows[keep], (feats.take(keep) if len(keep) else None), failures
