"""The judge-agreement pieces the demo uses: answers read from a run's runs.jsonl in S3, the
bounded sample, and the section appended to the downloaded report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.cli.demo import _append_agreement
from services.common.artefacts import steer_key
from services.common.store import AsyncS3Store, run_prefix
from services.judge.agreement import AnsweredItem, collect_answers, sample_answers


def _answer(question: str, answer: str, status: str, score: float | None) -> dict[str, Any]:
    verdict = {"score": score, "status": status, "reason": None, "used": score}
    return {
        "index": 0,
        "question": question,
        "answer": answer,
        "finish_reason": "stop",
        "trait": verdict,
        "coherence": verdict,
    }


async def test_collect_answers_from_runs_jsonl(s3_env: Any, run_id: str) -> None:
    store = AsyncS3Store()
    key = steer_key(
        run_id, "m@bf16", "pv/evil", "m@bf16", "mean_diff", "response", "add", "+", "runs.jsonl"
    )
    runs = [
        {"answers": [_answer("q1", "a1", "scored", 80.0), _answer("q2", "a2", "refusal", None)]},
        {"answers": [_answer("q1", "a3", "scored", 10.0), _answer("q3", "a4", "unscorable", None)]},
    ]
    await store.put_jsonl(key, runs)
    other = steer_key(
        run_id,
        "m@nf4",
        "caa/sycophancy",
        "m@nf4",
        "mean_diff",
        "response",
        "add",
        "+",
        "result.json",
    )
    await store.put_json(other, {"answers": [_answer("x", "y", "scored", 1.0)]})  # not runs.jsonl
    items = await collect_answers(store, run_prefix(run_id))
    assert items == [
        AnsweredItem("pv/evil", "q1", "a1", 80.0),
        AnsweredItem("pv/evil", "q1", "a3", 10.0),
    ]


def test_sample_spreads_over_the_score_range() -> None:
    items = [AnsweredItem("t/a", "q", f"a{k}", float(k)) for k in range(10)]
    items += [AnsweredItem("t/b", "q", "b", 50.0)]
    sample = sample_answers(items, per_trait=3)
    assert [(i.trait, i.score) for i in sample] == [
        ("t/a", 0.0),
        ("t/a", 4.0),
        ("t/a", 9.0),
        ("t/b", 50.0),
    ]


def test_agreement_section_is_appended_to_the_report(tmp_path: Path) -> None:
    md, page = tmp_path / "report.md", tmp_path / "report.html"
    section = tmp_path / "judge_agreement.md"
    md.write_text("# Report\n")
    page.write_text("<html><body><h1>Report</h1></body></html>")
    section.write_text("## Judge agreement\n\n| t | 4 | +1.00 |\n")
    _append_agreement([md, page, section])
    assert md.read_text() == "# Report\n\n## Judge agreement\n\n| t | 4 | +1.00 |\n"
    html = page.read_text()
    assert html.index('id="judge-agreement"') < html.index("</body>")
    assert "## Judge agreement" in html
