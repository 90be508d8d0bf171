"""Steering vectors in and out: qsens vector sets to and from the formats people already use.

Formats (``FORMATS``), all mapped onto qsens's layer convention, where layer ``k`` is the
residual stream after decoder layer ``k`` (0-based, the decoder layer's output):

* ``qsens``: the native ``VectorSet`` safetensors (``qsens.vectorset/1``), diagnostics included.
* ``repeng-gguf``: repeng's control vectors (``ControlVector.export_gguf``; vgel/repeng 0.4): a
  GGUF file of architecture ``controlvector`` with ``controlvector.model_hint``,
  ``controlvector.layer_count`` and one float32 tensor ``direction.<k>`` per layer. repeng reads
  ``direction.<k>`` from ``hidden_states[k + 1]`` and adds it to ``model.layers[k]``'s output, as
  llama.cpp's ``--control-vector`` does: the same place as qsens layer ``k``.
* ``pv-pt``: persona-vectors' per-layer tensor (Chen et al. 2025, ``generate_vec.py``): one
  ``torch.save``'d tensor ``[n_layers + 1, H]`` whose row ``r`` is ``hidden_states[r]``, so row 0
  is the embeddings and row ``k + 1`` is qsens layer ``k``. It is read with
  ``torch.load(weights_only=True)`` only (no arbitrary unpickling); all-zero rows are layers
  without a vector, and export writes zeros there.
* ``safetensors``: plain safetensors, one float32 tensor ``layer.<k>`` ``[H]`` per layer, with a
  small metadata header (``format: qsens.vectors/1``, ``layer_convention: decoder_output``,
  ``model``, ``trait``, ``method``). Import also takes ``direction.<k>`` tensor names.

An imported set becomes a ``VectorSet`` with no held-out diagnostics (AUROC and massive-dim
statistics are NaN: there were no activations), ``n_pos = n_neg = 0`` and ``meta["imported"]``
saying from what (format, file digest, model hint).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from services.common.contracts.vectors import FORMAT as VECTORSET_FORMAT
from services.common.contracts.vectors import VectorSet
from services.common.errors import InvalidArgument
from services.common.tensor_codec import load_safetensors, save_safetensors

__all__ = [
    "FORMATS",
    "PLAIN_FORMAT",
    "VectorFormat",
    "detect_format",
    "from_layers",
    "read_vectors",
    "write_vectors",
]

VectorFormat = Literal["qsens", "repeng-gguf", "pv-pt", "safetensors"]
FORMATS: tuple[VectorFormat, ...] = ("qsens", "repeng-gguf", "pv-pt", "safetensors")
PLAIN_FORMAT = "qsens.vectors/1"
_LAYER_NAME = re.compile(r"(?:layer|direction)\.(\d+)")


def from_layers(
    directions: Mapping[int, Any],
    *,
    method: str = "imported",
    meta: Mapping[str, Any] | None = None,
) -> VectorSet:
    """A ``VectorSet`` of plain per-layer vectors (no activations: no AUROC, no massive dims)."""
    if not directions:
        raise InvalidArgument("vectors", "no layer has a vector")
    layers = sorted(int(k) for k in directions)
    if layers[0] < 0:
        raise InvalidArgument("vectors", f"negative layer {layers[0]}")
    rows = [np.asarray(directions[k], dtype=np.float32).reshape(-1) for k in layers]
    sizes = {r.shape[0] for r in rows}
    if len(sizes) != 1 or 0 in sizes:
        raise InvalidArgument("vectors", f"layers have different or empty sizes {sorted(sizes)}")
    vectors = np.stack(rows)
    finite: NDArray[np.bool_] = np.asarray(np.isfinite(vectors).all(axis=1), dtype=bool)
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0.0).astype(np.float64), axis=1)
    n = len(layers)
    nan = np.full(n, np.nan)
    return VectorSet(
        method=method,
        vectors=vectors,
        auroc=nan.copy(),
        norms=norms,
        raw_norms=norms.copy(),
        massive_dim_energy=nan.copy(),
        massive_dims=np.zeros((n, 0), dtype=np.int64),
        massive_ratio=nan.copy(),
        zero_norm=(norms == 0) & finite,
        nonfinite=~finite,
        layers=tuple(layers),
        n_pos=0,
        n_neg=0,
        meta=dict(meta or {}),
    )


def detect_format(path: Path | str, blob: bytes | None = None) -> VectorFormat:
    """The format of a file from its name (and, for safetensors, its metadata)."""
    name = str(path).lower()
    if name.endswith(".gguf"):
        return "repeng-gguf"
    if name.endswith((".pt", ".pth")):
        return "pv-pt"
    if name.endswith(".safetensors"):
        if blob is not None:
            _, meta = load_safetensors(blob)
            if meta.get("format") == VECTORSET_FORMAT:
                return "qsens"
        return "safetensors"
    raise InvalidArgument(
        "format", f"cannot tell the format of {path}; name one of {', '.join(FORMATS)}"
    )


def _digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _imported(fmt: str, blob: bytes, name: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    return {"imported": {"format": fmt, "file": name, "digest": _digest(blob), **extra}}


def read_vectors(
    blob: bytes,
    fmt: VectorFormat,
    *,
    name: str = "",
    method: str = "imported",
    meta: Mapping[str, Any] | None = None,
) -> VectorSet:
    """Parse ``blob`` (a file's bytes) in format ``fmt`` into a ``VectorSet``."""
    if fmt == "qsens":
        return VectorSet.from_safetensors(blob)
    if fmt == "repeng-gguf":
        directions, extra = _read_gguf(blob)
    elif fmt == "pv-pt":
        directions, extra = _read_pt(blob)
    elif fmt == "safetensors":
        directions, extra = _read_plain(blob)
        method = str(extra.pop("method", "") or method)
    else:
        raise InvalidArgument("format", f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    info = {**_imported(fmt, blob, name, extra), **dict(meta or {})}
    return from_layers(directions, method=method, meta=info)


def write_vectors(vs: VectorSet, fmt: VectorFormat, *, model_hint: str = "") -> bytes:
    """``vs`` in format ``fmt`` (the file's bytes)."""
    if fmt == "qsens":
        return vs.to_safetensors()
    directions = {layer: vs.vectors[i] for i, layer in enumerate(vs.layers)}
    imported = vs.meta.get("imported") or {}
    hint = model_hint or str(
        vs.meta.get("model") or vs.meta.get("variant") or imported.get("model_hint") or ""
    )
    trait = str(vs.meta.get("trait") or imported.get("trait") or "")
    if fmt == "repeng-gguf":
        return _write_gguf(directions, hint)
    if fmt == "pv-pt":
        return _write_pt(directions)
    if fmt == "safetensors":
        return save_safetensors(
            {f"layer.{k}": np.asarray(v, dtype=np.float32) for k, v in directions.items()},
            {
                "format": PLAIN_FORMAT,
                "layer_convention": "decoder_output",
                "model": hint,
                "trait": trait,
                "method": vs.method,
            },
        )
    raise InvalidArgument("format", f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


# ------------------------------------------------------------------------------ repeng GGUF


def _with_file(blob: bytes, suffix: str) -> Path:
    handle, name = tempfile.mkstemp(suffix=suffix, prefix="qsens-vectors-")
    with os.fdopen(handle, "wb") as fh:
        fh.write(blob)
    return Path(name)


def _gguf_string(reader: Any, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not len(field.parts):
        return None
    return str(bytes(field.parts[-1]), encoding="utf-8", errors="replace")


def _read_gguf(blob: bytes) -> tuple[dict[int, NDArray[np.float32]], dict[str, Any]]:
    import gguf

    path = _with_file(blob, ".gguf")
    try:
        try:
            reader = gguf.GGUFReader(path)
        except Exception as exc:  # the reader raises ValueError, struct.error, ...
            raise InvalidArgument("file", f"not a GGUF file: {exc}") from None
        arch = _gguf_string(reader, "general.architecture")
        if arch != "controlvector":
            raise InvalidArgument(
                "file", f"GGUF architecture is {arch!r}, not 'controlvector' (a repeng vector)"
            )
        directions: dict[int, NDArray[np.float32]] = {}
        for tensor in reader.tensors:
            match = _LAYER_NAME.fullmatch(tensor.name)
            if match is None or not tensor.name.startswith("direction."):
                continue
            directions[int(match.group(1))] = np.array(tensor.data, dtype=np.float32).reshape(-1)
        return directions, {"model_hint": _gguf_string(reader, "controlvector.model_hint") or ""}
    finally:
        path.unlink(missing_ok=True)


def _write_gguf(directions: Mapping[int, NDArray[np.float32]], model_hint: str) -> bytes:
    import gguf

    # As repeng's ControlVector.export_gguf writes it (llama.cpp reads the same layout).
    arch = "controlvector"
    path = _with_file(b"", ".gguf")
    try:
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_string(f"{arch}.model_hint", model_hint)
        writer.add_uint32(f"{arch}.layer_count", len(directions))
        for layer, vector in directions.items():
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(vector, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------- persona-vectors


def _read_pt(blob: bytes) -> tuple[dict[int, NDArray[np.float32]], dict[str, Any]]:
    import io

    import torch

    try:
        # weights_only: tensors and plain containers only, never arbitrary objects.
        obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidArgument(
            "file", f"not a tensor file a weights-only torch.load reads: {exc}"
        ) from None
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2 or obj.shape[0] < 2:
        shape = tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise InvalidArgument(
            "file", f"expected persona-vectors' [n_layers + 1, hidden] tensor, got {shape}"
        )
    rows = obj.detach().to(torch.float32).numpy()
    directions = {r - 1: rows[r] for r in range(1, rows.shape[0]) if np.any(rows[r] != 0)}
    return directions, {"rows": int(rows.shape[0])}


def _write_pt(directions: Mapping[int, NDArray[np.float32]]) -> bytes:
    import io

    import torch

    hidden = next(iter(directions.values())).shape[0]
    rows = np.zeros((max(directions) + 2, hidden), dtype=np.float32)
    for layer, vector in directions.items():
        rows[layer + 1] = vector
    buf = io.BytesIO()
    torch.save(torch.from_numpy(rows), buf)
    return buf.getvalue()


# -------------------------------------------------------------------------- plain safetensors


def _read_plain(blob: bytes) -> tuple[dict[int, NDArray[np.float32]], dict[str, Any]]:
    tensors, meta = load_safetensors(blob)
    fmt = meta.get("format")
    if fmt == VECTORSET_FORMAT:
        raise InvalidArgument("format", "this is a qsens vector set: import it as 'qsens'")
    convention = meta.get("layer_convention", "decoder_output")
    if convention != "decoder_output":
        raise InvalidArgument(
            "layer_convention", f"{convention!r}: only 'decoder_output' (layer k's output) is read"
        )
    directions: dict[int, NDArray[np.float32]] = {}
    for key, value in tensors.items():
        match = _LAYER_NAME.fullmatch(key)
        if match is None:
            raise InvalidArgument("file", f"tensor {key!r} is not named layer.<k> or direction.<k>")
        directions[int(match.group(1))] = np.asarray(value, dtype=np.float32).reshape(-1)
    extra: dict[str, Any] = {k: meta[k] for k in ("model", "trait", "method") if meta.get(k)}
    if "model" in extra:
        extra["model_hint"] = extra.pop("model")
    if fmt and fmt != PLAIN_FORMAT:
        extra["declared_format"] = json.dumps(fmt)
    return directions, extra
