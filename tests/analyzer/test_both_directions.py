"""The analysis of both directions on a planted run in real S3: the 2x2 controlled replay with
planted cosines, steering and CAA logit difference each way, and their report section."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import numpy as np
import pytest

from services.analyzer.blocks import fmt_num
from services.analyzer.handler import run_analysis
from services.common.artefacts import ExtractSummary, VettingSummary, extract_key
from services.common.spec import parse_spec
from services.common.store import AsyncS3Store, S3Store
from tests.analyzer import planted
from tests.analyzer.planted import H, L, vector_set, write_planted_run

TRAIT, REF, NF4 = "pv/evil", "toy@bf16", "toy@nf4"
# Cosine with the reference's own vector of each cell (model_text), at every layer.
CELLS = {"ref_ref": 1.0, "ref_var": 0.8, "var_ref": 0.9, "var_var": 0.6}


def _cell_vectors(cosine: float, axis: int) -> np.ndarray:
    """[L, H]: cosine ``cosine`` with e0, the rest along e_axis (norm 3)."""
    out = np.zeros((L, H))
    out[:, 0] = 3.0 * cosine
    out[:, axis] = 3.0 * np.sqrt(1.0 - cosine**2)
    return out


def _put_extraction(
    store: S3Store, run_id: str, variant: str, mode: str, vectors: np.ndarray, text: str | None
) -> None:
    """What the extractor writes for one extraction (vectors and summary), at its key."""
    where = (text or "",) if mode == "reverse" else ()
    vkey = extract_key(run_id, variant, TRAIT, mode, *where, "vectors", "mean_diff.safetensors")
    store.put_bytes(vkey, vector_set(vectors, "mean_diff").to_safetensors())
    model, precision = variant.split("@")
    summary = ExtractSummary(
        run_id=run_id,
        variant=variant,
        model=model,
        precision=precision,
        trait=TRAIT,
        methodology="pv",
        mode=mode,  # type: ignore[arg-type]
        replay_from=text,
        position="response[:]",
        layers=list(range(L)),
        methods=["mean_diff"],
        n_train_pos=8,
        n_train_neg=8,
        n_val_pos=2,
        n_val_neg=2,
        activation_norm=[10.0] * L,
        vector_keys={"mean_diff": vkey},
        vetting=VettingSummary(enabled=False),
        loader={"backend": "hf"},
    )
    key = extract_key(run_id, variant, TRAIT, mode, *where, "summary.json")
    store.put_json(key, json.loads(summary.model_dump_json()))


@pytest.fixture(scope="module")
def both(store: S3Store) -> dict[str, Any]:
    spec = json.loads(json.dumps(planted.SPEC_DICT))
    spec["methods"] = ["mean_diff"]
    spec["extraction"] = {"replay": "2x2"}
    spec["steering"] = {**spec["steering"], "cross_precision": "both"}
    spec["logit_diff"] = {**spec["logit_diff"], "cross_precision": "both"}
    run_id = "both-" + uuid.uuid4().hex[:10]
    # The reference steered with a variant's vectors: effect 36 (its own: 40).
    planted.EFFECT[("bf16", "reference_vectors")] = 36.0
    try:
        # The four cells of toy's pv/evil x nf4 are written below with planted cosines.
        mine = (
            "reverse on",
            f"{REF} {TRAIT} native",
            f"{NF4} {TRAIT} native",
            f"{NF4} {TRAIT} replay",
        )
        write_planted_run(store, run_id, spec_obj=parse_spec(spec), skip=mine)
    finally:
        del planted.EFFECT[("bf16", "reference_vectors")]
    axes = {"ref_ref": 1, "ref_var": 2, "var_ref": 3, "var_var": 4}
    for cell, (variant, mode, text) in {
        "ref_ref": (REF, "native", None),
        "ref_var": (REF, "reverse", NF4),
        "var_ref": (NF4, "replay", REF),
        "var_var": (NF4, "native", None),
    }.items():
        vectors = _cell_vectors(CELLS[cell], axes[cell])
        _put_extraction(store, run_id, variant, mode, vectors, text)
    astore = AsyncS3Store(store)
    manifest = asyncio.run(run_analysis(astore, run_id))
    docs = {n: store.get_json(k) for n, k in manifest["outputs"].items() if n.endswith(".json")}
    docs["report.md"] = store.get_bytes(manifest["outputs"]["report.md"]).decode()
    docs["report.html"] = store.get_bytes(manifest["outputs"]["report.html"]).decode()
    return docs


def test_replay_2x2_splits_text_from_model_and_its_cells_are_the_existing_cosines(
    both: dict[str, Any],
) -> None:
    vectors = both["vector_comparison.json"]
    (entry,) = [e for e in vectors["replay_2x2"] if e["model"] == "toy"]  # one reverse written
    assert (entry["trait"], entry["variant"], entry["method"]) == (TRAIT, NF4, "mean_diff")
    assert entry["layers"] == list(range(L))
    for cell in entry["per_layer"]:
        for name, cosine in CELLS.items():
            assert cell[name] == pytest.approx(cosine, abs=1e-6)
        assert cell["input_effect"] == pytest.approx(((0.8 - 1) + (0.6 - 0.9)) / 2, abs=1e-6)
        assert cell["model_effect"] == pytest.approx(((0.9 - 1) + (0.6 - 0.8)) / 2, abs=1e-6)
        assert cell["interaction"] == pytest.approx(0.6 - 0.9 - 0.8 + 1, abs=1e-6)
        assert cell["input_effect"] + cell["model_effect"] == pytest.approx(0.6 - 1, abs=1e-6)
    # The variant's cells are the vector comparison's own native and replay cosines.
    rows = {e["mode"]: e for e in vectors["entries"] if e["variant"] == NF4 and e["trait"] == TRAIT}
    assert entry["window"]["var_var"] == pytest.approx(rows["native"]["window"]["mean_cosine"])
    assert entry["window"]["var_ref"] == pytest.approx(rows["replay"]["window"]["mean_cosine"])
    assert entry["sources"]["ref_var"].endswith(f"/reverse/{NF4}/vectors/mean_diff.safetensors")


def test_steering_both_ways_sits_beside_the_main_table(both: dict[str, Any]) -> None:
    steering = both["steering_comparison.json"]
    # The main table keeps its rows: the reference appears only with its own vectors.
    assert not [e for e in steering["entries"] if e["target"] == REF and e["source"] != REF]
    (row,) = [
        e
        for e in steering["both_directions"]
        if (e["variant"], e["trait"], e["mode"]) == (NF4, TRAIT, "add")
    ]
    effect = row["effect"]
    assert (effect["ref_ref"], effect["ref_var"], effect["var_ref"], effect["var_var"]) == (
        pytest.approx(40.0),
        pytest.approx(36.0),
        pytest.approx(20.0),
        pytest.approx(30.0),
    )
    assert effect["input_effect"] == pytest.approx(((36 - 40) + (30 - 20)) / 2)
    assert effect["model_effect"] == pytest.approx(((20 - 40) + (30 - 36)) / 2)
    assert row["model_changed"]["value"] == pytest.approx(50.0)  # nf4 with bf16's vectors
    assert row["vectors_changed"]["value"] == pytest.approx(10.0)  # bf16 with nf4's vectors
    main = next(
        e
        for e in steering["entries"]
        if (e["target"], e["source"], e["trait"], e["mode"]) == (NF4, REF, TRAIT, "add")
    )
    assert main["degradation_pct"]["value"] == pytest.approx(row["model_changed"]["value"])


def test_logit_diff_both_ways_the_same_model_gives_r_one(both: dict[str, Any]) -> None:
    doc = both["logit_diff_comparison.json"]
    assert all(e["sources"]["result"].count("/logit_diff/") == 1 for e in doc["entries"])
    own = {(e["model"], e["variant"]): e for e in doc["entries"]}
    assert len(own) == len(doc["entries"])  # one row per variant: native vectors only
    rows = {(e["model"], e["variant"]): e for e in doc["both_directions"]}
    assert set(rows) == {(m, f"{m}@{p}") for m in ("toy", "toy2") for p in ("nf4", "int8")}
    for key, row in rows.items():
        # The planted values depend on the model only: the reference with the variant's
        # vectors is the reference again (r = 1); the variant with the reference's vectors
        # correlates with the reference exactly as the variant with its own does.
        assert row["vectors_changed"]["value"] == pytest.approx(1.0, abs=1e-5)
        native = own[key]["comparison"]["correlation"]["value"]
        assert row["model_changed"]["value"] == pytest.approx(native)
        assert row["slope"]["input_effect"] == pytest.approx(0.0)


def test_the_report_renders_both_directions_in_markdown_and_html(both: dict[str, Any]) -> None:
    md, html = both["report.md"], both["report.html"]
    for heading in (
        "Both directions",
        "Text or model: the controlled replay as a 2×2",
        "Steering both ways",
        "CAA logit difference both ways",
    ):
        assert heading in md and heading in html
    assert f"Per layer: {TRAIT} · mean_diff · {NF4}" in md
    assert fmt_num((0.8 - 1 + 0.6 - 0.9) / 2, 3) in md  # the text effect
    assert 'id="replay-2x2"' in html and 'href="#both-directions"' in html
    assert "2x2: the reference also reads each variant's own responses" in md  # methods
