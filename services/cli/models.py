"""``qsens models put``: upload a model folder to S3 once, for loaders and quantize jobs anywhere.

A cluster's loaders cannot read the submitting machine's folders: ``put`` uploads one (config,
safetensors weights, tokenizer) under ``models/<name>-<digest>/`` with a ``qsens-model.json``
manifest of every file's size and sha256, and prints the ``s3://`` source to write as a spec's
``models[].source`` (or a published checkpoint). The same folder uploads to the same key, so a
second ``put`` writes nothing; loaders fetch it once into their model cache and check it
(``services.common.s3folders``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from services.common.errors import QsensError

app = typer.Typer(help="Model folders in S3: upload reference weights once.")
console = Console(stderr=True)

__all__ = ["app"]


@app.command("put")
def put(
    folder: Annotated[
        Path, typer.Argument(help="A model folder: config.json, weights, tokenizer.")
    ],
    name: Annotated[
        str | None, typer.Option(help="The <name> in models/<name>-<digest>/ (default: folder's).")
    ] = None,
) -> None:
    """Upload FOLDER to the configured S3 bucket and print its s3:// model source."""
    from services.common.s3folders import put_model_folder

    try:
        uri = put_model_folder(folder, name=name)
    except QsensError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    typer.echo(uri)
