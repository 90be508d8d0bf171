"""The analysis of a planted run read back from real S3: every planted answer, every source key."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import stats as sp

from services.analyzer.documents.models import (
    BenchmarkComparison,
    LogitDiffComparison,
    ProbeStatistics,
    RobustnessRanking,
    SteeringComparison,
    VectorComparison,
)
from tests.analyzer.conftest import Analysed
from tests.analyzer.planted import (
    COSINE,
    EFFECT,
    NORM_RATIO,
    benchmark_correct,
    logit_values,
    probe_values,
)

DOCS = (
    "vector_comparison.json",
    "steering_comparison.json",
    "logit_diff_comparison.json",
    "benchmark_comparison.json",
    "robustness_ranking.json",
    "probe_statistics.json",
)


def _sources(value: Any) -> list[str]:
    """Every S3 key named under a ``sources`` field, anywhere in a document."""
    out: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "sources":
                stack = [v]
                while stack:
                    item = stack.pop()
                    if isinstance(item, str):
                        out.append(item)
                    elif isinstance(item, dict):
                        stack.extend(item.values())
                    elif isinstance(item, list):
                        stack.extend(item)
            else:
                out.extend(_sources(v))
    elif isinstance(value, list):
        for v in value:
            out.extend(_sources(v))
    return out


def test_outputs_are_written_and_the_manifest_hashes_them(analysed: Analysed) -> None:
    outputs = analysed.manifest["outputs"]
    for name in (*DOCS, "report.md", "report.html"):
        assert name in outputs
    assert any(name.startswith("figures/") for name in outputs)
    for name, key in outputs.items():
        assert key.startswith(f"runs/{analysed.planted.run_id}/analysis/")
        data = analysed.store.get_bytes(key)
        assert hashlib.sha256(data).hexdigest() == analysed.manifest["output_sha256"][key], name
    for key, digest in list(analysed.manifest["inputs"].items())[:40]:
        assert hashlib.sha256(analysed.store.get_bytes(key)).hexdigest() == digest
    assert analysed.manifest["missing"] == {} and analysed.manifest["notes"] == []


def test_every_number_names_inputs_that_were_read(analysed: Analysed) -> None:
    inputs = set(analysed.manifest["inputs"])
    for name in DOCS:
        doc = analysed.doc(name)
        assert doc["run_id"] == analysed.planted.run_id
        for key in _sources(doc):
            assert key in inputs, (name, key)
    # JSON is strict: no NaN or Infinity anywhere.
    for name in DOCS:
        json.loads(
            analysed.store.get_bytes(analysed.manifest["outputs"][name]), parse_constant=pytest.fail
        )


def test_vector_comparison_recovers_the_planted_geometry(analysed: Analysed) -> None:
    doc = analysed.doc("vector_comparison.json")
    entries = doc["entries"]
    # 2 models x 3 traits x 2 methods x 2 variants, one vector mode each (pv replays).
    assert len(entries) == 24
    for e in entries:
        p = e["precision"]
        assert e["window"]["layers"] == [2, 3, 4, 5, 6, 7]
        assert e["window"]["mean_cosine"] == pytest.approx(COSINE[p], abs=1e-5)
        assert e["window"]["mean_norm_ratio"] == pytest.approx(NORM_RATIO[p], abs=1e-5)
        assert e["classification"]["class"] == ("robust" if p == "int8" else "degraded")
        assert e["mode"] == ("replay" if e["trait"] == "pv/evil" else "native") and e["primary"]
        zero = e["model"] == "toy" and e["trait"] == "caa/sycophancy" and p == "nf4"
        assert (e["cosine"][0] is None) == zero
        assert e["null_layers"] == (
            [{"layer": 0, "reason": "zero-norm variant vector"}] if zero else []
        )
    # Quantized variants against each other (nf4 vs int8) are reported, unclassified.
    pair = next(p for p in doc["pairs"] if p["model"] == "toy2" and p["trait"] == "pv/evil")
    assert {pair["a"], pair["b"]} == {"toy2@nf4", "toy2@int8"}
    assert -1.0 <= pair["mean_cosine"] <= 1.0 and "classification" not in pair


def test_steering_comparison_recovers_planted_degradation(analysed: Analysed) -> None:
    doc = analysed.doc("steering_comparison.json")
    refs = [e for e in doc["entries"] if e["is_reference"]]
    assert refs and all(e["classification"] is None for e in refs)
    expected_class = {25.0: "degraded", 5.0: "robust", 50.0: "broken", 2.5: "robust"}
    seen = set()
    for e in doc["entries"]:
        if e["is_reference"]:
            assert e["effect"] == pytest.approx(EFFECT[("bf16", "self")])
            continue
        effect = EFFECT[(e["precision"], e["steering"])]
        deg = 100 * (40.0 - effect) / 40.0
        assert e["effect"] == pytest.approx(effect)
        assert e["degradation_pct"]["value"] == pytest.approx(deg)
        assert e["degradation_pct"]["low"] <= deg + 1e-9 <= e["degradation_pct"]["high"] + 2e-9
        assert e["classification"]["class"] == expected_class[deg]
        assert e["sources"]["per_question"], "per-question scores should have been read"
        matched = e["coherence_at_matched_coefficient"]
        assert e["shift"]["layer"] == (1 if e["precision"] == "nf4" else 0)
        if e["mode"] == "ablate":
            # Matched on the ablated direction's layer: nf4 only ablated layer 4's direction
            # while selecting (validation set); int8 also evaluated it on the test set.
            assert matched["matched_on"] == "ablated vector layer"
            assert matched["coherence"] == (95.0 if e["precision"] == "nf4" else 80.0)
            assert e["best"]["layer"] == (5 if e["precision"] == "nf4" else 4)
        elif e["precision"] == "nf4":
            # The nf4 run at the reference's best layer is 33% smaller in added norm: unmatched.
            assert matched["coherence"] is None and matched["relative_gap"] == pytest.approx(-1 / 3)
        else:
            assert matched["coherence"] == 80.0 and matched["matched_on"] == "added_norm"
        seen.add((e["mode"], e["direction"]))
    assert seen == {("add", "+"), ("ablate", "-")}
    spread = next(
        s
        for s in doc["spread"]
        if s["model"] == "toy" and s["trait"] == "pv/evil" and s["steering"] == "self"
    )
    assert spread["best_score"]["spread"] == pytest.approx(10.0)  # 90 (bf16) - 80 (nf4)
    assert spread["best_score"]["low"] is not None


def test_logit_difference_correlation_matches_scipy(analysed: Analysed) -> None:
    doc = analysed.doc("logit_diff_comparison.json")
    multiples = analysed.planted.spec.logit_diff.coefficients
    for e in doc["entries"]:
        if e["is_reference"]:
            continue
        ref = logit_values(e["model"], "bf16", multiples)
        var = logit_values(e["model"], e["precision"], multiples)
        rs = [sp.pearsonr(ref[:, k], var[:, k]).statistic for k in range(len(multiples))]
        expected = math.tanh(np.mean(np.arctanh(rs)))
        corr = e["comparison"]["correlation"]
        assert corr["value"] == pytest.approx(expected, abs=1e-9)
        assert corr["low"] <= expected <= corr["high"]
        assert e["comparison"]["multiples"] == multiples
        per = e["comparison"]["per_coefficient"]
        assert [p["pearson"]["statistic"] for p in per] == pytest.approx(rs)
        label = "robust" if expected > 0.9 else "degraded" if expected >= 0.7 else "broken"
        assert e["classification"]["class"] == label
    assert {e["classification"]["class"] for e in doc["entries"] if e["precision"] == "int8"} == {
        "robust"
    }


def test_benchmark_delta_and_mcnemar(analysed: Analysed) -> None:
    doc = analysed.doc("benchmark_comparison.json")
    for e in doc["entries"]:
        if e["is_reference"]:
            assert e["accuracy"]["value"] == pytest.approx(0.8)
            continue
        drop = {"nf4": 6.0, "int8": 2.0}[e["precision"]]
        assert e["drop_pp"] == pytest.approx(drop)
        assert e["delta_pp"]["value"] == pytest.approx(-drop)
        assert e["delta_pp"]["low"] <= -drop <= e["delta_pp"]["high"]
        assert e["classification"]["class"] == {"nf4": "broken", "int8": "degraded"}[e["precision"]]
        ref, var = benchmark_correct("bf16"), benchmark_correct(e["precision"])
        only_ref = sum(1 for a, b in zip(ref, var, strict=True) if a and not b)
        assert e["mcnemar"]["p_value"] == pytest.approx(sp.binomtest(0, only_ref, 0.5).pvalue)
        ci = sp.binomtest(sum(var), len(var)).proportion_ci(method="wilson")
        assert (e["accuracy"]["low"], e["accuracy"]["high"]) == pytest.approx((ci.low, ci.high))


def test_probe_statistics(analysed: Analysed) -> None:
    doc = analysed.doc("probe_statistics.json")
    probes = {p["variant"]: p for p in doc["probes"]}
    nf4 = probes["toy@nf4"]["comparison"]
    ref_v, var_v = probe_values("toy", "bf16"), probe_values("toy", "nf4")
    shift = nf4["metrics"]["entropy"]["shift_paired"]
    assert shift["value"] == pytest.approx((var_v["entropy"] - ref_v["entropy"]).mean())
    rho = sp.spearmanr(ref_v["entropy"], var_v["entropy"]).statistic
    assert nf4["metrics"]["entropy"]["spearman"]["statistic"] == pytest.approx(rho)
    mw = sp.mannwhitneyu(var_v["entropy"], ref_v["entropy"])
    assert nf4["metrics"]["entropy"]["mann_whitney"]["p_value"] == pytest.approx(mw.pvalue)
    assert nf4["refusal_rate"]["reference"]["value"] == pytest.approx(9 / 12)
    assert nf4["refusal_rate"]["variant"]["value"] == pytest.approx(5 / 12)
    assert nf4["refusal_rate"]["shift"]["value"] == pytest.approx(-4 / 12)
    assert nf4["refusal_rate"]["mcnemar"]["p_value"] == pytest.approx(sp.binomtest(0, 4).pvalue)
    assert nf4["calibration"]["ece"]["shift"] == pytest.approx(0.05)
    # Refusal direction at round(0.65 * 9) = 6, cosine as planted.
    for r in doc["refusal_direction"]:
        assert r["layer"] == 6 and r["requested_layer"] == 6
        assert r["cosine"] == pytest.approx(COSINE[r["precision"]], abs=1e-5)
        assert r["norm_ratio"] == pytest.approx(NORM_RATIO[r["precision"]], abs=1e-5)
    # Safety neurons: errors are planted 3x larger on the contrast dims.
    neurons = doc["safety_neuron_errors"]
    assert len(neurons) == 4
    for n in neurons:
        assert n["layers"] == [2, 3, 4, 6, 7] and n["n"] == 16
        assert n["ratio"]["value"] > 1.5 and n["t_test"]["p_value"] < 0.01
        assert n["alignment"]["matched"] == 16
    across = {(a["x"], a["y"]): a for a in doc["across_variants"]}
    a = across[("refusal_direction_cosine", "refusal_rate_shift")]
    assert len(a["variants"]) == 4 and a["pearson"]["statistic"] is not None


def test_robustness_ranking(analysed: Analysed) -> None:
    doc = analysed.doc("robustness_ranking.json")
    precisions = {p["precision"]: p for p in doc["precisions"]}
    assert precisions["int8"]["rank"] == 1 and precisions["nf4"]["rank"] == 2
    assert precisions["nf4"]["mean_cosine"]["value"] == pytest.approx(0.9, abs=1e-5)
    assert precisions["nf4"]["mean_drop_pp"]["value"] == pytest.approx(6.0)
    assert precisions["nf4"]["mean_degradation_pct"]["value"] == pytest.approx(37.5)
    pair = doc["method_comparison"]["vector_cosine"]["pairs"][0]
    assert (pair["a"], pair["b"], pair["n_conditions"]) == ("mean_diff", "probe", 12)
    assert pair["mean_difference"]["value"] == pytest.approx(0.0, abs=1e-5)
    assert {m["model"] for m in doc["models"]} == {"toy", "toy2"}
    assert {f["family"] for f in doc["families"]} == {"llama", "qwen"}
    assert doc["size"]["pearson"]["reason"] == "n = 2 < 3"


def test_report_says_what_a_reader_needs(analysed: Analysed) -> None:
    md = analysed.store.get_bytes(analysed.manifest["outputs"]["report.md"]).decode()
    for needle in (
        "## Methods and limitations",
        "dequantized 4-bit",
        "LLM.int8",
        "outlier",
        "batch",
        "Recorded by the steer results: embedding / all-MiniLM-L6-v2",
        "200 resamples, seed 3",
        "Steering questions: arditi/refusal (eval): 10",
        "Benchmark items: arc_toy: 50",
        "Safety-probe prompts: arditi-refusal: 12",
        "| toy@nf4 | toy@bf16 | pv/evil | mean_diff | add+ | equal | 3 | 3 |",
        "Wilson",
        "winner's-curse",
    ):
        assert needle in md, needle
    # Every figure the Markdown references is stored beside it.
    outputs = analysed.manifest["outputs"]
    refs = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert refs and all(r in outputs for r in refs)
    # The cosine row of toy@nf4 caa (with its null layer) shows the planted numbers.
    row = next(
        line
        for line in md.splitlines()
        if line.startswith("| toy | caa/sycophancy | mean_diff | prompt[-1] | toy@nf4 ")
    )
    assert "| 0.900 | 0.900 | 1.100 |" in row and "| 1 | **degraded** |" in row
    html = analysed.store.get_bytes(outputs["report.html"]).decode()
    assert html.count("data:image/png;base64,") == len(refs)
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_every_written_document_validates_as_its_typed_model(analysed: Analysed) -> None:
    """What the analyze job wrote reads back into the models the report renders."""
    models = {
        "vector_comparison.json": VectorComparison,
        "steering_comparison.json": SteeringComparison,
        "logit_diff_comparison.json": LogitDiffComparison,
        "benchmark_comparison.json": BenchmarkComparison,
        "robustness_ranking.json": RobustnessRanking,
        "probe_statistics.json": ProbeStatistics,
    }
    for name, model in models.items():
        doc = model.model_validate(analysed.doc(name))
        assert doc.run_id == analysed.planted.run_id and doc.schema_ == "qsens.analysis/1"
        assert doc.kind == name.removesuffix(".json")
    # Rows keep exactly the keys their builder set: a reference row has no comparison.
    steering = SteeringComparison.model_validate(analysed.doc("steering_comparison.json"))
    dumped = steering.to_json()["entries"]
    assert dumped == analysed.doc("steering_comparison.json")["entries"]
    assert any(e["is_reference"] and "degradation_pct" not in e for e in dumped)
    assert any(not e["is_reference"] and "degradation_pct" in e for e in dumped)
    with pytest.raises(ValidationError, match="unexpected"):
        VectorComparison.model_validate({**analysed.doc("vector_comparison.json"), "unexpected": 1})


def test_probe_and_ranking_rows_are_typed_and_round_trip(analysed: Analysed) -> None:
    """probe_statistics and robustness_ranking rows read back into their row models and write
    back the same JSON; a row with a key its model does not name is refused."""
    stored_probes = analysed.doc("probe_statistics.json")
    probes = ProbeStatistics.model_validate(stored_probes)
    assert probes.to_json() == stored_probes
    by_variant = {p.variant: p for p in probes.probes}
    assert by_variant["toy@bf16"].is_reference and by_variant["toy@bf16"].comparison is None
    assert all(("comparison" in p) != p["is_reference"] for p in probes.to_json()["probes"])
    assert all(n.ratio is not None and n.ratio["value"] > 1.5 for n in probes.safety_neuron_errors)
    stored_ranking = analysed.doc("robustness_ranking.json")
    ranking = RobustnessRanking.model_validate(stored_ranking)
    assert ranking.to_json() == stored_ranking
    assert [p.precision for p in ranking.precisions if p.rank == 1] == ["int8"]
    bad = json.loads(json.dumps(stored_ranking))
    bad["precisions"][0]["cosine_mean"] = 1.0
    with pytest.raises(ValidationError, match="cosine_mean"):
        RobustnessRanking.model_validate(bad)


def test_classifications_are_typed_cells(analysed: Analysed) -> None:
    """A row's classification reads back as a ClassificationCell (``class`` by its alias) and
    writes back the same JSON; a label outside the four classes is refused."""
    stored = analysed.doc("vector_comparison.json")
    doc = VectorComparison.model_validate(stored)
    assert doc.to_json()["entries"] == stored["entries"]
    cells = [e.classification for e in doc.entries if e.classification is not None]
    assert cells and {c.class_ for c in cells} == {"robust", "degraded"}
    bad = json.loads(json.dumps(stored))
    bad["entries"][0]["classification"]["class"] = "fine"
    with pytest.raises(ValidationError, match="class"):
        VectorComparison.model_validate(bad)


def test_steering_best_is_a_typed_cell(analysed: Analysed) -> None:
    """Each steering row's best run reads back as a SteeringBest and writes back the same JSON."""
    stored = analysed.doc("steering_comparison.json")
    doc = SteeringComparison.model_validate(stored)
    assert [e.best.model_dump() for e in doc.entries] == [e["best"] for e in stored["entries"]]
    assert any(e.best.score is not None and e.best.layer is not None for e in doc.entries)
    bad = json.loads(json.dumps(stored))
    del bad["entries"][0]["best"]["coherence"]
    with pytest.raises(ValidationError, match="coherence"):
        SteeringComparison.model_validate(bad)
