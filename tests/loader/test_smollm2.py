"""The real SmolLM2-135M-Instruct answers a chat prompt coherently, at bf16 and NF4."""

from __future__ import annotations

import openai

from services.loader.client import Chat, LoaderClient, PromptItem
from services.loader.engine import ChatPrompt, EngineItem, GenParams
from services.loader.server import build_runtime
from tests.loader_procs import LoaderProc

QUESTION = [("user", "What is the capital of France?")]


async def test_smollm2_bf16_answers(smollm2_bf16: LoaderProc) -> None:
    async with LoaderClient(smollm2_bf16.address) as client:
        info = await client.info()
        (answer,) = await client.generate([PromptItem(Chat.of(QUESTION))], max_new_tokens=24)
    assert info.variant == "smollm2-135m@bf16"
    assert (info.num_layers, info.hidden_size) == (30, 576)
    assert info.supports_system_role
    assert any("dequantized" in note for note in info.notes)
    assert "Paris" in answer.text
    assert answer.finish_reason in ("stop", "length")


def test_smollm2_openai_endpoint(smollm2_bf16: LoaderProc) -> None:
    client = openai.OpenAI(base_url=smollm2_bf16.http_base, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="smollm2-135m@bf16",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20,
        temperature=0,
    )
    assert "Paris" in (reply.choices[0].message.content or "")


def test_smollm2_nf4_answers() -> None:
    engine = build_runtime("smollm2-135m", "nf4", device="cpu").engine
    ids = engine.encode_prompt(ChatPrompt(tuple(QUESTION)), "x")
    (answer,) = engine.generate([EngineItem(ids)], GenParams(max_new_tokens=24))
    assert "Paris" in answer.text
