"""GPTQ and AWQ loaders over real gRPC on loopback, with checkpoints quantized in the test.

A tiny Llama (hidden 128, group size 64) is quantized once per method by the real quantize
code (gptqmodel), then served by ``qsens serve loader --precision gptq|awq``: Info, capture,
per-row steering, ablation, Score, NextToken, Generate and the OpenAI endpoint all work as for
bf16. One GPTQ loader takes the platform path: ``--quantize`` waits for the checkpoint the
quantize job committed in S3 and fetches it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from services.common.errors import InvalidArgument
from services.common.quantization import QuantizeSpec
from services.common.variants import Precision
from services.loader.backends.registry import get_backend
from services.loader.client import Chat, LoaderClient, PromptItem, ScoreItem, Steer
from services.loader.model_source import resolve_source
from services.quantizer.calibration import load_calibration
from services.quantizer.run import quantize_folder
from tests.loader_procs import LoaderProc, start_loader

TINY = "tiny:llama?layers=2&hidden=128&heads=4&kv_heads=2&intermediate=256&seed=5"
SPEC = QuantizeSpec.model_validate(
    {
        "gptq": {"group_size": 64},
        "awq": {"group_size": 64},
        "calibration": {"samples": 8, "seq_len": 64},
    }
)
CHAT = Chat.of([("user", "Say something about the ocean.")])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("cache")
    calibration = load_calibration(SPEC.calibration)
    out: dict[str, Path] = {"cache": cache}
    for method in ("gptq", "awq"):
        folder = tmp_path_factory.mktemp(method)
        quantize_folder(SPEC.request("tq", TINY, method), calibration, folder, cache)
        out[method] = folder
    out["reference"] = resolve_source(TINY, cache).folder
    return out


@pytest.fixture(scope="module", params=["gptq", "awq"])
def loader(request: pytest.FixtureRequest, checkpoints: dict[str, Path]) -> Iterator[LoaderProc]:
    method = request.param
    proc = start_loader(str(checkpoints[method]), method, extra_args=["--name", "tq"])
    yield proc
    proc.stop()


async def test_info_reports_method_kernel_and_calibration(loader: LoaderProc) -> None:
    method = loader.variant.split("@")[1]
    async with LoaderClient(loader.address, expect_variant=f"tq@{method}") as client:
        info = await client.info()
    q = info.quantization_config
    assert info.backend == method and info.precision == method
    # The int4 kernels take bf16; the rest runs in bf16, or in float32 on a CPU without native
    # bf16 matmuls (QSENS_LOADER_CPU_COMPUTE=auto), and the notes say so.
    assert q["kernel_input_dtype"] == "bfloat16" and info.dtype == q["compute_dtype"]
    assert info.dtype == "bfloat16" or (
        info.dtype == "float32" and any("int4 kernels take bfloat16" in n for n in info.notes)
    ), (info.dtype, list(info.notes))
    assert (q["method"], q["bits"], q["group_size"]) == (method, 4, 64)
    # The fast CPU kernel (aten int4pack), not the slow plain-torch one.
    assert q["kernel"] == ("TorchAtenLinear" if method == "gptq" else "TorchAtenAwqLinear")
    calibration = load_calibration(SPEC.calibration)
    assert q["calibration_sha256"] == calibration.sha256
    assert q["calibration_samples"] == 8 and q["made_by"] == "qsens quantize job"
    assert any(f"kernel {q['kernel']}" in note for note in info.notes)


async def test_every_rpc_works_with_steering(loader: LoaderProc) -> None:
    rng = np.random.default_rng(0)
    vec = rng.standard_normal(128).astype(np.float32)
    unit = vec / np.linalg.norm(vec)
    async with LoaderClient(loader.address) as client:
        # Capture: every layer, mean reduction; coefficient 0 is identity.
        plain = await client.capture([PromptItem(CHAT, response="Waves.")], position="all")
        zero = await client.capture(
            [PromptItem(CHAT, response="Waves.", steering=[Steer([0, 1], 0.0, vector=vec)])],
            position="all",
        )
        assert plain.activations[0].shape == (2, 128) and np.isfinite(plain.activations[0]).all()
        np.testing.assert_array_equal(plain.activations[0], zero.activations[0])
        # Per-row steering in one batch: each row differs from the unsteered one.
        rows = [PromptItem(CHAT, steering=[Steer([1], c, vector=vec)]) for c in (0.0, 4.0, -4.0)]
        tops = await client.next_token(rows, top_k=5)
        assert tops[1].top != tops[0].top or tops[2].top != tops[0].top
        # Ablation removes the direction from the residual stream.
        ablated = await client.capture(
            [PromptItem(CHAT, steering=[Steer([0, 1], 1.0, vector=vec, mode="ablate")])],
            position="all",
            reduction="none",
        )
        residual = ablated.activations[0][1]
        norms = np.linalg.norm(residual, axis=-1)
        # bf16 kernel inputs: the projection drops to rounding noise, not exactly zero.
        assert (np.abs(residual @ unit) <= 0.02 * norms + 1e-3).all()
        # Score: log-likelihoods are finite and a steered context changes them.
        (scores,), (steered,) = (
            await client.score([ScoreItem(CHAT, ["Waves crash.", "Blue."])]),
            await client.score(
                [ScoreItem(CHAT, ["Waves crash.", "Blue."], steering=[Steer([1], 4.0, vector=vec)])]
            ),
        )
        assert all(np.isfinite(s.logprob) and s.logprob < 0 for s in scores)
        assert scores[0].logprob != steered[0].logprob
        # Generate, greedy, with and without steering.
        base, pushed = await client.generate(
            [PromptItem(CHAT), PromptItem(CHAT, steering=[Steer([0, 1], 8.0, vector=vec)])],
            max_new_tokens=6,
            temperature=0.0,
        )
        assert len(base.token_ids) == 6 and base.token_ids != pushed.token_ids


def test_openai_endpoint(loader: LoaderProc) -> None:
    client = openai.OpenAI(base_url=loader.http_base, api_key="not-used", max_retries=0)
    reply = client.chat.completions.create(
        model=loader.variant,
        messages=[{"role": "user", "content": "Score: "}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = reply.choices[0]
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert choice.logprobs is not None and len(choice.logprobs.content or []) == 3


def test_quantized_stays_close_to_the_reference(checkpoints: dict[str, Path]) -> None:
    """Same prompt through bf16 and each quantized model: close, but not identical."""
    import torch

    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 64, 120, 33, 8]])
    reference = get_backend(None, Precision.BF16).load(
        resolve_source(str(checkpoints["reference"]), checkpoints["cache"]), Precision.BF16, "cpu"
    )
    with torch.no_grad():
        ref = reference.model(ids).logits.float().flatten()
    for method, precision in (("gptq", Precision.GPTQ), ("awq", Precision.AWQ)):
        loaded = get_backend(None, precision).load(
            resolve_source(str(checkpoints[method]), checkpoints["cache"]), precision, "cpu"
        )
        with torch.no_grad():
            out = loaded.model(ids).logits.float().flatten()
        cos = float(torch.nn.functional.cosine_similarity(out, ref, dim=0))
        assert 0.7 < cos < 0.99999, (method, cos)


def test_gptq_8bit_is_quantized_served_and_closer_than_4bit(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """GPTQ at 8 bits: quantized by the same code, served by the int8 kernel, nearer to bf16."""
    import torch

    spec = QuantizeSpec.model_validate(
        {"gptq": {"bits": 8, "group_size": 64}, "calibration": SPEC.calibration.model_dump()}
    )
    folder = tmp_path / "gptq8"
    quantize_folder(
        spec.request("tq", TINY, "gptq"),
        load_calibration(spec.calibration),
        folder,
        checkpoints["cache"],
    )
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 64, 120, 33, 8]])
    cache = checkpoints["cache"]
    reference = get_backend(None, Precision.BF16).load(
        resolve_source(str(checkpoints["reference"]), cache), Precision.BF16, "cpu"
    )
    logits = {}
    for name, path in (("8", folder), ("4", checkpoints["gptq"])):
        loaded = get_backend(None, Precision.GPTQ).load(
            resolve_source(str(path), cache), Precision.GPTQ, "cpu"
        )
        assert loaded.quantization_config["bits"] == int(name)
        if name == "8":
            assert loaded.quantization_config["kernel_backend"] == "GPTQ_TORCH_INT8"
        with torch.no_grad():
            logits[name] = loaded.model(ids).logits.float().flatten()
    with torch.no_grad():
        ref = reference.model(ids).logits.float().flatten()
    error = {k: float((v - ref).norm() / ref.norm()) for k, v in logits.items()}
    assert error["8"] < error["4"], error
    assert error["8"] < 0.05, error


def test_non_quantized_checkpoint_is_refused(checkpoints: dict[str, Path]) -> None:
    reference = resolve_source(str(checkpoints["reference"]), checkpoints["cache"])
    with pytest.raises(InvalidArgument, match="is not a GPTQ checkpoint") as err:
        get_backend(None, Precision.GPTQ).load(reference, Precision.GPTQ, "cpu")
    assert err.value.field == "model"
    awq = resolve_source(str(checkpoints["awq"]), checkpoints["cache"])
    with pytest.raises(InvalidArgument, match="quant_method 'awq'"):
        get_backend(None, Precision.GPTQ).load(awq, Precision.GPTQ, "cpu")


def _status(env: dict[str, str], run_id: str) -> dict[str, Any]:
    """``qsens status RUN --json`` as a user runs it."""
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "status", run_id, "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_platform_checkpoint_is_awaited_then_served(
    plane_env: Any, run_id: str, tmp_path: Path
) -> None:
    """``--quantize``: the loader waits (not ready, announced 'waiting' with the quantize job
    and the checkpoint, which `qsens status` shows) until the quantize job commits, then
    serves, and its early entry gives way to the ready one."""
    from concurrent.futures import ThreadPoolExecutor

    from services.common.dag import submit
    from services.common.jobs import Job, JobKind, RunPlan
    from services.common.loader_registry import LoaderRegistry
    from services.common.natsconn import connection
    from services.common.store import AsyncS3Store
    from services.quantizer.handler import quantize_request

    # Settings of their own, so no earlier test has made this checkpoint.
    request = SPEC.request("tq", TINY, "gptq").model_copy(
        update={"settings": {**SPEC.gptq.model_dump(), "damp_percent": 0.09}}
    )
    env = {**plane_env.env, "QSENS_CACHE_DIR": str(tmp_path)}
    # The run's quantize job (no quantizer worker: the test plays it) and a job after it.
    quantize = Job(
        kind=JobKind.QUANTIZE,
        run_id=run_id,
        name="quantize tq@gptq",
        params=request.model_dump(mode="json"),
    )
    after = Job(
        kind=JobKind.NOOP, run_id=run_id, params={"variant": "tq@gptq"}, deps=(quantize.id,)
    )
    asyncio.run(submit(RunPlan(run_id=run_id, spec_hash="q", jobs=[quantize, after])))

    async def entries() -> list[Any]:
        async with connection(name="test") as nc:
            return await (await LoaderRegistry.open(nc.jetstream())).entries("tq@gptq")

    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(
            start_loader,
            "ignored",
            "gptq",
            env=env,
            extra_args=["--quantize", request.model_dump_json(), "--announce"],
        )
        deadline = time.monotonic() + 60
        while not (waiting := asyncio.run(entries())):
            assert time.monotonic() < deadline and not starting.done()
            time.sleep(0.2)
        while waiting[0].state != "waiting":
            assert time.monotonic() < deadline and not starting.done()
            time.sleep(0.2)
            waiting = asyncio.run(entries())
        assert not starting.done()  # no checkpoint yet: the loader waits, it does not fail
        status = _status(env, run_id)
        result = asyncio.run(quantize_request(request, AsyncS3Store()))
        proc = starting.result(timeout=240)
    try:

        async def info() -> Any:
            async with LoaderClient(proc.address, expect_variant="tq@gptq") as client:
                return await client.info()

        got = asyncio.run(info())
        assert result["reused"] is False
        assert got.quantization_config["checkpoint"] == result["checkpoint"]
        assert (tmp_path / "quantized" / result["checkpoint"] / "manifest.json").is_file()
        assert "waiting for the quantize job's checkpoint" in proc.log_tail(400)
        (row,) = status["loaders"]
        assert row["variant"] == "tq@gptq" and row["state"] == "waiting"
        assert row["detail"] == (
            f"for checkpoint {result['checkpoint']}, made by the job 'quantize tq@gptq'"
        )
        assert row["since"] == waiting[0].since and row["since"] <= time.time()
        # Once serving, only the ready entry remains (the early one withdrew itself).
        deadline = time.monotonic() + 10
        while [(e.state, e.address) for e in asyncio.run(entries())] != [("ready", proc.address)]:
            assert time.monotonic() < deadline, asyncio.run(entries())
            time.sleep(0.2)
        (row,) = _status(env, run_id)["loaders"]
        assert (row["state"], row["address"]) == ("ready", proc.address)
    finally:
        proc.stop()
