"""Score shares a context's prefill across its continuations: the numbers equal unshared ones.

The loader judge sends one context with 102 short continuations per judgment; the HF engine
prefills the context once and expands its KV cache across the continuations
(``services.loader.engines.hf.score``). Checked here against plain transformers running
context + continuation as one sequence per continuation, and against one item per
continuation.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from services.loader.engine import ChatPrompt, ScoreInput
from services.loader.server import build_runtime


@pytest.fixture(scope="module")
def engine() -> Any:
    return build_runtime("tiny:llama", "fp32", device="cpu").engine


def _unshared(engine: Any, context: list[int], conts: list[list[int]]) -> list[float]:
    """log P(cont | context) of each continuation from plain forwards over context + cont
    (one row each, right-padded: padding after a row's end cannot change its numbers)."""
    rows = [context + c for c in conts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    with torch.inference_mode():
        logprobs = torch.log_softmax(engine.model(input_ids=ids).logits.float(), -1)
    start = len(context)
    return [
        math.fsum(float(logprobs[i, start + j - 1, token]) for j, token in enumerate(cont))
        for i, cont in enumerate(conts)
    ]


def test_shared_prefill_equals_unshared(engine: Any) -> None:
    prompt = "Rate the answer from 0 to 100. [ANSWER START] Be kind. [ANSWER END]"
    context = engine.encode_prompt(ChatPrompt((("user", prompt),), False), "items[0]")
    texts = [f"{n}<|im_end|>" for n in range(101)] + ["REFUSAL<|im_end|>"]
    conts = [engine.encode_text(t) for t in texts]
    assert {len(c) for c in conts} >= {2, 3, 4}  # byte tokens: digits, then the end token
    shared = engine.score([ScoreInput(context, conts, [len(t) for t in texts])])[0]
    plain = _unshared(engine, context, conts)
    for n, cont in enumerate(conts):
        assert shared[n].logprob == pytest.approx(plain[n], abs=1e-4), texts[n]
        assert shared[n].num_tokens == len(cont)
    picked = [0, 9, 57, 100, 101]  # one item per continuation: each prefills on its own
    one_each = engine.score([ScoreInput(context, [conts[n]], [1]) for n in picked])
    for n, alone in zip(picked, one_each, strict=True):
        assert shared[n].logprob == pytest.approx(alone[0].logprob, abs=1e-4)
    # Contexts of different lengths in one batch (padding) give the same numbers too.
    other = engine.encode_prompt(ChatPrompt((("user", "Short? 0 to 100"),), False), "items[1]")
    both = engine.score(
        [ScoreInput(other, conts[:5], [1] * 5), ScoreInput(context, conts[:5], [1] * 5)]
    )
    other_plain = _unshared(engine, other, conts[:5])
    for n in range(5):
        assert both[1][n].logprob == pytest.approx(shared[n].logprob, abs=1e-4)
        assert both[0][n].logprob == pytest.approx(other_plain[n], abs=1e-4)


def test_token_tree_equals_expanded_cache_with_steering_and_padding(engine: Any) -> None:
    from services.loader.engines.hf.score import _tree_attention, score_batch
    from services.loader.steering import SteerSpec

    texts = [f"{n}<|im_end|>" for n in range(101)] + ["REFUSAL<|im_end|>"]
    conts = [engine.encode_text(t) for t in texts]
    vector = torch.randn(engine.hidden_size, generator=torch.Generator().manual_seed(0))
    steer = [SteerSpec(layers=(1,), vector=vector, coefficient=4.0, positions="all")]
    items = [
        ScoreInput(
            engine.encode_prompt(ChatPrompt((("user", "Rate 0 to 100: fine."),), False), "a"),
            conts,
            [1] * len(conts),
        ),
        ScoreInput(
            engine.encode_prompt(
                ChatPrompt((("user", "A longer prompt to rate from 0 to 100, padded."),), False),
                "b",
            ),
            conts,
            [1] * len(conts),
            steer,
        ),
    ]
    assert _tree_attention(engine, items)
    for side in ("left", "right"):
        tree = score_batch(engine, items, [0, 1], False, side, tree=True)
        expanded = score_batch(engine, items, [0, 1], False, side, tree=False)
        for (_, t_row), (_, e_row) in zip(tree, expanded, strict=True):
            for t, e in zip(t_row, e_row, strict=True):
                assert t.logprob == pytest.approx(e.logprob, abs=1e-4)
                assert t.is_greedy == e.is_greedy and t.num_tokens == e.num_tokens
    # Steering reached the tree's nodes: the steered item differs from itself unsteered.
    plain = engine.score([ScoreInput(items[1].context_ids, conts, [1] * len(conts))])[0]
    steered = engine.score([items[1]])[0]
    assert max(abs(p.logprob - s.logprob) for p, s in zip(plain, steered, strict=True)) > 1e-3
