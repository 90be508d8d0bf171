"""The GPTQ/AWQ kernel choice: every name is one of gptqmodel's backends, in a sensible order."""

from __future__ import annotations

import pytest

from services.loader.backends import quantized
from services.loader.backends.quantized import kernel_candidates


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_candidate_is_a_gptqmodel_backend(method: str, device: str) -> None:
    gptqmodel = quantized._import_gptqmodel()
    names = kernel_candidates(method, device, 4, 128, True)
    assert names, "no kernel to try"
    for name in names:
        assert hasattr(gptqmodel.BACKEND, name), name
    for name in quantized._FLOAT16_KERNELS:
        assert hasattr(gptqmodel.BACKEND, name), name


def test_cuda_falls_back_to_kernels_that_need_no_compiled_extension() -> None:
    # Marlin/Machete need nvcc to compile at first use: Triton and plain torch follow.
    assert kernel_candidates("gptq", "cuda", 4, 128, True)[-2:] == ["GPTQ_TRITON", "GPTQ_TORCH"]
    assert kernel_candidates("awq", "cuda", 4, 128, True)[-2:] == ["AWQ_GEMM_TRITON", "AWQ_TORCH"]
    # GPTQ Marlin needs symmetric weights; an asymmetric checkpoint skips it.
    assert "GPTQ_MARLIN" not in kernel_candidates("gptq", "cuda", 4, 128, False)


def test_cpu_int4pack_only_for_the_group_sizes_it_takes() -> None:
    assert kernel_candidates("gptq", "cpu", 4, 128, True)[0] == "GPTQ_TORCH_ATEN"
    assert kernel_candidates("gptq", "cpu", 4, 16, True)[0] == "GPTQ_TORCH"
    assert kernel_candidates("gptq", "cpu", 8, 128, True)[0] == "GPTQ_TORCH_INT8"
