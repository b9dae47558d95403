"""Planning one cache: the checks before the model loads, the existing cache, the journal and
the batch plan.

    dataset -> plan (text rows sorted by token length; image rows in order) -> journal of
    finished batches (<cache>.parts/)

The plan is fixed once per cache and saved in the journal before any batch runs, so a rerun
after a kill computes only the batches the journal lacks (extract/compute.py), and the cache
is assembled from the journal (extract/assemble.py). A refresh (extract/settings.py) plans
only the rows it cannot copy from the existing cache.

Everything the user can get wrong (options, the --out location, the model folder) is checked
before the model loads; file-system faults become one ExtractError line.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import torch
from fusebench.cache import (
    OK,
    CacheError,
    DamagedCacheError,
    FeatureStore,
    check_fresh,
    fingerprint,
    parts_dir,
    record_sources,
    rewrite_sources,
)
from fusebench.cache.format import write_error
from fusebench.cache.journal import Journal
from fusebench.cache.naming import cache_file
from fusebench.cache.reader import read_header
from fusebench.extract.datasets import Dataset, Sample, load_dataset, modality_problem
from fusebench.extract.encoders import Encoder, EncoderSpec, build_encoder, modalities_of
from fusebench.extract.options import ExtractError, ExtractOptions, ExtractReport, StageLog
from fusebench.extract.settings import cache_config, existing_cache

KEPT = " (every finished batch is kept)"


def cache_path(out: str | Path, dataset: str, encoder: str, layer: int | None = None) -> Path:
    """<out>/<dataset>/<encoder>.h5 (hf:org/name -> hf-org--name.h5; --layer 3 ->
    <encoder>-l3.h5): cache.naming's rule, the one `fuse --text/--image` reads by."""
    return cache_file(Path(out) / dataset, encoder, layer)


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
    except OSError as e:
        raise ExtractError(os_error_line(e, folder)) from None
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:  # named by the folder, not by the probe's random file name
        raise ExtractError(str(write_error(folder, e))) from None


def os_error_line(e: OSError, where: Path, kept: str = "") -> str:
    """One line for a file-system fault: the path, what the system said, and the fix (the
    cache's own wording, cache.format.write_error)."""
    return str(write_error(Path(e.filename or where), e, kept))


def read_dataset(opts: ExtractOptions, specs: Sequence[EncoderSpec], log: StageLog) -> Dataset:
    """The dataset, refused (ValueError) when it lacks a modality one of `specs` reads.
    --on-error fail decodes every image first, so the run stops at the FIRST bad sample
    before any work."""
    t_read = time.perf_counter()
    ds = load_dataset(
        opts.data,
        opts.data_format,
        check_images=opts.on_error == "fail",
        text_encoding=opts.text_encoding,
        labels=opts.labels,
        columns=opts.columns,
    )
    for spec in specs:  # text-only or image-only data
        if missing := modality_problem(ds, modalities_of(spec), spec.name):
            raise ValueError(missing)
    log.stage(f"read dataset {ds.name}", len(ds.samples), time.perf_counter() - t_read)
    return ds


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


@dataclass
class Usable:
    """The rows of one cache, known before the model loads."""

    samples: Sequence[Sample]
    blocked: dict[int, list]  # row -> its fatal data problems (never planned)
    good: dict[str, list[int]]  # modality -> rows to compute (or copy)


@dataclass
class Job:
    """One cache's extraction once `prepare` has planned it: the phases after it (compute,
    `finish`) need only this, so one pass over the data drives every cache of the run and
    each still ends exactly as a run of its own would."""

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
    reused: int = 0  # rows of those batches
    startup: float = 0.0
    request: dict | None = None  # the data options as given (`ExtractOptions.request`)
    replaced: bool = False  # --overwrite over a cache built with other data options


def usable_rows(ds: Dataset, spec: EncoderSpec, opts: ExtractOptions) -> Usable:
    """The rows of `spec`'s modalities; ExtractError when a data problem stops the run
    (--on-error fail, or every sample failed): checked before the model loads."""
    samples = ds.samples[: opts.limit] if opts.limit else ds.samples
    modalities = modalities_of(spec)
    blocked = {i: s.failed(modalities) for i, s in enumerate(samples)}
    blocked = {i: p for i, p in blocked.items() if p}
    if blocked and (opts.on_error == "fail" or len(blocked) == len(samples)):
        i = min(blocked)
        why = blocked[i][0].reason
        if opts.on_error == "fail":
            raise ExtractError(fail_line(samples[i].guid, why))
        raise ExtractError(all_failed_line(len(samples), samples[i].guid, why, ds.root))
    good = {m: [i for i in range(len(samples)) if i not in blocked] for m in modalities}
    return Usable(samples, blocked, good)


def load_encoder(
    spec: EncoderSpec, dev: torch.device, exact_preprocess: bool, log: StageLog, decode: str = "cpu"
) -> Encoder:
    """The model, with its image path chosen (the fast path unless asked not to; the device
    path with decode "gpu")."""
    t_load = time.perf_counter()
    enc = build_encoder(spec, dev)
    if note := enc.select_preprocess(exact=exact_preprocess, decode=decode):
        log.note(note)
    log.stage(f"load model {spec.model} on {dev}", seconds=time.perf_counter() - t_load)
    return enc


