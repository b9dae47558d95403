"""fusebench command line: thin Typer wrappers; the work lives in extract/, cache/ and fuse/.

Heavy libraries (torch, transformers, lightgbm) are imported inside commands, so `--help`
is instant and stage-two commands never load stage one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fusebench.cli_errors import (
    EXIT_CODES,
    FAILED,
    INTERRUPTED,
    OK,
    READ,
    RERUN,
    STAGED,
    USAGE,
    fail,
    failed_already,
    one_line_errors,
    sigterm_as_ctrl_c,
)
from fusebench.cli_options import (
    HEAD_NAMES,
    AllowStale,
    ClassWeights,
    ColumnOpt,
    DataOpt,
    DecodeOpt,
    EncoderOpt,
    Ensemble,
    Epochs,
    ExactPreprocessOpt,
    Features,
    FeaturesOut,
    Folds,
    FormatOpt,
    FuseDevice,
    ImageEnc,
    ImageEncoders,
    InnerFolds,
    LabelsOpt,
    MemoryBudget,
    ModelDir,
    OneAtATime,
    OnErrorOpt,
    PrecisionOpt,
    PredictData,
    PredictModel,
    PredictOut,
    PredictSplit,
    PrintConfig,
    Quiet,
    RandomInitOpt,
    ReplayConfig,
    ReportCell,
    Robustness,
    RunsOut,
    Seeds,
    SetOpt,
    SplitSeed,
    Sweep,
    TextEnc,
    TextEncoders,
    TextEncodingOpt,
    Trials,
    TuneOpt,
    TuneTimeout,
    ValRatio,
)

app = typer.Typer(
    help="Extract frozen encoder features once; compare fusion heads on the cache.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
)
cache_app = typer.Typer(help="Inspect and check feature caches.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")


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


# ---------------------------------------------------------------- stage one


@app.command()
@one_line_errors(
    os_error="{path}: {reason}; check the path and the disk, then rerun",
    interrupted="rerun the same command to resume",
)
def extract(
    ctx: typer.Context,
    data: DataOpt,
    encoder: EncoderOpt = "minilm",
    out: Annotated[
        Path, typer.Option(help="Features root; writes OUT/<dataset>/<encoder>.h5.")
    ] = Path("features"),
    model: Annotated[
        str | None, typer.Option(help="Weights: hub id or a local save_pretrained folder.")
    ] = None,
    layer: Annotated[
        int | None, typer.Option(help="Hidden layer to store (0 = embeddings, -1 = last).")
    ] = None,
    random_init: RandomInitOpt = False,
    data_format: FormatOpt = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    precision: PrecisionOpt = "auto",
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N samples.")] = None,
    on_error: OnErrorOpt = "skip",
    workers: Annotated[
        int | None, typer.Option(min=0, help="Image-loading worker processes.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a cache built from other data or settings.")
    ] = False,
    text_encoding: TextEncodingOpt = None,
    labels: LabelsOpt = None,
    column: ColumnOpt = None,
    exact_preprocess: ExactPreprocessOpt = False,
    decode: DecodeOpt = "auto",
    quiet: Quiet = False,
) -> None:
    """Run a frozen encoder once over a dataset and cache its token-level features."""
    from fusebench.extract.options import ExtractOptions
    from fusebench.extract.runner import run

    # one runner: a single encoder is a list of one, several share one pass over the data
    reps = run(ExtractOptions(data, encoder, **_extract_kwargs(ctx.params)))
    _echo_extract_reports(reps)


def _extract_kwargs(params: dict) -> dict:
    """extract()'s keyword arguments from the `extract` command's options: each under its
    own name, but --workers (num_workers), --labels and --column (parsed here)."""
    from fusebench.extract.datasets import parse_columns, split_labels

    if params["on_error"] not in ("skip", "fail"):
        fail("--on-error must be skip or fail", code=USAGE)
    kw = {k: v for k, v in params.items() if k not in ("data", "encoder", "workers", "column")}
    kw.update(num_workers=params["workers"], labels=split_labels(params["labels"]))
    return {**kw, "columns": parse_columns(params["column"])}


def _echo_extract_reports(reps) -> None:
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
    if rep.replaced:  # --overwrite over other data options: unchanged rows were copied
        typer.echo(
            f"replaced {rep.path} (--overwrite): {rep.rows} rows, {rep.ok} ok, {rep.failed} "
            f"failed; computed {rep.computed} rows, reused {rep.kept} unchanged rows from the "
            f"old cache and {rep.reused} from an earlier run; {rep.seconds:.1f}s"
        )
        return
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
@one_line_errors(os_error=READ, path="file")
def cache_info(file: Path) -> None:
    """Encoder, model, rows, shapes, size, status counts and the error log of a cache."""
    from fusebench.cache.inspect import describe

    typer.echo(describe(file))


@cache_app.command("verify")
@one_line_errors(os_error=READ, path="file")
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
    from fusebench.extract.verify import verify

    for line in verify(file, data=data, rows=rows, device=device):
        typer.echo(line)


@cache_app.command("merge")
@one_line_errors(os_error="cannot read {path} ({reason}); check the paths")
def cache_merge(
    files: Annotated[
        list[Path], typer.Argument(help="Caches of one encoder and dataset.", metavar="CACHE")
    ],
    out: Annotated[Path, typer.Option(help="The merged cache to write.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Join caches of one encoder and settings over parts (shards) of one dataset."""
    from fusebench.cache.merge import merge_caches

    rep = merge_caches(files, out, overwrite=overwrite)
    typer.echo(
        f"wrote {rep.path}: {rep.rows} rows ({rep.ok} ok, {rep.failed} failed) from "
        f"{rep.inputs} caches, {rep.overlap} rows in more than one"
    )


