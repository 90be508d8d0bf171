"""Resolve what a spec names to data: a trait reference to a :class:`TraitDataset`, a benchmark
to its file. Built-ins are package data (so every worker image holds them); anything else is a
local path (a laptop) or an ``s3://`` location (a cluster), downloaded through a local cache.

Built-in traits written for qsens (``builtin/``, small enough for a 135M model on CPU):
``pv/evil``, ``pv/sycophancy``, ``pv/hallucination``, ``caa/sycophancy``, ``arditi/refusal``.
Built-in traits from published data (``published/``, with each source's provenance and
licence; the extras that the published formats lack were written for qsens and live in
``builtin/``): ``caa/sycophancy-full``, ``caa/refusal``, ``arditi/refusal-full``. Other data:
``pv:/data/evil.json``, ``caa:/data/caa/sycophancy``, ``arditi:s3://bucket/data/<digest>/arditi``.
Files are read on first use, never at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path

from services.common.datafiles import is_s3, resolve_location
from services.common.errors import InvalidArgument
from services.common.spec import BUILTIN_BENCHMARKS, BenchmarkSpec
from services.extractor.datasets.readers import read_arditi, read_caa, read_pv
from services.extractor.datasets.schema import METHODOLOGIES, TraitDataset

__all__ = [
    "BUILTIN_TRAITS",
    "benchmark_file",
    "builtin_dir",
    "data_dir",
    "load_trait",
    "published_dir",
]

#: Built-in trait name -> its data, below the package folder (``data_dir()``).
BUILTIN_TRAITS: dict[str, str] = {
    "pv/evil": "builtin/pv/evil.json",
    "pv/sycophancy": "builtin/pv/sycophancy.json",
    "pv/hallucination": "builtin/pv/hallucination.json",
    "caa/sycophancy": "builtin/caa/sycophancy",
    "arditi/refusal": "builtin/arditi/refusal",
    "caa/sycophancy-full": "published/caa/sycophancy",
    "caa/refusal": "published/caa/refusal",
    "arditi/refusal-full": "published/arditi",
}

#: The qsens-written extras of built-ins whose data is published (kept out of ``published/``,
#: which holds only the copied files, their provenance and licence).
_BUILTIN_EXTRAS: dict[str, str] = {
    "caa/sycophancy-full": "builtin/caa/sycophancy-full.extras.json",
    "caa/refusal": "builtin/caa/refusal.extras.json",
    "arditi/refusal-full": "builtin/arditi/refusal-full.extras.json",
}

_READERS: dict[str, Callable[..., TraitDataset]] = {
    "pv": read_pv,
    "caa": read_caa,
    "arditi": read_arditi,
}


def data_dir() -> Path:
    """The package folder holding ``builtin/`` and ``published/`` (package data)."""
    return Path(str(resources.files("services.extractor.datasets")))


def builtin_dir() -> Path:
    """The datasets written for qsens."""
    return data_dir() / "builtin"


def published_dir() -> Path:
    """The published datasets copied into qsens, one folder per source."""
    return data_dir() / "published"


@cache
def _load_builtin(name: str) -> TraitDataset:
    methodology = name.split("/", 1)[0]
    extras = _BUILTIN_EXTRAS.get(name)
    return _READERS[methodology](
        data_dir() / BUILTIN_TRAITS[name],
        name=name,
        extras=data_dir() / extras if extras else None,
    )


def load_trait(ref: str) -> TraitDataset:
    """Load a built-in trait by name, or data as ``<pv|caa|arditi>:<path or s3:// URI>``."""
    ref = ref.strip()
    if ref in BUILTIN_TRAITS:
        return _load_builtin(ref)
    methodology, sep, location = ref.partition(":")
    if sep and methodology in _READERS:
        if not location:
            raise InvalidArgument("trait", f"{ref!r} names no path after '{methodology}:'")
        origin = ref if is_s3(location) else None
        return _READERS[methodology](resolve_location(location, "trait"), origin=origin)
    raise InvalidArgument(
        "trait",
        f"unknown trait {ref!r}; built-in: {', '.join(BUILTIN_TRAITS)}; or data as "
        + ", ".join(f"'{m}:<path>'" for m in METHODOLOGIES)
        + " (a path may be s3://bucket/key)",
    )


def benchmark_file(spec: BenchmarkSpec, field: str = "benchmark.path") -> Path:
    """The local file of a benchmark: a built-in's package file, a downloaded ``s3://`` object
    or a local path. InvalidArgument (naming ``field``) when it is not a readable file."""
    if spec.path is None:
        builtin = BUILTIN_BENCHMARKS.get(spec.builtin or "")
        if builtin is None:
            raise InvalidArgument(
                field.rsplit(".", 1)[0] + ".builtin",
                f"unknown built-in benchmark {spec.builtin!r}; built-in: "
                + ", ".join(BUILTIN_BENCHMARKS),
            )
        path = data_dir() / builtin[1]
    else:
        path = resolve_location(spec.path, field)
    if not path.is_file():
        raise InvalidArgument(field, f"{spec.location} is not a readable file")
    return path
