"""Several encoders in one pass: `extract --encoder vit,clip,bert`.

    every encoder: pre-model checks -> (all models load) -> its own plan and journal
    text:   each encoder's planned text batches, as a run of its own (_compute)
    images: ONE loader over the rows any encoder still needs, in dataset order; its worker
            reads and decodes each image once and preprocesses it for every encoder that
            needs that row; the main process buffers each encoder's pixels and runs one of
            its planned batches as soon as every row of it has arrived
    every encoder: assemble its cache, as a run of its own (_finish)

Why the caches come out byte-identical to separate runs: each encoder keeps its own plan
(text sorted by its own token lengths; image batches = its good rows in dataset order, in
chunks of --batch-size), so every batch it runs holds the same rows, the same pixels and the
same padding, and it is journalled and assembled by the same code. The image is decoded once
per distinct decode: two fast paths that ask JPEG draft mode for the same scale (ViT and
CLIP at 224 px both do), or any encoders on an image decoded in full, share one decode; an
encoder whose draft scale differs gets its own, since other DCT scaling means other pixels.

Locks, resume and refresh are per cache: a kill loses at most the batches in flight, and a
rerun of the same command recomputes only what each journal lacks; an encoder whose cache is
up to date is skipped while the others run.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from fusebench.cache import exclusive_lock, parts_dir, ranks
from fusebench.extract.datasets import (
    Sample,
    _decode_failure,
    to_rgb,
)
from fusebench.extract.encoders import Encoder, load_spec, resolve_device
from fusebench.extract.fastimage import sample_bytes
from fusebench.extract.loop import (
    KEPT,
    ExtractError,
    ExtractInterrupted,
    ExtractReport,
    Job,
    StageLog,
    _compute,
    _finish,
    _load_encoder,
    _log_modality,
    _prepare,
    _split_nonfinite,
    _stop_if_failed,
    _usable_rows,
    _worker_init,
    cache_path,
    check_options,
    check_output,
    os_error_line,
    read_dataset,
)
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm


def split_encoders(
    names: str | Sequence[str], model: str | None = None
) -> tuple[dict[str, str | None], list[str]]:
    """`vit,clip,bert` (and --model, one entry per encoder or none) -> ({name: model or None}
    in the order given, each name once; one note per name given twice)."""
    given = names.split(",") if isinstance(names, str) else list(names)
    given = [n.strip() for n in given if n.strip()]
    if not given:
        raise ValueError("--encoder is empty; name one or more, e.g. --encoder vit,clip")
    chosen: dict[str, str | None] = {}
    for n, m in zip(given, _split_models(model, given)):
        if n in chosen and chosen[n] != m:
            raise ValueError(
                f"--encoder lists {n} twice with different --model entries; list it once"
            )
        chosen.setdefault(n, m)
    notes = [
        f"--encoder lists {n} {given.count(n)} times; extracting it once"
        for n in chosen
        if given.count(n) > 1
    ]
    return chosen, notes


def _split_models(model: str | None, names: list[str]) -> list[str | None]:
    """--model for several encoders: one entry per encoder, in --encoder's order (an empty
    entry keeps that encoder's default), e.g. --encoder vit,clip --model /snap/vit,/snap/clip."""
    if model is None:
        return [None] * len(names)
    models = [m.strip() or None for m in model.split(",")]
    if len(models) != len(names):
        raise ValueError(
            f"--model lists {len(models)} model(s) for {len(names)} encoders "
            f"({','.join(names)}); give one per encoder in the same order, comma-separated "
            "(an empty entry keeps that encoder's default)"
        )
    return models


def extract_many(
    data: str | Path,
    encoders: str | Sequence[str],
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
) -> list[ExtractReport]:
    """Runs every encoder of `encoders` over `data` in one pass; one cache each, the same
    bytes as `extract` would write for it alone. Reports in the order given.

    Everything a user can get wrong (options, every encoder's name and YAML, the device, the
    dataset, every --out location, every lock, the data problems that stop a run) is checked
    for EVERY encoder before the first model loads."""
    chosen, dupes = split_encoders(encoders, model)
    names = list(chosen)
    if ranks.is_distributed():
        raise ValueError(
            f"--encoder {','.join(names)} under torchrun: the one-pass extraction of several "
            "encoders is not sharded across ranks; run one torchrun per encoder"
        )
    check_options(on_error, batch_size, limit)
    t0 = time.perf_counter()
    specs = [
        load_spec(n, model=m, layer=layer, random_init=random_init, precision=precision)
        for n, m in chosen.items()
    ]
    dev = resolve_device(device)
    log = StageLog(f"extract {','.join(names)}", quiet)
    logs = {n: StageLog(f"extract {n}", quiet) for n in names}
    for note in dupes:
        log.note(note)
    ds = read_dataset(
        data,
        data_format,
        specs,
        log,
        on_error=on_error,
        text_encoding=text_encoding,
        labels=labels,
        columns=columns,
    )
    finals = {n: cache_path(out, ds.name, n) for n in names}
    for final in finals.values():
        check_output(final)
    jobs: dict[str, Job] = {}
    try:
        with contextlib.ExitStack() as locks:
            for n in sorted(names, key=lambda n: str(finals[n])):  # one order: no deadlock
                locks.enter_context(exclusive_lock(finals[n]))
            # data problems that stop a run, for every encoder: before any model loads
            rows = {s.name: _usable_rows(ds, s, limit, on_error) for s in specs}
            encs = {s.name: _load_encoder(s, dev, exact_preprocess, logs[s.name]) for s in specs}
            startup = time.perf_counter() - t0
            reports: dict[str, ExtractReport] = {}
            for n in names:
                job = _prepare(
                    ds,
                    finals[n],
                    encs[n],
                    *rows[n],
                    batch_size=batch_size,
                    limit=limit,
                    overwrite=overwrite,
                    log=logs[n],
                    startup=startup,
                )
                if isinstance(job, ExtractReport):  # up to date: nothing to run
                    reports[n] = job
                else:
                    jobs[n] = job
            computed = _run_jobs(jobs, on_error, num_workers, logs, log)
            for n, job in jobs.items():
                reports[n] = _finish(job, computed[n], logs[n])
    except KeyboardInterrupt:
        raise ExtractInterrupted(_interrupted_line(list(finals.values()))) from None
    seconds = time.perf_counter() - t0
    for rep in reports.values():
        rep.seconds = seconds
    return [reports[n] for n in names]


