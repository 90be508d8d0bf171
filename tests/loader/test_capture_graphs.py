"""The bucketed static-shape capture path (what a CUDA graph records and replays on a GPU)
gives the eager path's numbers. On this CPU it runs without a graph; bench/gpu_check.py checks
the recorded graphs against the eager path on a GPU."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import torch

from services.common.settings import LoaderSettings
from services.loader.capture_graphs import bucket
from services.loader.client import LoaderClient
from services.loader.engine import ChatPrompt, Engine, EngineItem
from services.loader.positions import parse_position
from services.loader.server import build_runtime
from services.loader.steering import SteerSpec
from tests.loader.test_capture_batching import ITEMS
from tests.loader_procs import LoaderProc, start_loader

CHATS = [
    ("Hi", "Hello, friend."),
    ("What now?", "Tea."),
    ("Tell a long tale about a fox and a crow", "Once, a fox met a crow who had cheese"),
    ("Why?", "Because the sky scatters blue light more than red light."),
    ("Name a colour", "Green"),
]


def test_bucket_ladder_wastes_at_most_a_sixteenth() -> None:
    assert [bucket(n) for n in (1, 8, 9, 64, 65, 80, 130, 300, 1000)] == [
        4, 8, 12, 64, 68, 80, 136, 304, 1024,
    ]  # fmt: skip
    previous = 0
    for n in range(1, 5000):
        b = bucket(n)
        assert n <= b and (b - n) <= max(3, n // 16), n
        assert b >= previous  # monotone: a longer batch never gets a smaller bucket
        previous = b


def _engine(graphs: int, attn: str = "sdpa") -> Engine:
    settings = LoaderSettings(capture_graphs=graphs, capture_fuse_bytes=1 << 20)
    engine = build_runtime("tiny:llama?layers=6", "fp32", device="cpu", settings=settings).engine
    if attn != "sdpa":
        engine.model.set_attn_implementation(attn)
        engine.graphs.attn_implementation = attn
    return engine


def _items(engine: Engine, chats: list[tuple[str, str]]) -> list[EngineItem]:
    return [
        EngineItem(engine.encode_prompt(ChatPrompt((("user", q),)), "x"), engine.encode_text(r))
        for q, r in chats
    ]


def _capture(
    engine: Engine, items: list[EngineItem], position: str, reduction: str, side: str
) -> list[torch.Tensor]:
    out = next(
        engine.capture(
            items,
            [0, 2, 5],
            parse_position(position),
            reduction,  # type: ignore[arg-type]
            padding_side=side,  # type: ignore[arg-type]
            chunk_items=64,
        )
    )
    return [r.activations for r in out]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_static_path_equals_eager(attn: str, side: str) -> None:
    eager, static = _engine(0, attn), _engine(4, attn)
    assert static.graphs.disabled is None
    first, second = _items(eager, CHATS), _items(eager, CHATS[1:] + CHATS[:1])
    # Same bucket (5 rows -> 8, the same longest item) but other content and order: a replay
    # must read this call's tokens, not the recorded ones.
    assert max(it.length for it in first) == max(it.length for it in second)
    for reduction in ("mean", "last"):
        for position in ("response[:]", "prompt[-1]", "all", "response[:2]"):
            for items in (first, first, second, first):
                want = _capture(eager, items, position, reduction, side)
                got = _capture(static, items, position, reduction, side)
                for a, b in zip(got, want, strict=True):
                    assert a.shape == b.shape
                    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # Recorded on the second sight of each (bucket, layers, reduction); the rest reused it.
    assert static.graphs.recorded == 2
    assert len(static.graphs) == 2
    assert eager.graphs.recorded == 0


def test_steered_and_per_token_captures_stay_eager() -> None:
    engine = _engine(4)
    vec = torch.randn(64, generator=torch.Generator().manual_seed(3))
    plain = _items(engine, CHATS)
    steered = [
        EngineItem(it.prompt_ids, it.response_ids, steering=[SteerSpec((2,), vec, 4.0)])
        for it in plain
    ]
    for _ in range(3):
        out_steered = _capture(engine, steered, "all", "mean", "left")
        _capture(engine, plain, "all", "none", "left")
    assert engine.graphs.recorded == 0
    # Coefficient 0 is no steering at all: such a batch may take the static path.
    zero = [
        EngineItem(it.prompt_ids, it.response_ids, steering=[SteerSpec((2,), vec, 0.0)])
        for it in plain
    ]
    for _ in range(2):
        out_zero = _capture(engine, zero, "all", "mean", "left")
    assert engine.graphs.recorded == 1
    out_plain = _capture(engine, plain, "all", "mean", "left")
    for z, p, s in zip(out_zero, out_plain, out_steered, strict=True):
        torch.testing.assert_close(z, p)
        torch.testing.assert_close(s[0], p[0])  # layer 0 is before the steered layer 2
        assert not torch.allclose(s[1], p[1], atol=1e-3)  # the steering acted at layer 2


def test_graph_cache_is_bounded_and_skips_large_batches() -> None:
    settings = LoaderSettings(capture_graphs=2, capture_graph_tokens=4 * 40)
    engine = build_runtime("tiny:llama?layers=4", "fp32", device="cpu", settings=settings).engine

    def item(width: int) -> list[EngineItem]:
        return [EngineItem(list(range(5, 5 + width - 1)), [7])]

    for width in (5, 13, 21, 29, 37):  # buckets 8, 16, 24, 32, 40 (1 row -> 4 rows)
        for _ in range(2):
            next(engine.capture(item(width), [1, 3], parse_position("all"), "mean"))
    assert engine.graphs.recorded == 5
    assert len(engine.graphs) == 2  # least recently used evicted
    for _ in range(3):  # 4 rows x 60 columns is past the budget of 160 tokens
        next(engine.capture(item(60), [1, 3], parse_position("all"), "mean"))
    assert engine.graphs.recorded == 5
    engine._free_memory()
    assert len(engine.graphs) == 0


async def test_bucketed_capture_over_grpc_matches_and_is_counted(tiny_loader: LoaderProc) -> None:
    """A loader with the bucketed path on (graphs on a GPU; here the same path without them)
    returns what the default loader returns, and counts recorded buckets and served calls."""
    bucketed = start_loader("tiny:llama", "fp32", env={"QSENS_LOADER_CAPTURE_GRAPHS": "2"})
    try:
        async with LoaderClient(bucketed.address) as client:
            got = [await client.capture(ITEMS, position="response[:]") for _ in range(3)]
        async with LoaderClient(tiny_loader.address) as client:
            ref = await client.capture(ITEMS, position="response[:]")
        for g in got:
            np.testing.assert_allclose(g.stacked(), ref.stacked(), atol=2e-5, rtol=1e-4)
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{bucketed.metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        values = {
            line.split()[0]: float(line.split()[-1])
            for line in body.splitlines()
            if line.startswith("qsens_loader_capture_graph")
        }
        # Seen once (eager), recorded on the second call, served from the bucket on the third.
        assert values["qsens_loader_capture_graphs_recorded_total"] == 1
        assert values["qsens_loader_capture_graph_replays_total"] == 1
        assert bucketed.alive()
    finally:
        bucketed.stop()
