"""The weight-loader interface of the transformers engine: (model folder, precision, device)
-> a transformers model.

A ``Backend`` only loads weights; everything after loading (tokenising, hooks, batching) is the
engine's (``services.loader.engines.hf``). Which backend serves which precision, and what it
needs installed, is in ``services.loader.backends.registry``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from services.common.variants import Precision
from services.loader.model_source import ResolvedSource

__all__ = ["Backend", "LoadedModel"]


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
    """Loads a model at a precision (the registry says which precisions it serves)."""

    name: str = ""

    @abstractmethod
    def load(self, source: ResolvedSource, precision: Precision, device: str) -> LoadedModel:
        """Load ``source`` at ``precision`` on ``device``."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release resources held outside the model (none by default)."""
