"""Which result keys a run holds and which its plan expects: the run's objects sorted by stage,
and the expected results the bucket does not hold (``RunArtefacts.missing``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from services.common.artefacts import quantize_key
from services.common.contracts.extract import ExtractParams, extraction_key
from services.common.contracts.kinds import parse_job_params
from services.common.contracts.quantize import QuantizeParams
from services.common.contracts.steer import (
    BenchmarkParams,
    LogitDiffParams,
    ProbeParams,
    SteerParams,
    benchmark_result_key,
    logit_diff_result_key,
    steer_result_key,
)
from services.common.jobs import Job, JobKind, RunPlan
from services.common.store import run_key

__all__ = [
    "RESULT_STAGES",
    "RunKeys",
    "expected_key",
    "expected_results",
    "missing_results",
    "parse_key",
    "sort_keys",
]

# Job kinds whose results the analysis reads, and the stage each is listed under.
RESULT_STAGES = {
    JobKind.EXTRACT: "extract",
    JobKind.STEER: "steer",
    JobKind.LOGIT_DIFF: "logit_diff",
    JobKind.BENCHMARK: "benchmark",
    JobKind.PROBE: "probe",
    JobKind.QUANTIZE: "quantize",
}


def parse_key(prefix: str, key: str) -> list[str] | None:
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix) :].split("/")
    if len(parts) < 3 or "@" not in parts[0]:
        return None
    return parts


def expected_key(run_id: str, job: Job) -> tuple[str, str] | None:
    """(stage, result key) a job of the plan writes (probes: the variant's probe folder)."""
    if job.kind not in RESULT_STAGES:
        return None
    p = parse_job_params(job)
    if isinstance(p, QuantizeParams):
        # The quantizer records it under the variant <model>@<method>.
        return "quantize", quantize_key(run_id, f"{p.model}@{p.method}", "result.json")
    if isinstance(p, ExtractParams):
        return "extract", extraction_key(run_id, p, "summary.json")
    if isinstance(p, SteerParams):
        return "steer", steer_result_key(run_id, p)
    if isinstance(p, LogitDiffParams):
        return "logit_diff", logit_diff_result_key(run_id, p)
    if isinstance(p, BenchmarkParams):
        return "benchmark", benchmark_result_key(run_id, p)
    if isinstance(p, ProbeParams):
        return "probe", run_key(run_id, p.variant, "probe") + "/"
    return None


def expected_results(plan: RunPlan) -> dict[str, list[str]]:
    """Result keys the run's plan will write, per stage."""
    out: dict[str, list[str]] = {stage: [] for stage in RESULT_STAGES.values()}
    for job in plan.jobs:
        found = expected_key(plan.run_id, job)
        if found is not None:
            out[found[0]].append(found[1])
    return out


@dataclass
class RunKeys:
    """The run's result keys by stage, split into their path parts."""

    summaries: list[tuple[str, str, str, str]] = field(default_factory=list)
    # The reference on another variant's text (2x2 replay): (key, reference, trait, text's variant)
    reverse: list[tuple[str, str, str, str]] = field(default_factory=list)
    steer: list[tuple[str, list[str]]] = field(default_factory=list)
    logit_diff: list[tuple[str, list[str]]] = field(default_factory=list)
    benchmark: list[tuple[str, list[str]]] = field(default_factory=list)
    probe: list[tuple[str, list[str]]] = field(default_factory=list)
    quantize: dict[str, str] = field(default_factory=dict)  # variant -> its quantize result


def sort_keys(keys: Iterable[str], prefix: str, variant_ids: set[str]) -> RunKeys:
    out = RunKeys()
    for key in keys:
        parts = parse_key(prefix, key)
        if parts is None or parts[0] not in variant_ids:
            continue
        stage, n = parts[1], len(parts)
        if stage == "extract" and n == 6 and parts[5] == "summary.json":
            out.summaries.append((key, parts[0], f"{parts[2]}/{parts[3]}", parts[4]))
        elif stage == "extract" and n == 7 and parts[4] == "reverse" and parts[6] == "summary.json":
            out.reverse.append((key, parts[0], f"{parts[2]}/{parts[3]}", parts[5]))
        elif stage == "steer" and n == 8 and parts[7] == "result.json":
            out.steer.append((key, parts))
        elif stage == "logit_diff" and n == 7 and parts[6] == "result.json":
            out.logit_diff.append((key, parts))
        elif stage == "benchmark" and n == 4 and parts[3] == "result.json":
            out.benchmark.append((key, parts))
        elif stage == "probe" and n == 4 and parts[3] == "result.json":
            out.probe.append((key, parts))
        elif stage == "quantize" and n == 3 and parts[2] == "result.json":
            out.quantize[parts[0]] = key
    return out


def missing_results(
    plan: RunPlan, prefix: str, present: set[str], variant_ids: set[str]
) -> dict[str, list[str]]:
    """Result keys the plan expects that the bucket does not hold, per stage."""
    missing: dict[str, list[str]] = {}
    for stage, expected in expected_results(plan).items():
        if stage == "probe":
            gone = [k for k in expected if not any(p.startswith(k) for p in present)]
        else:
            gone = [k for k in expected if k not in present]
        gone = [
            k
            for k in gone
            if parse_key(prefix, k) is None or k[len(prefix) :].split("/")[0] in variant_ids
        ]
        if gone:
            missing[stage] = gone
    return missing
