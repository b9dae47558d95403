"""fusebench command line: thin Typer wrappers; the work lives in extract/, cache/ and fuse/.

Heavy libraries (torch, transformers, lightgbm) are imported inside commands, so `--help`
is instant and stage-two commands never load stage one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Extract frozen encoder features once; compare fusion heads on the cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
)
cache_app = typer.Typer(help="Inspect and check feature caches.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")

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


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        typer.echo(f"fusebench {version('fusebench')}")
    except PackageNotFoundError:  # a clone run directly, never installed
        typer.echo("fusebench (not installed: pip install . to get the `fusebench` command)")
    raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    pass


INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C (128 + SIGINT)
_failed: list[str] = []  # the error line a command printed (main() adds none after it)


def fail(message: str, code: int = 1) -> None:
    """One clear line on stderr, then exit."""
    _failed.append(message)
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# ---------------------------------------------------------------- stage one

# the dataset-reading options `extract` and `data check` share
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
ColumnOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--column",
        help="Map a manifest column, KEY=NAME, repeatable; keys: guid, text, text_path, image, image_path, label, split (e.g. --column text=caption --column image=img).",
    ),
]


@app.command()
def extract(
    data: Annotated[
        Path,
        typer.Option(
            help="Dataset folder (lab5, mvsa, HF datasets save_to_disk) or manifest .csv/.jsonl/.parquet."
        ),
    ],
    encoder: Annotated[
        str,
        typer.Option(
            help="vit | bert | clip | minilm | hf:<id-or-path>; a comma list (vit,clip,bert) "
            "runs them in one pass, each image decoded once, one cache each."
        ),
    ] = "minilm",
    out: Annotated[
        Path, typer.Option(help="Features root; writes OUT/<dataset>/<encoder>.h5.")
    ] = Path("features"),
    model: Annotated[
        str | None, typer.Option(help="Weights: hub id or a local save_pretrained folder.")
    ] = None,
    layer: Annotated[
        int | None, typer.Option(help="Hidden layer to store (0 = embeddings, -1 = last).")
    ] = None,
    random_init: Annotated[
        bool,
        typer.Option(
            "--random-init", help="Random weights from the model's config (seed 0), no checkpoint."
        ),
    ] = False,
    data_format: Annotated[
        str | None, typer.Option("--format", help="lab5 | mvsa | manifest (default: detected).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto (fp16 autocast on CUDA, fp32 on CPU) | fp32 | fp16 | bf16")
    ] = "auto",
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N samples.")] = None,
    on_error: Annotated[
        str, typer.Option(help="skip: record bad samples and go on; fail: stop at the first.")
    ] = "skip",
    workers: Annotated[
        int | None, typer.Option(min=0, help="Image-loading worker processes.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a cache built from other data or settings.")
    ] = False,
    text_encoding: TextEncodingOpt = None,
    labels: LabelsOpt = None,
    column: ColumnOpt = None,
    exact_preprocess: Annotated[
        bool,
        typer.Option(
            "--exact-preprocess",
            help="Images through the model's own processor (slower) instead of the fast path that reproduces it.",
        ),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Run a frozen encoder once over a dataset and cache its token-level features."""
    from fusebench.cache import CacheError
    from fusebench.extract.datasets import parse_columns, split_labels
    from fusebench.extract.loop import ExtractError
    from fusebench.extract.loop import extract as run_extract

    if on_error not in ("skip", "fail"):
        fail("--on-error must be skip or fail", code=2)
    try:
        kw = dict(
            out=out,
            model=model,
            layer=layer,
            random_init=random_init,
            data_format=data_format,
            batch_size=batch_size,
            device=device,
            precision=precision,
            limit=limit,
            on_error=on_error,
            num_workers=workers,
            overwrite=overwrite,
            quiet=quiet,
            exact_preprocess=exact_preprocess,
            text_encoding=text_encoding,
            labels=split_labels(labels),
            columns=parse_columns(column),
        )
        if "," in encoder:  # several encoders, one pass over the data
            from fusebench.extract.multi import extract_many

            reps = extract_many(data, encoder, **kw)
        else:
            reps = [run_extract(data, encoder, **kw)]
    except (ExtractError, CacheError) as e:
        fail(" ".join(str(e).split()))
    except (ValueError, FileNotFoundError) as e:
        fail(" ".join(str(e).split()), code=2)
    except OSError as e:  # a file-system fault the checks before the run could not foresee
        fail(f"{e.filename or out}: {e.strerror or e}; check the path and the disk, then rerun")
    except KeyboardInterrupt as e:
        fail(str(e) or "interrupted; rerun the same command to resume", code=INTERRUPTED)
    for rep in reps:
        if rep.rank:  # a torchrun rank above 0 printed "rank r: computed k batches"; rank 0 reports
            continue
        _echo_extract_report(rep)


