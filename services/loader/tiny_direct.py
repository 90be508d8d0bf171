"""Build a ``direct=1`` tiny model where it is served: the model is made on the ``meta``
device, then each placement unit (embeddings, each decoder layer, norm, head) gets its weights
drawn directly on its assigned device, so a shape larger than one card (or than host memory)
is never whole anywhere.

Each unit draws from its own generator, seeded from the model's seed and the unit's name, so
the values do not depend on where the other units go: the model built over several devices
equals the one built on one (on the same kind of device; CUDA and CPU generators differ).
Matrices are drawn in float32 at the scale of the saved tiny models (0.3 for embeddings, 0.15
elsewhere), then rounded to the serving dtype; norms are ones and biases zeros.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument
from services.common.variants import Precision
from services.loader.placement import units_of
from services.loader.tiny import direct_options

__all__ = ["build_direct", "unit_seed"]


def unit_seed(seed: int, unit: str) -> int:
    """The generator seed of ``unit`` in a model seeded with ``seed`` (63 bits)."""
    digest = hashlib.sha256(f"{seed}:{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _device_of(device_map: Mapping[str, Any], name: str) -> Any:
    """The device of module ``name``: its own entry or its nearest ancestor's (``""``: all)."""
    import torch

    probe = name
    while True:
        if probe in device_map:
            value = device_map[probe]
            return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
        if not probe:
            raise InvalidArgument("device_map", f"no device for {name!r}")
        probe = probe.rpartition(".")[0]


def _materialise(
    model: Any, unit: str, device: Any, dtype: Any, seed: int, done: dict[int, Any]
) -> None:
    """Give every parameter of ``model.<unit>`` real values on ``device`` (``meta`` stays
    empty) and move its buffers there."""
    import torch
    import torch.nn as nn

    module = model.get_submodule(unit)
    generator = None
    if device.type != "meta":
        generator = torch.Generator(device=device)
        generator.manual_seed(unit_seed(seed, unit))
    for path, sub in module.named_modules(prefix=unit):
        for leaf, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) in done:  # tied to a unit made earlier
                sub._parameters[leaf] = done[id(param)]
                continue
            value = torch.empty(param.shape, dtype=torch.float32, device=device)
            if generator is None:
                pass
            elif value.dim() >= 2:
                std = 0.3 if "embed" in f"{path}.{leaf}" else 0.15
                value.normal_(0.0, std, generator=generator)
            else:
                value.fill_(0.0 if leaf == "bias" else 1.0)
            made = nn.Parameter(value.to(dtype), requires_grad=False)
            done[id(param)] = made
            sub._parameters[leaf] = made
        for leaf, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[leaf] = buffer.to(device)


def build_direct(folder: Path, device_map: Mapping[str, Any], dtype: Any) -> Any:
    """The ``direct=1`` tiny model of ``folder`` in ``dtype``, each unit of
    ``placement.units_of`` on its ``device_map`` device (a CUDA index or a device name; ``""``
    maps the whole model). A map over several CUDA devices is dispatched as ``from_pretrained``
    does (accelerate hooks move the hidden states between them)."""
    import torch
    from accelerate import dispatch_model, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    options = direct_options(folder)
    if options is None:
        raise InvalidArgument("model", f"{folder} is not a direct=1 tiny model")
    config = AutoConfig.from_pretrained(str(folder))
    # Parameters on meta; buffers (rotary frequencies) computed for real, they are tiny.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    placed: dict[str, Any] = {}
    done: dict[int, Any] = {}
    with torch.no_grad():
        for unit in units_of(model, Precision.FP32):
            placed[unit.name] = _device_of(device_map, unit.name)
            _materialise(model, unit.name, placed[unit.name], dtype, options["seed"], done)
    model.eval()
    devices = set(placed.values())
    if len(devices) > 1 and all(d.type == "cuda" for d in devices):
        dispatch_model(
            model,
            device_map={name: d.index for name, d in placed.items()},
            skip_keys=getattr(model, "_skip_keys_device_placement", None),
        )
    return model