def _interrupted_line(finals: list[Path]) -> str:
    kept = []
    for final in finals:
        parts = parts_dir(final)
        n = len(list(parts.glob("*.npz"))) if parts.is_dir() else 0
        if n:
            kept.append(f"{n} finished batches in {parts}")
    if not kept:
        return "interrupted; nothing was written; rerun the same command to start again"
    return f"interrupted; kept {', '.join(kept)}; rerun the same command to resume"


def _run_jobs(
    jobs: dict[str, Job],
    on_error: str,
    num_workers: int | None,
    logs: dict[str, StageLog],
    log: StageLog,
) -> dict[str, int]:
    """Every planned batch of every job not yet journalled: text per encoder, then one image
    pass for all. Returns the rows each encoder computed."""
    computed = dict.fromkeys(jobs, 0)
    for n, job in jobs.items():
        if job.plan.text_batches:
            text_only = _without_images(job)
            try:
                computed[n] += _compute(
                    job.enc,
                    job.samples,
                    text_only.plan,
                    job.journal,
                    job.done,
                    on_error,
                    num_workers,
                    logs[n],
                    bar=text_only.bar(live=logs[n].live),
                )
            except OSError as e:
                raise ExtractError(os_error_line(e, job.journal.folder, KEPT)) from None
    imaging = {n: job for n, job in jobs.items() if "image" in job.enc.modalities}
    if imaging:
        for n, rows in _image_pass(imaging, on_error, num_workers, logs, log).items():
            computed[n] += rows
    return computed


def _without_images(job: Job) -> Job:
    """The job with its image batches hidden, so `_compute` runs its text batches only (the
    plan in the journal is untouched: batch numbers stay the plan's)."""
    plan = replace(job.plan, image_batches=[])
    text_total = sum(map(len, plan.text_batches))
    text_done = sum(len(b) for i, b in enumerate(plan.text_batches) if i in job.done["text"])
    return replace(job, plan=plan, total=text_total, reused=text_done)


def _image_pass(
    jobs: dict[str, Job],
    on_error: str,
    num_workers: int | None,
    logs: dict[str, StageLog],
    log: StageLog,
) -> dict[str, int]:
    """One loader over the union of the rows the jobs' unfinished image batches hold, each
    image decoded once; each job's batches run, in plan order, once all their rows are in."""
    names = list(jobs)
    pending = {
        n: deque(
            (b, rows)
            for b, rows in enumerate(jobs[n].plan.image_batches)
            if b not in jobs[n].done["image"]
        )
        for n in names
    }
    wants = [{r for _, rows in pending[n] for r in rows} for n in names]
    union = sorted(set().union(*wants))
    computed = dict.fromkeys(names, 0)
    start = time.perf_counter()
    if union:
        batch_size = jobs[names[0]].config["batch_size"]  # the same --batch-size for all
        chunks = [union[i : i + batch_size] for i in range(0, len(union), batch_size)]
        encs = [jobs[n].enc for n in names]
        first = jobs[names[0]]
        loader = _loader(
            _SharedImages(chunks, first.samples, encs, wants), num_workers, encs[0].device
        )
        arrived = {n: {} for n in names}  # row -> its (3, H, W) pixels, or its failure
        total = sum(len(rows) for n in names for _, rows in pending[n])
        with tqdm(
            unit="sample",
            file=sys.stderr,
            dynamic_ncols=True,
            total=total,
            disable=not log.live,
            desc=f"{','.join(names)} images {first.ds.name}",
        ) as progress:
            for per_encoder in loader:
                for n, (ok_rows, pixels, failures) in zip(names, per_encoder):
                    for j, r in enumerate(ok_rows):
                        arrived[n][r] = pixels[j]  # (3, H, W)
                    for r, stage, why in failures:
                        arrived[n][r] = (r, stage, why)
                    while pending[n] and all(r in arrived[n] for r in pending[n][0][1]):
                        b, rows = pending[n].popleft()
                        _run_image_batch(jobs[n], b, rows, arrived[n], on_error)
                        computed[n] += len(rows)
                        progress.update(len(rows))
    for n in names:
        job = jobs[n]
        _log_modality(logs[n], "image", job.plan.image_batches, job.done, computed[n], start)
    return computed


