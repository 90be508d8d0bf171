"""``qsens serve loader``: run one loader process for one variant."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from services.common import settings as settings_mod
from services.common.errors import QsensError
from services.common.logging import configure_logging

app = typer.Typer(help="Run a qsens service.", no_args_is_help=True)


@app.command("loader")
def loader(
    model: Annotated[
        str, typer.Option(help="Hub id, folder, .gguf file, smollm2-135m or tiny:llama.")
    ],
    precision: Annotated[str, typer.Option(help="fp32 bf16 fp16 nf4 fp4 int8 gptq awq.")] = "bf16",
    backend: Annotated[str | None, typer.Option(help="Backend (default: the precision's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    name: Annotated[str | None, typer.Option(help="Model name in the variant id.")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port (0: free port).")] = None,
    http_port: Annotated[
        int | None, typer.Option(help="OpenAI HTTP port (0 off, -1 free).")
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port (0 off).")] = None,
    ready_file: Annotated[
        str | None, typer.Option(help="Write bound ports here as JSON when ready.")
    ] = None,
    announce: Annotated[
        bool, typer.Option(help="Announce variant -> address in the registry.")
    ] = False,
) -> None:
    """Serve MODEL at PRECISION over gRPC (and optionally OpenAI-compatible HTTP)."""
    common = settings_mod.get(settings_mod.CommonSettings)
    configure_logging("loader", common.log_level, common.log_format)
    from services.loader.server import serve

    try:
        asyncio.run(
            serve(
                model,
                precision,
                backend=backend,
                device=device,
                name=name,
                host=host,
                port=port,
                http_port=http_port,
                metrics_port=metrics_port,
                ready_file=ready_file,
                announce=announce,
            )
        )
    except QsensError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
