"""The bundled configs, shipped as package data: encoders/<name>.yaml, heads/<name>.yaml
(the file stem is the registry name) and demo/ (the random-weight ViT of the offline demo).

`config_dir("heads")` finds them the same way in a clone, an editable install and a wheel.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def config_dir(kind: str) -> Path:
    """The folder of bundled `kind` configs ("encoders", "heads", "demo")."""
    folder = Path(str(files(__name__) / kind))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"fusebench's bundled configs/{kind}/ is missing at {folder}; reinstall fusebench"
        )
    return folder
