"""Routing jobs by engine capabilities: loaders announce what their engine computes exactly,
``find(variant, needs)`` picks only loaders that cover a job's needs, and each job kind's
handler derives its needs from its params (real NATS KV, real S3, the real planner)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from services.common.contracts.kinds import parse_job_params
from services.common.errors import FailedPrecondition, Unavailable
from services.common.handlers import JobContext
from services.common.jobs import Job, JobKind
from services.common.loader_registry import (
    LoaderRegistry,
    LoaderStarting,
    NoLoader,
    SupervisedLoader,
    SupervisedLoaders,
)
from services.common.natsconn import connection
from services.common.planner import build_plan
from services.common.spec import parse_spec
from services.common.store import AsyncS3Store
from services.extractor.pipeline import extract_needs
from services.loader.capabilities import (
    CAPTURE_SEGMENTS,
    REDUCTIONS,
    EngineCapabilities,
    Needs,
    capabilities_from_json,
    capabilities_to_json,
)
from services.steerer.steer import steer_needs
from tests.conftest import PlaneEnv

V = "m@bf16"
HF = EngineCapabilities("hf", batch_invariant=True, graphable=False, supports_steering=True)
# A vLLM-like engine: no exact mean over response tokens, no ablation.
VLLM = EngineCapabilities(
    "vllm",
    batch_invariant=False,
    graphable=False,
    supports_steering=True,
    steering_modes=frozenset({"add"}),
    captures=frozenset((s, r) for s in CAPTURE_SEGMENTS for r in REDUCTIONS)
    - {("response", "mean")},
)
RESPONSE_MEAN = Needs.of(captures=[("response", "mean")])


def test_needs_say_what_a_job_asks_and_an_engine_says_what_it_lacks() -> None:
    needs = Needs.of("generate", captures=[("response", "mean")]) | Needs.of(
        "next_token", steering=[("ablate", "all")]
    )
    assert needs.rpcs == {"generate", "capture", "next_token"}
    assert str(needs) == "generate, next_token, capture response:mean, steer ablate at all"
    assert HF.covers(needs)
    # It serves every RPC: only the response mean and the ablation are missing.
    assert VLLM.missing(needs) == Needs(
        captures=frozenset({("response", "mean")}), steering=frozenset({("ablate", "all")})
    )
    assert VLLM.covers(Needs.of("generate", captures=[("prompt", "mean")]))
    unsteered = EngineCapabilities("x", False, False, supports_steering=False)
    assert not unsteered.covers(Needs.of("generate", steering=[("add", "all")]))
    assert unsteered.covers(Needs.of("generate"))
    with pytest.raises(ValueError, match="unknown reductions"):
        Needs.of(captures=[("response", "median")])
    with pytest.raises(ValueError, match="unknown rpcs"):
        Needs.of("embed")


def test_capabilities_round_trip_through_the_registry_json_form() -> None:
    for caps in (HF, VLLM, EngineCapabilities("none", False, False, False, rpcs=frozenset())):
        assert capabilities_from_json(capabilities_to_json(caps)) == caps
    doc = capabilities_to_json(VLLM)
    assert doc["engine"] == "vllm" and "response:mean" not in doc["captures"]
    # A field a newer loader adds does not make the entry unreadable.
    assert capabilities_from_json({**doc, "speculative": True}) == VLLM


async def _ready(registry: LoaderRegistry, port: int, caps: EngineCapabilities | None) -> Any:
    return await registry.announce(V, f"127.0.0.1:{port}", capabilities=caps)


async def _draws(registry: LoaderRegistry, needs: Needs | None, n: int = 40) -> set[str]:
    return {await registry.find(V, needs) for _ in range(n)}


async def test_a_job_goes_only_to_loaders_whose_engine_computes_it(nats_env: PlaneEnv) -> None:
    async with connection() as nc:
        registry = await LoaderRegistry.open(nc.jetstream())
        vllm, hf = await _ready(registry, 7001, VLLM), await _ready(registry, 7002, HF)
        both = {"127.0.0.1:7001", "127.0.0.1:7002"}
        assert await _draws(registry, RESPONSE_MEAN) == {"127.0.0.1:7002"}
        assert await _draws(registry, Needs.of("generate", steering=[("ablate", "all")])) == {
            "127.0.0.1:7002"
        }
        assert await _draws(registry, Needs.of("generate", captures=[("prompt", "last")])) == both
        assert await _draws(registry, None) == both
        entries = {e.address: e for e in await registry.entries(V)}
        assert entries["127.0.0.1:7001"].engine_capabilities() == VLLM
        # An older loader states nothing: it is taken as able to do anything.
        old = await _ready(registry, 7003, None)
        assert await _draws(registry, RESPONSE_MEAN) == {"127.0.0.1:7002", "127.0.0.1:7003"}
        for announcement in (vllm, hf, old):
            await announcement.stop()


async def test_no_capable_loader_is_named_and_a_coming_one_is_waited_for(
    nats_env: PlaneEnv,
) -> None:
    async with connection() as nc:
        registry = await LoaderRegistry.open(nc.jetstream())
        vllm = await _ready(registry, 7001, VLLM)
        with pytest.raises(Unavailable) as err:
            await registry.find(V, RESPONSE_MEAN)
        assert not isinstance(err.value, (LoaderStarting, FailedPrecondition))
        assert (
            "no live loader of m@bf16 can serve a job that needs capture response:mean "
            "(live: vllm at 127.0.0.1:7001 (lacks capture response:mean))"
        ) in str(err.value)
        assert await registry.find(V, Needs.of("generate")) == "127.0.0.1:7001"
        # A loader of the variant still loading may be able to: wait for it (not an attempt).
        starting = await registry.announce(V, "", state="starting", detail="loading m")
        with pytest.raises(LoaderStarting, match="m@bf16 is starting"):
            await registry.find(V, RESPONSE_MEAN)
        await starting.stop()
        # A local stack whose supervisor runs only that loader: none is coming, fail now.
        doc = SupervisedLoaders(stack="/s", host="h", at=0.0)
        doc.loaders[V] = SupervisedLoader(state="running")
        await registry.declare_supervised("s1", doc)
        with pytest.raises(NoLoader, match=r"needs capture response:mean .* runs no other"):
            await registry.find(V, RESPONSE_MEAN)
        doc.loaders[V] = SupervisedLoader(state="restarting", restarts=1)
        await registry.declare_supervised("s1", doc)
        with pytest.raises(LoaderStarting, match="supervisor of /s is restarting one"):
            await registry.find(V, RESPONSE_MEAN)
        await vllm.stop()


def _plan() -> list[Job]:
    spec = {
        "name": "routing",
        "models": [{"name": "m", "source": "tiny:llama"}],
        "precisions": ["bf16", "nf4"],
        "reference": "bf16",
        "traits": ["pv/evil", "caa/sycophancy", "arditi/refusal"],
        "methods": ["mean_diff"],
        "extraction": {"replay": "2x2"},
        "benchmarks": ["mmlu_ab"],
    }
    return build_plan(parse_spec(spec), "routing-run").jobs


def _plan_params() -> dict[JobKind, list[Any]]:
    out: dict[JobKind, list[Any]] = {}
    for job in _plan():
        out.setdefault(job.kind, []).append(parse_job_params(job))
    return out


def test_needs_come_from_the_planned_params() -> None:
    params = _plan_params()
    extracts = {(p.trait.name, p.mode): extract_needs(p) for p in params[JobKind.EXTRACT]}
    evil = extracts[("pv/evil", "native")]
    assert evil.rpcs == {"generate", "capture"} and evil.captures == {("response", "mean")}
    # A replay reads the reference's answers: it captures but does not generate.
    assert extracts[("pv/evil", "replay")].rpcs == {"capture"}
    steers = {(p.trait.name, p.mode): steer_needs(p) for p in params[JobKind.STEER]}
    assert steers[("pv/evil", "add")] == Needs.of("generate", steering=[("add", "all")])
    assert steers[("arditi/refusal", "ablate")].steering == {("ablate", "all")}


async def test_each_handler_asks_the_registry_for_what_its_job_needs(
    plane_env: PlaneEnv,
) -> None:
    """The real handlers, on planned jobs, against a registry whose only loader serves
    unsteered generation: each job is refused naming what its kind needs."""
    from services.extractor.handler import handle as extract
    from services.steerer.handler import handle as steer

    wanted = {
        JobKind.EXTRACT: "capture response:mean",
        JobKind.STEER: "steer add at all",
        JobKind.LOGIT_DIFF: "next_token, steer add at all",
        JobKind.BENCHMARK: "needs score (",
        JobKind.PROBE: "needs generate, next_token (",
    }
    # The pv/evil native extraction (response positions) and add-mode steering.
    jobs = {
        j.kind: j
        for j in _plan()
        if j.kind in wanted
        and j.params.get("mode") in (None, "native", "add")
        and (
            j.kind not in (JobKind.EXTRACT, JobKind.STEER) or j.params["trait"]["name"] == "pv/evil"
        )
    }
    bare = EngineCapabilities("bare", False, False, False, rpcs=frozenset({"generate"}))
    store = AsyncS3Store()
    await store.ensure_bucket()
    async with connection() as nc:
        registry = await LoaderRegistry.open(nc.jetstream())
        variants = {str(j.params.get("variant") or j.params["target"]) for j in jobs.values()}
        announced = [
            await registry.announce(v, "127.0.0.1:7009", capabilities=bare) for v in variants
        ]
        for kind, text in wanted.items():
            job: Job = jobs[kind]
            ctx = JobContext(
                job=job,
                attempt=1,
                store=store,
                log=logging.LoggerAdapter(logging.getLogger("test"), {}),
                worker_id="routing",
                _msg=None,  # type: ignore[arg-type]
                _find_loader=registry.find,
            )
            handle = extract if kind is JobKind.EXTRACT else steer
            with pytest.raises(Unavailable, match="no live loader of") as err:
                await handle(job, ctx)
            assert text in str(err.value), (kind, str(err.value))
            assert "live: bare at 127.0.0.1:7009" in str(err.value)
        for announcement in announced:
            await announcement.stop()


async def test_a_real_loader_announces_its_engines_capabilities(nats_env: PlaneEnv) -> None:
    """``qsens serve loader --announce``: the registry entry carries the capabilities the
    loader reports in ``Info``, so a capture-needing job finds it."""
    from services.loader.client import LoaderClient
    from tests.loader_procs import start_loader

    proc = start_loader(
        "tiny:llama", "fp32", extra_args=["--name", "tiny", "--announce"], http=False, metrics=False
    )
    try:
        async with connection() as nc:
            registry = await LoaderRegistry.open(nc.jetstream())
            for _ in range(100):  # the announcement follows the ready file by a moment
                ready = [e for e in await registry.entries("tiny@fp32") if e.state == "ready"]
                if ready:
                    break
                await asyncio.sleep(0.1)
            (entry,) = ready
            async with LoaderClient(proc.address) as loader:
                info = await loader.info()
            assert info.capabilities is not None and info.capabilities.engine == "hf"
            assert entry.engine_capabilities() == info.capabilities
            assert await registry.find("tiny@fp32", RESPONSE_MEAN) == proc.address
    finally:
        proc.stop()


async def _routed(job: Job, ctx: JobContext) -> dict[str, Any]:
    segment, reduction = str(job.params["capture"]).split(":")
    needs = Needs.of(captures=[(segment, reduction)])
    return {"address": await ctx.find_loader(str(job.params["variant"]), needs)}


async def test_the_job_plane_routes_and_fails_at_once_when_no_engine_can(
    plane_env: PlaneEnv, run_id: str
) -> None:
    """Through a worker: a capture job runs against the HF loader beside a vLLM one; once only
    the vLLM loader is left under a supervisor that brings no other, the job fails at once
    (one attempt), its error naming the need."""
    from services.common.dag import submit
    from services.common.jobs import RunPlan
    from tests.common.plane import open_plane, wait_status, worker

    first = Job(kind=JobKind.NOOP, run_id=run_id, params={"variant": V, "capture": "response:mean"})
    again = Job(
        kind=JobKind.NOOP, run_id=run_id + "b", params={"variant": V, "capture": "response:mean"}
    )
    async with open_plane() as plane:
        registry = await LoaderRegistry.open(plane.js)
        vllm, hf = await _ready(registry, 7001, VLLM), await _ready(registry, 7002, HF)
        doc = SupervisedLoaders(stack="/s", host="h", at=0.0)
        doc.loaders[V] = SupervisedLoader(state="running")
        await registry.declare_supervised("s1", doc)
        async with worker(_routed):
            await submit(RunPlan(run_id=run_id, spec_hash="r", jobs=[first]))
            assert (await wait_status(plane.state, run_id, ("succeeded", "failed"))).status == (
                "succeeded"
            )
            await hf.stop()
            await submit(RunPlan(run_id=again.run_id, spec_hash="r", jobs=[again]))
            summary = await wait_status(plane.state, again.run_id, ("succeeded", "failed"))
        done = await plane.state.get_job(run_id, first.id)
        failed = await plane.state.get_job(again.run_id, again.id)
        await vllm.stop()
    assert done.result == {"address": "127.0.0.1:7002"}
    assert summary.status == "failed" and failed.attempts == 1
    assert "NoLoader" in (failed.error or "") and "capture response:mean" in (failed.error or "")
