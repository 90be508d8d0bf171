"""Hostile input is refused fast and by name: float32-overflowing steering, megabyte prompts,
oversized HTTP bodies, malformed content parts and bytes that are no protobuf message; and
no RPC returns NaN/inf as OK."""

from __future__ import annotations

import time

import grpc
import httpx
import numpy as np
import pytest
import torch

from services.common.errors import FailedPrecondition, InvalidArgument
from services.loader import guards
from services.loader.engine import CaptureResult, GenResult, StepLogprob
from services.loader.pb import loader_pb2 as pb
from services.loader.pb import loader_pb2_grpc as pb_grpc
from services.loader.server import check_capture, check_generations
from services.loader.steering import SteerSpec
from tests.loader_procs import LoaderProc

HIDDEN = 64  # tiny:llama


def _vec(value: float, size: int = HIDDEN) -> pb.Tensor:
    arr = np.full(size, value, dtype=np.float32)
    return pb.Tensor(dtype="float32", shape=[size], data=arr.tobytes())


def _item(text: str = "hello") -> pb.Item:
    return pb.Item(chat=pb.Conversation(messages=[pb.Message(role="user", content=text)]))


def _steer(
    vector: pb.Tensor, coefficient: float, layers: tuple[int, ...] = (1,)
) -> pb.SteeringSpec:
    return pb.SteeringSpec(
        layers=list(layers), vector=vector, coefficient=coefficient, mode=pb.STEERING_MODE_ADD
    )


async def _call(address: str, rpc: str, request: object) -> tuple[grpc.StatusCode, str, object]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.LoaderServiceStub(channel)
        try:
            if rpc == "Capture":
                replies = [r async for r in stub.Capture(request, timeout=60)]
                return grpc.StatusCode.OK, "", replies
            reply = await getattr(stub, rpc)(request, timeout=60)
            return grpc.StatusCode.OK, "", reply
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", None


def _requests(steering: list[pb.SteeringSpec], item: pb.Item) -> dict[str, object]:
    return {
        "Generate": pb.GenerateRequest(
            items=[item],
            steering=steering,
            params=pb.GenerationParams(max_new_tokens=2, logprobs=True),
        ),
        "Capture": pb.CaptureRequest(
            items=[item], all_layers=True, position="prompt[-1]", steering=steering
        ),
        "Score": pb.ScoreRequest(
            items=[pb.ScoreItem(text="a b", continuations=[" c"], steering=steering)]
        ),
        "NextToken": pb.NextTokenRequest(items=[item], steering=steering),
    }


@pytest.mark.parametrize("rpc", ["Generate", "Capture", "Score", "NextToken"])
async def test_overflowing_steering_is_refused_by_name(tiny_loader: LoaderProc, rpc: str) -> None:
    # The case: a vector of 3e38 times coefficient 10 overflows float32.
    request = _requests([_steer(_vec(3e38), 10.0)], _item())[rpc]
    code, details, _ = await _call(tiny_loader.address, rpc, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "steering[0].coefficient: coefficient x vector reaches 3e+39" in details
    # Finite element-wise but a norm that would overflow the normalisation's float32 squares.
    request = _requests([_steer(_vec(1e18), 1.0)], _item())[rpc]
    code, details, _ = await _call(tiny_loader.address, rpc, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "steering[0].coefficient: coefficient x vector has norm 8e+18" in details


async def test_offsets_of_one_item_are_checked_together(tiny_loader: LoaderProc) -> None:
    # Each spec alone is allowed (norm 4e17, at one and at two layers); together they add
    # up to 1.2e18 and are not.
    item = _item()
    item.steering.append(_steer(_vec(5e16), 1.0, (0, 1)))
    request = pb.NextTokenRequest(items=[item], steering=[_steer(_vec(5e16), 1.0)])
    code, details, _ = await _call(tiny_loader.address, "NextToken", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("items[0].steering[0].coefficient: ")
    # A strong but representable steering still runs and returns finite numbers.
    request = pb.NextTokenRequest(items=[_item()], steering=[_steer(_vec(1e6), 1.0)])
    code, details, reply = await _call(tiny_loader.address, "NextToken", request)
    assert code == grpc.StatusCode.OK, details
    assert isinstance(reply, pb.NextTokenResponse)
    assert all(np.isfinite(t.logprob) for t in reply.results[0].top)


@pytest.mark.parametrize("rpc", ["Generate", "Capture", "Score", "NextToken"])
async def test_megabyte_prompt_is_refused_before_tokenizing(
    tiny_loader: LoaderProc, rpc: str
) -> None:
    big = "word " * 400_000  # 2 MB
    requests = _requests([], _item(big))
    requests["Score"] = pb.ScoreRequest(items=[pb.ScoreItem(text="a", continuations=[big])])
    started = time.perf_counter()
    code, details, _ = await _call(tiny_loader.address, rpc, requests[rpc])
    elapsed = time.perf_counter() - started
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("items[0]: over ") and "tokens per item" in details
    assert elapsed < 1.0, f"{rpc}: {elapsed:.2f} s"


async def test_garbage_bytes_are_invalid_argument(tiny_loader: LoaderProc) -> None:
    async with grpc.aio.insecure_channel(tiny_loader.address) as channel:
        for rpc in ("Generate", "Score", "NextToken", "Info"):
            call = channel.unary_unary(f"/qsens.loader.v1.LoaderService/{rpc}")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"\xff\xff\xff\xff", timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc
            assert (info.value.details() or "").startswith(f"request: not a valid {rpc} request")
        stream = channel.unary_stream("/qsens.loader.v1.LoaderService/Capture")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stream(b"\x0a\xff\xff", timeout=10):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_http_refuses_big_bodies_and_bad_parts(tiny_loader: LoaderProc) -> None:
    base = f"http://127.0.0.1:{tiny_loader.http_port}"
    with httpx.Client(base_url=base, timeout=60) as http:
        huge = b'{"messages": [{"role": "user", "content": "' + b"x" * 20_000_000 + b'"}]}'
        started = time.perf_counter()
        reply = http.post("/v1/chat/completions", content=huge)
        declared_s = time.perf_counter() - started
        assert reply.status_code == 413, reply.text
        # The same body streamed without a Content-Length is cut off as it is read.
        started = time.perf_counter()
        chunks = (huge[i : i + 1_000_000] for i in range(0, len(huge), 1_000_000))
        reply = http.post("/v1/chat/completions", content=chunks)
        streamed_s = time.perf_counter() - started
        assert reply.status_code == 413, reply.text
        # 2 MB of prompt fits the body limit but not the token limit: refused untokenized.
        started = time.perf_counter()
        reply = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "word " * 400_000}], "max_tokens": 2},
        )
        prompt_s = time.perf_counter() - started
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "messages"
        bad_part = {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "ok"}]},
                {"role": "user", "content": [{"type": "text", "text": 5}]},
            ]
        }
        reply = http.post("/v1/chat/completions", json=bad_part)
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "messages.1.content.0.text"
        reply = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": [{"type": 7}]}]},
        )
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "messages.0.content.0.type"
    assert declared_s < 2.0 and streamed_s < 2.0 and prompt_s < 2.0, (
        declared_s,
        streamed_s,
        prompt_s,
    )


