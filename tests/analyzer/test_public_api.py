"""The analyzer's public surface is what we meant, and importing it does nothing heavy."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from services.analyzer.loading import parse_steer

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


def test_every_module_exports_only_what_it_defines() -> None:
    for name in ("loading", "matrices", "figures", "report"):
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
    view = parse_steer(
        {
            "schema_version": "qsens.steer/1",
            "best": None,
            "status": "no_coherent_run",
            "objective": "max",
            "baseline": {
                "mean_trait": 20.0,
                "trait_ci": {"value": 20.0, "low": 18.0, "high": 22.0},
            },
            "runs": [
                {
                    "run_index": 0,
                    "layer": 3,
                    "coefficient": 2.0,
                    "mean_trait": 50.0,
                    "mean_coherence": 10.0,
                }
            ],
        },
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
    assert view.baseline_score == 20.0 and view.baseline_low == 18.0
    assert view.runs[0].coherence == 10.0
