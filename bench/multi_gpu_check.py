"""Issue 20's whole GPU check in one command, printing one JSON document:

1. **placement**: the 70B-shaped random model (``tiny:llama`` with Llama-3.3-70B dimensions,
   ``direct=1``: its weights are drawn layer by layer on their GPUs, never whole anywhere)
   placed over the visible GPUs at bf16, as the loader places it;
2. **equality**: a model that fits one card both ways (the same shape, fewer layers), loaded on
   one GPU and split over ``--split-gpus``: weights, capture (every layer, mean and last),
   steered and ablated generation, Score and NextToken compared;
3. **bench**: the loader bench (bench/bench_loader.py, a child process each) on the 70B shape
   across GPUs side by side with the same shape at fewer layers on one GPU: capture / forward,
   steered / unsteered, the sweep as one batch vs one call per setting, per-GPU peak memory.

    python bench/multi_gpu_check.py                   # a 2- or 4-GPU machine, about 6 min
    python bench/multi_gpu_check.py --parts equality  # one part
    python bench/multi_gpu_check.py --out "$OUT/multi_gpu.json"  # also to a file, part by part

``--cpu-devices N`` is a dry run on the CPU with tiny shapes: the split engine's layers are
told apart as ``cpu`` and ``cpu:0`` (as tests/loader/test_multi_device.py does), so the
engine takes its multi-device paths; the bench children run on the CPU, unsplit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from services.common import settings as settings_mod
from services.common.variants import Precision, parse_precision
from services.loader.backends.base import LoadedModel
from services.loader.backends.hf import load_tokenizer
from services.loader.backends.registry import load_engine
from services.loader.engine import Engine, EngineItem, GenParams, ScoreInput
from services.loader.model_source import ResolvedSource, resolve_source
from services.loader.placement import (
    DeviceMemory,
    choose_placement,
    meta_model,
    place,
    total_bytes,
    units_of,
)
from services.loader.positions import parse_position
from services.loader.steering import SteerSpec
from services.loader.tiny_direct import build_direct

REPO = Path(__file__).resolve().parents[1]
LLAMA_70B = "hidden=8192&heads=64&kv_heads=8&intermediate=28672&direct=1"
PROMPTS = ["Tell me about lighthouses.", "What is the capital of France?", "Write a haiku."]
PARTS = ("placement", "equality", "bench")
GIB = 2**30
# The loader bench at a size that runs the 80-layer model within minutes (the standard sweep
# is 11 layers x 5 coefficients x 20 prompts = 1 100 rows); both sides run the same flags.
GPU_BENCH = ["--repeats", "3", "--sweep-layers", "5", "--sweep-coefs", "3", "--no-seed-loop"]
CPU_BENCH = [
    *("--repeats", "1", "--prompts", "2", "--new-tokens", "4", "--capture-copies", "1"),
    *("--sweep-layers", "2", "--sweep-coefs", "1", "--no-seed-loop", "--no-compare-hf"),
]


def tiny_70b(layers: int) -> str:
    return f"tiny:llama?layers={layers}&{LLAMA_70B}"


@contextlib.contextmanager
def loader_env(**values: str) -> Iterator[None]:
    """``QSENS_LOADER_<KEY>`` set for the block, the settings cache reset around it."""
    saved = {k: os.environ.get(f"QSENS_LOADER_{k.upper()}") for k in values}
    os.environ.update({f"QSENS_LOADER_{k.upper()}": v for k, v in values.items()})
    settings_mod.reset()
    try:
        yield
    finally:
        for key, old in saved.items():
            name = f"QSENS_LOADER_{key.upper()}"
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        settings_mod.reset()


def _source(model: str) -> ResolvedSource:
    return resolve_source(model, settings_mod.get(settings_mod.CommonSettings).cache_dir)


# ------------------------------------------------------------------------------ placement
def placement_part(model: str, precision: Precision) -> dict[str, Any]:
    """Where the loader would put ``model`` over the visible GPUs now (no weights made)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(_source(model).folder))
    units = units_of(meta_model(config), precision)
    count = torch.cuda.device_count()
    free = [int(torch.cuda.mem_get_info(i)[0]) for i in range(count)]
    loader = settings_mod.get(settings_mod.LoaderSettings)
    devices = [DeviceMemory(i, f) for i, f in enumerate(free)]
    chosen = choose_placement(config, precision, devices, headroom=loader.gpu_headroom)
    return {
        "model": model,
        "weights_gib": total_bytes(units) / GIB,
        "free_gib": [f / GIB for f in free],
        "gpus": 1 if chosen is None else len(chosen.devices),
        "note": "fits one GPU" if chosen is None else chosen.note(),
    }


