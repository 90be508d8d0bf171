"""The vector set: one extraction method's trait vectors for every captured layer, with
per-layer diagnostics, and its safetensors form (``vectors/<method>.safetensors``).

The extractor writes it (``services.extractor.methods`` computes it); the steerer, the
analyzer and ``qsens results`` read it. ``from_safetensors`` refuses any other format.
``layer_cosines`` is the one per-layer cosine between two sets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.common.errors import InvalidArgument
from services.common.tensor_codec import load_safetensors, save_safetensors

__all__ = ["FORMAT", "LayerCosine", "VectorSet", "layer_cosines"]

FORMAT = "qsens.vectorset/1"
_TENSORS = (
    "vectors",
    "auroc",
    "norms",
    "raw_norms",
    "massive_dim_energy",
    "massive_dims",
    "massive_ratio",
    "zero_norm",
    "nonfinite",
)

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class VectorSet:
    """One method's vectors for every captured layer, with per-layer diagnostics."""

    method: str
    vectors: F32  # [L, H]; zero rows where zero_norm
    auroc: F64  # [L] held-out AUROC; NaN when not measurable
    norms: F64  # [L] norm of the stored vector
    raw_norms: F64  # [L] method's own scale (mean_diff norm, probe weight norm, pca RMS length)
    massive_dim_energy: F64  # [L] fraction of squared norm in the massive dims
    massive_dims: NDArray[np.int64]  # [L, k] the massive dims, largest first
    massive_ratio: F64  # [L] largest mean |a| / median mean |a|
    zero_norm: NDArray[np.bool_]  # [L]
    nonfinite: NDArray[np.bool_]  # [L] the layer had NaN/inf input
    layers: tuple[int, ...]  # model layer index of each row
    n_pos: int
    n_neg: int
    n_val_pos: int = 0
    n_val_neg: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # method settings (C, seed, pairing)
    extras: dict[str, NDArray[Any]] = field(default_factory=dict)  # method-specific [L] arrays
    meta: dict[str, Any] = field(default_factory=dict)  # caller context (trait, variant, ...)

    @property
    def hidden_size(self) -> int:
        return int(self.vectors.shape[1])

    def unit_vectors(self) -> F32:
        """Vectors scaled to unit norm (zero rows stay zero)."""
        norms = np.linalg.norm(self.vectors.astype(np.float64), axis=1, keepdims=True)
        out = np.divide(self.vectors, norms, out=np.zeros_like(self.vectors), where=norms > 0)
        return np.asarray(out, dtype=np.float32)

    def vector(self, layer: int) -> F32:
        """The vector of model layer ``layer``."""
        if layer not in self.layers:
            raise InvalidArgument("layer", f"{layer} not among the captured layers {self.layers}")
        return np.asarray(self.vectors[self.layers.index(layer)], dtype=np.float32)

    def to_safetensors(self) -> bytes:
        """Safetensors bytes: the arrays, ``extra.<name>`` arrays and JSON metadata."""
        tensors: dict[str, NDArray[Any]] = {name: getattr(self, name) for name in _TENSORS}
        tensors.update({f"extra.{k}": v for k, v in self.extras.items()})
        metadata = {
            "format": FORMAT,
            "method": self.method,
            "layers": json.dumps(list(self.layers)),
            "n_pos": json.dumps(self.n_pos),
            "n_neg": json.dumps(self.n_neg),
            "n_val_pos": json.dumps(self.n_val_pos),
            "n_val_neg": json.dumps(self.n_val_neg),
            "hidden_size": json.dumps(self.hidden_size),
            "params": json.dumps(self.params, sort_keys=True),
            "meta": json.dumps(self.meta, sort_keys=True, default=str),
        }
        return save_safetensors(tensors, metadata)

    @classmethod
    def from_safetensors(cls, blob: bytes) -> VectorSet:
        """Parse bytes written by :meth:`to_safetensors`."""
        tensors, metadata = load_safetensors(blob)
        if metadata.get("format") != FORMAT:
            raise InvalidArgument(
                "safetensors.format", f"expected {FORMAT!r}, got {metadata.get('format')!r}"
            )
        for name in _TENSORS:
            if name not in tensors:
                raise InvalidArgument(f"safetensors.{name}", "missing tensor")
        try:
            decoded = {
                k: json.loads(metadata[k])
                for k in ("layers", "n_pos", "n_neg", "n_val_pos", "n_val_neg", "params", "meta")
            }
        except (KeyError, json.JSONDecodeError) as exc:
            raise InvalidArgument("safetensors.metadata", f"bad or missing entry: {exc}") from None
        return cls(
            method=metadata.get("method", ""),
            vectors=tensors["vectors"],
            auroc=tensors["auroc"],
            norms=tensors["norms"],
            raw_norms=tensors["raw_norms"],
            massive_dim_energy=tensors["massive_dim_energy"],
            massive_dims=tensors["massive_dims"],
            massive_ratio=tensors["massive_ratio"],
            zero_norm=tensors["zero_norm"],
            nonfinite=tensors["nonfinite"],
            layers=tuple(int(x) for x in decoded["layers"]),
            n_pos=int(decoded["n_pos"]),
            n_neg=int(decoded["n_neg"]),
            n_val_pos=int(decoded["n_val_pos"]),
            n_val_neg=int(decoded["n_val_neg"]),
            params=dict(decoded["params"]),
            extras={
                k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")
            },
            meta=dict(decoded["meta"]),
        )


@dataclass(frozen=True)
class LayerCosine:
    """The cosine of two sets' vectors at one layer; None, with the reasons, when undefined."""

    layer: int
    cosine: float | None
    reasons: tuple[str, ...] = ()


def layer_cosines(reference: VectorSet, variant: VectorSet) -> list[LayerCosine]:
    """Cosine of ``variant``'s vector to ``reference``'s at every layer both captured.

    In float64, clipped to [-1, 1]. A layer where either vector came from non-finite
    activations or has zero norm has no cosine (None) and says why; it never raises. The
    analyzer's vector comparison and ``qsens results`` both use this.
    """
    out: list[LayerCosine] = []
    for layer in (layer for layer in reference.layers if layer in variant.layers):
        i, j = reference.layers.index(layer), variant.layers.index(layer)
        a = reference.vectors[i].astype(np.float64)
        b = variant.vectors[j].astype(np.float64)
        finite_a, finite_b = bool(np.isfinite(a).all()), bool(np.isfinite(b).all())
        na = float(np.linalg.norm(a)) if finite_a and finite_b else 0.0
        nb = float(np.linalg.norm(b)) if finite_a and finite_b else 0.0
        reasons = []
        if bool(reference.nonfinite[i]) or not finite_a:
            reasons.append("non-finite reference activations")
        if bool(variant.nonfinite[j]) or not finite_b:
            reasons.append("non-finite variant activations")
        if bool(reference.zero_norm[i]) or na == 0.0:
            reasons.append("zero-norm reference vector")
        if bool(variant.zero_norm[j]) or nb == 0.0:
            reasons.append("zero-norm variant vector")
        if reasons:
            out.append(LayerCosine(layer, None, tuple(dict.fromkeys(reasons))))
        else:
            out.append(LayerCosine(layer, float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))))
    return out
