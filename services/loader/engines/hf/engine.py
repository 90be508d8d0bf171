"""The transformers engine behind the ``Engine`` interface: a weight loader of the hf, bnb,
gptq or awq backend builds the model (``services.loader.backends``); the computations live in
this package's modules, one each, over the state in ``core``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from services.common.settings import LoaderSettings
from services.common.variants import Precision
from services.loader.backends.base import LoadedModel
from services.loader.backends.registry import engine_precisions, get_backend
from services.loader.engine import (
    CaptureResult,
    ContinuationScore,
    Engine,
    EngineCapabilities,
    EngineHealth,
    EngineItem,
    GenParams,
    GenResult,
    NextTokenResult,
    PaddingSide,
    Reduction,
    ScoreInput,
)
from services.loader.engines.hf import capture, generate, next_token, score
from services.loader.engines.hf.core import HFCore
from services.loader.model_source import ResolvedSource
from services.loader.positions import Position

__all__ = ["HFEngine"]


class HFEngine(HFCore, Engine):
    """One transformers model: every capture position and reduction, per-row steering (add
    and ablate at prompt, response or all tokens), batch-invariant rows, CUDA graphs on a GPU
    where the kernels allow."""

    name = "hf"

    def __init__(self, loaded: LoadedModel, settings: LoaderSettings, precision: Precision) -> None:
        super().__init__(loaded, settings, precision)
        self.capabilities = EngineCapabilities(
            engine=self.name,
            # Per-row seeds, position ids from the attention mask and no cross-row state:
            # tests/loader/test_fastgen.py and test_engine_interface.py hold this to 1e-5.
            batch_invariant=True,
            graphable=self._graphable(),
            supports_steering=True,
            precisions=frozenset(p.value for p in engine_precisions(self.name)),
        )

    @classmethod
    def load(
        cls,
        source: ResolvedSource,
        precision: Precision,
        backend: str,
        *,
        device: str,
        settings: LoaderSettings,
    ) -> HFEngine:
        """Build the model with the backend's weight loader, then wrap it."""
        weights = get_backend(backend, precision)
        return cls(weights.load(source, precision, device), settings, precision)

    def _graphable(self) -> bool:
        if self.device.type != "cuda":
            return False
        decode = self.fast is not None and self.fast.use_graphs and not self.fast.graphs_disabled
        return decode or (self.graphs.max_graphs > 0 and not self.graphs.disabled)

    # ------------------------------------------------------------------ computations
    def _generate(
        self, items: Sequence[EngineItem], params: GenParams, *, max_rows: int
    ) -> list[GenResult]:
        return generate.generate(self, items, params, max_rows=max_rows)

    def _capture(
        self,
        items: Sequence[EngineItem],
        layers: Sequence[int],
        position: Position,
        reduction: Reduction,
        *,
        padding_side: PaddingSide,
        max_rows: int,
        chunk_items: int,
    ) -> Iterator[list[CaptureResult]]:
        return capture.capture(
            self,
            items,
            layers,
            position,
            reduction,
            padding_side=padding_side,
            max_rows=max_rows,
            chunk_items=chunk_items,
        )

    def _score(
        self,
        items: Sequence[ScoreInput],
        *,
        token_logprobs: bool,
        padding_side: PaddingSide,
        max_rows: int,
    ) -> list[list[ContinuationScore]]:
        return score.score(
            self, items, token_logprobs=token_logprobs, padding_side=padding_side, max_rows=max_rows
        )

    def _next_token(
        self,
        items: Sequence[EngineItem],
        *,
        top_k: int,
        token_ids: Sequence[int],
        padding_side: PaddingSide,
        max_rows: int,
    ) -> list[NextTokenResult]:
        return next_token.next_token(
            self,
            items,
            top_k=top_k,
            token_ids=token_ids,
            padding_side=padding_side,
            max_rows=max_rows,
        )

    # ------------------------------------------------------------------ state
    def health(self) -> EngineHealth:
        """Unhealthy when the model's device is gone or its weights were never materialised."""
        if self.device.type == "cuda" and not torch.cuda.is_available():
            return EngineHealth(False, f"device {self.device} is not available")
        if any(p.device.type == "meta" for p in self.model.parameters()):
            return EngineHealth(False, "some weights were not loaded (meta tensors)")
        return EngineHealth(True)

    def parameter_bytes(self) -> int:
        try:
            return int(self.model.get_memory_footprint())
        except Exception:  # some quantized modules cannot report it: count tensors instead
            return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def device_label(self) -> str:
        return str(self.device)

    def quantization_config(self) -> dict[str, Any]:
        return self.loaded.quantization_config

    def load_notes(self) -> list[str]:
        """The weight loader's notes, then why a fast path is off for this model (generation,
        decode graphs, capture graphs)."""
        notes = list(self.loaded.notes)
        if self.fast_disabled:
            notes.append(
                f"fast generation path off (transformers' generation): {self.fast_disabled}"
            )
        on_gpu = self.device.type == "cuda"
        if on_gpu and self.fast is not None and self.fast.graphs_disabled:
            notes.append(f"decode CUDA graphs off: {self.fast.graphs_disabled}")
        notes.extend(self.live_notes())
        return notes

    def live_notes(self) -> list[str]:
        """Fast paths switched off while serving: capture graphs (a failed recording), the
        compiled elementwise kernels (a failed compilation), packed capture's varlen
        attention and the Triton and flash decode attention (a kernel refusal); each is logged once, and Info shows it from then on."""
        notes = []
        if self.device.type == "cuda" and self.graphs.disabled:
            notes.append(f"capture CUDA graphs off: {self.graphs.disabled}")
        fast = self.fast
        if fast is not None and fast.fused.disabled:
            notes.append(f"compiled rotary and SiLU x up off (eager): {fast.fused.disabled}")
        if fast is not None and fast.varlen_disabled:
            notes.append(
                f"packed capture attends padded (no varlen kernel): {fast.varlen_disabled}"
            )
        asked = self.settings.decode_kernel == "triton"
        if (
            asked
            and self.device.type == "cuda"
            and fast is not None
            and fast.decode_triton.disabled
        ):
            notes.append(f"decode attention without Triton: {fast.decode_triton.disabled}")
        if self.device.type == "cuda" and fast is not None and fast.decode_flash.disabled:
            notes.append(
                f"decode attends the masked cache (no flash): {fast.decode_flash.disabled}"
            )
        return notes

    def counters(self) -> dict[str, int]:
        return {
            "oom_retries": self.oom_retries,
            "graphs_recorded": self.graphs.recorded,
            "graph_replays": self.graphs.replays,
        }

    def free_memory(self) -> None:
        self._free_memory()
