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
)
cache_app = typer.Typer(help="Inspect and check feature caches.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (for scripts).")]


def fail(message: str, code: int = 1) -> None:
    """One clear line on stderr, then exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# ---------------------------------------------------------------- stage one


@app.command()
def extract(
    data: Annotated[Path, typer.Option(help="Dataset folder (lab5 / mvsa) or manifest .csv/.jsonl.")],
    encoder: Annotated[str, typer.Option(help="vit | bert | clip | minilm | hf:<id-or-path>")] = "minilm",
    out: Annotated[Path, typer.Option(help="Features root; writes OUT/<dataset>/<encoder>.h5.")] = Path("features"),
    model: Annotated[str | None, typer.Option(help="Weights: hub id or a local save_pretrained folder.")] = None,
    layer: Annotated[int | None, typer.Option(help="Hidden layer to store (0 = embeddings, -1 = last).")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Random weights from the model's config (seed 0), no checkpoint.")] = False,
    data_format: Annotated[str | None, typer.Option("--format", help="lab5 | mvsa | manifest (default: detected).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (fp16 autocast on CUDA, fp32 on CPU) | fp32 | fp16 | bf16")] = "auto",
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N samples.")] = None,
    on_error: Annotated[str, typer.Option(help="skip: record bad samples and go on; fail: stop at the first.")] = "skip",
    workers: Annotated[int | None, typer.Option(min=0, help="Image-loading worker processes.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a cache built from other data or settings.")] = False,
    quiet: Quiet = False,
) -> None:
    """Run a frozen encoder once over a dataset and cache its token-level features."""
    from cache import CacheError
    from extract.loop import ExtractError
    from extract.loop import extract as run_extract

    if on_error not in ("skip", "fail"):
        fail("--on-error must be skip or fail", code=2)
    try:
        rep = run_extract(
            data, encoder, out=out, model=model, layer=layer, random_init=random_init,
            data_format=data_format, batch_size=batch_size, device=device, precision=precision, limit=limit,
            on_error=on_error, num_workers=workers, overwrite=overwrite, quiet=quiet,
        )
    except (ExtractError, CacheError) as e:
        fail(str(e))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), code=2)
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
    typer.echo(
        f"wrote {rep.path}: {rep.rows} rows, {rep.ok} ok, {rep.failed} failed; computed "
        f"{rep.computed} rows, reused {rep.reused} from an earlier run; {rep.seconds:.1f}s"
    )


@cache_app.command("info")
def cache_info(file: Path) -> None:
    """Encoder, model, rows, shapes, size, status counts and the error log of a cache."""
    from cache.inspect import describe

    try:
        typer.echo(describe(file))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), code=2)


@cache_app.command("verify")
def cache_verify(
    file: Path,
    data: Annotated[Path | None, typer.Option(help="Dataset to check against (default: the one recorded).")] = None,
    rows: Annotated[int, typer.Option(help="How many rows to recompute with the encoder.")] = 4,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Re-check completeness and fingerprint against the data and model; recompute some rows."""
    from cache import CacheError
    from extract.verify import verify

    try:
        lines = verify(file, data=data, rows=rows, device=device)
    except CacheError as e:
        fail(str(e))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), code=2)
    for line in lines:
        typer.echo(line)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to create (lab5 layout).")] = Path("demo-data/lab5-synthetic"),
    n_train: Annotated[int, typer.Option(min=10)] = 540,
    n_test: Annotated[int, typer.Option(min=1)] = 60,
    seed: int = 0,
) -> None:
    """Write a SYNTHETIC lab5-layout dataset (planted text+image signal) for the offline demo."""
    from extract.synthetic import make_synthetic_lab5

    root = make_synthetic_lab5(out, n_train=n_train, n_test=n_test, seed=seed)
    typer.echo(f"wrote synthetic dataset {root} ({n_train} train, {n_test} test) — not real data")


@data_app.command("check")
def data_check(
    data: Annotated[Path, typer.Option(help="Dataset folder or manifest file.")],
    data_format: Annotated[str | None, typer.Option("--format", help="lab5 | mvsa | manifest")] = None,
) -> None:
    """Report every problem in a dataset, sample by sample (decodes every image)."""
    from extract.datasets import check_report, load_dataset

    try:
        ds = load_dataset(data, data_format, check_images=True)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), code=2)
    typer.echo(check_report(ds))

# ---------------------------------------------------------------- stage two (fuse/)

HEAD_CONFIGS = Path(__file__).resolve().parent / "configs" / "heads"
HEAD_NAMES = ", ".join(sorted(p.stem for p in HEAD_CONFIGS.glob("*.yaml")))  # no torch import for --help

Features = Annotated[Path, typer.Option(help="Cache folder features/DATASET, holding <encoder>.h5 files.")]
TextEnc = Annotated[str, typer.Option("--text", help="Encoder whose text features to use; 'none' for image only.")]
ImageEnc = Annotated[str, typer.Option("--image", help="Encoder whose image features to use; 'none' for text only.")]
ValRatio = Annotated[float | None, typer.Option(help="Score on a stratified holdout of this share (default 0.1, split seed 42).")]
Folds = Annotated[int | None, typer.Option(min=2, help="Score with stratified K-fold (seed 42) instead of a holdout.")]
Epochs = Annotated[int | None, typer.Option(min=1, help="Max epochs of torch heads (default: the head's YAML).")]
RunsOut = Annotated[Path, typer.Option("--out", help="Runs root; writes OUT/<timestamp>-<name>/.")]
FuseDevice = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N (torch heads).")]
ClassWeights = Annotated[bool, typer.Option("--class-weights", help="Weight the loss by inverse class frequency.")]


