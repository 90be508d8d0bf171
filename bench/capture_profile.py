"""Where a large capture spends its time on a GPU (diagnostic for issue 2's capture target).

Times, side by side on the same padded batch (median of paired repeats): the full CausalLM
forward, the base model alone, and capture with fused vs per-layer reduction and pinned vs
pageable result copies; plus the bare device-to-host copy of a capture-sized result. Prints
JSON.  python bench/capture_profile.py --device cuda --copies 4,16,64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.bench_loader import (
    _sync,
    add_model_args,
    capture_items,
    capture_mean,
    forward,
    pad_items,
)
from services.loader.server import build_runtime


def _timed(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median seconds of each function, the functions timed round-robin (drift hits all)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _kernels(fn: Callable[[], Any], top: int, calls: int = 3) -> dict[str, Any]:
    """GPU time per call of ``fn`` by kernel (torch.profiler), the ``top`` largest."""
    try:
        return _kernel_table(fn, top, calls)
    except Exception as exc:  # a diagnostic: report, do not lose the timings
        return {"error": f"{type(exc).__name__}: {exc}"}


def _kernel_table(fn: Callable[[], Any], top: int, calls: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [
        (e.key, getattr(e, "self_device_time_total", 0.0) / calls / 1e3, e.count / calls)
        for e in prof.key_averages()
        if getattr(e, "self_device_time_total", 0.0) > 0
    ]
    rows.sort(key=lambda r: -r[1])
    return {
        "gpu_ms_per_call": round(sum(r[1] for r in rows), 3),
        "top": [{"kernel": k[:90], "ms": round(ms, 3), "per_call": n} for k, ms, n in rows[:top]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_args(parser)
    parser.add_argument("--copies", default="4,16,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--graph-tokens", type=int, default=0, help="override capture_graph_tokens (0: keep)"
    )
    parser.add_argument(
        "--kernels", type=int, default=0, help="list the top N GPU kernels of forward and capture"
    )
    args = parser.parse_args()
    engine = build_runtime(args.model, args.precision, device=args.device).engine
    device = engine.device
    default_fuse = engine._capture_fuse_bytes()
    graphs = engine.graphs.max_graphs
    if args.graph_tokens:
        engine.graphs.max_tokens = args.graph_tokens
    out: list[dict[str, Any]] = []

    def profile(copies: int) -> dict[str, Any]:
        items = capture_items(engine, copies)
        padded = pad_items(engine, items)

        def capture(fuse: int | None, pinned: bool, graphs: int = 0) -> None:
            engine.settings = engine.settings.model_copy(update={"capture_fuse_bytes": fuse})
            engine.pinned_results = pinned
            engine.graphs.max_graphs = graphs
            capture_mean(engine, items)

        layers = engine.num_layers
        shape = (len(items), layers, engine.hidden_size)
        result = torch.randn(shape, device=device, dtype=engine.dtype)
        pinned_f32 = torch.empty(shape, dtype=torch.float32, pin_memory=device.type == "cuda")
        pinned_half = torch.empty(shape, dtype=engine.dtype, pin_memory=device.type == "cuda")

        def copy_pinned() -> None:
            pinned_f32.copy_(result.float(), non_blocking=True)

        def copy_half_then_float() -> None:
            pinned_half.copy_(result, non_blocking=True)
            _sync(device)
            pinned_half.float()

        fns: dict[str, Callable[[], Any]] = {
            "forward_causal_lm": lambda: forward(engine.model, padded),
            "forward_base": lambda: forward(engine.base, padded),
            "capture_graph": lambda: capture(default_fuse, True, graphs),
            "capture_fused_pinned": lambda: capture(default_fuse, True),
            "capture_fused_pageable": lambda: capture(default_fuse, False),
            "capture_fused_512mib_pinned": lambda: capture(512 << 20, True),
            "capture_per_layer_pinned": lambda: capture(0, True),
            "copy_f32_pageable": lambda: result.float().cpu(),
            "copy_f32_pinned": copy_pinned,
            "copy_half_pinned_then_float": copy_half_then_float,
        }
        times = _timed(fns, device, args.repeats)
        kernels = (
            {
                name: _kernels(fns[name], args.kernels)
                for name in ("forward_base", "capture_fused_pinned", "capture_graph")
            }
            if args.kernels and device.type == "cuda"
            else {}
        )
        tokens = sum(it.length for it in items)
        return {
            "rows": len(items),
            "tokens": tokens,
            "padded_shape": list(padded.input_ids.shape),
            "result_mb_f32": pinned_f32.numel() * 4 / 1e6,
            "ms": {k: round(v * 1e3, 2) for k, v in times.items()},
            "ratio_capture_fused_pinned_over_forward": times["forward_causal_lm"]
            / times["capture_fused_pinned"],
            "ratio_capture_graph_over_forward": times["forward_causal_lm"] / times["capture_graph"],
            "kernels": kernels,
        }

    for copies in (int(c) for c in args.copies.split(",")):
        out.append(profile(copies))
        print(json.dumps(out[-1]), file=sys.stderr)
    print(json.dumps({"device": str(device), "model": args.model, "sizes": out}, indent=1))


if __name__ == "__main__":
    main()
