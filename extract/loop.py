"""The Python entry of stage one: `fusebench.extract(data, encoder, out=...)`.

A thin front over the one extraction runner (extract/runner.py) for callers who pass keywords:
`extract` runs one encoder and returns its report, `extract_many` runs several in one pass
over the data and returns one report each, in the order given. Both take the fields of
`ExtractOptions` (extract/options.py) as keywords. The modules behind it, in the order a run
goes through them: options -> runner -> plan (+ settings) -> compute (+ images, distributed)
-> assemble.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusebench.extract.options import (
    ExtractError,
    ExtractInterrupted,
    ExtractOptions,
    ExtractReport,
)
from fusebench.extract.plan import cache_path, plan_batches
from fusebench.extract.runner import run
from fusebench.extract.settings import cache_config

__all__ = [
    "ExtractError",
    "ExtractInterrupted",
    "ExtractOptions",
    "ExtractReport",
    "cache_config",
    "cache_path",
    "extract",
    "extract_many",
    "plan_batches",
    "run",
]


def extract(data: str | Path, encoder: str = "minilm", **options: Any) -> ExtractReport:
    """Runs `encoder` over every sample of `data` and writes <out>/<dataset>/<encoder>.h5;
    `options` are `ExtractOptions`' fields (out, model, layer, batch_size, limit, ...).

    Order of checks: options, the encoder's spec (YAML, name, hf: path) and the device, the
    dataset index, the --out location, the lock; only then the model loads."""
    (report,) = run(ExtractOptions(data, [encoder], **options))
    return report


def extract_many(
    data: str | Path, encoders: str | Sequence[str], **options: Any
) -> list[ExtractReport]:
    """Runs every encoder of `encoders` (a comma list or a sequence) over `data` in one pass;
    one cache each, the same bytes as `extract` writes for it alone."""
    return run(ExtractOptions(data, encoders, **options))
