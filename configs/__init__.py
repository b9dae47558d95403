"""The bundled configs, shipped as package data: encoders/<name>.yaml, heads/<name>.yaml
(the file stem is the registry name) and demo/ (the random-weight ViT of the offline demo).

`config_dir("heads")` finds them the same way in a clone, an editable install and a wheel
(importlib.resources), so fusebench runs from any directory. A missing folder or file is an
error naming it, never a silent default. `read_config` is the one YAML loader and checker
of both registries' files (extract.encoders' specs, fuse.registry's hyperparameters).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

Check = tuple[Callable[[Any], bool], str]  # (accepts the value, what it must be)


def bundled_path(kind: str) -> Path:
    """Where the bundled `kind` configs live ("encoders", "heads", "demo"), unchecked: cheap
    enough for import time and for `--help`."""
    return Path(str(files(__name__) / kind))


def config_dir(kind: str) -> Path:
    """The folder of bundled `kind` configs ("encoders", "heads", "demo")."""
    folder = bundled_path(kind)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"fusebench's bundled configs/{kind}/ is missing at {folder}; reinstall fusebench"
        )
    return folder


def config_names(folder: Path) -> list[str]:
    """The config names (YAML file stems) in `folder`, sorted; [] when it is not a folder."""
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def read_config(
    path: Path,
    *,
    known: Collection[str] | None = None,
    required: Collection[str] = (),
    checks: Mapping[str, Check] | None = None,
) -> dict[str, Any]:
    """The mapping in the YAML file `path`, checked key by key: every key in `known` (when
    given; the file stem is the name), every `required` key a non-empty string, and each
    key of `checks` present accepted by its check. A file that cannot be read is a
    FileNotFoundError, anything else wrong a ValueError; one line naming the file and the fix."""
    import yaml  # here, not at import: `fusebench --help` lists config names without it

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise FileNotFoundError(f"cannot read {path} ({e.strerror}); check the path") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise ValueError(f"{path} is not valid YAML{at}; fix the file") from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path} must be a mapping of key: value lines, not {type(raw).__name__}; fix the file"
        )
    for key in raw if known is not None else ():
        if key not in known:
            raise ValueError(
                f"{path}: unknown key '{key}'; use one of {', '.join(known)} (the file stem is the name)"
            )
    for key in required:
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ValueError(f"{path}: '{key}' is required (a string); add it")
    for key, (ok, what) in (checks or {}).items():
        if key in raw and not ok(raw[key]):
            raise ValueError(f"{path}: '{key}' must be {what}, not {raw[key]!r}; fix the file")
    return raw
