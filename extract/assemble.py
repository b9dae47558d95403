"""Assembly: every planned batch is journalled -> <cache>.tmp -> rename to <cache>.

The journal's parts (and on a refresh the rows copied from the existing cache) are written
through cache/writer.py's CacheWriter, which writes <cache>.tmp and renames it over <cache>
only when complete: a failure here leaves the old cache (if any) and the journal in place,
so the rerun only assembles again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
from fusebench.cache import FAILED, OK, CacheWriter, TokenFeatures, read_rows, temp_path
from fusebench.cache.reader import decode_attr
from fusebench.extract.options import ExtractError, ExtractReport, StageLog
from fusebench.extract.plan import (
    KEPT,
    Job,
    all_failed_line,
    damaged,
    os_error_line,
    sources,
)


def finish(job: Job, computed: int, log: StageLog) -> ExtractReport:
    """Every planned batch is journalled: assemble the cache, drop the journal, report."""
    final, plan, journal = job.final, job.plan, job.journal
    t_write = time.perf_counter()
    try:
        status, errors = _assemble(job, sources(job.ds, job.samples, job.enc.modalities))
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
        refreshed=bool(plan.reuse_from) and not job.replaced,
        replaced=job.replaced,
        kept=sum(len(pairs) for pairs in plan.reuse.values()),
    )


def _writer(job: Job, sources: dict) -> CacheWriter:
    """The cache's writer: its rows, config and the attributes that say how it was made."""
    import fusebench.cache as cache
    import transformers

    ds, samples, enc = job.ds, job.samples, job.enc
    return CacheWriter(
        job.final,
        guid=[s.guid for s in samples],
        split=[s.split for s in samples],
        label=[s.label for s in samples],
        classes=ds.classes,
        manifest=job.manifest,
        config=job.config,
        attrs={
            "encoder": enc.spec.name,
            "model": enc.spec.model,
            "model_revision": enc.revision,
            "model_files": enc.model_files,  # file -> sha256: predict --data names a change
            "weights": job.config["weights"],
            "dataset": ds.name,
            "data_path": str(ds.path or Path(ds.root).resolve()),  # the manifest file read
            "request": job.request or {},
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


def _assemble(job: Job, sources: dict) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """Journal (+ rows copied from the existing cache on a refresh) -> <final>.tmp -> <final>.
    Returns status and the error log. ExtractError when no row came out usable."""
    n, modalities = len(job.samples), job.enc.modalities
    writer = _writer(job, sources)
    old = h5py.File(job.final, "r") if job.plan.reuse_from else None
    try:
        errors, failed = _data_problems(job)
        done_rows = {m: _write_modality(writer, m, job, old, failed, errors) for m in modalities}
        if old is not None:
            old.close()  # before finish() renames the new file over it
        ok = np.logical_and.reduce([done_rows[m] for m in modalities]) & ~failed
        if n and not ok.any():
            guid, _, why = next((e for e in errors if not e[1].endswith("-note")), ("?", "", "?"))
            raise ExtractError(all_failed_line(n, guid, why, job.ds.root))
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


def _data_problems(job: Job) -> tuple[list[tuple[str, str, str]], np.ndarray]:
    """(error log, failed rows) from the data: fatal problems fail the row, notes are kept."""
    errors: list[tuple[str, str, str]] = []
    failed = np.zeros(len(job.samples), dtype=bool)
    for i, s in enumerate(job.samples):
        relevant = [p for p in s.problems if p.modality is None or p.modality in job.enc.modalities]
        for p in relevant:
            stage = (p.modality or "sample") + ("" if p.fatal else "-note")
            errors.append((s.guid, stage, p.reason))
        failed[i] = i in job.blocked
    return errors, failed


def _write_modality(
    writer: CacheWriter,
    modality: str,
    job: Job,
    old: h5py.File | None,
    failed: np.ndarray,
    errors: list[tuple[str, str, str]],
) -> np.ndarray:
    """One modality's features into the writer; returns which rows got features."""
    plan = job.plan
    done = np.zeros(len(job.samples), dtype=bool)
    length = plan.text_len
    if modality == "text" and old is not None and plan.reuse.get("text"):
        old_rows = sorted(i for _, i in plan.reuse["text"])
        mask = read_rows(old["text/mask"], old_rows)
        length = max(length, int(mask.sum(axis=1).max()))
    created = False
    for rows, feats in _feature_blocks(modality, job, old, failed, errors):
        if not created:
            writer.create_modality(
                modality,
                tokens=(
                    length if modality == "text" else feats.tokens.shape[1],
                    feats.tokens.shape[2],
                ),
                mask=feats.mask is not None,
                pooled={k: (v.shape[1], feats.pooling.get(k, "")) for k, v in feats.pooled.items()},
            )
            created = True
        writer.write(modality, rows, feats)
        done[rows] = True
    return done


def _feature_blocks(
    modality: str, job: Job, old: h5py.File | None, failed: np.ndarray, errors: list, block=256
) -> Iterator[tuple[np.ndarray, TokenFeatures]]:
    """(rows, features) of one modality: each journalled batch of the job's plan (its failures
    are recorded in `failed` / `errors` on the way), then the rows a refresh copies from the
    old cache."""
    plan = job.plan
    batches = plan.text_batches if modality == "text" else plan.image_batches
    for b in range(len(batches)):
        rows, feats, failures = job.journal.load(modality, b)
        for r, stage, why in failures:
            failed[r] = True
            errors.append((job.samples[r].guid, stage, why))
        if feats is not None and len(rows):
            yield rows, feats
    pairs = sorted(plan.reuse.get(modality, []), key=lambda p: p[1]) if old is not None else []
    for start in range(0, len(pairs), block):
        new_rows = np.asarray([r for r, _ in pairs[start : start + block]])
        old_rows = [i for _, i in pairs[start : start + block]]  # increasing, as h5py wants
        try:
            feats = _old_rows(old[modality], old_rows)
        except (OSError, KeyError) as e:
            raise damaged(Path(old.filename), e) from None
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusebench")
    except PackageNotFoundError:
        return "0+unknown"
