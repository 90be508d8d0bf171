"""``qsens plan | run | status | runs | results | cancel``, and the loaders/workers a spec needs.

``run`` validates the spec, stores it with the plan, submits the DAG and shows progress bars
until the run ends (or returns at once with ``--detach``). ``children_for_spec`` is the local
stack's hook: one loader per variant (announced in the registry), the judge service, and one
worker per service.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.common.errors import QsensError
from services.common.localstack import ChildSpec, free_ports
from services.common.spec import ExperimentSpec, load_spec

app = typer.Typer(help="Plan, run and inspect studies.")
console = Console(stderr=True)

__all__ = ["app", "children_for_spec"]


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


def _kind_counts(records: list[Any]) -> dict[str, dict[str, int]]:
    """Per job kind: total, done, running, retried (an attempt failed or found no loader),
    waiting (queued until its loader, announced, is ready) and dead counts."""
    out: dict[str, dict[str, int]] = {}
    for record in records:
        c = out.setdefault(
            record.job.kind.value,
            {"total": 0, "done": 0, "running": 0, "dead": 0, "retried": 0, "waiting": 0},
        )
        c["total"] += 1
        state = record.state.value
        if state in c:
            c[state] += 1
        if record.failures or record.unavailable:
            c["retried"] += 1
        if state == "queued" and (record.error or "").startswith("LoaderStarting"):
            c["waiting"] += 1
    return dict(sorted(out.items()))


def progress_line(elapsed: float, counts: dict[str, dict[str, int]]) -> str:
    """One plain progress line: ``[  3m05s] extract 4/6 (2 running)  steer 0/12 ...``."""
    parts = []
    for kind, c in counts.items():
        extra = [f"{c['running']} running"] if c["running"] else []
        if c["retried"]:
            extra.append(f"{c['retried']} retried")
        if c.get("waiting"):
            extra.append(f"{c['waiting']} waiting for their loader")
        if c["dead"]:
            extra.append(f"{c['dead']} dead")
        parts.append(
            f"{kind} {c['done']}/{c['total']}" + (f" ({', '.join(extra)})" if extra else "")
        )
    minutes, seconds = divmod(int(elapsed), 60)
    return f"[{minutes:3d}m{seconds:02d}s] " + "  ".join(parts)


#: Seconds between plain progress lines when nothing changed (stdout not a terminal).
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


def stack_restarts() -> list[str]:
    """Restart lines of the local stack under QSENS_HOME (none when there is no stack)."""
    from services.common import settings as settings_mod
    from services.common.localstack import load_stack
    from services.common.localstack.supervisor import restart_lines

    try:
        stack = load_stack(settings_mod.get(settings_mod.CommonSettings).home.resolve())
    except QsensError:
        return []
    return restart_lines(stack) if stack is not None else []


def run_variants(records: list[Any]) -> list[str]:
    """The variants a run's jobs talk to (quantize jobs: the variant they make weights for)."""
    found: set[str] = set()
    for r in records:
        params = r.job.params
        for key in ("variant", "target"):
            if isinstance(params.get(key), str):
                found.add(params[key])
        if r.job.kind.value == "quantize" and {"model", "method"} <= set(params):
            found.add(f"{params['model']}@{params['method']}")
    return sorted(found)


def loader_rows(records: list[Any], entries: list[Any]) -> list[dict[str, Any]]:
    """One row per loader of the run's variants (and one 'none' row per variant without)."""
    rows: list[dict[str, Any]] = []
    for variant in run_variants(records):
        mine = [e for e in entries if e.variant == variant]
        if not mine:
            rows.append({"variant": variant, "state": "none", "since": None, "detail": ""})
        for e in sorted(mine, key=lambda e: (e.state != "ready", e.address)):
            rows.append(
                {
                    "variant": variant,
                    "state": e.state,
                    "since": e.since,
                    "address": e.address,
                    "detail": e.detail,
                    "host": e.host,
                }
            )
    return rows


