"""bf16/fp16 variants on a CPU without native half-precision matmuls compute in float32.

The weights keep the variant's rounding (the quantity the study compares); only activations
change dtype, and the loader says so in its notes and its reported dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common import settings as settings_mod
from services.common.variants import Precision
from services.loader.backends import hf
from services.loader.backends.registry import get_backend
from services.loader.model_source import resolve_source


@pytest.fixture
def compute_mode(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def set_mode(mode: str) -> None:
        monkeypatch.setenv("QSENS_LOADER_CPU_COMPUTE", mode)
        settings_mod.reset()

    yield set_mode
    monkeypatch.delenv("QSENS_LOADER_CPU_COMPUTE", raising=False)
    settings_mod.reset()


def _tiny() -> object:
    return resolve_source("tiny:llama", settings_mod.get(settings_mod.CommonSettings).cache_dir)


def _logits(loaded: object) -> np.ndarray:
    model = loaded.model  # type: ignore[attr-defined]
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        return model(input_ids=ids).logits.float().numpy()[0]


def test_auto_follows_the_cpu_flags(compute_mode, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    compute_mode("auto")
    cpu = torch.device("cpu")
    monkeypatch.setattr(hf, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    dtype, note = hf.cpu_compute_dtype(torch.bfloat16, cpu)
    assert dtype == torch.float32 and note is not None and "bf16" in note
    monkeypatch.setattr(hf, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert hf.cpu_compute_dtype(torch.bfloat16, cpu) == (torch.bfloat16, None)
    # fp16 needs its own flag; bf16 support does not make fp16 native.
    assert hf.cpu_compute_dtype(torch.float16, cpu)[0] == torch.float32
    # float32 weights and accelerators are never touched.
    assert hf.cpu_compute_dtype(torch.float32, cpu) == (torch.float32, None)
    assert hf.cpu_compute_dtype(torch.bfloat16, torch.device("cuda", 0)) == (torch.bfloat16, None)


def test_bf16_weights_keep_their_rounding_in_float32(compute_mode) -> None:  # type: ignore[no-untyped-def]
    compute_mode("native")
    native = get_backend(None, Precision.BF16).load(_tiny(), Precision.BF16, "cpu")  # type: ignore[arg-type]
    compute_mode("float32")
    upcast = get_backend(None, Precision.BF16).load(_tiny(), Precision.BF16, "cpu")  # type: ignore[arg-type]
    assert native.compute_dtype == torch.bfloat16 and upcast.compute_dtype == torch.float32
    assert any("float32" in n for n in upcast.notes)
    assert not any("float32" in n for n in native.notes)
    for (name, a), (_, b) in zip(
        native.model.state_dict().items(), upcast.model.state_dict().items(), strict=True
    ):
        assert b.dtype == torch.float32, name
        # Exactly the bf16 values, upcast.
        assert torch.equal(a.float(), b), name
    # Same weights, different activation precision: close, not identical.
    cos = [
        float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
        for x, y in zip(_logits(native), _logits(upcast), strict=True)
    ]
    assert min(cos) > 0.99, cos


def test_nf4_computes_in_float32_with_the_same_quantized_weights(compute_mode) -> None:  # type: ignore[no-untyped-def]
    compute_mode("native")
    native = get_backend(None, Precision.NF4).load(_tiny(), Precision.NF4, "cpu")  # type: ignore[arg-type]
    compute_mode("float32")
    upcast = get_backend(None, Precision.NF4).load(_tiny(), Precision.NF4, "cpu")  # type: ignore[arg-type]
    assert native.compute_dtype == torch.bfloat16 and upcast.compute_dtype == torch.float32
    assert upcast.quantization_config["bnb_4bit_compute_dtype"] == "float32"
    native_state, upcast_state = native.model.state_dict(), upcast.model.state_dict()
    for name, a in native_state.items():
        b = upcast_state[name]
        if a.dtype == torch.bfloat16:
            # Unquantized modules hold the bf16 values in float32.
            assert b.dtype == torch.float32 and torch.equal(a.float(), b), name
        elif a.dtype == torch.uint8:
            assert torch.equal(a, b), name  # the packed 4-bit weights are identical
    cos = [
        float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
        for x, y in zip(_logits(native), _logits(upcast), strict=True)
    ]
    assert min(cos) > 0.99, cos


def test_nf4_matmuls_compute_in_float32_on_every_cpu(compute_mode) -> None:  # type: ignore[no-untyped-def]
    """In float32 mode a 4-bit linear computes ``x @ W.T`` in float32 with W dequantized from
    its codes (bitsandbytes' reference dequantization, read before any forward), for one token
    and for several: on an avx512_bf16 CPU bitsandbytes' own CPU kernel computes in bf16
    (~1e-2 off), and the loader keeps its modules off it (the note says so there)."""
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    from bitsandbytes.nn import Linear4bit

    compute_mode("float32")
    loaded = get_backend(None, Precision.NF4).load(_tiny(), Precision.NF4, "cpu")  # type: ignore[arg-type]
    layers = [m for m in loaded.model.modules() if isinstance(m, Linear4bit)][:4]
    for layer in layers:
        state = layer.weight.quant_state
        codes = _get_4bit_code(state.quant_type, torch.device("cpu"))
        packed = layer.weight.data.view(torch.uint8).reshape(-1)
        weight = _dequantize_4bit_compute(
            packed, state.absmax, codes, state.blocksize, state.shape, torch.float32
        )
        x = torch.randn(1, 3, state.shape[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for tokens in (1, 3):
                got = layer(x[:, :tokens])
                want = torch.nn.functional.linear(x[:, :tokens], weight, layer.bias)
                assert got.dtype == torch.float32
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    noted = any("4-bit matmuls in the compute dtype" in n for n in loaded.notes)
    assert noted == bool(bnb_functional.has_avx512bf16())
