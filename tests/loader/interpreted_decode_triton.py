"""The Triton decode attention kernel (services/loader/decode_triton.py) on a CPU, in Triton's
interpreter: the same kernel source the GPU compiles, run program by program on these tensors.
``tests/loader/test_decode_triton.py`` runs this module in a child process with
``TRITON_INTERPRET=1`` set from the start (Triton reads it when it is imported, and the rest
of the suite imports Triton through torch long before).

It attends what the plain-torch contract says (every group size, head size and key count
the engine meets, several key blocks, one key), generation through it equals the masked SDPA
decode (static steps and steps that drop finished rows), and a kernel that refuses or whose
first answer is wrong switches itself off with the flash kernel (or SDPA) attending instead.
The GPU check (bench/gpu_check.py) compares it with the flash and masked decode on a GPU in
bf16, which the interpreter cannot compute (numpy has no bfloat16).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from services.loader import decode_triton
from services.loader.decode_triton import DecodeTriton, reference_decode
from services.loader.engine import Engine, GenParams
from services.loader.fastgen_kernels import DecodeFlash
from services.loader.server import build_runtime
from tests.loader.test_fastgen import _FlashSemantics, _stop_string, assert_same, generate
from tests.loader.test_fastgen import sweep_items as all_sweep_items


@pytest.fixture(scope="module", autouse=True)
def interpreted() -> None:
    """Triton's interpreter, set by the parent test."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_decode_triton.py"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return build_runtime("tiny:llama?layers=3", "fp32", device="cpu").engine


def _case(
    rows: int, length: int, kv_heads: int, groups: int, dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, rows, length, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(rows, kv_heads * groups, dim, generator=g).to(dtype)
    used = torch.randint(1, length // 2, (rows,), generator=g, dtype=torch.int32)
    used[0] = 1  # one key: the softmax of a single score
    used[-1] = length // 2  # several key blocks of 64
    first = torch.randint(0, length - length // 2 + 1, (rows,), generator=g)
    starts = torch.cat([torch.arange(rows) * length + first, torch.tensor([rows * length])])
    return q, keys, values, starts.to(torch.int32), used


@pytest.mark.parametrize(
    ("kv_heads", "groups", "dim", "dtype"),
    [
        (2, 4, 16, torch.float32),  # the tiny test models' grouping
        (8, 4, 128, torch.float16),  # Llama-3.1-8B's heads (bf16 on the GPU)
        (3, 3, 64, torch.float16),  # SmolLM2-135M's
        (4, 1, 32, torch.float32),  # no grouping
        (1, 16, 64, torch.float32),  # a whole 16-row tile of query heads
    ],
)
def test_kernel_attends_what_the_contract_says(
    kv_heads: int, groups: int, dim: int, dtype: torch.dtype
) -> None:
    q, keys, values, starts, used = _case(5, 300, kv_heads, groups, dim, dtype, seed=dim + groups)
    kernel = DecodeTriton(True)
    assert kernel.usable(dtype, dim)
    query_offsets = torch.arange(6, dtype=torch.int32)
    out = kernel(q, keys, values, (query_offsets, starts), used, dim**-0.5)
    assert kernel.disabled is None and out is not None and kernel.checked, kernel.disabled
    want = reference_decode(q, keys, values, starts, used, dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), want, atol=tolerance, rtol=tolerance)
    # Each row read its own keys: another row's offsets give another answer.
    shifted = torch.cat([starts[1:2], starts[1:]])  # row 0 reads row 1's keys
    other = kernel(q, keys, values, (query_offsets, shifted), used, dim**-0.5)
    assert other is not None and not torch.allclose(other[0].float(), out[0].float())


@pytest.mark.parametrize(("block_n", "warps", "stages"), [(32, 2, 1), (128, 8, 3)])
def test_launch_settings_keep_the_answer(block_n: int, warps: int, stages: int) -> None:
    """The benchmark's other launch settings (key block, warps, pipeline stages) attend the
    same: rows of 1 key, of less than a block and of several blocks."""
    q, keys, values, starts, used = _case(4, 300, 2, 4, 32, torch.float32, seed=block_n)
    kernel = DecodeTriton(True, block_n=block_n, num_warps=warps, num_stages=stages)
    out = kernel(q, keys, values, (torch.arange(5, dtype=torch.int32), starts), used, 0.2)
    assert out is not None and kernel.disabled is None, kernel.disabled
    want = reference_decode(q, keys, values, starts, used, 0.2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_head_sizes_the_kernel_cannot_tile_are_refused_up_front() -> None:
    kernel = DecodeTriton(True)
    assert not kernel.usable(torch.bfloat16, 80) and not kernel.usable(torch.float16, 8)
    assert not kernel.usable(torch.int8, 64)
    assert DecodeTriton(False).disabled == "not on a CUDA device"
    q, keys, values, starts, used = _case(2, 40, 2, 2, 24, torch.float32, seed=1)
    assert kernel(q, keys, values, (torch.arange(3, dtype=torch.int32), starts), used, 1.0) is None
    assert kernel.disabled is None  # a shape it does not serve is not a failure


class _Counting(DecodeTriton):
    def __init__(self) -> None:
        super().__init__(True)
        self.answers = 0

    def __call__(self, *args: Any) -> torch.Tensor | None:
        out = super().__call__(*args)
        self.answers += out is not None
        return out


def _off() -> dict[str, Any]:
    return {"decode_triton": DecodeTriton(False), "decode_flash": DecodeFlash(False)}


def test_generation_through_the_kernel_equals_the_masked_decode(engine: Engine) -> None:
    items = all_sweep_items(engine)[::3]
    stop = _stop_string(engine, items)
    params = GenParams(max_new_tokens=6, stop=(stop,), logprobs=True)
    for static in (True, False):
        kernel = _Counting()
        masked = generate(engine, items, params, static=static, **_off())
        through = generate(
            engine,
            items,
            params,
            static=static,
            decode_triton=kernel,
            decode_flash=DecodeFlash(False),
        )
        assert_same(masked, through, atol=1e-5)
        assert kernel.disabled is None
        assert kernel.answers >= 3 * 5  # every layer of every decode step


def test_a_refusing_or_wrong_kernel_switches_off_and_flash_attends(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = all_sweep_items(engine)[::4]
    params = GenParams(max_new_tokens=5, logprobs=True, ignore_eos=True)
    masked = generate(engine, items, params, **_off())

    # A first answer that disagrees with the reference: off, and flash's answers instead.
    wrong = DecodeTriton(True)
    flash = _FlashSemantics()
    monkeypatch.setattr(
        decode_triton,
        "reference_decode",
        lambda *a: reference_decode(*a) + 1.0,
    )
    got = generate(engine, items, params, decode_triton=wrong, decode_flash=flash)
    monkeypatch.undo()
    assert wrong.disabled is not None and "first answer off" in wrong.disabled
    assert flash.calls >= 3 * 4  # flash attended every layer of every step
    assert_same(masked, got, atol=1e-5)

    # A kernel that fails to launch: off, named, and the engine goes on.
    refusing = DecodeTriton(True)
    monkeypatch.setattr(decode_triton, "kernel", lambda: None)  # not callable: TypeError
    got = generate(engine, items, params, decode_triton=refusing, decode_flash=_FlashSemantics())
    assert refusing.disabled is not None and refusing.disabled.startswith("TypeError")
    assert_same(masked, got, atol=1e-5)
