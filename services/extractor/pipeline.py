"""One extraction: contrast set -> responses (generated or replayed) -> vetting -> capture ->
vectors for every layer and method -> artefacts in S3.

The extractor never loads weights: generation and activations come from the variant's loader
over gRPC, judgements from the judge service. ``summary.json`` is written last, so its presence
means the extraction is complete; a redelivered job that finds it returns at once, and every
other object is write-once, so a crash at any point loses and duplicates nothing (the worker
runtime checks for it before the job runs: ``extract_result_key``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.common.artefacts import extract_key
from services.common.contracts.extract import (
    ExtractOutcome,
    ExtractParams,
    ExtractSummary,
    VettingSummary,
    extraction_key,
)
from services.common.contracts.vectors import VectorSet
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.hashing import stable_hash
from services.common.logging import get_logger
from services.common.spec import ExtractionSpec, VettingSpec
from services.common.store import AsyncS3Store
from services.common.tensor_codec import save_safetensors
from services.extractor.datasets import (
    ContrastExample,
    TraitDataset,
    build_contrast_set,
    check_methodology,
    load_trait,
)
from services.extractor.methods import compute_vectors
from services.loader.capabilities import Needs, Reduction
from services.loader.client import Chat, LoaderClient, LoaderInfo, PromptItem
from services.loader.positions import parse_position

__all__ = [
    "ExtractParams",
    "JudgeLike",
    "TooFewVettedExamples",
    "extract_needs",
    "extract_result_key",
    "extract_summary",
    "run_extraction",
]

# Activations are averaged over the position's tokens (``_capture``).
CAPTURE_REDUCTION: Reduction = "mean"

log = get_logger(__name__)


class TooFewVettedExamples(FailedPrecondition):
    """Vetting left fewer examples of a class than ``extraction.vetting.min_keep`` (train) or
    none (held-out): a vector resting on so few pairs is not computed. Not retried."""

    def __init__(self, split: str, label: str, have: int, need: int, where: str) -> None:
        self.split, self.label, self.have, self.need = split, label, have, need
        super().__init__(
            f"{where}: only {have} {split} {label} examples survived vetting (need {need}); "
            "relax extraction.vetting or add rollouts"
        )


# (pairs, eval_prompt, positive exemplars, negative exemplars, trait name) -> judge results
JudgeLike = Callable[[Sequence[tuple[str, str]], TraitDataset, str], Awaitable[list[Any]]]


@dataclass
class _Row:
    example: ContrastExample
    split: str
    response: str | None = None
    score: float | None = None
    status: str | None = None
    reason: str | None = None
    refusal_over_score: bool = False
    kept: bool = True

    @property
    def key(self) -> str:
        ex = self.example
        return f"{self.split}|{ex.pair_id}|{ex.label}|{stable_hash(ex.message_dicts(), 10)}"

    def to_json(self) -> dict[str, Any]:
        ex = self.example
        return {
            "key": self.key,
            "split": self.split,
            "pair_id": ex.pair_id,
            "label": ex.label,
            "question": ex.question,
            "messages": ex.message_dicts(),
            "continue_final_message": ex.continue_final_message,
            "response": self.response,
            "judge": None
            if self.status is None
            else {
                "score": self.score,
                "status": self.status,
                "reason": self.reason,
                "refusal_over_score": self.refusal_over_score,
            },
            "kept": self.kept,
        }


def _prompt(example: ContrastExample) -> Chat:
    return Chat.of(example.message_dicts(), continue_final=example.continue_final_message)


def _row_seed(seed: int, key: str) -> int:
    return int(stable_hash([seed, key], 15), 16)


async def _generate(rows: list[_Row], loader: LoaderClient, p: ExtractionSpec) -> None:
    items = [PromptItem(_prompt(r.example), seed=_row_seed(p.seed, r.key)) for r in rows]
    outputs = await loader.generate(
        items, max_new_tokens=p.max_new_tokens, temperature=p.temperature, seed=p.seed
    )
    for row, out in zip(rows, outputs, strict=True):
        row.response = out.text


async def _replay(rows: list[_Row], store: AsyncS3Store, key: str) -> None:
    """Take the reference's responses (and its vetting decisions) byte for byte."""
    try:
        reference = {r["key"]: r for r in await store.get_jsonl(key)}
    except NotFound:
        raise FailedPrecondition(f"replay: the reference responses {key} do not exist") from None
    for row in rows:
        ref = reference.get(row.key)
        if ref is None:
            raise FailedPrecondition(f"replay: {key} has no response for {row.key}")
        row.response = ref["response"]
        row.kept = bool(ref["kept"])
        judge = ref.get("judge")
        if judge:
            row.score, row.status, row.reason = (
                judge.get("score"),
                judge.get("status"),
                judge.get("reason"),
            )


