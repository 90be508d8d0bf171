"""What an engine computes exactly, as the loader reports it in ``Info`` and the planner
reads it: the capability flags, the checks an engine applies before computing, and their
protobuf form. Free of torch, so clients and the planner can use it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from services.common.errors import FailedPrecondition
from services.loader.pb import loader_pb2 as pb
from services.loader.positions import Position

__all__ = [
    "CAPTURE_SEGMENTS",
    "REDUCTIONS",
    "RPCS",
    "EngineCapabilities",
    "Reduction",
    "capabilities_from_proto",
    "capabilities_to_proto",
]

Reduction = Literal["mean", "last", "none"]
REDUCTIONS: tuple[Reduction, ...] = ("mean", "last", "none")
# Position segments (``services.loader.positions``) and steering positions share these names.
CAPTURE_SEGMENTS = ("prompt", "response", "all")
RPCS = ("generate", "capture", "score", "next_token")


class _Steering(Protocol):
    @property
    def mode(self) -> str: ...

    @property
    def positions(self) -> str: ...


def _every_capture() -> frozenset[tuple[str, str]]:
    return frozenset((s, r) for s in CAPTURE_SEGMENTS for r in REDUCTIONS)


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine computes exactly (reported in ``Info``; the planner routes by it)."""

    engine: str
    # A row's result does not depend on the other rows of its batch: same seed, same sample;
    # padding and position ids make left/right padding and batch composition give the same
    # numbers (up to the kernels' rounding).
    batch_invariant: bool
    # Decode steps and captures are replayed from CUDA graphs on this device.
    graphable: bool
    # Steering specs are applied per request and per batch row.
    supports_steering: bool
    steering_modes: frozenset[str] = frozenset({"add", "ablate"})
    steering_positions: frozenset[str] = frozenset(CAPTURE_SEGMENTS)
    # (position segment, reduction) pairs ``capture`` computes, e.g. ("response", "mean").
    captures: frozenset[tuple[str, str]] = field(default_factory=_every_capture)
    rpcs: frozenset[str] = frozenset(RPCS)
    # Precision names this engine serves on its device (empty: not stated, older loaders).
    precisions: frozenset[str] = frozenset()
    # GPUs the model spans with tensor parallelism.
    tensor_parallel_size: int = 1

    def check_steering(self, steering: Sequence[_Steering], field: str) -> None:
        """FailedPrecondition when ``steering`` needs what this engine cannot do."""
        if not steering:
            return
        if not self.supports_steering:
            raise FailedPrecondition(f"{field}: engine {self.engine!r} does not steer")
        for spec in steering:
            if (
                spec.mode not in self.steering_modes
                or spec.positions not in self.steering_positions
            ):
                raise FailedPrecondition(
                    f"{field}: engine {self.engine!r} cannot steer with mode {spec.mode!r} at "
                    f"{spec.positions!r} positions"
                )

    def check_capture(self, position: Position, reduction: str) -> None:
        """FailedPrecondition when ``capture`` at ``position`` with ``reduction`` is not exact."""
        if not self.supports_capture(position, reduction):
            raise FailedPrecondition(
                f"engine {self.engine!r} cannot capture {position} with reduction {reduction!r}; "
                f"an engine that can (hf) serves it"
            )

    def check_rpc(self, rpc: str) -> None:
        """FailedPrecondition when this engine does not serve ``rpc``."""
        if rpc not in self.rpcs:
            raise FailedPrecondition(f"engine {self.engine!r} does not serve {rpc}")

    def supports_capture(self, position: Position, reduction: str) -> bool:
        """Whether ``capture`` at ``position`` with ``reduction`` is computed exactly here."""
        return (position.segment, reduction) in self.captures


def capabilities_to_proto(caps: EngineCapabilities) -> pb.EngineCapabilities:
    """The ``Info`` form (lists sorted, captures as "segment:reduction")."""
    return pb.EngineCapabilities(
        batch_invariant=caps.batch_invariant,
        graphable=caps.graphable,
        supports_steering=caps.supports_steering,
        steering_modes=sorted(caps.steering_modes),
        steering_positions=sorted(caps.steering_positions),
        captures=sorted(f"{segment}:{reduction}" for segment, reduction in caps.captures),
        rpcs=sorted(caps.rpcs),
        precisions=sorted(caps.precisions),
        tensor_parallel_size=caps.tensor_parallel_size,
    )


def capabilities_from_proto(engine: str, message: pb.EngineCapabilities) -> EngineCapabilities:
    """``Info.capabilities`` read back (``engine`` is ``Info.engine``)."""
    return EngineCapabilities(
        engine=engine,
        batch_invariant=message.batch_invariant,
        graphable=message.graphable,
        supports_steering=message.supports_steering,
        steering_modes=frozenset(message.steering_modes),
        steering_positions=frozenset(message.steering_positions),
        captures=frozenset(
            (segment, reduction)
            for segment, _, reduction in (c.partition(":") for c in message.captures)
        ),
        rpcs=frozenset(message.rpcs),
        precisions=frozenset(message.precisions),
        tensor_parallel_size=message.tensor_parallel_size or 1,
    )
