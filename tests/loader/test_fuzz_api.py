"""Seeded fuzzing of a real loader's gRPC and HTTP APIs: thousands of mutated requests (random
fields, overflowing numbers, wrong tensors, megabyte prompts, corrupt protobuf bytes, broken
JSON) must never crash or hang the loader, never get UNKNOWN/INTERNAL or HTTP 5xx, and never
get OK with a NaN or infinite number in the reply.

``QSENS_FUZZ_SEED`` replays another seed; a failure names the case index to replay.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.common.tensor_codec import decode_numpy
from services.loader.pb import loader_pb2 as pb
from services.loader.pb import loader_pb2_grpc as pb_grpc
from tests.loader_procs import LoaderProc

SEED = int(os.environ.get("QSENS_FUZZ_SEED", "15"))
GRPC_CASES = 2000
HTTP_CASES = 800
IN_FLIGHT = 4  # below the loader's max_pending: a refusal as busy would hide real answers
CALL_TIMEOUT_S = 30.0  # a call still running after this counts as a hang
HIDDEN = 64  # tiny:llama
SERVICE = "/qsens.loader.v1.LoaderService"

GRPC_OK = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
HTTP_OK = {200, 400, 404, 405, 413, 422, 429}

FLOATS = [0.0, 1.0, -1.0, 0.5, 2.0, 1e-30, 1e6, 1e18, 3e38, 1e300, -1e300, math.nan, math.inf]
INTS = [0, 1, -1, 2, 3, 7, 63, 64, 1000, 2**31 - 1, -(2**31)]
POSITIONS = ["prompt[-1]", "response[:]", "all", "prompt[0:2]", "prompt[:]", "", "x[", "all[5:1]"]
ROLES = ["user", "system", "assistant", "robot", ""]


def _text(rng: random.Random) -> str:
    choice = rng.random()
    if choice < 0.01:
        return "word " * 400_000  # 2 MB: refused before tokenizing
    if choice < 0.05:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 300)))
    return rng.choice(["", "hello", "a b c", "<|im_start|>", "\x00", "🙂" * 5, "x" * 600])


def _tensor(rng: random.Random) -> pb.Tensor:
    dtype = rng.choice(["float32"] * 6 + ["float16", "bfloat16", "int8", "", "float64"])
    shape = rng.choice([[HIDDEN]] * 6 + [[HIDDEN + 1], [], [-1], [8, 8], [2**40]])
    width = {"float16": 2, "bfloat16": 2, "int8": 1, "float64": 8}.get(dtype, 4)
    count = max(1, math.prod(shape)) if all(0 < s < 4096 for s in shape) else HIDDEN
    if rng.random() < 0.15:
        data = rng.randbytes(rng.randrange(0, count * width + 9))
    else:
        value = rng.choice(FLOATS)
        with np.errstate(over="ignore"):  # 1e300 becomes inf in float32: one more case
            values = np.full(count, value, dtype=np.float64).astype(np.float32)
        data = values.tobytes() if width == 4 else b"\0" * count * width
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def _steering(rng: random.Random, vectors: int) -> list[pb.SteeringSpec]:
    specs = []
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        spec = pb.SteeringSpec(
            layers=[rng.choice([0, 1, -1, 5, -9]) for _ in range(rng.randrange(0, 3))],
            coefficient=rng.choice([*FLOATS, 4.0, 8.0, -8.0]),
            mode=rng.choice([0, 1, 1, 2, 7]),
            positions=rng.choice([0, 1, 2, 3, 9]),
        )
        which = rng.random()
        if which < 0.6:
            spec.vector.CopyFrom(_tensor(rng))
        elif which < 0.9:
            spec.vector_ref = rng.choice([0, 1, vectors, -1])
        specs.append(spec)
    return specs


def _item(rng: random.Random, vectors: int) -> pb.Item:
    item = pb.Item()
    kind = rng.random()
    if kind < 0.6:
        messages = [
            pb.Message(role=rng.choice(ROLES), content=_text(rng))
            for _ in range(rng.randrange(0, 3))
        ]
        item.chat.CopyFrom(
            pb.Conversation(messages=messages, continue_final_message=rng.random() < 0.1)
        )
    elif kind < 0.95:
        item.text = _text(rng)
    if rng.random() < 0.3:
        item.response = _text(rng)
    if rng.random() < 0.3:
        item.seed = rng.randrange(0, 2**64)
    item.steering.extend(_steering(rng, vectors))
    return item


def _options(rng: random.Random) -> pb.RunOptions:
    return pb.RunOptions(
        padding_side=rng.choice([0, 1, 2, 5]),
        max_batch_size=rng.choice([0, 0, 1, 2, -1]),
        expect_variant=rng.choice(["", "", "tiny-llama@fp32", "x@y", "tiny-llama@int4", "@"]),
    )


def _request(rng: random.Random) -> tuple[str, Message]:
    rpc = rng.choice(["Generate", "Capture", "Score", "NextToken", "Info"])
    vectors = [_tensor(rng) for _ in range(rng.choice([0, 0, 1, 2]))]
    items = [_item(rng, len(vectors)) for _ in range(rng.choice([0, 1, 1, 2, 3]))]
    common: dict[str, Any] = {
        "steering": _steering(rng, len(vectors)),
        "vectors": vectors,
        "options": _options(rng),
    }
    if rpc == "Generate":
        params = pb.GenerationParams(
            max_new_tokens=rng.choice([0, 1, 2, 3, -1, 100000]),
            temperature=rng.choice(FLOATS),
            top_p=rng.choice(FLOATS),
            top_k=rng.choice(INTS),
            seed=rng.randrange(0, 2**64),
            stop=[rng.choice(["", "a", "\n"]) for _ in range(rng.randrange(0, 2))],
            logprobs=rng.random() < 0.6,
            top_logprobs=rng.choice([0, 1, 5, 20, 21, -1]),
        )
        return rpc, pb.GenerateRequest(items=items, params=params, **common)
    if rpc == "Capture":
        return rpc, pb.CaptureRequest(
            items=items,
            layers=[rng.choice([0, 1, -1, 2, 99]) for _ in range(rng.randrange(0, 3))],
            all_layers=rng.random() < 0.5,
            position=rng.choice(POSITIONS),
            reduction=rng.choice([0, 1, 2, 3, 8]),
            dtype=rng.choice(["", "float32", "float16", "bfloat16", "int8"]),
            chunk_items=rng.choice([0, 0, 1, -1]),
            **common,
        )
    if rpc == "Score":
        score_items = [
            pb.ScoreItem(
                text=_text(rng),
                continuations=[_text(rng) for _ in range(rng.randrange(0, 3))],
                steering=_steering(rng, len(vectors)),
            )
            for _ in range(rng.choice([0, 1, 2]))
        ]
        return rpc, pb.ScoreRequest(items=score_items, token_logprobs=rng.random() < 0.5, **common)
    if rpc == "NextToken":
        return rpc, pb.NextTokenRequest(
            items=items,
            top_k=rng.choice([0, 1, 5, 1000, 1001, -1]),
            token_ids=[rng.choice([0, 5, 255, 100000, -1]) for _ in range(rng.randrange(0, 3))],
            token_strings=[rng.choice(["a", "AB", "", "🙂"]) for _ in range(rng.randrange(0, 2))],
            **common,
        )
    return rpc, pb.InfoRequest()


def _corrupt(rng: random.Random, request: Message) -> bytes:
    data = bytearray(request.SerializeToString())
    if not data or rng.random() < 0.3:
        return rng.randbytes(rng.randrange(1, 200))
    for _ in range(rng.randrange(1, 6)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data[: rng.randrange(1, len(data) + 1)])


def _non_finite(message: Message, path: str = "") -> str | None:
    """The path of a NaN/inf number in ``message`` (tensors decoded), or None."""
    if isinstance(message, pb.Tensor):
        if message.dtype.startswith(("float", "bfloat")):
            values = decode_numpy(message.dtype, list(message.shape), message.data)
            if not bool(np.isfinite(np.asarray(values, dtype=np.float32)).all()):
                return path
        return None
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        for k, v in enumerate(values):
            where = f"{path}.{field.name}[{k}]"
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                found = _non_finite(v, where)
                if found:
                    return found
            elif isinstance(v, float) and not math.isfinite(v):
                return where
    return None


async def _grpc_case(channel: grpc.aio.Channel, rng: random.Random) -> tuple[str | None, str]:
    """Run one case: what went wrong (or None), and the status it got."""
    rpc, request = _request(rng)
    raw = rng.random() < 0.1
    body = _corrupt(rng, request) if raw else request.SerializeToString()
    parse = {
        "Generate": pb.GenerateResponse,
        "Capture": pb.CaptureResponse,
        "Score": pb.ScoreResponse,
        "NextToken": pb.NextTokenResponse,
        "Info": pb.InfoResponse,
    }[rpc].FromString
    replies: list[Message] = []
    try:
        if rpc == "Capture":
            stream = channel.unary_stream(f"{SERVICE}/{rpc}", response_deserializer=parse)
            replies = [r async for r in stream(body, timeout=CALL_TIMEOUT_S)]
        else:
            call = channel.unary_unary(f"{SERVICE}/{rpc}", response_deserializer=parse)
            replies = [await call(body, timeout=CALL_TIMEOUT_S)]
        code, details = grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
    if code not in GRPC_OK:
        return f"{rpc}{' (corrupt bytes)' if raw else ''} -> {code.name}: {details[:300]}", ""
    for reply in replies:
        bad = _non_finite(reply)
        if bad:
            return f"{rpc} -> OK with a non-finite number at {bad}", code.name
    return None, code.name


def _json_value(rng: random.Random) -> Any:
    return rng.choice([None, 5, -1, 1e308, "x", [], {}, True, [{"type": "text", "text": 5}]])


def _message(rng: random.Random) -> Any:
    if rng.random() < 0.05:
        return _json_value(rng)
    content: Any = _text(rng) if rng.random() < 0.6 else None
    if content is None:
        content = [
            rng.choice(
                [
                    {"type": "text", "text": _text(rng)},
                    {"type": "text", "text": _json_value(rng)},
                    {"type": _json_value(rng)},
                    {"type": "image_url", "image_url": {"url": "x"}},
                    _json_value(rng),
                ]
            )
            for _ in range(rng.randrange(0, 3))
        ]
        if rng.random() < 0.1:
            content = _json_value(rng)
    return {"role": rng.choice([*ROLES, "developer", "tool"]), "content": content}


def _http_body(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.05:
        return rng.randbytes(rng.randrange(0, 300))
    if kind < 0.08:
        return b"[" * 100_000 + b"]" * 100_000  # nesting deeper than the JSON parser's stack
    if kind < 0.1:
        return json.dumps(_json_value(rng)).encode()
    body: dict[str, Any] = {"messages": [_message(rng) for _ in range(rng.choice([0, 1, 1, 2]))]}
    for key, values in {
        "max_tokens": [1, 2, 3, 0, -1, 10**9, "3"],
        "temperature": [0, 0.7, 1.5, 3, -1, math.nan, math.inf, "hot"],
        "top_p": [1, 0.5, 0, 2, math.nan],
        "n": [1, 2, 3, 0, 65, 10**6],
        "seed": [0, 1, -1, 2**70, 1.5],
        "stop": [None, "a", ["\n", "b"], [5], [""], 7],
        "logprobs": [True, False, "yes", None],
        "top_logprobs": [0, 1, 5, 20, 21, -1],
        "stream": [False, False, True],
        "model": ["m", 5, None],
    }.items():
        if rng.random() < 0.5:
            body[key] = rng.choice(values)
    # Short generations keep the run bounded (the default of 256 tokens is no hang, but slow).
    if body.get("max_tokens") is None:
        body["max_tokens"] = rng.choice([1, 2, 3])
    if isinstance(body.get("n"), int) and body["n"] > 3:
        body["max_tokens"] = 1  # many samples of one token each: cheap on any outcome
    return json.dumps(body).encode()


async def _http_case(http: httpx.AsyncClient, rng: random.Random) -> tuple[str | None, str]:
    body = _http_body(rng)
    method, path = rng.choice(
        [("POST", "/v1/chat/completions")] * 18 + [("GET", "/v1/models"), ("POST", "/v1/x")]
    )
    try:
        reply = await http.request(method, path, content=body, timeout=CALL_TIMEOUT_S)
    except httpx.TimeoutException:
        return f"{method} {path} hung ({len(body)} bytes)", ""
    status = str(reply.status_code)
    if reply.status_code not in HTTP_OK:
        return f"{method} {path} -> HTTP {status}: {reply.text[:300]}", status
    if reply.status_code == 200 and path.endswith("completions"):

        def check(value: Any) -> None:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("non-finite")

        try:
            json.loads(reply.text, parse_constant=lambda name: check(float(name)))
        except ValueError:
            return "HTTP 200 with a non-finite number", status
    return None, status


async def _run(
    count: int,
    case: Callable[[random.Random], Awaitable[tuple[str | None, str]]],
    label: str,
    outcomes: Counter[str],
) -> list[str]:
    failures: list[str] = []
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(index: int) -> None:
        async with gate:
            problem, outcome = await case(random.Random(f"{SEED}:{label}:{index}"))
        outcomes[f"{label} {outcome}"] += 1
        if problem:
            failures.append(f"{label} case {index} (seed {SEED}): {problem}")

    await asyncio.gather(*(one(i) for i in range(count)))
    return failures


async def test_fuzzed_requests_never_crash_hang_or_lie(tiny_loader: LoaderProc) -> None:
    started = time.monotonic()
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(tiny_loader.address, options=options) as channel:
        outcomes: Counter[str] = Counter()
        failures = await _run(GRPC_CASES, lambda rng: _grpc_case(channel, rng), "grpc", outcomes)
        grpc_s = time.monotonic() - started
        base = f"http://127.0.0.1:{tiny_loader.http_port}"
        async with httpx.AsyncClient(base_url=base) as http:
            failures += await _run(HTTP_CASES, lambda rng: _http_case(http, rng), "http", outcomes)
        # Still alive and serving after all of it.
        info = await pb_grpc.LoaderServiceStub(channel).Info(pb.InfoRequest(), timeout=10)
    elapsed = time.monotonic() - started
    assert tiny_loader.alive(), tiny_loader.log_tail()
    assert info.variant == tiny_loader.variant
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])
    print(f"fuzz: {GRPC_CASES} gRPC in {grpc_s:.1f} s, {HTTP_CASES} HTTP; total {elapsed:.1f} s")
    print("fuzz outcomes:", dict(sorted(outcomes.items())))
    # Enough cases get through validation that the outputs' checks are exercised too.
    assert outcomes["grpc OK"] >= GRPC_CASES // 20, outcomes
    assert outcomes["http 200"] >= HTTP_CASES // 40, outcomes
    assert elapsed < 90, f"the fuzz run took {elapsed:.0f} s"


def test_fuzz_inputs_are_seeded() -> None:
    first = [_request(random.Random(f"{SEED}:grpc:{i}"))[1].SerializeToString() for i in range(20)]
    again = [_request(random.Random(f"{SEED}:grpc:{i}"))[1].SerializeToString() for i in range(20)]
    assert first == again
    assert len(set(first)) > 15
    assert _http_body(random.Random(3)) == _http_body(random.Random(3))
    assert (
        _non_finite(
            pb.ScoreResponse(
                results=[pb.ScoreResult(continuations=[pb.ContinuationScore(logprob=math.nan)])]
            )
        )
        is not None
    )
    assert (
        _non_finite(
            pb.ScoreResponse(
                results=[pb.ScoreResult(continuations=[pb.ContinuationScore(logprob=-1.0)])]
            )
        )
        is None
    )


pytestmark = pytest.mark.timeout(240)
