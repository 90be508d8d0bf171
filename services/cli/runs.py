"""``qsens plan | run | status | runs | results | cancel``, and the loaders/workers a spec needs.

``run`` validates the spec, stores it with the plan, submits the DAG and shows progress bars
until the run ends (or returns at once with ``--detach``). ``children_for_spec`` is the local
stack's hook: one loader per variant (announced in the registry), the judge service, and one
worker per service.

The commands live here; progress views in ``run_progress``, results in ``run_results`` and the
local children in ``local_children`` (their names are re-exported here).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli.local_children import LOCAL_CONCURRENCY, children_for_spec, wait_ready
from services.cli.run_progress import _kind_counts as _kind_counts
from services.cli.run_progress import (
    loader_line,
    loader_rows,
    progress_line,
    run_variants,
    stack_restarts,
)
from services.cli.run_results import collect_results, cosine_table
from services.common.errors import QsensError
from services.common.spec import ExperimentSpec, load_spec

app = typer.Typer(help="Plan, run and inspect studies.")
console = Console(stderr=True)

__all__ = [
    "LOCAL_CONCURRENCY",
    "app",
    "children_for_spec",
    "collect_results",
    "cosine_table",
    "loader_line",
    "loader_rows",
    "progress_line",
    "run_variants",
    "stack_restarts",
    "wait_ready",
]


def _fail(err: QsensError) -> typer.Exit:
    console.print(f"[red]error:[/red] {err}")
    return typer.Exit(2)


SpecArg = Annotated[Path, typer.Argument(help="Experiment spec (YAML).", exists=False)]


def preflight(spec: ExperimentSpec, *, cluster: bool | None = None) -> None:
    """Check what the spec references before anything is submitted: for a cluster (``cluster``,
    by default when the S3 endpoint is not on this machine) no local paths; traits load and
    split, benchmark files exist (built-ins, s3:// objects, local files). InvalidArgument names
    the spec key."""
    from services.common import settings
    from services.common.datafiles import is_loopback_endpoint
    from services.common.errors import InvalidArgument
    from services.common.spec import check_portable
    from services.extractor.datasets import benchmark_file, load_trait

    if cluster is None:
        cluster = not is_loopback_endpoint(settings.get(settings.S3Settings).endpoint)
    if cluster:
        check_portable(spec)
    for i, trait in enumerate(spec.traits):
        try:
            dataset = load_trait(trait.ref)
            dataset.split(spec.extraction.seed, spec.extraction.n_train, spec.extraction.n_val)
        except InvalidArgument as err:
            field = (
                "extraction." + err.field if err.field in ("n_train", "n_val") else f"traits[{i}]"
            )
            raise InvalidArgument(field, f"{spec.trait_name(trait)}: {err.message}") from None
        check_steering_questions(spec, spec.trait_name(trait), len(dataset.eval_questions))
    if spec.probes.enabled:
        try:
            load_trait(spec.probes.harmful)
        except InvalidArgument as err:
            raise InvalidArgument("probes.harmful", err.message) from None
    for i, bench in enumerate(spec.benchmarks):
        benchmark_file(bench, f"benchmarks[{i}].path")
    _check_vectors(spec)
    from services.common.planner import check_precisions

    check_precisions(spec)


def check_steering_questions(spec: ExperimentSpec, trait: str, available: int) -> None:
    """A steered trait holds the questions the spec asks for: ``steering.questions`` for the
    search and ``steering.held_out`` more after them (the steerer would otherwise judge fewer
    without saying so). InvalidArgument names the field."""
    from services.common.errors import InvalidArgument

    steering = spec.steering
    steered = {*(steering.traits or [spec.trait_name(t) for t in spec.traits])}
    steered |= {v.trait for v in spec.vectors if v.steer}
    if not steering.enabled or trait not in steered:
        return
    if steering.questions is not None and steering.questions > available:
        raise InvalidArgument(
            "steering.questions",
            f"{steering.questions} asked, but {trait} has {available} steering questions",
        )
    search = available if steering.questions is None else steering.questions
    if steering.held_out and search + steering.held_out > available:
        raise InvalidArgument(
            "steering.held_out",
            f"{steering.held_out} held-out questions after the search's {search} need "
            f"{search + steering.held_out}, but {trait} has {available} steering questions "
            f"(lower steering.questions or steering.held_out; 0 turns the re-score off)",
        )


def _check_vectors(spec: ExperimentSpec) -> None:
    """Every imported vector set reads (``qsens vectors import`` formats); InvalidArgument
    names ``vectors[i].location``."""
    from services.common.errors import FailedPrecondition, InvalidArgument
    from services.steerer.sources import read_imported

    for i, imported in enumerate(spec.vectors):
        try:
            read_imported(imported.location)
        except FailedPrecondition as err:
            raise InvalidArgument(f"vectors[{i}].location", str(err)) from None


ClusterOpt = Annotated[
    bool | None,
    typer.Option(
        "--cluster/--local",
        help="Check the spec for a cluster (no local paths) or for this machine; default: "
        "cluster when the S3 endpoint is not on this machine.",
    ),
]


def _load(spec: Path, cluster: bool | None = None) -> ExperimentSpec:
    try:
        parsed = load_spec(spec)
        preflight(parsed, cluster=cluster)
        return parsed
    except QsensError as err:
        raise _fail(err) from err


@app.command("plan")
def plan(
    spec: SpecArg,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    cluster: ClusterOpt = None,
) -> None:
    """Check SPEC as `run` would (the preflight) and print its job graph; submits nothing."""
    from services.common.planner import build_plan, new_run_id

    parsed = _load(spec, cluster)
    built = build_plan(parsed, new_run_id(parsed))
    if as_json:
        typer.echo(json.dumps(built.model_dump(mode="json"), indent=2))
        return
    names = {job.id: job.name or job.id for job in built.jobs}
    table = Table(title=f"{len(built.jobs)} jobs (spec {built.spec_hash})")
    for column in ("#", "kind", "job", "after"):
        table.add_column(column)
    for i, job in enumerate(built.topological_order()):
        after = (
            ", ".join(names[d] for d in job.deps) if len(job.deps) <= 2 else f"{len(job.deps)} jobs"
        )
        table.add_row(str(i), job.kind.value, job.name, after)
    Console().print(table)
    counts = Counter(job.kind.value for job in built.jobs)
    typer.echo("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    _print_estimate(parsed, built.jobs)


def _print_estimate(parsed: ExperimentSpec, jobs: list[Any]) -> None:
    from services.cli.estimate import estimate_gpu_hours

    est = estimate_gpu_hours(parsed, jobs)
    typer.echo(
        f"{len(jobs)} jobs, {est.variants} variants; GPU-hour estimate: {est.gpu_hours:.1f} "
        "(H100; per-job costs and their sources: services/cli/estimate.py)"
    )
    typer.echo("  ".join(f"{k}: {v:.2f} h" for k, v in est.by_kind.items()))


async def _submit(parsed: ExperimentSpec, run_id: str | None) -> str:
    # Sizes and the run id are checked before anything is written; a failed submit is undone.
    from services.common.submission import submit_run

    return await submit_run(parsed, run_id)


PLAIN_HEARTBEAT_S = 30.0


async def _watch(run_id: str, detach: bool) -> str:
    """Follow RUN until it ends: progress bars on a terminal, plain lines otherwise (a line
    whenever a count changes, and at least every ``PLAIN_HEARTBEAT_S`` seconds)."""
    from services.common.natsconn import connection
    from services.common.state import StateStore

    async with connection(name="qsens-cli") as nc:
        state = await StateStore.open(nc.jetstream())
        if detach:
            return (await state.summary(run_id)).status
        started = time.perf_counter()
        if not console.is_terminal:
            last: dict[str, dict[str, int]] | None = None
            last_print = 0.0
            while True:
                counts = _kind_counts(await state.list_jobs(run_id))
                now = time.perf_counter()
                if counts != last or now - last_print >= PLAIN_HEARTBEAT_S:
                    console.print(
                        progress_line(now - started, counts), highlight=False, soft_wrap=True
                    )
                    last, last_print = counts, now
                summary = await state.summary(run_id)
                if summary.status != "running":
                    return summary.status
                await asyncio.sleep(1.0)
        with Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            tasks: dict[str, Any] = {}
            while True:
                for kind, c in _kind_counts(await state.list_jobs(run_id)).items():
                    note = f"running {c['running']}"
                    if c["retried"]:
                        note += f"  [yellow]retried {c['retried']}[/yellow]"
                    if c["dead"]:
                        note += f"  [red]dead {c['dead']}[/red]"
                    if kind not in tasks:
                        tasks[kind] = progress.add_task(kind, total=c["total"], note=note)
                    progress.update(tasks[kind], completed=c["done"], total=c["total"], note=note)
                summary = await state.summary(run_id)
                if summary.status != "running":
                    return summary.status
                await asyncio.sleep(1.0)


@app.command("run")
def run(
    spec: SpecArg,
    run_id: Annotated[str | None, typer.Option(help="Run id (default: name-time-hash).")] = None,
    detach: Annotated[bool, typer.Option(help="Submit and return at once.")] = False,
    cluster: ClusterOpt = None,
) -> None:
    """Submit SPEC as a run and show progress until it ends."""
    parsed = _load(spec, cluster)
    try:
        rid = asyncio.run(_submit(parsed, run_id))
        console.print(f"run [bold]{rid}[/bold] submitted")
        typer.echo(rid)
        status = asyncio.run(_watch(rid, detach))
    except QsensError as err:
        raise _fail(err) from err
    if detach:
        return
    console.print(f"run {rid}: {status}")
    if status != "succeeded":
        raise typer.Exit(1)


@app.command("status")
def status(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Progress of RUN: counts per state, every job, and the loaders of its variants (a loader
    waiting for its quantize job's checkpoint says which job, and since when)."""

    async def fetch() -> tuple[Any, list[Any], list[Any]]:
        from services.common.loader_registry import LoaderRegistry
        from services.common.natsconn import connection
        from services.common.state import StateStore

        async with connection(name="qsens-cli") as nc:
            js = nc.jetstream()
            state = await StateStore.open(js)
            records = await state.list_jobs(run_id)
            entries = await (await LoaderRegistry.open(js)).all_entries()
            return await state.summary(run_id), records, entries

    try:
        summary, records, entries = asyncio.run(fetch())
    except QsensError as err:
        raise _fail(err) from err
    loaders = loader_rows(records, entries)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "summary": summary.model_dump(mode="json"),
                    "jobs": [
                        {
                            "name": r.job.name,
                            "kind": r.job.kind.value,
                            "state": r.state.value,
                            "attempts": r.attempts,
                            "waiting": r.waiting,
                            "error": r.error,
                        }
                        for r in records
                    ],
                    "loaders": loaders,
                    "stack_restarts": stack_restarts(),
                },
                indent=2,
            )
        )
        return
    table = Table(title=f"{run_id}: {summary.status}")
    for column in ("job", "state", "attempts", "error"):
        table.add_column(column)
    for r in sorted(records, key=lambda r: (r.job.kind.value, r.job.name)):
        table.add_row(r.job.name, r.state.value, str(r.attempts), (r.error or "")[:80])
    Console().print(table)
    typer.echo("  ".join(f"{k}: {v}" for k, v in summary.counts.items() if v))
    if loaders:
        typer.echo("loaders:")
        for row in loaders:
            typer.echo("  " + loader_line(row))
    restarted = stack_restarts()
    if restarted:
        typer.echo("restarted by the local stack's supervisor:")
        for line in restarted:
            typer.echo("  " + line)


