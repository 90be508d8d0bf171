"""The vLLM engine is registered: ``--engine vllm`` resolves to its backend for fp32, bf16
and fp16 only, never becomes a precision's default, and where vLLM is not installed preflight
and loading name the missing package and its own environment."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.common.settings import LoaderSettings
from services.common.variants import Precision
from services.loader.backends import registry
from services.loader.model_source import ResolvedSource


def test_engine_vllm_resolves_to_its_backend() -> None:
    for precision in (Precision.FP32, Precision.BF16, Precision.FP16):
        assert registry.resolve_backend(precision, engine="vllm").name == "vllm"
        assert registry.resolve_backend(precision).engine == "hf"
    with pytest.raises(InvalidArgument, match="no backend serves nf4 on engine 'vllm'"):
        registry.resolve_backend(Precision.NF4, engine="vllm")
    with pytest.raises(InvalidArgument, match="runs on engine 'vllm', not 'hf'"):
        registry.resolve_backend(Precision.BF16, "vllm", "hf")


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this environment"
)
def test_without_vllm_preflight_and_load_name_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"needs the package\(s\) vllm.*\[vllm\]"):
        registry.check_variant(Precision.BF16, engine="vllm")
    with pytest.raises(InvalidArgument, match="engine 'vllm' needs vLLM"):
        registry.load_engine(
            ResolvedSource(tmp_path, "m", str(tmp_path)),
            Precision.BF16,
            engine="vllm",
            settings=LoaderSettings(),
        )
