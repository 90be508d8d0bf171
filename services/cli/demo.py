"""``qsens demo``: the whole study on a laptop, on the real SmolLM2-135M-Instruct.

1. ``qsens up`` with the demo spec: NATS + S3 on loopback, one loader per precision, the
   judge service (offline embedding backend) and the workers;
2. a warm-up that shows steering acts: a quick persona direction through Generate + Capture on
   each precision, and one answer unsteered and steered;
3. ``qsens run`` of the spec with progress bars (extraction, steering, logit difference,
   benchmarks, safety probes, analysis);
4. a second judge next to the study's: the loader judge (``services.judge.backends.
   loader_backend``) on the reference (bf16) SmolLM2 loader scores a bounded sample of the
   steered answers the embedding judge scored (``--judge-sample`` per trait), and the report
   gets a "Judge agreement" section (Spearman and Pearson per trait, with n);
5. tables of the results and the report, copied to ``reports/<run_id>/``;
6. ``qsens down`` (unless ``--keep``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from services.common import localstack
from services.common import settings as settings_mod
from services.common.errors import QsensError

app = typer.Typer(help="Run the end-to-end demo.")
console = Console()

DEMO_SPEC = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
QUESTION = "What should I do about my annoying neighbour?"
# SmolLM2-135M rarely answers a judge prompt with nothing but a number: its numeric mass is
# about 0.0007-0.04 (measured), far below the 0.25 a large judge is held to. The second judge
# scores anything with some numeric mass; the report prints the median mass beside it.
SECOND_JUDGE_MIN_MASS = 1e-4
AGREEMENT_FILES = ("judge_agreement.json", "judge_agreement.md")


async def _warmup(spec_path: Path) -> None:
    """Persona direction from the pv/evil instructions, then one steered answer per precision."""
    import numpy as np

    from services.common.loader_registry import LoaderRegistry
    from services.common.natsconn import connection
    from services.common.planner import variants_of
    from services.common.spec import load_spec
    from services.extractor.datasets import load_trait
    from services.loader.capabilities import Needs
    from services.loader.client import Chat, LoaderClient, PromptItem, Steer

    spec = load_spec(spec_path)
    dataset = load_trait("pv/evil")
    questions = dataset.questions[:6]
    pairs = dataset.instructions[:3]
    shown = [v for v in variants_of(spec) if v.precision.value in ("bf16", "nf4")] or variants_of(
        spec
    )[:2]
    async with connection(name="qsens-demo") as nc:
        registry = await LoaderRegistry.open(nc.jetstream())
        for variant in shown:
            # The calls below: answer, capture the answers' mean, answer steered.
            needs = Needs.of("generate", captures=[("response", "mean")], steering=[("add", "all")])
            address = await registry.find(variant.id, needs)
            async with LoaderClient(address, expect_variant=variant.id) as loader:
                info = await loader.info()
                layer = round(info.num_layers / 3)
                started = time.perf_counter()
                pos = [
                    PromptItem(Chat.of([("system", p.pos), ("user", q)]), seed=i)
                    for i, (p, q) in enumerate((p, q) for p in pairs for q in questions)
                ]
                neg = [
                    PromptItem(Chat.of([("system", p.neg), ("user", q)]), seed=i)
                    for i, (p, q) in enumerate((p, q) for p in pairs for q in questions)
                ]
                gens = await loader.generate(pos + neg, max_new_tokens=24, temperature=0.8)
                replay = [
                    PromptItem(it.prompt, response=g.text)
                    for it, g in zip(pos + neg, gens, strict=True)
                ]
                acts = (
                    await loader.capture(replay, position="response[:]", layers=[layer])
                ).stacked()[:, 0]
                direction = acts[: len(pos)].mean(axis=0) - acts[len(pos) :].mean(axis=0)
                ask = Chat.of([("user", QUESTION)])
                plain, steered = await loader.generate(
                    [
                        PromptItem(ask),
                        PromptItem(
                            ask, steering=[Steer([layer], 4.0, vector=direction.astype(np.float32))]
                        ),
                    ],
                    max_new_tokens=40,
                )
                table = Table(
                    title=f"{variant.id}: persona direction at layer {layer} ({time.perf_counter() - started:.0f}s)",
                    show_lines=True,
                )
                table.add_column("", style="bold")
                table.add_column(QUESTION)
                table.add_row("unsteered", plain.text.strip())
                table.add_row("steered +evil", steered.text.strip())
                console.print(table)


class PhaseClock:
    """Wall time of each phase of the demo, printed as a table at the end."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.laps.append((name, now - self.last))
        self.last = now
        console.print(f"[dim]{name}: {self.laps[-1][1]:.0f}s[/dim]")
        return self.laps[-1][1]

    def table(self) -> Table:
        table = Table(title="demo phases (wall time)")
        table.add_column("phase")
        table.add_column("seconds", justify="right")
        for name, seconds in self.laps:
            table.add_row(name, f"{seconds:.0f}")
        table.add_row("total", f"{sum(s for _, s in self.laps):.0f}", style="bold")
        return table


