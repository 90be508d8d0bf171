"""Which params contract each job kind carries, and parsing a job's params by its kind."""

from __future__ import annotations

from pydantic import BaseModel

from services.common.contracts.analyze import AnalyzeParams
from services.common.contracts.common import parse_params
from services.common.contracts.extract import ExtractParams
from services.common.contracts.quantize import QuantizeParams
from services.common.contracts.steer import (
    BenchmarkParams,
    LogitDiffParams,
    ProbeParams,
    SteerParams,
)
from services.common.errors import InvalidArgument
from services.common.jobs import Job, JobKind

__all__ = ["PARAMS", "parse_job_params"]

PARAMS: dict[JobKind, type[BaseModel]] = {
    JobKind.EXTRACT: ExtractParams,
    JobKind.STEER: SteerParams,
    JobKind.LOGIT_DIFF: LogitDiffParams,
    JobKind.BENCHMARK: BenchmarkParams,
    JobKind.PROBE: ProbeParams,
    JobKind.ANALYZE: AnalyzeParams,
    JobKind.QUANTIZE: QuantizeParams,
}
"""Every job kind with params (``noop`` jobs carry free-form params for tests of the plane)."""


def parse_job_params(job: Job) -> BaseModel:
    """``job``'s params validated against its kind's contract (InvalidArgument names the field)."""
    model = PARAMS.get(job.kind)
    if model is None:
        raise InvalidArgument("kind", f"{job.kind.value} jobs have no params contract")
    return parse_params(model, job.params)
