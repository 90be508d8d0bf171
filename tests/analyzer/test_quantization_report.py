"""The report's Quantization section: every gptq/awq checkpoint with its calibration set.

The quantize jobs' ``result.json`` objects are written by the real quantizer handler on the
session's S3 server: each test commits a checkpoint manifest first (a stand-in for a model
quantized earlier, with planted calibration numbers), so the job reuses it instead of running
gptqmodel, and records its result under the run as it does in a real run. The extraction
summaries carry the loader Info a gptq/awq loader reports (``planted.LOADER_QUANTIZATION``).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from pathlib import Path
from typing import Any

from services.analyzer.documents import build_all
from services.analyzer.loading import load_run
from services.analyzer.render_html import render_html
from services.analyzer.render_markdown import render_markdown
from services.analyzer.report import build_blocks
from services.analyzer.report_cmd import generate_report
from services.common.artefacts import quantize_key
from services.common.handlers import JobContext
from services.common.jobs import Job, JobKind
from services.common.planner import build_plan
from services.common.quantization import CalibrationSpec, QuantizeRequest, checkpoint_id
from services.common.spec import ExperimentSpec
from services.common.store import AsyncS3Store, S3Store
from services.quantizer.calibration import load_calibration
from services.quantizer.checkpoint import commit_checkpoint
from services.quantizer.handler import handle
from tests.analyzer.conftest import Analysed
from tests.analyzer.planted import SPEC_DICT, write_planted_run

# Planted by the committed manifests: what the quantizer measured when it made each checkpoint.
SAMPLES, TOKENS = 8, 8 * 48
QUANTIZE_SECONDS = {"gptq": 12.5, "awq": 30.25}
GPTQMODEL = "7.7.0-planted"


def _calibration_file(tmp_path: Path, name: str) -> Path:
    """A calibration set of this test alone: its sha256 (part of the checkpoint address) is new,
    so no other test's checkpoint can be found under the same id."""
    rows = [f'{{"text": "calibration text {i} of {uuid.uuid4().hex}"}}' for i in range(6)]
    path = tmp_path / name
    path.write_text("\n".join(rows) + "\n")
    return path


def _spec(calibration: Path, **changes: Any) -> ExperimentSpec:
    data: dict[str, Any] = {
        **SPEC_DICT,
        "models": SPEC_DICT["models"][:1],
        "precisions": ["bf16", "gptq", "awq"],
        "traits": ["pv/evil"],
        "methods": ["mean_diff"],
        "steering": {"enabled": False},
        "logit_diff": {"enabled": False},
        "benchmarks": [],
        "probes": {"enabled": False},
        "quantize": {
            "gptq": {"group_size": 64},
            "awq": {"group_size": 64},
            "calibration": {"source": str(calibration), "samples": SAMPLES, "seq_len": 48},
        },
        **changes,
    }
    return ExperimentSpec.model_validate(data)


def _ctx(job: Job, store: S3Store) -> JobContext:
    return JobContext(
        job=job,
        attempt=1,
        store=AsyncS3Store(store),
        log=logging.LoggerAdapter(logging.getLogger("test"), {}),
        worker_id="test",
        _msg=None,  # type: ignore[arg-type]
        _find_loader=None,  # type: ignore[arg-type]
    )


def _commit_made_checkpoint(store: S3Store, request: QuantizeRequest, tmp_path: Path) -> str:
    """Commit ``request``'s checkpoint as the quantize job would have (planted numbers)."""
    calibration = load_calibration(request.calibration)
    checkpoint = checkpoint_id(request, calibration.sha256)
    folder = tmp_path / checkpoint
    folder.mkdir()
    (folder / "config.json").write_text('{"stand_in": true}')
    info = {
        "method": request.method,
        "settings": request.settings,
        "calibration": {**calibration.describe(), "samples": SAMPLES, "tokens": TOKENS},
        "quantize_seconds": QUANTIZE_SECONDS[request.method],
        "libraries": {"gptqmodel": GPTQMODEL},
    }
    commit_checkpoint(store, checkpoint, folder, request, info)
    return checkpoint


async def _quantize_jobs(
    store: S3Store, spec: ExperimentSpec, run_id: str, tmp_path: Path, **calibrations: Path
) -> dict[str, dict[str, Any]]:
    """Run the plan's quantize jobs through the quantizer's handler; ``calibrations`` gives a
    method another calibration file than the spec's (what the warning is about)."""
    results: dict[str, dict[str, Any]] = {}
    for job in build_plan(spec, run_id).jobs:
        if job.kind is not JobKind.QUANTIZE:
            continue
        request = QuantizeRequest.model_validate(job.params)
        if request.method in calibrations:
            cal = CalibrationSpec(
                source=str(calibrations[request.method]), samples=SAMPLES, seq_len=48
            )
            request = request.model_copy(update={"calibration": cal})
            job = Job(kind=JobKind.QUANTIZE, run_id=run_id, params=request.model_dump(mode="json"))
        _commit_made_checkpoint(store, request, tmp_path)
        first = await handle(job, _ctx(job, store))
        assert first is not None
        # A redelivered job returns the record already stored (write-once), not a new one.
        again = await handle(job, _ctx(job, store))
        assert again == first
        results[request.method] = first
    return results


