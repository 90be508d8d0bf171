"""What every steerer job shares: the heartbeat hook, call counting and the loader record."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from services.common.contracts.steer_results import CallCounts
from services.loader.client import LoaderInfo

__all__ = ["Heartbeat", "add_calls", "loader_record", "no_calls", "no_heartbeat"]

Heartbeat = Callable[[], Awaitable[None]]


async def no_heartbeat() -> None:
    """The heartbeat of a job run outside the queue."""
    return None


def no_calls() -> CallCounts:
    """Zero calls."""
    return CallCounts(loader_calls=0, loader_rows=0, judge_calls=0, judge_items=0)


def add_calls(a: CallCounts, b: CallCounts) -> CallCounts:
    """Field-wise sum of two call counts."""
    return CallCounts(
        loader_calls=a.loader_calls + b.loader_calls,
        loader_rows=a.loader_rows + b.loader_rows,
        judge_calls=a.judge_calls + b.judge_calls,
        judge_items=a.judge_items + b.judge_items,
    )


def loader_record(info: LoaderInfo) -> dict[str, Any]:
    """What a result records about the loader that computed it."""
    return {
        "variant": info.variant,
        "backend": info.backend,
        "precision": info.precision,
        "dtype": info.dtype,
        "device": info.device,
        "num_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "source": info.source,
        "notes": list(info.notes),
    }
