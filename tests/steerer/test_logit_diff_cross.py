"""CAA logit difference with another variant's vectors, through the job plane on a toy loader:
the vectors (and their scale) are the source's, so the same vectors under another variant's
name give the native numbers exactly, and the opposite vectors mirror them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from services.common.artefacts import logit_diff_key
from services.common.contracts.steer_results import LogitDiffResult
from services.common.jobs import Job, JobKind
from services.common.spec import LogitDiffSpec
from services.common.state import JobState
from tests.loader_procs import LoaderProc
from tests.steerer.conftest import Plane
from tests.steerer.test_logit_diff_probes import caa_dataset
from tests.steerer.toy import CAA_DIM, LAYERS, unit, write_extraction

TRAIT = "caa/toyab"


def _job(run_id: str, trait: dict[str, str], source: str) -> Job:
    spec = LogitDiffSpec(coefficients=[-1.0, 1.0, 2.0], layer_fraction=0.5, limit=4)
    return Job(
        kind=JobKind.LOGIT_DIFF,
        run_id=run_id,
        params={
            "variant": "toy@fp32",
            "source": source,
            "trait": trait,
            "method": "mean_diff",
            "vector_mode": "native",
            "logit_diff": spec.model_dump(mode="json"),
        },
    )


def _result(plane: Plane, run_id: str, source: str) -> LogitDiffResult:
    key = logit_diff_key(run_id, "toy@fp32", TRAIT, source, "mean_diff", "native", "result.json")
    return LogitDiffResult.model_validate(plane.store.get_json(key))


async def test_logit_difference_with_another_variants_vectors(
    plane: Plane, toy_loader: LoaderProc, run_id: str, tmp_path: Path
) -> None:
    await plane.announce(toy_loader)
    folder = caa_dataset(tmp_path / "toyab")
    trait: dict[str, Any] = {"ref": f"caa:{folder}", "name": TRAIT, "methodology": "caa"}
    along = np.stack([2.0 * unit(CAA_DIM)] * LAYERS)
    write_extraction(plane.store, run_id, "toy@fp32", TRAIT, along, activation_norm=1.6)
    # nf4 extracted the same direction; int8 the opposite one.
    write_extraction(plane.store, run_id, "toy@nf4", TRAIT, along, activation_norm=1.6)
    write_extraction(plane.store, run_id, "toy@int8", TRAIT, -along, activation_norm=1.6)
    jobs = [_job(run_id, trait, s) for s in ("toy@fp32", "toy@nf4", "toy@int8")]
    records = await plane.run(run_id, jobs)
    assert all(r.state == JobState.DONE for r in records), [r.error for r in records]

    own, same, opposite = (_result(plane, run_id, s) for s in ("toy@fp32", "toy@nf4", "toy@int8"))
    assert (same.variant, same.source) == ("toy@fp32", "toy@nf4")
    # The same vectors under another variant's name: the native numbers, item by item.
    assert same.coefficients == own.coefficients
    np.testing.assert_allclose(
        [it.values for it in same.items], [it.values for it in own.items], rtol=0, atol=1e-5
    )
    assert own.slope.value is not None and own.slope.value > 0
    # The opposite vectors: multiple m gives what the native vectors give at -m.
    at = {m: k for k, m in enumerate(own.multiples)}
    for a, b in zip(opposite.items, own.items, strict=True):
        mirrored = [b.values[at[-m]] if -m in at else a.values[at[m]] for m in own.multiples]
        np.testing.assert_allclose(a.values, mirrored, rtol=0, atol=1e-5)
    assert opposite.slope.value is not None and opposite.slope.value < 0
