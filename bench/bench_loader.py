"""Loader benchmark: capture vs plain forward, steered vs unsteered generation, and a steering
sweep as one per-row-steered batch vs one generate call per setting. Prints JSON.

Every comparison runs the two sides on the same batch, in the same process, one after the
other (warm-up first, median of repeats), so the ratios are side by side.

    python bench/bench_loader.py --model smollm2-135m --precision bf16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from services.loader.engine import ChatPrompt, EngineItem, GenParams
from services.loader.positions import parse_position
from services.loader.server import build_runtime
from services.loader.steering import SteerSpec

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


def _paired(a: Any, b: Any, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """Median seconds of ``a`` and ``b`` timed alternately (a, b, a, b, ...), and the median of
    the per-pair ratios ``t_b / t_a``: drift of clocks or of a shared machine hits both sides."""
    a()
    b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_time(a, device, 1, warm=lambda: None))
        tb.append(_time(b, device, 1, warm=lambda: None))
    ratios = [y / x for x, y in zip(ta, tb, strict=True)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --precision, --device: shared by the loader benchmarks and diagnostics."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="auto")


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    runtime = build_runtime(args.model, args.precision, device=args.device)
    engine = runtime.engine
    device = engine.device
    prompts = [
        engine.encode_prompt(ChatPrompt((("user", q),)), "bench") for q in QUESTIONS[: args.prompts]
    ]
    result: dict[str, Any] = {
        "variant": runtime.variant,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "prompts": len(prompts),
    }

    params = GenParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    vec = torch.randn(engine.hidden_size, generator=torch.Generator().manual_seed(0))
    vec = vec / vec.norm()

    def capture_part() -> None:
        # 1. Capture (all layers, response[:] mean) vs a plain forward of the same padded batch.
        cap_items = capture_items(engine, args.capture_copies, args.prompts)
        tokens = sum(it.length for it in cap_items)
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
            # The same forward starting where capture starts: token-id lists, padded per call.
            forward(engine.model, pad())

        # A CUDA graph is recorded the second time a bucket is seen: time those first calls.
        engine.graphs.clear()
        first_calls = []
        for _ in range(2):
            _sync(device)
            start = time.perf_counter()
            capture()
            _sync(device)
            first_calls.append(time.perf_counter() - start)
        t_cap, t_fwd, ratio = _paired(capture, plain_forward, device, args.repeats)
        _, t_ids, ratio_ids = _paired(capture, forward_from_ids, device, args.repeats)
        t_eager, _, ratio_eager = _paired(capture_eager, plain_forward, device, args.repeats)
        _, _, ratio_graph_eager = _paired(capture, capture_eager, device, args.repeats)
        result["capture"] = {
            "rows": len(cap_items),
            "tokens": tokens,
            "capture_tokens_per_s": tokens / t_cap,
            "forward_tokens_per_s": tokens / t_fwd,
            "ratio_capture_over_forward": ratio,
            "forward_from_ids_tokens_per_s": tokens / t_ids,
            "ratio_capture_over_forward_from_ids": ratio_ids,
            "graphs": {
                "max_graphs": graphs,
                "recorded": engine.graphs.recorded,
                "replays": engine.graphs.replays,
                "disabled": engine.graphs.disabled,
                "first_call_s": first_calls[0],
                "recording_call_s": first_calls[1],
            },
            "capture_eager_tokens_per_s": tokens / t_eager,
            "ratio_capture_eager_over_forward": ratio_eager,
            "ratio_capture_graph_over_eager": ratio_graph_eager,
            "repeats": args.repeats,
            "note": "capture: every layer, response[:] mean, no lm_head (replayed from a CUDA "
            "graph where one applies; capture_eager: graphs off); forward: full CausalLM "
            "with logits on pre-padded device tensors; forward_from_ids: the same, padding the "
            "token-id lists per call as capture does",
        }

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
        result["steered_generation"] = {
            "rows": len(prompts),
            "new_tokens": args.new_tokens,
            "unsteered_s": t_plain,
            "steered_s": t_steer,
            "ratio_steered_throughput": ratio,
            "repeats": args.repeats,
        }

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

        def one_batch() -> None:
            engine.generate(sweep_items, params)

        def per_setting() -> None:
            for layer, coef in settings:
                engine.generate(
                    [EngineItem(p, steering=[SteerSpec((layer,), vec, coef)]) for p in prompts],
                    params,
                )

        def first_setting() -> None:
            layer, coef = settings[0]
            engine.generate(
                [EngineItem(p, steering=[SteerSpec((layer,), vec, coef)]) for p in prompts], params
            )

        t_batch = _time(one_batch, device, 1)
        t_loop = _time(per_setting, device, 1, warm=first_setting)
        result["sweep"] = {
            "layers": len(layers),
            "coefficients": len(coefs),
            "prompts": len(prompts),
            "rows": len(sweep_items),
            "new_tokens": args.new_tokens,
            "one_batch_s": t_batch,
            "per_setting_calls_s": t_loop,
            "speedup": t_loop / t_batch,
        }

    parts = {"capture": capture_part, "generation": generation_part, "sweep": sweep_part}
    for name in args.parts:
        parts[name]()
    return result


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
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sweep-layers", type=int, default=11)
    parser.add_argument("--sweep-coefs", type=int, default=5)
    parser.add_argument("--capture-copies", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--parts",
        type=_parts,
        default=list(PARTS),
        help="comma-separated subset of capture,generation,sweep",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
