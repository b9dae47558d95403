"""The command line's option types (Typer `Annotated` aliases), shared by the commands in
cli.py: one definition and one help text per option."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def repeatable(flag: str, help: str) -> Any:
    """The type of an option given once per value (`--set a=1 --set b=2`): a list, None when
    the option is absent."""
    return Annotated[list[str] | None, typer.Option(flag, help=help)]


Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help=(
            "No progress at all (for scripts). Without it: a progress bar on a terminal; when stderr "
            "goes to a file, one plain line per finished stage or fit instead."
        ),
    ),
]


# the dataset-reading options `extract` and `data check` share
DataOpt = Annotated[
    Path,
    typer.Option(
        help="Dataset folder (lab5, mvsa, HF datasets save_to_disk) or manifest .csv/.jsonl/.parquet."
    ),
]
FormatOpt = Annotated[
    str | None, typer.Option("--format", help="lab5 | mvsa | manifest (default: detected).")
]
TextEncodingOpt = Annotated[
    str | None,
    typer.Option(
        "--text-encoding",
        help="Encoding of the texts that are not UTF-8 (default: detected once per dataset, e.g. gb18030).",
    ),
]
LabelsOpt = Annotated[
    str | None,
    typer.Option(
        help="Classes in order, comma-separated, e.g. negative,positive (default: the labels the rows carry)."
    ),
]
ColumnOpt = repeatable(
    "--column",
    "Map a manifest column, KEY=NAME, repeatable; keys: guid, text, text_path, image, image_path, label, split (e.g. --column text=caption --column image=img).",
)
# extract's own options
EncoderOpt = Annotated[
    str,
    typer.Option(
        help="vit | bert | clip | minilm | hf:<id-or-path>; a comma list (vit,clip,bert) "
        "runs them in one pass, each image decoded once, one cache each."
    ),
]
RandomInitOpt = Annotated[
    bool,
    typer.Option(
        "--random-init", help="Random weights from the model's config (seed 0), no checkpoint."
    ),
]
PrecisionOpt = Annotated[
    str, typer.Option(help="auto (fp16 autocast on CUDA, fp32 on CPU) | fp32 | fp16 | bf16")
]
OnErrorOpt = Annotated[
    str, typer.Option(help="skip: record bad samples and go on; fail: stop at the first.")
]
ExactPreprocessOpt = Annotated[
    bool,
    typer.Option(
        "--exact-preprocess",
        help="Images through the model's own image processor, always its PIL-backend class "
        "(e.g. ViTImageProcessorPil, with or without torchvision; slower) instead of a path "
        "that reproduces it. The class is recorded in the cache.",
    ),
]
DecodeOpt = Annotated[
    str,
    typer.Option(
        help="Image path: cpu (PIL in the loader workers, JPEG draft decode kept >= 2x the "
        "target) | gpu (full decode, resize + normalise with torch on the device; JPEGs "
        "decoded by nvJPEG when torchvision is installed: fusebench's gpu extra) | "
        "auto (gpu on a CUDA device). Recorded in the cache: another decode is another setting.",
    ),
]


def _head_names() -> str:
    """The bundled heads' names for --help, from their YAML files (no torch import)."""
    from fusebench.configs import bundled_path, config_names

    return ", ".join(config_names(bundled_path("heads"))) or "none found: reinstall fusebench"


HEAD_NAMES = _head_names()

Features = Annotated[
    Path | None,
    typer.Option(
        help="Cache folder features/DATASET, holding <encoder>.h5 files (required unless --config gives it)."
    ),
]
TextEnc = Annotated[
    str, typer.Option("--text", help="Encoder whose text features to use; 'none' for image only.")
]
ImageEnc = Annotated[
    str, typer.Option("--image", help="Encoder whose image features to use; 'none' for text only.")
]
ValRatio = Annotated[
    float | None,
    typer.Option(help="Score on a stratified holdout of this share (fuse's default: 0.1)."),
]
Folds = Annotated[
    int | None, typer.Option(help="Score with stratified K-fold, K >= 2 (compare's default: 5).")
]
SplitSeed = Annotated[
    int,
    typer.Option(
        "--split-seed",
        help="Seed of the stratified splits: the same seed gives every cell the same folds.",
    ),
]
SetOpt = repeatable(
    "--set",
    "Override a hyperparameter, repeatable: --set dim=128 --set train.lr=3e-4 (compare: HEAD.KEY=V for one head, KEY=V for every head that has KEY).",
)
ReplayConfig = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Replay a run: RUN/config.yaml (or RUN). Flags typed here override its settings; --set adds to its overrides.",
    ),
]
PrintConfig = Annotated[
    bool,
    typer.Option(
        "--print-config", help="Print the resolved settings as YAML and exit without training."
    ),
]
Epochs = Annotated[
    int | None,
    typer.Option(
        help="Max epochs of torch heads, >= 1 (default: the head's YAML); a cell's own "
        "--set/--sweep train.epochs wins."
    ),
]
RunsOut = Annotated[
    Path,
    typer.Option(
        "--out", help="Runs root; writes OUT/<timestamp>-<name>/ (OUT/<...>.tmp/ until finished)."
    ),
]
FuseDevice = Annotated[
    str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps (torch heads).")
]
ClassWeights = Annotated[
    bool, typer.Option("--class-weights", help="Weight the loss by inverse class frequency.")
]
AllowStale = Annotated[
    bool,
    typer.Option(
        "--allow-stale",
        help="Use a cache whose dataset changed since extraction (default: refuse, naming the changed "
        "samples); the run's config.yaml records what changed.",
    ),
]

