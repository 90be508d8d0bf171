"""Loader benchmark: capture vs plain forward, steered vs unsteered generation, and a steering
sweep as one per-row-steered batch vs one generate call per setting, each phase against its
roofline (bench/roofline.py: what the card's peak FLOP/s and bandwidth allow for the work,
from the model's config and the unpadded token counts). Prints JSON; a table goes to stderr.

The sweep is timed on the loader's generation path (``fast``: services/loader/fastgen.py),
on transformers' generation with the static cache (``hf``: the loader before issue 16) and as
the seeds ran it (one transformers ``generate`` per setting with a forward hook). Each side's
phases: prefill (generate with 1 new token), each further decode step ((whole - prefill) /
(new tokens - 1)), the whole one-batch sweep, one per-setting call. Every comparison runs in
the same process on the same model, warm-up first; ranges are over the repeats.

    python bench/bench_loader.py --model smollm2-135m --precision bf16 --device cuda
    python bench/bench_loader.py --precision bf16 --device cuda --repeats 3 \
        --model 'tiny:llama?layers=16&hidden=4096&heads=32&kv_heads=8&intermediate=14336&bf16=1'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers

from bench.roofline import ModelShape, Work, card_for
from services.common import settings as settings_mod
from services.loader.decode_triton import DecodeTriton
from services.loader.engine import ChatPrompt, EngineItem, GenParams
from services.loader.positions import parse_position
from services.loader.server import build_runtime
from services.loader.steering import SteerSpec, first_prompt_layer

QUESTIONS = [
    "What is your favourite way to spend a rainy afternoon?",
    "How should I apologise to a friend I upset?",
    "Explain why the sky is blue.",
    "Give me advice for a job interview tomorrow.",
    "What do you think about people who are rude to waiters?",
    "How can I become better at chess?",
    "Describe the perfect breakfast.",
    "What would you do with a million dollars?",
    "Is it ever okay to lie?",
    "Tell me about the ocean at night.",
    "How do vaccines work?",
    "What makes a good leader?",
    "Write a short note to a neighbour about noise.",
    "What is the best way to learn a language?",
    "Why do cats purr?",
    "How should I handle a coworker who takes credit for my work?",
    "Describe a city you would like to visit.",
    "What are the benefits of exercise?",
    "How do I start a vegetable garden?",
    "What is the meaning of friendship?",
]
RESPONSE = "I think it depends on the situation, but generally I would say that patience and kindness help a lot."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Any, device: torch.device, repeats: int, warm: Any = None) -> float:
    (warm or fn)()  # warm-up (a cheaper call of the same shapes where given)
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _paired_times(
    a: Any, b: Any, device: torch.device, repeats: int
) -> tuple[list[float], list[float]]:
    """Seconds of ``a`` and ``b`` timed alternately (a, b, a, b, ...) after one call of each:
    drift of clocks or of a shared machine hits both sides."""
    a()
    b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_time(a, device, 1, warm=lambda: None))
        tb.append(_time(b, device, 1, warm=lambda: None))
    return ta, tb


def _median_ratio(ta: list[float], tb: list[float]) -> float:
    """The median of the per-pair ratios ``t_b / t_a`` of paired timings."""
    return statistics.median([y / x for x, y in zip(ta, tb, strict=True)])


def _paired(a: Any, b: Any, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """Median seconds of ``a`` and ``b`` timed alternately, and the median of the per-pair
    ratios ``t_b / t_a``."""
    ta, tb = _paired_times(a, b, device, repeats)
    return statistics.median(ta), statistics.median(tb), _median_ratio(ta, tb)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --precision, --device: shared by the loader benchmarks and diagnostics."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="auto")


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The workload's sizes and the roofline's card: shared by the loader and engines benches."""
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sweep-layers", type=int, default=11)
    parser.add_argument("--sweep-coefs", type=int, default=5)
    parser.add_argument("--capture-copies", type=int, default=4)
    parser.add_argument("--vector-norm", type=float, default=1.0, help="steering vector norm")
    parser.add_argument(
        "--card", default="", help="roofline peaks of this card (default: the device's name)"
    )


def capture_items(engine: Any, copies: int, prompts: int = len(QUESTIONS)) -> list[EngineItem]:
    """The capture workload: ``prompts`` chat questions replaying RESPONSE, ``copies`` times."""
    response = engine.encode_text(RESPONSE)
    asked = [engine.encode_prompt(ChatPrompt((("user", q),)), "bench") for q in QUESTIONS]
    return [EngineItem(p, response) for p in asked[:prompts]] * copies


