"""Where steering vectors and their scale come from: an extraction's summary and vector set in S3.

The extractor writes, per (variant, trait, vector mode), ``summary.json`` (``ExtractSummary``:
captured ``layers``, ``activation_norm`` per layer, ``vector_keys`` method -> key) and
``vectors/<method>.safetensors`` (``VectorSet``). The source may be another variant than the
one steered (cross-precision steering): vectors and activation norms are always the
source's. An imported vector set (spec ``vectors``, ``qsens vectors import``) is read from its
location instead, with the steered variant's own activation norms. A missing or malformed artefact is ``FailedPrecondition`` (the DAG only starts a
steer job once its extraction is done, so it will not appear by waiting).

Coefficients are in units of the vector's own norm: the loader adds ``coefficient * v``. The
search starts where ``||c * v||`` is ``init_fraction`` of the mean activation norm at that layer,
``c0 = init_fraction * activation_norm[layer] / ||v_layer||``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from services.common.artefacts import extract_key
from services.common.contracts.common import VectorMode
from services.common.contracts.extract import ExtractSummary
from services.common.contracts.vectors import VectorSet
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.store import AsyncS3Store

__all__ = [
    "VectorSource",
    "candidate_layers",
    "compare_with_extraction",
    "layer_at_depth",
    "load_vector_source",
    "read_imported",
    "start_coefficient",
]


@dataclass(frozen=True)
class VectorSource:
    """One extraction's vectors and activation norms, by model layer."""

    variant: str
    trait: str
    method: str
    vector_mode: VectorMode
    summary: ExtractSummary
    vectors: VectorSet
    summary_key: str
    vectors_key: str

    @property
    def layers(self) -> tuple[int, ...]:
        """Layers that have a vector."""
        return tuple(self.vectors.layers)

    def vector(self, layer: int) -> NDArray[np.float32]:
        """The vector of ``layer`` (float32)."""
        return self.vectors.vector(layer)

    def norm(self, layer: int) -> float:
        """Its L2 norm."""
        return float(np.linalg.norm(self.vector(layer).astype(np.float64)))

    def usable(self, layer: int) -> str | None:
        """Why ``layer`` cannot be steered with, or None when it can."""
        if layer not in self.layers:
            return "no vector at this layer"
        index = self.layers.index(layer)
        if bool(self.vectors.zero_norm[index]) or not self.norm(layer) > 0:
            return "zero-norm vector"
        if not np.isfinite(self.vector(layer)).all():
            return "non-finite vector"
        norm = self.activation_norm(layer)
        if norm is None or not math.isfinite(norm) or norm <= 0:
            return "no activation norm"
        return None

    def activation_norm(self, layer: int) -> float | None:
        """Mean L2 norm of the source's captured activations at ``layer``."""
        s = self.summary
        if len(s.activation_norm) == len(s.layers) and layer in s.layers:
            return float(s.activation_norm[s.layers.index(layer)])
        if 0 <= layer < len(s.activation_norm) and len(s.layers) != len(s.activation_norm):
            return float(s.activation_norm[layer])
        return None


def read_imported(location: str) -> VectorSet:
    """An imported vector set (spec ``vectors[].location``: a path or ``s3://``, any format
    ``qsens vectors import`` reads). Blocking: call it off the event loop."""
    from services.common.datafiles import resolve_location
    from services.common.vector_formats import detect_format, read_vectors

    try:
        path = resolve_location(location, "vectors_location")
        blob = path.read_bytes()
        return read_vectors(blob, detect_format(path, blob), name=path.name)
    except (InvalidArgument, OSError) as exc:
        raise FailedPrecondition(f"imported vectors at {location}: {exc}") from None


