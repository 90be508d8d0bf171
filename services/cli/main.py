"""The ``qsens`` command. Sub-commands live in their own modules and are imported lazily."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="qsens",
    help="Measure how quantization changes an LLM's trait vectors.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from services.cli import (
        data,
        demo,
        judge_cmd,
        models,
        report,
        runs,
        serve,
        stack,
        vectors,
        worker,
    )

    app.add_typer(serve.app, name="serve")
    app.add_typer(stack.app)  # top level: qsens up / down / env / status-stack
    app.add_typer(judge_cmd.app, name="judge")
    app.add_typer(worker.app, name="worker")
    app.add_typer(runs.app)  # top level: qsens plan / run / status / runs / results / cancel
    app.add_typer(demo.app)  # top level: qsens demo
    app.add_typer(report.app)  # top level: qsens report
    app.add_typer(data.app, name="data")
    app.add_typer(models.app, name="models")
    app.add_typer(vectors.app, name="vectors")
    stack.set_children_hook(runs.children_for_spec)


def main() -> None:
    """Console-script entry point."""
    _register()
    app()


if __name__ == "__main__":
    main()