def _run_stage_two(call):
    """Calls into fuse/; an error the user can fix (ValueError, FileNotFoundError, CacheError)
    becomes one line on stderr and exit code 2."""
    try:
        return call()
    except (ValueError, FileNotFoundError) as e:
        fail(" ".join(str(e).split()), code=2)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        fail(f"--seeds must be integers separated by commas, e.g. 42,43,44 (got {text!r})", code=2)
    return seeds


def _encoder(name: str) -> str | None:
    return None if name.lower() in ("none", "") else name


def _protocol(val_ratio: float | None, folds: int | None):
    from fuse.protocol import StratifiedProtocol

    if val_ratio is not None and folds is not None:
        fail("give either --val-ratio or --folds, not both", code=2)
    return _run_stage_two(lambda: StratifiedProtocol(val_ratio=0.1 if val_ratio is None else val_ratio, folds=folds))


def _overrides(pairs: list[str] | None) -> dict:
    """--set dim=128 --set train.lr=3e-4 -> {"dim": 128, "train": {"lr": 0.0003}}."""
    import yaml

    out: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--set wants KEY=VALUE (e.g. dim=128 or train.lr=3e-4), got {pair!r}", code=2)
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


@app.command("fuse")
def fuse_cmd(
    head: Annotated[str, typer.Option(help=f"Fusion head: {HEAD_NAMES}.")],
    features: Features,
    text: TextEnc = "minilm",
    image: ImageEnc = "vit",
    val_ratio: ValRatio = None,
    folds: Folds = None,
    seeds: Annotated[str, typer.Option(help="Model seeds, comma-separated.")] = "42",
    epochs: Epochs = None,
    out: RunsOut = Path("runs"),
    device: FuseDevice = "auto",
    class_weights: ClassWeights = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a hyperparameter: --set dim=128 --set train.lr=3e-4.")] = None,
    quiet: Quiet = False,
) -> None:
    """Train one fusion head on cached features and score it (holdout or K folds, × seeds)."""
    from fuse.experiment import run_fuse

    protocol = _protocol(val_ratio, folds)
    result = _run_stage_two(lambda: run_fuse(
        head=head, features=features, text=_encoder(text), image=_encoder(image), protocol=protocol,
        seeds=_seeds(seeds), epochs=epochs, out=out, device=device, class_weights=class_weights,
        overrides=_overrides(set_), quiet=quiet,
    ))
    typer.echo(result.table)
    typer.echo(f"run folder: {result.run_dir}")


@app.command()
def compare(
    features: Features,
    heads: Annotated[str, typer.Option(help=f"'all' or a comma list of: {HEAD_NAMES}.")] = "all",
    text: TextEnc = "minilm",
    image: ImageEnc = "vit",
    val_ratio: ValRatio = None,
    folds: Folds = None,
    seeds: Annotated[str, typer.Option(help="Model seeds, comma-separated.")] = "42,43,44",
    epochs: Epochs = None,
    out: RunsOut = Path("runs"),
    device: FuseDevice = "auto",
    class_weights: ClassWeights = False,
    quiet: Quiet = False,
) -> None:
    """Every head × fold × seed on one cache: a table sorted by macro-F1, CSV/JSON and plots."""
    from fuse.experiment import run_compare

    protocol = _protocol(val_ratio, folds)
    result = _run_stage_two(lambda: run_compare(
        heads=heads, features=features, text=_encoder(text), image=_encoder(image), protocol=protocol,
        seeds=_seeds(seeds), epochs=epochs, out=out, device=device, class_weights=class_weights, quiet=quiet,
    ))
    typer.echo(result.table)
    typer.echo(f"run folder: {result.run_dir}")


@app.command()
def predict(
    run: Annotated[Path, typer.Option(help="Run folder written by `fuse` or `compare`.")],
    split: Annotated[str, typer.Option(help="Which cache rows to label.")] = "test",
    out: Annotated[Path, typer.Option(help="Output file: a guid,tag header, then one line per row.")] = Path("predictions.txt"),
    head: Annotated[str | None, typer.Option(help="Head of a compare run (default: its best by macro-F1).")] = None,
    features: Annotated[Path | None, typer.Option(help="Where the run's cache folder is now, if it moved.")] = None,
    device: FuseDevice = "auto",
    quiet: Quiet = False,
) -> None:
    """Label a split with a run's saved model (refits nothing), in the cache's row order."""
    from fuse.predict import predict_run

    report = _run_stage_two(lambda: predict_run(run, split=split, out=out, head=head, features=features, device=device))
    if not quiet:
        typer.echo(f"wrote {report.n_rows} predictions from head '{report.head}' to {report.out}")

# ---------------------------------------------------------------- end


def main() -> None:
    app()


if __name__ == "__main__":
    main()
