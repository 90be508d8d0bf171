"""Row seeds: a row's sampling seed depends only on the request seed and its index."""

from __future__ import annotations

__all__ = ["hash32", "row_seed"]

M32 = 0xFFFFFFFF


def hash32(x: int) -> int:
    """The 32-bit integer mixer the sampler also uses on tensors."""
    x &= M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & M32
    return x ^ (x >> 16)


def row_seed(request_seed: int, index: int) -> int:
    """Default seed of row ``index`` of a request seeded with ``request_seed``."""
    folded = (request_seed ^ (request_seed >> 32)) & M32
    return hash32(hash32(folded) ^ (index & M32) ^ 0x5BD1E995)