def loader_line(row: dict[str, Any], now: float | None = None) -> str:
    """``smollm2@gptq  waiting since 12:03:04 (5m10s) for checkpoint ... made by the job ...``."""
    head = f"{row['variant']:<28} {row['state']:<8}"
    if row["state"] == "none":
        return head + " no loader announced"
    if row["state"] == "ready":
        return f"{head} at {row['address']}"
    since = row.get("since")
    if since is None:
        return f"{head} {row['detail']}".rstrip()
    waited = int((now if now is not None else time.time()) - since)
    minutes, seconds = divmod(max(0, waited), 60)
    stamp = time.strftime("%H:%M:%S", time.localtime(since))
    return f"{head} since {stamp} ({minutes}m{seconds:02d}s) {row['detail']}".rstrip()


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


async def collect_results(run_id: str) -> dict[str, Any]:
    """Job outcomes, extraction summaries and per-layer cosine to the reference (from S3)."""
    from services.common.contracts.vectors import VectorSet, layer_cosines
    from services.common.natsconn import connection
    from services.common.state import StateStore
    from services.common.store import AsyncS3Store, run_key, run_prefix

    store = AsyncS3Store()
    async with connection(name="qsens-cli") as nc:
        state = await StateStore.open(nc.jetstream())
        summary = await state.summary(run_id)
        records = await state.list_jobs(run_id)
    spec = ExperimentSpec.model_validate(await store.get_json(run_key(run_id, "spec.json")))
    extractions: dict[tuple[str, str, str], dict[str, Any]] = {}
    for key in await store.list_keys(run_prefix(run_id)):
        if key.endswith("/summary.json") and "/extract/" in key:
            doc = await store.get_json(key)
            extractions[(doc["variant"], doc["trait"], doc["mode"])] = doc
    cosines: list[dict[str, Any]] = []
    for model in spec.models:
        reference = f"{model.name}@{spec.reference.value}"
        for (variant, trait, mode), doc in sorted(extractions.items()):
            ref_doc = extractions.get((reference, trait, "native"))
            if variant == reference or ref_doc is None:
                continue
            for method, vkey in doc["vector_keys"].items():
                if method not in ref_doc["vector_keys"]:
                    continue
                mine = VectorSet.from_safetensors(await store.get_bytes(vkey))
                ref = VectorSet.from_safetensors(
                    await store.get_bytes(ref_doc["vector_keys"][method])
                )
                per_layer = layer_cosines(ref, mine)  # None where undefined (zero norm)
                cosines.append(
                    {
                        "variant": variant,
                        "reference": reference,
                        "trait": trait,
                        "mode": mode,
                        "method": method,
                        "layers": [c.layer for c in per_layer],
                        "cosine": [c.cosine for c in per_layer],
                    }
                )
    return {
        "run_id": run_id,
        "summary": summary.model_dump(mode="json"),
        "jobs": [
            {
                "name": r.job.name,
                "kind": r.job.kind.value,
                "state": r.state.value,
                "result": r.result,
                "error": r.error,
            }
            for r in records
        ],
        "extractions": [extractions[k] for k in sorted(extractions)],
        "cosine_to_reference": cosines,
    }


def _cell(cosine: float | None) -> str:
    return "" if cosine is None else f"{cosine:.3f}"


def cosine_table(results: dict[str, Any], columns: int = 6) -> Table:
    """Per-layer cosine to the reference, sampled at ``columns`` evenly spaced layers."""
    rows = results["cosine_to_reference"]
    table = Table(title="cosine similarity to the reference, per layer")
    if not rows:
        table.add_column("no vectors yet")
        return table
    layers = rows[0]["layers"]
    picks = sorted(
        {layers[round(i * (len(layers) - 1) / max(1, columns - 1))] for i in range(columns)}
    )
    for column in ("trait", "method", "variant", *[f"L{layer}" for layer in picks]):
        table.add_column(column, justify="right" if column.startswith("L") else "left")
    for row in rows:
        values = dict(zip(row["layers"], row["cosine"], strict=True))
        cells = [_cell(values.get(layer)) for layer in picks]
        label = row["variant"].split("@")[-1] + (" replay" if row["mode"] == "replay" else "")
        table.add_row(row["trait"], row["method"], label, *cells)
    return table


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


