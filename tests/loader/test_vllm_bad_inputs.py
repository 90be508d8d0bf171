"""The bad-input tests of ``test_bad_inputs`` against a loader on the vLLM engine: the same
named errors for every bad request, and the server keeps serving (the tests are imported
and run here with this module's ``limited_loader``: a ``tiny:llama`` loader started with
``--engine vllm`` in the vLLM virtual environment; skipped with the reason named without it).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.loader.client import LoaderClient
from tests.loader.test_bad_inputs import (  # collected here, with this module's fixture
    test_bad_input,
    test_capture_error_comes_before_any_data,
)
from tests.loader.test_vllm_engine import VENV, VLLM_PYTHON
from tests.loader_procs import LoaderProc, start_loader

__all__ = ["test_bad_input", "test_capture_error_comes_before_any_data"]

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason=f"no vLLM virtual environment at {VENV} (make vllm-venv; set QSENS_VLLM_VENV)",
)


@pytest.fixture(scope="module")
def limited_loader() -> Iterator[LoaderProc]:
    """The same limits as the HF loader of ``test_bad_inputs``, on the vLLM engine."""
    proc = start_loader(
        "tiny:llama",
        "fp32",
        env={
            "QSENS_LOADER_MAX_BATCH_ITEMS": "16",
            "QSENS_LOADER_MAX_TOKENS_PER_ITEM": "256",
            "QSENS_LOADER_MAX_NEW_TOKENS": "128",
            "OMP_NUM_THREADS": "1",
        },
        extra_args=["--engine", "vllm"],
        python=str(VLLM_PYTHON),
        http=False,
        metrics=False,
        timeout=300,
    )
    yield proc
    proc.stop()


async def test_the_loader_runs_on_vllm(limited_loader: LoaderProc) -> None:
    async with LoaderClient(limited_loader.address) as client:
        info = await client.info()
    assert (info.engine, info.backend, info.variant) == ("vllm", "vllm", "tiny-llama@fp32")