def _echo_extract_report(rep) -> None:
    """What `extract` prints for one cache: up to date, written or refreshed, and failures."""
    if rep.up_to_date:
        typer.echo(f"{rep.path} is up to date (same data and settings); nothing to do")
        return
    bad = [p for p in rep.problems if not p[1].endswith("-note")]
    for guid, stage, message in bad[:20]:
        typer.echo(f"  failed {guid} ({stage}): {message}", err=True)
    more = [f"{len(bad) - 20} more failures"] if len(bad) > 20 else []
    if notes := len(rep.problems) - len(bad):
        more.append(f"{notes} notes (e.g. text decoded with a fallback encoding)")
    if more:
        typer.echo(f"  {' and '.join(more)}: fusebench cache info {rep.path}", err=True)
    if rep.refreshed:  # the data changed since the cache was built: only changed rows ran
        typer.echo(
            f"refreshed {rep.path} (the data changed since it was built): {rep.rows} rows, "
            f"{rep.ok} ok, {rep.failed} failed; computed {rep.computed} rows, reused {rep.kept} "
            f"unchanged rows from the old cache and {rep.reused} from an earlier run; {rep.seconds:.1f}s"
        )
        return
    typer.echo(
        f"wrote {rep.path}: {rep.rows} rows, {rep.ok} ok, {rep.failed} failed; computed "
        f"{rep.computed} rows, reused {rep.reused} from an earlier run; {rep.seconds:.1f}s"
    )


@cache_app.command("info")
def cache_info(file: Path) -> None:
    """Encoder, model, rows, shapes, size, status counts and the error log of a cache."""
    from fusebench.cache.inspect import describe

    try:
        typer.echo(describe(file))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), code=2)
    except OSError as e:
        fail(f"cannot read {file} ({e.strerror or e}); check the path and its permissions", code=2)


@cache_app.command("verify")
def cache_verify(
    file: Path,
    data: Annotated[
        Path | None, typer.Option(help="Dataset to check against (default: the one recorded).")
    ] = None,
    rows: Annotated[
        int, typer.Option(min=0, help="How many rows to recompute with the encoder.")
    ] = 4,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Re-check completeness and fingerprint against the data and model; recompute some rows."""
    from fusebench.cache import CacheError
    from fusebench.extract.verify import verify

    try:
        lines = verify(file, data=data, rows=rows, device=device)
    except CacheError as e:
        fail(str(e))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), code=2)
    except OSError as e:
        fail(
            f"cannot read {e.filename or file} ({e.strerror or e}); check the path and its permissions"
        )
    for line in lines:
        typer.echo(line)


@cache_app.command("merge")
def cache_merge(
    files: Annotated[
        list[Path], typer.Argument(help="Caches of one encoder and dataset.", metavar="CACHE")
    ],
    out: Annotated[Path, typer.Option(help="The merged cache to write.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Join caches of one encoder and settings over parts (shards) of one dataset."""
    from fusebench.cache import CacheError
    from fusebench.cache.merge import merge_caches

    try:
        rep = merge_caches(files, out, overwrite=overwrite)
    except CacheError as e:
        fail(str(e))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), code=2)
    except OSError as e:
        fail(f"cannot read {e.filename or out} ({e.strerror or e}); check the paths")
    typer.echo(
        f"wrote {rep.path}: {rep.rows} rows ({rep.ok} ok, {rep.failed} failed) from "
        f"{rep.inputs} caches, {rep.overlap} rows in more than one"
    )


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to create (lab5 layout).")] = Path(
        "demo-data/lab5-synthetic"
    ),
    n_train: Annotated[int, typer.Option(min=10)] = 540,
    n_test: Annotated[int, typer.Option(min=1)] = 60,
    seed: int = 0,
) -> None:
    """Write a SYNTHETIC lab5-layout dataset (planted text+image signal) for the offline demo."""
    from fusebench.extract.synthetic import make_synthetic_lab5

    try:
        root = make_synthetic_lab5(out, n_train=n_train, n_test=n_test, seed=seed)
    except ValueError as e:
        fail(str(e), code=2)
    except OSError as e:
        fail(f"cannot write {e.filename or out} ({e.strerror or e}); pass --out a writable folder")
    typer.echo(f"wrote synthetic dataset {root} ({n_train} train, {n_test} test) — not real data")


