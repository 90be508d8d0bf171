"""Seeded spec fuzz: thousands of mutated specs through ``qsens plan``'s validation.

Every case goes the way ``qsens plan --local`` goes (bytes -> ``spec_from_bytes`` -> preflight
-> ``build_plan``, which refuses colliding result keys) and must end in a plan or a named
error (a ``QsensError``): no other exception, and no case slower than ``CASE_LIMIT_S``.
Mutations are structural (a value replaced by a hostile one, a key dropped or added, a list
entry repeated, deep nesting) and textual (bytes flipped, truncation, other encodings,
duplicate keys, anchors). The seed is fixed, so a failure names a case that reproduces.
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal
import time
from typing import Any

import yaml

from services.cli.runs import preflight
from services.common.errors import QsensError
from services.common.planner import build_plan
from services.common.spec import spec_from_bytes

# libyaml's emitter when present: the Python one would take half the test's time.
_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

SEED = 15
CASES = 3000
CASE_LIMIT_S = 5.0  # a case over this is a hang: SIGALRM interrupts it
TOTAL_LIMIT_S = 120.0  # about 25 s on 2 shared cores; the bound only stops a runaway

SEEDS: list[dict[str, Any]] = [
    {
        "name": "fuzz",
        "models": [{"name": "m", "source": "tiny:llama?layers=6"}],
        "precisions": ["bf16", "nf4"],
        "traits": ["pv/evil", "caa/sycophancy", "arditi/refusal"],
        "layers": [0, 2, -1],
        "steering": {"layers": [1, 3], "directions": ["+", "-"], "search": {"steps": 2}},
        "logit_diff": {"coefficients": [-1.0, 0.0, 1.0]},
        "benchmarks": ["mmlu_ab", {"name": "small", "builtin": "truthfulqa_ab", "limit": 3}],
    },
    {
        "name": "two",
        "models": [
            {"name": "a", "source": "tiny:llama", "family": "llama", "size_b": 0.1},
            {"name": "b", "source": "smollm2-135m", "precisions": ["bf16", "int8"]},
        ],
        "precisions": ["bf16"],
        "traits": [{"ref": "pv/evil", "name": "pv/mean", "position": "response[:4]"}],
        "methods": ["mean_diff", "probe", "pca"],
        "extraction": {"n_val": 2, "rollouts": 2, "vetting": {"min_keep": 2}},
        "probes": {"limit": 4},
        "analysis": {"layer_range": [0.1, 0.9]},
    },
]

HOSTILE: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**64,
    -(2**70),
    1.5,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "..",
    "a/b",
    "a/b/c",
    "pv/../evil",
    "x" * 300,
    "\u00e9\u4e2d\U0001f600",
    "\x07bell",
    "response[:0]",
    "response[:999999]",
    "tiny:llama?layers=100000&hidden=1000000",
    "tiny:llama?heads=0",
    "tiny:llama?bogus=1",
    "tiny:gpt",
    "pv:/nonexistent/file.json",
    "s3://bucket/key",
    "bf16",
    "gptq",
    [],
    {},
    [1, 1],
    [True],
    [-99, -1],
    ["bf16", "bf16"],
    {"unknown": 1},
    [[[[]]]],
]


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(_paths(v, (*path, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_paths(v, (*path, i)))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _mutate_tree(rng: random.Random, doc: dict[str, Any]) -> Any:
    for _ in range(rng.randint(1, 3)):
        paths = _paths(doc)
        path = rng.choice(paths)
        target = _get(doc, path)
        op = rng.randrange(6)
        if op == 0:
            doc = _set(doc, path, copy.deepcopy(rng.choice(HOSTILE)))
        elif op == 1 and path:
            parent = _get(doc, path[:-1])
            del parent[path[-1]]
        elif op == 2 and isinstance(target, dict):
            target[rng.choice(["wat", "seed", "name", "layers", "enabled"])] = rng.choice(HOSTILE)
        elif op == 3 and isinstance(target, list) and target:
            target.append(copy.deepcopy(rng.choice(target)))
        elif op == 4:
            nested: Any = target
            for _ in range(rng.choice([5, 70, 150])):
                nested = [nested]
            doc = _set(doc, path, nested)
        elif op == 5 and isinstance(target, str):
            doc = _set(doc, path, target + rng.choice(["..", "/x", " ", "\n", "\u0000", "\ufeff"]))
    return doc


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    op = rng.randrange(8)
    if op == 0 and data:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf)
    if op == 1:
        return data[: rng.randrange(len(data) + 1)]
    if op == 2:
        return data.decode("utf-8", "replace").encode(
            rng.choice(["utf-16", "utf-32", "latin-1"]), "replace"
        )
    if op == 3:
        line = rng.choice([b"name: again\n", b"steering: {seed: 1}\n", b"precisions: [bf16]\n"])
        return data + b"\n" + line + line
    if op == 4:
        depth = rng.choice([100, 5_000, 50_000])
        return data + b"\nx: " + b"[" * depth + b"]" * depth
    if op == 5:
        bomb = b'\nb0: &a0 ["lol", "lol", "lol", "lol"]\n'
        for i in range(1, 10):
            bomb += f"b{i}: &a{i} [".encode() + b", ".join([f"*a{i - 1}".encode()] * 6) + b"]\n"
        return data + bomb
    if op == 6:
        pos = rng.randrange(len(data) + 1)
        return (
            data[:pos] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[pos:]
        )
    return rng.choice(
        [b"", b"[]", b"null", b"- a\n- b\n", b"!!python/object:os.system x", b"\xff" * 9]
    )


def _case(rng: random.Random) -> bytes:
    doc = copy.deepcopy(rng.choice(SEEDS))
    if rng.random() < 0.8:
        doc = _mutate_tree(rng, doc)
    try:
        text = (
            yaml.dump(doc, Dumper=_DUMPER, allow_unicode=True)
            if rng.random() < 0.7
            else json.dumps(doc, allow_nan=True)
        )
    except (yaml.YAMLError, RecursionError, ValueError, TypeError):
        text = "unrepresentable: true\n"
    data = text.encode("utf-8", "surrogatepass")
    return _mutate_bytes(rng, data) if rng.random() < 0.4 else data


def _plan(data: bytes) -> str:
    """What `qsens plan --local` does with the bytes; the outcome's kind."""
    spec = spec_from_bytes(data, "fuzz.yaml")
    preflight(spec, cluster=False)
    plan = build_plan(spec, "fuzz-run")
    assert plan.jobs
    return "plan"


