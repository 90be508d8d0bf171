"""Run the golden study (``tests/analyzer/golden/spec.yaml``) on a real local stack and reduce
its outputs to what must not change across a refactor (issue 14, "Behaviour does not change").

What is compared:

* **keys** — every S3 key the run wrote under ``runs/<run>/``, with the run id replaced by
  ``<run>`` (so the same artefacts exist, under the same names);
* **documents** — the analyzer's six JSON documents, flattened to ``path -> leaf``; numbers are
  compared to float tolerance, everything else exactly. Two kinds of leaf are kept apart:
  *intervals* (``low``/``high``/``ci`` of an estimate, whose bootstrap seed scheme issue 15
  item 7 changes once: seeded from content rather than the run) and *volatile* leaves that
  differ between identical runs by nature (none today; listed in ``VOLATILE``).

Recording (``QSENS_GOLDEN_RECORD=1`` on ``tests/analyzer/test_golden.py``) writes
``documents.json`` and ``keys.json`` next to the spec; the test then compares against them.

**Machine classes.** The same code on another CPU can round differently: float32 matmuls
block their sums by the CPU's vector width, and bitsandbytes picks CPU kernels by its
instruction set; about 1e-6 relative in the logits, more in statistics derived from small
differences. So a run must equal, as a whole, one of the recorded runs: ``documents.json``
(the first recording's machine) or ``documents.<label>.json`` for another machine class,
recorded with ``QSENS_GOLDEN_RECORD=<label>`` there (and named in the commit). Every
recording has the same keys.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from services.analyzer.handler import DOCUMENTS
from services.common import settings
from services.common.artefacts import analysis_key
from services.common.spec import load_spec
from services.common.store import S3Store
from tests.loader_procs import REPO, LoaderProc, start_loader

GOLDEN = Path(__file__).resolve().parent / "golden"
SPEC = GOLDEN / "spec.yaml"
RUN_ID = "golden-run"
PRECISIONS = ("fp32", "nf4")
# Float tolerance: the same computation in a different module order can round differently.
REL_TOL, ABS_TOL = 1e-6, 1e-9
INTERVAL_KEYS = frozenset({"low", "high", "ci"})
# Leaves that differ between two identical runs by nature (dates, timings): none so far.
VOLATILE: frozenset[str] = frozenset()

Leaf = str | int | float | bool | None


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _spawn(log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", *args],
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


@contextmanager
def services_up(tmp: Path) -> Iterator[dict[str, LoaderProc]]:
    """Loaders (fp32, nf4), the embedding judge and one worker per service, as processes.

    NATS and S3 come from the caller's environment (the ``plane_env`` fixture).
    """
    extra = ["--name", "tiny", "--announce"]
    loaders = {
        p: start_loader("tiny:llama", p, extra_args=extra, http=False, metrics=False)
        for p in PRECISIONS
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ready = tmp / "judge.json"
        judge_args = ["judge", "serve", "--backend", "embedding"]
        judge_args += ["--loader-address", loaders["fp32"].address, "--ready-file", str(ready)]
        procs.append(_spawn(tmp / "judge.log", *judge_args))
        for service in ("extractor", "steerer", "analyzer"):
            procs.append(_spawn(tmp / f"worker-{service}.log", "worker", "run", service))
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert procs[0].poll() is None, (tmp / "judge.log").read_text()
            assert time.monotonic() < deadline, "judge service not ready"
            time.sleep(0.2)
        yield loaders
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        for loader in loaders.values():
            loader.stop()


def run_study(tmp: Path) -> subprocess.CompletedProcess[str]:
    """``qsens run`` the golden spec under ``RUN_ID`` and wait for it to finish."""
    with services_up(tmp):
        return _cli("run", str(SPEC), "--run-id", RUN_ID, timeout=900)


def _scrub(value: Any) -> Any:
    """``value`` with the run id replaced by ``<run>`` in every string (keys included)."""
    if isinstance(value, Mapping):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, str):
        return value.replace(RUN_ID, "<run>")
    return value


def collect() -> tuple[dict[str, Any], list[str]]:
    """The run's six analysis documents and its sorted artefact keys, run id scrubbed."""
    settings.reset()
    store = S3Store()
    keys = sorted(_scrub(k) for k in store.list_keys(f"runs/{RUN_ID}/"))
    docs = {
        name: _scrub(json.loads(store.get_bytes(analysis_key(RUN_ID, name)))) for name in DOCUMENTS
    }
    return docs, keys


