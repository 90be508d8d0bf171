"""Identical inputs analysed under two run ids give identical intervals (seeds come from content)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from services.analyzer.handler import run_analysis
from services.common.store import AsyncS3Store, S3Store
from tests.analyzer.conftest import Analysed
from tests.analyzer.planted import write_planted_run
from tests.analyzer.test_analysis import DOCS


def _intervals(value: Any, path: str = "") -> dict[str, Any]:
    """Every ``low``/``high`` bound anywhere in a document, by its JSON path."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("low", "high") and isinstance(v, float):
                out[f"{path}.{k}"] = v
            else:
                out.update(_intervals(v, f"{path}.{k}"))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.update(_intervals(v, f"{path}[{i}]"))
    return out


def test_a_rerun_under_another_run_id_gives_identical_intervals(
    analysed: Analysed, store: S3Store
) -> None:
    run_id = "rerun-" + uuid.uuid4().hex[:10]
    write_planted_run(store, run_id)
    manifest = asyncio.run(run_analysis(AsyncS3Store(store), run_id))
    first_id = analysed.planted.run_id
    n_bounds = 0
    for name in DOCS:
        first = analysed.doc(name)
        second = store.get_json(manifest["outputs"][name])
        bounds = _intervals(first)
        n_bounds += len(bounds)
        assert _intervals(second) == bounds, name
        # Everything else is the same too, once the run id in keys and fields is set aside.
        assert json.dumps(second, sort_keys=True).replace(run_id, "R") == json.dumps(
            first, sort_keys=True
        ).replace(first_id, "R"), name
    # Bootstrapped intervals were compared, not an empty set.
    assert n_bounds > 50
