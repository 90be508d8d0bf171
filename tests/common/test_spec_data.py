"""What a spec names as data: built-in benchmarks by name, and which locations a cluster refuses."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.datafiles import is_loopback_endpoint
from services.common.errors import InvalidArgument
from services.common.spec import (
    BUILTIN_BENCHMARKS,
    check_portable,
    data_locations,
    parse_spec,
)
from services.extractor.datasets import benchmark_file, data_dir

BASE: dict[str, Any] = {
    "name": "t",
    "models": [{"name": "m", "source": "tiny:llama"}],
    "precisions": ["bf16"],
    "traits": ["pv/evil"],
}


def _spec(**over: Any) -> Any:
    return parse_spec({**BASE, **over})


def test_benchmarks_by_builtin_name() -> None:
    spec = _spec(
        benchmarks=[
            "mmlu_ab",
            {"name": "truthfulqa_ab", "limit": 5},
            {"name": "mmlu_small", "builtin": "mmlu_ab", "limit": 3, "seed": 2},
            {"name": "own", "format": "arc", "path": "/data/arc.jsonl"},
        ]
    )
    first, second, small, own = spec.benchmarks
    assert (first.name, first.builtin, first.format, first.path) == (
        "mmlu_ab",
        "mmlu_ab",
        "caa_ab",
        None,
    )
    assert (second.builtin, second.limit) == ("truthfulqa_ab", 5)
    assert (small.name, small.builtin, small.limit, small.seed) == ("mmlu_small", "mmlu_ab", 3, 2)
    assert (own.builtin, own.format, own.location) == (None, "arc", "/data/arc.jsonl")
    assert first.location == "builtin:mmlu_ab"
    # Every built-in resolves to a shipped file.
    for name, (_, rel) in BUILTIN_BENCHMARKS.items():
        assert benchmark_file(_spec(benchmarks=[name]).benchmarks[0]) == data_dir() / rel
        assert (data_dir() / rel).is_file()


@pytest.mark.parametrize(
    ("benchmarks", "field", "message"),
    [
        (["hellaswag"], "benchmarks[0].name", "unknown built-in benchmark 'hellaswag'"),
        (
            [{"name": "x", "builtin": "arc"}],
            "benchmarks[0].builtin",
            "built-in: mmlu_ab, truthfulqa_ab",
        ),
        ([{"name": "x", "path": "/a.json"}], "benchmarks[0].format", "required with a path"),
        (
            [{"name": "x", "builtin": "mmlu_ab", "format": "caa_ab", "path": "/a.json"}],
            "benchmarks[0].builtin",
            "either a built-in or a path",
        ),
        ([{"name": "mmlu_ab", "format": "mmlu"}], "benchmarks[0].format", "is caa_ab, not mmlu"),
        (["mmlu_ab", {"name": "mmlu_ab", "limit": 2}], "benchmarks", "names must be unique"),
        ([{"name": "a/b", "path": "/a", "format": "arc"}], "benchmarks[0].name", "letters, digits"),
        ([{"name": "x", "wat": 1}], "benchmarks[0].wat", "unknown key"),
    ],
)
def test_benchmark_errors_name_the_key(benchmarks: list[Any], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _spec(benchmarks=benchmarks)
    assert err.value.field == field
    assert message in err.value.message


def test_unknown_builtin_lists_every_builtin() -> None:
    with pytest.raises(InvalidArgument) as err:
        _spec(benchmarks=["nope"])
    for name in BUILTIN_BENCHMARKS:
        assert name in err.value.message


def test_check_portable_refuses_local_paths_by_field() -> None:
    portable = _spec(
        traits=["pv/evil", "caa/refusal", "caa:s3://qsens/data/0123456789abcdef/sycophancy"],
        benchmarks=["mmlu_ab", {"name": "arc", "format": "arc", "path": "s3://b-1/arc.jsonl"}],
        probes={"harmful": "arditi/refusal-full"},
    )
    check_portable(portable)  # built-ins and s3:// keys only
    assert data_locations(portable) == [
        ("traits[2].ref", "s3://qsens/data/0123456789abcdef/sycophancy"),
        ("benchmarks[1].path", "s3://b-1/arc.jsonl"),
    ]
    cases = [
        ({"traits": ["pv/evil", "pv:/home/me/mean.json"]}, "traits[1].ref", "/home/me/mean.json"),
        ({"probes": {"harmful": "arditi:data/arditi"}}, "probes.harmful", "data/arditi"),
        (
            {"benchmarks": [{"name": "m", "format": "caa_ab", "path": "../m.json"}]},
            "benchmarks[0].path",
            "../m.json",
        ),
    ]
    for over, field, location in cases:
        with pytest.raises(InvalidArgument) as err:
            check_portable(_spec(**over))
        assert err.value.field == field
        assert err.value.message == (
            f"{location} is a local path; on a cluster the path must be an s3:// key; "
            "upload it with `qsens data put FILE`"
        )


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("127.0.0.1:8333", True),
        ("localhost:9000", True),
        ("127.1.2.3:80", True),
        ("[::1]:8333", True),
        ("qsens-minio:9000", False),
        ("10.0.0.5:9000", False),
        ("s3.eu-west-1.amazonaws.com", False),
        ("[2001:db8::1]:443", False),
    ],
)
def test_loopback_endpoint(endpoint: str, loopback: bool) -> None:
    assert is_loopback_endpoint(endpoint) is loopback