def flatten(value: Any, prefix: str = "") -> dict[str, Leaf]:
    """``{"a/0/b": leaf}`` for every leaf of a JSON value (empty containers are leaves too)."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Leaf] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}/{i}"))
        return out
    if isinstance(value, Mapping | list):
        return {prefix: json.dumps(value)}
    return {prefix: value}


def is_interval(path: str) -> bool:
    """Whether a flattened path is a bound of a (bootstrap) interval."""
    parts = path.split("/")
    return any(p in INTERVAL_KEYS for p in parts[-2:])


def same_leaf(a: Leaf, b: Leaf) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return a == b


def differences(
    expected: Mapping[str, Leaf], actual: Mapping[str, Leaf], *, intervals: bool
) -> list[str]:
    """Human-readable differences between two flattened documents (a bounded list)."""
    out: list[str] = []
    for path in sorted(set(expected) | set(actual)):
        if path in VOLATILE or is_interval(path) is not intervals:
            continue
        if path not in actual:
            out.append(f"missing {path} (was {expected[path]!r})")
        elif path not in expected:
            out.append(f"new {path} = {actual[path]!r}")
        elif not same_leaf(expected[path], actual[path]):
            out.append(f"{path}: {expected[path]!r} -> {actual[path]!r}")
    return out


def spec_fingerprint() -> str:
    """The golden spec's fingerprint: with ``steering.seed`` it seeds every bootstrap, so a
    change of the spec's schema (a new field with a default) moves every interval."""
    return load_spec(SPEC).fingerprint()


def record(docs: Mapping[str, Any], keys: list[str], label: str = "1") -> None:
    """Write the fixture (documents.json or documents.<label>.json, keys.json, meta.json)."""
    name = "documents.json" if label == "1" else f"documents.{label}.json"
    (GOLDEN / name).write_text(json.dumps(docs, indent=1, sort_keys=True) + "\n")
    (GOLDEN / "keys.json").write_text(json.dumps(keys, indent=1) + "\n")
    meta = {"spec_fingerprint": spec_fingerprint()}
    (GOLDEN / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def recorded_fingerprint() -> str:
    """The spec fingerprint the fixture's intervals were recorded under."""
    return str(json.loads((GOLDEN / "meta.json").read_text())["spec_fingerprint"])


def load_fixture() -> tuple[dict[str, Any], list[str]]:
    """The first recording's documents and the keys."""
    docs = json.loads((GOLDEN / "documents.json").read_text())
    keys = json.loads((GOLDEN / "keys.json").read_text())
    return docs, keys


def load_recordings() -> dict[str, dict[str, Any]]:
    """Every recording's documents by file name (``documents.json`` first)."""
    files = [GOLDEN / "documents.json", *sorted(GOLDEN.glob("documents.*.json"))]
    return {f.name: json.loads(f.read_text()) for f in files}


def closest_recording(docs: Mapping[str, Any], *, intervals: bool) -> tuple[str, list[str]]:
    """The recording ``docs`` equal (no differences), else the one with the fewest, and those
    differences: values, then bootstrap intervals where ``intervals``. Every recording must
    hold the same documents as ``docs``."""
    found: dict[str, list[str]] = {}
    for recording, want_docs in load_recordings().items():
        if sorted(docs) != sorted(want_docs):
            raise AssertionError(f"documents differ from {recording}: {sorted(docs)}")
        diff: list[str] = []
        for name in want_docs:
            want, got = flatten(want_docs[name]), flatten(docs[name])
            diff += [f"{name}: {d}" for d in differences(want, got, intervals=False)]
        for name in want_docs if intervals else ():
            want, got = flatten(want_docs[name]), flatten(docs[name])
            if bootstrap := differences(want, got, intervals=True):
                was, now = recorded_fingerprint(), spec_fingerprint()
                why = (
                    f"the spec's fingerprint changed ({was} -> {now}), which re-seeds every "
                    "bootstrap: re-record"
                    if was != now
                    else "same spec fingerprint: a real change, or this recording's machine "
                    "class differs"
                )
                diff += [f"{name}: bootstrap intervals differ ({why}): {d}" for d in bootstrap]
        if not diff:
            return recording, []
        found[recording] = diff
    closest = min(found, key=lambda name: len(found[name]))
    return closest, found[closest]
