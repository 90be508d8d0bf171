"""The engine's request and result objects in a file, read without executing anything.

The vLLM equality tests hand ``Engine`` calls and their results between two processes (the
main venv and the vLLM venv). A file is one safetensors file: the tensors under generated
names and, in its metadata, the rest as JSON where a tensor, tuple, frozenset, dict or one of
the engine's dataclasses (an allow-list, ``TYPES``) is a tagged object. Reading builds only
those types; anything else is a ``ValueError`` (no ``torch.load``: a file never runs code).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.loader.capabilities import EngineCapabilities
from services.loader.engine import (
    CaptureResult,
    ChatPrompt,
    ContinuationScore,
    EngineDescription,
    EngineHealth,
    EngineItem,
    GenParams,
    GenResult,
    NextTokenResult,
    ScoreInput,
    StepLogprob,
)
from services.loader.positions import Position
from services.loader.steering import SteerSpec

__all__ = ["TYPES", "decode", "encode", "read", "write"]

TYPES: dict[str, type] = {
    t.__name__: t
    for t in (
        CaptureResult,
        ChatPrompt,
        ContinuationScore,
        EngineCapabilities,
        EngineDescription,
        EngineHealth,
        EngineItem,
        GenParams,
        GenResult,
        NextTokenResult,
        Position,
        ScoreInput,
        SteerSpec,
        StepLogprob,
    )
}
_KEY = "qsens.engine_codec"


def encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON-able data; its tensors are added to ``tensors``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        # A copy: safetensors refuses tensors that share storage (views of one batch).
        tensors[name] = value.detach().cpu().clone().contiguous()
        return {"$tensor": name}
    if isinstance(value, list):
        return [encode(v, tensors) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, tensors) for v in value]}
    if isinstance(value, frozenset):
        return {"$frozenset": [encode(v, tensors) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"dict keys must be strings: {list(value)[:3]}")
        return {"$dict": {k: encode(v, tensors) for k, v in value.items()}}
    name = type(value).__name__
    if dataclasses.is_dataclass(value) and TYPES.get(name) is type(value):
        fields = {
            f.name: encode(getattr(value, f.name), tensors) for f in dataclasses.fields(value)
        }
        return {"$type": name, "fields": fields}
    raise ValueError(f"cannot encode a {type(value).__qualname__}")


def decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value ``encode`` made ``data`` from; ValueError for anything else."""
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict) or len(data) not in (1, 2):
        raise ValueError(f"not an encoded value: {str(data)[:80]}")
    if "$tensor" in data:
        return tensors[data["$tensor"]]
    if "$tuple" in data:
        return tuple(decode(v, tensors) for v in data["$tuple"])
    if "$frozenset" in data:
        return frozenset(decode(v, tensors) for v in data["$frozenset"])
    if "$dict" in data:
        return {str(k): decode(v, tensors) for k, v in data["$dict"].items()}
    if "$type" in data:
        cls = TYPES.get(data["$type"])
        if cls is None:
            raise ValueError(f"type {data['$type']!r} is not an engine type of this codec")
        return cls(**{k: decode(v, tensors) for k, v in data["fields"].items()})
    raise ValueError(f"not an encoded value: {str(data)[:80]}")


def write(value: Any, path: Path | str) -> None:
    """Save ``value`` as one safetensors file (tensors + JSON metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(encode(value, tensors), allow_nan=True)
    save_file(tensors, str(path), metadata={_KEY: meta})


def read(path: Path | str) -> Any:
    """The value ``write`` saved at ``path``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = (handle.metadata() or {}).get(_KEY)
    if meta is None:
        raise ValueError(f"{path} was not written by the engine codec")
    return decode(json.loads(meta), load_file(str(path)))
