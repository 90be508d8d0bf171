"""The benchmark scripts run end to end on a tiny model and report what they claim to measure.

Timings are not asserted (they live in bench/RESULTS.md); the call counts and the shape of the
comparison are, so a change that silently breaks a bench (or makes both sides do different
work) fails here rather than on a lent GPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = "tiny:llama?layers=6&hidden=32&heads=2&kv_heads=1&intermediate=64"


def run_bench(script: str, *args: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = proc.stdout.index("{")
    result: dict[str, object] = json.loads(proc.stdout[start:])
    return result


def test_steerer_bench_compares_the_same_search_batched_and_per_setting() -> None:
    steps, layers, questions = 4, 3, 3
    out = run_bench(
        "bench_steerer.py", "--model", TINY, "--precision", "fp32",
        "--layers", str(layers), "--steps", str(steps), "--questions", str(questions),
        "--max-new-tokens", "4", "--probes", "2,1",
    )  # fmt: skip
    batched, single = out["batched"], out["per_setting"]
    assert isinstance(batched, dict) and isinstance(single, dict)
    n_layers = len(out["layers"])  # type: ignore[arg-type]
    settings = n_layers * steps + 1  # + the unsteered baseline
    # probes=2: 4 settings per layer in 2 rounds, the baseline riding in the first.
    assert batched["loader_calls"] == math.ceil(steps / 2) == batched["judge_calls"]
    assert single["loader_calls"] == settings == single["judge_calls"]
    assert batched["loader_rows"] == single["loader_rows"] == settings * questions
    assert out["same_search_path"] is True
    other = out["batched_other_probes"]["1"]  # type: ignore[index]
    assert other["loader_calls"] == steps and other["runs_per_layer"] == batched["runs_per_layer"]
    assert out["speedup"] == round(single["wall_s"] / batched["wall_s"], 2)


def test_loader_bench_reports_every_comparison() -> None:
    out = run_bench(
        "bench_loader.py", "--model", TINY, "--precision", "fp32", "--device", "cpu",
        "--prompts", "3", "--new-tokens", "3", "--sweep-layers", "2", "--sweep-coefs", "2",
        "--capture-copies", "2", "--repeats", "2", "--card", "H100",
    )  # fmt: skip
    capture, gen, sweep = out["capture"], out["steered_generation"], out["sweep"]
    assert isinstance(capture, dict) and isinstance(gen, dict) and isinstance(sweep, dict)
    assert capture["rows"] == 6 and capture["ratio_capture_over_forward"] > 0
    assert capture["ratio_capture_over_forward_from_ids"] > 0
    assert gen["rows"] == 3 and gen["ratio_steered_throughput"] > 0
    assert sweep["rows"] == 2 * 2 * 3 and sweep["speedup"] > 0
    # Every timed phase carries its roofline (forced to the H100's peaks on this CPU) and the
    # fraction of it; the three sweep sides ran and their answers were compared.
    phases = [
        *capture["roofline"].values(),
        gen["roofline_steered"],
        *(
            sweep[side][p]
            for side in ("fast", "hf")
            for p in ("prefill", "one_batch", "one_setting_call")
        ),
        sweep["per_setting_calls"],
        sweep["seed_style_loop"],
    ]
    for phase in phases:
        assert phase["roofline_s"] > 0 and phase["fraction_of_roofline"] > 0
        assert phase["min_s"] <= phase["median_s"] <= phase["max_s"]
    # A decode step is derived, (whole - prefill) / steps: on a busy 2-core machine the two
    # timings' noise can outweigh a tiny model's few steps, so only its arithmetic is checked.
    for side in ("fast", "hf"):
        step = sweep[side]["decode_step"]
        assert step["roofline_s"] > 0
        assert math.isclose(step["fraction_of_roofline"], step["roofline_s"] / step["median_s"])
        assert step["min_s"] <= step["median_s"] <= step["max_s"]
    shared = sweep["fast"]["prefill"]["shared_work"]
    assert 0 < shared["tflop"] < sweep["fast"]["prefill"]["tflop"]  # less work after sharing
    assert sweep["fast"]["stats"]["rows"] == 12 and sweep["fast"]["stats"]["chunks"] >= 1
    assert sweep["same_answers_fast_vs_transformers"] == 1.0  # fp32 on a CPU
    assert sweep["speedup_vs_seed_loop"] > 0


def test_loader_bench_runs_only_the_parts_asked_for_and_names_a_bad_one() -> None:
    out = run_bench(
        "bench_loader.py", "--model", TINY, "--precision", "fp32", "--device", "cpu",
        "--prompts", "2", "--capture-copies", "1", "--repeats", "1", "--parts", "capture",
        "--profile",
    )  # fmt: skip
    assert "capture" in out and "steered_generation" not in out and "sweep" not in out
    assert out["capture"]["profile"]["top"]  # capture's busiest operators (kernels on a GPU)
    # On a CPU decode attends through SDPA: Triton (the default) and flash need CUDA.
    assert out["decode_attention"] == {
        "kernel": "sdpa", "triton_off": "not on a CUDA device", "flash_off": "not on a CUDA device",
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_loader.py"), "--parts", "capture,warp"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--parts" in proc.stderr and "warp" in proc.stderr


def test_profile_idle_finds_the_gpu_waiting_for_the_host() -> None:
    """The profile's idle analysis on a made-up timeline (microseconds): 100 us before the
    first kernel, a 300 us gap between two kernels (reported with its neighbours), a 10 us
    one (under the threshold), an overlapping kernel, the host's sync calls counted."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from bench.bench_loader import _idle

    def event(kind: DeviceType, name: str, start: float, end: float) -> SimpleNamespace:
        return SimpleNamespace(
            device_type=kind, name=name, time_range=SimpleNamespace(start=start, end=end)
        )

    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [
        event(cpu, "capture", 0.0, 2000.0),
        event(cpu, "cudaStreamSynchronize", 1500.0, 1560.0),
        event(gpu, "gemm", 100.0, 500.0),
        event(gpu, "norm", 450.0, 600.0),  # overlaps the gemm: no gap
        event(gpu, "attention", 900.0, 1000.0),  # 300 us after the norm
        event(gpu, "mean", 1010.0, 1400.0),  # 10 us: not a gap
    ]
    idle = _idle(events)
    assert idle["lead_ms"] == 0.1 and idle["tail_ms"] == 0.6
    assert idle["gaps"] == 1 and idle["gaps_ms"] == 0.3
    assert idle["largest"] == [{"ms": 0.3, "at_ms": 0.5, "after": "norm", "before": "attention"}]
    assert idle["sync_calls"] == {"cudaStreamSynchronize": {"count": 1, "ms": 0.06}}