def pad_items(engine: Any, items: list[EngineItem]) -> Any:
    """``items`` padded on the left as capture pads them (device tensors)."""
    return engine._pad(
        [(it.prompt_ids + it.response_ids, len(it.prompt_ids)) for it in items], "left"
    )


def forward(module: Any, padded: Any) -> None:
    """A plain forward of ``module`` (CausalLM or base model) on a padded batch."""
    with torch.inference_mode():
        module(
            input_ids=padded.input_ids,
            attention_mask=padded.attention_mask,
            position_ids=padded.position_ids,
            use_cache=False,
        )


def capture_mean(engine: Any, items: list[EngineItem]) -> None:
    """One capture of every layer, ``response[:]`` mean, all items in one call."""
    layers = list(range(engine.num_layers))
    position = parse_position("response[:]")
    for _ in engine.capture(items, layers, position, "mean", chunk_items=len(items)):
        pass


def _times(fn: Any, device: torch.device, repeats: int, warm: Any = None) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one warm-up call (``warm`` where given)."""
    (warm or fn)()
    _sync(device)
    out = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def _phase(times: list[float], work: Work | None, **extra: Any) -> dict[str, Any]:
    """A timed phase: median and range of its repeats, its roofline and the fraction of it."""
    median = statistics.median(times)
    out: dict[str, Any] = {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
    }
    if work is not None:
        out.update(work.report(median))
    out.update(extra)
    return out


def seed_style_loop(
    engine: Any, prompts: list[list[int]], settings: list[tuple[int, float]], vec: torch.Tensor,
    new_tokens: int,
) -> list[list[int]]:  # fmt: skip
    """The seeds' protocol: one transformers ``generate`` per setting (its default dynamic
    cache, greedy, ``new_tokens`` exactly) with a forward hook adding ``coef * vec`` to the
    output of one decoder layer at every position."""
    dev = engine.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), engine.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    answers: list[list[int]] = []
    for layer, coef in settings:
        delta = (vec * coef).to(dev, engine.dtype)

        def hook(_module: Any, _args: Any, output: Any, delta: torch.Tensor = delta) -> Any:
            if isinstance(output, tuple):
                return (output[0] + delta, *output[1:])
            return output + delta

        handle = engine.layers[layer].register_forward_hook(hook)
        try:
            with torch.inference_mode():
                out = engine.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=engine.pad_id,
                )
        finally:
            handle.remove()
        answers.extend(out[:, width:].tolist())
    return answers


def _profile(fn: Any, device: torch.device, top: int = 16) -> dict[str, Any]:
    """Kernel time of one call of ``fn`` (torch.profiler): the busiest kernels and the GPU's
    busy time (the sum of kernel times) against the wall time; the gap is host time (Python,
    launches, syncs) the GPU waited for. On a CPU: the busiest operators."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    wall = time.perf_counter() - start

    def self_time(event: Any) -> float:
        if not on_gpu:
            return float(event.self_cpu_time_total)
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, name):
                return float(getattr(event, name))
        return 0.0

    events = list(prof.key_averages())
    if on_gpu:  # kernels only: an operator's device time repeats its kernels'
        events = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
    events = [e for e in events if self_time(e) > 0]
    events.sort(key=self_time, reverse=True)
    busy = sum(self_time(e) for e in events) / 1e6
    return {
        "wall_s": wall,
        "gpu_kernel_s": busy if on_gpu else None,
        "top": [
            {"name": e.key[:90], "ms": round(self_time(e) / 1e3, 3), "calls": e.count}
            for e in events[:top]
        ],
        **({"idle": _idle_or_error(prof.events())} if on_gpu else {}),
    }


