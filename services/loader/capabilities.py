"""What an engine computes exactly, as the loader reports it in ``Info`` and in its registry
entry, and what a job needs of it: the capability flags, the checks an engine applies before
computing, ``Needs`` (which the loader registry routes by) and the protobuf and JSON forms.
Free of torch, so clients, workers and the planner can use it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from google.protobuf import json_format

from services.common.errors import FailedPrecondition
from services.loader.pb import loader_pb2 as pb
from services.loader.positions import Position

__all__ = [
    "CAPTURE_SEGMENTS",
    "REDUCTIONS",
    "RPCS",
    "STEERING_MODES",
    "EngineCapabilities",
    "Needs",
    "Reduction",
    "capabilities_from_json",
    "capabilities_from_proto",
    "capabilities_to_json",
    "capabilities_to_proto",
]

Reduction = Literal["mean", "last", "none"]
REDUCTIONS: tuple[Reduction, ...] = ("mean", "last", "none")
# Position segments (``services.loader.positions``) and steering positions share these names.
CAPTURE_SEGMENTS = ("prompt", "response", "all")
RPCS = ("generate", "capture", "score", "next_token")
STEERING_MODES = ("add", "ablate")


class _Steering(Protocol):
    @property
    def mode(self) -> str: ...

    @property
    def positions(self) -> str: ...


def _every_capture() -> frozenset[tuple[str, str]]:
    return frozenset((s, r) for s in CAPTURE_SEGMENTS for r in REDUCTIONS)


def _known(kind: str, names: Iterable[str], allowed: Sequence[str]) -> None:
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {kind} {unknown}; known: {list(allowed)}")


@dataclass(frozen=True)
class Needs:
    """What a job asks of a loader's engine: the RPCs it calls, the (segment, reduction)
    pairs it captures and the (mode, positions) it steers with. ``a | b`` needs both."""

    rpcs: frozenset[str] = frozenset()
    captures: frozenset[tuple[str, str]] = frozenset()
    steering: frozenset[tuple[str, str]] = frozenset()

    def __post_init__(self) -> None:
        # Needs are built by code from validated params: an unknown name is a bug here.
        _known("rpcs", self.rpcs, RPCS)
        _known("capture segments", (s for s, _ in self.captures), CAPTURE_SEGMENTS)
        _known("reductions", (r for _, r in self.captures), REDUCTIONS)
        _known("steering modes", (m for m, _ in self.steering), STEERING_MODES)
        _known("steering positions", (p for _, p in self.steering), CAPTURE_SEGMENTS)

    @classmethod
    def of(
        cls,
        *rpcs: str,
        captures: Iterable[tuple[str, str]] = (),
        steering: Iterable[tuple[str, str]] = (),
    ) -> Needs:
        """``Needs.of("generate", steering=[("add", "all")])``; a capture implies its RPC."""
        caps = frozenset(captures)
        return cls(frozenset(rpcs) | ({"capture"} if caps else set()), caps, frozenset(steering))

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            self.rpcs | other.rpcs, self.captures | other.captures, self.steering | other.steering
        )

    def __str__(self) -> str:
        parts = sorted(self.rpcs - {"capture"} if self.captures else self.rpcs)
        parts += [f"capture {s}:{r}" for s, r in sorted(self.captures)]
        parts += [f"steer {m} at {p}" for m, p in sorted(self.steering)]
        return ", ".join(parts) or "nothing"


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine computes exactly (reported in ``Info`` and in the loader's registry
    entry; the registry routes jobs by it)."""

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

    def missing(self, needs: Needs) -> Needs:
        """The part of ``needs`` this engine does not compute (empty: it covers them)."""
        steers = self.steering_modes if self.supports_steering else frozenset()
        return Needs(
            needs.rpcs - self.rpcs,
            needs.captures - self.captures,
            frozenset(
                (m, p)
                for m, p in needs.steering
                if m not in steers or p not in self.steering_positions
            ),
        )

    def covers(self, needs: Needs) -> bool:
        """Whether this engine computes everything ``needs`` asks, exactly."""
        return self.missing(needs) == Needs()


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


def capabilities_to_json(caps: EngineCapabilities) -> dict[str, Any]:
    """The registry form: ``Info.capabilities`` as protobuf JSON, plus the engine's name."""
    doc = json_format.MessageToDict(capabilities_to_proto(caps), preserving_proto_field_name=True)
    return {"engine": caps.engine, **doc}


def capabilities_from_json(doc: dict[str, Any]) -> EngineCapabilities:
    """``capabilities_to_json`` read back; fields a newer loader adds are ignored.
    ``json_format.ParseError`` on a malformed document."""
    rest = {k: v for k, v in doc.items() if k != "engine"}
    message = json_format.ParseDict(rest, pb.EngineCapabilities(), ignore_unknown_fields=True)
    return capabilities_from_proto(str(doc.get("engine", "")), message)
