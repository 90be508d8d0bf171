"""What a spec names as data: built-in benchmarks by name, and which locations a cluster refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.common.datafiles import is_loopback_endpoint
from services.common.errors import InvalidArgument
from services.common.spec import (
    BUILTIN_BENCHMARKS,
    check_portable,
    data_locations,
    model_locations,
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
        (["mmlu_ab", {"name": "mmlu_ab", "limit": 2}], "benchmarks[1].name", "must be unique"),
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


def _model_message(location: str, wanted: str) -> str:
    return (
        f"{location} is a local path; on a cluster the loaders cannot read this machine's "
        f"files, so name {wanted}"
    )


_MODEL_WANTED = (
    "a hub id (org/name), an s3:// folder (`qsens models put FOLDER` uploads one) "
    "or a built-in model (smollm2-135m, tiny:...)"
)
_CHECKPOINT_WANTED = (
    "a published checkpoint's hub id (org/name) or s3:// folder (`qsens models put "
    "FOLDER`), or none to let the platform quantize"
)


@pytest.mark.parametrize(
    "source",
    [
        "smollm2-135m",
        "SmolLM2",
        "tiny:llama?layers=2&hidden=32",
        "meta-llama/Llama-3.1-8B-Instruct",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "s3://qsens/models/llama",
    ],
)
def test_check_portable_takes_models_a_cluster_can_load(source: str) -> None:
    spec = _spec(models=[{"name": "m", "source": source}])
    assert model_locations(spec) == []
    check_portable(spec)


@pytest.mark.parametrize(
    "source",
    [
        "/models/llama",
        "./llama",
        "../llama",
        "~/models/llama",
        "llama-local",  # no owner: not a hub id, so a folder here
        "models/llama/v2",
        "gguf:/models/llama.gguf",
        "SmolLM2-135M.Q4_1.gguf",
    ],
)
def test_check_portable_refuses_local_model_sources(source: str) -> None:
    spec = _spec(models=[{"name": "ref", "source": "tiny:llama"}, {"name": "m", "source": source}])
    assert model_locations(spec) == [("models[1].source", source)]
    with pytest.raises(InvalidArgument) as err:
        check_portable(spec)
    assert err.value.field == "models[1].source"
    assert err.value.message == _model_message(source, _MODEL_WANTED)


def test_a_folder_here_named_like_a_hub_id_is_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loader on this machine would load the folder, a cluster's loader the hub model.
    monkeypatch.chdir(tmp_path)
    spec = _spec(models=[{"name": "m", "source": "acme/llama"}])
    check_portable(spec)
    (tmp_path / "acme" / "llama").mkdir(parents=True)
    with pytest.raises(InvalidArgument) as err:
        check_portable(spec)
    assert err.value.field == "models[0].source"


def test_check_portable_refuses_local_checkpoints() -> None:
    published = {"name": "m", "source": "tiny:llama", "checkpoints": {"awq": "acme/llama-awq"}}
    spec = _spec(precisions=["bf16", "awq"], models=[published])
    check_portable(spec)
    local = {**published, "checkpoints": {"awq": "acme/llama-awq", "gptq": "/ckpt/llama-gptq"}}
    spec = _spec(precisions=["bf16", "gptq", "awq"], models=[local])
    assert model_locations(spec) == [("models[0].checkpoints.gptq", "/ckpt/llama-gptq")]
    with pytest.raises(InvalidArgument) as err:
        check_portable(spec)
    assert err.value.field == "models[0].checkpoints.gptq"
    assert err.value.message == _model_message("/ckpt/llama-gptq", _CHECKPOINT_WANTED)


def test_check_portable_refuses_a_local_calibration_set_it_would_use() -> None:
    local = {"calibration": {"source": "/data/calib.jsonl"}}
    model = {"name": "m", "source": "tiny:llama"}
    # No platform quantization (no gptq/awq, or a published checkpoint): the set is unused.
    check_portable(_spec(quantize=local))
    published = {**model, "checkpoints": {"gptq": "acme/llama-gptq"}}
    check_portable(_spec(precisions=["bf16", "gptq"], models=[published], quantize=local))
    for source in ("builtin", "s3://qsens/data/0123456789abcdef/calib.jsonl"):
        check_portable(
            _spec(precisions=["bf16", "gptq"], quantize={"calibration": {"source": source}})
        )
    cases = [
        ({"quantize": local}, "quantize.calibration.source"),
        ({"models": [{**model, "quantize": local}]}, "models[0].quantize.calibration.source"),
    ]
    for over, field in cases:
        spec = _spec(precisions=["bf16", "gptq", "awq"], **over)
        assert data_locations(spec) == [(field, "/data/calib.jsonl")]  # once for both methods
        with pytest.raises(InvalidArgument) as err:
            check_portable(spec)
        assert err.value.field == field
        assert err.value.message == (
            "/data/calib.jsonl is a local path; on a cluster the path must be an s3:// key; "
            "upload it with `qsens data put FILE`"
        )
