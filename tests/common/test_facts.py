"""The precision table and the methodology registry: one answer per fact, for every stage."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.common.methodologies import (
    METHODOLOGIES,
    default_position,
    methodology_info,
    position_reads_response,
)
from services.common.precisions import (
    PRECISIONS,
    bits,
    by_display_order,
    is_8bit,
    precision_info,
)
from services.common.spec import DEFAULT_POSITIONS
from services.common.variants import Precision
from services.extractor.datasets import DEFAULT_POSITIONS as EXTRACTOR_POSITIONS


def test_every_precision_has_facts_consistent_with_the_enum() -> None:
    assert set(PRECISIONS) == set(Precision)
    for p, facts in PRECISIONS.items():
        assert facts.precision is p
        assert facts.quantized == p.is_quantized
        assert (facts.family == "float") == (not p.is_quantized)
    assert [p for p in Precision if is_8bit(p)] == [Precision.INT8]
    assert {p for p in Precision if precision_info(p).platform_quantized} == {
        Precision.GPTQ,
        Precision.AWQ,
    }
    assert {p for p in Precision if precision_info(p).data_dependent_kernels} == {Precision.INT8}


def test_bits_and_display_order_are_the_analyzers_historical_ones() -> None:
    assert {p.value: bits(p) for p in Precision} == {
        "fp32": 32,
        "bf16": 16,
        "fp16": 16,
        "int8": 8,
        "nf4": 4,
        "fp4": 4,
        "gptq": 4,
        "awq": 4,
        "fp8": 8,
    }
    shuffled = ["awq", "nf4", "zz-custom", "bf16", "gptq", "int8", "fp32", "fp4", "fp16", "nf4"]
    assert by_display_order(shuffled) == [
        "fp32",
        "bf16",
        "fp16",
        "int8",
        "nf4",
        "fp4",
        "gptq",
        "awq",
        "zz-custom",
    ]
    assert bits(" INT8 ") == 8
    with pytest.raises(InvalidArgument) as err:
        precision_info("int3", field="models[0].precisions[1]")
    assert err.value.field == "models[0].precisions[1]"


def test_methodology_registry_drives_positions_and_jobs() -> None:
    historical = {"pv": "response[:]", "caa": "prompt[-1]", "arditi": "prompt[-1]"}
    assert historical == DEFAULT_POSITIONS == dict(EXTRACTOR_POSITIONS)
    assert default_position("pv") == "response[:]"
    assert position_reads_response(default_position("pv"))
    assert not position_reads_response(default_position("caa"))
    assert [m for m, f in METHODOLOGIES.items() if f.logit_diff] == ["caa"]
    assert [m for m, f in METHODOLOGIES.items() if f.ablation] == ["arditi"]
    assert [m for m, f in METHODOLOGIES.items() if f.needs_system_role] == ["pv"]
    for facts in METHODOLOGIES.values():
        assert set(facts.required_parts) <= set(facts.content_parts)
    with pytest.raises(InvalidArgument) as err:
        methodology_info("repe", field="traits[2]")
    assert err.value.field == "traits[2]" and "pv, caa, arditi" in err.value.message
