"""A bf16 model's mean capture equals the float64 mean of its own layer outputs (the 1/n weights
and the reduction run in float32; bf16 weights scaled each row's mean by up to 0.4%)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common import settings as settings_mod
from services.loader.hooks import CaptureSink, reduction_inputs


def _select(lengths: list[int], width: int) -> torch.Tensor:
    col = torch.arange(width)[None, :]
    starts = torch.tensor([width - n for n in lengths])[:, None]
    return col >= starts  # left-padded spans of 3, 7, 11, ... tokens: 1/n inexact in bf16


def test_sink_mean_of_bf16_outputs_matches_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths, width, hidden = [3, 7, 11, 13], 16, 96
    select = _select(lengths, width)
    # Offset rows, as in a residual stream: a scaled mean shows as a large absolute error.
    outputs = [
        (torch.randn(4, width, hidden, generator=gen) + 20.0).to(torch.bfloat16) for _ in range(3)
    ]
    for fuse_bytes in (0, 1 << 30):
        sink = CaptureSink(frozenset({0, 1, 2}), "mean", reduction_inputs(select, "mean"))
        sink.fuse_bytes = fuse_bytes
        for layer, out in enumerate(outputs):
            sink.record(layer, out)
        got = sink.result()
        assert got.dtype == torch.float32 and got.shape == (4, 3, hidden)
        for layer, out in enumerate(outputs):
            for row, n in enumerate(lengths):
                ref = out[row, width - n :].double().mean(dim=0)
                err = (got[row, layer].double() - ref).abs().max().item()
                assert err < 2e-5 * ref.abs().max().item(), (fuse_bytes, layer, row, err)
    # The test data tells the two apart: with bf16 weights the same mean is off by far more.
    w16 = reduction_inputs(select, "mean").weights
    assert w16 is not None
    old = torch.bmm(w16.to(torch.bfloat16), outputs[0])[1, 0].double()
    ref = outputs[0][1, width - 7 :].double().mean(dim=0)
    assert (old - ref).abs().max().item() > 1e-3 * ref.abs().max().item()


def test_packed_mean_equals_the_padded_mean_and_zeroes_rows_without_tokens() -> None:
    """The packed capture's mean (selected tokens straight from the packed layout) equals the
    padded sink's, interleaved with padded records in layer order; a row with no selected
    token gives 0 in both."""
    gen = torch.Generator().manual_seed(1)
    width, hidden = 12, 40
    attention = torch.arange(width)[None, :] >= torch.tensor([[9], [2], [0], [6]])
    select = attention & (torch.arange(width)[None, :] >= torch.tensor([[10], [12], [5], [8]]))
    flat = attention.reshape(-1).nonzero().squeeze(1)
    outputs = [
        (torch.randn(4, width, hidden, generator=gen) + 5.0).to(torch.bfloat16) for _ in "ab"
    ]
    padded = CaptureSink(frozenset({0, 1}), "mean", reduction_inputs(select, "mean"))
    packed = CaptureSink(frozenset({0, 1}), "mean", reduction_inputs(select, "mean"))
    reducer = packed.packed_mean(flat)
    assert reducer is not None and reducer.lengths.tolist() == [2, 0, 7, 4]
    for layer, out in enumerate(outputs):
        padded.record(layer, out)
    packed.record(0, outputs[0])  # a held padded layer stays first
    packed.record_reduced(1, reducer.reduce(outputs[1].reshape(-1, hidden).index_select(0, flat)))
    want, got = padded.result(), packed.result()
    assert packed.recorded == [0, 1] and got.shape == want.shape == (4, 2, hidden)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    assert got[1].abs().max().item() == 0.0
    last = CaptureSink(frozenset({0}), "last", reduction_inputs(select, "last"))
    assert last.packed_mean(flat) is None  # other reductions unpack


def test_bf16_engine_mean_capture_equals_float64_mean_of_its_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a tiny bf16 model computing in bf16, the mean capture of every span equals the
    float64 mean of the same span's per-token capture (reduction "none": the layer outputs)."""
    from services.loader.engine import ChatPrompt, EngineItem
    from services.loader.positions import parse_position
    from services.loader.server import build_runtime

    # bf16 activations even where the CPU lacks native bf16 matmuls (slower, same values).
    monkeypatch.setenv("QSENS_LOADER_CPU_COMPUTE", "native")
    settings_mod.reset()
    try:
        engine = build_runtime("tiny:llama?layers=4", "bf16", device="cpu").engine
    finally:
        monkeypatch.delenv("QSENS_LOADER_CPU_COMPUTE")
        settings_mod.reset()
    assert engine.dtype == torch.bfloat16
    items = [
        EngineItem(engine.encode_prompt(ChatPrompt((("user", q),)), "x"), engine.encode_text(r))
        for q, r in [
            ("Hi", "Hello, friend, how are you today?"),
            ("What now?", "Tea."),
            ("Tell a long tale", "Once upon a time a fox ran far"),
        ]
    ]
    layers = [0, 1, 2]
    position = parse_position("response[:]")
    means = next(engine.capture(items, layers, position, "mean", chunk_items=8))
    tokens = next(engine.capture(items, layers, position, "none", chunk_items=8))
    assert {r.num_positions for r in tokens} != {1}
    for m, t in zip(means, tokens, strict=True):
        assert t.activations.shape[1] == t.num_positions
        ref = t.activations.double().numpy().mean(axis=1)  # [L, H]
        got = m.activations.double().numpy()
        scale = np.abs(ref).max()
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * scale + 1e-7)
