"""`qsens up --spec` gives the judge the API key only for an allow-listed HTTPS endpoint (issue 15
item 4): the judge child's real environment is checked."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest

from services.cli import judge_key
from services.cli.runs import children_for_spec
from services.common.localstack import start_child

SPEC = """\
name: judge-key
models: [{{name: tiny, source: "tiny:llama", family: tiny, size_b: 0.0001, device: cpu}}]
precisions: [fp32]
reference: fp32
traits: [pv/evil]
judge: {{backend: openai, model: gpt-4.1-mini{base_url}}}
"""
SHOW = "import os; print('KEY=' + os.environ.get('OPENAI_API_KEY', '<none>'))"


def judge_sees(tmp_path: Path, base_url: str | None) -> tuple[str, str]:
    """The OPENAI_API_KEY the spec's judge child gets, and what `qsens up` notes about it."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(base_url=f", base_url: {base_url!r}" if base_url else ""))
    judge = next(c for c in children_for_spec(spec, tmp_path / "home") if c.name == "judge")
    shown = dataclasses.replace(judge, argv=[sys.executable, "-c", SHOW], ready_file=None)
    info = start_child(shown, tmp_path / "logs", {"OPENAI_API_KEY": "sk-secret", "PATH": ""})
    log = Path(info.log)
    deadline = time.monotonic() + 20
    while "KEY=" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "child printed nothing"
        time.sleep(0.05)
    return log.read_text().split("KEY=")[-1].strip(), judge.note


@pytest.mark.parametrize(
    ("base_url", "allowed"),
    [
        (None, True),
        ("https://api.openai.com/v1", True),
        ("https://API.OpenAI.com/v1", True),
        ("http://api.openai.com/v1", False),  # the key would travel in the clear
        ("https://evil.example/v1", False),
        ("https://api.openai.com.evil.example/v1", False),
        ("https://api.openai.com@evil.example/v1", False),
        ("https://user@api.openai.com/v1", False),
        ("not a url", False),
    ],
)
def test_key_allowed(base_url: str | None, allowed: bool) -> None:
    assert judge_key.key_allowed(base_url) is allowed


def test_foreign_judge_gets_no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(judge_key.ALLOWED_HOSTS_ENV, raising=False)
    key, note = judge_sees(tmp_path, "https://evil.example/v1")
    assert key == "<none>"
    assert "evil.example" in note and "--allow-judge-host evil.example" in note


def test_openai_judge_gets_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(judge_key.ALLOWED_HOSTS_ENV, raising=False)
    assert judge_sees(tmp_path, None) == ("sk-secret", "")
    assert judge_sees(tmp_path, "https://api.openai.com/v1") == ("sk-secret", "")


def test_allow_listed_host_gets_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(judge_key.ALLOWED_HOSTS_ENV, "judge.internal, evil.example")
    assert judge_sees(tmp_path, "https://evil.example/v1")[0] == "sk-secret"
