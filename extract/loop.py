"""The batched extraction loop: plan once, compute batch by batch into a journal, assemble.

    dataset -> plan (text rows sorted by token length; image rows in order) -> journal of
    finished batches (<cache>.parts/) -> <cache>.tmp -> rename to <cache> when complete.

A SIGKILL at any point loses at most the batch in flight; rerunning the same command reuses
every journalled batch and recomputes nothing else.

Refresh: when the data changed since a cache was built with the same settings (files edited,
rows added or removed, labels changed), `extract` builds the new cache reusing the stored
features of every row that was ok and whose inputs (guid, text_sha, image_sha, and the text
decoding) did not change, per modality; only the other rows are planned, journalled and
computed. The old cache stays in place until the new one replaces it. Other settings still
need --overwrite.

Everything the user can get wrong (options, the --out location, the model folder) is checked
before the model loads; file-system faults while writing become one ExtractError line and
keep every finished batch for the rerun.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from fusebench.cache import (
    FAILED,
    OK,
    CacheError,
    CacheWriter,
    DamagedCacheError,
    FeatureStore,
    TokenFeatures,
    check_fresh,
    exclusive_lock,
    fingerprint,
    parts_dir,
    read_rows,
    record_sources,
    rewrite_sources,
    temp_path,
)
from fusebench.cache.format import DATA_KEYS, canonical_json, describe_differences, write_error
from fusebench.cache.journal import Journal
from fusebench.cache.naming import cache_file
from fusebench.cache.reader import decode_attr, read_header
from fusebench.extract import distributed
from fusebench.extract.datasets import (
    Dataset,
    Sample,
    load_dataset,
    modality_problem,
)
from fusebench.extract.distributed import SINGLE, Shard
from fusebench.extract.encoders import (
    Encoder,
    EncoderSpec,
    build_encoder,
    load_spec,
    modalities_of,
    resolve_device,
)
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm


class ExtractError(RuntimeError):
    """A one-line failure of the run (`--on-error fail` met a bad sample, every sample failed,
    the disk filled up, ...); the message names it and the fix."""


class ExtractInterrupted(KeyboardInterrupt):
    """Ctrl-C: the message says what was kept and how to resume."""


@dataclass
class ExtractReport:
    path: Path
    rows: int
    ok: int
    failed: int
    computed: int  # rows run through the encoder by this call (one per modality)
    reused: int  # rows found already done in the journal of an earlier, stopped run
    seconds: float
    up_to_date: bool = False
    real_tokens: int = 0  # text: tokens that carry text
    computed_tokens: int = 0  # text: tokens the model ran on (incl. batch padding)
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (guid, stage, message)
    startup_seconds: float = 0.0  # reading the dataset index and loading the model
    refreshed: bool = False  # the data changed since the existing cache was built
    kept: int = 0  # refresh: rows whose features were copied from the existing cache
    rank: int = 0  # torchrun: > 0 on the ranks that computed a share and left rank 0 to write


@dataclass
class Plan:
    """Fixed once per cache: which rows form which batch. Saved in the journal.

    A refresh also fixes which rows are copied from the existing cache: reuse[modality] =
    [[row, row in that cache], ...], and reuse_from = that cache's fingerprint."""

    text_batches: list[list[int]]
    image_batches: list[list[int]]
    text_ids: dict[int, list[int]]  # row -> token ids (truncated, unpadded)
    reuse: dict[str, list[list[int]]] = field(default_factory=dict)
    reuse_from: str = ""

    def to_json(self) -> dict:
        return {
            "text_batches": self.text_batches,
            "image_batches": self.image_batches,
            "text_ids": {str(k): v for k, v in self.text_ids.items()},
            "reuse": self.reuse,
            "reuse_from": self.reuse_from,
        }

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        return cls(
            d["text_batches"],
            d["image_batches"],
            {int(k): v for k, v in d["text_ids"].items()},
            d.get("reuse", {}),
            d.get("reuse_from", ""),
        )

    @property
    def text_len(self) -> int:
        return max((len(v) for v in self.text_ids.values()), default=0)


