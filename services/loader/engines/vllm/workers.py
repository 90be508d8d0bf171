"""The steering and capture hooks of one engine call, installed where vLLM runs the model.

``HookCall`` is one call's hook state as plain data (which request is which row, each row's
steering specs, the capture request): the engine builds it after adding its requests.
``installed(runner, call, ...)`` puts the hooks of ``services.loader.engines.vllm.hooks`` on a
model runner and yields the capture it fills. With one rank the runner is in this process;
with tensor parallelism each rank runs its own worker process, and ``QsensWorkerExtension``
(vLLM's ``worker_extension_cls``, mixed into every worker) does the same there: the engine
calls its methods by name through ``collective_rpc`` with plain data (no callables travel),
and rank 0 sends the capture back. Under tensor parallelism every rank holds the whole
residual stream between decoder layers (the attention output and MLP down projections are
row-parallel and all-reduce their results), so each rank adds the same steering to the same
stream and the ranks stay equal; rank 0's stream is the model's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch

from services.common.errors import FailedPrecondition
from services.loader.engines.vllm.hooks import (
    FlatCapture,
    FlatState,
    TokenOwners,
    install_flat_hooks,
    owners_from_batch,
)
from services.loader.hooks import find_decoder_layers
from services.loader.steering import SteerSpec, build_plan

__all__ = [
    "HookCall",
    "QsensWorkerExtension",
    "installed",
    "query_starts",
]

#: What ``FlatCapture.chunks`` holds: layer -> (rows, positions, streams) per forward.
Chunks = dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def _spec_data(spec: SteerSpec) -> dict[str, Any]:
    return {
        "layers": list(spec.layers),
        "vector": spec.vector,
        "coefficient": float(spec.coefficient),
        "mode": spec.mode,
        "positions": spec.positions,
    }


def _spec(data: dict[str, Any]) -> SteerSpec:
    return SteerSpec(
        tuple(int(x) for x in data["layers"]),
        cast(torch.Tensor, data["vector"]),
        float(data["coefficient"]),
        data["mode"],
        data["positions"],
    )


@dataclass
class HookCall:
    """One engine call's hooks: request id -> row, each row's steering and prompt length, and
    what to capture (streams after ``capture_layers`` inside ``capture_spans`` [R, 2]; the
    final hidden state at ``final_at`` [R])."""

    row_of: dict[str, int]
    steering: list[list[SteerSpec]]
    prompt_lengths: list[int]
    capture_layers: list[int] | None = None
    capture_spans: list[list[int]] | None = None
    final_at: list[int] | None = None

    def to_data(self) -> dict[str, Any]:
        """Plain data (str, int, float, list, dict, tensors) for vLLM's worker messages."""
        return {
            "row_of": dict(self.row_of),
            "steering": [[_spec_data(s) for s in row] for row in self.steering],
            "prompt_lengths": list(self.prompt_lengths),
            "capture_layers": self.capture_layers,
            "capture_spans": self.capture_spans,
            "final_at": self.final_at,
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> HookCall:
        return cls(
            {str(k): int(v) for k, v in data["row_of"].items()},
            [[_spec(s) for s in row] for row in data["steering"]],
            [int(n) for n in data["prompt_lengths"]],
            data["capture_layers"],
            data["capture_spans"],
            data["final_at"],
        )

    def new_capture(self) -> FlatCapture | None:
        """An empty capture for this call (None: it captures nothing)."""
        if self.capture_layers is None or self.capture_spans is None:
            return None
        final = None if self.final_at is None else torch.tensor(self.final_at)
        spans = torch.tensor(self.capture_spans, dtype=torch.long).reshape(-1, 2)
        return FlatCapture(frozenset(self.capture_layers), spans, final)

    def state(self, hidden_size: int, device: torch.device, dtype: torch.dtype) -> FlatState:
        """The hooks' state: the rows' plan plus an empty sentinel row last."""
        plan = build_plan([*self.steering, []], hidden_size=hidden_size, device=device, dtype=dtype)
        lengths = torch.tensor([*self.prompt_lengths, 0])
        return FlatState(plan, lengths, self.new_capture())


def query_starts(runner: Any, num_reqs: int) -> list[int]:
    """The first token of each scheduled request in the forward, and the end: the runner's
    ``query_start_loc`` (a CPU/GPU buffer pair; its CPU side is ``np`` in 0.26 and 0.32)."""
    buffer = runner.query_start_loc
    host = getattr(buffer, "np", None)
    if host is None:
        host = buffer.cpu.numpy()
    return [int(x) for x in host[: num_reqs + 1]]


@contextmanager
def installed(
    runner: Any, call: HookCall, config: Any, dtype: torch.dtype
) -> Iterator[FlatCapture | None]:
    """``call``'s hooks on ``runner``'s model while the block runs; yields its capture. Each
    forward's token owners come from the runner's batch: its request ids in order and their
    query start offsets (tokens of no request of ``call`` get the sentinel row). ``config``:
    the model's text config (layer count, hidden size)."""
    model = runner.get_model()
    layers = find_decoder_layers(model, int(config.num_hidden_layers))
    state = call.state(int(config.hidden_size), torch.device(runner.device), dtype)
    sentinel = len(call.prompt_lengths)
    row_of = call.row_of

    def owners(args: tuple[Any, ...], kwargs: dict[str, Any]) -> TokenOwners:
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        batch = runner.input_batch
        n = batch.num_reqs
        rows = [row_of.get(rid, sentinel) for rid in batch.req_ids[:n]]
        return owners_from_batch(rows, query_starts(runner, n), positions, sentinel)

    with install_flat_hooks(model, layers, state, owners):
        yield state.capture


class QsensWorkerExtension:
    """Mixed into each of vLLM's workers (``worker_extension_cls``): the engine calls these
    by name through ``collective_rpc``, the same call on every rank, in this order:
    ``qsens_begin`` (hooks on), the engine's steps, ``qsens_end`` (hooks off, rank 0's
    capture back). ``self`` is vLLM's worker: ``model_runner``, ``rank``, ``model_config``."""

    _qsens_open: tuple[ExitStack, FlatCapture | None] | None = None

    def _qsens_worker(self) -> Any:
        return cast(Any, self)

    def qsens_begin(self, data: dict[str, Any]) -> None:
        worker = self._qsens_worker()
        if self._qsens_open is not None:  # a call that ended without qsens_end
            self._qsens_open[0].close()
        config = worker.model_config
        stack = ExitStack()
        capture = stack.enter_context(
            installed(
                worker.model_runner, HookCall.from_data(data), config.hf_text_config, config.dtype
            )
        )
        self._qsens_open = (stack, capture)

    def qsens_end(self) -> Chunks | None:
        """Hooks off; rank 0's captured streams (CPU tensors), None on other ranks."""
        if self._qsens_open is None:
            raise FailedPrecondition("qsens_end without qsens_begin on this vLLM worker")
        stack, capture = self._qsens_open
        self._qsens_open = None
        stack.close()
        if capture is None or int(self._qsens_worker().rank) != 0:
            return None
        return capture.chunks

    def qsens_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The model's logits of final hidden states [n, H] (every rank computes its part of
        the vocabulary; rank 0 gathers them and returns them on the CPU)."""
        runner = self._qsens_worker().model_runner
        with torch.inference_mode():
            logits = runner.get_model().compute_logits(hidden.to(runner.device))
        return None if logits is None else logits.float().cpu()

    def qsens_parameter_bytes(self) -> int:
        """Bytes of this rank's parameters (its shard of the model)."""
        model = self._qsens_worker().model_runner.get_model()
        return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def rank_zero(results: Sequence[Any]) -> Any:
    """Rank 0's answer of a ``collective_rpc`` (one result per rank, in rank order)."""
    return results[0]
