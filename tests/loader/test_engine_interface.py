"""The engine interface and its registry: the transformers engine's capabilities in Info,
another engine registered without touching the server (served over real gRPC on loopback),
capability refusals with FAILED_PRECONDITION, batch invariance as claimed, health, and the
preflight of the backend registry."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.planner import check_precisions
from services.common.settings import LoaderSettings
from services.common.spec import parse_spec
from services.common.variants import Precision
from services.loader.backends import registry
from services.loader.backends.base import LoadedModel
from services.loader.capabilities import EngineCapabilities
from services.loader.client import LoaderClient
from services.loader.engine import Engine, EngineItem, GenParams, ScoreInput
from services.loader.engines.hf.engine import HFEngine
from services.loader.pb import loader_pb2 as pb
from services.loader.pb import loader_pb2_grpc as pb_grpc
from services.loader.positions import parse_position
from services.loader.server import RunningServer, build_runtime, start_server
from services.loader.steering import SteerSpec
from tests.loader_procs import REPO

TINY = "tiny:llama?layers=4"


class PromptOnlyEngine(HFEngine):
    """A second engine: the transformers engine claiming less (no steering, prompt captures
    only), as an engine such as vLLM would; registered by name, never named by the server."""

    name = "prompt-only"

    def __init__(self, loaded: LoadedModel, settings: LoaderSettings, precision: Precision) -> None:
        super().__init__(loaded, settings, precision)
        self.capabilities = EngineCapabilities(
            engine=self.name,
            batch_invariant=False,
            graphable=False,
            supports_steering=False,
            captures=frozenset({("prompt", "last"), ("prompt", "mean")}),
            rpcs=frozenset({"capture", "generate"}),
        )


@pytest.fixture
def prompt_only_registered() -> Iterator[None]:
    engines, backends = dict(registry.ENGINES), dict(registry.BACKENDS)
    registry.register_engine("prompt-only", registry.EngineEntry(f"{__name__}:PromptOnlyEngine"))
    registry.register_backend(
        registry.BackendEntry(
            "prompt-only",
            "prompt-only",
            frozenset({Precision.FP32}),
            "services.loader.backends.hf:HFBackend",
        )
    )
    try:
        yield
    finally:
        registry.ENGINES.clear()
        registry.ENGINES.update(engines)
        registry.BACKENDS.clear()
        registry.BACKENDS.update(backends)


@pytest.fixture(scope="module")
def hf_engine() -> Engine:
    return build_runtime(TINY, "fp32", device="cpu").engine


@contextlib.asynccontextmanager
async def _serve(runtime: Any) -> AsyncIterator[tuple[RunningServer, pb_grpc.LoaderServiceStub]]:
    running = await start_server(runtime, host="127.0.0.1", port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield running, pb_grpc.LoaderServiceStub(channel)
    finally:
        await channel.close()
        await running.drain(0)


def _item(text: str = "hello") -> pb.Item:
    return pb.Item(chat=pb.Conversation(messages=[pb.Message(role="user", content=text)]))


# ---------------------------------------------------------------------- registry
def test_default_backends_run_on_the_hf_engine() -> None:
    for precision, name in registry.DEFAULT_BACKEND.items():
        entry = registry.resolve_backend(precision)
        # fp8 is vLLM's online quantization: no transformers backend serves it.
        engine = "vllm" if precision is Precision.FP8 else "hf"
        assert (entry.name, entry.engine) == (name, engine)
        assert precision in entry.precisions
    assert registry.resolve_backend(Precision.NF4, engine="hf").name == "bnb"


@pytest.mark.parametrize(
    ("precision", "backend", "engine", "field", "message"),
    [
        (Precision.BF16, "nope", None, "backend", "unknown backend 'nope'"),
        (Precision.NF4, "hf", None, "precision", "serves bf16 fp16 fp32, not nf4"),
        (Precision.BF16, None, "vllm-missing", "engine", "unknown engine 'vllm-missing'"),
    ],
)
def test_resolving_names_the_bad_field(
    precision: Precision, backend: str | None, engine: str | None, field: str, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as err:
        registry.resolve_backend(precision, backend, engine)
    assert err.value.field == field


def test_a_backend_on_another_engine_is_chosen_by_engine_name(
    prompt_only_registered: None,
) -> None:
    assert registry.resolve_backend(Precision.FP32, engine="prompt-only").name == "prompt-only"
    assert registry.resolve_backend(Precision.FP32).name == "hf"  # defaults unchanged
    with pytest.raises(InvalidArgument, match="runs on engine 'prompt-only', not 'hf'"):
        registry.resolve_backend(Precision.FP32, "prompt-only", "hf")
    with pytest.raises(InvalidArgument, match="no backend serves bf16 on engine 'prompt-only'"):
        registry.resolve_backend(Precision.BF16, engine="prompt-only")
    with pytest.raises(InvalidArgument, match="unknown engine 'absent'"):
        registry.register_backend(registry.BackendEntry("x", "absent", frozenset({Precision.FP32})))


def test_preflight_checks_the_backend_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"name": "p", "traits": ["caa/sycophancy"], "precisions": ["bf16", "nf4"]}
    model = {"name": "m", "source": TINY}
    check_precisions(parse_spec({**base, "models": [model]}))
    with pytest.raises(InvalidArgument, match="m@bf16: unknown backend 'nope'") as err:
        check_precisions(parse_spec({**base, "models": [{**model, "backend": "nope"}]}))
    assert err.value.field == "models[0].backend"
    with pytest.raises(InvalidArgument, match="m@nf4: backend 'hf' serves") as err:
        check_precisions(parse_spec({**base, "models": [{**model, "backend": "hf"}]}))
    assert err.value.field == "models[0].precisions"
    # An engine whose package is missing here is refused before anything runs.
    monkeypatch.setitem(
        registry.ENGINES,
        "hf",
        dataclasses.replace(registry.ENGINES["hf"], packages=("absent_pkg",)),
    )
    with pytest.raises(InvalidArgument, match="absent_pkg") as err:
        check_precisions(parse_spec({**base, "models": [model]}))
    assert err.value.field == "models[0].precisions"


# ---------------------------------------------------------------------- the hf engine
def test_hf_engine_capabilities_and_health(hf_engine: Engine) -> None:
    caps = hf_engine.capabilities
    assert isinstance(hf_engine, HFEngine) and caps.engine == "hf"
    assert caps.batch_invariant and caps.supports_steering and not caps.graphable  # a CPU
    assert len(caps.captures) == 9 and caps.rpcs == {"generate", "capture", "score", "next_token"}
    assert hf_engine.health().ok
    assert set(hf_engine.counters()) == {"oom_retries", "graphs_recorded", "graph_replays"}


def test_health_reports_weights_that_were_never_loaded() -> None:
    engine = build_runtime(TINY, "fp32", device="cpu").engine
    assert isinstance(engine, HFEngine)
    head = engine.model.get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.empty(head.weight.shape, device="meta"))
    health = engine.health()
    assert not health.ok and "meta" in health.detail


def test_rows_are_batch_invariant_as_claimed(hf_engine: Engine) -> None:
    """The flag's claim for score and next token (generation: test_fastgen.py)."""
    prompts = ["Hi", "A much longer prompt about lighthouses and the sea", "Colour?"]
    items = [EngineItem(hf_engine.encode_prompt(p, "x")) for p in prompts]
    steer = SteerSpec((1,), torch.linspace(-1, 1, hf_engine.hidden_size), 2.0)
    items[2].steering = [steer]
    batched = hf_engine.next_token(items, top_k=5, token_ids=[3])
    for item, row in zip(items, batched, strict=True):
        (alone,) = hf_engine.next_token([item], top_k=5, token_ids=[3])
        np.testing.assert_allclose(row.requested_logits, alone.requested_logits, atol=1e-5)
        assert [t for t, _s, _lp in row.top] == [t for t, _s, _lp in alone.top]
    conts = [hf_engine.encode_text(t) for t in (" sea", " blue light")]
    scored = [ScoreInput(it.prompt_ids, conts, [4, 11], list(it.steering)) for it in items]
    together = hf_engine.score(scored)
    for inp, row_scores in zip(scored, together, strict=True):
        (alone_scores,) = hf_engine.score([inp])
        np.testing.assert_allclose(
            [s.logprob for s in row_scores], [s.logprob for s in alone_scores], atol=1e-5
        )


