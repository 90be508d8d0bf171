"""Specs that can only fail later are refused by ``qsens plan``, each with a named error.

Issue 15 items 5, 9 and 10: colliding result keys, deep or badly encoded input, and values the
workers would reject after the run was submitted (out-of-range layers, empty positions, trait
names that are not key parts, non-finite numbers, duplicates, oversized tiny models, duplicate
YAML keys, ``true`` as a number).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.common.jobs import Job, JobKind
from services.common.planner import build_plan
from services.common.resultkeys import check_result_keys
from services.common.spec import MAX_SPEC_BYTES, load_spec, spec_from_bytes
from services.extractor.datasets import load_trait
from services.loader.tiny import TINY_MAX_PARAMETERS, parse_tiny, tiny_parameters

REPO = Path(__file__).resolve().parents[2]

BASE = """name: t
models: [{name: m, source: "tiny:llama"}]
precisions: [bf16, nf4]
traits: [pv/evil]
"""


def _refused(text: str | bytes) -> InvalidArgument:
    data = text.encode() if isinstance(text, str) else text
    with pytest.raises(InvalidArgument) as err:
        spec_from_bytes(data, "spec.yaml")
    return err.value


def test_the_base_spec_plans() -> None:
    spec = spec_from_bytes(BASE.encode())
    assert len(build_plan(spec, "r1").jobs) > 3


@pytest.mark.parametrize(
    ("extra", "field", "message"),
    [
        ("layers: [-1, -99]\n", "layers[1]", "layer -99 is out of range for model m, which has 4"),
        ("layers: [-1, 3]\n", "layers[1]", "layer 3 is layer -1 again"),
        ("steering: {layers: [4]}\n", "steering.layers[0]", "out of range"),
        ("layers: [1, true]\n", "layers[1]", "expected a number, got true"),
        ("steering: {seed: true}\n", "steering.seed", "expected a number, got true"),
        ("extraction: {rollouts: false}\n", "extraction.rollouts", "expected a number"),
        ("quantize: {calibration: {samples: true}}\n", "quantize.calibration.samples", "number"),
        ("logit_diff: {coefficients: [.nan]}\n", "logit_diff.coefficients[0]", "finite"),
        ("logit_diff: {coefficients: [1, 2, 1.0]}\n", "logit_diff.coefficients", "listed twice"),
        ("steering: {search: {init_fraction: .inf}}\n", "steering.search.init_fraction", "finite"),
        ("steering: {search: {scale_up: -.inf}}\n", "steering.search.scale_up", "finite"),
        ("steering: {methods: [mean_diff, mean_diff]}\n", "steering.methods", "listed twice"),
        ("steering: {directions: ['+', '+']}\n", "steering.directions", "listed twice"),
        ("steering: {seed: -1}\n", "steering.seed", "greater than or equal to 0"),
        ("steering: {search: {budget_runs: 1000000000}}\n", "steering.search.budget_runs", ""),
        ("steering: {seed: 1}\nsteering: {seed: 2}\n", "steering", "duplicate key (lines 5 and 6)"),
        ("steering:\n  seed: 1\n  seed: 2\n", "steering.seed", "duplicate key (lines 6 and 7)"),
        (
            "benchmarks: [{name: a..b, path: /x.json, format: arc}]\n",
            "benchmarks[0].name",
            "no '..'",
        ),
    ],
)
def test_values_that_fail_later_are_refused_naming_the_field(
    extra: str, field: str, message: str
) -> None:
    err = _refused(BASE + extra)
    assert err.field == field
    assert message in err.message


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        ("[bf16, nf4]", "[bf16, nf4, bf16]", "precisions", "bf16 is listed twice (items 0 and 2)"),
        (
            'source: "tiny:llama"',
            "source: tiny:llama, precisions: [nf4, nf4]",
            "models[0].precisions",
            "twice",
        ),
        ("[pv/evil]", "[{ref: pv/evil, position: 'response[:0]'}]", "traits[0].position", "k >= 1"),
        ("[pv/evil]", "[{ref: pv/evil, name: evil}]", "traits[0].name", "<methodology>/<name>"),
        ("[pv/evil]", "[{ref: pv/evil, name: pv/e..vil}]", "traits[0].name", "without '..'"),
        ("[pv/evil]", "[pv/evil/x]", "traits[0].ref", "<methodology>/<name>"),
        ("[pv/evil]", "[evil]", "traits[0].ref", "<methodology>/<name>"),
        (
            "tiny:llama",
            "tiny:llama?layers=100000&hidden=1000000",
            "models[0].source",
            "tiny option layers: 100000 is outside 1..1024",
        ),
        (
            "tiny:llama",
            "tiny:llama?layers=1000&hidden=65536&heads=64&kv_heads=8",
            "models[0].source",
            "parameters",
        ),
        ("tiny:llama", "tiny:llama?heads=0", "models[0].source", "tiny option heads"),
        ("name: m,", "name: '..',", "models[0].name", "no '..'"),
    ],
)
def test_model_and_trait_errors_name_the_field(
    old: str, new: str, field: str, message: str
) -> None:
    assert old in BASE
    err = _refused(BASE.replace(old, new))
    assert err.field == field
    assert message in err.message


def test_layers_of_a_model_with_unknown_layer_count_are_only_bounded() -> None:
    text = BASE.replace('"tiny:llama"', "org/some-model") + "layers: [-1, 40]\n"
    assert spec_from_bytes(text.encode()).layers == [-1, 40]
    assert _refused(BASE + "layers: [5000]\n").field == "layers[0]"


def test_the_smollm2_alias_knows_its_30_layers() -> None:
    text = BASE.replace('"tiny:llama"', "smollm2-135m")
    assert spec_from_bytes((text + "layers: [-30, 29]\n").encode()).layers == [-30, 29]
    assert "which has 30 layers" in _refused(text + "layers: [30]\n").message


def test_tiny_size_bound_is_computed_from_the_options() -> None:
    _, params = parse_tiny("tiny:llama")
    # 4 layers x 64 hidden: the random Llama the tests build (259-token vocabulary).
    assert tiny_parameters(params) == 181_184
    _, bench = parse_tiny(
        "tiny:llama?layers=32&hidden=4096&heads=32&kv_heads=8&intermediate=14336&bf16=1"
    )
    assert 6e9 < tiny_parameters(bench) < TINY_MAX_PARAMETERS  # the 8B benchmark shape plans


def test_benchmarks_of_one_name_are_refused_whatever_their_data() -> None:
    # One MMLU-style file and one TruthfulQA file both named b: the second would report the
    # first's result.
    text = BASE + (
        "benchmarks:\n"
        "  - {name: b, format: mmlu, path: /data/mmlu.jsonl}\n"
        "  - {name: b, format: truthfulqa_mc, path: /data/tqa.jsonl}\n"
    )
    err = _refused(text)
    assert err.field == "benchmarks[1].name"
    assert "'b' is used twice" in err.message


def _jobs(*params: dict[str, object], kind: JobKind = JobKind.BENCHMARK) -> list[Job]:
    return [Job(kind=kind, run_id="r1", name=f"job {i}", params=p) for i, p in enumerate(params)]


def test_any_two_jobs_with_one_result_key_are_refused_naming_the_field() -> None:
    spec = spec_from_bytes((BASE + "benchmarks: [mmlu_ab, truthfulqa_ab]\n").encode())
    mmlu = {"name": "b", "format": "mmlu", "path": "/a"}
    tqa = {"name": "b", "format": "truthfulqa_mc", "path": "/b"}
    jobs = _jobs({"variant": "m@bf16", "benchmark": mmlu}, {"variant": "m@bf16", "benchmark": tqa})
    with pytest.raises(InvalidArgument) as err:
        check_result_keys(spec, jobs)
    assert err.value.field.startswith("benchmarks[")
    assert "runs/r1/m@bf16/benchmark/b/" in err.value.message
    # Different variants, different keys: accepted.
    check_result_keys(
        spec,
        _jobs({"variant": "m@bf16", "benchmark": mmlu}, {"variant": "m@nf4", "benchmark": tqa}),
    )
    # Two steer jobs alike but for a setting that is not part of the key.
    steer = {
        "target": "m@nf4",
        "source": "m@bf16",
        "trait": {"ref": "pv/evil", "name": "pv/evil", "methodology": "pv"},
        "method": "mean_diff",
        "vector_mode": "native",
        "mode": "add",
        "direction": "+",
    }
    twins = _jobs(
        {**steer, "steering": {"seed": 1}}, {**steer, "steering": {"seed": 2}}, kind=JobKind.STEER
    )
    with pytest.raises(InvalidArgument) as err:
        check_result_keys(spec, twins)
    assert err.value.field == "steering"
    # A trait name the key functions refuse is named too, not a ValueError.
    bad = _jobs({**steer, "trait": {"name": "evil"}}, kind=JobKind.STEER)
    with pytest.raises(InvalidArgument, match="methodology"):
        check_result_keys(spec, bad)


def test_every_example_spec_plans_with_distinct_result_keys() -> None:
    for path in (
        REPO / "examples" / "demo.yaml",
        REPO / "deploy" / "k8s" / "overlays" / "local-kind" / "study.yaml",
    ):
        plan = build_plan(load_spec(path), "r1")  # check_result_keys runs inside
        assert len({j.id for j in plan.jobs}) == len(plan.jobs)


def test_deep_yaml_is_a_named_error_and_quick() -> None:
    start = time.monotonic()
    err = _refused("a: " + "[" * 50_000 + "]" * 50_000)
    assert (err.field, err.message) == ("spec", "nested deeper than 64 levels (line 1)")
    block = "models:\n" + "".join("  " * i + "- a:\n" for i in range(1, 200))
    assert "nested deeper than 64" in _refused(block).message
    assert time.monotonic() - start < 5


def test_alias_expansion_does_not_blow_up() -> None:
    bomb = BASE + 'x0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, 12):
        bomb += f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 8) + "]\n"
    start = time.monotonic()
    assert _refused(bomb).field == "x0"
    bomb_in_field = BASE + "layers: &l [&m [1, 2], *m, *m]\nsteering: {layers: *l}\n"
    assert _refused(bomb_in_field).field == "layers[0]"
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (BASE.encode("utf-16"), "spec.yaml is UTF-16 text; save it as UTF-8"),
        (BASE.encode("utf-16-be"), "NUL bytes"),
        (BASE.encode("utf-32"), "UTF-32 text"),
        ((BASE + "description: caf\xe9\n").encode("latin-1"), "not UTF-8 text (byte"),
        (b"\xff\xfe\xfa" + BASE.encode(), "UTF-16"),
        (b"name: \x80\n", "not UTF-8 text (byte 6 is b'\\x80')"),
        (b"#" * (MAX_SPEC_BYTES + 1), "over the 256 KiB a spec may have"),
    ],
)
def test_encodings_and_sizes_are_named_errors(data: bytes, message: str) -> None:
    err = _refused(data)
    assert err.field == "spec"
    assert message in err.message


def test_a_utf8_bom_is_fine() -> None:
    assert spec_from_bytes(b"\xef\xbb\xbf" + BASE.encode()).name == "t"


def test_a_200000_deep_json_trait_file_is_a_named_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        load_trait(f"pv:{deep}")
    deep.write_text('{"a": ' * 200_000 + "1" + "}" * 200_000)
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        load_trait(f"caa:{deep}")


def _plan_cli(spec: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "plan", str(spec), "--local"],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_qsens_plan_prints_the_named_error_without_a_traceback(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    cases = {
        "deep-trait.yaml": BASE.replace("[pv/evil]", f"['pv:{deep}']").encode(),
        "deep.yaml": ("a: " + "[" * 50_000 + "]" * 50_000).encode(),
        "utf16.yaml": BASE.encode("utf-16"),
        "layers.yaml": (BASE + "layers: [-1, -99]\n").encode(),
        "tiny.yaml": BASE.replace("tiny:llama", "tiny:llama?layers=100000&hidden=1000000").encode(),
    }
    expected = {
        "deep-trait.yaml": "traits[0]: pv/deep: JSON nested too deeply",
        "deep.yaml": "spec: nested deeper than 64 levels",
        "utf16.yaml": "is UTF-16 text",
        "layers.yaml": "layers[1]: layer -99 is out of range",
        "tiny.yaml": "models[0].source: tiny option layers",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        out = _plan_cli(path)
        assert out.returncode == 2, (name, out.stdout, out.stderr)
        text = " ".join(out.stderr.split())
        assert expected[name] in text, (name, out.stderr)
        assert "Traceback" not in out.stderr


def test_qsens_up_refuses_an_oversized_tiny_model_before_building_it(tmp_path: Path) -> None:
    from services.cli.runs import children_for_spec

    spec = tmp_path / "huge.yaml"
    spec.write_text(BASE.replace("tiny:llama", "tiny:llama?layers=1000&hidden=65536&heads=64"))
    start = time.monotonic()
    with pytest.raises(InvalidArgument) as err:
        children_for_spec(spec, tmp_path / "home")
    assert err.value.field == "models[0].source"
    assert "parameters" in err.value.message
    assert time.monotonic() - start < 10  # refused from the options, nothing allocated
    assert not (tmp_path / "home").exists()
