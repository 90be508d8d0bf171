"""Extraction refusals across precisions (issue 17): the rate each variant refused the
adversarial prompts, its difference from the reference with a CI, and the few-pairs flag."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest, fisher_exact

from services.analyzer.blocks import Table
from services.analyzer.documents.refusals import extraction_refusals, refusal_blocks
from services.analyzer.loading import Extraction, RunArtefacts
from services.common.artefacts import ExtractSummary, VettingSummary
from services.common.planner import variants_of
from services.common.spec import spec_from_bytes

SPEC = b"""
name: refusals
models: [{name: m, source: "tiny:llama", device: cpu}]
precisions: [bf16, nf4, int8]
reference: bf16
traits: [pv/evil]
methods: [mean_diff]
extraction: {vetting: {min_keep: 4}}
"""


def _extraction(variant: str, mode: str, refused: int, kept: int, dropped: int) -> Extraction:
    n = kept + dropped
    vetting = VettingSummary(
        enabled=True,
        kept_pos=kept,
        dropped_pos=dropped,
        kept_neg=20,
        dropped_neg=0,
        refusal_rate_pos=refused / n,
        refusal_rate_neg=0.0,
    )
    summary = ExtractSummary(
        run_id="r",
        variant=variant,
        model="m",
        precision=variant.split("@")[1],
        trait="pv/evil",
        methodology="pv",
        mode=mode,
        position="response[:]",
        layers=[0, 1],
        methods=["mean_diff"],
        n_train_pos=kept,
        n_train_neg=20,
        n_val_pos=0,
        n_val_neg=0,
        activation_norm=[1.0, 1.0],
        vector_keys={},
        vetting=vetting,
    )
    key = f"runs/r/{variant}/extract/pv/evil/{mode}/summary.json"
    return Extraction(variant, "pv/evil", mode, summary, key, {}, {})


def _run() -> RunArtefacts:
    spec = spec_from_bytes(SPEC)
    extractions = {
        ("m@bf16", "pv/evil", "native"): _extraction("m@bf16", "native", 2, 18, 2),
        ("m@nf4", "pv/evil", "native"): _extraction("m@nf4", "native", 13, 5, 15),
        # A replay reuses the reference's responses and verdicts: no rate of its own.
        ("m@int8", "pv/evil", "replay"): _extraction("m@int8", "replay", 2, 18, 2),
    }
    return RunArtefacts(
        run_id="r",
        spec=spec,
        variants=variants_of(spec),
        extractions=extractions,
        steer=[],
        logit_diff=[],
        benchmarks=[],
        probes=[],
        inputs={},
        missing={},
        notes=[],
        loader_notes={},
    )


def test_refusal_rates_with_intervals_and_the_few_pairs_flag() -> None:
    rows = extraction_refusals(_run())
    assert [r["variant"] for r in rows] == ["m@bf16", "m@nf4"]
    ref, nf4 = rows
    assert (ref["refusals"], ref["n"], nf4["refusals"], nf4["n"]) == (2, 20, 13, 20)
    # The Wilson interval equals scipy's.
    want = binomtest(13, 20).proportion_ci(0.95, method="wilson")
    assert nf4["rate"]["value"] == pytest.approx(0.65)
    assert nf4["rate"]["low"] == pytest.approx(want.low, abs=1e-9)
    assert nf4["rate"]["high"] == pytest.approx(want.high, abs=1e-9)
    # 65% vs 10%: the Newcombe interval of the difference excludes 0, Fisher agrees.
    diff = nf4["difference"]
    assert diff["value"] == pytest.approx(0.55) and 0.2 < diff["low"] < 0.55 < diff["high"] < 0.8
    assert nf4["fisher_p"] == pytest.approx(fisher_exact([[13, 7], [2, 18]]).pvalue)
    assert nf4["fisher_p"] < 0.001
    assert "difference" not in ref and ref["is_reference"]
    # nf4 kept 5 positives of 20: fewer than 2 x min_keep (8), and 15 of 20 dropped.
    assert len(nf4["few_pairs"]) == 2 and "dropped 15 of 20 positives" in nf4["few_pairs"][1]
    assert ref["few_pairs"] == []
    (table,) = refusal_blocks(rows)
    assert isinstance(table, Table) and table.rows[1][2] == "13 / 20"
    assert table.rows[0][7] == "—" and "dropped 15" in str(table.rows[1][7])
