"""Resolve a trait reference to a :class:`TraitDataset`: a built-in name or ``<methodology>:<path>``.

Built-ins (``services/extractor/datasets/builtin/``, written for qsens, small enough for a 135M
model on CPU): ``pv/evil``, ``pv/sycophancy``, ``pv/hallucination``, ``caa/sycophancy``,
``arditi/refusal``. Local data: ``pv:/data/evil.json``, ``caa:/data/caa/sycophancy``,
``arditi:/data/arditi``. Files are read on first use, never at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path

from services.common.errors import InvalidArgument
from services.extractor.datasets.readers import read_arditi, read_caa, read_pv
from services.extractor.datasets.schema import METHODOLOGIES, TraitDataset

__all__ = ["BUILTIN_TRAITS", "builtin_dir", "load_trait"]

#: Built-in trait name -> path of its data below ``builtin/``.
BUILTIN_TRAITS: dict[str, str] = {
    "pv/evil": "pv/evil.json",
    "pv/sycophancy": "pv/sycophancy.json",
    "pv/hallucination": "pv/hallucination.json",
    "caa/sycophancy": "caa/sycophancy",
    "arditi/refusal": "arditi/refusal",
}

_READERS: dict[str, Callable[..., TraitDataset]] = {
    "pv": read_pv,
    "caa": read_caa,
    "arditi": read_arditi,
}


def builtin_dir() -> Path:
    """The folder holding the built-in datasets (package data)."""
    return Path(str(resources.files("services.extractor.datasets").joinpath("builtin")))


@cache
def _load_builtin(name: str) -> TraitDataset:
    methodology = name.split("/", 1)[0]
    return _READERS[methodology](builtin_dir() / BUILTIN_TRAITS[name], name=name)


def load_trait(ref: str) -> TraitDataset:
    """Load a built-in trait by name, or local data as ``<pv|caa|arditi>:<path>``."""
    ref = ref.strip()
    if ref in BUILTIN_TRAITS:
        return _load_builtin(ref)
    methodology, sep, location = ref.partition(":")
    if sep and methodology in _READERS:
        if not location:
            raise InvalidArgument("trait", f"{ref!r} names no path after '{methodology}:'")
        return _READERS[methodology](Path(location).expanduser())
    raise InvalidArgument(
        "trait",
        f"unknown trait {ref!r}; built-in: {', '.join(BUILTIN_TRAITS)}; or local data as "
        + ", ".join(f"'{m}:<path>'" for m in METHODOLOGIES),
    )
