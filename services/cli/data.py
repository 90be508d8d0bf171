"""``qsens data put | list``: upload a spec's data to S3 for a cluster, and list the built-ins.

A cluster's workers cannot read files from the submitting machine: ``put`` uploads a file or a
folder to the configured bucket under ``data/<sha256-prefix>/<name>`` and prints the
``s3://`` location to write in the spec (``traits: [caa:s3://...]``, ``benchmarks[].path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from services.common.errors import QsensError

app = typer.Typer(help="Data for specs: upload files for a cluster, list the built-ins.")
console = Console(stderr=True)

__all__ = ["app"]


@app.command("put")
def put(
    file: Annotated[Path, typer.Argument(help="A data file, or a folder (caa:, arditi: data).")],
    key: Annotated[
        str | None,
        typer.Option(help="Object key (default: data/<sha256-prefix>/<name>, by content)."),
    ] = None,
) -> None:
    """Upload FILE to the configured S3 bucket and print its s3:// location."""
    from services.common.datafiles import put_data

    try:
        uri = put_data(file, key=key)
    except QsensError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    typer.echo(uri)


@app.command("list")
def list_builtins() -> None:
    """The built-in traits and benchmarks a spec can name (in every worker image)."""
    from services.common.spec import BUILTIN_BENCHMARKS
    from services.extractor.datasets import BUILTIN_TRAITS

    typer.echo("traits:")
    for name, where in BUILTIN_TRAITS.items():
        typer.echo(f"  {name:<22} {where}")
    typer.echo("benchmarks:")
    for name, (fmt, where) in BUILTIN_BENCHMARKS.items():
        typer.echo(f"  {name:<22} {fmt:<8} {where}")
