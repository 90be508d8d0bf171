"""Forward hooks on decoder layers: steering and residual-stream capture.

``install_hooks`` is a context manager; hooks are removed in ``finally`` even when the forward
pass raises, so a failed call can never leave a steering vector behind. The hook reads the
token masks of the *current* forward from a mutable ``ForwardState`` that the engine updates
between the prefill and each decode step.

Residual stream "after layer l" is the decoder layer's output. Directional ablation follows
Arditi et al.: the direction is projected out of each listed layer's input, its attention
output and its output, so no sub-block ever reads it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from services.common.errors import FailedPrecondition
from services.loader.steering import LayerPlan, SteeringPlan
from services.loader.transfer import to_device

__all__ = [
    "CaptureSink",
    "ForwardState",
    "ReductionInputs",
    "StopForward",
    "ablate_only",
    "apply_plan",
    "capture_forward",
    "find_attention",
    "find_decoder_layers",
    "install_hooks",
    "reduction_inputs",
]

_LAYER_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "transformer.h",
    "transformer.layers",
    "transformer.blocks",
    "gpt_neox.layers",
    "layers",
)
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


class StopForward(Exception):
    """Raised by a capture hook after the last needed layer to skip the rest of the model."""


def find_decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ModuleList of decoder layers; fails loudly when the architecture is unknown."""
    for path in _LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) == num_layers:
            return obj
    candidates = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers
    ]
    if len(candidates) == 1:
        return candidates[0]
    raise FailedPrecondition(
        f"cannot find the {num_layers} decoder layers of {type(model).__name__}; "
        f"tried {', '.join(_LAYER_PATHS)}"
    )


def find_attention(layer: nn.Module) -> nn.Module | None:
    """The attention sub-module of a decoder layer, if it has a conventional name."""
    for name in _ATTENTION_NAMES:
        sub = getattr(layer, name, None)
        if isinstance(sub, nn.Module):
            return sub
    return None


@dataclass
class ReductionInputs:
    """What a capture's reduction reads besides the layer outputs: ``weights`` [B, 1, T]
    (mean: each selected position's share), ``rows``/``last`` [B] (last: the last selected
    column) or ``select`` [B, T] bool (none)."""

    weights: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    last: torch.Tensor | None = None
    select: torch.Tensor | None = None

    @property
    def device(self) -> torch.device | None:
        """Where the inputs live (None when there are none)."""
        for tensor in (self.weights, self.rows, self.last, self.select):
            if tensor is not None:
                return tensor.device
        return None

    def to(self, device: torch.device) -> ReductionInputs:
        """On ``device``, one copy per tensor (rows and last share one)."""
        if self.rows is not None and self.last is not None:
            rows_last = to_device(torch.stack([self.rows, self.last]), device)
            return ReductionInputs(rows=rows_last[0], last=rows_last[1])
        return ReductionInputs(
            weights=None if self.weights is None else to_device(self.weights, device),
            select=None if self.select is None else to_device(self.select, device),
        )


def reduction_inputs(
    select: torch.Tensor, reduction: Literal["mean", "last", "none"]
) -> ReductionInputs:
    """The reduction's inputs from ``select`` [B, T] bool, computed where ``select`` lives (the
    engine builds them on the host and copies them once; a capture graph computes them inside
    the graph from its static buffer)."""
    if reduction == "mean":
        counts = select.sum(dim=1, keepdim=True).clamp(min=1)
        # [B, 1, T] averaging weights: one batched matmul reduces the span of every layer.
        return ReductionInputs(weights=(select.float() / counts).unsqueeze(1))
    if reduction == "last":
        positions = torch.arange(select.shape[1], device=select.device)
        last = torch.where(select, positions, -1).max(dim=1).values.clamp(min=0)
        return ReductionInputs(rows=torch.arange(select.shape[0], device=select.device), last=last)
    return ReductionInputs(select=select)


