"""Issue 20's equality check on a multi-GPU machine: one model loaded on one GPU and placed
layer-wise over ``--gpus`` GPUs (``QSENS_LOADER_GPUS``), then capture (all layers, mean and
last), steered and ablated generation, Score and NextToken compared. Prints JSON: the
placement note, the largest differences and whether they are within the dtype's tolerance.

    python bench/multi_gpu_check.py --gpus 2 --precision bf16 \
        --model 'tiny:llama?layers=16&hidden=8192&heads=64&kv_heads=8&intermediate=28672&bf16=1'

On a CPU (``--device cpu``) both loads are single-device: a smoke test of the script only.
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
from services.common.variants import parse_precision
from services.loader.backends.registry import load_engine
from services.loader.engine import Engine, EngineItem, GenParams, ScoreInput
from services.loader.model_source import resolve_source
from services.loader.positions import parse_position
from services.loader.steering import SteerSpec

PROMPTS = ["Tell me about lighthouses.", "What is the capital of France?", "Write a haiku."]


def _load(model: str, precision: str, device: str, gpus: int) -> Engine:
    os.environ["QSENS_LOADER_GPUS"] = str(gpus)
    settings_mod.reset()
    common = settings_mod.get(settings_mod.CommonSettings)
    source = resolve_source(model, common.cache_dir)
    loader = settings_mod.get(settings_mod.LoaderSettings)
    return load_engine(source, parse_precision(precision), device=device, settings=loader)


def _run(engine: Engine) -> dict[str, Any]:
    hidden = engine.hidden_size
    layers = engine.num_layers
    steer = [
        SteerSpec((layers // 2,), torch.linspace(-1, 1, hidden), 4.0, positions="response"),
        SteerSpec(
            (layers // 4, 3 * layers // 4), torch.cos(torch.arange(hidden) * 1.0), 1.0, "ablate"
        ),
    ]
    items = [EngineItem(engine.encode_prompt(p, "x"), steering=steer) for p in PROMPTS]
    plain = [EngineItem(engine.encode_prompt(p, "x")) for p in PROMPTS]
    every = list(range(layers))
    out: dict[str, Any] = {}
    for reduction in ("mean", "last"):
        chunks = engine.capture(items, every, parse_position("prompt[:]"), reduction)
        out[f"capture_{reduction}"] = torch.stack(
            [r.activations.float() for c in chunks for r in c]
        )
    gen = engine.generate(plain + items, GenParams(max_new_tokens=16, ignore_eos=True))
    out["tokens"] = [g.token_ids for g in gen]
    conts = [engine.encode_text(t) for t in (" the sea", " Paris")]
    scored = engine.score([ScoreInput(it.prompt_ids, conts, [8, 6], steer) for it in items])
    out["score"] = torch.tensor([[s.logprob for s in row] for row in scored])
    nt = engine.next_token(items, top_k=5, token_ids=[3, 7, 11])
    out["next_token"] = torch.tensor([r.requested_logits for r in nt])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--atol", type=float, default=0.0, help="0: by dtype (bf16 5e-2)")
    args = parser.parse_args()
    single_engine = _load(args.model, args.precision, args.device, 1)
    single = _run(single_engine)
    del single_engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    split_engine = _load(args.model, args.precision, args.device, args.gpus)
    notes = split_engine.describe().notes
    split = _run(split_engine)
    atol = args.atol or (1e-4 if args.precision == "fp32" else 5e-2)
    diffs = {
        k: float((split[k] - single[k]).abs().max())
        for k in ("capture_mean", "capture_last", "score", "next_token")
    }
    same_tokens = sum(a == b for a, b in zip(single["tokens"], split["tokens"], strict=True))
    report = {
        "model": args.model,
        "precision": args.precision,
        "gpus": args.gpus,
        "devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "placement": [n for n in notes if "layer-wise" in n],
        "max_abs_diff": diffs,
        "atol": atol,
        "generations_equal": f"{same_tokens}/{len(single['tokens'])}",
        "within_tolerance": all(v <= atol for v in diffs.values()),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
