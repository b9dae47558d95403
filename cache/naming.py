"""Where an encoder's cache lives: ONE naming rule for both stages.

`extract --encoder NAME` writes `<out>/<dataset>/<stem>.h5` and `fuse --text NAME` /
`--image NAME` read `<features>/<stem>.h5`; both call `cache_file` so the same NAME always
names the same file. A registered encoder is its own stem (`clip` -> clip.h5); an
`hf:<id-or-path>` is spelled file-safe: `/` becomes `--`, any other run of characters outside
[A-Za-z0-9_.-] becomes `-` (`hf:org/name` -> hf-org--name.h5). A trailing `/` of a folder
path is dropped, so `hf:snap/` and `hf:snap` are the same cache.

`extract --layer K` stores another hidden layer: another cache, named `<stem>-l<K>.h5`
(`--encoder minilm --layer 3` -> minilm-l3.h5), which stage two reads as `--text minilm-l3`.
"""

from __future__ import annotations

import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def cache_stem(encoder: str, layer: int | None = None) -> str:
    """The file stem of `encoder`'s cache (no folder, no .h5); `layer`: extract's --layer."""
    name = encoder.strip()
    if name.startswith("hf:"):
        name = "hf:" + name[3:].rstrip("/\\")
    stem = _UNSAFE.sub("-", name.replace("/", "--").replace("\\", "--"))
    return stem if layer is None else f"{stem}-l{layer}"


def cache_file(folder: str | Path, encoder: str, layer: int | None = None) -> Path:
    """`<folder>/<stem>.h5`: the cache of `encoder` in one dataset's features folder."""
    return Path(folder) / f"{cache_stem(encoder, layer)}.h5"
