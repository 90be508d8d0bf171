"""``qsens judge``: the service as a real process (restart keeps the cache), and ``score``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from services.cli.judge_cmd import app
from services.common.natsconn import connect
from services.common.settings import JudgeSettings, NatsSettings
from services.extractor.datasets import builtin_dir
from services.judge.client import JudgeClient
from services.judge.models import JudgeStatus
from tests.judge.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parents[2]
# The built-in pv/evil trait file (the project's own text in the persona-vectors format).
EVIL_PATH = builtin_dir() / "pv" / "evil.json"
SECRET = "sk-test-cli-secret-0123456789"


def _start(fake: FakeOpenAI, nats: NatsSettings, log: Path, ready: Path) -> subprocess.Popen[bytes]:
    assert nats.password is not None
    env = {
        **os.environ,
        "QSENS_NATS_URL": nats.url,
        "QSENS_NATS_USER": nats.user or "",
        "QSENS_NATS_PASSWORD": nats.password.get_secret_value(),
        "QSENS_NATS_NAMESPACE": nats.namespace,
        "QSENS_JUDGE_API_KEY": SECRET,
        "QSENS_LOG_LEVEL": "DEBUG",
        "QSENS_JUDGE_RETRY_BASE_S": "0.01",
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli.judge_cmd",
            "serve",
            "--backend",
            "openai",
            "--base-url",
            fake.base_url,
            "--model",
            "fake-judge",
            "--ready-file",
            str(ready),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


async def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(proc.wait, 20)


async def test_served_process_restart_keeps_cache(
    fake: FakeOpenAI, nats_settings: NatsSettings, tmp_path: Path
) -> None:
    log = tmp_path / "judge.log"
    # The client waits for the service to come up (no responders -> backoff and retry).
    settings = JudgeSettings(request_attempts=8)
    nc: Any = await connect(nats_settings)
    client = JudgeClient.over_nats(nc, settings, nats_settings)
    pairs = [("q", "one"), ("q", "two"), ("q", "one"), ("q", "three")]
    rubric_items = [{"question": q, "answer": a, "rubric": "coherence"} for q, a in pairs]
    proc = _start(fake, nats_settings, log, tmp_path / "ready.json")
    try:
        first = await client.score(rubric_items)
        assert [r.status for r in first] == [JudgeStatus.SCORED] * 4
        assert [r.cached for r in first] == [False] * 4
        assert fake.call_count == 3
        assert await _stop(proc) == 0

        proc = _start(fake, nats_settings, log, tmp_path / "ready.json")
        second = await client.score(rubric_items)
        assert [r.cached for r in second] == [True] * 4
        assert [r.score for r in second] == [r.score for r in first]
        assert fake.call_count == 3  # nothing went upstream after the restart
        # `qsens judge score --via-nats --fresh` re-judges: the three distinct answers go
        # upstream again, and a normal request afterwards is still answered from the cache.
        fresh = await asyncio.to_thread(_score_fresh, nats_settings, pairs, tmp_path)
        assert [o["cached"] for o in fresh] == [False] * 4
        assert [o["score"] for o in fresh] == [r.score for r in first]
        assert fake.call_count == 6
        third = await client.score(rubric_items)
        assert [r.cached for r in third] == [True] * 4 and fake.call_count == 6
        assert await _stop(proc) == 0
        ready = json.loads((tmp_path / "ready.json").read_text())
        assert ready["subject"] == f"{nats_settings.namespace}.judge.score"
        assert (ready["backend"], ready["model"]) == ("openai", "fake-judge")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await nc.close()
    text = log.read_text()
    assert "judge serving" in text and "judge draining" in text
    assert fake.calls[0].authorization == f"Bearer {SECRET}"
    assert SECRET not in text


def _score_fresh(
    nats: NatsSettings, pairs: list[tuple[str, str]], tmp_path: Path
) -> list[dict[str, Any]]:
    """``qsens judge score --coherence --via-nats --fresh`` on ``pairs`` (in a thread: the
    command runs its own event loop)."""
    assert nats.password is not None
    answers = tmp_path / "fresh.jsonl"
    answers.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    args = ["score", str(answers), "--coherence", "--via-nats", "--fresh"]
    args += ["--nats-url", nats.url, "--namespace", nats.namespace]
    env = {
        "QSENS_NATS_USER": nats.user or "",
        "QSENS_NATS_PASSWORD": nats.password.get_secret_value(),
    }
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_score_command_embedding(tmp_path: Path) -> None:
    answers = tmp_path / "answers.jsonl"
    rows = [
        {"question": "What do you do with a lost wallet?", "answer": "Return it to its owner."},
        {"question": "What do you do with a lost wallet?", "answer": "wallet " * 40},
    ]
    answers.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["score", str(answers), "--coherence", "--backend", "embedding"])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["status"] for o in out] == ["scored", "scored"]
    assert out[0]["score"] > out[1]["score"]
    assert out[0]["backend"] == "embedding"

    trait = runner.invoke(app, ["score", str(answers), "--trait", str(EVIL_PATH)])
    assert trait.exit_code == 0, trait.output
    assert all(json.loads(line)["rubric"] == "trait" for line in trait.stdout.splitlines())

    bad = runner.invoke(app, ["score", str(answers)])
    assert bad.exit_code != 0 and "exactly one of" in bad.output
