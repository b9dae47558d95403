"""fusebench command line: thin Typer wrappers; the work lives in extract/, cache/ and fuse/.

Heavy libraries (torch, transformers, lightgbm) are imported inside commands, so `--help`
is instant and stage-two commands never load stage one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
    encoder: Annotated[str, typer.Option(help="vit | bert | clip | minilm | hf:<id-or-path>")] = "minilm",
    data: Annotated[Path, typer.Option(help="Dataset folder (lab5 / mvsa) or manifest .csv/.jsonl.")] = Path("data"),
    out: Annotated[Path, typer.Option(help="Features root; writes OUT/<dataset>/<encoder>.h5.")] = Path("features"),
    model: Annotated[Optional[str], typer.Option(help="Weights: hub id or a local save_pretrained folder.")] = None,
    layer: Annotated[Optional[int], typer.Option(help="Hidden layer to store (0 = embeddings, -1 = last).")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Random weights from the model's config (seed 0), no checkpoint.")] = False,
    data_format: Annotated[Optional[str], typer.Option("--format", help="lab5 | mvsa | manifest (default: detected).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N samples.")] = None,
    on_error: Annotated[str, typer.Option(help="skip: record bad samples and go on; fail: stop at the first.")] = "skip",
    workers: Annotated[Optional[int], typer.Option(min=0, help="Image-loading worker processes.")] = None,
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
            data_format=data_format, batch_size=batch_size, device=device, limit=limit,
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
    notes = len(rep.problems) - len(bad)
    if len(bad) > 20 or notes:
        typer.echo(f"  {max(0, len(bad) - 20)} more failures and {notes} notes (e.g. text decoded "
                   f"with a fallback encoding): fusebench cache info {rep.path}", err=True)
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
    data: Annotated[Optional[Path], typer.Option(help="Dataset to check against (default: the one recorded).")] = None,
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


@data_app.command("check")
def data_check(
    data: Annotated[Path, typer.Option(help="Dataset folder or manifest file.")],
    data_format: Annotated[Optional[str], typer.Option("--format", help="lab5 | mvsa | manifest")] = None,
) -> None:
    """Report every problem in a dataset, sample by sample (decodes every image)."""
    from extract.datasets import check_report, load_dataset

    try:
        ds = load_dataset(data, data_format, check_images=True)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), code=2)
    typer.echo(check_report(ds))

# ---------------------------------------------------------------- stage two (fuse/)

# ---------------------------------------------------------------- end


def main() -> None:
    app()


if __name__ == "__main__":
    main()
