"""The ``analyze`` job: read a run's artefacts, write the comparison matrices, figures and report.

Outputs go under ``runs/<run>/analysis/`` (the job) or ``runs/<run>/analysis/report-<utc>/``
(on-demand reports, :mod:`services.analyzer.report_cmd`):

* ``started.json`` — written first, once; its ``generated_at`` is the report's date, so an
  attempt that is retried after a crash writes the same bytes as the first one would have;
* ``vector_comparison.json``, ``steering_comparison.json``, ``logit_diff_comparison.json``,
  ``benchmark_comparison.json``, ``robustness_ranking.json``, ``probe_statistics.json``;
* ``figures/<name>.png``, ``report.md`` (references ``figures/``), ``report.html``
  (self-contained);
* ``manifest.json`` — written last: every output's key and SHA-256, every input's key and
  SHA-256, and the notes. Its presence means the analysis is complete; a redelivered job that
  finds it returns at once, and every other object is write-once (``put_*`` returns False on
  an existing key), so a rerun never fails and never mixes two analyses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from services.analyzer.documents import DOCUMENTS, SCHEMA, build_all
from services.analyzer.figures import build_figures
from services.analyzer.loading import RunArtefacts, load_run
from services.analyzer.render_html import render_html
from services.analyzer.render_markdown import render_markdown
from services.analyzer.report import build_blocks
from services.common.artefacts import analysis_key
from services.common.errors import InvalidArgument
from services.common.handlers import JobContext
from services.common.jobs import Job, JobKind
from services.common.logging import get_logger
from services.common.spec import ExperimentSpec
from services.common.store import AsyncS3Store

__all__ = ["DOCUMENTS", "handle", "jsonable", "run_analysis"]

log = get_logger(__name__)


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None and numpy scalars/tuples as plain JSON types."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)
    if callable(item):  # numpy scalar
        return jsonable(item())
    return value


def _dumps(value: Any) -> bytes:
    return json.dumps(jsonable(value), sort_keys=True, ensure_ascii=False, allow_nan=False).encode()


def _classes(docs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, doc in docs.items():
        counts: Counter[str] = Counter()
        for e in doc.get("entries", []):
            c = e.get("classification")
            if c:
                counts[str(c["class"])] += 1
        if counts:
            out[name.removesuffix(".json")] = dict(counts)
    return out


async def _started(store: AsyncS3Store, key: str) -> str:
    """The analysis date: from ``started.json`` when an earlier attempt wrote it."""
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if await store.put_bytes(key, _dumps({"generated_at": now}), "application/json"):
        return now
    return str((await store.get_json(key))["generated_at"])


async def run_analysis(
    store: AsyncS3Store,
    run_id: str,
    *,
    spec: ExperimentSpec | None = None,
    variants: Sequence[str] | None = None,
    folder: Sequence[str] = (),
    run: RunArtefacts | None = None,
) -> dict[str, Any]:
    """Analyse ``run_id`` and write every output below ``analysis/<folder...>``.

    Returns the manifest (``outputs``: name -> key, ``inputs``: key -> sha256, ...).
    """

    def key(*leaf: str) -> str:
        return analysis_key(run_id, *folder, *leaf)

    manifest_key = key("manifest.json")
    if await store.exists(manifest_key):
        done: dict[str, Any] = await store.get_json(manifest_key)
        done["already_done"] = True
        return done
    generated_at = await _started(store, key("started.json"))
    if run is None:
        run = await load_run(store, run_id, spec=spec, variants=variants)
    typed = await asyncio.to_thread(build_all, run)
    docs = {name: doc.to_json() for name, doc in typed.by_name().items()}
    figures = await asyncio.to_thread(build_figures, docs)
    blocks = build_blocks(run, typed, figures, generated_at=generated_at)
    markdown = render_markdown(blocks, "figures")
    page = await asyncio.to_thread(render_html, blocks, f"qsens report — {run_id}")

    outputs: dict[str, str] = {}
    digests: dict[str, str] = {}

    async def put(name: str, k: str, data: bytes, content_type: str) -> None:
        await store.put_bytes(k, data, content_type)
        outputs[name] = k
        digests[k] = hashlib.sha256(data).hexdigest()

    for fig in figures:
        await put(
            f"figures/{fig.name}.png", key("figures", f"{fig.name}.png"), fig.png, "image/png"
        )
    for name in DOCUMENTS:
        await put(name, key(name), _dumps(docs[name]), "application/json")
    await put("report.md", key("report.md"), markdown.encode(), "text/markdown; charset=utf-8")
    await put("report.html", key("report.html"), page.encode(), "text/html; charset=utf-8")
    manifest = {
        "schema": SCHEMA,
        "kind": "manifest",
        "run_id": run_id,
        "generated_at": generated_at,
        "folder": "/".join(folder),
        "spec_fingerprint": run.spec.fingerprint(),
        "variants": [v.id for v in run.variants],
        "outputs": outputs,
        "output_sha256": digests,
        "inputs": run.inputs,
        "missing": run.missing,
        "notes": run.notes,
        "classes": _classes(docs),
    }
    await store.put_bytes(manifest_key, _dumps(manifest), "application/json")
    log.info(
        "analysis written",
        extra={"run_id": run_id, "folder": "/".join(folder), "outputs": len(outputs)},
    )
    return manifest


async def handle(job: Job, ctx: JobContext) -> dict[str, Any] | None:
    """Run the analyze job of a run (params: ``spec``, ``variants``)."""
    if job.kind is not JobKind.ANALYZE:
        raise InvalidArgument("kind", f"the analyzer handles analyze jobs, not {job.kind}")
    try:
        spec = ExperimentSpec.model_validate(job.params["spec"])
    except KeyError:
        raise InvalidArgument("params.spec", "missing") from None
    except ValidationError as exc:
        raise InvalidArgument("params.spec", str(exc)) from None
    variants = job.params.get("variants")
    if variants is not None and not (
        isinstance(variants, list) and all(isinstance(v, str) for v in variants)
    ):
        raise InvalidArgument("params.variants", "expected a list of variant ids")
    manifest = await run_analysis(ctx.store, job.run_id, spec=spec, variants=variants)
    return {
        "already_done": bool(manifest.get("already_done", False)),
        "manifest": analysis_key(job.run_id, "manifest.json"),
        "report": manifest["outputs"].get("report.html"),
        "outputs": len(manifest["outputs"]),
        "inputs": len(manifest["inputs"]),
        "classes": manifest.get("classes", {}),
        "missing": {k: len(v) for k, v in manifest.get("missing", {}).items()},
    }