@data_app.command("check")
def data_check(
    data: Annotated[
        Path,
        typer.Option(
            help="Dataset folder (lab5, mvsa, HF datasets save_to_disk) or manifest .csv/.jsonl/.parquet."
        ),
    ],
    data_format: Annotated[
        str | None, typer.Option("--format", help="lab5 | mvsa | manifest")
    ] = None,
    text_encoding: TextEncodingOpt = None,
    labels: LabelsOpt = None,
    column: ColumnOpt = None,
) -> None:
    """Report every problem in a dataset, sample by sample (decodes every image): its
    classes, text encodings, and each bad sample by guid."""
    from fusebench.extract.datasets import check_report, load_dataset, parse_columns, split_labels

    try:
        ds = load_dataset(
            data,
            data_format,
            check_images=True,
            text_encoding=text_encoding,
            labels=split_labels(labels),
            columns=parse_columns(column),
        )
    except (ValueError, FileNotFoundError) as e:
        fail(" ".join(str(e).split()), code=2)
    typer.echo(check_report(ds))


# ---------------------------------------------------------------- stage two (fuse/)


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
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a hyperparameter, repeatable: --set dim=128 --set train.lr=3e-4 (compare: HEAD.KEY=V for one head, KEY=V for every head that has KEY).",
    ),
]
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
    int | None, typer.Option(help="Max epochs of torch heads, >= 1 (default: the head's YAML).")
]
RunsOut = Annotated[
    Path,
    typer.Option(
        "--out", help="Runs root; writes OUT/<timestamp>-<name>/ (OUT/<...>.tmp/ until finished)."
    ),
]
FuseDevice = Annotated[
    str, typer.Option("--device", help="auto | cpu | cuda | cuda:N (torch heads).")
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


def _run_stage_two(call):
    """Calls into fuse/; an error the user can fix becomes one line on stderr: exit code 2
    for bad input (ValueError, FileNotFoundError), 1 for an unusable cache (CacheError) or a
    file-system fault (OSError: permissions, full disk, ...)."""
    from fusebench.cache import CacheError
    from fusebench.fuse._util import os_error_line

    try:
        return call()
    except CacheError as e:
        fail(" ".join(str(e).split()), code=1)
    except (ValueError, FileNotFoundError) as e:
        fail(" ".join(str(e).split()), code=2)
    except OSError as e:
        fail(" ".join(os_error_line(e).split()))


def _stage_two(
    ctx: typer.Context,
    command: str,
    out: Path,
    quiet: bool,
    config: Path | None,
    print_config: bool,
    **values,
) -> None:
    """fuse and compare: settings from the flags typed, else --config, else the defaults; then
    one grid run (or, with --print-config, the resolved settings and no training)."""
    from fusebench.fuse.experiment import run_grid, settings_yaml
    from fusebench.fuse.grid import resolve_settings

    names = {"head": "heads", "set_": "set"}  # parameter -> setting
    explicit = [
        names.get(k, k)
        for k in values
        if ctx.get_parameter_source(k).name not in ("DEFAULT", "DEFAULT_MAP")
    ]
    given = {names.get(k, k): v for k, v in values.items()}
    spec = _run_stage_two(lambda: resolve_settings(command, given, explicit, config))
    if print_config:
        typer.echo(_run_stage_two(lambda: settings_yaml(spec)), nl=False)
        return
    result = _run_stage_two(lambda: run_grid(spec, out=out, quiet=quiet))
    typer.echo(result.table)
    typer.echo(f"run folder: {result.run_dir}")


@app.command("fuse")
def fuse_cmd(
    ctx: typer.Context,
    head: Annotated[
        str | None,
        typer.Option(help=f"Fusion head (required unless --config gives it): {HEAD_NAMES}."),
    ] = None,
    features: Features = None,
    text: TextEnc = "minilm",
    image: ImageEnc = "vit",
    val_ratio: ValRatio = None,
    folds: Folds = None,
    split_seed: SplitSeed = 42,
    seeds: Annotated[
        str, typer.Option(help="Model seeds, comma-separated (each used once).")
    ] = "42",
    epochs: Epochs = None,
    out: RunsOut = Path("runs"),
    device: FuseDevice = "auto",
    class_weights: ClassWeights = False,
    set_: SetOpt = None,
    allow_stale: AllowStale = False,
    memory_budget: MemoryBudget = None,
    one_at_a_time: OneAtATime = False,
    config: ReplayConfig = None,
    print_config: PrintConfig = False,
    quiet: Quiet = False,
) -> None:
    """Train one fusion head on cached features and score it (holdout or K folds, × seeds).

    A grid of one cell: the same run folder as `compare` (config.yaml, results.json/.csv,
    runs.csv, val_predictions.csv, models/, plots)."""
    _stage_two(
        ctx,
        "fuse",
        out,
        quiet,
        config,
        print_config,
        head=head,
        features=features,
        text=text,
        image=image,
        val_ratio=val_ratio,
        folds=folds,
        split_seed=split_seed,
        seeds=seeds,
        epochs=epochs,
        device=device,
        class_weights=class_weights,
        set_=set_,
        allow_stale=allow_stale,
        memory_budget=memory_budget,
        one_at_a_time=one_at_a_time,
    )


@app.command()
def compare(
    ctx: typer.Context,
    features: Features = None,
    heads: Annotated[str, typer.Option(help=f"'all' or a comma list of: {HEAD_NAMES}.")] = "all",
    text: Annotated[
        str,
        typer.Option(
            "--text",
            help="Text encoders, comma-separated; 'none' = no text (e.g. minilm,bert,none).",
        ),
    ] = "minilm",
    image: Annotated[
        str,
        typer.Option(
            "--image",
            help="Image encoders, comma-separated; 'none' = no image (e.g. vit,clip,none).",
        ),
    ] = "vit",
    val_ratio: ValRatio = None,
    folds: Folds = None,
    split_seed: SplitSeed = 42,
    seeds: Annotated[
        str, typer.Option(help="Model seeds, comma-separated (each used once).")
    ] = "42,43,44",
    epochs: Epochs = None,
    out: RunsOut = Path("runs"),
    device: FuseDevice = "auto",
    class_weights: ClassWeights = False,
    set_: SetOpt = None,
    sweep: Annotated[
        list[str] | None,
        typer.Option(
            "--sweep",
            help="One cell per value, repeatable: --sweep cross_attn.dim=128,256 (HEAD.KEY=V1,V2; KEY=V1,V2 for every head that has KEY; several on one head: every combination).",
        ),
    ] = None,
    allow_stale: AllowStale = False,
    memory_budget: MemoryBudget = None,
    one_at_a_time: OneAtATime = False,
    config: ReplayConfig = None,
    print_config: PrintConfig = False,
    quiet: Quiet = False,
) -> None:
    """Score a grid of cells (text encoder x image encoder x head x variant), every cell on
    the same folds and seeds: a ranked table, results.csv/.json, plots and every fit's model.

    A cell that cannot run (a fusion head with image 'none', a token head on a pooled-only
    cache) is skipped with a note; a head that reads one modality (text_only) runs once per
    encoder it reads. Each cache is loaded once; the folds (default: stratified 5-fold) are
    made from the rows usable in every cache.

    \b
    Hyperparameters (values are YAML: 128, 3e-4, true):
      --set cross_attn.dim=128        one head
      --set train.lr=3e-4             every head that has the key
      --sweep cross_attn.dim=128,256  one cell per value (cell id ...@dim=128)
    A --sweep value wins over a --set of the same key.

    \b
    Replay: --config RUN/config.yaml reruns a run with its settings (same numbers on CPU);
    flags typed here override them. --print-config shows the resolved settings and exits."""
    _stage_two(
        ctx,
        "compare",
        out,
        quiet,
        config,
        print_config,
        features=features,
        heads=heads,
        text=text,
        image=image,
        val_ratio=val_ratio,
        folds=folds,
        split_seed=split_seed,
        seeds=seeds,
        epochs=epochs,
        device=device,
        class_weights=class_weights,
        set_=set_,
        sweep=sweep,
        allow_stale=allow_stale,
        memory_budget=memory_budget,
        one_at_a_time=one_at_a_time,
    )


@app.command()
def predict(
    run: Annotated[Path, typer.Option(help="Run folder written by `fuse` or `compare`.")],
    split: Annotated[str, typer.Option(help="Which cache rows to label.")] = "test",
    out: Annotated[
        Path,
        typer.Option(
            help=(
                "Output CSV: a guid,tag header, then one line per guid of the split in the cache's order. "
                "A row the cell has no usable features for keeps its line with an EMPTY tag (never a "
                "stand-in class) and is named on stderr."
            )
        ),
    ] = Path("predictions.txt"),
    cell: Annotated[
        str | None,
        typer.Option(
            help="Cell of the run, e.g. 'minilm+vit/concat_mlp' (default: config.yaml's best_cell)."
        ),
    ] = None,
    head: Annotated[
        str | None, typer.Option(help="Pick the cell by its head, when one cell of the run has it.")
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            help=(
                "ensemble: every fold x seed model of the cell, probabilities averaged; refit: the cell "
                "retrained on all labelled rows (epochs / boosting rounds = median best of its CV fits, "
                "one model per run seed; saved under RUN/refit/ and reused); fold0: the first fit only."
            )
        ),
    ] = "ensemble",
    refit: Annotated[bool, typer.Option("--refit", help="Same as --model refit.")] = False,
    proba: Annotated[
        bool, typer.Option("--proba", help="Add a p_<class> column per class.")
    ] = False,
    features: Annotated[
        Path | None, typer.Option(help="Where the run's cache folder is now, if it moved.")
    ] = None,
    device: FuseDevice = "auto",
    allow_stale: AllowStale = False,
    quiet: Quiet = False,
) -> None:
    """Label a split with a cell of a run (default: the fold ensemble of its best cell), in
    the cache's row order; RUN/predictions.json records which models were used.

    A cell labels every row that has the features it reads (a text_only head labels rows
    whose image failed); the others get an empty tag and are counted on stderr."""
    from fusebench.fuse.predict import predict_run

    if refit and model not in ("ensemble", "refit"):
        fail(f"--refit and --model {model} disagree; give one of them", code=2)
    report = _run_stage_two(
        lambda: predict_run(
            run,
            split=split,
            out=out,
            cell=cell,
            head=head,
            mode="refit" if refit else model,
            proba=proba,
            features=features,
            device=device,
            allow_stale=allow_stale,
            quiet=quiet,
        )
    )
    if not quiet:
        empty = (
            f" ({len(report.unpredicted)} with an empty tag: no usable features)"
            if report.unpredicted
            else ""
        )
        used = f"{len(report.model_dirs)} model(s)" + (
            " (reused)" if (report.refit or {}).get("reused") else ""
        )
        typer.echo(
            f"wrote {report.n_rows} predictions of cell '{report.cell}' ({report.mode}, {used}) to {report.out}{empty}"
        )


