"""Steering specs: validation, and the per-row tensors a forward pass applies.

A row may carry any number of specs (request-level ones plus its own). For one micro-batch
they are folded, per layer, into at most two additive offsets (prompt tokens, response tokens)
and a list of ablation slots, so the hook costs a couple of fused tensor ops whatever the
number of distinct settings in the batch. Specs with coefficient 0 are dropped: 0 is exactly
a no-op.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from services.common.errors import InvalidArgument

__all__ = [
    "LayerPlan",
    "SteerSpec",
    "SteeringPlan",
    "build_plan",
    "first_prompt_layer",
    "resolve_layer",
    "select_rows",
    "validate_vector",
]

Mode = Literal["add", "ablate"]
Where = Literal["prompt", "response", "all"]


@dataclass(frozen=True)
class SteerSpec:
    """A validated steering spec with resolved (non-negative) layer indices."""

    layers: tuple[int, ...]
    vector: torch.Tensor  # float32 [hidden], finite
    coefficient: float
    mode: Mode = "add"
    positions: Where = "all"


def resolve_layer(layer: int, num_layers: int, field: str) -> int:
    """Map a possibly negative index to ``[0, num_layers)``; InvalidArgument when out of range."""
    if -num_layers <= layer < num_layers:
        return layer % num_layers
    raise InvalidArgument(
        field, f"unknown layer {layer}: the model has {num_layers} layers (0..{num_layers - 1})"
    )


def validate_vector(vector: torch.Tensor, hidden_size: int, field: str) -> torch.Tensor:
    """A float32 copy of ``vector``; InvalidArgument for a wrong size or non-finite values."""
    if vector.dim() != 1 or vector.numel() != hidden_size:
        raise InvalidArgument(
            field, f"expected a vector of {hidden_size} values, got shape {list(vector.shape)}"
        )
    out = vector.to(torch.float32)
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise InvalidArgument(field, f"vector contains {bad} NaN/Inf values")
    return out


@dataclass
class LayerPlan:
    """What one decoder layer's hook applies to a micro-batch of B rows."""

    add_prompt: torch.Tensor | None = None  # [B, H]
    add_response: torch.Tensor | None = None  # [B, H]
    # Set instead of both when every row adds the same delta on prompt and response tokens
    # (positions "all"): one broadcast add, no masks (padding is masked out of attention).
    add_all: torch.Tensor | None = None  # [B, H]
    # Each slot: unit directions [B, H] and coefficients on prompt / response tokens [B].
    ablations: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return (
            self.add_prompt is None
            and self.add_response is None
            and self.add_all is None
            and not self.ablations
        )


@dataclass
class SteeringPlan:
    """Per-layer plans for one micro-batch."""

    layers: dict[int, LayerPlan]

    @property
    def empty(self) -> bool:
        return all(p.empty for p in self.layers.values())


_Adds = dict[int, tuple[torch.Tensor, torch.Tensor, list[bool]]]
_Slots = dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def build_plan(
    rows: Sequence[Sequence[SteerSpec]],
    *,
    hidden_size: int,
    device: torch.device,
    dtype: torch.dtype,
    layer_devices: Mapping[int, torch.device] | None = None,
) -> SteeringPlan:
    """Fold each row's specs into per-layer tensors on ``device``, or on each layer's own
    device where ``layer_devices`` names it (a model placed over several GPUs)."""
    adds, slots = _fold_rows(rows, hidden_size)
    plans: dict[int, LayerPlan] = {}
    on = device

    def dev(layer: int) -> torch.device:
        return on if layer_devices is None else layer_devices.get(layer, on)

    for layer, (p, r, used) in adds.items():
        plan = plans.setdefault(layer, LayerPlan())
        device = dev(layer)
        if used[0] and used[1] and torch.equal(p, r):
            plan.add_all = p.to(device=device, dtype=dtype)
            continue
        if used[0]:
            plan.add_prompt = p.to(device=device, dtype=dtype)
        if used[1]:
            plan.add_response = r.to(device=device, dtype=dtype)
    for layer, layer_slots in slots.items():
        plan = plans.setdefault(layer, LayerPlan())
        device = dev(layer)
        for dirs, c_prompt, c_response in layer_slots:
            # Projection math in float32: bf16 dot products lose the direction's tail.
            plan.ablations.append(
                (
                    dirs.to(device=device, dtype=torch.float32),
                    c_prompt.to(device=device, dtype=torch.float32),
                    c_response.to(device=device, dtype=torch.float32),
                )
            )
    return SteeringPlan({k: v for k, v in plans.items() if not v.empty})


