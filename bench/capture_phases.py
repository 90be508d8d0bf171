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

import torch

import services.loader.engine as engine_mod
from bench.bench_loader import QUESTIONS, RESPONSE, _sync
from services.loader.engine import ChatPrompt, EngineItem
from services.loader.positions import parse_position
from services.loader.server import build_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--copies", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    engine = build_runtime(args.model, args.precision, device=args.device).engine
    engine.graphs.max_graphs = 0
    device = engine.device
    prompts = [engine.encode_prompt(ChatPrompt((("user", q),)), "bench") for q in QUESTIONS]
    response = engine.encode_text(RESPONSE)
    items = [EngineItem(p, response) for p in prompts] * args.copies
    layers = list(range(engine.num_layers))
    position = parse_position("response[:]")
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

    def capture() -> None:
        for _ in engine.capture(items, layers, position, "mean", chunk_items=len(items)):
            pass

    padded = engine._pad(
        [(it.prompt_ids + it.response_ids, len(it.prompt_ids)) for it in items], "left"
    )

    def forward() -> None:
        with torch.inference_mode():
            engine.model(
                input_ids=padded.input_ids,
                attention_mask=padded.attention_mask,
                position_ids=padded.position_ids,
                use_cache=False,
            )

    capture()
    forward()
    for _ in range(args.repeats):
        for name, fn in (("capture", capture), ("forward", forward)):
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

        for name, fn in (("capture", capture), ("forward", forward)):
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
