"""Read one run's artefacts from S3 into typed objects for the comparison builders.

The analyzer reads only from the store: the spec (job params or ``spec.json``), every
extraction's ``summary.json`` and ``vectors/<method>.safetensors``, the steerer's
``result.json`` files (steer, logit_diff, benchmark, probe), the quantize job's ``result.json``
of each platform-quantized gptq/awq variant, and, for refusal (``arditi``) traits, the layers
of ``activations.safetensors`` that the safety-neuron analysis needs.
Everything it read is listed in :attr:`RunArtefacts.inputs` with its SHA-256, so each number
in the report can be traced back to the objects it came from.

A run may disable stages or still be missing results (a dead-lettered job, an on-demand report
of a running run): what the plan expects but the bucket does not hold is collected in
:attr:`RunArtefacts.missing` and :attr:`RunArtefacts.notes`, and the report says so.

What the run should hold comes from its stored plan (``plan.json``, written at submission),
each job's params validated against its contract; a run without one (planted by hand) has its
plan rebuilt from the spec, and the notes say so. Steerer results are validated against their
contracts and read through the views of :mod:`services.analyzer.views`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ValidationError

from services.analyzer.geometry import depth_layer, safety_layers, snap_layer
from services.analyzer.quantize_view import QuantizeView, parse_quantize
from services.analyzer.run_keys import RunKeys, missing_results, sort_keys
from services.analyzer.views import (
    BenchmarkView,
    LogitDiffView,
    ProbeView,
    SteerView,
    parse_benchmark,
    parse_logit_diff,
    parse_probe,
    parse_steer,
    per_question_scores,
    validate_result,
)
from services.common.artefacts import ExtractSummary
from services.common.contracts import steer_results as contract
from services.common.contracts.vectors import VectorSet
from services.common.dag import plan_key
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.jobs import RunPlan
from services.common.methodologies import methodology_info
from services.common.planner import PlannedVariant, build_plan, variants_of
from services.common.precisions import precision_info
from services.common.spec import ExperimentSpec
from services.common.store import AsyncS3Store, run_key, run_prefix
from services.common.tensor_codec import load_safetensors

__all__ = ["Activations", "Extraction", "RunArtefacts", "load_run"]

_CONCURRENCY = 8
_V = TypeVar("_V")
_M = TypeVar("_M", bound=BaseModel)
F32 = NDArray[np.float32]


# ---------------------------------------------------------------------------------------------
# Extractions.


@dataclass
class Activations:
    """Captured activations of one extraction, restricted to the layers the analysis needs.

    ``groups`` maps ``train_pos``/``train_neg``/``val_pos``/``val_neg`` to ``[n, L', H]``
    (``L'`` = ``len(layers)``), ``pair_ids`` the same names to the ids of their rows.
    """

    key: str
    layers: tuple[int, ...]
    groups: dict[str, F32]
    pair_ids: dict[str, list[str]]


@dataclass
class Extraction:
    """One extraction (variant x trait x vector mode): its summary and vectors."""

    variant: str
    trait: str
    mode: str
    summary: ExtractSummary
    summary_key: str
    vectors: dict[str, VectorSet]
    vector_keys: dict[str, str]
    activations: Activations | None = None

    @property
    def num_layers(self) -> int:
        """The model's layer count (loader info when recorded, else the deepest captured + 1)."""
        raw = self.summary.loader.get("num_layers")
        recorded = int(raw) if isinstance(raw, int) and not isinstance(raw, bool) else None
        deepest = max(self.summary.layers) + 1 if self.summary.layers else 0
        return max(recorded or 0, deepest)


# ---------------------------------------------------------------------------------------------
# The run.


@dataclass
class RunArtefacts:
    """Everything the analysis reads about one run."""

    run_id: str
    spec: ExperimentSpec
    variants: list[PlannedVariant]
    extractions: dict[tuple[str, str, str], Extraction]  # (variant, trait, mode)
    steer: list[SteerView]
    logit_diff: list[LogitDiffView]
    benchmarks: list[BenchmarkView]
    probes: list[ProbeView]
    inputs: dict[str, str]  # key -> sha256 of the bytes read
    missing: dict[str, list[str]]  # stage -> expected keys not in the bucket
    notes: list[str]
    loader_notes: dict[str, list[str]]  # variant -> the loader's notes
    # gptq/awq variant -> how its checkpoint was made and served (empty without such variants)
    quantization: dict[str, QuantizeView] = field(default_factory=dict)
    # 2x2 replay: (reference, trait, variant whose text it read) -> the reference's extraction
    reverse: dict[tuple[str, str, str], Extraction] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return self.spec.reference.value

    def reference_of(self, model: str) -> str:
        return f"{model}@{self.spec.reference.value}"

    def variant(self, variant_id: str) -> PlannedVariant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise NotFound(f"variant {variant_id} is not in the run's plan")

    def models(self) -> list[str]:
        return list(dict.fromkeys(v.model.name for v in self.variants))


class _Reader:
    """Reads objects (bounded concurrency) and records each one's SHA-256."""

    def __init__(self, store: AsyncS3Store) -> None:
        self.store = store
        self.inputs: dict[str, str] = {}
        self.slots = asyncio.Semaphore(_CONCURRENCY)

    async def bytes(self, key: str) -> bytes:
        async with self.slots:
            data = await self.store.get_bytes(key)
        self.inputs[key] = hashlib.sha256(data).hexdigest()
        return data

    async def json(self, key: str) -> Any:
        return json.loads(await self.bytes(key))

    async def jsonl(self, key: str) -> list[Any]:
        text = (await self.bytes(key)).decode("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    async def result(self, key: str, stage: str, model: type[_M]) -> _M:
        """A steerer ``result.json`` validated against its contract."""
        return validate_result(await self.json(key), stage, key, model)

    async def rows(self, key: str, model: type[_M]) -> list[_M]:
        """The rows of a JSON-lines object, each validated against ``model``."""
        rows = await self.jsonl(key)
        return [validate_result(row, "answers", f"{key}[{i}]", model) for i, row in enumerate(rows)]


def _present(values: Iterable[_V | None]) -> list[_V]:
    return [v for v in values if v is not None]


async def _read_plan(reader: _Reader, spec: ExperimentSpec, run_id: str) -> tuple[RunPlan, str]:
    """The run's stored plan, or (no ``plan.json``) one rebuilt from the spec with a note."""
    key = plan_key(run_id)
    if not await reader.store.exists(key):
        note = "The run has no plan.json; the jobs it expects were planned again from the spec."
        return build_plan(spec, run_id), note
    doc = await reader.json(key)
    doc = {k: v for k, v in doc.items() if k != "job_ids"} if isinstance(doc, dict) else doc
    try:
        return RunPlan.model_validate(doc), ""
    except (ValidationError, InvalidArgument) as exc:
        raise FailedPrecondition(f"{key}: not a valid run plan ({exc})") from None


def _activation_layers(spec: ExperimentSpec, layers: Sequence[int], num_layers: int) -> list[int]:
    """Captured layers the safety analysis uses: refusal depth and five in [20%, 80%]."""
    wanted = {snap_layer(depth_layer(spec.analysis.refusal_depth, num_layers), layers)}
    wanted.update(safety_layers(layers, num_layers))
    return sorted(wanted)


async def _load_activations(reader: _Reader, key: str, keep: Sequence[int]) -> Activations:
    tensors, metadata = load_safetensors(await reader.bytes(key))
    layers = [int(x) for x in json.loads(metadata.get("layers", "[]"))]
    pair_ids_raw = json.loads(metadata.get("pair_ids", "{}"))
    index = [layers.index(layer) for layer in keep if layer in layers]
    groups: dict[str, F32] = {}
    for name in ("train_pos", "train_neg", "val_pos", "val_neg"):
        if name in tensors:
            arr = tensors[name]
            groups[name] = np.ascontiguousarray(arr[:, index], dtype=np.float32)
    return Activations(
        key=key,
        layers=tuple(layers[i] for i in index),
        groups=groups,
        pair_ids={str(k): [str(x) for x in v] for k, v in pair_ids_raw.items()},
    )


async def _extractions(
    reader: _Reader, spec: ExperimentSpec, keys: RunKeys, present: set[str]
) -> dict[tuple[str, str, str], Extraction]:
    """Every extraction's summary and vectors; refusal traits also their activations."""
    refusal = {
        spec.trait_name(t)
        for t in spec.traits
        if methodology_info(t.methodology).harmful_instructions
    }

    async def one(key: str, variant: str, trait: str, mode: str) -> Extraction:
        summary = ExtractSummary.model_validate(await reader.json(key))
        vectors: dict[str, VectorSet] = {}
        for method, vkey in sorted(summary.vector_keys.items()):
            vectors[method] = VectorSet.from_safetensors(await reader.bytes(vkey))
        ex = Extraction(variant, trait, mode, summary, key, vectors, dict(summary.vector_keys))
        acts = summary.activations_key
        if trait in refusal and mode == "native" and acts and acts in present:
            keep = _activation_layers(spec, summary.layers, ex.num_layers)
            ex.activations = await _load_activations(reader, acts, keep)
        return ex

    loaded = await asyncio.gather(*(one(*args) for args in keys.summaries))
    return {(e.variant, e.trait, e.mode): e for e in loaded}


async def _reverse_extractions(
    reader: _Reader, keys: RunKeys
) -> dict[tuple[str, str, str], Extraction]:
    """The reference's extractions on other variants' text (``extraction.replay: 2x2``)."""

    async def one(key: str, ref: str, trait: str, text: str) -> Extraction:
        summary = ExtractSummary.model_validate(await reader.json(key))
        vectors = {
            method: VectorSet.from_safetensors(await reader.bytes(vkey))
            for method, vkey in sorted(summary.vector_keys.items())
        }
        return Extraction(ref, trait, "reverse", summary, key, vectors, dict(summary.vector_keys))

    loaded = await asyncio.gather(*(one(*args) for args in keys.reverse))
    return {(e.variant, e.trait, e.summary.replay_from or ""): e for e in loaded}


def _steer_identity(parts: list[str]) -> dict[str, str]:
    """A steer result's identity from its key's parts."""
    method, _, vmode = parts[5].rpartition("-")
    mode, _, sign = parts[6].rpartition("-")
    return {
        "target": parts[0],
        "source": parts[4],
        "trait": f"{parts[2]}/{parts[3]}",
        "method": method,
        "vector_mode": vmode,
        "mode": mode,
        "direction": "+" if sign == "pos" else "-",
    }


async def _steer_view(reader: _Reader, key: str, parts: list[str], present: set[str]) -> SteerView:
    result = await reader.result(key, "steer", contract.SteerResult)
    view = parse_steer(result, key=key, **_steer_identity(parts))
    # Per-question scores of the best run and of the baseline, for paired intervals.
    if view.best_run_index is not None and view.runs_key in present:
        for row in await reader.rows(view.runs_key, contract.SteerRun):
            if row.run_index == view.best_run_index:
                view.best_per_question = per_question_scores(row.answers)
                view.per_question_keys.append(view.runs_key)
                break
    if view.baseline_key and view.baseline_key in present:
        rows = await reader.rows(view.baseline_key, contract.BaselineRow)
        view.baseline_per_question = per_question_scores(rows)
        view.per_question_keys.append(view.baseline_key)
    return view


async def _logit_diff_view(reader: _Reader, key: str, parts: list[str]) -> LogitDiffView:
    method, _, vmode = parts[5].rpartition("-")
    return parse_logit_diff(
        await reader.result(key, "logit_diff", contract.LogitDiffResult),
        key=key,
        variant=parts[0],
        source=parts[4],
        trait=f"{parts[2]}/{parts[3]}",
        method=method,
        vector_mode=vmode,
    )


@dataclass
class _Results:
    steer: list[SteerView]
    logit_diff: list[LogitDiffView]
    benchmarks: list[BenchmarkView]
    probes: list[ProbeView]
    refused: list[str]


async def _results(reader: _Reader, keys: RunKeys, present: set[str]) -> _Results:
    """Every steerer result as a view; ones that do not validate are refused with a reason."""
    refused: list[str] = []

    async def guarded(coro: Awaitable[_V]) -> _V | None:
        try:
            return await coro
        except FailedPrecondition as err:
            refused.append(str(err))
            return None

    async def benchmark(key: str, parts: list[str]) -> BenchmarkView:
        result = await reader.result(key, "benchmark", contract.BenchmarkResult)
        return parse_benchmark(result, key=key, variant=parts[0], name=parts[2])

    async def probe(key: str, parts: list[str]) -> ProbeView:
        result = await reader.result(key, "probe", contract.ProbeResult)
        return parse_probe(result, key=key, variant=parts[0], name=parts[2])

    steer = await asyncio.gather(
        *(guarded(_steer_view(reader, k, p, present)) for k, p in keys.steer)
    )
    ld = await asyncio.gather(
        *(guarded(_logit_diff_view(reader, k, p)) for k, p in keys.logit_diff)
    )
    bench = await asyncio.gather(*(guarded(benchmark(k, p)) for k, p in keys.benchmark))
    probes = await asyncio.gather(*(guarded(probe(k, p)) for k, p in keys.probe))
    return _Results(
        steer=sorted(_present(steer), key=lambda v: v.key),
        logit_diff=sorted(_present(ld), key=lambda v: v.key),
        benchmarks=sorted(_present(bench), key=lambda v: v.key),
        probes=sorted(_present(probes), key=lambda v: v.key),
        refused=sorted(refused),
    )


def _spec_notes(spec: ExperimentSpec) -> list[str]:
    """What the spec left out of the analysis."""
    notes: list[str] = []
    if not spec.steering.enabled:
        notes.append("Steering is disabled in the spec (steering.enabled: false).")
    if not spec.logit_diff.enabled:
        notes.append("Logit difference is disabled in the spec (logit_diff.enabled: false).")
    elif not any(methodology_info(t.methodology).logit_diff for t in spec.traits):
        notes.append("No CAA trait in the spec: no logit-difference results.")
    if not spec.benchmarks:
        notes.append("No capability benchmarks in the spec.")
    if not spec.probes.enabled:
        notes.append("Safety probes are disabled in the spec (probes.enabled: false).")
    if not spec.extraction.store_activations:
        notes.append(
            "Activations were not stored (extraction.store_activations: false): no safety-neuron "
            "analysis."
        )
    return notes


def _loader_notes(extractions: Mapping[tuple[str, str, str], Extraction]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ex in extractions.values():
        for note in ex.summary.loader.get("notes") or []:
            bucket = out.setdefault(ex.variant, [])
            if str(note) not in bucket:
                bucket.append(str(note))
    return out


async def _read_spec(reader: _Reader, run_id: str) -> ExperimentSpec:
    try:
        return ExperimentSpec.model_validate(await reader.json(run_key(run_id, "spec.json")))
    except NotFound:
        raise NotFound(f"run {run_id}: no spec.json in the bucket (was it submitted?)") from None


async def load_run(
    store: AsyncS3Store,
    run_id: str,
    *,
    spec: ExperimentSpec | None = None,
    variants: Sequence[str] | None = None,
) -> RunArtefacts:
    """Read every artefact of ``run_id`` that the analysis uses (see the module docstring)."""
    reader = _Reader(store)
    if spec is None:
        spec = await _read_spec(reader, run_id)
    plan, plan_note = await _read_plan(reader, spec, run_id)
    planned = variants_of(spec)
    if variants is not None:
        planned = [v for v in planned if v.id in set(variants)]
    variant_ids = {v.id for v in planned}
    prefix = run_prefix(run_id)
    present = set(await store.list_keys(prefix))
    keys = sort_keys(sorted(present), prefix, variant_ids)
    extractions = await _extractions(reader, spec, keys, present)
    results = await _results(reader, keys, present)
    missing = missing_results(plan, prefix, present, variant_ids)
    notes = [f"Not read: {reason}." for reason in results.refused]
    notes += [plan_note] if plan_note else []
    notes += _spec_notes(spec)
    for stage, gone in missing.items():
        notes.append(
            f"{len(gone)} expected {stage} result(s) are not in the bucket (failed, cancelled or "
            "still running); the tables leave those cells out."
        )
    quantization = await _quantization(reader, planned, extractions, keys.quantize)
    return RunArtefacts(
        run_id=run_id,
        spec=spec,
        variants=planned,
        extractions=extractions,
        steer=results.steer,
        logit_diff=results.logit_diff,
        benchmarks=results.benchmarks,
        probes=results.probes,
        inputs=dict(sorted(reader.inputs.items())),
        missing=missing,
        notes=notes,
        loader_notes=_loader_notes(extractions),
        quantization=quantization,
        reverse=await _reverse_extractions(reader, keys),
    )


async def _quantization(
    reader: _Reader,
    planned: Sequence[PlannedVariant],
    extractions: Mapping[tuple[str, str, str], Extraction],
    result_keys: Mapping[str, str],
) -> dict[str, QuantizeView]:
    """A :class:`QuantizeView` per gptq/awq variant: its quantize result and its loader's Info."""
    out: dict[str, QuantizeView] = {}
    for v in planned:
        if not precision_info(v.precision).platform_quantized:
            continue
        key = result_keys.get(v.id)
        raw = await reader.json(key) if key else None
        # Any extraction of the variant: one loader served them all (first by key, stable).
        summaries = sorted(
            (ex.summary_key, ex.summary.loader) for ex in extractions.values() if ex.variant == v.id
        )
        loader_key, loader = summaries[0] if summaries else (None, None)
        out[v.id] = parse_quantize(
            raw if isinstance(raw, Mapping) else None,
            loader,
            variant=v.id,
            key=key,
            loader_source=loader_key,
        )
    return out
