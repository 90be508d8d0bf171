"""What every analysis document builder shares: cell seeds, reference cells, small readers."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from services.analyzer.loading import RunArtefacts
from services.common.hashing import stable_hash

__all__ = [
    "F64",
    "OfVariant",
    "against_reference",
    "cell_id",
    "content_seed",
    "finite",
    "mean_of",
    "model_of",
    "precision_of",
    "seed_of",
    "trait_names",
]


F64 = NDArray[np.float64]


def finite(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def seed_of(base: int, *parts: Any) -> int:
    return int(stable_hash([base, *[str(p) for p in parts]], 8), 16)


def content_seed(run: RunArtefacts) -> int:
    """The base of every cell seed: ``steering.seed`` and the spec's fingerprint, never the run id.

    Cells add their identity (:func:`cell_id`), so identical inputs analysed under two run ids
    get identical intervals.
    """
    return seed_of(run.spec.steering.seed, run.spec.fingerprint())


def cell_id(run: RunArtefacts, key: str) -> str:
    """A result key's identity within its run: the key without ``runs/<run_id>/``."""
    return key.removeprefix(f"runs/{run.run_id}/")


def model_of(variant: str) -> str:
    return variant.partition("@")[0]


def precision_of(variant: str) -> str:
    return variant.partition("@")[2]


class OfVariant(Protocol):
    @property
    def variant(self) -> str: ...


_V = TypeVar("_V", bound=OfVariant)


def against_reference(
    run: RunArtefacts, views: Iterable[_V], cell: Callable[[_V], tuple[str, ...]]
) -> Iterable[tuple[tuple[str, ...], str, _V | None, _V]]:
    """Views grouped into cells ``(model, *cell(view))`` in sorted order, variants sorted in
    each: ``(cell, reference variant id, the cell's reference view or None, view)``."""
    by_cell: dict[tuple[str, ...], list[_V]] = defaultdict(list)
    for v in views:
        by_cell[(model_of(v.variant), *cell(v))].append(v)
    for key, group in sorted(by_cell.items()):
        ref_id = run.reference_of(key[0])
        ref = next((v for v in group if v.variant == ref_id), None)
        for v in sorted(group, key=lambda x: x.variant):
            yield key, ref_id, ref, v


def mean_of(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def trait_names(run: RunArtefacts) -> list[tuple[str, str, str]]:
    """(trait name, methodology, position) of every trait in the spec."""
    spec = run.spec
    return [(spec.trait_name(t), t.methodology, spec.position_for(t)) for t in spec.traits]