class StageLog:
    """Extraction progress for a terminal and for a log file alike. On a terminal: one bar
    with samples/s. When stderr is not a terminal (`> log 2>&1`, a pipe, a batch job): no
    redrawn bar, one plain line per finished stage instead, e.g.
        extract minilm: text: 600 samples in 5.1s (118 samples/s)
    quiet: nothing at all."""

    def __init__(self, prefix: str, quiet: bool) -> None:
        self.prefix = prefix
        self.live = not quiet and sys.stderr.isatty()  # a redrawn bar: terminals only
        self.lines = not quiet and not self.live

    def stage(
        self,
        what: str,
        n: int | None = None,
        seconds: float = 0.0,
        unit: str = "samples",
        extra: str = "",
    ) -> None:
        """One line for a finished stage: `n` items in `seconds` and their rate."""
        if not self.lines:
            return
        done = f"{n} {unit} in {seconds:.1f}s" if n is not None else f"{seconds:.1f}s"
        rate = n / seconds if n and seconds > 0 else 0.0
        rate = f" ({rate:.{1 if rate < 100 else 0}f} {unit}/s)" if rate else ""
        print(f"{self.prefix}: {what}: {done}{rate}{extra}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        """A remark the user should read (a damaged journal part discarded, ...); not when quiet."""
        if self.live or self.lines:
            tqdm.write(f"note: {message}", file=sys.stderr)


def cache_path(out: str | Path, dataset: str, encoder: str) -> Path:
    """<out>/<dataset>/<encoder>.h5 (hf:org/name -> hf-org--name.h5): cache.naming's rule,
    the one `fuse --text/--image` reads by."""
    return cache_file(Path(out) / dataset, encoder)


def cache_config(enc: Encoder, ds: Dataset, *, batch_size: int, limit: int | None) -> dict:
    """Everything that changes the cached numbers or their meaning, as stored in the cache's
    `config` attribute and hashed into its fingerprint: the encoder's own config, the batch
    size (padding changes float16 bits), the dataset's format, classes and legacy text
    encoding, --limit (None when it covers the whole dataset), and the manifest's --column
    mapping (only when one is given, so caches built without it keep their fingerprint)."""
    return (
        enc.config()
        | {
            "batch_size": batch_size,
            "format": ds.format,
            "limit": limit if limit and limit < len(ds.samples) else None,
            "classes": list(ds.classes),
            "text_encoding": ds.text_encoding,
        }
        | ({"columns": ds.column_map} if ds.column_map else {})
    )  # --column: absent when not used


def check_output(final: Path) -> None:
    """The cache's folder is (made) a writable folder; checked before the model loads, so a
    bad --out costs seconds, not a model load and a pass over the data."""
    folder = final.parent
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise ExtractError(
                    f"{p} is a file, not a folder, so {final} cannot be written; "
                    "pass --out a folder (or move that file away)"
                )
            break
    if final.exists() and not final.is_file():
        raise ExtractError(
            f"{final} exists and is not a file; move it away or pass --out elsewhere"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ExtractError(os_error_line(e, folder)) from None


def os_error_line(e: OSError, where: Path, kept: str = "") -> str:
    """One line for a file-system fault: the path, what the system said, and the fix (the
    cache's own wording, cache.format.write_error)."""
    return str(write_error(Path(e.filename or where), e, kept))


def plan_batches(
    encoder: Encoder, samples: Sequence[Sample], good: dict[str, list[int]], batch_size: int
) -> Plan:
    """Text: sorted by token length so each batch pads to little more than its own longest.
    Images: dataset order. Ties keep dataset order, so the plan is deterministic."""
    text_ids: dict[int, list[int]] = {}
    text_batches: list[list[int]] = []
    if "text" in encoder.modalities and good["text"]:
        rows = good["text"]
        ids = encoder.tokenize([samples[r].text or "" for r in rows])
        text_ids = dict(zip(rows, ids))
        order = sorted(rows, key=lambda r: (len(text_ids[r]), r))
        text_batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    image_batches: list[list[int]] = []
    if "image" in encoder.modalities:
        rows = good["image"]
        image_batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return Plan(text_batches, image_batches, text_ids)


class _ImageBatches(TorchDataset):
    """Item b = batch b, loaded and preprocessed in a worker. Undecodable images are
    returned as failures, not raised, so the rest of the batch goes on."""

    def __init__(
        self, batches: list[tuple[int, list[int]]], samples: Sequence[Sample], encoder: Encoder
    ) -> None:
        self.batches = batches
        self.samples = samples  # a file path or an embedded-bytes reference per sample
        self.load = encoder.load_image  # the reference loader, or the fast path's (draft decode)
        self.preprocess = encoder.preprocess

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        b, rows = self.batches[i]
        images, ok, failures = [], [], []
        for r in rows:
            try:
                images.append(self.load(self.samples[r]))
                ok.append(r)
            except (ValueError, OSError) as e:
                failures.append((r, "image-load", str(e).splitlines()[0]))
        pixels = self.preprocess(images) if images else None  # (B, 3, H, W)
        return b, ok, pixels, failures


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def check_options(on_error: str, batch_size: int, limit: int | None) -> None:
    """The numeric and choice options of `extract`, before anything is read."""
    if on_error not in ("skip", "fail"):
        raise ValueError(f"--on-error must be skip or fail, not '{on_error}'")
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if limit is not None and limit < 1:
        raise ValueError("--limit must be at least 1")


def read_dataset(
    data: str | Path,
    data_format: str | None,
    specs: Sequence[EncoderSpec],
    log: StageLog,
    *,
    on_error: str,
    text_encoding: str | None,
    labels: Sequence[str] | None,
    columns: dict[str, str] | None,
) -> Dataset:
    """The dataset, refused (ValueError) when it lacks a modality one of `specs` reads.
    --on-error fail decodes every image first, so the run stops at the FIRST bad sample
    before any work."""
    t_read = time.perf_counter()
    ds = load_dataset(
        data,
        data_format,
        check_images=on_error == "fail",
        text_encoding=text_encoding,
        labels=labels,
        columns=columns,
    )
    for spec in specs:  # text-only or image-only data
        if missing := modality_problem(ds, modalities_of(spec), spec.name):
            raise ValueError(missing)
    log.stage(f"read dataset {ds.name}", len(ds.samples), time.perf_counter() - t_read)
    return ds


def extract(
    data: str | Path,
    encoder: str = "minilm",
    *,
    out: str | Path = "features",
    model: str | None = None,
    layer: int | None = None,
    random_init: bool = False,
    data_format: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    limit: int | None = None,
    on_error: str = "skip",
    num_workers: int | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    exact_preprocess: bool = False,
    text_encoding: str | None = None,
    labels: Sequence[str] | None = None,
    columns: dict[str, str] | None = None,
) -> ExtractReport:
    """Runs `encoder` over every sample of `data` and writes <out>/<dataset>/<encoder>.h5.

    Order of checks: options, the encoder's spec (YAML, name, hf: path) and the device, the
    dataset index, the --out location, the lock; only then the model loads."""
    shard = distributed.Shard.current()  # rank 0 of 1 outside torchrun
    t0 = time.perf_counter()
    with distributed.checked(shard):  # under torchrun: one rank failing these fails them all
        check_options(on_error, batch_size, limit)
        spec = load_spec(
            encoder, model=model, layer=layer, random_init=random_init, precision=precision
        )
        dev = resolve_device(distributed.rank_device(device, shard))
        log = StageLog(f"extract {spec.name}{shard.tag}", quiet)
        ds = read_dataset(
            data,
            data_format,
            [spec],
            log,
            on_error=on_error,
            text_encoding=text_encoding,
            labels=labels,
            columns=columns,
        )
        final = cache_path(out, ds.name, encoder)
        check_output(final)
    try:
        if shard.rank > 0:  # computes its share of rank 0's plan; rank 0 alone writes the cache
            rep = distributed.follow(
                shard,
                ds,
                final,
                spec,
                dev,
                batch_size=batch_size,
                limit=limit,
                on_error=on_error,
                num_workers=num_workers,
                exact_preprocess=exact_preprocess,
                log=log,
            )
        else:
            with exclusive_lock(final):  # before the model loads: a second writer hears at once
                rep = _extract_locked(
                    ds,
                    final,
                    spec,
                    dev,
                    batch_size=batch_size,
                    limit=limit,
                    on_error=on_error,
                    num_workers=num_workers,
                    overwrite=overwrite,
                    exact_preprocess=exact_preprocess,
                    log=log,
                    t0=t0,
                    shard=shard,
                )
            distributed.announce_end(shard, None)  # up to date: the others have nothing to do
    except KeyboardInterrupt:
        parts = parts_dir(final)
        n = len(list(parts.glob("*.npz"))) if parts.is_dir() else 0
        kept = (
            f"{n} finished batches are kept in {parts}; rerun the same command to resume"
            if n
            else "nothing was written; rerun the same command to start again"
        )
        raise ExtractInterrupted(f"interrupted; {kept}") from None
    except Exception as e:
        distributed.announce_end(shard, e)  # rank 0 stopped before handing out the plan
        raise
    rep.seconds = time.perf_counter() - t0
    return rep


def _extract_locked(
    ds: Dataset,
    final: Path,
    spec: EncoderSpec,
    dev: torch.device,
    *,
    batch_size: int,
    limit: int | None,
    on_error: str,
    num_workers: int | None,
    overwrite: bool,
    exact_preprocess: bool = False,
    log: StageLog,
    t0: float,
    shard: Shard = SINGLE,
) -> ExtractReport:
    samples, blocked, good = _usable_rows(ds, spec, limit, on_error)  # before the model loads
    enc = _load_encoder(spec, dev, exact_preprocess, log)
    job = _prepare(
        ds,
        final,
        enc,
        samples,
        blocked,
        good,
        batch_size=batch_size,
        limit=limit,
        overwrite=overwrite,
        log=log,
        startup=time.perf_counter() - t0,
    )
    if isinstance(job, ExtractReport):  # up to date
        return job
    try:
        computed = _compute(
            enc,
            samples,
            job.plan,
            job.journal,
            job.done,
            on_error,
            num_workers,
            log,
            bar=job.bar(live=log.live),
            shard=shard,
        )
    except OSError as e:
        raise ExtractError(os_error_line(e, job.journal.folder, KEPT)) from None
    return _finish(job, computed, log)


KEPT = " (every finished batch is kept)"


@dataclass
class Job:
    """One cache's extraction once `_prepare` has planned it: the phases between (compute,
    `_finish`) need only this, so one pass over the data can drive several caches
    (extract/multi.py) and each still ends exactly as a run of its own would."""

    ds: Dataset
    final: Path
    enc: Encoder
    samples: Sequence[Sample]
    blocked: dict[int, list]  # row -> its fatal data problems (never planned)
    config: dict
    manifest: list[dict]
    journal: Journal
    plan: Plan
    done: dict[str, set[int]]  # modality -> journalled batches (an earlier, stopped run)
    reused: int  # rows of those batches
    total: int  # rows of every planned batch
    startup: float

    def bar(self, *, live: bool) -> dict:
        """tqdm arguments of this cache's progress bar."""
        desc = f"{self.enc.spec.name} {self.ds.name}"
        return dict(total=self.total, initial=self.reused, disable=not live, desc=desc)


def _usable_rows(
    ds: Dataset, spec: EncoderSpec, limit: int | None, on_error: str
) -> tuple[Sequence[Sample], dict[int, list], dict[str, list[int]]]:
    """(samples, blocked rows, good rows per modality) for `spec`'s modalities; ExtractError
    when a data problem stops the run (--on-error fail, or every sample failed): checked
    before the model loads."""
    samples = ds.samples[:limit] if limit else ds.samples
    modalities = modalities_of(spec)
    blocked = {i: s.failed(modalities) for i, s in enumerate(samples)}
    blocked = {i: p for i, p in blocked.items() if p}
    if blocked and (on_error == "fail" or len(blocked) == len(samples)):
        i = min(blocked)
        why = blocked[i][0].reason
        if on_error == "fail":
            raise ExtractError(_fail_line(samples[i].guid, why))
        raise ExtractError(_all_failed_line(len(samples), samples[i].guid, why, ds.root))
    good = {m: [i for i in range(len(samples)) if i not in blocked] for m in modalities}
    return samples, blocked, good


def _load_encoder(
    spec: EncoderSpec, dev: torch.device, exact_preprocess: bool, log: StageLog
) -> Encoder:
    """The model, with its image path chosen (the fast path unless asked not to)."""
    t_load = time.perf_counter()
    enc = build_encoder(spec, dev)
    if note := enc.select_preprocess(exact=exact_preprocess):
        log.note(note)
    log.stage(f"load model {spec.model} on {dev}", seconds=time.perf_counter() - t_load)
    return enc


def _prepare(
    ds: Dataset,
    final: Path,
    enc: Encoder,
    samples: Sequence[Sample],
    blocked: dict[int, list],
    good: dict[str, list[int]],
    *,
    batch_size: int,
    limit: int | None,
    overwrite: bool,
    log: StageLog,
    startup: float,
) -> Job | ExtractReport:
    """Fingerprint, the existing cache (up to date: its report; refresh: the rows to copy),
    the journal and the plan (saved before any batch runs)."""
    modalities = enc.modalities
    config = cache_config(enc, ds, batch_size=batch_size, limit=limit)
    manifest = ds.manifest()[: len(samples)]
    fp = fingerprint(config, manifest)

    reuse: dict[str, list[list[int]]] = {}
    reuse_from = ""
    if final.exists():
        state = _existing_cache(final, fp, config, manifest, overwrite)
        if state == "same" and _up_to_date(final, ds, samples, log):
            return ExtractReport(final, len(samples), 0, 0, 0, 0, 0.0, up_to_date=True)
        if state == "refresh":
            try:
                reuse, reuse_from = _reusable_rows(final, samples, manifest, good, config)
            except CacheError as e:  # damaged: nothing in it can be trusted, rebuild it all
                log.note(
                    f"{e}; rebuilding every row (the old file stays until the new one is done)"
                )

    try:
        journal, plan = _open_journal(final, fp, reuse_from)
        if plan is None:
            copied = {m: {r for r, _ in reuse.get(m, [])} for m in modalities}
            todo = {m: [r for r in good[m] if r not in copied[m]] for m in modalities}
            t_plan = time.perf_counter()
            plan = plan_batches(enc, samples, todo, batch_size)
            if "text" in modalities:  # the text stage's first half: tokenize, sort by length
                log.stage("tokenize", len(samples), time.perf_counter() - t_plan)
            plan.reuse, plan.reuse_from = reuse, reuse_from
            journal.save_plan(plan.to_json())
    except OSError as e:
        raise ExtractError(os_error_line(e, parts_dir(final))) from None

    done = {m: journal.done(m) for m in modalities}
    for message in journal.notes:  # a damaged plan or part, discarded and computed again
        log.note(message)
    reused = sum(
        len(b)
        for m, bs in (("text", plan.text_batches), ("image", plan.image_batches))
        if m in modalities
        for i, b in enumerate(bs)
        if i in done[m]
    )
    total = sum(map(len, plan.text_batches)) + sum(map(len, plan.image_batches))
    return Job(
        ds,
        final,
        enc,
        samples,
        blocked,
        config,
        manifest,
        journal,
        plan,
        done,
        reused,
        total,
        startup,
    )


def _finish(job: Job, computed: int, log: StageLog) -> ExtractReport:
    """Every planned batch is journalled: assemble the cache, drop the journal, report."""
    final, plan, journal = job.final, job.plan, job.journal
    t_write = time.perf_counter()
    sources = _sources(job.ds, job.samples)
    try:
        status, errors = _assemble(
            final,
            job.ds,
            job.samples,
            job.enc,
            plan,
            journal,
            job.blocked,
            job.config,
            job.manifest,
            sources,
        )
    except OSError as e:
        raise ExtractError(os_error_line(e, temp_path(final), KEPT)) from None
    except ExtractError:
        journal.remove()  # nothing usable came out of it: no cache, nothing to resume
        raise
    journal.remove()
    log.stage(f"write {final}", len(job.samples), time.perf_counter() - t_write, unit="rows")

    real = sum(len(v) for v in plan.text_ids.values())
    padded = sum(len(b) * max(len(plan.text_ids[r]) for r in b) for b in plan.text_batches)
    return ExtractReport(
        path=final,
        rows=len(job.samples),
        ok=int((status == OK).sum()),
        failed=int((status == FAILED).sum()),
        computed=computed,
        reused=job.reused,
        seconds=0.0,
        real_tokens=real,
        computed_tokens=padded,
        problems=errors,
        startup_seconds=job.startup,
        refreshed=bool(plan.reuse_from),
        kept=sum(len(pairs) for pairs in plan.reuse.values()),
    )


def _sources(ds: Dataset, samples: Sequence[Sample]) -> dict:
    """What the data files look like now (cache/sources.py), for stage two's stale check."""
    known = {}  # the reader hashed every text and image file already (manifest shas)
    for s in samples:
        known.update({s.text_path: s.text_sha, s.image_path: s.image_sha})
    known.pop(None, None)
    return record_sources(
        Path(ds.root),
        [(s.guid, [p for p in s.source_files() if p.is_file()], s.index_line) for s in samples],
        known,
    )


def _up_to_date(final: Path, ds: Dataset, samples: Sequence[Sample], log: StageLog) -> bool:
    """The cache at `final` has this run's fingerprint: is it usable as it is? A leftover
    journal (killed right after the final rename) is removed; a record of the data files that
    no longer matches them (an edited header, a reformatted line: same samples, other bytes)
    is rewritten, so stage two does not call the cache stale; a cache whose small arrays fail
    their digests is rebuilt (False)."""
    shutil.rmtree(parts_dir(final), ignore_errors=True)
    try:
        store = FeatureStore.open(final, modalities=(), tokens=False)
    except DamagedCacheError as e:
        log.note(f"{e}; rebuilding it (the old file stays until the new one is done)")
        return False
    if store.sources is not None and check_fresh(store):
        rewrite_sources(final, _sources(ds, samples))
    return True


def _open_journal(final: Path, fp: str, reuse_from: str) -> tuple[Journal, Plan | None]:
    """The journal of `fp` and its saved plan (None: plan afresh). A plan that copies rows
    from a cache other than the one at `final` now is useless: dropped with its batches."""
    journal = Journal(parts_dir(final), fp)
    saved = journal.plan
    plan = Plan.from_json(saved) if saved else None
    if plan is not None and plan.reuse_from and plan.reuse_from != reuse_from:
        journal.remove()
        journal, plan = Journal(parts_dir(final), fp), None
    return journal, plan


def _compute(
    enc: Encoder,
    samples: Sequence[Sample],
    plan: Plan,
    journal: Journal,
    done: dict[str, set[int]],
    on_error: str,
    num_workers: int | None,
    log: StageLog,
    bar: dict,
    shard: Shard = SINGLE,
) -> int:
    """Runs every planned batch not in the journal; returns how many rows it computed. Each
    modality's stage ends with one `log` line (rows computed, samples/s).

    Under torchrun (extract/distributed.py) each rank runs only its own batches; rank 0 first
    hands the plan to the others, and every rank's outcome is exchanged at the end, so one
    rank's failure stops them all. Returns the rows of every rank together."""
    if not shard.many:
        return _compute_share(enc, samples, plan, journal, done, on_error, num_workers, log, bar)
    distributed.announce(shard, distributed.Work(journal.fingerprint, enc.config(), plan, done))
    own = [  # (modality, batch, rows) of this rank's batches: its bar counts those alone
        (m, b, len(rows))
        for m, batches in (("text", plan.text_batches), ("image", plan.image_batches))
        for b, rows in enumerate(batches)
        if shard.mine(b)
    ]
    bar = bar | dict(
        total=sum(n for _, _, n in own),
        initial=sum(n for m, b, n in own if b in done.get(m, ())),
    )
    try:
        rows = _compute_share(
            enc, samples, plan, journal, done, on_error, num_workers, log, bar, shard
        )
    except Exception as e:  # the others hear of it, then it surfaces here as it would alone
        distributed.settle(shard, error=e)
        raise
    total = distributed.settle(shard, rows)
    if shard.rank == 0 and (lost := distributed.missing_parts(journal, plan, enc.modalities)):
        raise ExtractError(lost)
    return total


def _compute_share(
    enc: Encoder,
    samples: Sequence[Sample],
    plan: Plan,
    journal: Journal,
    done: dict[str, set[int]],
    on_error: str,
    num_workers: int | None,
    log: StageLog,
    bar: dict,
    shard: Shard = SINGLE,
) -> int:
    """`_compute` on one rank: the batches of `shard` not in the journal; rows computed."""
    computed = 0
    with (
        tqdm(unit="sample", file=sys.stderr, dynamic_ncols=True, **bar) as progress,
        journal.background() as save,  # parts are written while the next batch runs
    ):
        start, before = time.perf_counter(), computed
        for b, rows in enumerate(plan.text_batches):
            if b in done.get("text", ()) or not shard.mine(b):
                continue
            feats = enc.encode_text([plan.text_ids[r] for r in rows])
            ok_rows, feats, failures = _split_nonfinite(enc, "text", np.asarray(rows), feats)
            _stop_if_failed(on_error, samples, failures)
            save("text", b, ok_rows, feats, failures)
            computed += len(rows)
            progress.update(len(rows))
        _log_modality(log, "text", plan.text_batches, done, computed - before, start)
        start, before = time.perf_counter(), computed
        batches = _image_batches(enc, samples, plan, done, num_workers, shard)
        for b, ok_rows, feats, failures in batches:
            n = len(ok_rows) + len(failures)
            ok_rows, feats, overflow = _split_nonfinite(enc, "image", np.asarray(ok_rows), feats)
            failures = failures + overflow
            _stop_if_failed(on_error, samples, failures)
            save("image", b, ok_rows, feats, failures)
            computed += n
            progress.update(n)
        _log_modality(log, "image", plan.image_batches, done, computed - before, start)
    return computed


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
        raise ExtractError(_fail_line(samples[r].guid, why))


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


def _fail_line(guid: str, reason: str) -> str:
    return f"sample {guid}: {reason} (--on-error skip records it and finishes the rest)"


def _all_failed_line(n: int, guid: str, reason: str, root: Path) -> str:
    return (
        f"every one of the {n} samples failed, so no cache was written (first: {guid}: "
        f"{reason}); `fusebench data check --data {root}` lists every data problem"
    )


def _existing_cache(
    final: Path, fp: str, config: dict, manifest: list[dict], overwrite: bool
) -> str:
    """What to do with a cache already at `final`: "same" (complete, same data and settings),
    "replace" (--overwrite) or "refresh" (same settings, the data changed). Anything else
    needs --overwrite."""
    try:
        with h5py.File(final, "r") as f:
            attrs, old_cfg, old_man = read_header(f)
        complete = bool(attrs.get("complete"))
    except (OSError, ValueError, KeyError):
        attrs, old_cfg, old_man, complete = {}, {}, [], False
    if complete and attrs.get("fingerprint") == fp:
        return "replace" if overwrite else "same"
    if overwrite:  # the old file stays until the new one replaces it
        return "replace"
    settings = {k: v for k, v in config.items() if k not in DATA_KEYS}
    old_settings = {k: v for k, v in old_cfg.items() if k not in DATA_KEYS}
    if complete and canonical_json(settings) == canonical_json(old_settings):
        return "refresh"
    diffs = describe_differences(old_settings, old_man, settings, None)
    if not complete:
        diffs = ["it is unreadable or unfinished"]
    raise CacheError(
        f"{final} already exists but was built with other settings ({'; '.join(diffs)}); "
        "pass --overwrite to replace it, or --out elsewhere"
    )


def _reusable_rows(
    final: Path,
    samples: Sequence[Sample],
    manifest: list[dict],
    good: dict[str, list[int]],
    config: dict,
) -> tuple[dict[str, list[list[int]]], str]:
    """Refresh: per modality, [row, row in the existing cache] for every row whose features
    can be copied — the cached row was ok, and its guid and that modality's input (file
    content hash; for text also the decoding) are unchanged. Returns that and the existing
    cache's fingerprint."""
    try:
        with h5py.File(final, "r") as f:
            attrs, old_cfg, old_man = read_header(f)
            status = f["status"][:]
    except (OSError, KeyError) as e:
        raise _damaged(final, e) from None
    if len(old_man) != len(status):
        return {}, str(attrs.get("fingerprint", ""))
    at: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i, m in enumerate(old_man):
        if status[i] == OK:
            if m["guid"] in at:
                ambiguous.add(m["guid"])
            at[m["guid"]] = i
    decoding_changed = old_cfg.get("text_encoding") != config.get("text_encoding")
    reuse: dict[str, list[list[int]]] = {}
    for modality, rows in good.items():
        key = f"{modality}_sha"
        pairs = []
        for r in rows:
            guid = manifest[r]["guid"]
            i = at.get(guid)
            if i is None or guid in ambiguous:
                continue
            if old_man[i].get(key) is None or old_man[i].get(key) != manifest[r].get(key):
                continue
            unicode = str(samples[r].text_encoding).startswith("utf-")
            if modality == "text" and decoding_changed and not unicode:
                continue  # same bytes, read with another legacy encoding: other text
            pairs.append([r, i])
        reuse[modality] = pairs
    return reuse, str(attrs.get("fingerprint", ""))


def _image_batches(
    enc: Encoder,
    samples: Sequence[Sample],
    plan: Plan,
    done: dict[str, set[int]],
    num_workers: int | None,
    shard: Shard = SINGLE,
) -> Iterator[tuple[int, list[int], object, list]]:
    """(batch, ok rows, features, failures) of each image batch of `shard` not journalled,
    loaded and preprocessed by DataLoader workers while the model runs."""
    if "image" not in enc.modalities:
        return
    todo = [
        (b, rows)
        for b, rows in enumerate(plan.image_batches)
        if b not in done["image"] and shard.mine(b)
    ]
    if not todo:
        return
    if num_workers is None:
        num_workers = min(4, max(1, (os.cpu_count() or 2) // 2))
    loader = DataLoader(
        _ImageBatches(todo, samples, enc),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=2 if num_workers else None,
        pin_memory=enc.device.type == "cuda",
    )
    for b, ok_rows, pixels, failures in loader:
        feats = enc.encode_image(torch.as_tensor(pixels)) if ok_rows else None
        yield b, ok_rows, feats, failures


def _assemble(
    final: Path,
    ds: Dataset,
    samples: Sequence[Sample],
    enc: Encoder,
    plan: Plan,
    journal: Journal,
    blocked: dict,
    config: dict,
    manifest: list[dict],
    sources: dict,
) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """Journal (+ rows copied from the existing cache on a refresh) -> <final>.tmp -> <final>.
    Returns status and the error log. ExtractError when no row came out usable."""
    import fusebench.cache as cache
    import transformers

    n = len(samples)
    writer = CacheWriter(
        final,
        guid=[s.guid for s in samples],
        split=[s.split for s in samples],
        label=[s.label for s in samples],
        classes=ds.classes,
        manifest=manifest,
        config=config,
        attrs={
            "encoder": enc.spec.name,
            "model": enc.spec.model,
            "model_revision": enc.revision,
            "weights": config["weights"],
            "dataset": ds.name,
            "data_path": str(Path(ds.root).resolve()),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "fusebench": _version(),
                "h5py": h5py.__version__,
                "cache_format": cache.FORMAT_VERSION,
            },
        },
        sources=sources,
    )
    old = h5py.File(final, "r") if plan.reuse_from else None
    try:
        done_rows = {m: np.zeros(n, dtype=bool) for m in enc.modalities}
        errors: list[tuple[str, str, str]] = []
        failed = np.zeros(n, dtype=bool)
        for i, s in enumerate(samples):  # data problems: fatal ones fail the row, notes are kept
            relevant = [p for p in s.problems if p.modality is None or p.modality in enc.modalities]
            for p in relevant:
                stage = (p.modality or "sample") + ("" if p.fatal else "-note")
                errors.append((s.guid, stage, p.reason))
            failed[i] = i in blocked
        for modality in enc.modalities:
            length = plan.text_len
            if modality == "text" and old is not None and plan.reuse.get("text"):
                old_rows = sorted(i for _, i in plan.reuse["text"])
                mask = read_rows(old["text/mask"], old_rows)
                length = max(length, int(mask.sum(axis=1).max()))
            created = False
            for rows, feats in _feature_blocks(
                modality, plan, journal, old, failed, errors, samples
            ):
                if not created:
                    writer.create_modality(
                        modality,
                        tokens=(
                            length if modality == "text" else feats.tokens.shape[1],
                            feats.tokens.shape[2],
                        ),
                        mask=feats.mask is not None,
                        pooled={
                            k: (v.shape[1], feats.pooling.get(k, ""))
                            for k, v in feats.pooled.items()
                        },
                    )
                    created = True
                writer.write(modality, rows, feats)
                done_rows[modality][rows] = True
        if old is not None:
            old.close()  # before finish() renames the new file over it
        ok = np.logical_and.reduce([done_rows[m] for m in enc.modalities]) & ~failed
        if n and not ok.any():
            guid, _, why = next((e for e in errors if not e[1].endswith("-note")), ("?", "", "?"))
            raise ExtractError(_all_failed_line(n, guid, why, ds.root))
        status = np.where(ok, OK, FAILED).astype(np.uint8)
        writer.set_status(status)
        writer.add_errors(errors)
        writer.finish()
        return status, errors
    except BaseException:
        if old is not None:
            old.close()
        writer.abort()
        raise


def _feature_blocks(
    modality: str,
    plan: Plan,
    journal: Journal,
    old: h5py.File | None,
    failed: np.ndarray,
    errors: list[tuple[str, str, str]],
    samples: Sequence[Sample],
    block: int = 256,
) -> Iterator[tuple[np.ndarray, TokenFeatures]]:
    """(rows, features) of one modality: each journalled batch (its failures are recorded in
    `failed` / `errors` on the way), then the rows a refresh copies from the old cache."""
    batches = plan.text_batches if modality == "text" else plan.image_batches
    for b in range(len(batches)):
        rows, feats, failures = journal.load(modality, b)
        for r, stage, why in failures:
            failed[r] = True
            errors.append((samples[r].guid, stage, why))
        if feats is not None and len(rows):
            yield rows, feats
    pairs = sorted(plan.reuse.get(modality, []), key=lambda p: p[1]) if old is not None else []
    for start in range(0, len(pairs), block):
        new_rows = np.asarray([r for r, _ in pairs[start : start + block]])
        old_rows = [i for _, i in pairs[start : start + block]]  # increasing, as h5py wants
        try:
            feats = _old_rows(old[modality], old_rows)
        except (OSError, KeyError) as e:
            raise _damaged(Path(old.filename), e) from None
        yield new_rows, feats


def _old_rows(g: h5py.Group, rows: list[int]) -> TokenFeatures:
    """Rows of one modality group of an existing cache, tokens trimmed to their longest."""
    mask = read_rows(g["mask"], rows) if "mask" in g else None
    tokens = read_rows(g["tokens"], rows) if "tokens" in g else None
    if mask is not None and tokens is not None:
        width = int(mask.sum(axis=1).max())
        mask, tokens = mask[:, :width], tokens[:, :width]
    names = [k for k in g if k.startswith("pooled")]
    return TokenFeatures(
        tokens=tokens,
        mask=mask,
        pooled={k: read_rows(g[k], rows) for k in names},
        pooling={k: str(decode_attr(g[k].attrs.get("pooling", ""))) for k in names},
    )


def _damaged(path: Path, e: BaseException) -> CacheError:
    return CacheError(
        f"{path} cannot be read to reuse its unchanged rows ({' '.join(str(e).split())}); "
        "pass --overwrite to rebuild it from scratch"
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusebench")
    except PackageNotFoundError:
        return "0+unknown"
