"""Per-row steering and residual-stream capture on vLLM-style decoder layers.

vLLM runs a *flat* batch: the tokens of every scheduled request side by side ([N, H], no
batch dimension, a prompt possibly split over several steps), and a decoder layer returns
``(hidden, residual)``: the residual stream after the layer is their sum, which the next
layer's fused add-norm forms. This module needs no vLLM: ``TokenOwners`` says which request
row and position each token of the running forward belongs to (the engine reads it from the
model runner, a test builds it by hand), and the hooks apply the project's own steering math
(``services.loader.hooks.apply_plan``) to each token under its row's plan, so the two engines
steer identically. Steering changes ``hidden`` by the stream's change, computed in float32:
a token whose row does not steer gets exactly zero and stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from services.common.errors import FailedPrecondition
from services.loader.hooks import ForwardState, ablate_only, apply_plan, find_attention
from services.loader.steering import LayerPlan, SteeringPlan, select_rows

__all__ = [
    "FlatCapture",
    "FlatState",
    "TokenOwners",
    "install_flat_hooks",
    "owners_from_batch",
]


@dataclass
class TokenOwners:
    """Who owns each token of the running forward: ``rows`` [N] (a plan row; ``sentinel``
    for tokens of no row of ours, e.g. padding) and ``positions`` [N] within the row."""

    rows: torch.Tensor
    positions: torch.Tensor


def owners_from_batch(
    row_of: Sequence[int], query_start: Sequence[int], positions: torch.Tensor, sentinel: int
) -> TokenOwners:
    """Owners from a scheduler batch: request ``i`` owns tokens ``query_start[i]`` up to
    ``query_start[i + 1]`` and is row ``row_of[i]``; tokens past the last request (padding)
    belong to ``sentinel``."""
    starts = torch.tensor(list(query_start), dtype=torch.long)
    counts = starts[1 : len(row_of) + 1] - starts[: len(row_of)]
    owned = torch.repeat_interleave(torch.tensor(list(row_of), dtype=torch.long), counts)
    rows = torch.full((positions.shape[0],), sentinel, dtype=torch.long)
    first = int(starts[0]) if len(row_of) else 0
    rows[first : first + owned.shape[0]] = owned  # one copy, not one per request
    return TokenOwners(rows.to(positions.device), positions.long())


@dataclass
class FlatCapture:
    """Streams after ``layers`` of the tokens inside each row's span (``spans`` [R, 2],
    half-open, positions within the row), gathered across forwards and chunks; ``final``
    also keeps the model's last hidden state (after its final norm) at ``final_at`` [R]."""

    layers: frozenset[int]
    spans: torch.Tensor
    final_at: torch.Tensor | None = None
    # layer -> chunks of (rows, positions, stream [n, H]); -1 is the final hidden state.
    chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict
    )
    # layer -> row -> its runs in the chunks: (first position, chunk, start, end).
    _runs: dict[int, dict[int, list[tuple[int, int, int, int]]]] = field(
        default_factory=dict, repr=False
    )

    def record(self, layer: int, owners: TokenOwners, stream: torch.Tensor) -> None:
        rows, pos = owners.rows, owners.positions
        valid = rows < self.spans.shape[0]
        safe = torch.where(valid, rows, 0)
        if layer < 0:
            assert self.final_at is not None
            keep = valid & (pos == self.final_at.to(rows.device)[safe])
        else:
            spans = self.spans.to(rows.device)
            keep = valid & (pos >= spans[safe, 0]) & (pos < spans[safe, 1])
        if bool(keep.any()):
            self._runs.pop(layer, None)
            self.chunks.setdefault(layer, []).append(
                # Boolean indexing copies, so the kept streams own their memory.
                (rows[keep].cpu(), pos[keep].cpu(), stream[keep].detach().cpu())
            )

    def tokens(self, layer: int, row: int) -> torch.Tensor:
        """Row ``row``'s recorded streams after ``layer`` in position order [n, H] (a token
        computed twice, e.g. after a preemption, counts once: its last computation)."""
        runs = self._row_runs(layer).get(row)
        if not runs:
            raise FailedPrecondition(f"capture recorded no token of row {row} after layer {layer}")
        parts = self.chunks[layer]
        runs = sorted(runs)  # by first position, then recording order
        pos = torch.cat([parts[c][1][a:b] for _, c, a, b in runs])
        if bool((pos[1:] > pos[:-1]).all()):  # the usual case: each token recorded once
            return torch.cat([parts[c][2][a:b] for _, c, a, b in runs])
        # Recomputed tokens: keep each position's last recording.
        order = sorted(runs, key=lambda r: r[1])  # recording order
        pos = torch.cat([parts[c][1][a:b] for _, c, a, b in order])
        streams = torch.cat([parts[c][2][a:b] for _, c, a, b in order])
        latest: dict[int, int] = {int(p): i for i, p in enumerate(pos.tolist())}
        return streams[torch.tensor([latest[p] for p in sorted(latest)])]

    def _row_runs(self, layer: int) -> dict[int, list[tuple[int, int, int, int]]]:
        """Where each row's tokens sit in ``layer``'s chunks: a forward holds each request's
        tokens side by side, so a row is one run per chunk, found once per layer."""
        if layer not in self._runs:
            found: dict[int, list[tuple[int, int, int, int]]] = {}
            for c, (rows, pos, _stream) in enumerate(self.chunks.get(layer, [])):
                values, counts = torch.unique_consecutive(rows, return_counts=True)
                start = 0
                for row, count in zip(values.tolist(), counts.tolist(), strict=True):
                    found.setdefault(row, []).append((int(pos[start]), c, start, start + count))
                    start += count
            self._runs[layer] = found
        return self._runs[layer]


