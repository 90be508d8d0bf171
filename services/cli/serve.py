"""``qsens serve loader``: run one loader process for one variant."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from services.common import settings as settings_mod
from services.common.errors import QsensError
from services.common.logging import configure_logging

app = typer.Typer(help="Run a qsens service.", no_args_is_help=True)


def _platform_checkpoint(
    request_json: str, precision: str, name: str | None, cache_dir: Path
) -> tuple[str, str]:
    """(folder, model name) of a platform-made checkpoint, once its quantize job committed it."""
    from services.common.errors import InvalidArgument
    from services.common.quantization import parse_request
    from services.quantizer.checkpoint import wait_for_checkpoint

    try:
        request = parse_request(json.loads(request_json), "quantize")
    except json.JSONDecodeError as err:
        raise InvalidArgument("quantize", f"not JSON: {err}") from None
    if request.method != precision.strip().lower():
        raise InvalidArgument(
            "quantize.method", f"{request.method} request for a {precision} loader"
        )
    folder = wait_for_checkpoint(request, cache_dir)
    return str(folder), name or request.model


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
    quantize: Annotated[
        str | None,
        typer.Option(
            help="A quantize request (JSON): wait until the quantize job has committed its "
            "checkpoint in S3, fetch it and serve it (MODEL is then only a label)."
        ),
    ] = None,
) -> None:
    """Serve MODEL at PRECISION over gRPC (and optionally OpenAI-compatible HTTP)."""
    common = settings_mod.get(settings_mod.CommonSettings)
    configure_logging("loader", common.log_level, common.log_format)
    from services.loader.server import serve

    try:
        if quantize is not None:
            model, name = _platform_checkpoint(quantize, precision, name, common.cache_dir)
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
