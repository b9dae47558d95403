"""The head registry: name -> head type; hyperparameters live in configs/heads/<name>.yaml.

What a registered head provides is the contract of fuse/head.py. Here: looking heads up
(`get_head`, `list_heads`: the built-in heads of fuse/nets.py and fuse/classic.py, plus any
class registered with `@register_head`, plus those of installed packages that declare a
`fusebench.heads` entry point), their YAML defaults (`head_config`), and a head resolved once
from its name, overrides and the run-wide options (`resolve_head` -> `HeadConfig`, what a grid
cell carries). Importing this module imports neither torch nor lightgbm.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fusebench.configs import bundled_path, read_config
from fusebench.fuse._util import deep_merge
from fusebench.fuse.head import (  # noqa: F401  (re-exported: the registry's public names)
    HEADS,
    Head,
    HeadType,
    Registry,
    UnknownHeadError,
    register_head,
)
from fusebench.fuse.params import (  # noqa: F401  (re-exported for heads defined elsewhere)
    DROPOUT,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SHARE,
    Bound,
    check_params,
    check_value,
    coerce,
)

CONFIG_DIR = bundled_path("heads")  # configs/heads/, package data of the install
BUILTIN_MODULES = ("fusebench.fuse.nets", "fusebench.fuse.classic")  # their heads ship a YAML each
ENTRY_POINTS = "fusebench.heads"  # installed plugins: modules that register heads on import


def _load_builtin() -> None:
    import fusebench.fuse.classic  # noqa: F401  (registers lightgbm, logreg)
    import fusebench.fuse.nets  # noqa: F401  (registers the torch heads)

    _load_plugins()


@functools.cache
def _load_plugins() -> None:
    """Imports the modules installed packages name under the `fusebench.heads` entry point
    group (each registers its heads when imported), once."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        try:
            ep.load()
        except Exception as e:  # a broken plugin is named, not a traceback from its import
            raise ImportError(
                f"the head plugin {ep.value} (entry point '{ep.name}' of {ENTRY_POINTS}) failed "
                f"to import ({type(e).__name__}: {e}); fix or uninstall the package providing it"
            ) from None


def get_head(name: str) -> type:
    """The registered class for `name`; an unknown name lists the valid ones."""
    _load_builtin()
    return HEADS.get(name)


def list_heads(pattern: str = "*") -> list[str]:
    """Registered head names matching a glob pattern, sorted."""
    _load_builtin()
    return HEADS.names(pattern)


def head_config(name: str) -> dict[str, Any]:
    """The hyperparameters in configs/heads/<name>.yaml, else those given to
    register_head(config=...). A built-in head without its YAML is a broken install
    (FileNotFoundError naming the file), never a silent fall-back to defaults; a plugin head
    without either keeps its constructor's defaults ({})."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        if getattr(get_head(name), "__module__", "") in BUILTIN_MODULES:
            raise FileNotFoundError(
                f"{path} is missing: the built-in head '{name}' reads its hyperparameters "
                "there; reinstall fusebench (pip install --force-reinstall fusebench, or "
                "pip install . in a clone)"
            )
        given = HEADS.config(name)
        if not isinstance(given, Path):
            return {k: v for k, v in (given or {}).items() if k != "search"}
        path = given
    # `search:` is the head's search space (fuse.search_space), not a hyperparameter
    return {k: v for k, v in read_config(path).items() if k != "search"}


def resolve_params(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The head's YAML updated by overrides (nested `train:` keys merge key by key)."""
    get_head(name)
    return deep_merge(head_config(name), overrides or {})


def head_needs_tokens(name: str, overrides: dict[str, Any] | None = None) -> bool:
    return bool(get_head(name).uses_tokens(resolve_params(name, overrides)))


OPTIONS = ("epochs", "device", "class_weights")  # the run-wide options of from_config


@dataclass(frozen=True)
class HeadConfig:
    """A head resolved once: its type, its hyperparameters (YAML, then overrides) and the
    run-wide options it is built with (None keeps the hyperparameters' value)."""

    name: str
    cls: Any = field(repr=False)  # the registered HeadType
    params: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, seed: int) -> Head:
        """An unfitted estimator with this seed (from_config checks every value)."""
        return self.cls.from_config(self.params, seed=seed, **self.options)

    @functools.cached_property
    def prototype(self) -> Head:
        """One built estimator (seed 0): what the head resolves to, checked."""
        return self.build(0)

    @property
    def tokens(self) -> bool:
        """Whether it reads token arrays (else pooled vectors)."""
        return bool(self.cls.uses_tokens(self.params))

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.cls.modalities)

    @property
    def require(self) -> str:
        return str(self.cls.require)

    def with_options(self, **options: Any) -> HeadConfig:
        """The same head with some run-wide options replaced (e.g. this rank's GPU)."""
        return replace(self, options={**self.options, **options})


def resolve_head(
    name: str,
    overrides: dict[str, Any] | None = None,
    *,
    epochs: int | None = None,
    device: str | None = None,
    class_weights: bool | None = None,
) -> HeadConfig:
    """Head `name` resolved: class looked up, YAML merged with `overrides`, options kept."""
    options = {"epochs": epochs, "device": device, "class_weights": class_weights}
    return HeadConfig(name, get_head(name), resolve_params(name, overrides), options)


def build_head(
    name: str,
    *,
    seed: int = 42,
    overrides: dict[str, Any] | None = None,
    epochs: int | None = None,
    device: str | None = None,
    class_weights: bool | None = None,
) -> Head:
    """An unfitted estimator for head `name`: its YAML, then `overrides`, then the run-wide
    options (epochs, device, class_weights: None keeps the YAML's value)."""
    config = resolve_head(
        name, overrides, epochs=epochs, device=device, class_weights=class_weights
    )
    return config.build(seed)
