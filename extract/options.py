"""What one `extract` run is asked to do, and what it reports: the options object every layer
of stage one reads, its errors, its per-cache report and its progress log.

`ExtractOptions` holds the command's options once; the runner (extract/runner.py) and the
phases below it (plan, compute, assemble) read the fields they need from it, so no call
passes nineteen keywords down. One encoder is a list of one: `encoders` is a comma list or a
sequence of names, each extracted into its own cache in the same pass over the data.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm


class ExtractError(RuntimeError):
    """A one-line failure of the run (`--on-error fail` met a bad sample, every sample failed,
    the disk filled up, ...); the message names it and the fix."""


class ExtractInterrupted(KeyboardInterrupt):
    """Ctrl-C: the message says what was kept and how to resume."""


@dataclass
class ExtractOptions:
    """The options of one extraction, as `fusebench extract` takes them (the CLI flag of each
    field in its comment). Checked by `check()` before anything is read."""

    data: str | Path  # --data: a dataset folder or a manifest file
    encoders: str | Sequence[str] = "minilm"  # --encoder: vit,clip,bert or a list of names
    out: str | Path = "features"  # --out: writes <out>/<dataset>/<encoder>.h5
    model: str | None = None  # --model: one per encoder, comma-separated when several
    layer: int | None = None  # --layer: a hidden layer instead of the last
    random_init: bool = False  # --random-init: the model's config with random weights
    data_format: str | None = None  # --format: lab5 | mvsa | manifest (None: detected)
    batch_size: int = 32  # --batch-size: part of the cache's config (padding)
    device: str = "auto"  # --device
    precision: str = "auto"  # --precision
    limit: int | None = None  # --limit: only the first N samples
    on_error: str = "skip"  # --on-error: skip records a bad sample, fail stops the run
    num_workers: int | None = None  # --workers: image-loading processes (None: chosen)
    overwrite: bool = False  # --overwrite: replace a cache of other data or settings
    quiet: bool = False  # --quiet: no progress at all
    exact_preprocess: bool = False  # --exact-preprocess: the model's own image processor
    decode: str = "auto"  # --decode: cpu | gpu | auto (gpu on a CUDA device)
    text_encoding: str | None = None  # --text-encoding: legacy text files' encoding
    labels: Sequence[str] | None = None  # --labels: classes in order
    columns: dict[str, str] | None = None  # --column: manifest column mapping

    def check(self) -> None:
        """The numeric and choice options, before anything is read."""
        if self.on_error not in ("skip", "fail"):
            raise ValueError(f"--on-error must be skip or fail, not '{self.on_error}'")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be at least 1")
        if self.decode not in ("cpu", "gpu", "auto"):
            raise ValueError(f"--decode must be cpu, gpu or auto, not '{self.decode}'")
        if self.decode == "gpu" and self.exact_preprocess:
            raise ValueError(
                "--decode gpu and --exact-preprocess ask for two image paths; pass one "
                "(--exact-preprocess: the model's own processor, on the CPU)"
            )

    def decode_on(self, device_type: str) -> str:
        """--decode resolved for a device: auto is gpu on CUDA, cpu elsewhere."""
        if self.decode == "auto":
            return "gpu" if device_type == "cuda" and not self.exact_preprocess else "cpu"
        return self.decode

    def request(self) -> dict:
        """The options that follow the data, as given (None: not given). Recorded in the
        cache's `request` attribute: the config holds their effect (--limit None when it
        covers the data; the classes and encoding the data gave), which changes when the
        files change."""
        from fusebench.extract.datasets import check_encoding_name

        return {
            "limit": self.limit,
            "labels": None if self.labels is None else list(self.labels),
            "text_encoding": (
                check_encoding_name(self.text_encoding) if self.text_encoding else None
            ),
        }


def split_encoders(
    names: str | Sequence[str], model: str | None = None
) -> tuple[dict[str, str | None], list[str]]:
    """`vit,clip,bert` (and --model, one entry per encoder or none) -> ({name: model or None}
    in the order given, each name once; one note per name given twice). A sequence of names
    is taken as given (a name is not split on commas); with one encoder, --model is its
    model as it is."""
    given = names.split(",") if isinstance(names, str) else list(names)
    given = [n.strip() for n in given if n.strip()]
    if not given:
        raise ValueError("--encoder is empty; name one or more, e.g. --encoder vit,clip")
    models = [model] if len(given) == 1 else _split_models(model, given)
    chosen: dict[str, str | None] = {}
    for n, m in zip(given, models):
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
    replaced: bool = False  # --overwrite replaced a cache built with other data options
    kept: int = 0  # refresh: rows whose features were copied from the existing cache
    rank: int = 0  # torchrun: > 0 on the ranks that computed a share and left rank 0 to write


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
