"""Layer-wise placement of a model over several GPUs: its weight bytes per unit (embeddings,
each decoder layer, final norm, head) at a precision, and a ``device_map`` that fits each
device's memory budget, or ``DoesNotFit`` naming what is short.

Sizes come from the transformers config alone (the model is built on the ``meta`` device, so
a 70B shape costs no memory); a quantized precision stores the decoder layers' linear weights
at its bit width plus its scales (bitsandbytes 4-bit: one float32 absmax per 64 weights;
GPTQ/AWQ: a float16 scale and a 4-bit zero per group of 128; LLM.int8(): a float32 scale per
row) and keeps everything else in 16 bits, as the backends load them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import ResourceExhausted
from services.common.precisions import precision_info
from services.common.variants import Precision

__all__ = [
    "DEFAULT_HEADROOM",
    "DeviceMemory",
    "DoesNotFit",
    "Placement",
    "Unit",
    "choose_placement",
    "cuda_placement",
    "gpus_needed",
    "layer_devices",
    "meta_model",
    "place",
    "total_bytes",
    "units_of",
]

#: Share of each device's free memory kept out of the weights' budget: the KV cache,
#: activations and the CUDA allocator's fragmentation live there.
DEFAULT_HEADROOM = 0.15

# Extra bits per quantized weight for its scales and zeros (see the module docstring).
_SCALE_BITS: dict[str, float] = {
    "bitsandbytes4": 32 / 64,
    "gptq": (16 + 4) / 128,
    "awq": (16 + 4) / 128,
    "fp8": 0.0,  # one scale per output channel: 32 bits over a whole row
}


class DoesNotFit(ResourceExhausted):
    """The model's weights do not fit the devices' budgets."""


@dataclass(frozen=True)
class Unit:
    """A module placed whole: its ``device_map`` name and weight bytes. ``tied_to`` names an
    earlier unit it shares weights with (tied embeddings): it goes where that unit goes and
    its shared bytes are not counted twice."""

    name: str
    bytes: int
    tied_to: str | None = None


@dataclass(frozen=True)
class DeviceMemory:
    """A device (``device_map`` value: a CUDA index or a name) and its free bytes."""

    device: int | str
    free_bytes: int


@dataclass(frozen=True)
class Placement:
    """Where each unit goes, each used device's weight budget and the bytes placed there."""

    device_map: dict[str, int | str]
    budgets: dict[int | str, int]
    used: dict[int | str, int] = field(default_factory=dict)

    @property
    def devices(self) -> list[int | str]:
        """The devices holding weights, in layer order."""
        return list(dict.fromkeys(self.device_map.values()))

    def max_memory(self) -> dict[int | str, int]:
        """``from_pretrained``'s ``max_memory``: the budget of each used device."""
        return {d: self.budgets[d] for d in self.devices}

    def note(self) -> str:
        """What was chosen, for ``Info`` notes."""
        gib = 2**30
        parts = ", ".join(
            f"{d}: {self.used.get(d, 0) / gib:.2f} of {self.budgets[d] / gib:.2f} GiB"
            for d in self.devices
        )
        return f"weights placed layer-wise over {len(self.devices)} device(s) ({parts})"


def total_bytes(units: Sequence[Unit]) -> int:
    """Weight bytes of ``units`` (tied units count once)."""
    return sum(u.bytes for u in units if u.tied_to is None)


def _budget(device: DeviceMemory, headroom: float) -> int:
    return max(0, int(device.free_bytes * (1.0 - headroom)))


def _fill(
    units: Sequence[Unit], budgets: Sequence[int], targets: Sequence[float] | None = None
) -> list[int] | None:
    """Unit -> index into ``budgets``, in order: a device takes units while they fit its budget
    and (given ``targets``) while a unit's middle falls within its target; the last device takes
    the rest. None when the units do not fit."""
    where: dict[str, int] = {}
    used = [0] * len(budgets)
    device = 0
    for unit in units:
        if unit.tied_to is not None:
            where[unit.name] = where[unit.tied_to]
            continue
        while device < len(budgets) and (
            used[device] + unit.bytes > budgets[device]
            or (
                targets is not None
                and device < len(budgets) - 1
                and used[device] > 0
                and used[device] + unit.bytes / 2 > targets[device]
            )
        ):
            device += 1
        if device == len(budgets):
            return None
        where[unit.name] = device
        used[device] += unit.bytes
    return [where[u.name] for u in units]


def place(
    units: Sequence[Unit],
    devices: Sequence[DeviceMemory],
    *,
    headroom: float = DEFAULT_HEADROOM,
    count: int | None = None,
) -> Placement:
    """The fewest leading ``devices`` (exactly ``count`` when given) that hold ``units`` in
    order, with the weights spread over them in proportion to their budgets (each device keeps
    its share of headroom for the KV cache of its layers); ``DoesNotFit`` when they do not
    suffice."""
    if not devices:
        raise DoesNotFit("no device to place the model on")
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    if count is not None and not 1 <= count <= len(devices):
        raise DoesNotFit(f"{count} GPU(s) asked for, {len(devices)} available")
    budgets = [_budget(d, headroom) for d in devices]
    need = total_bytes(units)
    counts = range(1, len(devices) + 1) if count is None else [count]
    for n in counts:
        if _fill(units, budgets[:n]) is None:
            continue
        share = need / max(1, sum(budgets[:n]))
        # Targets in proportion to the budgets balance the devices (each keeps the same share
        # of headroom); whole units can miss them, so the plain budgets are the fallback.
        targets = [b * share for b in budgets[:n]]
        slots = _fill(units, budgets[:n], targets) or _fill(units, budgets[:n])
        assert slots is not None
        chosen = devices[:n]
        device_map = {u.name: chosen[i].device for u, i in zip(units, slots, strict=True)}
        used: dict[int | str, int] = {}
        for u, i in zip(units, slots, strict=True):
            if u.tied_to is None:
                used[chosen[i].device] = used.get(chosen[i].device, 0) + u.bytes
        return Placement(device_map, {d.device: _budget(d, headroom) for d in chosen}, used)
    gib = 2**30
    largest = max((u.bytes for u in units), default=0)
    offered = budgets if count is None else budgets[:count]
    raise DoesNotFit(
        f"the weights need {need / gib:.2f} GiB (largest unit {largest / gib:.2f} GiB); "
        f"{len(offered)} device(s) give {sum(offered) / gib:.2f} GiB after "
        f"{headroom:.0%} headroom ({', '.join(f'{b / gib:.2f}' for b in offered)} GiB)"
    )


