"""The KV cache goes to transformers as ``cache`` (``past_key_values`` warns now and is gone in
5.40): scoring and generation run without the deprecation and score what a plain forward does."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from services.common import settings as settings_mod
from services.loader.cache_arg import cache_kwargs


def test_installed_architectures_take_cache_and_older_forwards_keep_their_name() -> None:
    from transformers import (
        Gemma2Model,
        LlamaForCausalLM,
        LlamaModel,
        MistralModel,
        Olmo2Model,
        Qwen2Model,
    )

    marker = object()
    for cls in (LlamaModel, LlamaForCausalLM, Gemma2Model, MistralModel, Qwen2Model, Olmo2Model):
        assert cache_kwargs(cls.__new__(cls), marker) == {"cache": marker}, cls.__name__

    class Older(nn.Module):
        def forward(self, input_ids: Any = None, past_key_values: Any = None) -> Any:
            return past_key_values

    assert cache_kwargs(Older(), marker) == {"past_key_values": marker}


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A tiny fp32 engine on transformers' own generation with a dynamic cache."""
    from services.loader.server import build_runtime

    monkeypatch.setenv("QSENS_LOADER_GENERATION_CACHE", "dynamic")
    settings_mod.reset()
    try:
        yield build_runtime("tiny:llama?layers=3", "fp32", device="cpu").engine
    finally:
        monkeypatch.delenv("QSENS_LOADER_GENERATION_CACHE")
        settings_mod.reset()


def _deprecations(
    caught: list[warnings.WarningMessage], caplog: pytest.LogCaptureFixture
) -> list[str]:
    texts = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    return [t for t in texts if "past_key_values" in t or "cache_params" in t]


def test_score_and_generate_pass_the_cache_by_its_new_name(
    engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from services.loader.engine import ChatPrompt, EngineItem, GenParams, ScoreInput

    context = engine.encode_prompt(ChatPrompt((("user", "Name a colour."),)), "x")
    conts = [engine.encode_text(t) for t in (" Blue, like the sea.", " Red", " I cannot say")]
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [scores] = engine.score(
            [ScoreInput(context, conts, [len(c) for c in conts])], token_logprobs=True
        )
        [gen] = engine.generate([EngineItem(context, [])], GenParams(max_new_tokens=6))
    assert not _deprecations(caught, caplog)
    assert gen.token_ids and len(gen.token_ids) <= 6
    # Each continuation's log-likelihood equals a full forward's, without any cache.
    with torch.no_grad():
        for cont, score in zip(conts, scores, strict=True):
            ids = torch.tensor([context + cont])
            logp = torch.log_softmax(engine.model(input_ids=ids).logits[0].double(), -1)
            want = sum(float(logp[len(context) - 1 + j, tok]) for j, tok in enumerate(cont))
            assert math.isclose(score.logprob, want, rel_tol=1e-4, abs_tol=1e-4)
            assert score.num_tokens == len(cont)
