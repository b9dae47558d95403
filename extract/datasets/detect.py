"""Which layout a `--data` path holds, and what the dataset is called.

`detect_format` names the layout ("lab5", "mvsa" or "manifest") or fails in one line listing
them; `dataset_name` names the dataset's cache folder; `dataset_identity` is what tells two
datasets apart (the manifest file read, or the folder).
"""

from __future__ import annotations

from pathlib import Path

from fusebench.extract.datasets.lab5 import _LAB5_FILES

FORMATS: tuple[str, ...] = ("lab5", "mvsa", "manifest")
MANIFEST_FILES: tuple[str, ...] = ("manifest.csv", "manifest.jsonl", "manifest.parquet")
HF_MARKERS: tuple[str, ...] = ("dataset_dict.json", "state.json", "dataset_info.json")

_LAYOUTS = (
    "lab5 (a folder with train.txt and/or test_without_label.txt, plus data/), "
    "mvsa (a folder with labelResultAll.txt, plus data/), "
    "or manifest (a .csv/.jsonl/.parquet file, a folder with one manifest.csv, manifest.jsonl "
    "or manifest.parquet, or an HF datasets folder written by save_to_disk)"
)


def _manifest_source(path: Path) -> tuple[str, Path] | None:
    """("csv" | "jsonl" | "parquet", file) or ("hf", folder) for the manifest at `path`; None
    when there is none, or when a folder holds several (reading one would be a guess)."""
    if path.is_file():
        kind = path.suffix.lower().lstrip(".")
        return (kind, path) if kind in ("csv", "jsonl", "parquet") else None
    found = [(n.rsplit(".", 1)[1], path / n) for n in MANIFEST_FILES if (path / n).is_file()]
    if any((path / marker).is_file() for marker in HF_MARKERS):
        found.append(("hf", path))
    return found[0] if len(found) == 1 else None


def _not_readable(path: Path, err: OSError) -> ValueError:
    return ValueError(
        f"cannot read dataset path {path} ({err.strerror or err}); check that it exists and "
        "that you may read it"
    )


def detect_format(path: Path) -> str:
    """Name the layout at `path`: "lab5", "mvsa" or "manifest"; ValueError if none fits."""
    path = Path(path)
    try:
        if not path.exists():
            raise FileNotFoundError(
                f"dataset path {path} does not exist; pass --data pointing at the dataset"
            )
        if path.is_dir() and any((path / n).is_file() for n, _ in _LAB5_FILES):
            return "lab5"
        if path.is_dir() and (path / "labelResultAll.txt").is_file():
            return "mvsa"
        if _manifest_source(path) is not None:
            return "manifest"
    except FileNotFoundError:
        raise
    except OSError as err:
        raise _not_readable(path, err) from err
    raise ValueError(f"cannot tell the dataset layout of {path}; expected {_LAYOUTS}")


def dataset_name(path: Path) -> str:
    """The name of the dataset at `path` (a folder, or the manifest file read), which names
    its cache folder `<out>/<name>/`: a folder's name; for a manifest file, its folder's name
    and its stem (`lab/part1.csv` -> `lab-part1`), or the folder's name alone when the file
    is manifest.* (the one `--data FOLDER` reads) or named as its folder
    (`tweets/tweets.parquet` -> `tweets`). So `all.csv` and `part1.csv` in one folder are two
    datasets with two cache folders, and `--data tweets` and `--data tweets/manifest.csv` are
    one."""
    path = Path(path)
    if path.is_dir():
        return path.name
    folder, stem = path.parent.name, path.stem
    if not folder or stem == folder:
        return stem
    return folder if stem.lower() == "manifest" else f"{folder}-{stem}"


def dataset_identity(path: str | Path, format: str | None = None) -> Path:
    """What a dataset is, for telling two datasets apart: the manifest file a folder holds
    (or the file itself), else the folder; absolute, links resolved. A folder that holds no
    single manifest (lab5, MVSA, an HF folder, or a folder with several manifests) is
    itself."""
    path = Path(path).expanduser().absolute()
    if format in (None, "manifest") and path.is_dir():
        source = _manifest_source(path)
        if source is not None and source[0] != "hf":
            path = source[1]
    return path.resolve()