def choose_placement(
    config: Any,
    precision: Precision,
    devices: Sequence[DeviceMemory],
    *,
    gpus: int | None = None,
    headroom: float = DEFAULT_HEADROOM,
) -> Placement | None:
    """The placement of a model with ``config`` at ``precision`` over ``devices``: None when
    it runs on the first one alone (``gpus`` 1, or unset and the weights fit it), else over
    exactly ``gpus`` of them or the fewest that hold it; ``DoesNotFit`` otherwise."""
    if gpus == 1:
        return None
    units = units_of(meta_model(config), precision)
    placement = place(units, devices, headroom=headroom, count=gpus)
    return placement if len(placement.devices) > 1 else None


def cuda_placement(folder: str, precision: Precision, first: int) -> Placement | None:
    """``choose_placement`` of the checkpoint in ``folder`` over the GPUs from index ``first``
    on, by their free memory now and the loader settings (``gpus``, ``gpu_headroom``)."""
    import torch
    from transformers import AutoConfig

    from services.common import settings as settings_mod

    loader = settings_mod.get(settings_mod.LoaderSettings)
    if loader.gpus == 1:
        return None
    devices = [
        DeviceMemory(i, int(torch.cuda.mem_get_info(i)[0]))
        for i in range(first, torch.cuda.device_count())
    ]
    config = AutoConfig.from_pretrained(folder)
    return choose_placement(
        config, precision, devices, gpus=loader.gpus, headroom=loader.gpu_headroom
    )


def gpus_needed(
    units: Sequence[Unit],
    gpu_free_bytes: int,
    *,
    headroom: float = DEFAULT_HEADROOM,
    most: int = 64,
) -> int:
    """How many identical GPUs with ``gpu_free_bytes`` free hold ``units``."""
    devices = [DeviceMemory(i, gpu_free_bytes) for i in range(most)]
    return len(place(units, devices, headroom=headroom).devices)


# ---------------------------------------------------------------------- sizes from a config
def meta_model(config: Any) -> Any:
    """The causal LM of ``config`` built on the ``meta`` device (shapes only, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _storage_bits(precision: Precision, quantized_weight: bool, in_features: int) -> float:
    facts = precision_info(precision)
    if not facts.quantized:
        return float(facts.bits)
    if not quantized_weight:
        return 16.0  # embeddings, norms, head and biases stay in half precision
    if facts.family == "bitsandbytes":
        return facts.bits + (32 / in_features if facts.is_8bit else _SCALE_BITS["bitsandbytes4"])
    return facts.bits + _SCALE_BITS[facts.family]


def units_of(model: Any, precision: Precision, num_layers: int | None = None) -> list[Unit]:
    """``model``'s placement units in execution order with their bytes at ``precision``:
    every module beside the decoder-layer list and its ancestors whole, each decoder layer on
    its own. Works on a ``meta_model`` or a loaded one."""
    import torch.nn as nn

    from services.loader.hooks import find_decoder_layers

    if num_layers is None:
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_layers = int(text.num_hidden_layers)
    layers = find_decoder_layers(model, num_layers)
    layer_ids = {id(m) for m in layers.modules()}
    quantized_weights = {
        id(m.weight): m.in_features for m in layers.modules() if isinstance(m, nn.Linear)
    }
    ancestors = {id(m) for m in model.modules() if any(x is layers for x in m.modules())}
    seen: dict[int, str] = {}  # parameter id -> unit that counted it
    units: list[Unit] = []

    def add(name: str, module: nn.Module) -> None:
        size, tied = 0.0, None
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) in seen:
                tied = seen[id(tensor)]
                continue
            seen[id(tensor)] = name
            in_features = quantized_weights.get(id(tensor))
            bits = _storage_bits(precision, in_features is not None, in_features or 1)
            size += tensor.numel() * bits / 8
        units.append(Unit(name, int(size), tied if size == 0 and tied else None))

    def walk(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if child is layers:
                for i, layer in enumerate(layers):
                    add(f"{name}.{i}", layer)
            elif id(child) in ancestors:
                walk(f"{name}.", child)
            elif id(child) not in layer_ids:
                add(name, child)

    walk("", model)
    return units


def layer_devices(layers: Iterable[Any], default: Any) -> dict[int, Any]:
    """The device of each decoder layer (of its first parameter; ``default`` for none)."""
    out: dict[int, Any] = {}
    for i, layer in enumerate(layers):
        first = next(iter(layer.parameters()), None)
        out[i] = default if first is None else first.device
    return out