# ------------------------------------------------------------------------------- equality
def cpu_split_engine(source: ResolvedSource, precision: Precision, n: int) -> Engine:
    """The direct tiny model built over ``n`` CPU "devices" (units placed by ``place``), its
    layers told apart as ``cpu`` / ``cpu:0`` so the engine runs its multi-device paths."""
    from transformers import AutoConfig

    from services.loader.engines.hf import core
    from services.loader.engines.hf.engine import HFEngine

    units = units_of(meta_model(AutoConfig.from_pretrained(str(source.folder))), precision)
    devices = [DeviceMemory(i, total_bytes(units)) for i in range(n)]
    placement = place(units, devices, headroom=0.0, count=n)
    dtype = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16}[precision]
    model = build_direct(source.folder, dict.fromkeys(placement.device_map, "cpu"), dtype)
    labels = {i: torch.device("cpu") if i % 2 == 0 else torch.device("cpu", 0) for i in range(n)}
    layer_map = [
        labels[int(placement.device_map[f"model.layers.{i}"])]
        for i in range(model.config.num_hidden_layers)
    ]
    loaded = LoadedModel(
        model, load_tokenizer(source), torch.device("cpu"), dtype, {}, [placement.note()]
    )
    # The engine reads each layer's device once, at construction.
    saved = getattr(core, "layer_devices")  # noqa: B009 - patched for the construction only
    setattr(core, "layer_devices", lambda _layers, _default: dict(enumerate(layer_map)))  # noqa: B010
    try:
        settings = settings_mod.get(settings_mod.LoaderSettings)
        return HFEngine(loaded, settings, precision)
    finally:
        setattr(core, "layer_devices", saved)  # noqa: B010