async def _vet(
    rows: list[_Row], dataset: TraitDataset, vetting: VettingSpec, judge: JudgeLike
) -> VettingSummary:
    results = await judge(
        [(r.example.question, r.response or "") for r in rows], dataset, dataset.name
    )
    summary = VettingSummary(
        enabled=True, positive_min=vetting.positive_min, negative_max=vetting.negative_max
    )
    scores = {1: [], 0: []}  # type: dict[int, list[float]]
    refusals = {1: 0, 0: 0}
    for row, res in zip(rows, results, strict=True):
        row.status = str(getattr(res.status, "value", res.status))
        row.score = res.score
        row.reason = None if res.reason is None else str(getattr(res.reason, "value", res.reason))
        row.refusal_over_score = bool(getattr(res, "refusal_over_score", False))
        summary.refusal_over_score += int(row.refusal_over_score)
        summary.judge_backend, summary.judge_model, summary.rubric_hash = (
            res.backend,
            res.model,
            res.rubric_hash,
        )
        label = row.example.label
        if row.status == "refusal":
            refusals[label] += 1
            row.kept = label == 0  # a refusal shows no trait: fine as a negative only
        elif row.status == "scored" and row.score is not None:
            scores[label].append(row.score)
            row.kept = (
                row.score >= vetting.positive_min
                if label == 1
                else row.score <= vetting.negative_max
            )
        else:
            summary.unscorable += 1
            row.kept = False
        if label == 1:
            summary.kept_pos += int(row.kept)
            summary.dropped_pos += int(not row.kept)
        else:
            summary.kept_neg += int(row.kept)
            summary.dropped_neg += int(not row.kept)
    n_pos = sum(1 for r in rows if r.example.label == 1)
    n_neg = len(rows) - n_pos
    summary.refusal_rate_pos = refusals[1] / max(1, n_pos)
    summary.refusal_rate_neg = refusals[0] / max(1, n_neg)
    summary.mean_score_pos = float(np.mean(scores[1])) if scores[1] else None
    summary.mean_score_neg = float(np.mean(scores[0])) if scores[0] else None
    return summary


def extract_result_key(run_id: str, params: ExtractParams) -> str:
    """Where an extraction's ``summary.json`` goes (written last: its presence means done)."""
    return extraction_key(run_id, params, "summary.json")


def extract_summary(done: ExtractSummary, key: str) -> dict[str, Any]:
    """The job-record summary of an extraction found complete (a redelivered job)."""
    return ExtractOutcome(
        variant=done.variant,
        trait=done.trait,
        mode=done.mode,
        already_done=True,
        n_train_pos=done.n_train_pos,
    ).model_dump(mode="json", exclude_unset=True)


@dataclass(frozen=True)
class _Job:
    """One extraction's identity and where its artefacts go."""

    run_id: str
    params: ExtractParams
    store: AsyncS3Store

    def key(self, *leaf: str) -> str:
        return extraction_key(self.run_id, self.params, *leaf)

    def reference_key(self, leaf: str) -> str:
        """An artefact of the native extraction this replay (or reverse replay: the reference
        on another variant's text) takes its responses from."""
        p = self.params
        if not p.replay_from:
            raise InvalidArgument("params.replay_from", "replay mode needs a reference variant")
        return extract_key(self.run_id, p.replay_from, p.trait.name, "native", leaf)


def _contrast_rows(dataset: TraitDataset, p: ExtractionSpec) -> list[_Row]:
    splits = dataset.split(p.seed, p.n_train, p.n_val)
    rows = [
        _Row(ex, "train") for ex in build_contrast_set(dataset, splits.train, rollouts=p.rollouts)
    ]
    rows += [_Row(ex, "val") for ex in build_contrast_set(dataset, splits.val, rollouts=p.rollouts)]
    return rows


