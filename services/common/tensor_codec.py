"""Tensors on the wire (``{dtype, shape, bytes}``) and at rest (safetensors with JSON metadata).

Nothing that runs code on load: the wire format is raw little-endian bytes checked against
dtype and shape, and stored tensors are safetensors whose header is parsed as JSON.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.errors import InvalidArgument

__all__ = [
    "WIRE_DTYPES",
    "WireTensor",
    "decode_numpy",
    "decode_torch",
    "encode",
    "load_safetensors",
    "save_safetensors",
]

# dtype name -> (itemsize, numpy dtype or None when numpy has none)
WIRE_DTYPES: dict[str, tuple[int, str | None]] = {
    "float32": (4, "<f4"),
    "float64": (8, "<f8"),
    "float16": (2, "<f2"),
    "bfloat16": (2, None),
    "int64": (8, "<i8"),
    "int32": (4, "<i4"),
}


@dataclass(frozen=True)
class WireTensor:
    """The transport form of a tensor; maps 1:1 onto ``qsens.loader.v1.Tensor``."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def encode(value: Any, dtype: str | None = None) -> WireTensor:
    """Encode a torch tensor or numpy array (optionally cast to ``dtype``)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - workers always have torch
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach()
        name = dtype or str(t.dtype).removeprefix("torch.")
        if name not in WIRE_DTYPES:
            raise InvalidArgument("dtype", f"unsupported tensor dtype {name!r}")
        t = t.to(device="cpu", dtype=getattr(torch, name)).contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return WireTensor(name, tuple(int(s) for s in t.shape), raw)
    arr = np.asarray(value)
    name = dtype or arr.dtype.name
    if name not in WIRE_DTYPES or WIRE_DTYPES[name][1] is None:
        raise InvalidArgument("dtype", f"unsupported numpy dtype {name!r}")
    np_dtype = WIRE_DTYPES[name][1]
    arr = np.ascontiguousarray(arr.astype(np_dtype, copy=False))
    return WireTensor(name, tuple(int(s) for s in arr.shape), arr.tobytes())


def _check(dtype: str, shape: tuple[int, ...], data: bytes, field: str) -> int:
    if dtype not in WIRE_DTYPES:
        raise InvalidArgument(f"{field}.dtype", f"unknown dtype {dtype!r}")
    if any(s < 0 for s in shape):
        raise InvalidArgument(f"{field}.shape", f"negative dimension in {list(shape)}")
    itemsize = WIRE_DTYPES[dtype][0]
    count = math.prod(shape)
    if count * itemsize != len(data):
        raise InvalidArgument(
            f"{field}.data",
            f"{len(data)} bytes do not match shape {list(shape)} of {dtype} ({count * itemsize} bytes)",
        )
    return count


def decode_numpy(
    dtype: str, shape: tuple[int, ...] | list[int], data: bytes, field: str = "tensor"
) -> np.ndarray:
    """Decode to numpy; bfloat16 is widened to float32 (numpy has no bfloat16)."""
    shape = tuple(int(s) for s in shape)
    _check(dtype, shape, data, field)
    if dtype == "bfloat16":
        raw = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape).copy()
    np_dtype = WIRE_DTYPES[dtype][1]
    assert np_dtype is not None
    return np.frombuffer(data, dtype=np_dtype).reshape(shape).copy()


def decode_torch(
    dtype: str, shape: tuple[int, ...] | list[int], data: bytes, field: str = "tensor"
) -> Any:
    """Decode to a CPU torch tensor of the wire dtype."""
    import torch

    shape = tuple(int(s) for s in shape)
    count = _check(dtype, shape, data, field)
    if count == 0:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    buf = bytearray(data)
    return torch.frombuffer(buf, dtype=getattr(torch, dtype)).reshape(shape)


def save_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> bytes:
    """Serialise numpy arrays with metadata; non-string metadata values are JSON-encoded."""
    from safetensors.numpy import save

    meta = {
        k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()
    }
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return bytes(save(arrays, metadata=meta))


def load_safetensors(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into arrays and the raw string metadata."""
    from safetensors.numpy import load

    if len(blob) < 8:
        raise InvalidArgument("safetensors", "truncated header")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > len(blob) - 8:
        raise InvalidArgument("safetensors", "header length exceeds the blob")
    header = json.loads(blob[8 : 8 + header_len])
    metadata = {str(k): str(v) for k, v in header.get("__metadata__", {}).items()}
    return dict(load(blob)), metadata
