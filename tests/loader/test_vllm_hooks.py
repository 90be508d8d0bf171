"""The vLLM engine's flat-batch hooks steer and capture exactly as the HF engine's hooks do.

Two real torch models share weights: one with HF-style decoder layers (a padded [B, T, H]
batch, each layer returning the stream), one with vLLM-style layers (a flat [N, H] batch,
each layer returning ``(hidden, residual)`` whose sum is the stream). The same per-row
steering (add and ablate, at prompt, response or all positions) through
``services.loader.hooks`` on the first and ``services.loader.engines.vllm.hooks`` on the
second must give the same final states and the same captured streams, token by token.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.common.errors import FailedPrecondition
from services.loader.engines.vllm.hooks import (
    FlatCapture,
    FlatState,
    TokenOwners,
    install_flat_hooks,
    owners_from_batch,
)
from services.loader.hooks import CaptureSink, ForwardState, install_hooks, reduction_inputs
from services.loader.steering import SteerSpec, build_plan

H = 16
LAYERS = 4


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _Block(nn.Module):
    """Per-token attention stand-in and MLP shared by both layer styles."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Linear(H, H)
        self.mlp = nn.Linear(H, H)


class HFLayer(nn.Module):
    def __init__(self, block: _Block) -> None:
        super().__init__()
        self.self_attn = block.self_attn
        self.mlp = block.mlp

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor]:
        stream = hidden + self.self_attn(_norm(hidden))
        return (stream + self.mlp(_norm(stream)),)


class VLLMLayer(nn.Module):
    def __init__(self, block: _Block) -> None:
        super().__init__()
        self.self_attn = block.self_attn
        self.mlp = block.mlp

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden if residual is None else hidden + residual
        residual = residual + self.self_attn(_norm(residual))
        return self.mlp(_norm(residual)), residual