async def load_vector_source(
    store: AsyncS3Store,
    run_id: str,
    variant: str,
    trait: str,
    method: str,
    vector_mode: VectorMode,
    *,
    location: str | None = None,
) -> VectorSource:
    """Read ``variant``'s extraction summary and ``method`` vectors for ``trait``; with
    ``location``, the imported vectors there, scaled by ``variant``'s activation norms."""
    summary_key = extract_key(run_id, variant, trait, vector_mode, "summary.json")
    try:
        raw = await store.get_json(summary_key)
    except NotFound:
        raise FailedPrecondition(
            f"no extraction summary at {summary_key}: the {vector_mode} extraction of {trait} "
            f"on {variant} has not finished (or this run never planned it)"
        ) from None
    try:
        summary = ExtractSummary.model_validate(raw)
    except ValidationError as exc:
        raise FailedPrecondition(f"malformed extraction summary at {summary_key}: {exc}") from None
    if location is not None:
        imported = await asyncio.to_thread(read_imported, location)
        return VectorSource(
            variant, trait, method, vector_mode, summary, imported, summary_key, location
        )
    key = summary.vector_keys.get(method)
    if key is None:
        raise FailedPrecondition(
            f"the extraction at {summary_key} has no {method!r} vectors "
            f"(it has {sorted(summary.vector_keys)})"
        )
    if not key.startswith("runs/"):
        key = extract_key(run_id, variant, trait, vector_mode, *key.split("/"))
    try:
        vectors = VectorSet.from_safetensors(await store.get_bytes(key))
    except NotFound:
        raise FailedPrecondition(f"vector set {key} named by {summary_key} is missing") from None
    except InvalidArgument as exc:
        raise FailedPrecondition(f"malformed vector set at {key}: {exc}") from None
    return VectorSource(variant, trait, method, vector_mode, summary, vectors, summary_key, key)


async def compare_with_extraction(
    store: AsyncS3Store, run_id: str, source: VectorSource
) -> dict[str, dict[str, float | None]]:
    """For an imported source: per method of the extraction whose norms it uses, the cosine
    of the imported vector with the extracted one at every layer both have (None where either
    is zero)."""
    out: dict[str, dict[str, float | None]] = {}
    summary = source.summary
    for method, key in sorted(summary.vector_keys.items()):
        if not key.startswith("runs/"):
            key = extract_key(
                run_id, summary.variant, source.trait, source.vector_mode, *key.split("/")
            )
        try:
            extracted = VectorSet.from_safetensors(await store.get_bytes(key))
        except (NotFound, InvalidArgument) as exc:
            raise FailedPrecondition(f"vector set {key} for the comparison: {exc}") from None
        cosines: dict[str, float | None] = {}
        for layer in sorted(set(extracted.layers) & set(source.layers)):
            a = extracted.vector(layer).astype(np.float64)
            b = source.vector(layer).astype(np.float64)
            denom = float(np.linalg.norm(a) * np.linalg.norm(b))
            cosines[str(layer)] = float(a @ b) / denom if denom > 0 else None
        out[method] = cosines
    return out


def layer_at_depth(fraction: float, num_layers: int, available: Sequence[int]) -> int:
    """The available layer nearest to depth ``fraction`` of a ``num_layers``-layer model."""
    if not available:
        raise FailedPrecondition("no layer has a usable vector")
    target = fraction * (num_layers - 1)
    return min(available, key=lambda layer: (abs(layer - target), layer))


def candidate_layers(
    num_layers: int,
    available: Sequence[int],
    *,
    layers: Sequence[int] | None,
    n_layers: int,
    layer_range: tuple[float, float],
) -> list[int]:
    """Explicit ``layers`` (negative counts from the end), or ``n_layers`` evenly spaced
    depths within ``layer_range`` snapped to the nearest available layer (deduplicated)."""
    if layers:
        out: list[int] = []
        for i, layer in enumerate(layers):
            resolved = layer % num_layers if -num_layers <= layer < num_layers else None
            if resolved is None:
                raise InvalidArgument(
                    f"params.steering.layers[{i}]",
                    f"layer {layer} is outside the model's {num_layers} layers",
                )
            if resolved not in out:
                out.append(resolved)
        return out
    lo, hi = sorted(layer_range)
    if not available:
        raise FailedPrecondition("no layer has a usable vector")
    if n_layers == 1:
        depths = [(lo + hi) / 2]
    else:
        depths = [lo + (hi - lo) * i / (n_layers - 1) for i in range(n_layers)]
    picked: list[int] = []
    for depth in depths:
        layer = layer_at_depth(depth, num_layers, available)
        if layer not in picked:
            picked.append(layer)
    return sorted(picked)


def start_coefficient(init_fraction: float, activation_norm: float, vector_norm: float) -> float:
    """``c0`` with ``||c0 * v|| = init_fraction * activation_norm``."""
    if not vector_norm > 0:
        raise FailedPrecondition("cannot scale a zero-norm vector")
    return init_fraction * activation_norm / vector_norm
