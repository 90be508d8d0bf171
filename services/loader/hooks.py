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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from services.common.errors import FailedPrecondition
from services.loader.steering import LayerPlan, SteeringPlan

__all__ = [
    "CaptureSink",
    "ForwardState",
    "StopForward",
    "find_attention",
    "find_decoder_layers",
    "install_hooks",
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
class CaptureSink:
    """Collects reduced activations of the current micro-batch, per layer."""

    layers: frozenset[int]
    reduction: Literal["mean", "last", "none"]
    select: torch.Tensor  # [B, T] bool: positions to read
    stop_after: int | None = None
    out: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Only what the reduction needs: on a GPU each of these is a kernel launch per call.
        self._weights_by_dtype: dict[torch.dtype, torch.Tensor] = {}
        if self.reduction == "mean":
            counts = self.select.sum(dim=1)
            # [B, 1, T] averaging weights: one batched matmul per layer reduces the span.
            self._weights = (self.select.float() / counts.clamp(min=1).unsqueeze(1)).unsqueeze(1)
        elif self.reduction == "last":
            positions = torch.arange(self.select.shape[1], device=self.select.device)
            self._last = torch.where(self.select, positions, -1).max(dim=1).values.clamp(min=0)
            self._rows = torch.arange(self.select.shape[0], device=self.select.device)

    def record(self, layer: int, hidden: torch.Tensor) -> None:
        """Reduce ``hidden`` [B, T, H] to this layer's result, in the model's dtype (half-
        precision matmuls accumulate in float32; only the result is rounded). The engine
        stacks the layers and converts to float32 once: one kernel instead of one per layer."""
        if self.reduction == "mean":
            w = self._weights_by_dtype.get(hidden.dtype)
            if w is None:
                w = self._weights_by_dtype.setdefault(hidden.dtype, self._weights.to(hidden.dtype))
            self.out[layer] = torch.bmm(w, hidden).squeeze(1)
        elif self.reduction == "last":
            self.out[layer] = hidden[self._rows, self._last]
        else:
            self.out[layer] = hidden[self.select]


@dataclass
class ForwardState:
    """Masks of the tokens in the forward pass that is running now ([B, T] each)."""

    prompt: torch.Tensor
    response: torch.Tensor
    plan: SteeringPlan
    capture: CaptureSink | None = None

    def __post_init__(self) -> None:
        self._masks: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

    def masks(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The masks in ``dtype``, converted once per forward pass and reused by every layer
        (the engine swaps ``prompt``/``response`` between decode steps: the cache follows)."""
        cached = self._masks.get(dtype)
        if cached is None or cached[0] is not self.prompt or cached[1] is not self.response:
            cached = (self.prompt, self.response, self.prompt.to(dtype), self.response.to(dtype))
            self._masks[dtype] = cached
        return cached[2], cached[3]


def _apply_plan(hidden: torch.Tensor, plan: LayerPlan, state: ForwardState) -> torch.Tensor:
    if plan.ablations:
        pm32, rm32 = state.masks(torch.float32)
        h32 = hidden.float()
        for dirs, c_prompt, c_response in plan.ablations:
            proj = torch.einsum("bth,bh->bt", h32, dirs)
            coef = c_prompt[:, None] * pm32 + c_response[:, None] * rm32
            h32 = h32 - (coef * proj).unsqueeze(-1) * dirs[:, None, :]
        hidden = h32.to(hidden.dtype)
    if plan.add_all is not None:
        hidden = hidden + plan.add_all[:, None, :]
    if plan.add_prompt is not None or plan.add_response is not None:
        pm, rm = state.masks(hidden.dtype)
        if plan.add_prompt is not None:
            hidden = hidden + pm.unsqueeze(-1) * plan.add_prompt[:, None, :]
        if plan.add_response is not None:
            hidden = hidden + rm.unsqueeze(-1) * plan.add_response[:, None, :]
    return hidden


def _ablate_only(hidden: torch.Tensor, plan: LayerPlan, state: ForwardState) -> torch.Tensor:
    return _apply_plan(hidden, LayerPlan(ablations=plan.ablations), state)


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
                    hidden = _apply_plan(hidden, plan, state)
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
                        return (_ablate_only(args[0], plan, state), *args[1:]), kwargs
                    kwargs = dict(kwargs)
                    kwargs["hidden_states"] = _ablate_only(kwargs["hidden_states"], plan, state)
                    return args, kwargs

                handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
                attention = find_attention(layer)
                if attention is not None:

                    def attn_hook(
                        _module: nn.Module, _args: Any, output: Any, index: int = index
                    ) -> Any:
                        plan = state.plan.layers[index]
                        if isinstance(output, tuple):
                            return (_ablate_only(output[0], plan, state), *output[1:])
                        return _ablate_only(output, plan, state)

                    handles.append(attention.register_forward_hook(attn_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