def prepare(
    ds: Dataset,
    final: Path,
    enc: Encoder,
    rows: Usable,
    opts: ExtractOptions,
    log: StageLog,
    *,
    startup: float,
    request: dict,
) -> Job | ExtractReport:
    """Fingerprint, the existing cache (up to date: its report; refresh: the rows to copy),
    the journal and the plan (saved before any batch runs)."""
    config = cache_config(enc, ds, batch_size=opts.batch_size, limit=opts.limit)
    manifest = ds.manifest()[: len(rows.samples)]
    fp = fingerprint(config, manifest)
    state, reuse, reuse_from = "", {}, ""
    if final.exists():
        state = existing_cache(final, fp, config, manifest, opts.overwrite, ds=ds, request=request)
        if state == "same" and _up_to_date(final, ds, rows.samples, log, enc.modalities):
            return ExtractReport(final, len(rows.samples), 0, 0, 0, 0, 0.0, up_to_date=True)
        if state in ("refresh", "reuse"):
            try:
                reuse, reuse_from = _reusable_rows(final, rows.samples, manifest, rows.good, config)
            except CacheError as e:  # damaged: nothing in it can be trusted, rebuild it all
                log.note(
                    f"{e}; rebuilding every row (the old file stays until the new one is done)"
                )
    try:
        journal, plan = _open_journal(final, fp, reuse_from)
        if plan is None:
            plan = _new_plan(enc, rows, reuse, reuse_from, opts.batch_size, log)
            journal.save_plan(plan.to_json())
    except OSError as e:
        raise ExtractError(os_error_line(e, parts_dir(final))) from None
    done = {m: journal.done(m) for m in enc.modalities}
    for message in journal.notes:  # a damaged plan or part, discarded and computed again
        log.note(message)
    reused = sum(
        len(b)
        for m, bs in (("text", plan.text_batches), ("image", plan.image_batches))
        if m in enc.modalities
        for i, b in enumerate(bs)
        if i in done[m]
    )
    return Job(ds, final, enc, rows.samples, rows.blocked, config, manifest, journal, plan,
               done, reused, startup, request, state == "reuse")  # fmt: skip


def _new_plan(
    enc: Encoder,
    rows: Usable,
    reuse: dict[str, list[list[int]]],
    reuse_from: str,
    batch_size: int,
    log: StageLog,
) -> Plan:
    """The plan of the rows a refresh does not copy (every good row otherwise)."""
    copied = {m: {r for r, _ in reuse.get(m, [])} for m in enc.modalities}
    todo = {m: [r for r in rows.good[m] if r not in copied[m]] for m in enc.modalities}
    t_plan = time.perf_counter()
    plan = plan_batches(enc, rows.samples, todo, batch_size)
    if "text" in enc.modalities:  # the text stage's first half: tokenize, sort by length
        log.stage("tokenize", len(rows.samples), time.perf_counter() - t_plan)
    plan.reuse, plan.reuse_from = reuse, reuse_from
    return plan


def sources(
    ds: Dataset, samples: Sequence[Sample], modalities: Sequence[str] = ("text", "image")
) -> dict:
    """What the data files look like now (cache/sources.py), for stage two's stale check:
    the files of the modalities the cache holds (an image cache is not stale because a text
    file changed), the index files, and the Parquet / Arrow files rows are read from."""
    known = {}  # the reader hashed every text and image file already (manifest shas)
    for s in samples:
        known.update({s.text_path: s.text_sha, s.image_path: s.image_sha})
    known.pop(None, None)

    def files(s: Sample) -> list[Path]:
        other = {s.text_path if "text" not in modalities else None}
        other.add(s.image_path if "image" not in modalities else None)
        return [p for p in s.source_files() if p not in other and p.is_file()]

    return record_sources(Path(ds.root), [(s.guid, files(s), s.index_line) for s in samples], known)


def _up_to_date(
    final: Path,
    ds: Dataset,
    samples: Sequence[Sample],
    log: StageLog,
    modalities: Sequence[str] = ("text", "image"),
) -> bool:
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
        rewrite_sources(final, sources(ds, samples, modalities))
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
        raise damaged(final, e) from None
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


def fail_line(guid: str, reason: str) -> str:
    return f"sample {guid}: {reason} (--on-error skip records it and finishes the rest)"


def all_failed_line(n: int, guid: str, reason: str, root: Path) -> str:
    return (
        f"every one of the {n} samples failed, so no cache was written (first: {guid}: "
        f"{reason}); `fusebench data check --data {root}` lists every data problem"
    )


def damaged(path: Path, e: BaseException) -> CacheError:
    return CacheError(
        f"{path} cannot be read to reuse its unchanged rows ({' '.join(str(e).split())}); "
        "pass --overwrite to rebuild it from scratch"
    )
