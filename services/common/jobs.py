"""Job schemas: what a job is, how its id is derived, and a run as a validated DAG of jobs.

A job's id is the hash of its spec (kind, run, params, deps), never of its label, so the same
work always has the same id: publishing it twice stores it once and its results land under
the same keys. Because a job's deps are part of its id, a plan is built bottom-up and cannot
contain a cycle unless it was written by hand; ``RunPlan`` still checks, since plans also
arrive as JSON.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from services.common.errors import InvalidArgument
from services.common.hashing import canonical_json, stable_hash

__all__ = [
    "RUN_ID_PATTERN",
    "Job",
    "JobKind",
    "RunPlan",
    "parse_job",
    "validate_run_id",
]

# Run ids become S3 key parts, KV key tokens and subject-safe names: no dots or slashes.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_RUN_ID = re.compile(RUN_ID_PATTERN)


class JobKind(StrEnum):
    """The closed set of job kinds; each has its own queue ``qsens.jobs.<kind>``."""

    EXTRACT = "extract"
    STEER = "steer"
    LOGIT_DIFF = "logit_diff"
    BENCHMARK = "benchmark"
    PROBE = "probe"
    ANALYZE = "analyze"
    QUANTIZE = "quantize"
    NOOP = "noop"


def validate_run_id(run_id: str, field: str = "run_id") -> str:
    """Return ``run_id`` or raise InvalidArgument naming ``field``."""
    if not _RUN_ID.match(run_id):
        raise InvalidArgument(
            field, f"bad run id {run_id!r} (1-64 letters, digits, '_' or '-', first alphanumeric)"
        )
    return run_id


class Job(BaseModel):
    """One unit of work. ``id`` is derived from kind, run, params and deps (``name`` is a label)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: JobKind = Field(description="Which queue and which handler.")
    run_id: str = Field(pattern=RUN_ID_PATTERN, description="The run this job belongs to.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="JSON parameters; large inputs go to S3 by key."
    )
    deps: tuple[str, ...] = Field(
        default=(), description="Ids of jobs whose results this one needs (sorted, unique)."
    )
    name: str = Field(default="", max_length=200, description="Human label; not part of the id.")

    _id: str = PrivateAttr(default="")

    @model_validator(mode="wrap")
    @classmethod
    def _normalise_and_check_id(cls, data: Any, handler: Any) -> Any:
        # Serialised jobs carry their id: check it instead of rejecting it as an extra field,
        # so a message whose spec was altered is caught rather than run under a wrong id.
        claimed = None
        if isinstance(data, dict):
            data = dict(data)
            claimed = data.pop("id", None)
            if isinstance(data.get("deps"), list | tuple):
                data["deps"] = tuple(sorted(set(data["deps"])))
        job = handler(data)
        if claimed is not None and claimed != job.id:
            raise ValueError(f"id {claimed!r} does not match the job's spec (expected {job.id!r})")
        return job

    def model_post_init(self, context: Any, /) -> None:
        self._id = stable_hash(
            {
                "kind": self.kind.value,
                "run_id": self.run_id,
                "params": self.params,
                "deps": list(self.deps),
            }
        )

    @property
    def id(self) -> str:
        """Stable hash of (kind, run_id, params, deps)."""
        return self._id

    @property
    def label(self) -> str:
        """``name`` if set, else ``kind:id`` (for logs and error messages)."""
        return self.name or f"{self.kind.value}:{self.id}"

    def to_wire(self) -> dict[str, Any]:
        """The JSON form published on the queue: the spec plus its id."""
        data = self.model_dump(mode="json")
        data["id"] = self.id
        return data

    def to_json(self) -> bytes:
        """``to_wire`` encoded as UTF-8 JSON."""
        return canonical_json(self.to_wire()).encode("utf-8")


def parse_job(raw: bytes | str | dict[str, Any], field: str = "job") -> Job:
    """Parse a job from JSON (or a dict), raising InvalidArgument with the offending field."""
    try:
        if isinstance(raw, dict):
            return Job.model_validate(raw)
        return Job.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidArgument(
            f"{field}.{loc}" if loc else field, first.get("msg", str(err))
        ) from None