def _spec(value: float, coefficient: float, mode: str = "add") -> SteerSpec:
    return SteerSpec((0,), torch.full((HIDDEN,), value), coefficient, mode)  # type: ignore[arg-type]


def test_steering_strength_limits() -> None:
    guards.check_steering_strength([("s", _spec(1.0, 1e6))], torch.float32)
    with pytest.raises(InvalidArgument, match=r"^s\.coefficient: coefficient x vector reaches"):
        guards.check_steering_strength([("s", _spec(1e5, 1.0))], torch.float16)
    guards.check_steering_strength([("s", _spec(1e5, 1.0))], torch.bfloat16)
    with pytest.raises(InvalidArgument, match=r"^s\.coefficient: .* for ablation"):
        guards.check_steering_strength([("s", _spec(1.0, 1e13, "ablate"))], torch.float32)


def test_non_finite_outputs_are_named_errors() -> None:
    step = StepLogprob((1, "a", float("nan")), ((1, "a", -0.1),))
    results = [GenResult("a", [1], "length", 3, [step])]
    with pytest.raises(InvalidArgument, match=r"^items\[0\]\.steering: the model's log-probs"):
        check_generations(results, [True])
    with pytest.raises(FailedPrecondition, match=r"^items\[0\]: the model produced non-finite"):
        check_generations(results, [False])
    fine = [GenResult("a", [1], "length", 3, [StepLogprob((1, "a", -0.5), ())])]
    check_generations(fine, [True])
    inf = CaptureResult(1, torch.tensor([[1.0, float("inf")]]), 1, 1, 0)
    ok = CaptureResult(0, torch.tensor([[1.0, 2.0]]), 1, 1, 0)
    with pytest.raises(InvalidArgument, match=r"^items\[1\]\.steering: the model's activations"):
        check_capture([ok, inf], [False, True], "float32")
    big = CaptureResult(0, torch.tensor([[1e6, 2.0]]), 1, 1, 0)
    assert check_capture([big], [False], "float32") == [big]
    with pytest.raises(InvalidArgument, match=r"^dtype: items\[0\]: activations exceed"):
        check_capture([big], [False], "float16")


async def test_watching_steered_generation_changes_nothing(tiny_loader: LoaderProc) -> None:
    # Steered generation records log-probs internally (to catch NaN logits) and drops them.
    replies = []
    for logprobs in (False, True):
        request = pb.GenerateRequest(
            items=[_item(), _item("other")],
            steering=[_steer(_vec(1.0), 4.0)],
            params=pb.GenerationParams(
                max_new_tokens=5, temperature=0.8, seed=3, logprobs=logprobs
            ),
        )
        code, details, reply = await _call(tiny_loader.address, "Generate", request)
        assert code == grpc.StatusCode.OK, details
        assert isinstance(reply, pb.GenerateResponse)
        replies.append(reply)
    plain, watched = replies
    assert [list(g.token_ids) for g in plain.generations] == [
        list(g.token_ids) for g in watched.generations
    ]
    assert all(not g.logprobs for g in plain.generations)
    assert all(len(g.logprobs) == len(g.token_ids) for g in watched.generations)
