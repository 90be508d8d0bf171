"""``qsens serve loader``: run one loader process for one variant."""

from __future__ import annotations

import asyncio
import json
import os
from typing import TYPE_CHECKING, Annotated

import typer

from services.common import settings as settings_mod
from services.common.errors import InvalidArgument, QsensError
from services.common.logging import configure_logging

if TYPE_CHECKING:
    from services.common.quantization import QuantizeRequest
    from services.loader.preannounce import PreAnnouncer

app = typer.Typer(help="Run a qsens service.", no_args_is_help=True)


def _parse_quantize(request_json: str, precision: str) -> QuantizeRequest:
    """The ``--quantize`` request; InvalidArgument if it is not one for this precision."""
    from services.common.quantization import parse_request

    try:
        request = parse_request(json.loads(request_json), "quantize")
    except json.JSONDecodeError as err:
        raise InvalidArgument("quantize", f"not JSON: {err}") from None
    if request.method != precision.strip().lower():
        raise InvalidArgument(
            "quantize.method", f"{request.method} request for a {precision} loader"
        )
    return request


def _pre_announce(name: str | None, precision: str, model: str) -> PreAnnouncer | None:
    """The registry entry while the loader waits and loads (None without a model name)."""
    if name is None:
        return None
    from services.loader.preannounce import PreAnnouncer

    return PreAnnouncer(f"{name}@{precision}", "starting", f"loading {model}").start()


# The two long option declarations of ``loader``, named here to keep its signature short.
_QuantizeOption = Annotated[
    str | None,
    typer.Option(
        help="A quantize request (JSON): wait until the quantize job has committed its "
        "checkpoint in S3, fetch it and serve it (MODEL is then only a label)."
    ),
]
_FetchOnlyOption = Annotated[
    bool,
    typer.Option(
        help="With --quantize: wait for the checkpoint, fetch it into the model cache and "
        "exit (a Kubernetes init container, so the loader starts only once it exists)."
    ),
]


@app.command("loader")
def loader(
    model: Annotated[
        str,
        typer.Option(
            help="Hub id, folder, s3://bucket/prefix/, .gguf, smollm2-135m or tiny:llama."
        ),
    ],
    precision: Annotated[
        str, typer.Option(help="fp32 bf16 fp16 nf4 fp4 int8 gptq awq; fp8 (--engine vllm).")
    ] = "bf16",
    backend: Annotated[str | None, typer.Option(help="Backend (default: the precision's).")] = None,
    engine: Annotated[
        str | None,
        typer.Option(help="Engine (hf; others where registered). Default: the backend's."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    gpus: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="GPUs the variant spans (sets QSENS_LOADER_GPUS): layer-wise placement on the "
            "hf engine, the tensor parallel size on vllm.",
        ),
    ] = None,
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
    quantize: _QuantizeOption = None,
    fetch_only: _FetchOnlyOption = False,
) -> None:
    """Serve MODEL at PRECISION over gRPC (and optionally OpenAI-compatible HTTP).

    With --announce the loader is in the registry from the start: 'waiting' while --quantize
    waits for its checkpoint, 'starting' while it loads, then 'ready' at its address."""
    if gpus is not None:  # the loader settings read it, as from a Deployment's env
        os.environ["QSENS_LOADER_GPUS"] = str(gpus)
        settings_mod.reset()
    common = settings_mod.get(settings_mod.CommonSettings)
    configure_logging("loader", common.log_level, common.log_format)
    from services.loader.server import serve

    pre: PreAnnouncer | None = None
    try:
        request = _parse_quantize(quantize, precision) if quantize is not None else None
        if fetch_only and request is None:
            raise InvalidArgument("fetch-only", "--fetch-only needs --quantize")
        name = name or (request.model if request is not None else None)
        if announce:
            pre = _pre_announce(name, precision, model)
        if request is not None:
            from services.quantizer.checkpoint import wait_for_checkpoint

            on_state = pre.set_state if pre is not None else None
            model = str(wait_for_checkpoint(request, common.cache_dir, on_state=on_state))
            if fetch_only:
                typer.echo(model)
                return
        asyncio.run(
            serve(
                model,
                precision,
                backend=backend,
                engine=engine,
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
    finally:
        if pre is not None:
            pre.stop()
