"""Plain transformers backend: fp32, bf16 and fp16 weights."""

from __future__ import annotations

from typing import Any

from services.common.variants import Precision
from services.loader.backends.base import Backend, LoadedModel
from services.loader.model_source import ResolvedSource

__all__ = ["HFBackend", "load_tokenizer", "resolve_device"]


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def load_tokenizer(source: ResolvedSource) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source.folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class HFBackend(Backend):
    """Unquantized weights through ``AutoModelForCausalLM.from_pretrained``."""

    name = "hf"
    precisions = frozenset({Precision.FP32, Precision.BF16, Precision.FP16})

    def load(self, source: ResolvedSource, precision: Precision, device: str) -> LoadedModel:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = {
            Precision.FP32: torch.float32,
            Precision.BF16: torch.bfloat16,
            Precision.FP16: torch.float16,
        }[precision]
        dev = resolve_device(device)
        model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=dtype)
        model.to(dev)
        model.eval()
        return LoadedModel(model, load_tokenizer(source), dev, dtype, {}, list(source.notes))