async def _responses(
    job: _Job,
    rows: list[_Row],
    dataset: TraitDataset,
    loader: LoaderClient,
    judge: JudgeLike | None,
) -> VettingSummary:
    """Fill the rows' responses (generated, or the reference's when replaying) and vet them."""
    params, p = job.params, job.params.extraction
    needs_response = any(r.example.generate for r in rows) or params.position.startswith("response")
    if not needs_response:
        return VettingSummary(enabled=False)
    if params.mode in ("replay", "reverse"):
        await _replay(rows, job.store, job.reference_key("responses.jsonl"))
        return VettingSummary.model_validate(
            await job.store.get_json(job.reference_key("vetting.json"))
        )
    await _generate(rows, loader, p)
    if not (p.vetting.enabled and judge is not None):
        return VettingSummary(enabled=False)
    vetting = await _vet(rows, dataset, p.vetting, judge)
    vetting.positive_min, vetting.negative_max = p.vetting.positive_min, p.vetting.negative_max
    return vetting


def _check_kept(kept: list[_Row], params: ExtractParams) -> None:
    """TooFewVettedExamples when vetting left a split's class short."""
    p = params.extraction
    for split in ("train", "val"):
        for label in (1, 0):
            have = sum(1 for r in kept if r.split == split and r.example.label == label)
            need = p.vetting.min_keep if split == "train" else (1 if p.n_val else 0)
            if have < need:
                raise TooFewVettedExamples(
                    split,
                    "positive" if label else "negative",
                    have,
                    need,
                    f"{params.trait.name} on {params.variant}",
                )


_Groups = dict[str, tuple[np.ndarray, list[str]]]


def _groups(kept: list[_Row], acts: np.ndarray) -> _Groups:
    """``train_pos`` ... ``val_neg``: activations [n, L, H] and pair ids of each part."""
    groups: _Groups = {}
    for split in ("train", "val"):
        for label, name in ((1, "pos"), (0, "neg")):
            idx = [i for i, r in enumerate(kept) if r.split == split and r.example.label == label]
            groups[f"{split}_{name}"] = (acts[idx], [kept[i].example.pair_id for i in idx])
    return groups


async def _vectors(job: _Job, groups: _Groups, layers: list[int]) -> dict[str, VectorSet]:
    params = job.params
    meta = {
        "variant": params.variant,
        "trait": params.trait.name,
        "mode": params.mode,
        "position": params.position,
    }
    return await asyncio.to_thread(
        compute_vectors,
        groups["train_pos"][0],
        groups["train_neg"][0],
        groups["val_pos"][0] if len(groups["val_pos"][0]) else None,
        groups["val_neg"][0] if len(groups["val_neg"][0]) else None,
        methods=params.methods,
        pos_ids=groups["train_pos"][1],
        neg_ids=groups["train_neg"][1],
        seed=params.extraction.seed,
        layers=layers,
        meta=meta,
    )


async def _store_arrays(
    job: _Job, groups: _Groups, layers: list[int], vectors: dict[str, VectorSet]
) -> tuple[str | None, dict[str, str]]:
    """Write the activations (if kept) and every method's vector set; returns their keys."""
    activations_key = None
    if job.params.extraction.store_activations:
        activations_key = job.key("activations.safetensors")
        blob = save_safetensors(
            {name: arr for name, (arr, _ids) in groups.items()},
            {
                "layers": layers,
                "position": job.params.position,
                "pair_ids": {n: ids for n, (_a, ids) in groups.items()},
            },
        )
        await job.store.put_bytes(activations_key, blob, content_type="application/octet-stream")
    vector_keys: dict[str, str] = {}
    for method, vs in vectors.items():
        vector_keys[method] = job.key("vectors", f"{method}.safetensors")
        await job.store.put_bytes(
            vector_keys[method], vs.to_safetensors(), content_type="application/octet-stream"
        )
    return activations_key, vector_keys


def _loader_provenance(info: LoaderInfo) -> dict[str, Any]:
    return {
        "variant": info.variant,
        "backend": info.backend,
        "dtype": info.dtype,
        "device": info.device,
        "parameter_bytes": info.parameter_bytes,
        "quantization_config": info.quantization_config,
        "source": info.source,
        "notes": info.notes,
    }