@dataclass
class CaptureSink:
    """Collects the reduced activations of the current micro-batch, for every captured layer.

    A hook only *holds* the layer's output; the held outputs are reduced together (one stack
    and one reduction for up to ``fuse_bytes`` of them) instead of one reduction per layer: on a
    GPU a forward of a small model is bound by kernel launches, and a per-layer reduction adds
    two of them to each layer. HF decoder layers never modify their input in place, so a held
    output still holds the residual stream after its layer when it is reduced.
    """

    layers: frozenset[int]
    reduction: Literal["mean", "last", "none"]
    inputs: ReductionInputs  # on the layer outputs' device
    stop_after: int | None = None
    # Bytes of layer outputs held for one fused reduction (0: each layer as it comes). Held
    # outputs stay alive past the next layer: this bounds a capture's extra memory.
    fuse_bytes: int = 0

    def __post_init__(self) -> None:
        self._pending: list[torch.Tensor] = []
        self._pending_bytes = 0
        self._groups: list[torch.Tensor] = []  # [B or N, layers of the group, H], layer order
        self.recorded: list[int] = []
        self._weights = self.inputs.weights
        self._device = self.inputs.device

    def record(self, layer: int, hidden: torch.Tensor) -> None:
        """Hold ``hidden`` [B, T, H], the output of ``layer`` (layers arrive in order); a layer
        on another device than the reduction inputs (a model over several GPUs) is copied to
        theirs."""
        self.recorded.append(layer)
        if self._device is not None and hidden.device != self._device:
            hidden = hidden.to(self._device)
        self._pending.append(hidden)
        self._pending_bytes += hidden.numel() * hidden.element_size()
        if self._pending_bytes >= self.fuse_bytes:
            self._flush()

    def packed_mean(self, flat: torch.Tensor) -> PackedMean | None:
        """The mean's inputs for layer outputs packed as ``flat`` (the padded positions
        [B*T] of the packed tokens, row by row), or None where this sink cannot reduce
        packed outputs (another reduction; inputs on another device)."""
        weights = self._weights
        if self.reduction != "mean" or weights is None or weights.device != flat.device:
            return None
        batch = weights.shape[0]
        packed = weights.reshape(-1).index_select(0, flat)  # each packed token's share
        index = (packed > 0).nonzero().squeeze(1)
        lengths = (weights > 0).reshape(batch, -1).sum(dim=1)
        return PackedMean(index, lengths)

    def record_reduced(self, layer: int, reduced: torch.Tensor) -> None:
        """Record ``layer``'s already reduced output [B, 1, H] (after any held ones)."""
        self._flush()
        self.recorded.append(layer)
        self._groups.append(reduced)

    def _flush(self) -> None:
        """Reduce the held outputs. A mean is taken in float32 with float32 weights and stays
        float32: 1/n rounded to bf16 is off by up to 2^-9, which scaled a whole row's mean by
        up to 0.4%; the held group is upcast once (at most ``fuse_bytes`` twice over)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        # [B, T, g, H]: contiguous, so the g layers of a token are one row of g*H values.
        held = pending[0].unsqueeze(2) if len(pending) == 1 else torch.stack(pending, dim=2)
        batch, tokens, group, hidden = held.shape
        if self.reduction == "mean":
            assert self._weights is not None
            if self._weights.dtype != torch.float32:  # once; reduction_inputs makes float32
                self._weights = self._weights.float()
            flat = held.reshape(batch, tokens, group * hidden).float()
            reduced = torch.bmm(self._weights, flat).view(batch, group, hidden)
        elif self.reduction == "last":
            reduced = held[self.inputs.rows, self.inputs.last]  # [B, g, H]
        else:
            reduced = held[self.inputs.select]  # [N, g, H]
        self._groups.append(reduced)

    def result(self) -> torch.Tensor:
        """Every recorded layer, in recording order: [B, L, H] (mean, last) or [N, L, H] (none,
        N the selected tokens of all rows, row by row)."""
        self._flush()
        if not self._groups:
            raise FailedPrecondition("capture recorded no layer")
        return self._groups[0] if len(self._groups) == 1 else torch.cat(self._groups, dim=1)


@dataclass
class PackedMean:
    """A mean over selected tokens of packed layer outputs [N, H] (rows' tokens one after
    another): ``index`` [S] the selected tokens, row by row, ``lengths`` [B] how many each
    row has. Reduces straight from the packed layout (no padded copy of each layer): the
    selected tokens upcast to float32, one segmented mean, rows without any token 0 — the
    padded path's float32 bmm up to summation order."""

    index: torch.Tensor
    lengths: torch.Tensor

    def reduce(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, 1, H] float32 means of ``hidden`` [N, H]."""
        picked = hidden.index_select(0, self.index).float()
        means = torch.segment_reduce(picked, "mean", lengths=self.lengths, axis=0, unsafe=True)
        return torch.where(self.lengths[:, None] > 0, means, 0.0)[:, None]


@dataclass
class ForwardState:
    """Masks of the tokens in the forward pass that is running now ([B, T] each)."""

    prompt: torch.Tensor
    response: torch.Tensor
    plan: SteeringPlan
    capture: CaptureSink | None = None

    def __post_init__(self) -> None:
        self._masks: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    def masks(
        self, dtype: torch.dtype, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The masks in ``dtype`` on ``device`` (default: theirs), converted once per forward
        pass and reused by every layer on that device (the engine swaps ``prompt``/``response``
        between decode steps: the cache follows)."""
        key = (dtype, self.prompt.device if device is None else device)
        cached = self._masks.get(key)
        if cached is None or cached[0] is not self.prompt or cached[1] is not self.response:
            converted = (self.prompt.to(key[1], dtype), self.response.to(key[1], dtype))
            cached = (self.prompt, self.response, *converted)
            self._masks[key] = cached
        return cached[2], cached[3]