def outputs(engine: Engine) -> dict[str, Any]:
    """Every RPC's numbers on fixed inputs: captures, greedy tokens, Score, NextToken."""
    hidden, layers = engine.hidden_size, engine.num_layers
    steer = [
        SteerSpec((layers // 2,), torch.linspace(-1, 1, hidden), 4.0, positions="response"),
        SteerSpec(
            (layers // 4, 3 * layers // 4), torch.cos(torch.arange(hidden) * 1.0), 1.0, "ablate"
        ),
    ]
    items = [EngineItem(engine.encode_prompt(p, "x"), steering=steer) for p in PROMPTS]
    plain = [EngineItem(engine.encode_prompt(p, "x")) for p in PROMPTS]
    out: dict[str, Any] = {}
    for reduction in ("mean", "last"):
        chunks = engine.capture(items, list(range(layers)), parse_position("prompt[:]"), reduction)
        out[f"capture_{reduction}"] = torch.stack(
            [r.activations.float().cpu() for c in chunks for r in c]
        )
    gen = engine.generate(plain + items, GenParams(max_new_tokens=16, ignore_eos=True))
    out["tokens"] = [g.token_ids for g in gen]
    conts = [engine.encode_text(t) for t in (" the sea", " Paris")]
    scored = engine.score([ScoreInput(it.prompt_ids, conts, [8, 6], steer) for it in items])
    out["score"] = torch.tensor([[s.logprob for s in row] for row in scored])
    nt = engine.next_token(items, top_k=5, token_ids=[3, 7, 11])
    out["next_token"] = torch.tensor([r.requested_logits for r in nt])
    model = getattr(engine, "model", None)
    out["weights"] = (
        {} if model is None else {n: float(p.double().sum()) for n, p in model.named_parameters()}
    )
    return out


def compare(single: dict[str, Any], split: dict[str, Any], rtol: float) -> dict[str, Any]:
    """Largest differences, relative to the reference's largest magnitude (at least 1)."""
    keys = ("capture_mean", "capture_last", "score", "next_token")
    diffs = {k: float((split[k] - single[k]).abs().max()) for k in keys}
    rel = {k: diffs[k] / max(1.0, float(single[k].abs().max())) for k in keys}
    same = sum(a == b for a, b in zip(single["tokens"], split["tokens"], strict=True))
    return {
        "weights_equal": bool(single["weights"]) and single["weights"] == split["weights"],
        "max_abs_diff": diffs,
        "max_rel_diff": rel,
        "rtol": rtol,
        "generations_equal": f"{same}/{len(single['tokens'])}",
        "within_tolerance": all(v <= rtol for v in rel.values()),
    }


def _release(engine: Engine) -> None:
    engine.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def equality_part(args: argparse.Namespace, precision: Precision) -> dict[str, Any]:
    model, cpu = args.equal_model, bool(args.cpu_devices)
    n = args.cpu_devices or args.split_gpus or torch.cuda.device_count()
    source = _source(model)
    loader_args = {"device": "cpu" if cpu else "cuda"}
    with loader_env(gpus="1"):
        engine = load_engine(
            source, precision, settings=settings_mod.get(settings_mod.LoaderSettings), **loader_args
        )
        single = outputs(engine)
    _release(engine)
    del engine
    with loader_env(gpus=str(n)):
        if cpu:
            engine = cpu_split_engine(source, precision, n)
        else:
            engine = load_engine(
                source,
                precision,
                settings=settings_mod.get(settings_mod.LoaderSettings),
                **loader_args,
            )
        notes = engine.describe().notes
        split = outputs(engine)
    _release(engine)
    del engine
    rtol = args.rtol or (1e-4 if precision is Precision.FP32 else 2e-2)
    return {
        "model": model,
        "split_over": n,
        "placement": [x for x in notes if "layer-wise" in x],
        **compare(single, split, rtol),
    }


# ---------------------------------------------------------------------------------- bench
def bench_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a child process: bench/bench_loader.py's JSON for one model, plus each GPU's peak."""
    from bench import bench_loader

    argv = ["bench_loader.py", "--model", spec["model"], "--precision", spec["precision"]]
    saved_argv = sys.argv
    sys.argv = [*argv, "--device", spec["device"], *spec["flags"]]
    started = time.perf_counter()
    out = io.StringIO()
    gpus = {"gpus": str(spec["gpus"])} if spec["gpus"] else {}  # unset: the fewest that fit
    try:
        with loader_env(**gpus), contextlib.redirect_stdout(out):
            bench_loader.main()
    finally:
        sys.argv = saved_argv
    result: dict[str, Any] = json.loads(out.getvalue())
    result["wall_s"] = time.perf_counter() - started
    result["gpu_peak_gib"] = [
        torch.cuda.max_memory_allocated(i) / GIB for i in range(torch.cuda.device_count())
    ]
    return result


def _ratios(result: dict[str, Any]) -> dict[str, Any]:
    sweep = result.get("sweep", {})
    path = "fast" if "fast" in sweep else "hf"
    return {
        "variant": result.get("variant"),
        "parameters": result.get("model_shape", {}).get("parameters"),
        "generation_path": path,
        "fast_path": result.get("fast_path"),
        "gpu_peak_gib": [round(g, 2) for g in result.get("gpu_peak_gib", [])],
        "capture_over_forward": result.get("capture", {}).get("ratio_capture_over_forward"),
        "steered_over_unsteered": result.get("steered_generation", {}).get(
            "ratio_steered_throughput"
        ),
        "sweep_rows": sweep.get("rows"),
        "sweep_one_batch_s": sweep.get("one_batch_s"),
        "sweep_per_setting_calls_s": sweep.get("per_setting_calls_s"),
        "sweep_speedup": sweep.get("speedup"),
        "sweep_one_batch_of_roofline": sweep.get(path, {})
        .get("one_batch", {})
        .get("fraction_of_roofline"),
        "wall_s": result.get("wall_s"),
    }


def bench_part(args: argparse.Namespace) -> dict[str, Any]:
    """The bench on the big model across GPUs and the small one on one GPU, side by side."""
    cpu = bool(args.cpu_devices)
    sides = {"split": (args.big_model, 0), "single": (args.small_model, 1)}
    out: dict[str, Any] = {"flags": CPU_BENCH if cpu else GPU_BENCH}
    for side, (model, gpus) in sides.items():
        spec = {
            "model": model,
            "gpus": gpus,
            "precision": args.precision,
            "device": "cpu" if cpu else "cuda",
            "flags": out["flags"],
        }
        child = subprocess.run(
            [sys.executable, __file__, "--bench-child", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={k: v for k, v in os.environ.items() if k != "QSENS_LOADER_GPUS"},
        )
        if child.returncode != 0:
            out[side] = {"model": model, "error": child.stderr[-3000:]}
            continue
        out[side] = {"model": model, **_ratios(json.loads(child.stdout))}
    return out


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--layers", type=int, default=80, help="the big model's layers")
    parser.add_argument("--small-layers", type=int, default=16, help="fits one card both ways")
    parser.add_argument("--big-model", default="", help="default: the 70B shape, --layers")
    parser.add_argument("--small-model", default="", help="default: the 70B shape, --small-layers")
    parser.add_argument("--equal-model", default="", help="default: --small-model")
    parser.add_argument("--split-gpus", type=int, default=0, help="default: every visible GPU")
    parser.add_argument("--rtol", type=float, default=0.0, help="0: by dtype (bf16 2e-2)")
    parser.add_argument("--cpu-devices", type=int, default=0, help="dry run over N CPU labels")
    parser.add_argument("--out", default="", help="also write the report here, part by part")
    parser.add_argument("--bench-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tiny = "tiny:llama?layers={}&hidden=64&heads=4&kv_heads=2&intermediate=128&direct=1"
    big, small = (tiny.format(6), tiny.format(3)) if args.cpu_devices else (None, None)
    args.big_model = args.big_model or big or tiny_70b(args.layers)
    args.small_model = args.small_model or small or tiny_70b(args.small_layers)
    args.equal_model = args.equal_model or args.small_model
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in args.parts if p not in PARTS]
    if bad:
        parser.error(f"--parts: {', '.join(bad)} not in {', '.join(PARTS)}")
    if args.cpu_devices == 1 or args.cpu_devices < 0:
        parser.error("--cpu-devices: at least 2")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.bench_child:
        print(json.dumps(bench_child(json.loads(args.bench_child))))
        return {}
    precision = parse_precision(args.precision)
    cpu = bool(args.cpu_devices)
    if not cpu and torch.cuda.device_count() < 2:
        raise SystemExit("multi_gpu_check: fewer than 2 GPUs visible (--cpu-devices N dry-runs)")
    report: dict[str, Any] = {
        "mode": f"cpu dry run over {args.cpu_devices} labels" if cpu else "gpu",
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__,
        "precision": precision.value,
    }
    # The bench children first: this process then holds no model while they measure free
    # memory and place the 70B shape.
    steps = {
        "placement": lambda: placement_part(args.big_model, precision),
        "bench": lambda: bench_part(args),
        "equality": lambda: equality_part(args, precision),
    }
    for part in ("placement", "bench", "equality"):
        if part not in args.parts or (part == "placement" and cpu):
            continue
        started = time.perf_counter()
        report[part] = steps[part]()
        report.setdefault("part_s", {})[part] = round(time.perf_counter() - started, 1)
        print(f"multi_gpu_check: {part} done in {report['part_s'][part]} s", file=sys.stderr)
        if args.out:  # what is done survives a run cut short
            Path(args.out).write_text(json.dumps(report, indent=2))
    bench_ok = all("error" not in v for k, v in report.get("bench", {}).items() if k != "flags")
    report["ok"] = bench_ok and report.get("equality", {}).get("within_tolerance", True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
