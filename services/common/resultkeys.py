"""Where each planned job writes its results, and the plan-time refusal of two jobs sharing it.

Results are write-once and keyed by the job's identity (variant, trait, benchmark name...), so
two jobs with the same key would silently share one result: the second finds the first's and
reports it as its own (two benchmarks named alike both reported the first's numbers). The spec
refuses the known causes (repeated names, repeated list entries); this check covers the whole
plan, whatever the cause, and names the spec field that made the two jobs alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from services.common.artefacts import (
    analysis_key,
    benchmark_key,
    extract_key,
    logit_diff_key,
    quantize_key,
    steer_key,
)
from services.common.errors import InvalidArgument
from services.common.jobs import Job, JobKind
from services.common.spec import ExperimentSpec
from services.common.store import run_key

__all__ = ["check_result_keys", "result_prefix"]

# The spec section a job kind comes from, for collisions whose params do not differ at all.
_SECTION = {
    JobKind.EXTRACT: "traits",
    JobKind.STEER: "steering",
    JobKind.LOGIT_DIFF: "logit_diff",
    JobKind.BENCHMARK: "benchmarks",
    JobKind.PROBE: "probes",
    JobKind.QUANTIZE: "models",
    JobKind.ANALYZE: "analysis",
}


def result_prefix(job: Job) -> str | None:
    """The key folder below which ``job`` writes its results (None for kinds that write none).

    Built with the same functions the workers use, from the job's params."""
    p, run = job.params, job.run_id
    kind = job.kind
    try:
        if kind is JobKind.EXTRACT:
            # A reverse extraction sits under the variant whose text it read (extraction_key).
            text = (p["replay_from"],) if p["mode"] == "reverse" else ()
            return extract_key(run, p["variant"], p["trait"]["name"], p["mode"], *text)
        if kind is JobKind.STEER:
            return steer_key(
                run,
                p["target"],
                p["trait"]["name"],
                p["source"],
                p["method"],
                p["vector_mode"],
                p["mode"],
                p["direction"],
            )
        if kind is JobKind.LOGIT_DIFF:
            return logit_diff_key(
                run, p["variant"], p["trait"]["name"], p["source"], p["method"], p["vector_mode"]
            )
        if kind is JobKind.BENCHMARK:
            return benchmark_key(run, p["variant"], p["benchmark"]["name"])
        if kind is JobKind.PROBE:
            return run_key(run, p["variant"], "probe")
        if kind is JobKind.QUANTIZE:
            return quantize_key(run, f"{p['model']}@{p['method']}")
        if kind is JobKind.ANALYZE:
            return analysis_key(run)
    except (KeyError, TypeError, ValueError) as err:
        # A part the key functions refuse (a trait name without '/', a '..'): the job could
        # never store its result.
        raise InvalidArgument(_SECTION[kind], f"{job.name or kind.value}: {err}") from None
    return None


def _index(values: Sequence[str], wanted: str) -> int:
    """The last index of ``wanted`` (the second of two equal names is the one to change)."""
    return max((i for i, v in enumerate(values) if v == wanted), default=0)


def _field(spec: ExperimentSpec, a: Job, b: Job) -> str:
    """The spec field that made ``a`` and ``b`` write to the same place."""
    diff = [k for k in sorted(set(a.params) | set(b.params)) if a.params.get(k) != b.params.get(k)]
    if a.kind is JobKind.BENCHMARK or "benchmark" in diff:
        name = b.params.get("benchmark", {}).get("name", "")
        return f"benchmarks[{_index([x.name for x in spec.benchmarks], name)}].name"
    if "trait" in diff:
        name = b.params["trait"].get("name", "")
        return f"traits[{_index([spec.trait_name(t) for t in spec.traits], name)}]"
    if {"model", "variant", "target"} & set(diff):
        return "models"
    if "method" in diff or "methods" in diff:
        return "steering.methods" if a.kind is JobKind.STEER else "methods"
    return _SECTION.get(a.kind, "spec")


def check_result_keys(spec: ExperimentSpec, jobs: Sequence[Job]) -> None:
    """InvalidArgument, naming the spec field, when two jobs would write to one place: the same
    result folder, or one job's folder inside another's."""
    owners: dict[str, Job] = {}
    for job in jobs:
        prefix = result_prefix(job)
        if prefix is None:
            continue
        folder = prefix.rstrip("/") + "/"
        if folder in owners:
            _refuse(spec, owners[folder], job, folder)
        owners[folder] = job
    ordered = sorted(owners)
    for outer, inner in itertools.pairwise(ordered):
        if inner.startswith(outer):
            _refuse(spec, owners[outer], owners[inner], inner)


def _refuse(spec: ExperimentSpec, a: Job, b: Job, key: str) -> None:
    names = f"{a.name or a.kind.value!r} and {b.name or b.kind.value!r}"
    raise InvalidArgument(
        _field(spec, a, b),
        f"jobs {names} would write their results to the same place ({key}); each job "
        "needs its own result key",
    )