def apply_plan(hidden: torch.Tensor, plan: LayerPlan, state: ForwardState) -> torch.Tensor:
    """``plan`` applied to ``hidden`` [B, T, H] (a layer's output; the hooks and the fast
    generation path share it, so both steer the same way)."""
    if plan.ablations:
        pm32, rm32 = state.masks(torch.float32, hidden.device)
        h32 = hidden.float()
        for dirs, c_prompt, c_response in plan.ablations:
            proj = torch.einsum("bth,bh->bt", h32, dirs)
            coef = c_prompt[:, None] * pm32 + c_response[:, None] * rm32
            h32 = h32 - (coef * proj).unsqueeze(-1) * dirs[:, None, :]
        hidden = h32.to(hidden.dtype)
    if plan.add_all is not None:
        hidden = hidden + plan.add_all[:, None, :]
    if plan.add_prompt is not None or plan.add_response is not None:
        pm, rm = state.masks(hidden.dtype, hidden.device)
        if plan.add_prompt is not None:
            hidden = hidden + pm.unsqueeze(-1) * plan.add_prompt[:, None, :]
        if plan.add_response is not None:
            hidden = hidden + rm.unsqueeze(-1) * plan.add_response[:, None, :]
    return hidden


def ablate_only(hidden: torch.Tensor, plan: LayerPlan, state: ForwardState) -> torch.Tensor:
    """Only ``plan``'s ablations: what a layer's input and its attention output get."""
    return apply_plan(hidden, LayerPlan(ablations=plan.ablations), state)


@contextmanager
def install_hooks(
    layers: nn.ModuleList, state: ForwardState, *, steer: bool = True
) -> Iterator[None]:
    """Register steering/capture hooks for ``state`` on ``layers``; always removed on exit."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    wanted: set[int] = set(state.plan.layers) if steer else set()
    if state.capture is not None:
        wanted |= set(state.capture.layers)
    try:
        for index in sorted(wanted):
            if index < 0 or index >= len(layers):
                raise FailedPrecondition(f"hook on layer {index} of {len(layers)}")
            layer = layers[index]
            initial = state.plan.layers.get(index) if steer else None

            # Hooks look the plan up at call time: the engine narrows it (finished rows
            # dropped) between decode steps.
            def post_hook(_module: nn.Module, _args: Any, output: Any, index: int = index) -> Any:
                plan = state.plan.layers.get(index) if steer else None
                hidden = output[0] if isinstance(output, tuple) else output
                if plan is not None:
                    hidden = apply_plan(hidden, plan, state)
                capture = state.capture
                if capture is not None and index in capture.layers:
                    capture.record(index, hidden)
                    if capture.stop_after == index:
                        raise StopForward
                if plan is None:
                    return None
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            handles.append(layer.register_forward_hook(post_hook))

            if initial is not None and initial.ablations:

                def pre_hook(
                    _module: nn.Module,
                    args: tuple[Any, ...],
                    kwargs: dict[str, Any],
                    index: int = index,
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
                    plan = state.plan.layers[index]
                    if args:
                        return (ablate_only(args[0], plan, state), *args[1:]), kwargs
                    kwargs = dict(kwargs)
                    kwargs["hidden_states"] = ablate_only(kwargs["hidden_states"], plan, state)
                    return args, kwargs

                handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
                attention = find_attention(layer)
                if attention is not None:

                    def attn_hook(
                        _module: nn.Module, _args: Any, output: Any, index: int = index
                    ) -> Any:
                        plan = state.plan.layers[index]
                        if isinstance(output, tuple):
                            return (ablate_only(output[0], plan, state), *output[1:])
                        return ablate_only(output, plan, state)

                    handles.append(attention.register_forward_hook(attn_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture_forward(
    base: nn.Module, layers: nn.ModuleList, state: ForwardState, **inputs: torch.Tensor
) -> torch.Tensor:
    """Run ``base`` on ``inputs`` with ``state``'s hooks up to its sink's last layer and return
    the sink's result (the eager capture path and a capture graph's recorded body)."""
    sink = state.capture
    if sink is None:
        raise FailedPrecondition("capture_forward needs a ForwardState with a CaptureSink")
    with install_hooks(layers, state), contextlib.suppress(StopForward):
        base(**inputs, use_cache=False)
    wanted = sorted(sink.layers)
    if sink.recorded != wanted:
        raise FailedPrecondition(f"capture recorded layers {sink.recorded}, wanted {wanted}")
    return sink.result()
