"""Layer geometry: relative depth, snapping to captured layers, the analysis windows.

Both the loading (which activation layers to read) and the document builders use it, so it
imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "SAFETY_DEPTHS",
    "SAFETY_N_LAYERS",
    "depth_layer",
    "layer_window",
    "safety_layers",
    "snap_layer",
]

SAFETY_DEPTHS = (0.2, 0.8)
SAFETY_N_LAYERS = 5


def depth_layer(depth: float, num_layers: int) -> int:
    """The layer index at relative ``depth`` of a model with ``num_layers`` layers."""
    return round(depth * (num_layers - 1))


def snap_layer(layer: int, layers: Sequence[int]) -> int:
    """The captured layer nearest to ``layer`` (the shallower one on a tie)."""
    if not layers:
        raise ValueError("no captured layers")
    return min(layers, key=lambda x: (abs(x - layer), x))


def layer_window(
    layers: Sequence[int], num_layers: int, layer_range: tuple[float, float]
) -> list[int]:
    """Captured layers whose depth ``l / (num_layers - 1)`` lies in ``layer_range`` (inclusive)."""
    lo, hi = layer_range
    denom = max(num_layers - 1, 1)
    return [layer for layer in layers if lo - 1e-9 <= layer / denom <= hi + 1e-9]


def safety_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Five layers evenly spaced between 20% and 80% depth, snapped to captured layers."""
    depths = np.linspace(SAFETY_DEPTHS[0], SAFETY_DEPTHS[1], SAFETY_N_LAYERS)
    return sorted({snap_layer(depth_layer(float(d), num_layers), layers) for d in depths})