class RunPlan(BaseModel):
    """A run: its jobs as a DAG. Validation names the offending job (unknown deps, cycles)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str = Field(pattern=RUN_ID_PATTERN, description="Unique id of the run.")
    spec_hash: str = Field(min_length=1, description="stable_hash of the experiment spec.")
    jobs: list[Job] = Field(description="Every job of the run; deps refer to job ids.")
    created_at: float = Field(default_factory=time.time, description="Unix time of planning.")
    description: str = Field(default="", description="Free text shown by status commands.")

    @model_validator(mode="after")
    def _check_dag(self) -> RunPlan:
        index: dict[str, int] = {}
        for i, job in enumerate(self.jobs):
            if job.run_id != self.run_id:
                raise InvalidArgument(
                    f"jobs[{i}].run_id", f"{job.run_id!r} differs from the plan's {self.run_id!r}"
                )
            if job.id in index:
                raise InvalidArgument(
                    f"jobs[{i}]", f"{job.label} duplicates jobs[{index[job.id]}] (same id {job.id})"
                )
            index[job.id] = i
        for i, job in enumerate(self.jobs):
            for k, dep in enumerate(job.deps):
                if dep not in index:
                    raise InvalidArgument(
                        f"jobs[{i}].deps[{k}]", f"{job.label} depends on unknown job id {dep!r}"
                    )
        cycle = _find_cycle(self.jobs)
        if cycle:
            names = " -> ".join(self.jobs[index[j]].label for j in cycle)
            raise InvalidArgument(f"jobs[{index[cycle[0]]}].deps", f"dependency cycle: {names}")
        return self

    def job(self, job_id: str) -> Job:
        """The job with ``job_id``; InvalidArgument when the plan has none."""
        for job in self.jobs:
            if job.id == job_id:
                return job
        raise InvalidArgument("job_id", f"no job {job_id!r} in run {self.run_id}")

    def roots(self) -> list[Job]:
        """Jobs without deps: published at submit."""
        return [job for job in self.jobs if not job.deps]

    def dependents(self) -> dict[str, tuple[str, ...]]:
        """job id -> ids of jobs that list it in their deps (sorted)."""
        out: dict[str, list[str]] = {job.id: [] for job in self.jobs}
        for job in self.jobs:
            for dep in job.deps:
                out[dep].append(job.id)
        return {k: tuple(sorted(v)) for k, v in out.items()}

    def topological_order(self) -> list[Job]:
        """Jobs ordered so that every job comes after its deps (stable within a level)."""
        by_id = {job.id: job for job in self.jobs}
        remaining = {job.id: len(job.deps) for job in self.jobs}
        dependents = self.dependents()
        ready = [job.id for job in self.jobs if not job.deps]
        order: list[Job] = []
        while ready:
            current = ready.pop(0)
            order.append(by_id[current])
            for child in dependents[current]:
                remaining[child] -= 1
                if remaining[child] == 0:
                    ready.append(child)
        return order


def _find_cycle(jobs: Iterable[Job]) -> list[str]:
    """A cycle of job ids (first id repeated at the end), or [] when the graph is acyclic."""
    deps = {job.id: job.deps for job in jobs}
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(deps, white)
    for start in deps:
        if colour[start] != white:
            continue
        # Iterative DFS: plans can be deep enough to hit the recursion limit.
        stack: list[tuple[str, int]] = [(start, 0)]
        path: list[str] = [start]
        colour[start] = grey
        while stack:
            node, i = stack[-1]
            children = deps[node]
            if i < len(children):
                stack[-1] = (node, i + 1)
                child = children[i]
                if colour[child] == grey:
                    return [*path[path.index(child) :], child]
                if colour[child] == white:
                    colour[child] = grey
                    stack.append((child, 0))
                    path.append(child)
            else:
                colour[node] = black
                stack.pop()
                path.pop()
    return []