class HFModel(nn.Module):
    def __init__(self, blocks: list[_Block]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(HFLayer(b) for b in blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            (x,) = layer(x)
        return _norm(x)


class VLLMModel(nn.Module):
    def __init__(self, blocks: list[_Block]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VLLMLayer(b) for b in blocks)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = embeds, None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        assert residual is not None
        return _norm(hidden + residual)


# Two rows: (prompt length, response length); row 1 is shorter.
ROWS = [(5, 3), (3, 2)]


def _setup() -> tuple[HFModel, VLLMModel, list[torch.Tensor], list[list[SteerSpec]]]:
    torch.manual_seed(0)
    blocks = [_Block() for _ in range(LAYERS)]
    seqs = [torch.randn(p + r, H) for p, r in ROWS]
    v1, v2 = torch.randn(H), torch.randn(H)
    steering = [
        [
            SteerSpec((1,), v1, 2.0, "add", "prompt"),
            SteerSpec((2,), v2, 1.0, "ablate", "all"),
        ],
        [SteerSpec((1, 3), v2, -1.5, "add", "response"), SteerSpec((0,), v1, 0.5, "add", "all")],
    ]
    return HFModel(blocks), VLLMModel(blocks), seqs, steering


def _hf_run(
    model: HFModel, seqs: list[torch.Tensor], steering: list[list[SteerSpec]], layers: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch through HF hooks: final states [B, T, H], captures [N, L, H]."""
    width = max(s.shape[0] for s in seqs)
    x = torch.zeros(len(seqs), width, H)
    prompt = torch.zeros(len(seqs), width, dtype=torch.bool)
    response = torch.zeros_like(prompt)
    for b, (s, (p, r)) in enumerate(zip(seqs, ROWS, strict=True)):
        x[b, : p + r] = s
        prompt[b, :p] = True
        response[b, p : p + r] = True
    plan = build_plan(steering, hidden_size=H, device=torch.device("cpu"), dtype=torch.float32)
    select = prompt | response
    sink = CaptureSink(frozenset(layers), "none", reduction_inputs(select, "none"))
    state = ForwardState(prompt, response, plan, sink)
    with install_hooks(model.layers, state):
        out = model(x)
    return out, sink.result()


def _flat_run(
    model: VLLMModel,
    seqs: list[torch.Tensor],
    steering: list[list[SteerSpec]],
    layers: list[int],
    *,
    chunks: list[list[tuple[int, int, int]]],
) -> tuple[dict[tuple[int, int], torch.Tensor], FlatCapture]:
    """Flat forwards, each a list of (row, start, end) token ranges plus one padding token
    (as a scheduler splits prompts and appends decode tokens): final state per (row, pos)."""
    plan = build_plan(
        [*steering, []], hidden_size=H, device=torch.device("cpu"), dtype=torch.float32
    )
    lengths = torch.tensor([p for p, _ in ROWS] + [0])
    spans = torch.tensor([[0, p + r] for p, r in ROWS])
    capture = FlatCapture(frozenset(layers), spans)
    state = FlatState(plan, lengths, capture)
    finals: dict[tuple[int, int], torch.Tensor] = {}
    current: list[tuple[int, int, int]] = []

    def owners(_args: tuple[object, ...], kwargs: dict[str, torch.Tensor]) -> TokenOwners:
        starts = [0]
        for _, a, b in current:
            starts.append(starts[-1] + b - a)
        return owners_from_batch(
            [row for row, _, _ in current], starts, kwargs["positions"], sentinel=len(ROWS)
        )

    with install_flat_hooks(model, model.layers, state, owners):
        for forward in chunks:
            current[:] = forward
            embeds = torch.cat([seqs[row][a:b] for row, a, b in forward] + [torch.randn(1, H)])
            positions = torch.cat([torch.arange(a, b) for _, a, b in forward] + [torch.tensor([0])])
            out = model(embeds=embeds, positions=positions)
            n = 0
            for row, a, b in forward:
                for pos in range(a, b):
                    finals[(row, pos)] = out[n]
                    n += 1
    return finals, capture


# A prefill split in two chunks, then "decode" steps one token per row (prompts first).
SCHEDULE = [
    [(0, 0, 3), (1, 0, 3)],
    [(0, 3, 5), (1, 3, 4)],
    [(1, 4, 5), (0, 5, 6)],
    [(0, 6, 8)],
]


def test_flat_hooks_steer_and_capture_like_hf_hooks() -> None:
    hf, flat, seqs, steering = _setup()
    layers = [1, 2, 3]
    hf_out, hf_capture = _hf_run(hf, seqs, steering, layers)
    finals, capture = _flat_run(flat, seqs, steering, layers, chunks=SCHEDULE)
    n = 0
    for row, (p, r) in enumerate(ROWS):
        for pos in range(p + r):
            torch.testing.assert_close(finals[(row, pos)], hf_out[row, pos], atol=1e-5, rtol=1e-5)
        for li, layer in enumerate(layers):
            torch.testing.assert_close(
                capture.tokens(layer, row), hf_capture[n : n + p + r, li], atol=1e-5, rtol=1e-5
            )
        n += p + r
    # The steering did something: unsteered runs differ from the steered ones.
    plain, _ = _flat_run(flat, seqs, [[], []], layers, chunks=SCHEDULE)
    assert not torch.allclose(plain[(0, 4)], finals[(0, 4)], atol=1e-3)
    assert not torch.allclose(plain[(1, 4)], finals[(1, 4)], atol=1e-3)


def test_unsteered_row_stays_bit_identical_beside_a_steered_row() -> None:
    _, flat, seqs, steering = _setup()
    alone, _ = _flat_run(flat, seqs, [steering[0], []], [1], chunks=SCHEDULE)
    plain, _ = _flat_run(flat, seqs, [[], []], [1], chunks=SCHEDULE)
    for pos in range(sum(ROWS[1])):
        assert torch.equal(alone[(1, pos)], plain[(1, pos)])


def test_hooks_removed_after_an_error_and_bad_layer_is_named() -> None:
    _, flat, _, _ = _setup()
    spec = SteerSpec((LAYERS,), torch.ones(H), 1.0)
    plan = build_plan([[spec], []], hidden_size=H, device=torch.device("cpu"), dtype=torch.float32)
    state = FlatState(plan, torch.tensor([5, 0]))
    with (
        pytest.raises(FailedPrecondition, match=f"hook on layer {LAYERS}"),
        install_flat_hooks(flat, flat.layers, state, lambda a, k: TokenOwners(k, k)),
    ):
        pass
    assert all(not layer._forward_hooks for layer in flat.layers)
    assert not flat._forward_pre_hooks


def test_capture_keeps_each_token_once_in_position_order() -> None:
    """A token recorded twice (a preempted request recomputed) counts once, its last
    recording; each row's tokens come back in position order whatever the forward order."""
    capture = FlatCapture(frozenset({0}), torch.tensor([[0, 3], [0, 3]]))
    first = TokenOwners(torch.tensor([1, 0, 0]), torch.tensor([0, 1, 0]))
    capture.record(0, first, torch.tensor([[10.0], [1.0], [0.0]]))
    again = TokenOwners(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 1]))
    capture.record(0, again, torch.tensor([[1.5], [2.0], [11.0]]))
    assert capture.tokens(0, 0).flatten().tolist() == [0.0, 1.5, 2.0]
    assert capture.tokens(0, 1).flatten().tolist() == [10.0, 11.0]
    with pytest.raises(FailedPrecondition, match="no token of row 2"):
        capture.tokens(0, 2)
