"""Bad input gets INVALID_ARGUMENT naming the field, and the server keeps serving."""

from __future__ import annotations

import math
import subprocess
import sys

import grpc
import numpy as np
import pytest

from services.loader.pb import loader_pb2 as pb
from services.loader.pb import loader_pb2_grpc as pb_grpc
from tests.loader_procs import REPO, LoaderProc


def _vec(values: list[float] | np.ndarray) -> pb.Tensor:
    arr = np.asarray(values, dtype=np.float32)
    return pb.Tensor(dtype="float32", shape=list(arr.shape), data=arr.tobytes())


def _item(text: str = "hello", **kw: object) -> pb.Item:
    item = pb.Item(chat=pb.Conversation(messages=[pb.Message(role="user", content=text)]))
    for k, v in kw.items():
        setattr(item, k, v)
    return item


def _steer(layers: list[int], vector: pb.Tensor, coef: float = 1.0) -> pb.SteeringSpec:
    return pb.SteeringSpec(
        layers=layers, vector=vector, coefficient=coef, mode=pb.STEERING_MODE_ADD
    )


GOOD = _vec(np.ones(64))
NAN = _vec([math.nan] + [0.0] * 63)
INF = _vec([math.inf] + [0.0] * 63)

CASES: list[tuple[str, str, object, grpc.StatusCode, str]] = [
    (
        "unknown capture layer",
        "Capture",
        pb.CaptureRequest(items=[_item()], layers=[99], position="all"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "layers[0]: unknown layer 99",
    ),
    (
        "negative layer out of range",
        "Capture",
        pb.CaptureRequest(items=[_item()], layers=[-5], position="all"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "layers[0]: unknown layer -5",
    ),
    (
        "no layers",
        "Capture",
        pb.CaptureRequest(items=[_item()], position="all"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "layers:",
    ),
    (
        "unknown steering layer",
        "NextToken",
        pb.NextTokenRequest(
            items=[
                pb.Item(
                    chat=pb.Conversation(messages=[pb.Message(role="user", content="x")]),
                    steering=[_steer([7], GOOD)],
                )
            ]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "items[0].steering[0].layers[0]: unknown layer 7",
    ),
    (
        "vector of wrong size",
        "Generate",
        pb.GenerateRequest(items=[_item()], steering=[_steer([1], _vec(np.ones(63)))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "steering[0].vector: expected a vector of 64 values",
    ),
    (
        "vector with NaN",
        "Score",
        pb.ScoreRequest(
            items=[pb.ScoreItem(text="a", continuations=["b"])], steering=[_steer([1], NAN)]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "steering[0].vector: vector contains 1 NaN/Inf",
    ),
    (
        "vector with Inf",
        "Capture",
        pb.CaptureRequest(
            items=[_item()], all_layers=True, position="all", steering=[_steer([1], INF)]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NaN/Inf",
    ),
    (
        "bytes do not match shape",
        "Capture",
        pb.CaptureRequest(
            items=[_item()],
            all_layers=True,
            position="all",
            steering=[_steer([1], pb.Tensor(dtype="float32", shape=[64], data=b"\0" * 10))],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "steering[0].vector.data",
    ),
    (
        "unknown dtype",
        "Capture",
        pb.CaptureRequest(
            items=[_item()],
            all_layers=True,
            position="all",
            steering=[_steer([1], pb.Tensor(dtype="float8", shape=[64], data=b"\0" * 64))],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "steering[0].vector.dtype",
    ),
    (
        "vector_ref out of range",
        "NextToken",
        pb.NextTokenRequest(
            items=[
                pb.Item(
                    chat=pb.Conversation(messages=[pb.Message(role="user", content="x")]),
                    steering=[
                        pb.SteeringSpec(
                            layers=[1], vector_ref=3, coefficient=1, mode=pb.STEERING_MODE_ADD
                        )
                    ],
                )
            ]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "items[0].steering[0].vector_ref",
    ),
    (
        "mode missing",
        "NextToken",
        pb.NextTokenRequest(
            items=[_item()], steering=[pb.SteeringSpec(layers=[1], vector=GOOD, coefficient=1)]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "steering[0].mode",
    ),
    (
        "empty batch",
        "Generate",
        pb.GenerateRequest(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "items: the batch is empty",
    ),
    (
        "over-limit batch",
        "NextToken",
        pb.NextTokenRequest(items=[_item()] * 17),
        grpc.StatusCode.INVALID_ARGUMENT,
        "items: 17 items exceed the limit of 16",
    ),
    (
        "too many tokens",
        "Capture",
        pb.CaptureRequest(items=[_item("x" * 400)], all_layers=True, position="all"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "items[0]: ",
    ),
    (
        "too many new tokens",
        "Generate",
        pb.GenerateRequest(items=[_item()], params=pb.GenerationParams(max_new_tokens=100000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "params.max_new_tokens",
    ),
    (
        "bad position syntax",
        "Capture",
        pb.CaptureRequest(items=[_item()], all_layers=True, position="prompt[2]"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "position: bad position 'prompt[2]'",
    ),
    (
        "response position without response",
        "Capture",
        pb.CaptureRequest(items=[_item()], all_layers=True, position="response[:]"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "items[0].response",
    ),
    (
        "missing prompt",
        "NextToken",
        pb.NextTokenRequest(items=[pb.Item()]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "items[0].prompt",
    ),
    (
        "unknown role",
        "Generate",
        pb.GenerateRequest(
            items=[pb.Item(chat=pb.Conversation(messages=[pb.Message(role="robot", content="x")]))]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "items[0].chat.messages[0].role",
    ),
    (
        "multi-token string",
        "NextToken",
        pb.NextTokenRequest(items=[_item()], token_strings=["AB"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "token_strings[0]",
    ),
    (
        "token id outside vocab",
        "NextToken",
        pb.NextTokenRequest(items=[_item()], token_ids=[100000]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "token_ids[0]",
    ),
    (
        "bad output dtype",
        "Capture",
        pb.CaptureRequest(items=[_item()], all_layers=True, position="all", dtype="int8"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "dtype",
    ),
    (
        "empty continuation",
        "Score",
        pb.ScoreRequest(items=[pb.ScoreItem(text="a", continuations=[""])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "items[0].continuations[0]",
    ),
    (
        "unknown precision in expect_variant",
        "NextToken",
        pb.NextTokenRequest(
            items=[_item()], options=pb.RunOptions(expect_variant="tiny-llama@int3")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "options.expect_variant: unknown precision 'int3'",
    ),
    (
        "wrong variant",
        "NextToken",
        pb.NextTokenRequest(
            items=[_item()], options=pb.RunOptions(expect_variant="tiny-llama@nf4")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "serves tiny-llama@fp32",
    ),
]


@pytest.fixture(scope="module")
def limited_loader() -> LoaderProc:
    from tests.loader_procs import start_loader

    proc = start_loader(
        "tiny:llama",
        "fp32",
        env={
            "QSENS_LOADER_MAX_BATCH_ITEMS": "16",
            "QSENS_LOADER_MAX_TOKENS_PER_ITEM": "256",
            "QSENS_LOADER_MAX_NEW_TOKENS": "128",
        },
        http=False,
        metrics=False,
    )
    yield proc  # type: ignore[misc]
    proc.stop()


@pytest.mark.parametrize(
    ("label", "rpc", "request_", "code", "message"), CASES, ids=[c[0] for c in CASES]
)
async def test_bad_input(
    limited_loader: LoaderProc,
    label: str,
    rpc: str,
    request_: object,
    code: grpc.StatusCode,
    message: str,
) -> None:
    async with grpc.aio.insecure_channel(limited_loader.address) as channel:
        stub = pb_grpc.LoaderServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            call = getattr(stub, rpc)(request_, timeout=60)
            if rpc == "Capture":
                async for _ in call:
                    pass
            else:
                await call
        assert info.value.code() == code, info.value.details()
        assert message in (info.value.details() or ""), info.value.details()
        # The server keeps serving.
        reply = await stub.Info(pb.InfoRequest(), timeout=30)
        assert reply.variant == "tiny-llama@fp32"
    assert limited_loader.alive()


async def test_capture_error_comes_before_any_data(limited_loader: LoaderProc) -> None:
    """A bad item late in a big capture fails the call before a single chunk is streamed."""
    items = [_item(response="ok") for _ in range(10)] + [_item()]
    request = pb.CaptureRequest(items=items, all_layers=True, position="response[:]", chunk_items=1)
    received = 0
    async with grpc.aio.insecure_channel(limited_loader.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in pb_grpc.LoaderServiceStub(channel).Capture(request, timeout=60):
                received += 1
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[10].response" in (info.value.details() or "")
    assert received == 0


def test_unknown_precision_at_startup() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "serve",
            "loader",
            "--model",
            "tiny:llama",
            "--precision",
            "int3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "precision: unknown precision 'int3'" in result.stderr


def test_unknown_model_source_at_startup() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "serve",
            "loader",
            "--model",
            "no-such-model",
            "--precision",
            "fp32",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "model: unknown model source 'no-such-model'" in result.stderr
