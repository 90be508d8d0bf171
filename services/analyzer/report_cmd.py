"""``qsens report RUN``: render a run's analysis on demand, without ever replacing one.

Policy (documented in docs/ARTEFACTS.md, ``## analyzer``):

* ``analysis/`` belongs to the run's ``analyze`` job. If it is complete and the run's inputs
  are exactly the ones it read (same keys, same SHA-256, same spec fingerprint), the existing
  outputs are returned and nothing is written.
* Otherwise (no analysis yet, a run still in progress, results added since, or
  ``analysis.enabled: false``) a fresh analysis is written to
  ``analysis/report-<YYYYmmdd-HHMMSS>[-n]/`` with the same layout, and its keys are returned.
  Writing on-demand reports into ``analysis/`` itself would make the final analyze job find
  a complete-looking analysis of partial results and skip.
"""

from __future__ import annotations

import time

from services.analyzer.handler import run_analysis
from services.analyzer.loading import load_run
from services.common.artefacts import analysis_key
from services.common.store import AsyncS3Store, run_key

__all__ = ["generate_report"]

_MAX_SUFFIX = 100


async def generate_report(run_id: str, store: AsyncS3Store) -> dict[str, str]:
    """Keys of the report's outputs (name -> S3 key), plus ``manifest`` and ``folder``."""
    run = await load_run(store, run_id)
    main_manifest = analysis_key(run_id, "manifest.json")
    if await store.exists(main_manifest):
        existing = await store.get_json(main_manifest)
        # The job gets its spec in its params rather than from spec.json: compare the spec by
        # fingerprint and every other input by key and digest.
        spec_key = run_key(run_id, "spec.json")
        same_inputs = {k: v for k, v in run.inputs.items() if k != spec_key} == {
            k: v for k, v in existing.get("inputs", {}).items() if k != spec_key
        }
        if same_inputs and existing.get("spec_fingerprint") == run.spec.fingerprint():
            return {
                **existing["outputs"],
                "manifest": main_manifest,
                "folder": analysis_key(run_id, "manifest.json").rsplit("/", 1)[0],
            }
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for n in range(_MAX_SUFFIX):
        folder = f"report-{stamp}" if n == 0 else f"report-{stamp}-{n}"
        if not await store.exists(analysis_key(run_id, folder, "started.json")):
            break
    manifest = await run_analysis(store, run_id, spec=run.spec, folder=(folder,), run=run)
    return {
        **manifest["outputs"],
        "manifest": analysis_key(run_id, folder, "manifest.json"),
        "folder": analysis_key(run_id, folder, "manifest.json").rsplit("/", 1)[0],
    }