class _Hung(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hung(f"case still running after {CASE_LIMIT_S} s")


def test_mutated_specs_end_in_a_plan_or_a_named_error() -> None:
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        _fuzz()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _fuzz() -> None:
    rng = random.Random(SEED)
    outcomes: dict[str, int] = {}
    failures: list[str] = []
    start = time.monotonic()
    slowest = 0.0
    for i in range(CASES):
        data = _case(rng)
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
        try:
            outcome = _plan(data)
        except QsensError as err:
            outcome = type(err).__name__
        except Exception as err:  # the finding: anything not named
            failures.append(f"case {i}: {type(err).__name__}: {str(err)[:200]} <- {data[:200]!r}")
            outcome = "crash"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.monotonic() - t0
        slowest = max(slowest, elapsed)
        if elapsed > CASE_LIMIT_S:
            failures.append(f"case {i}: took {elapsed:.1f} s <- {data[:200]!r}")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert time.monotonic() - start < TOTAL_LIMIT_S, f"fuzz over {TOTAL_LIMIT_S} s at case {i}"
    assert not failures, "\n".join(failures[:20])
    # The mutations reach both sides: valid plans and refusals.
    assert outcomes.get("plan", 0) > CASES // 20, outcomes
    assert outcomes.get("InvalidArgument", 0) > CASES // 2, outcomes
    print(f"spec fuzz: {outcomes}, slowest case {slowest:.2f} s")