async def test_info_reports_the_engine_and_its_capabilities() -> None:
    runtime = build_runtime(TINY, "fp32", device="cpu")
    async with _serve(runtime) as (running, stub):
        info = await stub.Info(pb.InfoRequest())
        async with LoaderClient(f"127.0.0.1:{running.port}") as client:
            read_back = await client.info()
    # The client reads back exactly what the engine declared.
    assert read_back.engine == "hf" and read_back.capabilities == runtime.engine.capabilities
    assert info.engine == "hf" and info.backend == "hf"
    caps = info.capabilities
    assert caps.batch_invariant and caps.supports_steering and not caps.graphable
    assert "response:mean" in caps.captures and len(caps.captures) == 9
    assert list(caps.steering_modes) == ["ablate", "add"]
    assert list(caps.rpcs) == ["capture", "generate", "next_token", "score"]


# ---------------------------------------------------------------------- another engine
async def test_a_registered_engine_serves_through_the_unchanged_server(
    prompt_only_registered: None,
) -> None:
    runtime = build_runtime(TINY, "fp32", device="cpu", engine_name="prompt-only")
    assert isinstance(runtime.engine, PromptOnlyEngine) and runtime.backend == "prompt-only"
    vector = np.ones(64, dtype=np.float32)
    steer = pb.SteeringSpec(
        layers=[1],
        vector=pb.Tensor(dtype="float32", shape=[64], data=vector.tobytes()),
        coefficient=1.0,
        mode=pb.STEERING_MODE_ADD,
    )
    async with _serve(runtime) as (_running, stub):
        info = await stub.Info(pb.InfoRequest())
        assert info.engine == "prompt-only"
        assert list(info.capabilities.captures) == ["prompt:last", "prompt:mean"]
        assert not info.capabilities.supports_steering
        chunks = [
            c
            async for c in stub.Capture(
                pb.CaptureRequest(items=[_item()], layers=[1], position="prompt[-1]")
            )
        ]
        assert list(chunks[0].layers) == [1] and len(chunks[0].items) == 1
        generated = await stub.Generate(
            pb.GenerateRequest(items=[_item()], params=pb.GenerationParams(max_new_tokens=3))
        )
        assert len(generated.generations[0].token_ids) == 3

        async def capture_response() -> None:
            request = pb.CaptureRequest(items=[_item()], layers=[1], position="response[:]")
            _ = [c async for c in stub.Capture(request)]

        async def steer_generate() -> None:
            await stub.Generate(pb.GenerateRequest(items=[_item()], steering=[steer]))

        async def next_token() -> None:
            await stub.NextToken(pb.NextTokenRequest(items=[_item()], top_k=3))

        refused: list[tuple[Callable[[], Awaitable[None]], str]] = [
            (capture_response, "cannot capture response[:] with reduction 'mean'"),
            (steer_generate, "engine 'prompt-only' does not steer"),
            (next_token, "engine 'prompt-only' does not serve next_token"),
        ]
        for call, message in refused:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
            assert message in str(err.value.details())