# ---------------------------------------------------------------- report


@app.command()
def report(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Run folders written by `fuse` or `compare`.", show_default=False),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path(
        "report.html"
    ),
) -> None:
    """One self-contained HTML page of one or more runs (styles and plots inline, nothing
    fetched): ranked table, heat map, plots and provenance per run; a combined ranking when
    the runs share protocol, classes and rows."""
    from fusebench.fuse.report_html import write_report

    path = _run_stage_two(lambda: write_report(runs, out))
    typer.echo(f"report: {path}")


# ---------------------------------------------------------------- end


def main() -> None:
    """The console script: runs the app, and turns what a user can cause outside a command's
    own checks into one line — a usage error (exit 2) or a file-system fault (OSError:
    permissions, full disk, read-only file system, a name too long ...; exit 1). Any other
    exception is a bug and surfaces with its traceback."""
    import sys

    try:  # typer >= 0.26 vendors click as typer._click
        from typer._click import exceptions as clicks
    except ImportError:  # pragma: no cover - older typer on the real click
        from click import exceptions as clicks

    def one_line(message: str, code: int) -> None:
        typer.secho(f"error: {' '.join(message.split())}", fg=typer.colors.RED, err=True)
        sys.exit(code)

    try:
        code = app(standalone_mode=False)
    except clicks.NoArgsIsHelpError as e:
        e.show()  # the help text, as `fusebench` alone has always printed
        sys.exit(e.exit_code)
    except clicks.UsageError as e:
        hint = f"; see `{e.ctx.command_path} --help`" if e.ctx is not None else ""
        one_line(e.format_message().rstrip(". ") + hint, 2)
    except clicks.ClickException as e:
        one_line(e.format_message(), e.exit_code)
    except typer.Abort:
        one_line("aborted", 1)
    except OSError as e:
        from fusebench.fuse._util import os_error_line

        one_line(os_error_line(e), 1)
    if code == INTERRUPTED and not _failed:  # Ctrl-C outside extract (which says it itself)
        one_line(
            "interrupted; nothing half-done was kept (a run folder is renamed into place only "
            "when complete) — rerun the same command",
            INTERRUPTED,
        )
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
