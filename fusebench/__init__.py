"""fusebench: extract frozen image/text encoder features once, then compare light fusion
heads on the cache.

Everything installs under this one name; the repository's top-level folders are its
subpackages: `fusebench.extract` (stage one), `fusebench.cache` (the HDF5 feature store),
`fusebench.fuse` (stage two), `fusebench.configs` (bundled YAML) and `fusebench.cli` (the
`fusebench` command). The public API below loads lazily, so `import fusebench` is instant and
stage two never pulls in stage one's libraries:

    extract(data, encoder, out=...)          stage one: one cache per encoder
    load_feature_set(folder, text=, image=)  stage two's input, joined by guid
    build_head(name, **overrides)            a head of the registry, with its YAML defaults
    run_compare(**flags) / run_grid(spec)    the grid runner behind `fuse` and `compare`
    predict_run(run, split=, out=)           labels from a finished run
    predict_data(run, data, out=)            labels for new data, extracted as the run's caches were
    predict_pairs(run, [(text, image), ...]) the same for (text, image path) pairs: one label each
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

# In a checkout, the subpackages are the folders beside this one (extract/, cache/, fuse/,
# configs/, cli.py): put them on the package path so `python cli.py` and the benchmarks run
# from a bare copy too (a GPU machine without an install). Installed, they sit inside.
_checkout = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "fuse").is_dir() and (_checkout / "fuse" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821  (the package's own __path__)

_API = {
    "extract": "fusebench.extract.loop",
    "load_feature_set": "fusebench.fuse.features",
    "FeatureSet": "fusebench.fuse.features",
    "StratifiedProtocol": "fusebench.fuse.protocol",
    "build_head": "fusebench.fuse.registry",
    "list_heads": "fusebench.fuse.registry",
    "register_head": "fusebench.fuse.registry",
    "run_compare": "fusebench.fuse.experiment",
    "run_grid": "fusebench.fuse.experiment",
    "predict_run": "fusebench.fuse.predict",
    "predict_data": "fusebench.newdata",
    "predict_pairs": "fusebench.newdata",
    "score": "fusebench.fuse.metrics",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    if name == "__version__":
        from importlib.metadata import version

        return version("fusebench")
    raise AttributeError(f"module 'fusebench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
