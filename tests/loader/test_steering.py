"""Steering acts: it moves logits the right way, 0 is exactly identity, ablation removes the
direction, per-row settings equal separate calls, and hooks never outlive a call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.common import settings
from services.loader.client import Chat, LoaderClient, PromptItem, Steer
from services.loader.tiny import build_tiny
from tests.loader_procs import LoaderProc

CHAT = Chat.of([("user", "Say something about the ocean.")])


@pytest.fixture(scope="module")
def unembedding() -> np.ndarray:
    from transformers import AutoModelForCausalLM

    folder: Path = build_tiny("tiny:llama", settings.get(settings.CommonSettings).cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    return model.get_output_embeddings().weight.detach().numpy().astype(np.float32)


async def test_add_moves_target_logit_both_ways(
    tiny_loader: LoaderProc, unembedding: np.ndarray
) -> None:
    target = 40
    direction = unembedding[target] - unembedding.mean(axis=0)
    direction /= np.linalg.norm(direction)
    async with LoaderClient(tiny_loader.address) as client:
        base, up, down = await client.next_token(
            [
                PromptItem(CHAT),
                PromptItem(CHAT, steering=[Steer([3], 6.0, vector=direction)]),
                PromptItem(CHAT, steering=[Steer([3], -6.0, vector=direction)]),
            ],
            token_ids=[target],
        )
    assert up.requested_logprobs[0] > base.requested_logprobs[0] + 1.0
    assert down.requested_logprobs[0] < base.requested_logprobs[0] - 1.0


async def test_coefficient_zero_is_exactly_identity(tiny_loader: LoaderProc) -> None:
    vec = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    items = [
        PromptItem(CHAT, response="Waves."),
        PromptItem(Chat.of([("user", "Hi")]), response="Yo"),
    ]
    steered = [
        PromptItem(i.prompt, i.response, steering=[Steer([0, 1, 2, 3], 0.0, vector=vec)])
        for i in items
    ]
    ablate0 = [
        PromptItem(
            i.prompt, i.response, steering=[Steer([0, 1, 2, 3], 0.0, vector=vec, mode="ablate")]
        )
        for i in items
    ]
    async with LoaderClient(tiny_loader.address) as client:
        base = await client.capture(items, position="all", reduction="none")
        zero = await client.capture(steered, position="all", reduction="none")
        zero_ab = await client.capture(ablate0, position="all", reduction="none")
        nt_base = await client.next_token(items, top_k=20)
        nt_zero = await client.next_token(steered, top_k=20)
        g_base = await client.generate(items, max_new_tokens=8)
        g_zero = await client.generate(steered, max_new_tokens=8)
    for a, b, c in zip(base.activations, zero.activations, zero_ab.activations, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert [r.top for r in nt_base] == [r.top for r in nt_zero]
    assert [g.token_ids for g in g_base] == [g.token_ids for g in g_zero]


async def test_steering_changes_generation(tiny_loader: LoaderProc) -> None:
    vec = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    async with LoaderClient(tiny_loader.address) as client:
        base, steered = await client.generate(
            [
                PromptItem(CHAT),
                PromptItem(CHAT, steering=[Steer([1], 8.0, vector=vec, positions="response")]),
            ],
            max_new_tokens=10,
        )
        # Response-only steering does not touch the prompt: the first token is unchanged.
        prompt_only = await client.capture(
            [PromptItem(CHAT, steering=[Steer([1], 8.0, vector=vec, positions="response")])],
            position="prompt[:]",
        )
        plain = await client.capture([PromptItem(CHAT)], position="prompt[:]")
    assert base.token_ids != steered.token_ids
    assert np.array_equal(prompt_only.activations[0], plain.activations[0])


async def test_ablation_leaves_no_component(tiny_loader: LoaderProc) -> None:
    rng = np.random.default_rng(3)
    async with LoaderClient(tiny_loader.address) as client:
        plain = await client.capture(
            [PromptItem(CHAT, response="Deep blue.")], position="all", reduction="none"
        )
        # Ablate the direction the model actually uses most at layer 2.
        direction = plain.activations[0][2].mean(axis=0) + 0.1 * rng.standard_normal(64).astype(
            np.float32
        )
        unit = direction / np.linalg.norm(direction)
        ablated = await client.capture(
            [
                PromptItem(
                    CHAT,
                    response="Deep blue.",
                    steering=[Steer([0, 1, 2, 3], 1.0, vector=direction, mode="ablate")],
                )
            ],
            position="all",
            reduction="none",
        )
    before = np.abs(plain.activations[0] @ unit)  # [L, T]
    after = np.abs(ablated.activations[0] @ unit)
    norms = np.linalg.norm(ablated.activations[0], axis=-1)
    assert before.max() > 0.5  # there was a component to remove
    assert (after <= 1e-4 * np.maximum(norms, 1.0)).all()
    # And it changed the stream beyond the projection itself.
    assert not np.allclose(plain.activations[0][3], ablated.activations[0][3], atol=1e-3)


async def test_per_row_settings_equal_separate_calls(tiny_loader: LoaderProc) -> None:
    vec = np.random.default_rng(4).standard_normal(64).astype(np.float32)
    settings_grid = [(layer, coef) for layer in (0, 2, 3) for coef in (-4.0, 0.0, 2.0, 6.0)]
    rows = [
        PromptItem(CHAT, steering=[Steer([layer], coef, vector_ref=0)])
        for layer, coef in settings_grid
    ]
    async with LoaderClient(tiny_loader.address) as client:
        one_pass = await client.next_token(rows, vectors=[vec], top_k=10)
        gen_pass = await client.generate(rows, vectors=[vec], max_new_tokens=6)
        for k, (layer, coef) in enumerate(settings_grid):
            (single,) = await client.next_token(
                [PromptItem(CHAT)], steering=[Steer([layer], coef, vector=vec)], top_k=10
            )
            assert [t for t, _, _ in single.top] == [t for t, _, _ in one_pass[k].top]
            np.testing.assert_allclose(
                [lp for _, _, lp in single.top], [lp for _, _, lp in one_pass[k].top], atol=1e-4
            )
            (g,) = await client.generate(
                [PromptItem(CHAT)], steering=[Steer([layer], coef, vector=vec)], max_new_tokens=6
            )
            assert g.token_ids == gen_pass[k].token_ids


def test_hooks_removed_when_forward_fails() -> None:
    from services.loader.engine import EngineItem
    from services.loader.positions import parse_position
    from services.loader.server import build_runtime
    from services.loader.steering import SteerSpec

    engine = build_runtime("tiny:llama", "fp32", device="cpu").engine
    ids = engine.encode_prompt(engine_chat(), "x")
    baseline = next(engine.capture([EngineItem(ids)], [3], parse_position("all"), "mean"))[
        0
    ].activations
    spec = SteerSpec((0, 1, 2, 3), torch.ones(64), 5.0, "ablate")
    boom = engine.layers[2].mlp.register_forward_hook(
        lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    with pytest.raises(RuntimeError, match="boom"):
        next(engine.capture([EngineItem(ids, steering=[spec])], [3], parse_position("all"), "mean"))
    boom.remove()
    for module in engine.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    after = next(engine.capture([EngineItem(ids)], [3], parse_position("all"), "mean"))[
        0
    ].activations
    assert torch.equal(baseline, after)


def engine_chat():  # type: ignore[no-untyped-def]
    from services.loader.engine import ChatPrompt

    return ChatPrompt((("user", "hooks"),))


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_static_and_dynamic_caches_generate_the_same(temperature: float) -> None:
    from services.loader.engine import ChatPrompt, EngineItem, GenParams
    from services.loader.server import build_runtime
    from services.loader.steering import SteerSpec

    engine = build_runtime("tiny:llama", "fp32", device="cpu").engine
    vec = torch.randn(64, generator=torch.Generator().manual_seed(5))
    items = [
        EngineItem(engine.encode_prompt(ChatPrompt((("user", q),)), "x"), steering=steer)
        for q, steer in [
            ("Hello", []),
            ("A longer question here?", [SteerSpec((1,), vec, 3.0)]),
            ("Mm", []),
        ]
    ]
    params = GenParams(max_new_tokens=12, temperature=temperature, stop=("zz",))
    out = {}
    for mode in ("dynamic", "static"):
        engine.cache_mode = mode
        out[mode] = [(g.token_ids, g.text, g.finish_reason) for g in engine.generate(items, params)]
    assert out["dynamic"] == out["static"]
