"""Where every artefact of a run lives in the bucket.

Keys are ``runs/<run_id>/<variant>/<stage>/<methodology>/<trait>/...`` (see docs/ARTEFACTS.md);
every key goes through ``run_key`` so a part can never climb out of its run. Producers and
consumers (quantizer, extractor, steerer, analyzer) build keys only through these functions.
"""

from __future__ import annotations

from typing import Literal

# The extraction summaries moved to the extract contract; re-exported for existing readers.
from services.common.contracts.common import VectorMode
from services.common.contracts.extract import ExtractSummary, VettingSummary
from services.common.store import run_key

__all__ = [
    "ExtractSummary",
    "VectorMode",
    "VettingSummary",
    "analysis_key",
    "baseline_key",
    "benchmark_key",
    "extract_key",
    "logit_diff_key",
    "probe_key",
    "quantize_key",
    "steer_key",
    "trait_parts",
]


def trait_parts(trait: str) -> tuple[str, str]:
    """``pv/evil`` -> (``pv``, ``evil``)."""
    methodology, sep, name = trait.partition("/")
    if not sep or not methodology or not name or "/" in name:
        raise ValueError(f"trait names look like <methodology>/<name>, got {trait!r}")
    return methodology, name


def extract_key(run_id: str, variant: str, trait: str, mode: VectorMode, *leaf: str) -> str:
    """``.../<variant>/extract/<m>/<t>/<mode>/<leaf>``: responses.jsonl, vetting.json,
    activations.safetensors, vectors/<method>.safetensors, summary.json."""
    return run_key(run_id, variant, "extract", *trait_parts(trait), mode, *leaf)


def baseline_key(run_id: str, variant: str, trait: str, *leaf: str) -> str:
    """Unsteered answers of a variant to a trait's steering questions, with judge scores."""
    return run_key(run_id, variant, "baseline", *trait_parts(trait), *leaf)


def steer_key(
    run_id: str,
    target: str,
    trait: str,
    source: str,
    method: str,
    vector_mode: VectorMode,
    mode: Literal["add", "ablate"],
    direction: Literal["+", "-"],
    *leaf: str,
) -> str:
    """``.../<target>/steer/<m>/<t>/<source>/<method>-<vector_mode>/<mode><direction>/<leaf>``."""
    sign = "pos" if direction == "+" else "neg"
    return run_key(
        run_id,
        target,
        "steer",
        *trait_parts(trait),
        source,
        f"{method}-{vector_mode}",
        f"{mode}-{sign}",
        *leaf,
    )


def logit_diff_key(
    run_id: str,
    variant: str,
    trait: str,
    source: str,
    method: str,
    vector_mode: VectorMode,
    *leaf: str,
) -> str:
    return run_key(
        run_id, variant, "logit_diff", *trait_parts(trait), source, f"{method}-{vector_mode}", *leaf
    )


def benchmark_key(run_id: str, variant: str, name: str, *leaf: str) -> str:
    return run_key(run_id, variant, "benchmark", name, *leaf)


def probe_key(run_id: str, variant: str, name: str, *leaf: str) -> str:
    return run_key(run_id, variant, "probe", name, *leaf)


def quantize_key(run_id: str, variant: str, *leaf: str) -> str:
    """``.../<variant>/quantize/<leaf>``: the quantize job's ``result.json`` for a gptq/awq
    variant (the checkpoint itself lives outside the run, under ``quantized/<id>/``)."""
    return run_key(run_id, variant, "quantize", *leaf)


def analysis_key(run_id: str, *leaf: str) -> str:
    return run_key(run_id, "analysis", *leaf)