def _sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


async def test_report_lists_both_methods_with_one_calibration_set(
    store: S3Store, tmp_path: Path
) -> None:
    run_id = "quant-" + uuid.uuid4().hex[:10]
    calibration = _calibration_file(tmp_path, "calibration.jsonl")
    spec = _spec(calibration)
    write_planted_run(store, run_id, spec_obj=spec)
    results = await _quantize_jobs(store, spec, run_id, tmp_path)
    for method in ("gptq", "awq"):
        key = quantize_key(run_id, f"toy@{method}", "result.json")
        assert store.get_json(key) == results[method]
        assert results[method]["calibration"]["sha256"][:12] == _sha12(calibration)

    keys = await generate_report(run_id, AsyncS3Store(store))
    manifest = store.get_json(keys["manifest"])
    assert quantize_key(run_id, "toy@gptq", "result.json") in manifest["inputs"]
    assert "quantize" not in manifest["missing"]
    md = store.get_bytes(keys["report.md"]).decode()
    html = store.get_bytes(keys["report.html"]).decode()

    section = md.split("### Quantization", 1)[1].split("\n### ", 1)[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines()}
    size = calibration.stat().st_size
    for method, kernel, layout in (
        ("gptq", "TorchAtenLinear", "sym, desc_act off"),
        ("awq", "TorchAtenAwqLinear", "asym"),
    ):
        cells = [c.strip() for c in rows[f"toy@{method}"].strip("|").split(" | ")]
        checkpoint = results[method]["checkpoint"]
        assert cells == [
            f"toy@{method}",
            method,
            "4",
            "64",
            layout,
            checkpoint,
            "platform (quantize job)",
            str(calibration),
            _sha12(calibration),
            str(size),
            str(SAMPLES),
            str(TOKENS),
            f"{QUANTIZE_SECONDS[method]:.1f}",
            "yes",
            GPTQMODEL,
            kernel,
            "float32",
        ]
        assert checkpoint.startswith(f"{method}-w4g64-")
    assert (
        f"toy: one calibration set for every method (gptq, awq): sha256 {_sha12(calibration)}"
        in section
    )
    assert "Warning" not in section
    # The HTML says the same, under its own anchor.
    assert '<h3 id="quantization">Quantization</h3>' in html
    html_section = html.split('id="quantization"', 1)[1].split("<h3", 1)[0]
    assert html_section.count(_sha12(calibration)) == 3  # two rows and the one-set line
    assert "TorchAtenAwqLinear" in html_section and "one calibration set for every method" in (
        html_section
    )


async def test_different_calibration_sets_of_one_model_are_a_warning(
    store: S3Store, tmp_path: Path
) -> None:
    run_id = "quant-" + uuid.uuid4().hex[:10]
    spec_set = _calibration_file(tmp_path, "spec-set.jsonl")
    other_set = _calibration_file(tmp_path, "other-set.jsonl")
    # toy2's AWQ is a published checkpoint: no quantize job, its calibration unknown.
    models = [SPEC_DICT["models"][0], {**SPEC_DICT["models"][1], "checkpoints": {"awq": "org/awq"}}]
    spec = _spec(spec_set, models=models)
    write_planted_run(store, run_id, spec_obj=spec)
    await _quantize_jobs(store, spec, run_id, tmp_path, awq=other_set)

    run = await load_run(AsyncS3Store(store), run_id)
    assert set(run.quantization) == {"toy@gptq", "toy@awq", "toy2@gptq", "toy2@awq"}
    published = run.quantization["toy2@awq"]
    assert published.made_by == "published" and published.key is None
    assert published.checkpoint == "org/awq" and published.kernel == "TorchAtenAwqLinear"
    blocks = build_blocks(run, build_all(run), [], generated_at="now")
    md = render_markdown(blocks)
    html = render_html(blocks, "t")
    for text in (md, html):
        assert (
            f"Warning: the methods of toy were calibrated on different sets (gptq: sha256 "
            f"{_sha12(spec_set)}; awq: sha256 {_sha12(other_set)})" in text
        )
        # toy2's one platform method names its set, and no warning is raised for it.
        assert f"toy2: calibration set (gptq): sha256 {_sha12(spec_set)}" in text
        assert "toy2@awq is a published checkpoint (org/awq)" in text
        assert text.count("Warning:") == 1


def test_a_run_without_gptq_or_awq_has_no_quantization_section(analysed: Analysed) -> None:
    assert analysed.run.quantization == {}
    md = analysed.store.get_bytes(analysed.manifest["outputs"]["report.md"]).decode()
    html = analysed.store.get_bytes(analysed.manifest["outputs"]["report.html"]).decode()
    assert "## Methods and limitations" in md  # the section that would hold it is there
    assert "### Quantization" not in md and "calibration set" not in md
    assert 'id="quantization"' not in html
    assert "quantize" not in analysed.manifest["missing"]
