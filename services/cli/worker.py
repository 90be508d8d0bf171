"""``qsens worker SERVICE``: consume a service's job kinds from the queue."""

from __future__ import annotations

from typing import Annotated

import typer

from services.common.errors import QsensError
from services.common.jobs import JobKind

app = typer.Typer(help="Run job workers.", no_args_is_help=True)

# service -> (job kinds, "module:handler or handler registry")
SERVICES: dict[str, tuple[tuple[JobKind, ...], str]] = {
    "extractor": ((JobKind.EXTRACT,), "services.extractor.handler:HANDLERS"),
    "steerer": (
        (JobKind.STEER, JobKind.LOGIT_DIFF, JobKind.BENCHMARK, JobKind.PROBE),
        "services.steerer.handler:HANDLERS",
    ),
    "analyzer": ((JobKind.ANALYZE,), "services.analyzer.handler:handle"),
    "quantizer": ((JobKind.QUANTIZE,), "services.quantizer.handler:HANDLERS"),
}


@app.command("run")
def run(
    service: Annotated[str, typer.Argument(help="extractor, steerer, analyzer or quantizer.")],
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs in flight at once.")] = 1,
) -> None:
    """Consume SERVICE's job kinds until SIGTERM."""
    from services.common.worker import serve_worker

    if service not in SERVICES:
        typer.echo(f"error: service: unknown service {service!r} ({', '.join(SERVICES)})", err=True)
        raise typer.Exit(2)
    kinds, handler = SERVICES[service]
    try:
        stats = serve_worker(kinds, handler, concurrency=concurrency)
    except QsensError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{service}: done={stats.done} retried={stats.retried} dead={stats.dead}", err=True)
