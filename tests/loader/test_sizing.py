"""The sizing table is computed: docs/SIZING.md equals the code's output, the seed shapes
give the parameter counts the seeds-matrix spec states, and the GPU counts follow the
placement function."""

from __future__ import annotations

import yaml

from services.common.variants import Precision
from services.loader import sizing
from services.loader.placement import (
    DeviceMemory,
    DoesNotFit,
    gpus_needed,
    meta_model,
    place,
    units_of,
)
from tests.loader_procs import REPO


def test_docs_sizing_is_the_codes_output() -> None:
    text = (REPO / "docs" / "SIZING.md").read_text(encoding="utf-8")
    assert text.endswith(sizing.markdown_table())
    for seed in sizing.SEED_MODELS:
        assert f"| {seed.name} |" in text


def test_seed_shapes_match_the_seeds_matrix_spec() -> None:
    spec = yaml.safe_load((REPO / "examples" / "seeds-matrix.yaml").read_text(encoding="utf-8"))
    stated = {m["name"]: (m["source"], float(m["size_b"])) for m in spec["models"]}
    assert {s.name for s in sizing.SEED_MODELS} == set(stated)
    assert [p.value for p in sizing.STUDY_PRECISIONS] == spec["precisions"]
    for seed in sizing.SEED_MODELS:
        source, size_b = stated[seed.name]
        assert seed.source == source
        params = sizing.sizing(seed.name, Precision.BF16).parameters
        assert abs(params / 1e9 - size_b) <= 0.02 * size_b, (seed.name, params)


def test_gpu_counts_follow_the_placement() -> None:
    big = sizing.sizing("llama-3.3-70b", Precision.BF16)
    assert big.weight_bytes > 140e9 and big.gpus == 2
    assert sizing.sizing("llama-3.3-70b", Precision.NF4).gpus == 1
    assert sizing.sizing("llama-3.1-8b", Precision.BF16).gpus == 1
    # The same units on one card do not fit: the count is the placement's, not a division.
    seed = next(s for s in sizing.SEED_MODELS if s.name == "llama-3.3-70b")
    units = units_of(meta_model(seed.config()), Precision.BF16)
    try:
        place(units, [DeviceMemory(0, sizing.H100_FREE_BYTES)])
    except DoesNotFit as exc:
        assert "141.1" not in str(exc) and "GiB" in str(exc)
    else:
        raise AssertionError("a 70B bf16 model placed on one H100")
    assert gpus_needed(units, sizing.H100_FREE_BYTES, headroom=0.5) == 4
