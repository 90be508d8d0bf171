"""``qsens up`` / ``down`` / ``env`` / ``status-stack``: the local stack as CLI commands.

The commands are registered at the top level of ``qsens`` (``app.add_typer(stack.app)``).
Which loaders and workers a spec needs is decided elsewhere: ``set_children_hook`` installs a
``children_for_spec(spec_path, home) -> list[ChildSpec]``; without one, ``up`` starts the servers only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from services.cli import judge_key
from services.common import localstack
from services.common import settings as settings_mod
from services.common.errors import QsensError
from services.common.localstack import ChildSpec
from services.common.settings import CommonSettings, S3Settings

__all__ = ["ChildrenHook", "app", "set_children_hook"]

ChildrenHook = Callable[[Path, Path], list[ChildSpec]]

app = typer.Typer(help="The local stack: NATS + S3 on loopback, plus loaders and workers.")

_children_hook: ChildrenHook | None = None


def set_children_hook(hook: ChildrenHook | None) -> None:
    """Install the function that lists the child processes a spec needs (None removes it)."""
    global _children_hook
    _children_hook = hook


HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home", help="State folder (default: QSENS_HOME, else .qsens).", show_default=False
    ),
]


def _home(home: Path | None) -> Path:
    return home if home is not None else settings_mod.get(CommonSettings).home


def _fail(err: QsensError) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1)


@app.command("up")
def up(
    home: HomeOption = None,
    spec: Annotated[
        Path | None,
        typer.Option(help="Experiment spec: also start the loaders and workers it needs."),
    ] = None,
    nats_port: Annotated[int, typer.Option(help="NATS port (0: a free port).")] = 0,
    s3_port: Annotated[int, typer.Option(help="S3 port (0: a free port).")] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Clean up a stale stack state first.")
    ] = False,
    allow_judge_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-judge-host",
            help="Also give the API key to a judge at this HTTPS host (besides api.openai.com).",
        ),
    ] = None,
) -> None:
    """Start a private NATS (JetStream) and S3 (SeaweedFS) server on loopback, supervised:
    a process that dies is restarted with back-off (`qsens status-stack` shows restarts)."""
    folder = _home(home)
    children: list[ChildSpec] = []
    if allow_judge_host:
        # Read by judge_key when the children are listed, and inherited by the supervisor.
        listed = [os.environ.get(judge_key.ALLOWED_HOSTS_ENV, ""), *allow_judge_host]
        os.environ[judge_key.ALLOWED_HOSTS_ENV] = ",".join(h for h in listed if h)
    if spec is not None:
        if not spec.is_file():
            typer.echo(f"error: spec file {spec} does not exist", err=True)
            raise typer.Exit(1)
        if _children_hook is None:
            typer.echo("note: no loaders/workers are wired for specs yet; starting servers only")
        else:
            try:
                children = _children_hook(spec, folder.resolve())
            except QsensError as err:
                raise _fail(err) from err
    try:
        stack = localstack.up(
            folder,
            nats_port=nats_port,
            s3_port=s3_port,
            bucket=settings_mod.get(S3Settings).bucket,
            children=children,
            force=force,
        )
    except QsensError as err:
        _echo_restarts(folder)  # a stack already running: what its supervisor restarted
        raise _fail(err) from err
    typer.echo(f"NATS  {stack.env['QSENS_NATS_URL']}  (pid {stack.nats.pid})")
    typer.echo(
        f"S3    http://{stack.env['QSENS_S3_ENDPOINT']}  bucket {stack.env['QSENS_S3_BUCKET']}"
        f"  (pid {stack.s3.pid})"
    )
    notes = {c.name: c.note for c in children}
    for child in stack.children:
        typer.echo(f"{child.name:<5} pid {child.pid}  log {child.log}")
        if notes.get(child.name):
            typer.echo(f"      {notes[child.name]}")
    if stack.supervisor is not None:
        typer.echo(
            f"supervisor pid {stack.supervisor.pid}: restarts any of these that dies, with "
            "back-off (restarts: `qsens status-stack`)"
        )
    typer.echo(f"state and logs in {stack.home}")
    typer.echo(f'use it from a shell: eval "$(qsens env --home {stack.home})"')


def _echo_restarts(folder: Path) -> None:
    from services.common.localstack.supervisor import restart_lines

    try:
        stack = localstack.load_stack(folder.resolve())
    except QsensError:
        return
    for line in restart_lines(stack) if stack is not None else []:
        typer.echo(f"restarted: {line}")


@app.command("down")
def down(
    home: HomeOption = None,
    grace: Annotated[
        float | None,
        typer.Option(help="Seconds each process gets to stop before SIGKILL (default: its own)."),
    ] = None,
) -> None:
    """Stop the stack's children and servers (data under the home folder is kept)."""
    folder = _home(home)
    try:
        outcomes = localstack.down(folder, timeout_s=grace)
    except QsensError as err:
        raise _fail(err) from err
    if not outcomes:
        typer.echo(f"no stack recorded in {folder.resolve()}")
        return
    for name, outcome in outcomes:
        typer.echo(f"{name}: {outcome}")


@app.command("env")
def env(home: HomeOption = None) -> None:
    """Print ``export QSENS_...`` lines for the running stack (use with eval)."""
    folder = _home(home)
    try:
        stack = localstack.load_stack(folder.resolve())
    except QsensError as err:
        raise _fail(err) from err
    if stack is None:
        typer.echo(f"error: no stack running in {folder.resolve()} (start one: qsens up)", err=True)
        raise typer.Exit(1)
    for line in stack.export_lines():
        typer.echo(line)


@app.command("status-stack")
def status_stack(home: HomeOption = None) -> None:
    """Show the stack's processes and whether each is alive."""
    folder = _home(home)
    try:
        rows = localstack.status(folder.resolve())
    except QsensError as err:
        raise _fail(err) from err
    if not rows:
        typer.echo(f"no stack recorded in {folder.resolve()}")
        raise typer.Exit(1)
    dead = 0
    supervised = False
    for info, alive in rows:
        dead += int(not alive)
        supervised |= info.name == "supervisor" and alive
        state = "running" if alive else "GONE"
        restarts = f"{info.restarts} restarts" if info.restarts else ""
        typer.echo(f"{info.name:<28} pid {info.pid:<8} {state:<8} {restarts:<11} {info.log}")
        if info.last_exit:
            typer.echo(f"{'':<28} last exit: {info.last_exit}")
    if dead and supervised:
        typer.echo("the supervisor restarts the processes that are gone (with back-off)")
    elif dead:
        typer.echo("some processes are gone: `qsens down` cleans up, `qsens up --force` restarts")
        raise typer.Exit(1)