@app.command("runs")
def runs(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every run of the namespace, oldest first, with its status and job counts."""

    async def fetch() -> list[Any]:
        from services.common.natsconn import connection
        from services.common.state import StateStore

        async with connection(name="qsens-cli") as nc:
            state = await StateStore.open(nc.jetstream())
            records = await state.list_runs()
            return [(r, await state.summary(r.run_id)) for r in records]

    try:
        listed = asyncio.run(fetch())
    except QsensError as err:
        raise _fail(err) from err
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "run_id": r.run_id,
                        "description": r.description,
                        "created_at": r.created_at,
                        "status": s.status,
                        "jobs": r.job_count,
                        "counts": {k: v for k, v in s.counts.items() if v},
                    }
                    for r, s in listed
                ],
                indent=2,
            )
        )
        return
    table = Table(title="runs")
    for column in ("run", "created", "status", "jobs", "states"):
        table.add_column(column)
    for r, s in listed:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at))
        states = "  ".join(f"{k}: {v}" for k, v in s.counts.items() if v)
        table.add_row(r.run_id, created, s.status, str(r.job_count), states)
    Console().print(table)


@app.command("cancel")
def cancel(run_id: Annotated[str, typer.Argument(help="Run id.")]) -> None:
    """Cancel RUN: queued jobs are skipped, running ones finish."""

    async def go() -> None:
        from services.common.dag import cancel_run
        from services.common.natsconn import connection
        from services.common.state import StateStore

        async with connection(name="qsens-cli") as nc:
            await cancel_run(run_id, state=await StateStore.open(nc.jetstream()))

    try:
        asyncio.run(go())
    except QsensError as err:
        raise _fail(err) from err
    console.print(f"run {run_id} cancelled")


@app.command("results")
def results(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Results of RUN: job outcomes, extraction summaries, cosine to the reference."""
    try:
        data = asyncio.run(collect_results(run_id))
    except QsensError as err:
        raise _fail(err) from err
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    Console().print(cosine_table(data))
