"""``qsens report RUN``: write (or reuse) a run's analysis and copy it to a local folder.

The analyzer's ``generate_report`` decides whether the run's own ``analysis/`` is current
(same inputs, same spec) or a fresh ``analysis/report-<time>/`` must be written; this command
then downloads that folder (``report.md``, ``report.html``, the comparison JSON files and the
figures) to ``reports/<run_id>/`` by default.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from services.common.errors import QsensError

app = typer.Typer(help="Analysis reports.")
console = Console(stderr=True)

__all__ = ["app", "download_folder", "write_report"]


async def download_folder(prefix: str, target: Path) -> list[Path]:
    """Copy every object under ``prefix`` (an S3 key prefix ending in '/') into ``target``."""
    from services.common.store import AsyncS3Store

    store = AsyncS3Store()
    written: list[Path] = []
    for key in await store.list_keys(prefix):
        rel = key.removeprefix(prefix)
        if rel.startswith("report-"):  # on-demand reports live beside the job's own outputs
            continue
        local = target / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(await store.get_bytes(key))
        written.append(local)
    return written


async def write_report(run_id: str, target: Path) -> tuple[dict[str, str], list[Path]]:
    """Generate (or reuse) the run's report and download it; returns (keys, local files)."""
    from services.analyzer.report_cmd import generate_report
    from services.common.store import AsyncS3Store

    keys = await generate_report(run_id, AsyncS3Store())
    return keys, await download_folder(keys["folder"].rstrip("/") + "/", target)


@app.command("report")
def report(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    out: Annotated[
        Path | None, typer.Option(help="Local folder (default: reports/<run_id>).")
    ] = None,
) -> None:
    """Write RUN's comparison report from its stored artefacts and copy it locally."""
    target = out or Path("reports") / run_id
    try:
        keys, files = asyncio.run(write_report(run_id, target))
    except QsensError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    html = next((f for f in files if f.name == "report.html"), None)
    console.print(f"analysis: s3 {keys['folder']}/ ({len(files)} files) -> {target.resolve()}")
    if html is not None:
        console.print(f"report: {html.resolve()}")