def _waiting_note(request: Any) -> str:
    """What `qsens up` says about a loader that waits for a quantize job's checkpoint."""
    from services.common.quantization import checkpoint_id

    job = f"quantize {request.model}@{request.method}"
    what = "its checkpoint"
    if not request.calibration.source.startswith("s3://"):  # S3 is not up yet: no id then
        from services.quantizer.calibration import load_calibration

        sha = load_calibration(request.calibration).sha256
        what = f"checkpoint {checkpoint_id(request, sha)}"
    return (
        f"waiting for {what}, made by the job '{job}' of the run; not waited for here "
        "(`qsens status RUN` shows it)"
    )


#: Jobs in flight per local worker where one is not enough: a job alternates between its
#: variant's loader, S3 and (steerer) the judge, itself waiting on the reference loader, so one
#: job at a time leaves a core idle; two jobs usually run on different variants' loaders.
LOCAL_CONCURRENCY = {"steerer": 2, "extractor": 2}


def children_for_spec(spec_path: Path, home: Path) -> list[ChildSpec]:
    """Loaders (one per variant), the judge service and the workers ``spec_path`` needs."""
    from services.cli import judge_key
    from services.common.planner import loader_source, quantize_request, variants_of

    spec = load_spec(spec_path)
    variants = variants_of(spec)
    ready = home / "ready"
    ready.mkdir(parents=True, exist_ok=True)
    for stale in ready.glob("*.json"):
        stale.unlink()
    python = [sys.executable, "-m", "services.cli.main"]
    ports = free_ports(len(variants))
    children: list[ChildSpec] = []
    reference_port = None
    for variant, port in zip(variants, ports, strict=True):
        if variant.precision == spec.reference and reference_port is None:
            reference_port = port
        request = quantize_request(spec, variant.model, variant.precision)
        argv = [
            *python,
            "serve",
            "loader",
            "--model",
            loader_source(variant.model, variant.precision),
            "--precision",
            variant.precision.value,
            "--name",
            variant.model.name,
            "--device",
            variant.model.device,
            "--port",
            str(port),
            "--http-port",
            "0",
            "--announce",
            "--ready-file",
            str(ready / f"loader-{variant.id}.json"),
        ]
        if variant.model.backend:
            argv += ["--backend", variant.model.backend]
        if request is not None:
            argv += ["--quantize", request.model_dump_json()]
        children.append(
            ChildSpec(
                name=f"loader-{variant.id}",
                argv=argv,
                # A loader whose checkpoint a quantize job of the run will make waits for it
                # in S3 (announced 'waiting' in the registry); `up` must not wait for it.
                ready_file=None if request else str(ready / f"loader-{variant.id}.json"),
                ready_timeout_s=900.0,
                stop_timeout_s=40.0,
                note=_waiting_note(request) if request else "",
                variant=variant.id,  # the supervisor declares it (fail fast when none comes)
            )
        )
    judge = [
        *python,
        "judge",
        "serve",
        *spec.judge.serve_args(),
        "--ready-file",
        str(ready / "judge.json"),
    ]
    if spec.judge.backend == "embedding" and reference_port is not None:
        judge += ["--loader-address", f"127.0.0.1:{reference_port}"]
    # A spec's judge endpoint gets the API key only if allow-listed (see judge_key).
    trusted = judge_key.key_allowed(spec.judge.base_url)
    children.append(
        ChildSpec(
            name="judge",
            argv=judge,
            ready_file=str(ready / "judge.json"),
            ready_timeout_s=300.0,
            unset_env=() if trusted else judge_key.KEY_VARIABLES,
            note="" if trusted else judge_key.withheld_note(str(spec.judge.base_url)),
        )
    )
    services = ["extractor", "steerer", "analyzer"]
    if any(quantize_request(spec, v.model, v.precision) for v in variants):
        services.append("quantizer")
    for service in services:
        argv = [*python, "worker", "run", service]
        if service in LOCAL_CONCURRENCY:
            argv += ["--concurrency", str(LOCAL_CONCURRENCY[service])]
        children.append(ChildSpec(name=f"worker-{service}", argv=argv))
    return children


def wait_ready(paths: list[Path], timeout_s: float = 900.0) -> None:
    """Block until every path exists."""
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready: {[str(p) for p in paths if not p.exists()]}")
        time.sleep(0.5)
