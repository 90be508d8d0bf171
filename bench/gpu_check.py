"""Correctness checks of the loader engine on an accelerator (run before trusting GPU numbers).

Prints JSON: batched vs unbatched capture (both padding sides), coefficient-0 identity,
ablation residue, static vs dynamic cache generation, and an answer to a chat prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from services.loader.engine import ChatPrompt, EngineItem, GenParams
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
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--precisions", default="bf16,nf4,int8")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    results = [check(args.model, p, args.device) for p in args.precisions.split(",")]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
