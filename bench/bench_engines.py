"""Engine benchmark: the HF engine and the vLLM engine side by side on one model folder, through
the same ``Engine`` calls (``capture``, ``generate`` with per-row steering): the loader bench's
three ratios (capture / prefill of the same tokens, steered / unsteered generation, a sweep as
one per-row batch / one call per setting), the 1 100-row sweep (11 layers x 5 coefficients x
20 prompts, 32 new tokens, "all" positions of one layer per row, end-of-turn ignored) with its
roofline (bench/roofline.py) and the vLLM / HF time ratio of every phase, and an equality check
(greedy tokens and captured streams, vLLM vs HF, at coefficient 0 and a working coefficient).

Both engines live in one process: vLLM first (``--vllm-gpu-memory`` of the card: weights,
activations, KV cache), then the HF engine in what is left. Each phase runs under its own time
budget (``--budget``; a phase over it is cut and named in the JSON, the next one runs) and the
partial JSON is written to ``--out`` after every phase. Prints the JSON; a table to stderr.

    python bench/bench_engines.py --device cuda --repeats 3 --out engines.json \\
        --model 'tiny:llama?layers=16&hidden=4096&heads=32&kv_heads=8&intermediate=14336&bf16=1'
    # CPU smoke (the vLLM virtual environment):
    .venv-vllm/bin/python bench/bench_engines.py --device cpu --smoke \\
        --model 'tiny:llama?layers=2&hidden=128&heads=2&kv_heads=1&intermediate=256'
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers

from bench.bench_loader import (
    QUESTIONS,
    _commit,
    _paired,
    _phase,
    _times,
    add_workload_args,
    capture_items,
)
from bench.roofline import Card, ModelShape, Work, card_for
from services.common import settings as settings_mod
from services.common.settings import LoaderSettings
from services.loader.engine import ChatPrompt, EngineItem, GenParams
from services.loader.model_source import resolve_source
from services.loader.positions import parse_position
from services.loader.server import build_runtime
from services.loader.steering import SteerSpec

ENGINES = ("vllm", "hf")
PHASES = ("equality", "capture", "generation", "sweep")
# Seconds per phase and engine (the sweep's per-setting loop is 55 calls).
DEFAULT_BUDGETS = {"equality": 60.0, "capture": 60.0, "generation": 60.0, "sweep": 180.0}


class OverBudget(Exception):
    """A phase ran past its time budget."""


@contextlib.contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Raise ``OverBudget`` in this (main) thread once ``seconds`` have passed."""

    def expire(_signum: int, _frame: Any) -> None:
        raise OverBudget(f"over its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(0.001, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Bench:
    """The workloads, built once with one engine's tokenizer (both engines read the same
    folder's tokenizer), and the per-engine phases."""

    def __init__(self, args: argparse.Namespace, hf: Any, card: Card | None, folder: str) -> None:
        self.args = args
        self.card = card
        config = transformers.AutoConfig.from_pretrained(folder)
        self.shape = ModelShape.of(config, args.precision)
        self.num_layers = hf.num_layers
        asked = QUESTIONS[: args.prompts]
        self.prompts = [hf.encode_prompt(ChatPrompt((("user", q),)), "bench") for q in asked]
        self.cap_items = capture_items(hf, args.capture_copies, args.prompts)
        vec = torch.randn(hf.hidden_size, generator=torch.Generator().manual_seed(0))
        self.vec = vec / vec.norm() * args.vector_norm
        self.params = GenParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        self.first_only = GenParams(max_new_tokens=1, ignore_eos=True)
        n = args.sweep_layers
        self.layers = [round(i * (self.num_layers - 1) / max(1, n - 1)) for i in range(n)]
        coefs = (-8.0, -4.0, 2.0, 4.0, 8.0)[: args.sweep_coefs]
        self.settings = [(layer, coef) for layer in self.layers for coef in coefs]

    def work(self, fn: str, *a: Any, **kw: Any) -> Work | None:
        return None if self.card is None else getattr(self.shape, fn)(self.card, *a, **kw)

    def steered(self, layer: int, coef: float, prompts: list[list[int]]) -> list[EngineItem]:
        return [EngineItem(p, steering=[SteerSpec((layer,), self.vec, coef)]) for p in prompts]

    # ------------------------------------------------------------------ phases
    def capture(self, engine: Any) -> dict[str, Any]:
        """Capture of every layer (``response[:]`` mean, all items in one call) against the
        engine's own prefill of the same tokens (a generate of one token, no hooks)."""
        items = self.cap_items
        layers = list(range(self.num_layers))
        position = parse_position("response[:]")
        lengths = [it.length for it in items]
        whole = [EngineItem(it.prompt_ids + it.response_ids) for it in items]

        def capture() -> None:
            for _ in engine.capture(items, layers, position, "mean", chunk_items=len(items)):
                pass

        def prefill() -> None:
            engine.generate(whole, self.first_only)

        t_cap, t_pre, ratio = _paired(capture, prefill, _Dev(engine), self.args.repeats)
        return {
            "rows": len(items),
            "tokens": sum(lengths),
            "capture_tokens_per_s": sum(lengths) / t_cap,
            "prefill_tokens_per_s": sum(lengths) / t_pre,
            "ratio_capture_over_prefill": t_cap / t_pre,
            "ratio_capture_over_prefill_paired": 1 / ratio,
            "capture": _phase([t_cap], self.work("forward", lengths, head=False, cache=False)),
            "prefill": _phase([t_pre], self.work("prefill", lengths)),
        }

    def generation(self, engine: Any) -> dict[str, Any]:
        """Steered (middle layer, coefficient 4, every position) vs unsteered generation of
        the prompts, equal work (end-of-turn ignored)."""
        mid = self.num_layers // 2
        plain = [EngineItem(p) for p in self.prompts]
        steered = self.steered(mid, 4.0, self.prompts)
        t_steer, t_plain, ratio = _paired(
            lambda: engine.generate(steered, self.params),
            lambda: engine.generate(plain, self.params),
            _Dev(engine),
            self.args.repeats,
        )
        gen_work = self.work("generate", [len(p) for p in self.prompts], self.args.new_tokens)
        return {
            "rows": len(self.prompts),
            "unsteered": _phase([t_plain], gen_work),
            "steered": _phase([t_steer], gen_work),
            "ratio_steered_over_unsteered_paired": 1 / ratio,
        }

    def sweep(self, engine: Any) -> dict[str, Any]:
        """The sweep as one per-row batch (prefill alone, then the whole call; a decode step is
        the difference over the further steps) and as one call per setting."""
        items = [it for lay, c in self.settings for it in self.steered(lay, c, self.prompts)]
        lengths = [len(it.prompt_ids) for it in items]
        new = self.args.new_tokens
        dev = _Dev(engine)
        r = self.args.repeats
        t_first = _times(lambda: engine.generate(items, self.first_only), dev, r)
        t_whole = _times(lambda: engine.generate(items, self.params), dev, r)
        steps = max(1, new - 1)
        per_step = [(w - f) / steps for w, f in zip(t_whole, t_first, strict=True)]
        mid_layer, mid_coef = self.settings[len(self.settings) // 2]
        one = self.steered(mid_layer, mid_coef, self.prompts)
        t_call = _times(lambda: engine.generate(one, self.params), dev, r)

        def per_setting() -> None:
            for layer, coef in self.settings:
                engine.generate(self.steered(layer, coef, self.prompts), self.params)

        t_loop = _times(per_setting, dev, 1, warm=lambda: None)
        loop_work = None
        if self.card is not None:
            loop_work = Work()
            for _ in self.settings:
                loop_work += self.shape.generate(self.card, [len(p) for p in self.prompts], new)
        decode = None
        if self.card is not None:
            decode = self.shape.decode_steps(self.card, lengths, new).scaled(1 / steps)
        t_batch = statistics.median(t_whole)
        return {
            "rows": len(items),
            "settings": len(self.settings),
            "new_tokens": new,
            "prompt_tokens": sum(lengths),
            "prefill": _phase(t_first, self.work("prefill", lengths)),
            "decode_step": _phase(per_step, decode),
            "one_batch": _phase(t_whole, self.work("generate", lengths, new)),
            "one_setting_call": _phase(
                t_call, self.work("generate", [len(p) for p in self.prompts], new)
            ),
            "per_setting_calls": _phase(t_loop, loop_work),
            "speedup_one_batch_over_per_setting_calls": t_loop[0] / t_batch,
        }


class _Dev:
    """What bench_loader's timers sync on: a device with a ``type``."""

    def __init__(self, engine: Any) -> None:
        self.type = torch.device(engine.device_label()).type


def _tokens_agree(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """How far two engines' greedy tokens agree, row by row."""
    first = []
    for x, y in zip(a, b, strict=True):
        diff = [i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q]
        first.append(diff[0] if diff else min(len(x), len(y)))
    return {
        "rows": len(a),
        "same_rows": sum(x == y for x, y in zip(a, b, strict=True)),
        "same_first_token": sum(x[:1] == y[:1] for x, y in zip(a, b, strict=True)),
        "first_difference_at": first,
    }


def equality(bench: Bench, vllm: Any, hf: Any) -> dict[str, Any]:
    """Greedy tokens and captured streams of vLLM against HF on a few rows: unsteered, at
    coefficient 0 and at a working coefficient (``--work-scale`` x the stream's norm at the
    middle layer, so that steering changes the tokens of a random model too)."""
    args = bench.args
    rows = bench.prompts[: args.equality_rows]
    mid = bench.num_layers // 2
    position = parse_position("response[:]")
    probe = [EngineItem(p, hf.encode_text("I think")) for p in rows]
    (norms,) = list(hf.capture(probe, [mid], position, "mean", chunk_items=len(probe)))
    coef = args.work_scale * float(
        statistics.mean(float(r.activations.float().norm()) for r in norms)
    )
    params = GenParams(max_new_tokens=args.equality_tokens, ignore_eos=True)
    cases = {
        "unsteered": [EngineItem(p) for p in rows],
        "coef_0": bench.steered(mid, 0.0, rows),
        "working": bench.steered(mid, coef, rows),
    }
    out: dict[str, Any] = {"working_coefficient": coef, "layer": mid, "tokens": {}}
    answers: dict[str, dict[str, list[list[int]]]] = {}
    for name, items in cases.items():
        answers[name] = {
            e: [g.token_ids for g in eng.generate(items, params)]
            for e, eng in (("vllm", vllm), ("hf", hf))
        }
        out["tokens"][name] = _tokens_agree(answers[name]["vllm"], answers[name]["hf"])
    for e in ("vllm", "hf"):  # the working coefficient must move the tokens on each engine
        out[f"steering_changes_tokens_{e}"] = _tokens_agree(
            answers["working"][e], answers["unsteered"][e]
        )["same_rows"] < len(rows)
    reply = hf.encode_text(" The sea is deep and blue.")
    steer = [SteerSpec((mid,), bench.vec, coef)]
    cap = [EngineItem(p, reply) for p in rows] + [EngineItem(p, reply, steer) for p in rows]
    layers = list(range(bench.num_layers))
    got = {
        e: [r.activations.float() for chunk in eng.capture(cap, layers, position, "mean",
                                                    chunk_items=len(cap)) for r in chunk]
        for e, eng in (("vllm", vllm), ("hf", hf))
    }  # fmt: skip
    worst = 0.0
    for a, b in zip(got["vllm"], got["hf"], strict=True):
        rel = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)
        worst = max(worst, float(rel.max()))
    out["capture"] = {
        "rows": len(cap),
        "steered_rows": len(rows),
        "layers": len(layers),
        "max_relative_difference": worst,
    }
    return out


def _ratios(phase: str, result: dict[str, Any]) -> dict[str, float]:
    """vLLM time / HF time of each timed part of ``phase``."""
    keys = {
        "capture": ("capture", "prefill"),
        "generation": ("unsteered", "steered"),
        "sweep": ("prefill", "decode_step", "one_batch", "one_setting_call", "per_setting_calls"),
    }[phase]
    v, h = result.get("vllm", {}), result.get("hf", {})
    return {
        k: v[k]["median_s"] / h[k]["median_s"]
        for k in keys
        if isinstance(v.get(k), dict) and isinstance(h.get(k), dict)
    }


def _guarded(seconds: float, fn: Callable[[], Any], deadline: float) -> Any:
    """``fn()`` under a time budget, cut to what is left before ``deadline`` (monotonic
    seconds); a failure or overrun becomes ``{"error": ...}``."""
    started = time.perf_counter()
    seconds = min(seconds, deadline - time.monotonic())
    if seconds < 1:
        return {"error": "skipped: no time left before --total"}
    try:
        with budget(seconds):
            out = fn()
    except Exception as exc:  # a phase reports its failure and the next one runs
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    if isinstance(out, dict):
        out["phase_wall_s"] = time.perf_counter() - started
    return out


def _load(args: argparse.Namespace, engine: str) -> Any:
    settings = LoaderSettings(vllm_gpu_memory=args.vllm_gpu_memory)
    return build_runtime(
        args.model, args.precision, device=args.device, engine_name=engine, settings=settings
    ).engine


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load both engines, then every phase on each under its budget; the JSON after each
    phase goes to ``--out``."""
    result: dict[str, Any] = {
        "model": args.model,
        "precision": args.precision,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": _commit(),
        "command": " ".join(sys.argv),
        "budgets_s": args.budget,
        "load_s": {},
        "errors": {},
    }

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    deadline = time.monotonic() + args.total
    # The folder first (a bf16=1 tiny model draws its weights on the GPU), its memory given
    # back before vLLM sizes its KV cache from the free memory.
    started = time.perf_counter()
    common = settings_mod.get(settings_mod.CommonSettings)
    result["folder"] = str(resolve_source(args.model, common.cache_dir).folder)
    result["load_s"]["folder"] = time.perf_counter() - started
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    engines: dict[str, Any] = {}
    for name in ENGINES:
        started = time.perf_counter()
        loaded = _guarded(
            args.load_budget, lambda name=name: {"engine": _load(args, name)}, deadline
        )
        if "error" in loaded:
            result["errors"][f"load_{name}"] = loaded["error"]
        else:
            engines[name] = loaded["engine"]
            result["load_s"][name] = time.perf_counter() - started
        save()
    if not engines:
        return result
    base = engines.get("hf") or engines["vllm"]  # builds the workloads
    result["notes"] = {name: engine.load_notes() for name, engine in engines.items()}
    if "vllm" in engines:
        import vllm as vllm_module

        result["vllm"] = vllm_module.__version__
    result["device_name"] = (
        torch.cuda.get_device_name(0) if base.device_label().startswith("cuda") else "cpu"
    )
    card = card_for(args.card or result["device_name"])
    result["card_peaks"] = None if card is None else vars(card)
    bench = Bench(args, base, card, result["folder"])
    result["model_shape"] = {**vars(bench.shape), "parameters": bench.shape.parameters}
    result["prompt_tokens_mean"] = statistics.mean(len(p) for p in bench.prompts)
    for phase in args.phases:
        if phase == "equality":
            if len(engines) == 2:
                result["equality"] = _guarded(
                    args.budget[phase],
                    lambda: equality(bench, engines["vllm"], engines["hf"]),
                    deadline,
                )
            save()
            continue
        section: dict[str, Any] = {}
        for name, engine in engines.items():
            section[name] = _guarded(
                args.budget[phase], lambda e=engine, p=phase: getattr(bench, p)(e), deadline
            )
            result[phase] = section
            save()
        section["ratio_vllm_over_hf"] = _ratios(phase, section)
        save()
    return result


def summary(result: dict[str, Any]) -> str:
    """Each timed part: vLLM and HF medians, their ratio, the roofline fractions."""
    rows = [f"{result['model']} on {result.get('device_name')} (vLLM {result.get('vllm')})"]
    for phase in ("capture", "generation", "sweep"):
        section = result.get(phase, {})
        for key, ratio in section.get("ratio_vllm_over_hf", {}).items():
            v, h = section["vllm"][key], section["hf"][key]

            def frac(p: dict[str, Any]) -> str:
                f = p.get("fraction_of_roofline")
                return f"{f:6.1%}" if f is not None else "   n/a"

            rows.append(
                f"  {phase + ': ' + key:<30} vllm {v['median_s'] * 1e3:9.1f} ms {frac(v)}"
                f"   hf {h['median_s'] * 1e3:9.1f} ms {frac(h)}   vllm/hf {ratio:5.2f}"
            )
    if result.get("errors"):
        rows.append(f"  errors: {result['errors']}")
    return "\n".join(rows)


def _budgets(text: str) -> dict[str, float]:
    out = dict(DEFAULT_BUDGETS)
    for part in filter(None, (t.strip() for t in text.split(","))):
        name, _, seconds = part.partition("=")
        if name not in out:
            raise argparse.ArgumentTypeError(f"--budget: {name!r} not in {', '.join(out)}")
        out[name] = float(seconds)
    return out


def _phases(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in PHASES for n in names):
        raise argparse.ArgumentTypeError(f"--phases: {text!r}: a subset of {', '.join(PHASES)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny:llama?layers=2&hidden=64")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="auto")
    add_workload_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--equality-rows", type=int, default=4)
    parser.add_argument("--equality-tokens", type=int, default=16)
    parser.add_argument("--work-scale", type=float, default=2.0)
    parser.add_argument("--vllm-gpu-memory", type=float, default=0.45)
    parser.add_argument("--out", default="")
    parser.add_argument("--load-budget", type=float, default=240.0)
    parser.add_argument("--total", type=float, default=3600.0, help="seconds for the whole run")
    parser.add_argument("--budget", type=_budgets, default=dict(DEFAULT_BUDGETS))
    parser.add_argument("--phases", type=_phases, default=list(PHASES))
    parser.add_argument(
        "--smoke", action="store_true", help="a seconds-long run: few prompts, tokens, settings"
    )
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.new_tokens, args.sweep_layers, args.sweep_coefs = 3, 4, 2, 2
        args.capture_copies, args.repeats, args.equality_rows, args.equality_tokens = 1, 1, 2, 4
    result = run(args)
    print(json.dumps(result, indent=2))
    print(summary(result), file=sys.stderr)


if __name__ == "__main__":
    main()
