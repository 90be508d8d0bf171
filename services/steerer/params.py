"""The steerer's job params: moved to ``services.common.contracts.steer`` (re-exported here)."""

from services.common.contracts.common import TraitParams, parse_params
from services.common.contracts.steer import (
    BenchmarkParams,
    LogitDiffParams,
    ProbeParams,
    SteerParams,
    benchmark_result_key,
    logit_diff_result_key,
    steer_parts,
    steer_result_key,
)

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
