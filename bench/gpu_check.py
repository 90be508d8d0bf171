"""Correctness checks of the loader engine on an accelerator (run before trusting GPU numbers).

Prints JSON: batched vs unbatched capture (both padding sides), capture replayed from CUDA
graphs vs the same static-shape forward run eagerly and vs the eager path (other content and
positions in a recorded bucket: a replay must read the new inputs), coefficient-0 identity,
ablation residue, static vs dynamic cache generation, and an answer to a chat prompt; for the
fast generation path (services/loader/fastgen.py): decode steps replayed from a CUDA graph vs
the same static step run eagerly (exact), prefix-shared vs unshared rows, chunked vs one-chunk
prefill, batched vs single rows, coefficient 0 in generation, and the fast path vs
transformers' generation (dtype noise: agreement share and log-prob differences).

    python bench/gpu_check.py --model 'tiny:llama?layers=6&hidden=512&heads=8&kv_heads=2' \
        --precisions bf16,nf4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from services.common import settings as settings_mod
from services.loader.decode_triton import DecodeTriton
from services.loader.engine import ChatPrompt, EngineItem, GenParams
from services.loader.fastgen_kernels import DecodeFlash
from services.loader.positions import parse_position
from services.loader.server import build_runtime
from services.loader.steering import SteerSpec


def check(model: str, precision: str, device: str) -> dict[str, Any]:
    runtime = build_runtime(model, precision, device=device)
    e = runtime.engine
    chats = [
        (("system", "You are kind."), ("user", "What do you think of cats?")),
        (("user", "Hi"),),
        (("user", "Explain tides to a child in two sentences."),),
    ]
    responses = [
        "They are lovely animals.",
        "Hello there, how are you today, my friend?",
        "Moon pulls.",
    ]
    items = [
        EngineItem(e.encode_prompt(ChatPrompt(c), "x"), e.encode_text(r))
        for c, r in zip(chats, responses, strict=True)
    ]
    layers = list(range(e.num_layers))
    out: dict[str, Any] = {"variant": runtime.variant, "device": str(e.device)}
    worst: dict[str, float] = {}
    for side in ("left", "right"):
        for pos in ("prompt[-1]", "response[:]", "all"):
            position = parse_position(pos)
            batched = next(e.capture(items, layers, position, "mean", padding_side=side))  # type: ignore[arg-type]
            for i, item in enumerate(items):
                alone = next(e.capture([item], layers, position, "mean"))[0].activations
                rel = float((batched[i].activations - alone).norm() / alone.norm())
                key = f"{side}:{pos}"
                worst[key] = max(worst.get(key, 0.0), rel)
    out["capture_batch_vs_single_rel_err"] = worst
    out["capture_graphs"] = graphs_check(e, items)
    vec = torch.randn(e.hidden_size, generator=torch.Generator().manual_seed(0))
    zero = [
        EngineItem(it.prompt_ids, it.response_ids, [SteerSpec(tuple(layers), vec, 0.0)])
        for it in items
    ]
    a = next(e.capture(items, layers, parse_position("all"), "none"))
    b = next(e.capture(zero, layers, parse_position("all"), "none"))
    out["coef0_identity"] = all(
        torch.equal(x.activations, y.activations) for x, y in zip(a, b, strict=True)
    )
    unit = vec / vec.norm()
    abl = [
        EngineItem(it.prompt_ids, it.response_ids, [SteerSpec(tuple(layers), vec, 1.0, "ablate")])
        for it in items
    ]
    c = next(e.capture(abl, layers, parse_position("all"), "none"))
    residue = max(
        float((r.activations @ unit).abs().max() / r.activations.norm(dim=-1).max()) for r in c
    )
    before = max(
        float((r.activations @ unit).abs().max() / r.activations.norm(dim=-1).max()) for r in a
    )
    out["ablation_relative_residue"] = {"before": before, "after": residue}
    params = GenParams(max_new_tokens=24)
    gens = {}
    for mode in ("dynamic", "static"):
        e.cache_mode = mode
        gens[mode] = [g.token_ids for g in e.generate(items, params)]
    e.cache_mode = "auto"
    out["static_equals_dynamic"] = gens["static"] == gens["dynamic"]
    q = EngineItem(e.encode_prompt(ChatPrompt((("user", "What is the capital of France?"),)), "x"))
    out["answer"] = e.generate([q], params)[0].text
    if e.fast is not None:
        out["fast_generation"] = fastgen_check(e)
    else:
        out["fast_generation"] = {"off": e.fast_disabled}
    return out


def _sweep(e: Any) -> list[EngineItem]:
    """Rows sharing prompts with every kind of steering the fast path handles."""
    questions = ["What do you think of cats?", "Hi", "Explain tides to a child in two sentences."]
    prompts = [e.encode_prompt(ChatPrompt((("user", q),)), "x") for q in questions]
    n = e.num_layers
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(e.hidden_size, generator=gen)
    v = v / v.norm() * 4.0
    variants = [
        [],
        [SteerSpec((0,), v, 2.0)],
        [SteerSpec((n // 2,), v, -2.0)],
        [SteerSpec((n - 1,), v, 3.0)],
        [SteerSpec((n // 3,), v, 2.0, positions="response")],
        [SteerSpec((n // 2, n // 2 + 1), v, 1.0, "ablate")],
        [SteerSpec((n // 4,), v, 0.0)],
    ]
    return [EngineItem(p, steering=s, seed=i) for p in prompts for i, s in enumerate(variants)]


def fastgen_check(e: Any) -> dict[str, Any]:
    """The fast generation path's checks (see the module docstring)."""
    fast = e.fast
    items = _sweep(e)
    params = GenParams(max_new_tokens=16, logprobs=True, ignore_eos=True)

    def gen(**values: Any) -> list[Any]:
        saved = {k: getattr(fast, k) for k in values if k != "cache_mode"}
        mode = e.cache_mode
        e.cache_mode = values.pop("cache_mode", "auto")
        for k, val in values.items():
            setattr(fast, k, val)
        try:
            return e.generate(items, params)
        finally:
            e.cache_mode = mode
            for k, val in saved.items():
                setattr(fast, k, val)

    def lps(results: list[Any]) -> torch.Tensor:
        return torch.tensor([[s.chosen[2] for s in r.logprobs] for r in results])

    def compare(a: list[Any], b: list[Any]) -> dict[str, Any]:
        """Agreement of two runs: identical rows, and the first step's log-prob difference
        (later steps follow different tokens once a row differs)."""
        same = sum(x.token_ids == y.token_ids for x, y in zip(a, b, strict=True))
        first = (lps(a)[:, 0] - lps(b)[:, 0]).abs().max()
        rows_same = [
            i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x.token_ids == y.token_ids
        ]
        all_steps = (lps(a)[rows_same] - lps(b)[rows_same]).abs().max() if rows_same else None
        return {
            "identical_rows": f"{same}/{len(a)}",
            "first_step_max_abs_logprob_diff": float(first),
            "identical_rows_max_abs_logprob_diff": None if all_steps is None else float(all_steps),
        }

    out: dict[str, Any] = {"rows": len(items), "new_tokens": params.max_new_tokens}
    replayed_before = fast.replays
    graphed = gen(use_graphs=fast.use_graphs)
    out["graph"] = fast.last.graph if fast.last else None
    out["graph_replays"] = fast.replays - replayed_before
    out["graphs_disabled"] = fast.graphs_disabled
    eager = gen(use_graphs=False, static=True)
    # The same static step, recorded and replayed vs run eagerly: bit for bit.
    out["graph_replay_equals_eager"] = bool(
        [r.token_ids for r in graphed] == [r.token_ids for r in eager]
        and torch.equal(lps(graphed), lps(eager))
    )
    out["graph_vs_eager"] = compare(graphed, eager)
    out["shared_vs_unshared_prefix"] = compare(graphed, gen(share_prefix=False))
    out["chunked_vs_one_chunk"] = compare(
        gen(prefill_tokens=1 << 30, min_chunk_tokens=1 << 30),
        gen(prefill_tokens=64, min_chunk_tokens=0),
    )
    singles = [e.generate([it], params)[0] for it in items[::3]]
    out["batched_vs_single"] = compare(graphed[::3], singles)
    zero = [k for k, it in enumerate(items) if it.steering and it.steering[0].coefficient == 0.0]
    plain = [k - 6 for k in zero]  # the unsteered row of the same prompt
    out["coef0_generation_exact"] = all(
        graphed[z].token_ids == graphed[p].token_ids and graphed[z].logprobs == graphed[p].logprobs
        for z, p in zip(zero, plain, strict=True)
    )
    out["fast_vs_transformers_static"] = compare(graphed, gen(cache_mode="static"))
    # The decode kernels (each row's own keys): Triton (asked for in main), torch's flash
    # kernel, and SDPA over the masked cache.
    out["decode_triton_disabled"] = fast.decode_triton.disabled
    out["decode_flash_disabled"] = fast.decode_flash.disabled
    no_triton = DecodeTriton(False)
    masked = gen(decode_triton=no_triton, decode_flash=DecodeFlash(False))
    if fast.decode_flash.disabled is None:
        flash = gen(decode_triton=no_triton)
        out["flash_vs_masked_decode"] = compare(flash, masked)
        if fast.decode_triton.disabled is None:
            out["triton_vs_flash_decode"] = compare(graphed, flash)
    if fast.decode_triton.disabled is None:
        out["triton_vs_masked_decode"] = compare(graphed, masked)
    return out


