"""The bundled configs, shipped as package data: encoders/<name>.yaml, heads/<name>.yaml
(the file stem is the registry name) and demo/ (the random-weight ViT of the offline demo).

`config_dir("heads")` finds them the same way in a clone, an editable install and a wheel
(importlib.resources), so fusebench runs from any directory. A missing folder or file is an
error naming it, never a silent default.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


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
