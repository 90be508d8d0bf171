"""``qsens judge``: run a judge service on NATS, or score a file of answers.

    qsens judge serve [--backend openai --base-url URL --model M] [--loader-address H:P]
    qsens judge serve --backend loader --loader-address H:P [--loader-variant MODEL@PRECISION]
    qsens judge score answers.jsonl (--trait trait.json | --coherence) [--via-nats]

Options override ``QSENS_JUDGE_*`` / ``QSENS_NATS_*`` settings; the API key is only ever read
from the environment or a secret file (``QSENS_JUDGE_API_KEY[_FILE]``, ``OPENAI_API_KEY``),
never from the command line, where it would show in process listings.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="judge",
    help="The judge: score answers 0-100 for a trait or for coherence.",
    no_args_is_help=True,
)

Backend = Annotated[
    str | None,
    typer.Option("--backend", help="openai, embedding or loader (QSENS_JUDGE_BACKEND)."),
]
BaseUrl = Annotated[
    str | None, typer.Option("--base-url", help="OpenAI-compatible base URL, e.g. a loader's.")
]
Model = Annotated[str | None, typer.Option("--model", help="Judge model name.")]
LoaderAddress = Annotated[
    str | None,
    typer.Option(
        "--loader-address",
        help="host:port of a loader: the loader backend's judge, the embedding backend's "
        "coherence perplexity.",
    ),
]
LoaderVariant = Annotated[
    str | None,
    typer.Option(
        "--loader-variant",
        help="loader backend: the variant that must judge (model@precision); refused when the "
        "loader serves another.",
    ),
]
EndOfTurn = Annotated[
    str | None,
    typer.Option("--end-of-turn", help="loader backend: the token that ends an answer."),
]
NatsUrl = Annotated[str | None, typer.Option("--nats-url", help="NATS server URL.")]
Namespace = Annotated[
    str | None, typer.Option("--namespace", help="Job-plane namespace (subjects, buckets).")
]


def _settings(**overrides: Any) -> Any:
    from services.common.settings import JudgeSettings, get

    values = {k: v for k, v in overrides.items() if v is not None}
    return JudgeSettings(**values) if values else get(JudgeSettings)


def _nats_settings(url: str | None, namespace: str | None) -> Any:
    from services.common.settings import NatsSettings, get

    values: dict[str, Any] = {
        k: v for k, v in {"url": url, "namespace": namespace}.items() if v is not None
    }
    return NatsSettings(**values) if values else get(NatsSettings)


def _configure_logging() -> None:
    from services.common.logging import configure_logging
    from services.common.settings import CommonSettings, get

    common = get(CommonSettings)
    configure_logging("judge", common.log_level, common.log_format)


@app.command()
def serve(
    backend: Backend = None,
    base_url: BaseUrl = None,
    model: Model = None,
    loader_address: LoaderAddress = None,
    loader_variant: LoaderVariant = None,
    end_of_turn: EndOfTurn = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", min=1, help="Upstream calls in flight.")
    ] = None,
    nats_url: NatsUrl = None,
    namespace: Namespace = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", min=0, help="Prometheus port (0 off).")
    ] = None,
    ready_file: Annotated[
        Path | None, typer.Option("--ready-file", help="Write subject/backend/model JSON here.")
    ] = None,
) -> None:
    """Serve judge requests on NATS until SIGTERM (finishes requests in flight)."""
    from services.judge.service import run_judge_service

    _configure_logging()
    settings = _settings(
        backend=backend,
        base_url=base_url,
        model=model,
        loader_address=loader_address,
        variant=loader_variant,
        end_of_turn=end_of_turn,
        concurrency=concurrency,
    )
    asyncio.run(
        run_judge_service(
            settings,
            nats_settings=_nats_settings(nats_url, namespace),
            metrics_port=metrics_port,
            ready_file=ready_file,
        )
    )


def _read_trait(path: Path) -> Any:
    """A trait rubric from JSON: ``eval_prompt`` plus ``exemplars`` ({pos, neg} or
    {positive, negative}); a persona-vectors file's ``instruction`` pairs serve as exemplars
    when it has none."""
    from services.judge.client import trait_rubric

    data = json.loads(path.read_text())
    if "eval_prompt" not in data:
        raise typer.BadParameter(f"{path} has no eval_prompt", param_hint="--trait")
    exemplars = data.get("exemplars") or {}
    positive = exemplars.get("positive", exemplars.get("pos"))
    negative = exemplars.get("negative", exemplars.get("neg"))
    if positive is None and data.get("instruction"):
        positive = [pair["pos"] for pair in data["instruction"]]
        negative = [pair["neg"] for pair in data["instruction"]]
    return trait_rubric(data["eval_prompt"], positive, negative)


@app.command()
def score(
    answers: Annotated[Path, typer.Argument(help="JSONL of {question, answer}; '-' reads stdin.")],
    trait: Annotated[
        Path | None, typer.Option("--trait", help="Trait JSON with eval_prompt (and exemplars).")
    ] = None,
    coherence: Annotated[bool, typer.Option("--coherence", help="Score coherence.")] = False,
    via_nats: Annotated[
        bool, typer.Option("--via-nats", help="Ask the judge services on NATS.")
    ] = False,
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh",
            help="Re-judge: the backend scores every answer again; cached verdicts are neither "
            "used nor replaced.",
        ),
    ] = False,
    backend: Backend = None,
    base_url: BaseUrl = None,
    model: Model = None,
    loader_address: LoaderAddress = None,
    loader_variant: LoaderVariant = None,
    nats_url: NatsUrl = None,
    namespace: Namespace = None,
) -> None:
    """Score answers and print one JSON result per line, in input order."""
    if (trait is None) == (not coherence):
        raise typer.BadParameter("give exactly one of --trait FILE or --coherence")
    lines = (sys.stdin if str(answers) == "-" else answers.open()).read().splitlines()
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "question" not in row or "answer" not in row:
            raise typer.BadParameter(f"line {number}: needs question and answer")
        pairs.append((str(row["question"]), str(row["answer"])))
    rubric = _read_trait(trait) if trait is not None else None
    settings = _settings(
        backend=backend,
        base_url=base_url,
        model=model,
        loader_address=loader_address,
        variant=loader_variant,
    )
    results = asyncio.run(
        _score(pairs, rubric, settings, via_nats, _nats_settings(nats_url, namespace), fresh)
    )
    for result in results:
        typer.echo(result.model_dump_json())


async def _score(
    pairs: list[tuple[str, str]],
    rubric: Any,
    settings: Any,
    via_nats: bool,
    nats_settings: Any,
    fresh: bool = False,
) -> list[Any]:
    from services.judge.client import JudgeClient

    nc = None
    if via_nats:
        from services.common.natsconn import connect

        nc = await connect(nats_settings, name="qsens-judge-cli")
    try:
        if nc is not None:
            client = JudgeClient.over_nats(nc, settings, nats_settings)
        else:
            client = await JudgeClient.direct(settings)
        try:
            if rubric is None:
                return await client.score_coherence(pairs, fresh=fresh)
            return await client.score_trait(pairs, rubric, trait="trait", fresh=fresh)
        finally:
            await client.close()
    finally:
        if nc is not None:
            await nc.drain()


if __name__ == "__main__":
    app()
