"""``qsens up`` / ``env`` / ``status-stack`` / ``down`` end to end, with a real worker child."""

from __future__ import annotations

import asyncio
import shlex
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import stack as stack_cli
from services.common import localstack
from services.common import settings as settings_mod
from services.common.dag import submit
from services.common.jobs import Job, JobKind, RunPlan
from services.common.localstack import ChildSpec
from tests.common.plane import open_plane, wait_status

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def hook() -> Iterator[list[Path]]:
    seen: list[Path] = []

    def children_for_spec(spec: Path, home: Path) -> list[ChildSpec]:
        seen.append(spec)
        code = (
            "from services.common.worker import serve_worker; "
            "serve_worker(['noop'], 'tests.common.handlers:parts')"
        )
        return [ChildSpec(name="worker-noop", argv=[sys.executable, "-c", code], cwd=str(REPO))]

    stack_cli.set_children_hook(children_for_spec)
    yield seen
    stack_cli.set_children_hook(None)


def parse_exports(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        assert line.startswith("export "), line
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0]
    return env


def test_up_env_status_down(
    tmp_path: Path, hook: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    home = tmp_path / "home"
    spec = tmp_path / "spec.yaml"
    spec.write_text("models: []\n")
    monkeypatch.setenv("QSENS_NATS_NAMESPACE", "cli" + uuid.uuid4().hex[:8])
    monkeypatch.setenv("QSENS_NATS_ACK_WAIT_S", "2")
    monkeypatch.setenv("QSENS_NATS_FETCH_WAIT_S", "1")
    settings_mod.reset()
    result = runner.invoke(stack_cli.app, ["up", "--home", str(home), "--spec", str(spec)])
    try:
        assert result.exit_code == 0, result.output
        assert hook == [spec]
        assert "NATS  nats://127.0.0.1:" in result.output
        assert "worker-noop" in result.output

        again = runner.invoke(stack_cli.app, ["up", "--home", str(home)])
        assert again.exit_code == 1
        assert "already running" in again.output

        exported = runner.invoke(stack_cli.app, ["env", "--home", str(home)])
        assert exported.exit_code == 0, exported.output
        env = parse_exports(exported.output)
        assert env["QSENS_NATS_URL"].startswith("nats://127.0.0.1:")
        assert env["QSENS_NATS_PASSWORD"] and env["QSENS_S3_SECRET_KEY"]
        assert env["QSENS_S3_SECRET_KEY"] not in (home / "stack.json").read_text()
        assert oct((home / "credentials.env").stat().st_mode)[-3:] == "600"

        status = runner.invoke(stack_cli.app, ["status-stack", "--home", str(home)])
        assert status.exit_code == 0, status.output
        for name in ("nats", "s3", "worker-noop"):
            assert name in status.output
        assert "GONE" not in status.output

        # The stack serves real work: its worker child runs a submitted job.
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings_mod.reset()
        run_id = "cli-" + uuid.uuid4().hex[:8]
        job = Job(kind=JobKind.NOOP, run_id=run_id, params={"parts": 1})

        async def run_one() -> str:
            async with open_plane() as plane:
                await submit(RunPlan(run_id=run_id, spec_hash="cli", jobs=[job]))
                return (await wait_status(plane.state, run_id, ["succeeded", "failed"], 30)).status

        assert asyncio.run(run_one()) == "succeeded"
    finally:
        down = runner.invoke(stack_cli.app, ["down", "--home", str(home), "--grace", "2"])
        settings_mod.reset()
    assert down.exit_code == 0, down.output
    assert "nats: stopped" in down.output
    assert "worker-noop: stopped" in down.output
    assert not (home / "stack.json").exists()
    assert not (home / "credentials.env").exists()
    assert (home / "s3" / "data").is_dir()  # data survives down
    assert localstack.load_stack(home) is None
    gone = runner.invoke(stack_cli.app, ["env", "--home", str(home)])
    assert gone.exit_code == 1
    assert "no stack running" in gone.output
