"""Quantize a model with GPTQ, AWQ and round-to-nearest (RTN) and compare them with bf16.

Prints JSON: quantization wall time per method, perplexity on the held-out text shipped with
the calibration set (services/quantizer/data/heldout.jsonl), and greedy generation speed per
kernel. RTN is gptqmodel's round-to-nearest in GPTQ format: the control that GPTQ and AWQ
should beat. Every checkpoint is made once into --out and reused on a second call.

    python bench/quantize_quality.py --model smollm2-135m --group-size 64 --samples 32 --seq-len 256

On a GPU (``--device cuda``) gptqmodel quantizes on the card and the checkpoints are served by
its CUDA kernels; the kernel and compute dtype of each are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from services.common import settings
from services.common.quantization import QuantizeSpec
from services.common.variants import Precision
from services.loader.backends.registry import get_backend
from services.loader.model_source import resolve_source
from services.quantizer.calibration import BUILTIN_PATH, load_calibration
from services.quantizer.run import quantize_folder


def perplexity(model: Any, tokenizer: Any, texts: list[str]) -> float:
    import torch

    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]], device=model.device)
        with torch.no_grad():
            logits = model(ids).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def tokens_per_second(model: Any, tokenizer: Any, new_tokens: int) -> float:
    import torch

    ids = tokenizer("The history of the printing press", return_tensors="pt").to(model.device)
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=4, do_sample=False)  # warm-up
        _sync(model)
        started = time.perf_counter()
        model.generate(**ids, **kwargs)
        _sync(model)
    return new_tokens / (time.perf_counter() - started)


def _slug(source: str) -> str:
    """A folder name for a model source (``tiny:llama?layers=16&...`` has URL characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source)


def _sync(model: Any) -> None:
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--methods", default="gptq,awq,rtn")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(".qsens/bench-quantize"))
    parser.add_argument("--device", default="cpu", help="where the models are served: cpu, cuda")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 reference")
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    cache = settings.get(settings.CommonSettings).cache_dir
    spec = QuantizeSpec.model_validate(
        {
            "gptq": {"group_size": args.group_size},
            "awq": {"group_size": args.group_size},
            "calibration": {"samples": args.samples, "seq_len": args.seq_len},
        }
    )
    calibration = load_calibration(spec.calibration)
    heldout = [
        json.loads(line)["text"]
        for line in (BUILTIN_PATH.parent / "heldout.jsonl").read_text().splitlines()
        if line.strip()
    ]
    results: dict[str, Any] = {"model": args.model, "settings": spec.model_dump(mode="json")}
    if not args.no_bf16:
        reference = get_backend(None, Precision.BF16).load(
            resolve_source(args.model, cache), Precision.BF16, args.device
        )
        results["bf16"] = {
            "perplexity": perplexity(reference.model, reference.tokenizer, heldout),
            "tokens_per_s": tokens_per_second(
                reference.model, reference.tokenizer, args.new_tokens
            ),
            "kernel": "torch bf16 linear",
        }
        del reference
    for method in args.methods.split(","):
        folder = (
            args.out
            / f"{_slug(args.model)}-{method}-g{args.group_size}-{args.samples}x{args.seq_len}"
        )
        base = "awq" if method == "awq" else "gptq"
        request = spec.request(args.model, args.model, base)
        if not (folder / "qsens-quantize.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            quantize_folder(request, calibration, folder, cache, method=method)
        info = json.loads((folder / "qsens-quantize.json").read_text())
        precision = Precision.AWQ if base == "awq" else Precision.GPTQ
        loaded = get_backend(None, precision).load(
            resolve_source(str(folder), cache), precision, args.device
        )
        results[method] = {
            "quantize_seconds": info["quantize_seconds"],
            "quantize_device": info.get("device"),
            "folder": str(folder),
            "calibration": info["calibration"],
            "perplexity": perplexity(loaded.model, loaded.tokenizer, heldout),
            "tokens_per_s": tokens_per_second(loaded.model, loaded.tokenizer, args.new_tokens),
            "kernel": loaded.quantization_config["kernel"],
            "compute_dtype": loaded.quantization_config["compute_dtype"],
        }
        print(json.dumps({method: results[method]}), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
