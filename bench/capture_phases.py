"""Where the wall time of one large capture goes on a GPU, phase by phase (diagnostic).

Wraps the engine's padding, the base model's forward (time to *launch* it: the GPU runs
behind), the result transfer and the per-row results, and lists the CUDA runtime calls of
capture and of a plain forward (torch.profiler, host side): an unexpected synchronisation
or page-locked allocation shows up there. Prints JSON.
  python bench/capture_phases.py --device cuda --copies 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import services.loader.engines.hf.capture as engine_mod
from bench.bench_loader import (
    _sync,
    add_model_args,
    capture_items,
    capture_mean,
    forward,
    pad_items,
)
from services.loader.server import build_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_args(parser)
    parser.add_argument("--copies", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    engine = build_runtime(args.model, args.precision, device=args.device).engine
    engine.graphs.max_graphs = 0
    device = engine.device
    items = capture_items(engine, args.copies)
    phases: dict[str, list[float]] = defaultdict(list)
    marks: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                marks[name] = time.perf_counter() - start

        return wrapper

    engine._pad = timed("pad", engine._pad)  # type: ignore[method-assign]
    base_forward = engine.base.forward
    engine.base.forward = timed("forward_launch", base_forward)  # type: ignore[method-assign]
    engine_mod.to_host = timed("to_host", engine_mod.to_host)  # type: ignore[assignment]

    padded = pad_items(engine, items)

    def capture() -> None:
        capture_mean(engine, items)

    def plain_forward() -> None:
        forward(engine.model, padded)

    capture()
    plain_forward()
    for _ in range(args.repeats):
        for name, fn in (("capture", capture), ("forward", plain_forward)):
            _sync(device)
            marks.clear()
            start = time.perf_counter()
            fn()
            _sync(device)
            phases[f"{name}_total"].append(time.perf_counter() - start)
            for k, v in marks.items():
                phases[f"{name}:{k}"].append(v)
    out: dict[str, Any] = {
        "rows": len(items),
        "ms": {k: round(statistics.median(v) * 1e3, 2) for k, v in phases.items()},
    }
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("capture", capture), ("forward", plain_forward)):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                _sync(device)
            rows = [
                (e.key, e.self_cpu_time_total / 1e3, e.count)
                for e in prof.key_averages()
                if e.key.startswith(("cuda", "cu")) and e.self_cpu_time_total > 0
            ]
            rows.sort(key=lambda r: -r[1])
            out[f"runtime_calls_{name}"] = [
                {"call": k[:60], "cpu_ms": round(ms, 3), "count": n} for k, ms, n in rows[:12]
            ]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