def graphs_check(e: Any, items: list[EngineItem]) -> dict[str, Any]:
    """Graph replays against the static forward run eagerly (the same shapes and kernels) and
    against the eager path (other padding: dtype noise only)."""
    g = e.graphs
    layers = list(range(e.num_layers))
    # The same bucket (3 rows, the same longest item) with other content and order.
    other = items[1:] + items[:1]
    cases = [
        (its, pos, red)
        for red in ("mean", "last")
        for pos in ("response[:]", "all", "prompt[-1]")
        for its in (items, other)
    ]

    def run(its: list[EngineItem], pos: str, red: str) -> torch.Tensor:
        res = next(e.capture(its, layers, parse_position(pos), red))
        return torch.stack([r.activations for r in res])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    if g.disabled or g.max_graphs == 0:
        return {"disabled": g.disabled or "max_graphs=0"}
    g.clear()
    g.record_after = 1
    recorded_before = g.recorded
    for case in cases:
        run(*case)
    recorded, replays = g.recorded - recorded_before, g.replays
    graphed = [run(*case) for case in cases]
    replayed = g.replays - replays
    saved = g.max_graphs
    g.max_graphs = 0
    eager = [run(*case) for case in cases]
    g.max_graphs = saved
    g.clear()
    g.use_graphs = False
    static = [run(*case) for case in cases]
    g.use_graphs = True
    g.clear()
    g.record_after = 2
    return {
        "graphs_recorded": recorded,
        "replays_in_check": replayed,
        "cases": len(cases),
        "disabled": g.disabled,
        "graph_vs_static_eager_max_rel_err": max(map(rel, graphed, static)),
        "graph_vs_eager_path_max_rel_err": max(map(rel, graphed, eager)),
        "static_eager_vs_eager_path_max_rel_err": max(map(rel, static, eager)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--precisions", default="bf16,nf4,int8")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--decode-kernel",
        choices=("flash", "triton"),
        default="triton",
        help="the decode kernel the engine is built with (setting decode_kernel); with triton "
        "the check also compares it with flash and the masked decode",
    )
    args = parser.parse_args()
    os.environ["QSENS_LOADER_DECODE_KERNEL"] = args.decode_kernel
    settings_mod.reset()
    results = [check(args.model, p, args.device) for p in args.precisions.split(",")]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
