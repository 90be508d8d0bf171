"""Every RPC of a real loader process on a tiny random model, over gRPC on loopback."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import FailedPrecondition
from services.loader.client import Chat, LoaderClient, PromptItem, ScoreItem, Steer
from tests.loader_procs import LoaderProc

CHAT = Chat.of([("system", "You are terse."), ("user", "Name a colour and a number, please.")])
SHORT = Chat.of([("user", "Hi")])
LONG = Chat.of([("user", "Tell me a long story about a lighthouse keeper and the sea at night.")])


async def test_health_and_info(tiny_loader: LoaderProc) -> None:
    channel = grpc.aio.insecure_channel(tiny_loader.address)
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="")
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await channel.close()
    async with LoaderClient(tiny_loader.address) as client:
        info = await client.info()
    assert info.variant == "tiny-llama@fp32"
    assert (info.num_layers, info.hidden_size) == (4, 64)
    assert info.backend == "hf" and info.precision == "fp32" and info.dtype == "float32"
    assert info.supports_chat_template and info.supports_system_role
    assert info.parameter_bytes > 0 and info.vocab_size == 259
    assert info.quantization_config == {}


async def test_info_checks_the_pinned_variant(tiny_loader: LoaderProc) -> None:
    """A client pinned to another variant fails on Info too (the server checks the rest)."""
    async with LoaderClient(tiny_loader.address, expect_variant="tiny-llama@nf4") as client:
        with pytest.raises(
            FailedPrecondition, match="serves tiny-llama@fp32, expected tiny-llama@nf4"
        ):
            await client.info()
    async with LoaderClient(tiny_loader.address, expect_variant="tiny-llama@fp32") as client:
        assert (await client.info()).variant == "tiny-llama@fp32"


async def test_generate_greedy_is_deterministic_and_batch_independent(
    tiny_loader: LoaderProc,
) -> None:
    async with LoaderClient(tiny_loader.address) as client:
        batch = await client.generate(
            [PromptItem(CHAT), PromptItem(SHORT), PromptItem(LONG)], max_new_tokens=12
        )
        alone = await client.generate([PromptItem(SHORT)], max_new_tokens=12)
    assert [len(g.token_ids) for g in batch] == [12, 12, 12]
    assert all(g.finish_reason == "length" for g in batch)
    assert batch[1].token_ids == alone[0].token_ids
    assert batch[0].prompt_tokens > batch[1].prompt_tokens


async def test_sampling_uses_row_seeds(tiny_loader: LoaderProc) -> None:
    async with LoaderClient(tiny_loader.address) as client:
        items = [PromptItem(CHAT, seed=7), PromptItem(SHORT, seed=11), PromptItem(CHAT, seed=8)]
        batch = await client.generate(items, max_new_tokens=16, temperature=1.0)
        alone = await client.generate(
            [PromptItem(SHORT, seed=11)], max_new_tokens=16, temperature=1.0
        )
        again = await client.generate(items, max_new_tokens=16, temperature=1.0)
    assert batch[1].token_ids == alone[0].token_ids  # independent of the rest of the batch
    assert [g.token_ids for g in batch] == [g.token_ids for g in again]  # reproducible
    assert batch[0].token_ids != batch[2].token_ids  # different seeds differ


async def test_generate_logprobs(tiny_loader: LoaderProc) -> None:
    async with LoaderClient(tiny_loader.address) as client:
        (g,) = await client.generate(
            [PromptItem(CHAT)], max_new_tokens=4, logprobs=True, top_logprobs=3
        )
    assert len(g.logprobs) == 4
    for step, token in zip(g.logprobs, g.token_ids, strict=True):
        assert step["token_id"] == token
        assert len(step["top"]) == 3
        # Greedy: the chosen token is the most likely one.
        assert step["top"][0][0] == token
        assert step["logprob"] == pytest.approx(step["top"][0][2])


async def test_capture_shapes_and_streaming(tiny_loader: LoaderProc) -> None:
    items = [PromptItem(CHAT, response="Blue and seven.") for _ in range(5)]
    async with LoaderClient(tiny_loader.address) as client:
        all_layers = await client.capture(items, position="response[:]", chunk_items=2)
        picked = await client.capture(
            items, position="prompt[-1]", layers=[-1, 1], reduction="last"
        )
        tokens = await client.capture(
            items[:2], position="response[:3]", layers=[2], reduction="none"
        )
    assert all_layers.layers == [0, 1, 2, 3]
    assert all_layers.stacked().shape == (5, 4, 64)
    assert picked.layers == [1, 3] and picked.stacked().shape == (5, 2, 64)
    assert tokens.activations[0].shape == (1, 3, 64) and tokens.num_positions == [3, 3]
    assert all_layers.response_tokens[0] == len("Blue and seven.")  # byte-level tokenizer
    # The same item gives the same activations wherever it sits in the stream.
    assert np.allclose(all_layers.activations[0], all_layers.activations[4], atol=1e-5)


async def test_score_and_next_token(tiny_loader: LoaderProc) -> None:
    async with LoaderClient(tiny_loader.address) as client:
        scores = await client.score(
            [ScoreItem("The sky is", [" blue", " green today"]), ScoreItem(SHORT, ["Hello"])],
            token_logprobs=True,
        )
        nxt = await client.next_token(
            [PromptItem(CHAT), PromptItem(SHORT)], top_k=5, token_ids=[65, 66]
        )
    assert [len(s) for s in scores] == [2, 1]
    first = scores[0][0]
    assert first.num_tokens == 5 and first.num_chars == 5 and len(first.token_logprobs) == 5
    assert first.logprob == pytest.approx(sum(first.token_logprobs))
    assert all(s.logprob < 0 for row in scores for s in row)
    assert len(nxt) == 2 and len(nxt[0].top) == 5
    top_lps = [lp for _, _, lp in nxt[0].top]
    assert top_lps == sorted(top_lps, reverse=True)
    assert nxt[0].requested_ids == [65, 66]
    probs = np.exp(nxt[0].requested_logprobs)
    assert np.all((probs > 0) & (probs < 1))
    # Log-probs and raw logits differ by the same log-normaliser for every token.
    diff = np.array(nxt[0].requested_logits) - np.array(nxt[0].requested_logprobs)
    assert diff[0] == pytest.approx(diff[1], abs=1e-4)
    assert nxt[0].stats["entropy"] > 0 and 0 <= nxt[0].stats["gini"] <= 1


async def test_next_token_strings(tiny_loader: LoaderProc) -> None:
    async with LoaderClient(tiny_loader.address) as client:
        (r,) = await client.next_token([PromptItem(CHAT)], token_strings=["A", "B"])
    # The byte-level tokenizer lists printable ASCII first, starting at "!" (33).
    assert r.requested_ids == [ord("A") - 33, ord("B") - 33]


def test_metrics_endpoint(tiny_loader: LoaderProc) -> None:
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{tiny_loader.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    for name in (
        "qsens_loader_requests_total",
        "qsens_loader_request_seconds_bucket",
        "qsens_loader_batch_items_bucket",
        "qsens_loader_tokens_total",
        "qsens_loader_tokens_per_second",
        "qsens_loader_memory_bytes",
        "qsens_loader_errors_total",
        "qsens_loader_inflight_requests",
    ):
        assert name in body, name
    assert 'qsens_loader_requests_total{code="OK",rpc="Info"}' in body


async def test_row_steering_vectors_by_reference(tiny_loader: LoaderProc) -> None:
    rng = np.random.default_rng(0)
    vec = rng.standard_normal(64).astype(np.float32)
    async with LoaderClient(tiny_loader.address) as client:
        by_ref = await client.next_token(
            [PromptItem(CHAT, steering=[Steer([1], 3.0, vector_ref=0)])], vectors=[vec], top_k=5
        )
        inline = await client.next_token(
            [PromptItem(CHAT, steering=[Steer([1], 3.0, vector=vec)])], top_k=5
        )
    assert by_ref[0].top == inline[0].top
