"""Runs the vLLM engine on a saved list of calls and saves the results: the equality tests
run it with the vLLM virtual environment's Python (vLLM pins its own torch and transformers,
so it never shares a process with the HF engine) and compare against the HF engine.

Usage: ``python -m tests.vllm_driver FOLDER PRECISION CALLS RESULTS [RANKS]`` (RANKS > 1:
tensor parallelism over that many CPU processes; or ``--refusals
FOLDER RESULTS``: the errors of loads this machine cannot serve); each call is
``(method name, args, kwargs)`` of ``services.loader.engine.Engine``; both files are written
by ``tests.engine_codec`` (safetensors + JSON, no ``torch.load``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from services.common.errors import QsensError
from services.common.settings import LoaderSettings
from services.common.variants import Precision
from services.loader.engines.vllm.engine import VLLMEngine
from services.loader.model_source import ResolvedSource
from tests import engine_codec


def _load(folder: str, precision: str, settings: LoaderSettings, ranks: int = 1) -> VLLMEngine:
    source = ResolvedSource(Path(folder), Path(folder).name, folder)
    if ranks > 1:  # tensor parallelism over CPU processes
        return VLLMEngine.start(source, Precision(precision), settings, cpu_ranks=ranks)
    return VLLMEngine.load(source, Precision(precision), "vllm", device="cpu", settings=settings)


def refusals(folder: str, out_path: str) -> None:
    """The named errors of loads this CPU cannot serve, each ``(kind, field, text)``."""
    found = []
    for precision in ("gptq", "awq"):
        try:
            _load(folder, precision, LoaderSettings())
            found.append(("loaded", "", precision))
        except QsensError as exc:
            found.append((type(exc).__name__, getattr(exc, "field", ""), str(exc)))
    engine_codec.write(found, out_path)


def main(folder: str, precision: str, calls_path: str, out_path: str, ranks: str = "1") -> None:
    """Load (over ``ranks`` tensor-parallel CPU processes), run the calls, save the results."""
    started = time.perf_counter()
    engine = _load(folder, precision, LoaderSettings(), int(ranks))
    loaded = time.perf_counter() - started
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = engine_codec.read(calls_path)
    results: list[Any] = []
    timings: list[float] = []
    for name, args, kwargs in calls:
        t0 = time.perf_counter()
        out = getattr(engine, name)(*args, **kwargs)
        results.append(list(out) if name == "capture" else out)
        timings.append(time.perf_counter() - t0)
    engine_codec.write(
        {
            "results": results,
            "capabilities": engine.capabilities,
            "describe": engine.describe(),
            "load_s": loaded,
            "timings_s": timings,
        },
        out_path,
    )


if __name__ == "__main__":
    if sys.argv[1] == "--refusals":
        refusals(*sys.argv[2:4])
    else:
        main(*sys.argv[1:6])