@dataclass
class FlatState:
    """The steering plan of one engine call (rows of requests plus one empty ``sentinel`` row
    last), the capture, and the owners of the forward that is running now."""

    plan: SteeringPlan
    prompt_lengths: torch.Tensor  # [R + 1]; a token at position >= its row's is a response token
    capture: FlatCapture | None = None
    owners: TokenOwners | None = None
    _token_plan: SteeringPlan | None = None
    _forward: ForwardState | None = None

    @property
    def sentinel(self) -> int:
        return int(self.prompt_lengths.shape[0]) - 1

    def begin(self, owners: TokenOwners) -> None:
        """A forward starts: expand the plan to its tokens (one gather per plan tensor)."""
        self.owners = owners
        self._token_plan = None
        self._forward = None
        if not self.plan.empty:
            self._token_plan = select_rows(self.plan, owners.rows)
            response = owners.positions >= self.prompt_lengths.to(owners.rows.device)[owners.rows]
            # [N, 1]: each token is a "row" of one position for apply_plan.
            self._forward = ForwardState((~response)[:, None], response[:, None], self._token_plan)

    def layer_plan(self, layer: int) -> tuple[LayerPlan | None, ForwardState | None]:
        if self._token_plan is None:
            return None, None
        return self._token_plan.layers.get(layer), self._forward


def _steered(
    hidden: torch.Tensor, residual: torch.Tensor | None, plan: LayerPlan, state: ForwardState
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new hidden, new stream): ``plan`` applied to the stream ``hidden + residual``, moved
    into ``hidden`` as the stream's float32 change (zero, so bit-exact, for unsteered rows)."""
    stream = hidden.float() if residual is None else hidden.float() + residual.float()
    steered = apply_plan(stream[:, None, :], plan, state)[:, 0, :].float()
    return (hidden.float() + (steered - stream)).to(hidden.dtype), steered.to(hidden.dtype)


def _stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The residual stream after a layer, rounded as vLLM's next fused add-norm rounds it."""
    if residual is None:
        return hidden
    return (hidden.float() + residual.float()).to(hidden.dtype)


@contextmanager
def install_flat_hooks(
    model: nn.Module,
    layers: nn.ModuleList,
    state: FlatState,
    owners: Callable[[tuple[Any, ...], dict[str, Any]], TokenOwners],
) -> Iterator[None]:
    """Hooks for ``state`` on ``layers``, and on ``model`` a pre-hook that sets the owners of
    each forward (``owners(args, kwargs)`` of the model's call) and, when the capture wants
    it, a hook that keeps the final hidden state; all removed on exit, even on error."""
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def begin(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state.begin(owners(args, kwargs))

    handles.append(model.register_forward_pre_hook(begin, with_kwargs=True))
    capture = state.capture
    if capture is not None and capture.final_at is not None:

        def final(_m: nn.Module, _args: Any, output: Any) -> None:
            assert capture is not None and state.owners is not None
            hidden = output[0] if isinstance(output, tuple) else output
            capture.record(-1, state.owners, hidden)

        handles.append(model.register_forward_hook(final))
    wanted = set(state.plan.layers) | (set(capture.layers) if capture is not None else set())
    try:
        for index in sorted(wanted):
            if index < 0 or index >= len(layers):
                raise FailedPrecondition(f"hook on layer {index} of {len(layers)}")
            handles.extend(_layer_hooks(layers[index], index, state))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _layer_hooks(
    layer: nn.Module, index: int, state: FlatState
) -> list[torch.utils.hooks.RemovableHandle]:
    """The hooks of one decoder layer: steer and capture its output; for ablations also its
    input and its attention output (so no sub-block reads the direction, as in the HF engine)."""

    def post(_m: nn.Module, _args: Any, output: Any) -> Any:
        hidden, residual = output
        plan, fstate = state.layer_plan(index)
        stream: torch.Tensor | None = None
        if plan is not None and fstate is not None:
            hidden, stream = _steered(hidden, residual, plan, fstate)
        capture = state.capture
        if capture is not None and index in capture.layers and state.owners is not None:
            capture.record(index, state.owners, _stream(hidden, residual))
        return None if stream is None else (hidden, residual)

    handles = [layer.register_forward_hook(post)]
    initial = state.plan.layers.get(index)
    if initial is None or not initial.ablations:
        return handles

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plan, fstate = state.layer_plan(index)
        if plan is None or fstate is None or not plan.ablations:
            return None
        # vLLM calls layer(positions, hidden_states, residual).
        args = tuple(args)
        hidden_at = 1 if len(args) > 1 else None
        hidden = args[1] if hidden_at is not None else kwargs["hidden_states"]
        residual = args[2] if len(args) > 2 else kwargs.get("residual")
        new_hidden, _ = _steered(hidden, residual, LayerPlan(ablations=plan.ablations), fstate)
        if hidden_at is not None:
            return (args[0], new_hidden, *args[2:]), kwargs
        return args, {**kwargs, "hidden_states": new_hidden}

    handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    attention = find_attention(layer)
    if attention is not None:

        def attn(_m: nn.Module, _args: Any, output: Any) -> Any:
            plan, fstate = state.layer_plan(index)
            if plan is None or fstate is None or not plan.ablations:
                return None
            out = output[0] if isinstance(output, tuple) else output
            ablated = ablate_only(out[:, None, :], plan, fstate)[:, 0, :]
            return (ablated, *output[1:]) if isinstance(output, tuple) else ablated

        handles.append(attention.register_forward_hook(attn))
    return handles
