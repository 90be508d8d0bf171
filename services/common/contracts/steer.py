"""The params of the steerer's job kinds, as the planner builds them, validated on arrival.

Nested settings reuse the experiment spec's own models (``SteeringSpec``, ``JudgeSpec``,
``LogitDiffSpec``, ``BenchmarkSpec``, ``ProbeSpec``), so a job is checked by the same rules as
the spec it came from. A malformed job raises ``InvalidArgument`` naming the offending field
(``params.steering.search.steps``) and is dead-lettered, never retried.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from services.common.artefacts import benchmark_key, logit_diff_key, steer_key
from services.common.contracts.common import Params as _Params
from services.common.contracts.common import TraitParams, parse_params
from services.common.spec import BenchmarkSpec, JudgeSpec, LogitDiffSpec, ProbeSpec, SteeringSpec

__all__ = [
    "BenchmarkParams",
    "LogitDiffParams",
    "ProbeParams",
    "SteerParams",
    "TraitParams",
    "benchmark_result_key",
    "logit_diff_result_key",
    "parse_params",
    "steer_parts",
    "steer_result_key",
]


class SteerParams(_Params):
    """``steer``: steer ``target`` with ``source``'s vectors and judge the answers."""

    target: str
    model: dict[str, Any] = Field(
        default_factory=dict,
        description="The target model's spec entry (context for the job id).",
    )
    source: str
    trait: TraitParams
    method: str
    vector_mode: Literal["native", "replay"]
    mode: Literal["add", "ablate"] = "add"
    direction: Literal["+", "-"] = "+"
    steering: SteeringSpec = Field(default_factory=SteeringSpec)
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    vectors_location: str | None = Field(
        None,
        description="An imported vector set (spec vectors[].location) to steer with instead of "
        "an extraction; source is then imported-<name> and activation norms are the target's.",
    )
    noise_floor: bool = Field(
        False,
        description="Also measure the noise floor of the chosen setting (steering.noise); the "
        "planner sets it on the reference variant's own add-mode jobs.",
    )

    @model_serializer(mode="wrap")
    def _omit_no_location(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Jobs that steer with an extraction keep the params (and ids) they had before.
        data = handler(self)
        if isinstance(data, dict) and data.get("vectors_location") is None:
            data.pop("vectors_location", None)
        if isinstance(data, dict) and data.get("noise_floor") is False:
            data.pop("noise_floor", None)
        return data


class LogitDiffParams(_Params):
    """``logit_diff``: CAA A/B logit difference of ``variant`` under ``source``'s vector."""

    variant: str
    source: str
    trait: TraitParams
    method: str
    vector_mode: Literal["native", "replay"]
    logit_diff: LogitDiffSpec = Field(default_factory=LogitDiffSpec)


class BenchmarkParams(_Params):
    """``benchmark``: one capability benchmark on ``variant``."""

    variant: str
    benchmark: BenchmarkSpec


class ProbeParams(_Params):
    """``probe``: safety probes of ``variant`` on harmful instructions."""

    variant: str
    probes: ProbeSpec = Field(default_factory=ProbeSpec)


# -- where each job writes its result (the handler, and the analyzer's expectations) -------------


def steer_parts(run_id: str, params: SteerParams) -> tuple[Any, ...]:
    """The key parts of a steer job's folder (``steer_key(*parts, name)``)."""
    return (
        run_id,
        params.target,
        params.trait.name,
        params.source,
        params.method,
        params.vector_mode,
        params.mode,
        params.direction,
    )


def steer_result_key(run_id: str, params: SteerParams) -> str:
    """Where a steer job's ``result.json`` goes."""
    return steer_key(*steer_parts(run_id, params), "result.json")


def logit_diff_result_key(run_id: str, params: LogitDiffParams) -> str:
    """Where a logit_diff job's ``result.json`` goes."""
    return logit_diff_key(
        run_id,
        params.variant,
        params.trait.name,
        params.source,
        params.method,
        params.vector_mode,
        "result.json",
    )


def benchmark_result_key(run_id: str, params: BenchmarkParams) -> str:
    """Where a benchmark job's ``result.json`` goes."""
    return benchmark_key(run_id, params.variant, params.benchmark.name, "result.json")
