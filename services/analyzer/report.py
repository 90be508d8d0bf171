"""The report as blocks: summary, one section per analysis document, methods, provenance.

The sections of the results live beside their documents (:mod:`services.analyzer.documents`);
this module orders them and adds the summary, the methods (:mod:`services.analyzer.report_methods`)
and the provenance. :mod:`services.analyzer.render_markdown` and
:mod:`services.analyzer.render_html` render the blocks, so ``report.md`` and ``report.html``
say the same thing; every number in a table is copied from the document its section names.
"""

from __future__ import annotations

from collections import Counter
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
from services.analyzer.documents import Documents
from services.analyzer.documents.benchmarks import benchmarks_section
from services.analyzer.documents.both_directions import both_directions_section
from services.analyzer.documents.logit_diff import logit_diff_section
from services.analyzer.documents.ranking import ranking_section
from services.analyzer.documents.safety import safety_section
from services.analyzer.documents.steering import steering_section
from services.analyzer.documents.vectors import vectors_section
from services.analyzer.figures import FigureImage
from services.analyzer.loading import RunArtefacts
from services.analyzer.report_methods import SMOLLM2_NOTE, methods_section

__all__ = ["build_blocks"]


def _summary(docs: Documents) -> list[Block]:
    sources = {
        "vector_cosine": [e.model_dump(by_alias=True) for e in docs.vectors.entries],
        "steering_degradation_pct": [e.model_dump(by_alias=True) for e in docs.steering.entries],
        "logit_diff_correlation": [e.model_dump(by_alias=True) for e in docs.logit_diff.entries],
        "benchmark_drop_pp": [e.model_dump(by_alias=True) for e in docs.benchmarks.entries],
    }
    rows: list[tuple[Cell, ...]] = []
    worst: list[str] = []
    for metric, entries in sources.items():
        counts: Counter[str] = Counter()
        for e in entries:
            c = e.get("classification")
            if not c:
                continue
            counts[c["class"]] += 1
            if c["class"] == "broken":
                who = e.get("variant") or e.get("target")
                what = " · ".join(
                    str(e[k]) for k in ("trait", "benchmark", "method", "mode") if e.get(k)
                )
                if e.get("direction"):
                    what += e["direction"]
                if e.get("steering") == "reference_vectors":
                    what += f" with {e['source']} vectors"
                elif e.get("steering") == "self":
                    what += " with its own vectors"
                worst.append(
                    f"{THRESHOLDS[metric].description}: {who} {what} = {fmt_num(c['value'])}"
                )
        rows.append(
            (
                THRESHOLDS[metric].description,
                str(counts["robust"]),
                str(counts["degraded"]),
                str(counts["broken"]),
                str(counts["n/a"]),
            )
        )
    blocks: list[Block] = [
        Heading(2, "Summary", "summary"),
        Table(
            ("metric", "robust", "degraded", "broken", "n/a"),
            tuple(rows),
            "Cells per class (vector cells: every variant × trait × method × vector mode). "
            "A class marked * has a confidence interval that crosses a threshold.",
        ),
    ]
    if worst:
        blocks.append(Paragraph("Broken cells:"))
        blocks.append(
            Bullets(
                tuple(worst[:20]) + ((f"… and {len(worst) - 20} more",) if len(worst) > 20 else ())
            )
        )
    return blocks


_MAX_LISTED_INPUTS = 300


def _provenance(run: RunArtefacts) -> list[Block]:
    listed = sorted(run.inputs.items())[:_MAX_LISTED_INPUTS]
    rows: tuple[tuple[Cell, ...], ...] = tuple((k, v[:16]) for k, v in listed)
    if len(run.inputs) > len(listed):
        rows += ((f"… {len(run.inputs) - len(listed)} more in manifest.json", ""),)
    return [
        Heading(2, "Provenance", "provenance"),
        Paragraph(
            f"The analysis read {len(run.inputs)} objects of run {run.run_id}; analysis/"
            "manifest.json lists each with its SHA-256, and every JSON cell names the keys it "
            "came from (`sources`)."
        ),
        Details(
            f"Inputs ({len(run.inputs)})",
            [Table(("key", "sha256 (first 16 hex digits)"), rows)],
        ),
    ]


def build_blocks(
    run: RunArtefacts,
    docs: Documents,
    figures: Sequence[FigureImage],
    *,
    generated_at: str,
) -> list[Block]:
    """The report as blocks: summary, results sections, methods and limitations, provenance."""
    spec = run.spec
    intro = (
        f"Run {run.run_id} of study '{spec.name}'"
        + (f" — {spec.description}" if spec.description else "")
        + f". Reference precision {spec.reference.value}; generated {generated_at}."
    )
    blocks: list[Block] = [
        Heading(1, f"qsens report — {run.run_id}", "top"),
        Paragraph(intro),
    ]
    smol = any("smollm2" in m.source.lower() for m in spec.models)
    if smol:
        blocks.append(Paragraph("Note: " + SMOLLM2_NOTE))
    blocks += _summary(docs)
    blocks += vectors_section(docs.vectors, figures)
    blocks += steering_section(docs.steering, figures)
    blocks += logit_diff_section(docs.logit_diff)
    blocks += both_directions_section(docs.vectors, docs.steering, docs.logit_diff)
    blocks += benchmarks_section(docs.benchmarks, figures)
    blocks += safety_section(docs.safety)
    blocks += ranking_section(docs.ranking)
    blocks += methods_section(run, docs.steering)
    blocks += _provenance(run)
    return blocks
