"""A spec names imported vector sets (``vectors:``): the planner steers every variant of the model
with each, after the target's own extraction; bad references name their field."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.common.planner import build_plan
from services.common.spec import ExperimentSpec, load_spec

SPEC_WITH_VECTORS = """
name: imported
models:
  - {name: tiny, source: "tiny:llama", device: cpu}
precisions: [fp32, nf4]
reference: fp32
traits: [pv/evil, caa/sycophancy]
vectors:
  - name: repeng-evil
    location: s3://qsens/data/abc/evil.gguf
    model: tiny
    trait: pv/evil
"""


def _spec(tmp_path: Path, text: str) -> ExperimentSpec:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return load_spec(path)


def test_the_planner_steers_every_variant_of_the_model_with_an_imported_set(
    tmp_path: Path,
) -> None:
    spec = _spec(tmp_path, SPEC_WITH_VECTORS)
    plan = build_plan(spec, "run-imported")
    by_id = {j.id: j for j in plan.jobs}
    imported = [j for j in plan.jobs if j.params.get("source") == "imported-repeng-evil"]
    assert {j.params["target"] for j in imported} == {"tiny@fp32", "tiny@nf4"}
    for job in imported:
        p = job.params
        assert p["vectors_location"] == "s3://qsens/data/abc/evil.gguf"
        assert p["method"] == "imported" and p["trait"]["name"] == "pv/evil"
        # It waits for the target's own extraction of the trait (the activation norms).
        deps = [by_id[d] for d in job.deps]
        assert any(d.kind.value == "extract" and d.params["variant"] == p["target"] for d in deps)
    analyze = next(j for j in plan.jobs if j.kind.value == "analyze")
    assert {j.id for j in imported} <= set(analyze.deps)
    # A set for a model or trait the spec does not have is refused, naming the field.
    for bad, field in [("model: tiny", "model: other"), ("trait: pv/evil", "trait: pv/nope")]:
        with pytest.raises(InvalidArgument) as err:
            _spec(tmp_path, SPEC_WITH_VECTORS.replace(f"    {bad}\n", f"    {field}\n"))
        assert err.value.field.startswith("vectors[0].")


def test_preflight_reads_each_imported_set_and_a_cluster_refuses_local_paths(
    tmp_path: Path,
) -> None:
    import numpy as np

    from services.cli.runs import preflight
    from services.common.vector_formats import from_layers, write_vectors

    gguf = tmp_path / "evil.gguf"
    gguf.write_bytes(write_vectors(from_layers({1: np.ones(8, np.float32)}), "repeng-gguf"))
    text = SPEC_WITH_VECTORS.replace("[fp32, nf4]", "[fp32]")
    spec = _spec(tmp_path, text.replace("s3://qsens/data/abc/evil.gguf", str(gguf)))
    preflight(spec, cluster=False)  # reads
    with pytest.raises(InvalidArgument) as err:
        preflight(spec, cluster=True)
    assert err.value.field == "vectors[0].location" and "s3://" in err.value.message
    missing = _spec(
        tmp_path, text.replace("s3://qsens/data/abc/evil.gguf", str(tmp_path / "no.gguf"))
    )
    with pytest.raises(InvalidArgument) as err:
        preflight(missing, cluster=False)
    assert err.value.field == "vectors[0].location"
    (tmp_path / "bad.gguf").write_bytes(b"GGUF but not really")
    broken = _spec(
        tmp_path, text.replace("s3://qsens/data/abc/evil.gguf", str(tmp_path / "bad.gguf"))
    )
    with pytest.raises(InvalidArgument, match="not a GGUF"):
        preflight(broken, cluster=False)
