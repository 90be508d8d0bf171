"""Data readers run off the workers' event loops: a trait or benchmark named by an ``s3://`` key
is downloaded by its reader, and a worker's loop keeps serving its other jobs and NATS meanwhile.

A static check over the worker packages: no ``async def`` calls a reader directly (only through
``asyncio.to_thread``). A sync helper that calls a reader is itself a reader, so it is listed.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKERS = ("extractor", "steerer", "analyzer", "judge", "quantizer")
#: Functions that may read files or download from S3.
READERS = frozenset(
    {
        "load_trait",
        "read_pv",
        "read_caa",
        "read_arditi",
        "read_extras",
        "benchmark_file",
        "read_benchmark",
        "resolve_location",
        "local_copy",
        "put_data",
        "load_calibration",
    }
)


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _direct_calls(fn: ast.AsyncFunctionDef) -> list[ast.Call]:
    """Calls in ``fn``'s own body (not in functions or lambdas defined inside it)."""
    out: list[ast.Call] = []
    todo: list[ast.AST] = list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Call):
            out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def blocking_reads(source: str, filename: str) -> list[str]:
    """``file:line: async f calls reader()`` for each reader an async function calls directly."""
    hits = []
    for fn in ast.walk(ast.parse(source, filename)):
        if not isinstance(fn, ast.AsyncFunctionDef):
            continue
        for call in _direct_calls(fn):
            name = _called_name(call)
            if name in READERS:
                hits.append(
                    (call.lineno, f"{filename}:{call.lineno}: async {fn.name} calls {name}()")
                )
    return [text for _, text in sorted(hits)]


def test_no_worker_reads_data_on_its_event_loop() -> None:
    hits = []
    files = [p for w in WORKERS for p in sorted((REPO / "services" / w).rglob("*.py"))]
    assert any(p.name == "pipeline.py" for p in files)
    for path in files:
        hits += blocking_reads(path.read_text(), str(path.relative_to(REPO)))
    assert not hits, "readers called on an event loop (use asyncio.to_thread):\n" + "\n".join(hits)


def test_the_check_finds_a_blocking_read() -> None:
    blocking = """
async def run(params, store):
    dataset = load_trait(params.ref)
    items = registry.read_benchmark(spec)
    return dataset, items
"""
    assert blocking_reads(blocking, "x.py") == [
        "x.py:3: async run calls load_trait()",
        "x.py:4: async run calls read_benchmark()",
    ]
    off_the_loop = """
async def run(params):
    dataset = await asyncio.to_thread(load_trait, params.ref)
    def helper():
        return load_trait(params.ref)
    return dataset, await asyncio.to_thread(helper)
"""
    assert blocking_reads(off_the_loop, "x.py") == []
