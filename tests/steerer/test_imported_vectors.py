"""A steer job with an imported vector set: the steerer reads the set from S3 (a repeng GGUF
here) and scales it by the target's own activation norms (the plan side:
tests/common/test_spec_vectors.py).

Real parts: the toy loader, the NATS job plane with its judge service, SeaweedFS S3 (see
tests/steerer/toy.py for the toy model's known response to steering along ``v``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from services.common.datafiles import put_data
from services.common.jobs import Job
from services.common.state import JobState
from services.common.vector_formats import from_layers, write_vectors
from tests.loader_procs import LoaderProc
from tests.steerer.conftest import Plane
from tests.steerer.test_steer import C_STAR, search_spec, steer_job, toy_vectors
from tests.steerer.toy import DEAD_DIM, V_DIM, write_extraction


async def test_an_imported_gguf_steers_the_toy_with_the_targets_norms(
    plane: Plane, toy_loader: LoaderProc, run_id: str
) -> None:
    await plane.announce(toy_loader)
    # The target's own vectors point along a dead dimension; the imported ones along v.
    write_extraction(plane.store, run_id, "toy@fp32", "pv/evil", toy_vectors(DEAD_DIM))
    vectors = toy_vectors(V_DIM)
    gguf = write_vectors(from_layers(dict(enumerate(vectors))), "repeng-gguf", model_hint="toy")
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "evil.gguf"
        file.write_bytes(gguf)
        location = put_data(file)
    job = steer_job(
        run_id,
        source="imported-evil",
        search=search_spec(steps=9, fine_points=0, budget="equal"),
        layers=[2],
    )
    # A job's id is the hash of its params: build it anew with the imported set's.
    job = Job(
        kind=job.kind,
        run_id=run_id,
        name=job.name,
        params={**job.params, "method": "imported", "vectors_location": location},
    )
    [record] = await plane.run(run_id, [job])
    assert record.state == JobState.DONE, record.error
    p = job.params
    parts = (run_id, p["target"], "pv/evil", "imported-evil", "imported", "native", "add", "+")
    result, _ = read_result_for(plane, parts)
    assert result.vector["imported_from"] == location
    assert result.vector["source_precision"] == "imported"
    assert "/toy@fp32/extract/" in result.vector["summary_key"]  # the target's norms
    # Compared with the target's own extraction: along v vs along a dead dimension.
    cosines = result.vector["cosine_to_extracted"]["mean_diff"]
    assert set(cosines) == {"0", "1", "2", "3"} and all(c == 0.0 for c in cosines.values())
    lo, hi = result.brackets["2"]
    assert lo is not None and hi is not None and lo < C_STAR <= hi
    assert result.best is not None and result.best.mean_trait == 80


def read_result_for(plane: Plane, parts: tuple[str, ...]) -> tuple[Any, list[Any]]:
    from services.common.artefacts import steer_key
    from services.common.contracts.steer_results import SteerResult, SteerRun

    result = SteerResult.model_validate(plane.store.get_json(steer_key(*parts, "result.json")))
    rows = plane.store.get_jsonl(steer_key(*parts, "runs.jsonl"))
    return result, [SteerRun.model_validate(r) for r in rows]
