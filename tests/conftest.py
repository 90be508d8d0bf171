"""Shared fixtures: a real NATS (JetStream) and a real SeaweedFS S3 server for the session.

Servers start on free loopback ports in temporary folders the first time a test asks for
them (``nats_server``, ``s3_server``). Tests do not share job-plane state: ``nats_env`` gives
each test its own namespace (subjects, streams and KV buckets), and run ids keep S3 keys
apart in the one bucket. The env fixtures set ``QSENS_*`` variables (inherited by worker
subprocesses) and reset the cached settings before and after the test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from services.common import localstack
from services.common import settings as settings_mod

pytest_plugins = ["tests.fixtures_loader"]

# The fast tier (`make test-fast`, `-m "not slow"`) leaves out what needs more than tiny
# random models, a browser, a git clone, a quantization run or a whole study: these modules,
# and any test that uses one of these fixtures. `make test` runs everything.
SLOW_MODULES = frozenset(
    {
        "tests/analyzer/test_report_browser.py",  # headless Chromium
        "tests/analyzer/test_report_cli.py",  # a whole analysis through the CLI
        "tests/bench/test_bench_scripts.py",  # every bench script end to end
        "tests/cli/test_fresh_clone.py",  # git clone + a CLI process per spec
        "tests/cli/test_run_extraction.py",  # whole studies on a local stack
        "tests/analyzer/test_golden.py",  # the golden study on a local stack (issue 14)
        "tests/common/test_chaos.py",  # a whole study under kills and a frozen S3
        "tests/deploy/test_runtime.py",  # the rendered manifests' processes, for real
        "tests/deploy/test_settings_cli.py",  # every container command line, parsed by the CLI
        "tests/judge/test_loader_integration.py",  # SmolLM2 as a judge
        "tests/judge/test_openai_loader.py",  # SmolLM2 behind the OpenAI endpoint
        "tests/loader/test_gptq_awq.py",  # GPTQ/AWQ quantization of a model
        "tests/loader/test_smollm2.py",  # SmolLM2-135M
        "tests/loader/test_vllm_engine.py",  # vLLM vs HF on SmolLM2 (its own venv)
        "tests/quantize/test_quantize_job.py",  # quantize jobs (gptqmodel)
        "tests/steerer/test_benchmarks.py",  # benchmarks checked against transformers
        "tests/steerer/test_steer.py",  # whole coefficient searches over a loader
        "tests/steerer/test_imported_vectors.py",  # a whole search with an imported vector
        "tests/common/test_cli_stack.py",  # qsens up / down with every child process
        "tests/loader/test_faults.py",  # SIGTERM drains and OOM halving of loader processes
        "tests/loader/test_backpressure.py",  # loaders kept busy for seconds on purpose
        "tests/judge/test_cli.py",  # judge CLI processes and restarts
        "tests/common/test_worker_kill.py",  # SIGKILLed workers and redelivery
        "tests/common/test_dispatch.py",  # workers through NATS restarts and late replies
        "tests/loader/test_quantized.py",  # bitsandbytes' CPU kernels on loaders
        "tests/bench/test_multi_gpu_check.py",  # the multi-GPU check dry-run on CPU labels
        "tests/loader/test_quantized_placement.py",  # a GPTQ checkpoint quantized and split
        "tests/loader/test_tiny_direct.py",  # models built block by block, memory measured
        "tests/steerer/test_held_out.py",  # held-out re-score and noise floor over a stack
        "tests/judge/test_loader_judge.py",  # a tiny judge model trained on the CPU
    }
)
SLOW_FIXTURES = frozenset({"smollm2_bf16", "smollm2_loader_http"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        if module in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# A shell pointed at a running stack (`eval "$(qsens env)"`) exports its loader token and TLS
# files; tests start their own loaders and must not inherit them.
for _name in [n for n in os.environ if n.startswith(("QSENS_LOADER_TOKEN", "QSENS_LOADER_TLS_"))]:
    del os.environ[_name]

# The same numbers on every CPU: by default (``auto``) a CPU with native bf16 matmuls
# (avx512_bf16, amx_bf16) computes bf16 and 4-bit variants in bf16 and one without in float32,
# and the fixtures (the golden run) and the path-equality tolerances are float32's. Tests of
# the auto and native modes set the variable themselves (tests/loader/test_cpu_compute.py);
# loaders started by tests inherit it.
os.environ.setdefault("QSENS_LOADER_CPU_COMPUTE", "float32")


# Job-plane timings short enough for tests; each can be overridden with monkeypatch.setenv
# followed by settings.reset().
FAST_PLANE = {
    "QSENS_NATS_ACK_WAIT_S": "2",
    "QSENS_NATS_MAX_DELIVER": "3",
    "QSENS_NATS_RETRY_BACKOFF_S": "0.1",
    "QSENS_NATS_RETRY_BACKOFF_MAX_S": "0.5",
    "QSENS_NATS_UNAVAILABLE_DELAY_S": "0.2",
    "QSENS_NATS_FETCH_WAIT_S": "1",
    "QSENS_NATS_LOADER_TTL_S": "2",
}


@dataclass
class PlaneEnv:
    """What a test got: its namespace and every variable that was set."""

    namespace: str
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localstack.NatsServer]:
    """A nats-server with JetStream and a generated user; ``.url``, ``.user``, ``.password``."""
    server = localstack.start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop(timeout_s=5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localstack.S3Server]:
    """A SeaweedFS S3 server; ``.endpoint``, ``.access_key``, ``.secret_key``, ``.bucket``."""
    server = localstack.start_seaweedfs(tmp_path_factory.mktemp("s3"), bucket="qsens-test")
    yield server
    # weed can take 15 s to exit on SIGINT; the data is thrown away, so do not wait for it.
    server.stop(timeout_s=1)


def _apply(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings_mod.reset()


@pytest.fixture
def nats_env(
    nats_server: localstack.NatsServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PlaneEnv]:
    """QSENS_NATS_* for the session server, with a namespace of this test's own."""
    namespace = "t" + uuid.uuid4().hex[:12]
    env = {**nats_server.env(), "QSENS_NATS_NAMESPACE": namespace}
    _apply(monkeypatch, env)
    yield PlaneEnv(namespace, env)
    settings_mod.reset()


@pytest.fixture
def s3_env(s3_server: localstack.S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[PlaneEnv]:
    """QSENS_S3_* for the session server (one bucket; keep runs apart by run id)."""
    env = s3_server.env()
    _apply(monkeypatch, env)
    yield PlaneEnv("", env)
    settings_mod.reset()


@pytest.fixture
def plane_env(
    nats_env: PlaneEnv, s3_env: PlaneEnv, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PlaneEnv]:
    """NATS + S3 + short job-plane timings (``FAST_PLANE``): everything a worker needs."""
    _apply(monkeypatch, FAST_PLANE)
    yield PlaneEnv(nats_env.namespace, {**nats_env.env, **s3_env.env, **FAST_PLANE})
    settings_mod.reset()


@pytest.fixture
def run_id() -> str:
    """A fresh run id (keeps S3 keys of different tests apart)."""
    return "run-" + uuid.uuid4().hex[:12]
