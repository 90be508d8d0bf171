"""The qsens exception hierarchy; every service raises these and maps them to transport codes.

QsensError                      base of everything qsens raises on purpose
├── InvalidArgument             bad input; the message starts with the offending field path
├── FailedPrecondition          valid input that does not fit the current state (wrong variant,
│                               methodology not applicable to the model)
├── NotFound                    a named thing (run, artefact, trait, loader) does not exist
├── Unavailable                 a dependency is missing or draining; retry later
├── ResourceExhausted           out of memory or over a limit that may pass
└── Unauthenticated             a call without the right credentials (the loader's token)
"""

from __future__ import annotations

__all__ = [
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "QsensError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]


class QsensError(Exception):
    """Base class of every error qsens raises deliberately."""


class InvalidArgument(QsensError):
    """Bad input. ``field`` is a dotted/indexed path such as ``items[3].steering[0].vector``."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class FailedPrecondition(QsensError):
    """Input is well formed but cannot be applied in the current state."""


class NotFound(QsensError):
    """A named object does not exist."""


class Unavailable(QsensError):
    """A dependency is missing, starting or draining; the caller may retry later."""


class ResourceExhausted(QsensError):
    """Out of memory or over a transient limit."""


class Unauthenticated(QsensError):
    """A call without valid credentials (e.g. a missing or wrong loader token)."""