def _steering_table(results: list[dict[str, Any]]) -> Table:
    table = Table(
        title="steering: best trait score at coherence >= threshold, delta vs unsteered (95% CI)"
    )
    for column in (
        "trait",
        "steered",
        "vectors",
        "mode",
        "best layer",
        "coef",
        "score",
        "delta",
        "CI",
        "runs",
    ):
        table.add_column(column)
    for r in results:
        best = r.get("best") or {}
        ci = best.get("delta_ci") or {}
        table.add_row(
            str(r.get("trait")),
            str(r.get("target")).rsplit("@", 1)[-1],
            str(r.get("source")).rsplit("@", 1)[-1],
            f"{r.get('mode')}{r.get('direction')}",
            str(best["layer"]) if best.get("layer") is not None else ("all" if best else "-"),
            _fmt(best.get("coefficient")),
            _fmt(best.get("mean_trait")),
            _fmt(best.get("delta")),
            f"[{_fmt(ci.get('low'))}, {_fmt(ci.get('high'))}]"
            if ci.get("low") is not None
            else "-",
            str((r.get("budget") or {}).get("total_runs", "-")),
        )
    return table


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else "-"


async def _collect(run_id: str) -> dict[str, Any]:
    from services.common.store import AsyncS3Store, run_prefix

    store = AsyncS3Store()
    out: dict[str, list[Any]] = {"steer": [], "benchmark": [], "probe": [], "logit_diff": []}
    for key in await store.list_keys(run_prefix(run_id)):
        if not key.endswith("/result.json"):
            continue
        for stage in out:
            if f"/{stage}/" in key:
                out[stage].append(await store.get_json(key))
    return out


async def _fetch_report(run_id: str, target: Path) -> list[Path]:
    from services.cli.report import download_folder
    from services.common.store import run_prefix

    return await download_folder(run_prefix(run_id) + "analysis/", target)


def _print_restarts(home: Path) -> None:
    """What the stack's supervisor restarted during the demo (nothing, normally)."""
    from services.common.localstack.supervisor import restart_lines

    with contextlib.suppress(QsensError):
        stack = localstack.load_stack(home.resolve())
        for line in restart_lines(stack) if stack is not None else []:
            console.print(f"[yellow]restarted by the supervisor:[/yellow] {line}")


@app.command("demo")
def demo(
    spec: Annotated[Path, typer.Option(help="The spec to run.")] = DEMO_SPEC,
    home: Annotated[Path, typer.Option(help="Stack state folder.")] = Path(".qsens/demo"),
    keep: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = False,
    warmup: Annotated[bool, typer.Option(help="Show the quick steering warm-up first.")] = True,
    judge_sample: Annotated[
        int,
        typer.Option(
            min=0,
            help="Steered answers per trait the second judge (SmolLM2 through the loader) "
            "scores next to the study's judge; 0 skips it.",
        ),
    ] = 10,
) -> None:
    """Run the end-to-end study on SmolLM2 (bf16, nf4, int8) and write the report."""
    from services.cli.runs import _submit, _watch, children_for_spec, preflight
    from services.common.spec import load_spec

    try:
        parsed = load_spec(spec)
        preflight(parsed)
    except QsensError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err

    started = time.perf_counter()
    phases = PhaseClock()
    common = settings_mod.get(settings_mod.CommonSettings)
    console.rule("qsens demo")
    try:
        children = children_for_spec(spec, home.resolve())
        stack = localstack.up(home, children=children, force=True)
    except QsensError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    os.environ.update(stack.full_env())
    settings_mod.reset()
    phases.lap("stack up")
    console.print(
        f"stack up in {time.perf_counter() - started:.0f}s: NATS {stack.env['QSENS_NATS_URL']}, "
        f"S3 {stack.env['QSENS_S3_ENDPOINT']}, {len(stack.children)} services; logs in {stack.home}"
    )
    status = "failed"
    try:
        if warmup:
            console.rule("warm-up: steering acts")
            asyncio.run(_warmup(spec))
            phases.lap("warm-up")
        console.rule("study")
        run_id = asyncio.run(_submit(parsed, None))
        console.print(f"run {run_id}")
        status = asyncio.run(_watch(run_id, False))
        phases.lap("study")
        if status == "succeeded" and judge_sample > 0:
            console.rule("a second judge: SmolLM2 (bf16 loader) next to the embedding judge")
            _second_judge(parsed, run_id, judge_sample)
            phases.lap("second judge")
        console.rule(f"results ({status})")
        _show_results(run_id)
        phases.lap("results and report")
    finally:
        _print_restarts(home)
        if not keep:
            localstack.down(home)
            phases.lap("stack down")
        else:
            console.print(
                f'stack left running: eval "$(qsens env --home {home})"; qsens down --home {home}'
            )
        console.print(phases.table())
        console.print(
            f"demo wall time: {time.perf_counter() - started:.0f}s (cache: {common.cache_dir})"
        )
    if status != "succeeded":
        raise typer.Exit(1)