def test_capability_checks_name_what_is_missing() -> None:
    """The checks every engine's computations run first (engine.Engine.generate etc.)."""
    caps = EngineCapabilities(
        engine="e",
        batch_invariant=True,
        graphable=False,
        supports_steering=True,
        steering_modes=frozenset({"add"}),
        captures=frozenset({("prompt", "mean")}),
    )
    caps.check_capture(parse_position("prompt[:]"), "mean")
    with pytest.raises(FailedPrecondition, match=r"cannot capture response\[:\] with reduction"):
        caps.check_capture(parse_position("response[:]"), "mean")
    ablate = SteerSpec((0,), torch.ones(4), 1.0, "ablate")
    with pytest.raises(FailedPrecondition, match=r"items\[0\]\.steering: .* mode 'ablate'"):
        caps.check_steering([ablate], "items[0].steering")
    caps.check_steering([], "items[0].steering")


def test_engine_items_with_steering_reach_a_steering_engine(hf_engine: Engine) -> None:
    """The interface's checks pass steering through to an engine that steers."""
    prompt = hf_engine.encode_prompt("Hello there", "x")
    steer = SteerSpec((1, 2), torch.linspace(-3, 3, hf_engine.hidden_size), 8.0)
    plain, steered = hf_engine.generate(
        [EngineItem(prompt), EngineItem(prompt, steering=[steer])],
        GenParams(max_new_tokens=6, ignore_eos=True),
    )
    assert plain.token_ids != steered.token_ids


def test_serve_names_an_unknown_engine_before_loading() -> None:
    """`qsens serve loader --engine` goes through the registry (exit 2, the field named)."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "services.cli.main", "serve", "loader", "--model", TINY),
            *("--precision", "fp32", "--engine", "vllm-not-registered", "--port", "0"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "engine: unknown engine 'vllm-not-registered' (known: hf, vllm)" in done.stderr


def test_registry_and_capabilities_import_without_torch() -> None:
    """Preflight, clients and the planner read them without loading torch or an engine."""
    code = (
        "import sys\n"
        "import services.loader.backends.registry, services.loader.capabilities\n"
        "loaded = sorted(m for m in ('torch', 'transformers', 'bitsandbytes') if m in sys.modules)\n"
        "print(','.join(loaded) or 'none')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none"


def test_loading_names_an_engine_that_is_missing_or_not_an_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.common import settings as settings_mod
    from services.loader.model_source import resolve_source

    source = resolve_source(TINY, settings_mod.get(settings_mod.CommonSettings).cache_dir, None)
    limits = settings_mod.get(LoaderSettings)
    for target, message in (
        ("services.loader.no_such_engine:Engine", "engine 'hf' is not installed"),
        ("services.loader.backends.hf:HFBackend", "is not an Engine"),
    ):
        monkeypatch.setitem(registry.ENGINES, "hf", registry.EngineEntry(target))
        with pytest.raises(InvalidArgument, match=message) as err:
            registry.load_engine(source, Precision.FP32, device="cpu", settings=limits)
        assert err.value.field == "engine"