@data_app.command("synth")
@one_line_errors(os_error="cannot write {path} ({reason}); pass --out a writable folder")
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

    root = make_synthetic_lab5(out, n_train=n_train, n_test=n_test, seed=seed)
    typer.echo(f"wrote synthetic dataset {root} ({n_train} train, {n_test} test) — not real data")


@data_app.command("check")
@one_line_errors(os_error=READ, path="data")
def data_check(
    data: DataOpt,
    data_format: FormatOpt = None,
    text_encoding: TextEncodingOpt = None,
    labels: LabelsOpt = None,
    column: ColumnOpt = None,
) -> None:
    """Report every problem in a dataset, sample by sample (decodes every image): its
    classes, text encodings, and each bad sample by guid. Exit code 1 when a sample has a
    fatal problem (extract would fail or skip it), 0 when there are only notes."""
    from fusebench.extract.datasets import check_report, load_dataset, parse_columns, split_labels

    ds = load_dataset(
        data,
        data_format,
        check_images=True,
        text_encoding=text_encoding,
        labels=split_labels(labels),
        columns=parse_columns(column),
    )
    typer.echo(check_report(ds))
    if any(p.fatal for p in ds.problems()):  # the report names each one and its fix
        raise typer.Exit(FAILED)


# ---------------------------------------------------------------- stage two (fuse/)


# stage two's commands write staged run folders: see one_line_errors
stage_two = one_line_errors(staged=True, interrupted=STAGED)


def _run_grid(ctx: typer.Context, command: str) -> None:
    """fuse and compare: settings from the flags typed, else --config, else the defaults; then
    one grid run (or, with --print-config, the resolved settings and no training)."""
    from fusebench.fuse.distributed import agree, is_lead
    from fusebench.fuse.experiment import run_grid, settings_yaml
    from fusebench.fuse.grid import resolve_settings

    values = dict(ctx.params)  # every option of the command, by parameter name
    out, quiet = values.pop("out"), values.pop("quiet")
    config, print_config = values.pop("config"), values.pop("print_config")
    names = {"head": "heads", "set_": "set"}  # parameter -> setting
    explicit = [
        names.get(k, k)
        for k in values
        if ctx.get_parameter_source(k).name not in ("DEFAULT", "DEFAULT_MAP")
    ]
    given = {names.get(k, k): v for k, v in values.items()}
    # through agree: under torchrun every rank checks alike and rank 0 alone says what failed
    spec = agree(lambda: resolve_settings(command, given, explicit, config))
    if print_config:
        text = settings_yaml(spec)
        if is_lead():  # under torchrun: once, not once per rank
            typer.echo(text, nl=False)
        return
    result = run_grid(spec, out=out, quiet=quiet)
    typer.echo(result.table)
    typer.echo(f"run folder: {result.run_dir}")


