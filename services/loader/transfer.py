"""Host <-> device copies for the engine's small per-call tensors and capture results, and
the test for an out-of-memory error (the engine halves the batch; capture graphs re-raise it).

On a GPU a copy from pageable host memory blocks the host and goes through a bounce buffer;
on the lent H200 an 88 MB capture result took 65 ms pageable and 1.8 ms page-locked
(``bench/capture_profile.py``). Both directions go through PyTorch's caching host
allocator, which keeps page-locked blocks for reuse and records the copy's stream, so a
block is never handed out again while a copy from it is in flight.
"""

from __future__ import annotations

import torch

__all__ = ["is_oom", "to_device", "to_host"]


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device``: asynchronous through page-locked memory on a GPU."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_host(result: torch.Tensor, *, pinned: bool = True) -> torch.Tensor:
    """``result`` as float32 on the host (converted on the device: one kernel)."""
    result = result.float()
    if result.device.type != "cuda" or not pinned:
        return result.cpu()
    host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
    host.copy_(result, non_blocking=True)
    torch.cuda.current_stream(result.device).synchronize()
    return host


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is the accelerator (or host) running out of memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