def _fold_rows(rows: Sequence[Sequence[SteerSpec]], hidden_size: int) -> tuple[_Adds, _Slots]:
    """On the CPU: per layer, the added vector of every row (prompt, response, which used) and
    the ablation slots (the n-th ablation of every row at that layer shares slot n)."""
    batch = len(rows)
    adds: _Adds = {}
    slots: _Slots = {}
    for b, specs in enumerate(rows):
        per_layer_ablation_count: dict[int, int] = {}
        for spec in specs:
            if spec.coefficient == 0.0:
                continue
            on_prompt = spec.positions in ("prompt", "all")
            on_response = spec.positions in ("response", "all")
            if spec.mode == "add":
                delta = spec.vector * float(spec.coefficient)
                for layer in spec.layers:
                    if layer not in adds:
                        adds[layer] = (
                            torch.zeros(batch, hidden_size),
                            torch.zeros(batch, hidden_size),
                            [False, False],
                        )
                    p, r, used = adds[layer]
                    if on_prompt:
                        p[b] += delta
                        used[0] = True
                    if on_response:
                        r[b] += delta
                        used[1] = True
            else:
                norm = float(spec.vector.norm())
                if norm == 0.0 or not math.isfinite(norm):
                    continue  # ablating the zero direction changes nothing
                unit = spec.vector / norm
                for layer in spec.layers:
                    index = per_layer_ablation_count.get(layer, 0)
                    per_layer_ablation_count[layer] = index + 1
                    layer_slots = slots.setdefault(layer, [])
                    while len(layer_slots) <= index:
                        layer_slots.append(
                            (
                                torch.zeros(batch, hidden_size),
                                torch.zeros(batch),
                                torch.zeros(batch),
                            )
                        )
                    dirs, c_prompt, c_response = layer_slots[index]
                    dirs[b] = unit
                    if on_prompt:
                        c_prompt[b] = float(spec.coefficient)
                    if on_response:
                        c_response[b] = float(spec.coefficient)
    return adds, slots


def first_prompt_layer(specs: Sequence[SteerSpec], num_layers: int) -> int:
    """The first layer at which ``specs`` change a row's prompt tokens (``num_layers`` when
    none does): below it the row's prompt computes exactly what an unsteered row's does, so
    rows sharing a prompt can share that part of the prefill. Coefficient-0 specs are exact
    no-ops; specs on response positions add zero to prompt tokens (bit-exact too)."""
    first = num_layers
    for spec in specs:
        if spec.coefficient != 0.0 and spec.positions in ("prompt", "all") and spec.layers:
            first = min(first, min(spec.layers))
    return first


def select_rows(plan: SteeringPlan, rows: torch.Tensor) -> SteeringPlan:
    """The plan restricted to (or repeated over) ``rows``, an index tensor into the batch
    (copied once to each other device that holds a layer's tensors)."""
    out: dict[int, LayerPlan] = {}
    on_device: dict[torch.device, torch.Tensor] = {rows.device: rows}
    for layer, lp in plan.layers.items():
        first = lp.add_all if lp.add_all is not None else lp.add_prompt
        first = first if first is not None else lp.add_response
        where = first.device if first is not None else lp.ablations[0][0].device
        if where not in on_device:
            on_device[where] = rows.to(where)
        idx = on_device[where]
        out[layer] = LayerPlan(
            add_prompt=None if lp.add_prompt is None else lp.add_prompt.index_select(0, idx),
            add_response=None if lp.add_response is None else lp.add_response.index_select(0, idx),
            add_all=None if lp.add_all is None else lp.add_all.index_select(0, idx),
            ablations=[
                (d.index_select(0, idx), cp.index_select(0, idx), cr.index_select(0, idx))
                for d, cp, cr in lp.ablations
            ],
        )
    return SteeringPlan(out)