@app.command("fuse")
@stage_two
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
    seeds: Seeds = "42",
    epochs: Epochs = None,
    out: RunsOut = Path("runs"),
    device: FuseDevice = "auto",
    class_weights: ClassWeights = False,
    set_: SetOpt = None,
    allow_stale: AllowStale = False,
    memory_budget: MemoryBudget = None,
    one_at_a_time: OneAtATime = False,
    robustness: Robustness = "on",
    config: ReplayConfig = None,
    print_config: PrintConfig = False,
    quiet: Quiet = False,
) -> None:
    """Train one fusion head on cached features and score it (holdout or K folds, × seeds).

    A grid of one cell: the same run folder as `compare` (config.yaml, results.json/.csv,
    runs.csv, val_predictions.csv, models/, plots)."""
    _run_grid(ctx, "fuse")


@app.command()
@stage_two
def compare(
    ctx: typer.Context,
    features: Features = None,
    heads: Annotated[str, typer.Option(help=f"'all' or a comma list of: {HEAD_NAMES}.")] = "all",
    text: TextEncoders = "minilm",
    image: ImageEncoders = "vit",
    val_ratio: ValRatio = None,
    folds: Folds = None,
    split_seed: SplitSeed = 42,
    seeds: Seeds = "42,43,44",
    epochs: Epochs = None,
    out: RunsOut = Path("runs"),
    device: FuseDevice = "auto",
    class_weights: ClassWeights = False,
    set_: SetOpt = None,
    sweep: Sweep = None,
    allow_stale: AllowStale = False,
    memory_budget: MemoryBudget = None,
    one_at_a_time: OneAtATime = False,
    robustness: Robustness = "on",
    ensemble: Ensemble = 0,
    tune: TuneOpt = None,
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
    A --sweep value wins over a --set of the same key, and a cell's own train.epochs /
    train.device / train.class_weights over --epochs / --device / --class-weights.

    \b
    Replay: --config RUN/config.yaml reruns a run with its settings (same numbers on CPU);
    flags typed here override them. --print-config shows the resolved settings and exits."""
    _run_grid(ctx, "compare")


@app.command("tune")
@stage_two
def tune_cmd(
    ctx: typer.Context,
    head: Annotated[
        str | None,
        typer.Option(
            help=f"Head(s) to tune, comma-separated (each with a search: block): {HEAD_NAMES}."
        ),
    ] = None,
    features: Features = None,
    text: TextEncoders = "minilm",
    image: ImageEncoders = "vit",
    trials: Trials = 20,
    timeout: TuneTimeout = None,
    inner_folds: InnerFolds = 3,
    robustness: Robustness = "on",
    val_ratio: ValRatio = None,
    folds: Folds = None,
    split_seed: SplitSeed = 42,
    seeds: Seeds = "42,43,44",
    epochs: Epochs = None,
    out: RunsOut = Path("runs"),
    device: FuseDevice = "auto",
    class_weights: ClassWeights = False,
    set_: SetOpt = None,
    allow_stale: AllowStale = False,
    memory_budget: MemoryBudget = None,
    config: ReplayConfig = None,
    print_config: PrintConfig = False,
    quiet: Quiet = False,
) -> None:
    """Nested hyperparameter search (Optuna TPE) of each cell, beside its untuned row.

    Per outer fold x seed, one study scores trials on inner folds of that fold's training
    part only; the best is refitted there and scored on the outer fold: row
    '<cell> (tuned, N trials)'. Search spaces: the `search:` block of configs/heads/HEAD.yaml.
    Studies live in RUN/tune.sqlite3: rerun a killed tune with the same flags and --out to
    resume it. RUN/tune.csv holds the chosen parameters per outer fold."""
    _run_grid(ctx, "tune")


@app.command()
@stage_two
def predict(
    ctx: typer.Context,
    run: Annotated[Path, typer.Option(help="Run folder written by `fuse` or `compare`.")],
    split: PredictSplit = None,
    data: PredictData = None,
    out: PredictOut = Path("predictions.txt"),
    cell: Annotated[
        str | None,
        typer.Option(
            help="Cell of the run, e.g. 'minilm+vit/concat_mlp' (default: config.yaml's best_cell)."
        ),
    ] = None,
    head: Annotated[
        str | None, typer.Option(help="Pick the cell by its head, when one cell of the run has it.")
    ] = None,
    model: PredictModel = "ensemble",
    refit: Annotated[bool, typer.Option("--refit", help="Same as --model refit.")] = False,
    proba: Annotated[
        bool, typer.Option("--proba", help="Add a p_<class> column per class.")
    ] = False,
    features: Annotated[
        Path | None, typer.Option(help="Where the run's cache folder is now, if it moved.")
    ] = None,
    device: FuseDevice = "auto",
    allow_stale: AllowStale = False,
    features_out: FeaturesOut = None,
    model_dir: ModelDir = None,
    quiet: Quiet = False,
) -> None:
    """Label a split with a cell of a run (default: the fold ensemble of its best cell), in
    the cache's row order; RUN/predictions.json records which models were used. --data NEW:
    extract new data with the run's encoder settings, then label every row of it.

    A cell labels every row that has the features it reads (a text_only head labels rows
    whose image failed); the others get an empty tag and are counted on stderr."""
    from fusebench.newdata import predict_any

    if refit and model not in ("ensemble", "refit"):
        fail(f"--refit and --model {model} disagree; give one of them", code=USAGE)
    options = dict(ctx.params)  # every option, by parameter name
    refit, model = options.pop("refit"), options.pop("model")
    options["mode"] = "refit" if refit else model
    report = predict_any(**options)
    if not quiet:
        _echo_extract_reports(report.extracted)
        _echo_prediction(report)


def _echo_prediction(report) -> None:
    """predict's one line: how many rows, which cell and models, where, and how many empty."""
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
@stage_two
def report(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Run folders written by `fuse` or `compare`.", show_default=False),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path(
        "report.html"
    ),
    cell: ReportCell = None,
) -> None:
    """One self-contained HTML page of one or more runs (styles and plots inline, nothing
    fetched): ranked table, heat map, plots, robustness, error galleries and provenance per
    run; a combined ranking when the runs share protocol, classes and rows."""
    from fusebench.fuse.report_html import write_report

    typer.echo(f"report: {write_report(runs, out, cell)}")