def _run_image_batch(job: Job, b: int, rows: list[int], arrived: dict, on_error: str) -> None:
    """Planned image batch `b` of `job`: its pixels stacked in plan order, the forward, and
    the journal part, exactly as the single-encoder loop writes it."""
    got = [arrived.pop(r) for r in rows]
    ok_rows = [r for r, g in zip(rows, got) if isinstance(g, torch.Tensor)]
    failures = [g for g in got if not isinstance(g, torch.Tensor)]
    pixels = [g for g in got if isinstance(g, torch.Tensor)]
    feats = job.enc.encode_image(torch.stack(pixels)) if pixels else None  # (B, 3, H, W)
    ok, feats, overflow = _split_nonfinite(job.enc, "image", np.asarray(ok_rows), feats)
    failures = failures + overflow
    _stop_if_failed(on_error, job.samples, failures)
    try:
        job.journal.save("image", b, ok, feats, failures)
    except OSError as e:
        raise ExtractError(os_error_line(e, job.journal.folder, KEPT)) from None


def _loader(images: TorchDataset, num_workers: int | None, device: torch.device) -> DataLoader:
    if num_workers is None:
        num_workers = min(4, max(1, (os.cpu_count() or 2) // 2))
    return DataLoader(
        images,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=2 if num_workers else None,
        pin_memory=device.type == "cuda",
    )


class _SharedImages(TorchDataset):
    """Item i = chunk i of the union rows, as a list over the encoders of (ok rows, pixels
    (B_k, 3, H, W) or None, failures): each image read and decoded once (per distinct
    decode, see `load_once`), preprocessed for every encoder that wants its row."""

    def __init__(
        self,
        chunks: list[list[int]],
        samples: Sequence[Sample],
        encoders: list[Encoder],
        wants: list[set[int]],
    ) -> None:
        self.chunks = chunks
        self.samples = samples
        self.encoders = encoders
        self.wants = wants  # per encoder: the rows it still needs

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> list[tuple[list[int], np.ndarray | None, list]]:
        k_all = range(len(self.encoders))
        ok: list[list[int]] = [[] for _ in k_all]
        images: list[list[Image.Image]] = [[] for _ in k_all]
        failures: list[list[tuple[int, str, str]]] = [[] for _ in k_all]
        for r in self.chunks[i]:
            needers = [k for k in k_all if r in self.wants[k]]
            loaded = load_once(self.samples[r], [self.encoders[k] for k in needers])
            for k, image in zip(needers, loaded):
                if isinstance(image, Exception):
                    failures[k].append((r, "image-load", str(image).splitlines()[0]))
                else:
                    ok[k].append(r)
                    images[k].append(image)
        return [
            (ok[k], self.encoders[k].preprocess(images[k]) if images[k] else None, failures[k])
            for k in k_all
        ]


def load_once(sample: Sample, encoders: Sequence[Encoder]) -> list[Image.Image | ValueError]:
    """The sample's image as each encoder's own `load_image` returns it (or the ValueError it
    raises), the file read once and decoded once per distinct decode.

    Which decode an encoder's loader makes depends on the image: the reference loader and a
    fast path whose draft does not apply decode in full; a fast path's JPEG draft picks a DCT
    scale from the image's size. So each loader's draft is applied to its own header-only
    open of the bytes (cheap: no pixels), and loaders whose opens agree on size, mode and
    decoder scale share one decode."""
    try:
        data, shown = sample_bytes(sample)
    except ValueError as e:
        return [e] * len(encoders)
    decoded: dict[tuple, Image.Image | ValueError] = {}
    out: list[Image.Image | ValueError] = []
    for enc in encoders:
        try:
            img = Image.open(io.BytesIO(data))
            if enc.fast_image is not None:
                enc.fast_image.draft(img)  # the fast path's own rule: same scale, same pixels
            key = (img.size, img.mode, getattr(img, "decoderconfig", ()))
        except Exception as err:  # noqa: BLE001 - PIL raises many types on bad files
            out.append(ValueError(_decode_failure(shown, err)))
            continue
        if key not in decoded:
            decoded[key] = _decode(img, shown)
        img.close()
        out.append(decoded[key])
    return out


def _decode(img: Image.Image, shown: str) -> Image.Image | ValueError:
    """Decode an opened image (its draft, if any, applied) to RGB as the loaders do."""
    try:
        img.load()  # decode now so truncation fails here, as in the loaders
        return to_rgb(img)
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ...
        return ValueError(_decode_failure(shown, err))