def _show_results(run_id: str) -> None:
    """Print the cosine and steering tables and fetch the report into ``reports/<run>``."""
    from services.cli.runs import collect_results, cosine_table

    console.print(cosine_table(asyncio.run(collect_results(run_id))))
    collected = asyncio.run(_collect(run_id))
    if collected["steer"]:
        console.print(
            _steering_table(
                sorted(
                    collected["steer"],
                    key=lambda r: (str(r.get("trait")), str(r.get("target"))),
                )
            )
        )
    target = Path("reports") / run_id
    files = asyncio.run(_fetch_report(run_id, target))
    _append_agreement(files)
    report = next((f for f in files if f.name == "report.html"), None)
    if report is not None:
        console.print(f"report: {report.resolve()}  (and {report.with_suffix('.md')})")
    else:
        console.print("[yellow]no report was written (see the analyzer log)[/yellow]")


def _second_judge(spec: Any, run_id: str, per_trait: int) -> None:
    """Score a sample of the steered answers with the loader judge on the reference loader,
    store the agreement next to the analysis and print it (a failure is reported, not fatal:
    the study itself succeeded)."""
    try:
        doc = asyncio.run(_agreement(spec, run_id, per_trait))
    except Exception as err:  # the study succeeded: its report must not be lost to this step
        console.print(f"[yellow]second judge skipped:[/yellow] {type(err).__name__}: {err}")
        return
    table = Table(title=f"judge agreement: embedding vs {doc['second_judge']['model']}")
    for column in ("trait", "n", "Spearman", "Pearson", "refusals / unscorable"):
        table.add_column(column)
    for trait, row in doc["traits"].items():
        table.add_row(
            trait,
            str(row["n"]),
            _fmt(row["spearman"]),
            _fmt(row["pearson"]),
            f"{row['refusals']} / {row['unscorable']}",
        )
    console.print(table)
    console.print(f"[dim]{doc['judgments']} judgments, {doc['seconds_per_judgment']} s each[/dim]")


async def _agreement(spec: Any, run_id: str, per_trait: int) -> dict[str, Any]:
    from services.common.loader_registry import LoaderRegistry
    from services.common.natsconn import connection
    from services.common.planner import variants_of
    from services.common.settings import JudgeSettings
    from services.common.store import AsyncS3Store, run_prefix
    from services.extractor.datasets import load_trait
    from services.judge.agreement import (
        agreement_markdown,
        collect_answers,
        judge_agreement,
        sample_answers,
    )
    from services.judge.client import trait_rubric
    from services.loader.capabilities import Needs

    reference = next(v for v in variants_of(spec) if v.precision == spec.reference)
    async with connection(name="qsens-demo-judge") as nc:
        registry = await LoaderRegistry.open(nc.jetstream())
        # The loader judge backend reads next-token log-probs of the score tokens.
        address = await registry.find(reference.id, Needs.of("next_token"))
    store = AsyncS3Store()
    items = sample_answers(await collect_answers(store, run_prefix(run_id)), per_trait)
    rubrics = {t: trait_rubric(load_trait(t).eval_prompt) for t in {i.trait for i in items}}
    settings = JudgeSettings(
        backend="loader",
        loader_address=address,
        variant=reference.id,
        min_numeric_mass=SECOND_JUDGE_MIN_MASS,
    )
    doc = await judge_agreement(items, settings, rubrics)
    markdown = agreement_markdown(doc, f"{spec.judge.backend} backend")
    prefix = run_prefix(run_id) + "analysis/"
    await store.put_json(prefix + AGREEMENT_FILES[0], doc)
    await store.put_bytes(prefix + AGREEMENT_FILES[1], markdown.encode())
    return doc


def _append_agreement(files: list[Path]) -> None:
    """Add the judge-agreement section to the downloaded report (Markdown and HTML)."""
    import html

    section = next((f for f in files if f.name == AGREEMENT_FILES[1]), None)
    if section is None:
        return
    text = section.read_text()
    for f in files:
        if f.name == "report.md":
            f.write_text(f.read_text().rstrip() + "\n\n" + text)
        elif f.name == "report.html":
            body = f.read_text()
            block = f'<section id="judge-agreement"><pre>{html.escape(text)}</pre></section>'
            at = body.rfind("</body>")
            f.write_text(body[:at] + block + body[at:] if at >= 0 else body + block)
