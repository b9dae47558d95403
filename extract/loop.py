"""The batched extraction loop: plan once, compute batch by batch into a journal, assemble.

    dataset -> plan (text rows sorted by token length; image rows in order) -> journal of
    finished batches (<cache>.parts/) -> <cache>.tmp -> rename to <cache> when complete.

A SIGKILL at any point loses at most the batch in flight; rerunning the same command reuses
every journalled batch and recomputes nothing else.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from cache import (
    FAILED,
    OK,
    CacheError,
    CacheWriter,
    exclusive_lock,
    fingerprint,
    parts_dir,
)
from cache.format import describe_differences
from cache.journal import Journal
from cache.reader import read_header
from extract.datasets import Dataset, Sample, load_dataset, load_image
from extract.encoders import Encoder, create_encoder


class ExtractError(RuntimeError):
    """`--on-error fail` met a bad sample; the message names it."""


@dataclass
class ExtractReport:
    path: Path
    rows: int
    ok: int
    failed: int
    computed: int  # rows run through the encoder by this call
    reused: int  # rows found already done in the journal of an earlier, stopped run
    seconds: float
    up_to_date: bool = False
    real_tokens: int = 0  # text: tokens that carry text
    computed_tokens: int = 0  # text: tokens the model ran on (incl. batch padding)
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (guid, stage, message)
    startup_seconds: float = 0.0  # reading the dataset index and loading the model


@dataclass
class Plan:
    """Fixed once per cache: which rows form which batch. Saved in the journal."""

    text_batches: list[list[int]]
    image_batches: list[list[int]]
    text_ids: dict[int, list[int]]  # row -> token ids (truncated, unpadded)

    def to_json(self) -> dict:
        return {
            "text_batches": self.text_batches,
            "image_batches": self.image_batches,
            "text_ids": {str(k): v for k, v in self.text_ids.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        return cls(d["text_batches"], d["image_batches"],
                   {int(k): v for k, v in d["text_ids"].items()})

    @property
    def text_len(self) -> int:
        return max((len(v) for v in self.text_ids.values()), default=0)


def cache_path(out: str | Path, dataset: str, encoder: str) -> Path:
    """<out>/<dataset>/<encoder>.h5 (hf:org/name -> hf-org--name.h5)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", encoder.replace("/", "--"))
    return Path(out) / dataset / f"{name}.h5"


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

    def __init__(self, batches: list[tuple[int, list[int]]], samples: Sequence[Sample],
                 encoder: Encoder) -> None:
        self.batches = batches
        self.paths = [s.image_path for s in samples]
        self.preprocess = encoder.preprocess

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        b, rows = self.batches[i]
        images, ok, failures = [], [], []
        for r in rows:
            try:
                images.append(load_image(self.paths[r]))
                ok.append(r)
            except (ValueError, OSError) as e:
                failures.append((r, "image-load", str(e).splitlines()[0]))
        pixels = self.preprocess(images) if images else None  # (B, 3, H, W)
        return b, ok, pixels, failures


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


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
) -> ExtractReport:
    """Runs `encoder` over every sample of `data` and writes <out>/<dataset>/<encoder>.h5."""
    if on_error not in ("skip", "fail"):
        raise ValueError(f"--on-error must be skip or fail, not '{on_error}'")
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    t0 = time.perf_counter()
    # fail mode decodes every image first, so it stops at the FIRST bad sample before any work
    ds = load_dataset(data, data_format, check_images=on_error == "fail")
    final = cache_path(out, ds.name, encoder)
    with exclusive_lock(final):  # before the model loads: a second writer hears at once
        rep = _extract_locked(
            ds, final, encoder, model=model, layer=layer, random_init=random_init,
            batch_size=batch_size, device=device, precision=precision, limit=limit,
            on_error=on_error,
            num_workers=num_workers, overwrite=overwrite, quiet=quiet, t0=t0,
        )
    rep.seconds = time.perf_counter() - t0
    return rep


