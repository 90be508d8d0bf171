"""The backend interface and its registry of lazily imported implementations.

A backend turns (model folder, precision, device) into a ``LoadedModel``; everything after
loading (tokenising, hooks, batching) is shared by the engine. Backends are named in
``BACKENDS`` as ``"module:Class"`` strings and imported only when selected, so bitsandbytes,
gptqmodel, autoawq or vllm are never imported by a process that does not use them.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import InvalidArgument
from services.common.variants import Precision
from services.loader.model_source import ResolvedSource

__all__ = [
    "BACKENDS",
    "BACKEND_PACKAGES",
    "DEFAULT_BACKEND",
    "Backend",
    "LoadedModel",
    "get_backend",
    "missing_packages",
]

BACKENDS: dict[str, str] = {
    "hf": "services.loader.backends.hf:HFBackend",
    "bnb": "services.loader.backends.bnb:BitsAndBytesBackend",
    "gptq": "services.loader.backends.gptq:GPTQBackend",
    "awq": "services.loader.backends.awq:AWQBackend",
}

DEFAULT_BACKEND: dict[Precision, str] = {
    Precision.FP32: "hf",
    Precision.BF16: "hf",
    Precision.FP16: "hf",
    Precision.NF4: "bnb",
    Precision.FP4: "bnb",
    Precision.INT8: "bnb",
    Precision.GPTQ: "gptq",
    Precision.AWQ: "awq",
}


# Import names a backend needs beyond the loader extra (what preflight checks before a run).
BACKEND_PACKAGES: dict[str, tuple[str, ...]] = {
    "bnb": ("bitsandbytes",),
    "gptq": ("gptqmodel",),
    "awq": ("gptqmodel",),
}


def missing_packages(precision: Precision, backend: str | None = None) -> list[str]:
    """Packages the backend serving ``precision`` needs and this environment lacks."""
    import importlib.util

    chosen = backend or DEFAULT_BACKEND.get(precision, "")
    return [
        name for name in BACKEND_PACKAGES.get(chosen, ()) if importlib.util.find_spec(name) is None
    ]


@dataclass
class LoadedModel:
    """A causal LM ready for the engine."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    device: Any  # torch.device
    compute_dtype: Any  # torch.dtype of activations
    quantization_config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Backend(ABC):
    """Loads a model at a precision; subclasses declare the precisions they serve."""

    name: str = ""
    precisions: frozenset[Precision] = frozenset()

    @abstractmethod
    def load(self, source: ResolvedSource, precision: Precision, device: str) -> LoadedModel:
        """Load ``source`` at ``precision`` on ``device``."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release resources held outside the model (none by default)."""


def get_backend(name: str | None, precision: Precision) -> Backend:
    """Instantiate the backend ``name`` (or the precision's default) after checking support."""
    chosen = name or DEFAULT_BACKEND.get(precision)
    if chosen is None:
        raise InvalidArgument(
            "precision",
            f"no backend serves {precision.value} here (registered: {', '.join(sorted(BACKENDS))})",
        )
    target = BACKENDS.get(chosen)
    if target is None:
        raise InvalidArgument(
            "backend", f"unknown backend {chosen!r} (known: {', '.join(sorted(BACKENDS))})"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument("backend", f"backend {chosen!r} is not installed: {exc}") from exc
    backend = getattr(module, class_name)()
    assert isinstance(backend, Backend)
    if precision not in backend.precisions:
        served = " ".join(sorted(p.value for p in backend.precisions))
        raise InvalidArgument(
            "precision", f"backend {chosen!r} serves {served}, not {precision.value}"
        )
    return backend