# ---------------------------------------------------------------- end


def main() -> None:
    """The console script: runs the app; each command's errors are one line already
    (one_line_errors). What happens outside a command becomes one line too: a usage error
    (exit 2), a file-system fault (exit 1), Ctrl-C (exit 130). Any other exception is a bug
    and surfaces with its traceback."""
    try:  # typer >= 0.26 vendors click as typer._click
        from typer._click import exceptions as clicks
    except ImportError:  # pragma: no cover - older typer on the real click
        from click import exceptions as clicks

    def one_line(message: str, code: int) -> None:
        typer.secho(f"error: {' '.join(message.split())}", fg=typer.colors.RED, err=True)
        sys.exit(code)

    sigterm_as_ctrl_c()
    try:
        code = app(standalone_mode=False)
    except clicks.NoArgsIsHelpError as e:
        e.show()  # the help text, as `fusebench` alone has always printed
        sys.exit(e.exit_code)
    except clicks.UsageError as e:
        hint = f"; see `{e.ctx.command_path} --help`" if e.ctx is not None else ""
        one_line(e.format_message().rstrip(". ") + hint, USAGE)
    except clicks.ClickException as e:
        one_line(e.format_message(), e.exit_code)
    except typer.Abort:
        one_line("aborted", FAILED)
    except OSError as e:
        from fusebench.fuse._util import os_error_line

        one_line(os_error_line(e), FAILED)
    if (
        code == INTERRUPTED and not failed_already()
    ):  # Ctrl-C before a command ran (each says its own)
        one_line(f"interrupted; {RERUN}", INTERRUPTED)
    sys.exit(code if isinstance(code, int) else OK)


if __name__ == "__main__":
    main()
