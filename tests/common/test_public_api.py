"""The job plane's public surface is what we meant, and importing it does nothing."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

EXPECTED = {
    "services.common.jobs": {
        "RUN_ID_PATTERN",
        "Job",
        "JobKind",
        "RunPlan",
        "parse_job",
        "validate_run_id",
    },
    "services.common.natsconn": {
        "PlaneNames",
        "connect",
        "connection",
        "ensure_kv",
        "kv_values",
        "plane_names",
    },
    "services.common.queue": {"DeadLetter", "JobQueue", "retry_delay"},
    "services.common.handlers": {
        "Handler",
        "HandlerRegistry",
        "JobContext",
        "KindHandler",
        "dispatch",
        "registry_handler",
    },
    "services.common.worker": {"WorkerStats", "load_handler", "run_worker", "serve_worker"},
    "services.common.state": {
        "ACTIVE_STATES",
        "TERMINAL_STATES",
        "JobRecord",
        "JobState",
        "RunRecord",
        "RunSummary",
        "StateStore",
    },
    "services.common.dag": {
        "SUBMIT",
        "SubmitResult",
        "cancel_run",
        "plan_key",
        "release_dependents",
        "retry_dead",
        "submit",
        "submit_with",
    },
    "services.common.store": {
        "AsyncS3Store",
        "S3Store",
        "StoredObject",
        "check_key",
        "run_key",
        "run_prefix",
    },
    "services.common.loader_registry": {
        "Announcement",
        "LoaderEntry",
        "LoaderRegistry",
        "LoaderStarting",
        "LoaderState",
        "NoLoader",
        "SupervisedLoader",
        "SupervisedLoaders",
        "announce_forever",
        "variant_token",
    },
    "services.common.localstack": {
        "NATS_BINARY",
        "WEED_BINARY",
        "ChildSpec",
        "NatsServer",
        "ProcessInfo",
        "S3Server",
        "Stack",
        "check_port_free",
        "down",
        "find_binary",
        "free_ports",
        "load_stack",
        "process_alive",
        "remove_weed_sockets",
        "start_child",
        "start_nats",
        "start_seaweedfs",
        "status",
        "stop_process",
        "up",
        "write_ready_file",
    },
    "services.cli.stack": {"ChildrenHook", "app", "set_children_hook"},
}


@pytest.mark.parametrize("module_name", sorted(EXPECTED))
def test_exported_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert set(module.__all__) == EXPECTED[module_name]
    for name in module.__all__:
        assert hasattr(module, name), name


def test_importing_the_job_plane_has_no_side_effects() -> None:
    # No environment is read and nothing connects at import: with settings that point
    # nowhere, importing every module must still succeed at once.
    code = "import " + ", ".join(sorted(EXPECTED)) + "; print('ok')"
    env = {
        "PATH": "/usr/bin:/bin",
        "QSENS_NATS_URL": "nats://192.0.2.1:1",
        "QSENS_NATS_ACK_WAIT_S": "bad",
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