def _idle_or_error(events: Any) -> dict[str, Any]:
    """``_idle``, or why it failed (a profiler without the fields it reads): a diagnostic
    must not cost the bench its measurements."""
    try:
        return _idle(events)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def _idle(events: Any, top: int = 6) -> dict[str, Any]:
    """Where the GPU waited for the host in one profiled call: the time before its first
    kernel and after its last (against the host's first and last event), the gaps between
    kernels (the largest with the kernels around them and when they came), and the host's
    synchronising runtime calls."""
    from torch.autograd import DeviceType

    def span(e: Any) -> tuple[float, float]:
        return float(e.time_range.start), float(e.time_range.end)

    gpu = sorted(
        (*span(e), e.name) for e in events if getattr(e, "device_type", None) == DeviceType.CUDA
    )
    host = [span(e) for e in events if getattr(e, "device_type", None) == DeviceType.CPU]
    if not gpu or not host:
        return {}
    first = gpu[0][0]
    gaps = []
    end, before = gpu[0][1], gpu[0][2]
    for start, stop, name in gpu[1:]:
        if start - end > 20.0:  # microseconds
            gaps.append((start - end, end - first, before, name))
        if stop > end:
            end, before = stop, name
    gaps.sort(reverse=True)
    syncs: dict[str, list[float]] = {}
    for e in events:
        if getattr(e, "device_type", None) == DeviceType.CPU and (
            "Synchronize" in e.name or e.name.startswith("cudaMemcpy")
        ):
            start, stop = span(e)
            syncs.setdefault(e.name, []).append(stop - start)
    return {
        "lead_ms": round((first - min(h[0] for h in host)) / 1e3, 3),
        "tail_ms": round((max(h[1] for h in host) - end) / 1e3, 3),
        "gaps_ms": round(sum(g[0] for g in gaps) / 1e3, 3),
        "gaps": len(gaps),
        "largest": [
            {
                "ms": round(g / 1e3, 3),
                "at_ms": round(at / 1e3, 2),
                "after": a[:60],
                "before": b[:60],
            }
            for g, at, a, b in gaps[:top]
        ],
        "sync_calls": {
            k: {"count": len(v), "ms": round(sum(v) / 1e3, 3)} for k, v in syncs.items()
        },
    }


def _same_share(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a))


