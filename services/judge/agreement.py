"""How well a second judge agrees with the study's judge on the study's own steered answers.

The steering jobs write every judged answer to ``runs.jsonl`` (``SteerRun.answers``, with the
study judge's trait verdict). This module takes a bounded, deterministic sample per trait
(answers with a scored trait verdict, spread over the study judge's score range), scores the
same answers with another judge (in the demo: the loader judge on the bf16 SmolLM2 loader) and
reports Spearman and Pearson correlations with n per trait, as JSON and as a Markdown section.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.settings import JudgeSettings
from services.judge.models import JudgeStatus

__all__ = [
    "AnsweredItem",
    "agreement_markdown",
    "collect_answers",
    "judge_agreement",
    "sample_answers",
]


@dataclass(frozen=True)
class AnsweredItem:
    """One steered answer and the study judge's trait score of it."""

    trait: str
    question: str
    answer: str
    score: float


async def collect_answers(store: Any, prefix: str) -> list[AnsweredItem]:
    """Every answer with a scored trait verdict in the ``runs.jsonl`` files under ``prefix``."""
    out: list[AnsweredItem] = []
    for key in sorted(await store.list_keys(prefix)):
        parts = key.split("/")
        if not key.endswith("/runs.jsonl") or "steer" not in parts:
            continue
        at = parts.index("steer")
        trait = f"{parts[at + 1]}/{parts[at + 2]}"
        for run in await store.get_jsonl(key):
            for a in run.get("answers") or []:
                verdict = a.get("trait") or {}
                if verdict.get("status") == "scored" and verdict.get("score") is not None:
                    out.append(AnsweredItem(trait, a["question"], a["answer"], verdict["score"]))
    return out


def sample_answers(items: Sequence[AnsweredItem], per_trait: int) -> list[AnsweredItem]:
    """Up to ``per_trait`` distinct answers per trait, evenly spaced over the study judge's
    scores (so the sample spans its range), in a deterministic order."""
    out: list[AnsweredItem] = []
    for trait in sorted({i.trait for i in items}):
        distinct = {(i.question, i.answer): i for i in items if i.trait == trait}
        ranked = sorted(distinct.values(), key=lambda i: (i.score, i.question, i.answer))
        if len(ranked) <= per_trait:
            out.extend(ranked)
            continue
        step = (len(ranked) - 1) / max(1, per_trait - 1)
        out.extend(ranked[round(k * step)] for k in range(per_trait))
    return out


def _correlations(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float | None]:
    from scipy import stats

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return {"spearman": None, "pearson": None}
    rho = float(stats.spearmanr(xs, ys).statistic)
    r = float(stats.pearsonr(xs, ys).statistic)
    return {
        "spearman": rho if math.isfinite(rho) else None,
        "pearson": r if math.isfinite(r) else None,
    }


async def judge_agreement(
    items: Sequence[AnsweredItem], settings: JudgeSettings, rubrics: dict[str, Any]
) -> dict[str, Any]:
    """Score ``items`` with the judge of ``settings`` and correlate with the study's scores.

    ``rubrics`` maps each trait to its rubric. Returns the document: the second judge, its
    seconds per judgment, and per trait n, Spearman, Pearson and the second judge's outcomes."""
    from services.judge.client import JudgeClient

    client = await JudgeClient.direct(settings)
    traits: dict[str, Any] = {}
    model: str = settings.backend
    started = time.perf_counter()
    try:
        for trait in sorted({i.trait for i in items}):
            mine = [i for i in items if i.trait == trait]
            results = await client.score_trait(
                [(i.question, i.answer) for i in mine], rubrics[trait], trait=trait
            )
            pairs = [
                (i.score, float(r.score))
                for i, r in zip(mine, results, strict=True)
                if r.status is JudgeStatus.SCORED and r.score is not None
            ]
            model = results[0].model if results else model
            masses = [r.numeric_mass for r in results if r.numeric_mass is not None]
            traits[trait] = {
                "sampled": len(mine),
                "n": len(pairs),
                **_correlations([p[0] for p in pairs], [p[1] for p in pairs]),
                "refusals": sum(r.status is JudgeStatus.REFUSAL for r in results),
                "unscorable": sum(r.status is JudgeStatus.UNSCORABLE for r in results),
                "median_numeric_mass": sorted(masses)[len(masses) // 2] if masses else None,
                "study_scores": [p[0] for p in pairs],
                "second_scores": [p[1] for p in pairs],
            }
    finally:
        await client.close()
    seconds = time.perf_counter() - started
    return {
        "second_judge": {"backend": settings.backend, "model": model},
        "min_numeric_mass": settings.min_numeric_mass,
        "judgments": len(items),
        "seconds": round(seconds, 1),
        "seconds_per_judgment": round(seconds / len(items), 2) if items else None,
        "traits": traits,
    }


def _fmt(value: float | None) -> str:
    return f"{value:+.2f}" if value is not None else "-"


def agreement_markdown(doc: dict[str, Any], study_judge: str) -> str:
    """The report's short section on how the two judges agree."""
    second = doc["second_judge"]
    lines = [
        "## Judge agreement",
        "",
        f"The study's judge ({study_judge}) and a second judge ({second['backend']}: "
        f"{second['model']}) scored the same steered answers: a sample of "
        f"{doc['judgments']} spread over the study judge's score range, "
        f"{doc['seconds_per_judgment']} s per judgment for the second judge. "
        "Correlations of the two trait scores, per trait:",
        "",
        "| trait | n | Spearman | Pearson | second judge: refusals / unscorable "
        "| median numeric mass |",
        "|---|---|---|---|---|---|",
    ]
    for trait, row in doc["traits"].items():
        mass = row["median_numeric_mass"]
        lines.append(
            f"| {trait} | {row['n']} | {_fmt(row['spearman'])} | {_fmt(row['pearson'])} "
            f"| {row['refusals']} / {row['unscorable']} "
            f"| {f'{mass:.3g}' if mass is not None else '-'} |"
        )
    lines += [
        "",
        "The numeric mass is the probability that the second judge's whole answer is a bare "
        f"integer (scored when at least {doc['min_numeric_mass']}); with small n a correlation "
        "is only a rough sign of agreement.",
        "",
    ]
    return "\n".join(lines)