async def run_extraction(
    run_id: str,
    params: ExtractParams,
    *,
    store: AsyncS3Store,
    loader: LoaderClient,
    judge: JudgeLike | None,
) -> dict[str, Any]:
    """Run one extraction job; returns a small summary for the job record."""
    started = time.perf_counter()
    job = _Job(run_id, params, store)
    # An s3:// trait is downloaded by the reader: off the event loop, which serves the worker's
    # other jobs and its NATS heartbeats meanwhile.
    dataset = await asyncio.to_thread(load_trait, params.trait.ref)
    info = await loader.info()
    check_methodology(
        dataset, info.supports_system_role, info.supports_chat_template, model=params.variant
    )
    p = params.extraction
    rows = _contrast_rows(dataset, p)
    vetting = await _responses(job, rows, dataset, loader, judge)
    kept = [r for r in rows if r.kept]
    _check_kept(kept, params)
    await store.put_jsonl(job.key("responses.jsonl"), [r.to_json() for r in rows])
    await store.put_json(job.key("vetting.json"), vetting.model_dump(mode="json"))
    acts, layers = await _capture(loader, kept, params)
    groups = _groups(kept, acts)
    vectors = await _vectors(job, groups, layers)
    activations_key, vector_keys = await _store_arrays(job, groups, layers, vectors)
    summary = ExtractSummary(
        run_id=run_id,
        variant=params.variant,
        model=info.model,
        precision=info.precision,
        trait=params.trait.name,
        methodology=dataset.methodology,
        mode=params.mode,
        replay_from=params.replay_from if params.mode != "native" else None,
        position=params.position,
        layers=layers,
        methods=list(vectors),
        n_train_pos=len(groups["train_pos"][1]),
        n_train_neg=len(groups["train_neg"][1]),
        n_val_pos=len(groups["val_pos"][1]),
        n_val_neg=len(groups["val_neg"][1]),
        activation_norm=np.linalg.norm(acts, axis=-1).mean(axis=0).astype(float).tolist(),
        vector_keys=vector_keys,
        activations_key=activations_key,
        responses_key=job.key("responses.jsonl"),
        vetting=vetting,
        auroc={
            m: [None if not np.isfinite(x) else float(x) for x in vs.auroc]
            for m, vs in vectors.items()
        },
        norms={m: [float(x) for x in vs.norms] for m, vs in vectors.items()},
        loader=_loader_provenance(info),
        generation={
            "max_new_tokens": p.max_new_tokens,
            "temperature": p.temperature,
            "seed": p.seed,
            "rollouts": p.rollouts,
        },
        dataset_fingerprint=dataset.fingerprint(),
        seconds=time.perf_counter() - started,
    )
    await store.put_json(job.key("summary.json"), json.loads(summary.model_dump_json()))
    return _outcome(summary, params)


def extract_needs(params: ExtractParams) -> Needs:
    """What the extraction asks of its loader: the capture at its position, and generation
    when it answers its own contrast rows (native mode; replays read another's answers)."""
    segment = parse_position(params.position, "position").segment
    return Needs.of(
        *(("generate",) if params.mode == "native" else ()),
        captures=[(segment, CAPTURE_REDUCTION)],
    )


async def _capture(
    loader: LoaderClient, kept: list[_Row], params: ExtractParams
) -> tuple[NDArray[np.float32], list[int]]:
    """Mean activations of the kept rows' responses: ([N, L, H] float32, the layers)."""
    capture = await loader.capture(
        [PromptItem(_prompt(r.example), response=r.response) for r in kept],
        position=params.position,
        layers=params.layers,
        reduction=CAPTURE_REDUCTION,
    )
    return capture.stacked().astype(np.float32), list(capture.layers)


def _outcome(summary: ExtractSummary, params: ExtractParams) -> dict[str, Any]:
    """The job-record summary: counts and each method's AUROC at the middle layer."""
    mid = len(summary.layers) // 2
    return ExtractOutcome(
        variant=params.variant,
        trait=params.trait.name,
        mode=params.mode,
        n_train_pos=summary.n_train_pos,
        n_train_neg=summary.n_train_neg,
        auroc_mid={m: v[mid] for m, v in summary.auroc.items()},
        seconds=round(summary.seconds, 2),
    ).model_dump(mode="json", exclude_unset=True)