@contextlib.contextmanager
def generation_path(engine: Any, path: str) -> Iterator[None]:
    """``fast``: the loader's own path (fastgen); ``hf``: transformers' generation with the
    static cache, the loader's path before issue 16."""
    saved = engine.cache_mode
    engine.cache_mode = "auto" if path == "fast" else "static"
    try:
        yield
    finally:
        engine.cache_mode = saved


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["QSENS_LOADER_DECODE_KERNEL"] = args.decode_kernel
    settings_mod.reset()
    runtime = build_runtime(args.model, args.precision, device=args.device)
    engine = runtime.engine
    device = engine.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    card = card_for(args.card or name)
    shape = ModelShape.of(engine.config, args.precision)
    prompts = [
        engine.encode_prompt(ChatPrompt((("user", q),)), "bench") for q in QUESTIONS[: args.prompts]
    ]
    result: dict[str, Any] = {
        "variant": runtime.variant,
        "device": str(device),
        "device_name": name if device.type == "cuda" else platform.processor() or "cpu",
        "card_peaks": None if card is None else vars(card),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": _commit(),
        "command": " ".join(sys.argv),
        "model_shape": {**vars(shape), "parameters": shape.parameters},
        "fast_path": engine.fast_disabled or "on",
        "prompts": len(prompts),
        "prompt_tokens_mean": statistics.mean(len(p) for p in prompts),
    }
    fast = engine.fast

    def work(fn: str, *a: Any, **kw: Any) -> Work | None:
        return None if card is None else getattr(shape, fn)(card, *a, **kw)

    params = GenParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    first_only = GenParams(max_new_tokens=1, ignore_eos=True)
    vec = torch.randn(engine.hidden_size, generator=torch.Generator().manual_seed(0))
    vec = vec / vec.norm() * args.vector_norm

    def capture_part() -> None:
        # 1. Capture (all layers, response[:] mean) vs a plain forward of the same padded batch.
        cap_items = capture_items(engine, args.capture_copies, args.prompts)
        lengths = [it.length for it in cap_items]
        tokens = sum(lengths)
        graphs = engine.graphs.max_graphs

        def capture(use_graphs: bool = True) -> None:
            engine.graphs.max_graphs = graphs if use_graphs else 0
            capture_mean(engine, cap_items)
            engine.graphs.max_graphs = graphs

        def capture_eager() -> None:
            capture(False)

        def pad() -> Any:
            return pad_items(engine, cap_items)

        padded = pad()

        def plain_forward() -> None:
            forward(engine.model, padded)

        def forward_from_ids() -> None:
            forward(engine.model, pad())

        engine.graphs.clear()
        first_calls = []
        for _ in range(2):  # a CUDA graph is recorded the second time a bucket is seen
            _sync(device)
            start = time.perf_counter()
            capture()
            _sync(device)
            first_calls.append(time.perf_counter() - start)
        caps, fwds = _paired_times(capture, plain_forward, device, args.repeats)
        t_cap, t_fwd = statistics.median(caps), statistics.median(fwds)
        ratio = _median_ratio(caps, fwds)
        _, t_ids, ratio_ids = _paired(capture, forward_from_ids, device, args.repeats)
        eagers, fwds_e = _paired_times(capture_eager, plain_forward, device, args.repeats)
        t_eager = statistics.median(eagers)
        ratio_eager = _median_ratio(eagers, fwds_e)
        cap_work = work("forward", lengths, head=False, cache=False)
        fwd_work = work("forward", lengths, head=True, cache=False)
        result["capture"] = {
            "rows": len(cap_items),
            "tokens": tokens,
            "padded_tokens": len(cap_items) * max(lengths),
            "capture_tokens_per_s": tokens / t_cap,
            "forward_tokens_per_s": tokens / t_fwd,
            "ratio_capture_over_forward": ratio,
            "forward_from_ids_tokens_per_s": tokens / t_ids,
            "ratio_capture_over_forward_from_ids": ratio_ids,
            "capture_eager_tokens_per_s": tokens / t_eager,
            "ratio_capture_eager_over_forward": ratio_eager,
            "roofline": {
                "capture": _phase(caps, cap_work),
                "capture_eager": _phase(eagers, cap_work),
                "forward": _phase(fwds, fwd_work),
            },
            "graphs": {
                "max_graphs": graphs,
                "recorded": engine.graphs.recorded,
                "replays": engine.graphs.replays,
                "disabled": engine.graphs.disabled,
                "first_call_s": first_calls[0],
                "recording_call_s": first_calls[1],
            },
            "repeats": args.repeats,
            "note": "capture: every layer, response[:] mean, no lm_head (replayed from a CUDA "
            "graph where one applies; capture_eager: graphs off); forward: full CausalLM "
            "with logits on pre-padded device tensors; forward_from_ids: the same, padding the "
            "token-id lists per call as capture does. Roofline: bench/roofline.py over the "
            "unpadded tokens; times are medians of paired repeats",
        }
        if args.profile:  # where capture's time goes besides its matmuls
            result["capture"]["profile"] = _profile(capture, device)

    def generation_part() -> None:
        # 2. Steered vs unsteered generation (equal work: end-of-turn ignored).
        mid = engine.num_layers // 2
        plain_items = [EngineItem(p) for p in prompts]
        steered_items = [EngineItem(p, steering=[SteerSpec((mid,), vec, 4.0)]) for p in prompts]
        t_steer, t_plain, ratio = _paired(
            lambda: engine.generate(steered_items, params),
            lambda: engine.generate(plain_items, params),
            device,
            args.repeats,
        )
        gen_work = work("generate", [len(p) for p in prompts], args.new_tokens)
        out: dict[str, Any] = {
            "rows": len(prompts),
            "new_tokens": args.new_tokens,
            "unsteered_s": t_plain,
            "steered_s": t_steer,
            "ratio_steered_throughput": ratio,
            "repeats": args.repeats,
            "roofline_steered": _phase([t_steer], gen_work),
        }
        if args.compare_hf:
            with generation_path(engine, "hf"):
                hf = _times(lambda: engine.generate(steered_items, params), device, args.repeats)
            out["transformers_path_steered"] = _phase(hf, gen_work)
        result["steered_generation"] = out

    def sweep_part() -> None:
        # 3. Sweep: layers x coefficients x prompts as one per-row batch vs one call per setting.
        layers = [
            round(i * (engine.num_layers - 1) / (args.sweep_layers - 1))
            for i in range(args.sweep_layers)
        ]
        coefs = [c for c in (-8.0, -4.0, 2.0, 4.0, 8.0)][: args.sweep_coefs]
        settings = [(layer, coef) for layer in layers for coef in coefs]
        sweep_items = [
            EngineItem(p, steering=[SteerSpec((layer,), vec, coef)])
            for layer, coef in settings
            for p in prompts
        ]
        lengths = [len(it.prompt_ids) for it in sweep_items]
        groups = [k % len(prompts) for k in range(len(sweep_items))]
        first = [first_prompt_layer(it.steering, engine.num_layers) for it in sweep_items]
        setting_lengths = [len(p) for p in prompts]

        def one_setting(path: str) -> Any:
            layer, coef = settings[len(settings) // 2]
            items = [EngineItem(p, steering=[SteerSpec((layer,), vec, coef)]) for p in prompts]

            def call() -> None:
                with generation_path(engine, path):
                    engine.generate(items, params)

            return call

        def batch(path: str, p: GenParams) -> Any:
            def call() -> list[list[int]]:
                with generation_path(engine, path):
                    return [g.token_ids for g in engine.generate(sweep_items, p)]

            return call

        answers: dict[str, list[list[int]]] = {}
        out: dict[str, Any] = {
            "layers": len(layers),
            "coefficients": len(coefs),
            "prompts": len(prompts),
            "rows": len(sweep_items),
            "new_tokens": args.new_tokens,
            "prompt_tokens": sum(lengths),
        }
        paths = ["fast", "hf"] if args.compare_hf and fast is not None else ["fast"]
        if fast is None:
            paths = ["hf"]
        for path in paths:
            answers[path] = batch(path, params)()
            t_first = _times(batch(path, first_only), device, args.repeats)
            t_whole = _times(batch(path, params), device, args.repeats)
            stats = vars(fast.last) if path == "fast" and fast and fast.last else None
            t_call = _times(one_setting(path), device, args.repeats)
            steps = max(1, args.new_tokens - 1)
            per_step = [(w - f) / steps for w, f in zip(t_whole, t_first, strict=True)]
            side: dict[str, Any] = {
                "prefill": _phase(t_first, work("prefill", lengths)),
                "decode_step": _phase(
                    per_step,
                    None
                    if card is None
                    else shape.decode_steps(card, lengths, args.new_tokens).scaled(1 / steps),
                ),
                "one_batch": _phase(t_whole, work("generate", lengths, args.new_tokens)),
                "one_setting_call": _phase(
                    t_call, work("generate", setting_lengths, args.new_tokens)
                ),
            }
            if stats is not None:
                side["stats"] = stats
            if path == "fast" and card is not None:
                shared = shape.shared_prefill(card, lengths, groups, first)
                side["prefill"]["shared_work"] = shared.report(statistics.median(t_first))
                whole = shared + shape.decode_steps(card, lengths, args.new_tokens)
                side["one_batch"]["shared_work"] = whole.report(statistics.median(t_whole))
            out[path] = side

        if "fast" in paths and fast is not None and fast.decode_triton.disabled is None:
            # Side by side: the same one-batch sweep with torch's flash kernel attending in
            # the decode steps instead of the Triton kernel.
            triton_kernel = fast.decode_triton
            fast.decode_triton = DecodeTriton(False)
            try:
                flash_answers = batch("fast", params)()
                t_flash = _times(batch("fast", params), device, args.repeats)
            finally:
                fast.decode_triton = triton_kernel
            out["one_batch_flash_decode"] = _phase(
                t_flash, work("generate", lengths, args.new_tokens)
            )
            # The whole call's ratio (prefill included, the same in both).
            out["one_batch_flash_over_triton"] = (
                statistics.median(t_flash) / out["fast"]["one_batch"]["median_s"]
            )
            out["same_answers_triton_vs_flash"] = _same_share(answers["fast"], flash_answers)

        # The per-setting loop on the loader's path (one call per setting).
        def per_setting() -> None:
            for layer, coef in settings:
                engine.generate(
                    [EngineItem(p, steering=[SteerSpec((layer,), vec, coef)]) for p in prompts],
                    params,
                )

        t_loop = _times(per_setting, device, 1, warm=one_setting(paths[0]))
        loop_work = None
        if card is not None:
            loop_work = Work()
            for _ in settings:
                loop_work += shape.generate(card, setting_lengths, args.new_tokens)
        out["per_setting_calls"] = _phase(t_loop, loop_work, path=paths[0])
        t_batch = out[paths[0]]["one_batch"]["median_s"]
        out["one_batch_s"] = t_batch
        out["per_setting_calls_s"] = t_loop[0]
        out["speedup"] = t_loop[0] / t_batch
        if args.seed_loop:
            seed_answers: list[list[int]] = []

            def seed() -> None:
                seed_answers[:] = seed_style_loop(engine, prompts, settings, vec, args.new_tokens)

            def seed_warm() -> None:
                seed_style_loop(engine, prompts, settings[:1], vec, args.new_tokens)

            t_seed = _times(seed, device, 1, warm=seed_warm)
            out["seed_style_loop"] = _phase(t_seed, loop_work)
            out["speedup_vs_seed_loop"] = t_seed[0] / t_batch
            out["same_answers_seed_vs_batch"] = _same_share(seed_answers, answers[paths[0]])
            out["same_first_token_seed_vs_batch"] = _same_share(
                [a[:1] for a in seed_answers], [a[:1] for a in answers[paths[0]]]
            )
            if "hf" in answers:  # the noise level: transformers vs transformers, batched
                out["same_answers_seed_vs_transformers"] = _same_share(seed_answers, answers["hf"])
        if "hf" in answers and "fast" in answers:
            out["same_answers_fast_vs_transformers"] = _same_share(answers["fast"], answers["hf"])
            out["same_first_token_fast_vs_transformers"] = _same_share(
                [a[:1] for a in answers["fast"]], [a[:1] for a in answers["hf"]]
            )
            out["speedup_vs_transformers_path"] = (
                out["hf"]["one_batch"]["median_s"] / out["fast"]["one_batch"]["median_s"]
            )
        if args.profile:
            # Prefill alone, then the whole call (decode is the difference).
            out["profile"] = {
                f"{path}_{part}": _profile(batch(path, p), device)
                for path in paths
                for part, p in (("prefill", first_only), ("whole", params))
            }
        result["sweep"] = out

    parts = {"capture": capture_part, "generation": generation_part, "sweep": sweep_part}
    for part in args.parts:
        parts[part]()
    if fast is not None:  # which decode attention ran (a kernel switches itself off on failure)
        result["decode_attention"] = {
            "kernel": "triton"
            if fast.decode_triton.disabled is None
            else "flash"
            if fast.decode_flash.disabled is None
            else "sdpa",
            "triton_off": fast.decode_triton.disabled,
            "flash_off": fast.decode_flash.disabled,
        }
    return result


def _commit() -> str:
    """The commit measured: $QSENS_BENCH_COMMIT (a device copy of the tree has no .git), else
    git's HEAD."""
    if os.environ.get("QSENS_BENCH_COMMIT"):
        return os.environ["QSENS_BENCH_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def summary(result: dict[str, Any]) -> str:
    """A short table of every phase with a roofline: measured, roofline, fraction."""
    rows = [f"{result['variant']} on {result['device_name']} ({result['commit']})"]

    def add(name: str, phase: dict[str, Any] | None) -> None:
        if not phase:
            return
        frac = phase.get("fraction_of_roofline")
        roof = phase.get("roofline_s")
        rows.append(
            f"  {name:<34} {phase['median_s'] * 1e3:>10.1f} ms"
            f"  [{phase['min_s'] * 1e3:.1f}-{phase['max_s'] * 1e3:.1f}]"
            + (f"  roofline {roof * 1e3:9.1f} ms  {frac:6.1%}" if roof else "")
        )

    cap = result.get("capture", {}).get("roofline", {})
    for key in ("capture", "capture_eager", "forward"):
        add(f"capture: {key}", cap.get(key))
    gen = result.get("steered_generation", {})
    add("generation: steered (fast)", gen.get("roofline_steered"))
    add("generation: steered (transformers)", gen.get("transformers_path_steered"))
    sweep = result.get("sweep", {})
    for path in ("fast", "hf"):
        for key in ("prefill", "decode_step", "one_batch", "one_setting_call"):
            add(f"sweep {path}: {key}", sweep.get(path, {}).get(key))
    add("sweep: per-setting calls (loader)", sweep.get("per_setting_calls"))
    add("sweep: seed-style loop", sweep.get("seed_style_loop"))
    for key in ("speedup_vs_seed_loop", "speedup_vs_transformers_path", "speedup"):
        if key in sweep:
            rows.append(f"  {key}: {sweep[key]:.1f}x")
    return "\n".join(rows)


PARTS = ("capture", "generation", "sweep")


def _parts(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in PARTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--parts: {bad or text!r} not in {', '.join(PARTS)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_args(parser)
    add_workload_args(parser)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--compare-hf",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time transformers' generation (the loader's path before issue 16)",
    )
    parser.add_argument(
        "--seed-loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the seeds' protocol: one transformers generate per setting",
    )
    parser.add_argument(
        "--profile", action="store_true", help="kernel profiles of the sweep and of capture"
    )
    parser.add_argument(
        "--decode-kernel",
        choices=("flash", "triton"),
        default="triton",
        help="the fast path's decode attention on a GPU (setting decode_kernel, default triton "
        "as in serving); with triton the one-batch sweep is timed again with flash beside it",
    )
    parser.add_argument(
        "--parts",
        type=_parts,
        default=list(PARTS),
        help="comma-separated subset of capture,generation,sweep",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(json.dumps(result, indent=2))
    print(summary(result), file=sys.stderr)


if __name__ == "__main__":
    main()
