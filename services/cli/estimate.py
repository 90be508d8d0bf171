"""A GPU-hour estimate of a planned run, from parameter counts and stated per-job costs.

The estimate is for planning a lease, not a measurement. Each GPU job costs
``seconds(kind) x size_b / 8 x precision factor`` GPU-seconds, plus one loader start per variant.
The per-kind seconds are for an 8B model at bf16 on one H100 (the shape ``bench/RESULTS.md``
measured), cost scales linearly with parameters (compute and weight reads both do), and the
analyzer and the judge's upstream calls are not counted (CPU workers; the judge is an API).

Where the numbers come from:

* ``steer`` 15.1 s: measured (``bench/RESULTS.md``, "Study cell"): the direction capture plus
  one trait's whole adaptive search (11 layers, 20 questions, 64 new tokens) through gRPC on
  the 32-layer Llama-3.1-8B shape, bf16, one H100; scaled by the job's questions / 20 and
  max_new_tokens / 64.
* ``held_out`` and ``noise_floor``: the steer job's extra loader batches after its search (issue
  17, "Numbers a reader can trust"): one batch per add-mode job with ``steering.held_out`` > 0
  (the chosen setting and the unsteered model on the held-out questions), and one more per
  noise-floor job (the reference's add-mode jobs: the seed replicates, every replicate in one
  batch; the question samples reuse answers and the re-judging is judge work, not counted).
  Each costs one batch of the measured search: 13.69 s for its 2 loader batches of 1 110 rows,
  so 6.85 s, scaled by max_new_tokens / 64. Those batches hold far fewer rows (2 x held_out,
  times ``noise.repeats`` for the seeds), so this is an upper bound.
* ``extract`` 10 s: the same phases for one contrast set (about 200 rows x 128 new tokens in
  one batch, then one capture of every layer), scaled by rollouts and max_new_tokens / 128; a
  replay (and reverse replay) extraction generates nothing: 2 s (the capture).
* ``logit_diff`` 2 s, ``benchmark`` 5 s, ``probe`` 3 s: a few hundred scored or generated
  rows each, at the measured capture/prefill rates (assumptions, not measured).
* ``quantize`` GPTQ 80 s, AWQ 306 s: measured on one H100 for 16 layers of the Llama-3.1-8B
  shape with the built-in calibration set (41 x 512 tokens; ``bench/RESULTS.md``, "GPTQ and
  AWQ on a GPU"), doubled for 32 layers.
* loader start 120 s: reading 16 GB of weights and warming up (an assumption).
* precision factors: nf4 1.10x bf16 (measured, ``bench/RESULTS.md`` sweep); fp4 as nf4 (the same
  bitsandbytes kernels); int8 2x (LLM.int8's outlier decomposition, an assumption); gptq and awq
  1.1x (an assumption).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from services.common.jobs import Job
from services.common.spec import ExperimentSpec

__all__ = [
    "JOB_SECONDS_8B",
    "LOADER_START_SECONDS_8B",
    "PRECISION_FACTOR",
    "QUANTIZE_SECONDS_8B",
    "STEER_BATCH_SECONDS_8B",
    "GpuEstimate",
    "estimate_gpu_hours",
]

REFERENCE_SIZE_B = 8.0
JOB_SECONDS_8B: dict[str, float] = {
    "extract": 10.0,
    "steer": 15.1,
    "logit_diff": 2.0,
    "benchmark": 5.0,
    "probe": 3.0,
    "quantize": 306.0,  # AWQ; GPTQ is QUANTIZE_SECONDS_8B["gptq"]
}
QUANTIZE_SECONDS_8B: dict[str, float] = {"gptq": 80.0, "awq": 306.0}
LOADER_START_SECONDS_8B = 120.0
REPLAY_SECONDS_8B = 2.0
#: One loader batch of the study cell's search (13.69 s over 2 batches of 1 110 rows x 64
#: tokens): the cost charged for each extra batch of a steer job (held out, noise floor).
STEER_BATCH_SECONDS_8B = 13.69 / 2
PRECISION_FACTOR: dict[str, float] = {
    "fp32": 2.0,
    "bf16": 1.0,
    "fp16": 1.0,
    "nf4": 1.1,
    "fp4": 1.1,
    "int8": 2.0,
    "gptq": 1.1,
    "awq": 1.1,
}


@dataclass
class GpuEstimate:
    """GPU-hours in total and per job kind (``loader_start`` for the loaders' starts)."""

    gpu_hours: float = 0.0
    by_kind: dict[str, float] = field(default_factory=dict)
    variants: int = 0


def _variant_of(job: Job) -> str | None:
    params = job.params
    for key in ("variant", "target"):
        value = params.get(key)
        if isinstance(value, str) and "@" in value:
            return value
    return None


def _workload(kind: str, params: dict[str, Any]) -> float:
    """The job's work relative to the one its per-kind seconds were stated for."""
    if kind == "steer":
        steering = params.get("steering") or {}
        questions = steering.get("questions") or 40  # None: all (every built-in holds 40)
        return float(questions) / 20.0 * float(steering.get("max_new_tokens", 64)) / 64.0
    if kind == "extract":
        if params.get("mode") in ("replay", "reverse"):
            return REPLAY_SECONDS_8B / JOB_SECONDS_8B["extract"]
        extraction = params.get("extraction") or {}
        tokens = float(extraction.get("max_new_tokens", 128)) / 128.0
        return float(extraction.get("rollouts", 1)) * tokens
    return 1.0


def _steer_batches(params: dict[str, Any]) -> dict[str, float]:
    """The steer job's loader batches after its search, in search batches' worth (by kind)."""
    steering = params.get("steering") or {}
    if params.get("mode", "add") != "add" or not steering.get("held_out", 0):
        return {}
    tokens = float(steering.get("max_new_tokens", 64)) / 64.0
    batches = {"held_out": tokens}
    if params.get("noise_floor"):
        batches["noise_floor"] = tokens
    return batches


def estimate_gpu_hours(spec: ExperimentSpec, jobs: list[Job]) -> GpuEstimate:
    """The estimate for ``jobs`` planned from ``spec`` (see the module docstring)."""
    size = {m.name: (m.size_b or REFERENCE_SIZE_B) / REFERENCE_SIZE_B for m in spec.models}
    seconds: dict[str, float] = defaultdict(float)
    variants: set[str] = set()
    for job in jobs:
        kind = job.kind.value
        base = JOB_SECONDS_8B.get(kind)
        if base is None:
            continue  # CPU work (analyze)
        if kind == "quantize":
            model = str(job.params.get("model", ""))
            method = str(job.params.get("method", ""))
            seconds[kind] += QUANTIZE_SECONDS_8B.get(method, base) * size.get(model, 1.0)
            continue
        variant = _variant_of(job)
        if variant is None:
            continue
        model, _, precision = variant.partition("@")
        variants.add(variant)
        factor = size.get(model, 1.0) * PRECISION_FACTOR.get(precision, 1.0)
        seconds[kind] += base * _workload(kind, job.params) * factor
        if kind == "steer":
            for extra, batches in _steer_batches(job.params).items():
                seconds[extra] += STEER_BATCH_SECONDS_8B * batches * factor
    for variant in variants:
        model, _, precision = variant.partition("@")
        seconds["loader_start"] += (
            LOADER_START_SECONDS_8B * size.get(model, 1.0) * PRECISION_FACTOR.get(precision, 1.0)
        )
    by_kind = {k: v / 3600.0 for k, v in sorted(seconds.items())}
    return GpuEstimate(sum(by_kind.values()), by_kind, len(variants))
