"""bitsandbytes NF4, FP4 and INT8 load and run on CPU (tiny model; SmolLM2 in test_smollm2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.loader.client import Chat, LoaderClient, PromptItem, Steer
from services.loader.engine import ChatPrompt, EngineItem, GenParams
from services.loader.positions import parse_position
from services.loader.server import build_runtime
from tests.loader_procs import start_loader

PROMPT = ChatPrompt(
    (("system", "Be brief."), ("user", "Describe the weather today in a few words."))
)


@pytest.fixture(scope="module")
def fp32_reference() -> np.ndarray:
    engine = build_runtime("tiny:llama", "fp32", device="cpu").engine
    ids = engine.encode_prompt(PROMPT, "x")
    return next(engine.capture([EngineItem(ids)], range(4), parse_position("all"), "mean"))[
        0
    ].activations.numpy()


@pytest.mark.parametrize(
    ("precision", "marker"), [("nf4", "nf4"), ("fp4", "fp4"), ("int8", "load_in_8bit")]
)
def test_bnb_precisions_run_on_cpu(precision: str, marker: str, fp32_reference: np.ndarray) -> None:
    runtime = build_runtime("tiny:llama", precision, device="cpu")
    info = runtime.info()
    assert info.backend == "bnb" and info.precision == precision and info.device == "cpu"
    config = json.loads(info.quantization_config_json)
    assert marker in json.dumps(config)
    fp32_bytes = build_runtime("tiny:llama", "fp32", device="cpu").engine.parameter_bytes()
    assert info.parameter_bytes < fp32_bytes
    engine = runtime.engine
    ids = engine.encode_prompt(PROMPT, "x")
    (gen,) = engine.generate([EngineItem(ids)], GenParams(max_new_tokens=6))
    assert len(gen.token_ids) == 6
    acts = next(engine.capture([EngineItem(ids)], range(4), parse_position("all"), "mean"))[
        0
    ].activations.numpy()
    assert np.isfinite(acts).all()
    cos = [
        float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        for a, b in zip(acts, fp32_reference, strict=True)
    ]
    # Quantized activations stay close to full precision, but are not identical.
    assert min(cos) > 0.8, cos
    assert not np.allclose(acts, fp32_reference, atol=1e-6)


async def test_nf4_loader_over_grpc_with_steering() -> None:
    loader = start_loader("tiny:llama", "nf4", http=False, metrics=False)
    try:
        vec = np.random.default_rng(0).standard_normal(64).astype(np.float32)
        async with LoaderClient(loader.address, expect_variant="tiny-llama@nf4") as client:
            info = await client.info()
            # bf16 compute, or float32 on a CPU without native bf16 matmuls (the note says so).
            notes = list(info.notes)
            assert info.precision == "nf4"
            assert info.dtype == "bfloat16" or (
                info.dtype == "float32" and any("float32" in n for n in notes)
            ), (info.dtype, notes)
            base, zero, steered = await client.next_token(
                [
                    PromptItem(Chat.of([("user", "hi")])),
                    PromptItem(Chat.of([("user", "hi")]), steering=[Steer([1], 0.0, vector=vec)]),
                    PromptItem(Chat.of([("user", "hi")]), steering=[Steer([1], 6.0, vector=vec)]),
                ],
                top_k=5,
            )
        assert base.top == zero.top
        assert base.top != steered.top
    finally:
        loader.stop()