def _extract_locked(
    ds: Dataset, final: Path, encoder: str, *, model: str | None, layer: int | None,
    random_init: bool, batch_size: int, device: str, precision: str, limit: int | None,
    on_error: str,
    num_workers: int | None, overwrite: bool, quiet: bool, t0: float,
) -> ExtractReport:
    samples = ds.samples[:limit] if limit else ds.samples
    enc = create_encoder(encoder, model=model, layer=layer, random_init=random_init,
                         device=device, precision=precision)
    startup = time.perf_counter() - t0

    blocked = {i: s.failed(enc.modalities) for i, s in enumerate(samples)}
    blocked = {i: p for i, p in blocked.items() if p}
    if on_error == "fail" and blocked:
        i = min(blocked)
        raise ExtractError(_fail_line(samples[i].guid, blocked[i][0].reason))
    good = {m: [i for i in range(len(samples)) if i not in blocked] for m in enc.modalities}

    config = enc.config() | {"batch_size": batch_size, "format": ds.format, "limit": limit}
    manifest = ds.manifest()[: len(samples)]
    fp = fingerprint(config, manifest)

    if final.exists():
        _check_existing(final, fp, config, manifest, overwrite)
        if not overwrite:
            return ExtractReport(final, len(samples), 0, 0, 0, 0, 0.0, up_to_date=True)
    journal = Journal(parts_dir(final), fp)
    saved = journal.plan
    plan = Plan.from_json(saved) if saved else plan_batches(enc, samples, good, batch_size)
    if saved is None:
        journal.save_plan(plan.to_json())

    done = {m: journal.done(m) for m in enc.modalities}
    reused = sum(len(b) for m, bs in (("text", plan.text_batches), ("image", plan.image_batches))
                 if m in enc.modalities for i, b in enumerate(bs) if i in done[m])
    total = sum(map(len, plan.text_batches)) + sum(map(len, plan.image_batches))
    computed = 0
    with tqdm(total=total, initial=reused, unit="sample", disable=quiet, file=sys.stderr,
              desc=f"{encoder} {ds.name}", dynamic_ncols=True) as bar:
        for b, rows in enumerate(plan.text_batches):
            if b in done.get("text", ()):
                continue
            feats = enc.encode_text([plan.text_ids[r] for r in rows])
            journal.save("text", b, np.asarray(rows), feats, [])
            computed += len(rows)
            bar.update(len(rows))
        for b, ok_rows, feats, failures in _image_batches(enc, samples, plan, done, num_workers):
            if failures and on_error == "fail":
                r, _, why = failures[0]
                raise ExtractError(_fail_line(samples[r].guid, why))
            journal.save("image", b, np.asarray(ok_rows), feats, failures)
            computed += len(ok_rows) + len(failures)
            bar.update(len(ok_rows) + len(failures))

    status, errors = _assemble(final, ds, samples, enc, plan, journal, blocked, config, manifest)
    journal.remove()

    real = sum(len(v) for v in plan.text_ids.values())
    padded = sum(len(b) * max(len(plan.text_ids[r]) for r in b) for b in plan.text_batches)
    return ExtractReport(
        path=final, rows=len(samples), ok=int((status == OK).sum()),
        failed=int((status == FAILED).sum()), computed=computed, reused=reused,
        seconds=0.0, real_tokens=real, computed_tokens=padded, problems=errors,
        startup_seconds=startup,
    )


def _fail_line(guid: str, reason: str) -> str:
    return f"sample {guid}: {reason} (--on-error skip records it and finishes the rest)"


def _check_existing(final: Path, fp: str, config: dict, manifest: list[dict], overwrite: bool) -> None:
    """An existing cache is fine when it is complete and built from this data and config."""
    try:
        with h5py.File(final, "r") as f:
            attrs, old_cfg, old_man = read_header(f)
        same = bool(attrs.get("complete")) and attrs.get("fingerprint") == fp
    except (OSError, ValueError):
        same, old_cfg, old_man = False, {}, []
    if same or overwrite:  # --overwrite: the old file stays until the new one replaces it
        return
    diffs = describe_differences(old_cfg, old_man, config, manifest) or ["it is unreadable"]
    raise CacheError(
        f"{final} already exists but was built from other data or settings ({'; '.join(diffs)}); "
        "pass --overwrite to replace it, or --out elsewhere"
    )


def _image_batches(
    enc: Encoder, samples: Sequence[Sample], plan: Plan, done: dict[str, set[int]],
    num_workers: int | None,
) -> Iterator[tuple[int, list[int], object, list]]:
    if "image" not in enc.modalities:
        return
    todo = [(b, rows) for b, rows in enumerate(plan.image_batches) if b not in done["image"]]
    if not todo:
        return
    if num_workers is None:
        num_workers = min(4, max(1, (os.cpu_count() or 2) // 2))
    loader = DataLoader(
        _ImageBatches(todo, samples, enc), batch_size=None, shuffle=False,
        num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=2 if num_workers else None, pin_memory=enc.device.type == "cuda",
    )
    for b, ok_rows, pixels, failures in loader:
        feats = enc.encode_image(torch.as_tensor(pixels)) if ok_rows else None
        yield b, ok_rows, feats, failures


def _assemble(
    final: Path, ds: Dataset, samples: Sequence[Sample], enc: Encoder, plan: Plan,
    journal: Journal, blocked: dict, config: dict, manifest: list[dict],
) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """Journal -> <final>.tmp -> <final>. Returns status and the error log."""
    import transformers

    import cache

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
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "fusebench": _version(), "h5py": h5py.__version__,
                         "cache_format": cache.FORMAT_VERSION},
        },
    )
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
        for modality, batches in (("text", plan.text_batches), ("image", plan.image_batches)):
            if modality not in enc.modalities:
                continue
            created = False
            for b in range(len(batches)):
                rows, feats, failures = journal.load(modality, b)
                for r, stage, why in failures:
                    failed[r] = True
                    errors.append((samples[r].guid, stage, why))
                if feats is None or not len(rows):
                    continue
                if not created:
                    length = plan.text_len if modality == "text" else feats.tokens.shape[1]
                    writer.create_modality(
                        modality,
                        tokens=(length, feats.tokens.shape[2]),
                        mask=feats.mask is not None,
                        pooled={k: (v.shape[1], feats.pooling.get(k, "")) for k, v in feats.pooled.items()},
                    )
                    created = True
                writer.write(modality, rows, feats)
                done_rows[modality][rows] = True
        ok = np.logical_and.reduce([done_rows[m] for m in enc.modalities]) & ~failed
        status = np.where(ok, OK, FAILED).astype(np.uint8)
        writer.set_status(status)
        writer.add_errors(errors)
        writer.finish()
        return status, errors
    except BaseException:
        writer.abort()
        raise


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusebench")
    except PackageNotFoundError:
        return "0+unknown"