MemoryBudget = Annotated[
    str | None,
    typer.Option(
        "--memory-budget",
        help="RAM for cached features, e.g. 1GB or 512MB (default: half the available RAM). "
        "Token arrays over it are read from the cache file in row blocks, not loaded.",
    ),
]
OneAtATime = Annotated[
    bool,
    typer.Option(
        "--one-at-a-time",
        help="Train a torch head's folds x seeds one fit after another (the baseline) "
        "instead of together as one stacked model (same rows, order and early stopping; "
        "only dropout masks are drawn differently).",
    ),
]


Seeds = Annotated[str, typer.Option(help="Model seeds, comma-separated (each used once).")]
TextEncoders = Annotated[
    str,
    typer.Option(
        "--text", help="Text encoders, comma-separated; 'none' = no text (e.g. minilm,bert,none)."
    ),
]
ImageEncoders = Annotated[
    str,
    typer.Option(
        "--image", help="Image encoders, comma-separated; 'none' = no image (e.g. vit,clip,none)."
    ),
]
Sweep = repeatable(
    "--sweep",
    "One cell per value, repeatable: --sweep cross_attn.dim=128,256 (HEAD.KEY=V1,V2; KEY=V1,V2 for every head that has KEY; several on one head: every combination).",
)

PredictOut = Annotated[
    Path,
    typer.Option(
        help=(
            "Output CSV: a guid,tag header, then one line per guid of the split in the cache's order. "
            "A row the cell has no usable features for keeps its line with an EMPTY tag (never a "
            "stand-in class) and is named on stderr."
        )
    ),
]
PredictSplit = Annotated[
    str | None,
    typer.Option(help="Which rows of the run's caches to label (default: test); not with --data."),
]
PredictData = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help=(
            "New data to label, any format `extract` reads: extracted first with exactly the "
            "encoder settings the run's caches record (model files checked against their hashes), "
            "into RUN/new/<dataset>/ (reused next time); every row of it is labelled."
        ),
    ),
]
FeaturesOut = Annotated[
    Path | None,
    typer.Option(help="With --data: where NEW's caches go (default: RUN/new), OUT/<dataset>/."),
]
ModelDir = repeatable(
    "--model-dir",
    "With --data: ENCODER=FOLDER, where the run's model files are on this machine "
    "(checked against the recorded hash); repeatable.",
)
PredictModel = Annotated[
    str,
    typer.Option(
        help=(
            "ensemble: every fold x seed model of the cell, probabilities averaged; refit: the cell "
            "retrained on all labelled rows (epochs / boosting rounds = median best of its CV fits, "
            "one model per run seed; saved under RUN/refit/ and reused); fold0: the first fit only."
        )
    ),
]
Ensemble = Annotated[
    int,
    typer.Option(
        "--ensemble",
        metavar="K",
        help="Add a row ensemble(topK): per fold x seed, the soft vote of the K cells with "
        "the best inner-validation macro-F1, scored on the fold (0: no such row).",
    ),
]
Robustness = Annotated[
    str,
    typer.Option(
        "--robustness",
        help="on: also score every fit on its scored rows with the image or the text missing "
        "or noisy (3 levels), into robustness.csv/.png; off: skip it.",
    ),
]

# tuning (`fusebench tune`, `compare --tune N`; fuse/tune.py)
Trials = Annotated[
    int,
    typer.Option(
        help="Trials per study (one study per outer fold x seed), pruned ones included; a "
        "resumed tune runs only the trials missing."
    ),
]
TuneTimeout = Annotated[
    float | None,
    typer.Option("--timeout", help="Seconds per study (per outer fold x seed) at most."),
]
InnerFolds = Annotated[
    int, typer.Option(help="Inner stratified folds of each outer fold's training part.")
]
TuneOpt = Annotated[
    str | None,
    typer.Option(
        "--tune",
        metavar="[HEAD:]N",
        help="After the grid, tune its best cell (HEAD:N: its best cell of head HEAD) with N "
        "trials per outer fold x seed, nested (3 inner folds), as one more row "
        "'<cell> (tuned, N trials)'; see `fusebench tune`.",
    ),
]
ReportCell = Annotated[
    str | None,
    typer.Option(
        "--cell",
        help="The cell whose errors the galleries show, e.g. 'minilm+vit/concat_mlp' "
        "(default: each run's best).",
    ),
]
