"""The analyzer's public surface is what we meant, and importing it does nothing heavy."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from services.analyzer.views import parse_steer, validate_result
from services.common.contracts.steer_results import SteerResult
from services.common.errors import FailedPrecondition
from services.common.jobs import JobKind
from services.common.planner import build_plan
from tests.analyzer.planted import spec, steer_documents

EXPECTED = {
    "services.analyzer.stats": {
        "DEFAULT_LEVEL",
        "DEFAULT_RESAMPLES",
        "Estimate",
        "TestResult",
        "bootstrap",
        "bootstrap_diff",
        "finite_pairs",
        "fisher_z_mean",
        "mann_whitney",
        "mcnemar",
        "one_sample_t",
        "pearson",
        "spearman",
        "wilcoxon",
        "wilson",
    },
    "services.analyzer.classify": {
        "THRESHOLDS",
        "Classification",
        "Label",
        "Threshold",
        "classify",
        "classify_benchmark_drop",
        "classify_cosine",
        "classify_logit_correlation",
        "classify_steering_degradation",
        "with_noise_band",
    },
    "services.analyzer.handler": {"DOCUMENTS", "handle", "jsonable", "run_analysis"},
    "services.analyzer.report_cmd": {"generate_report"},
}


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_exports(module: str) -> None:
    mod = importlib.import_module(module)
    assert set(mod.__all__) == EXPECTED[module]
    for name in mod.__all__:
        assert hasattr(mod, name), name


ANALYZER_MODULES = (
    "loading",
    "views",
    "quantize_view",
    "geometry",
    "documents",
    "documents.common",
    "documents.models",
    "documents.vectors",
    "documents.steering",
    "documents.steering_cells",
    "documents.logit_diff",
    "documents.benchmarks",
    "documents.safety",
    "documents.safety_neurons",
    "documents.ranking",
    "figures",
    "blocks",
    "report",
    "report_methods",
    "render_markdown",
    "render_html",
)


def test_every_module_exports_only_what_it_defines() -> None:
    for name in ANALYZER_MODULES:
        mod = importlib.import_module(f"services.analyzer.{name}")
        for attr in mod.__all__:
            assert hasattr(mod, attr), (name, attr)


def test_import_is_light_and_side_effect_free() -> None:
    code = (
        "import sys, json\n"
        "import services.analyzer.handler, services.analyzer.report_cmd\n"
        "heavy = [m for m in ('matplotlib', 'scipy', 'sklearn', 'torch') "
        "if any(k == m or k.startswith(m + '.') for k in sys.modules)]\n"
        "print(json.dumps(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_a_steer_result_without_a_coherent_run_is_read() -> None:
    sp = spec()
    job = next(j for j in build_plan(sp, "r1").jobs if j.kind is JobKind.STEER)
    result, _, _, _ = steer_documents("r1", job.params)
    runs = [r.model_copy(update={"coherent": False, "mean_coherence": 10.0}) for r in result.runs]
    doc = result.model_copy(update={"best": None, "status": "no_coherent_run", "runs": runs})
    raw = doc.model_dump(mode="json")
    typed = validate_result(raw, "steer", "k", SteerResult)
    view = parse_steer(
        typed,
        key="k",
        target="m@nf4",
        source="m@nf4",
        trait="pv/evil",
        method="mean_diff",
        vector_mode="replay",
        mode="add",
        direction="+",
    )
    assert view.status == "no_coherent_run" and view.best_score is None and view.delta is None
    assert view.baseline_score == result.baseline.mean_trait
    assert view.baseline_low == result.baseline.trait_ci.low
    assert [r.coherence for r in view.runs] == [10.0] * len(result.runs)


def test_a_result_that_breaks_its_contract_is_refused_by_name() -> None:
    sp = spec()
    job = next(j for j in build_plan(sp, "r1").jobs if j.kind is JobKind.STEER)
    raw = steer_documents("r1", job.params)[0].model_dump(mode="json")
    del raw["baseline"]["trait_ci"]
    with pytest.raises(
        FailedPrecondition, match=r"k: not a valid steer result \(baseline\.trait_ci"
    ):
        validate_result(raw, "steer", "k", SteerResult)
    with pytest.raises(FailedPrecondition, match=r"schema_version 'qsens\.steer/2'"):
        validate_result({**raw, "schema_version": "qsens.steer/2"}, "steer", "k", SteerResult)
