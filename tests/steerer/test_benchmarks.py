"""Benchmark jobs on SmolLM2 (fp32 loader) match a direct transformers computation to 1e-4."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.artefacts import benchmark_key
from services.common.contracts.steer_results import BenchmarkResult
from services.common.jobs import Job, JobKind
from services.common.settings import CommonSettings, get
from services.common.spec import BenchmarkSpec
from services.common.state import JobState
from services.loader.client import Chat
from services.loader.model_source import resolve_source
from services.steerer.benchmarks import deterministic_subset, read_benchmark
from tests.loader_procs import LoaderProc, start_loader
from tests.steerer.conftest import Plane
from tests.steerer.test_readers import DATA, HELLASWAG, write_jsonl

VARIANT = "smollm2-135m@fp32"


@pytest.fixture(scope="module")
def smollm2_fp32() -> Iterator[LoaderProc]:
    """SmolLM2-135M-Instruct (dequantized Q4_1 GGUF) served at fp32."""
    proc = start_loader("smollm2-135m", "fp32", http=False, metrics=False, timeout=600)
    yield proc
    proc.stop()


def fixtures(tmp_path: Path) -> list[BenchmarkSpec]:
    tqa = tmp_path / "mc_task.json"
    tqa.write_text(
        json.dumps(
            [
                {
                    "question": "What happens if you eat watermelon seeds?",
                    "mc1_targets": {"Nothing happens": 1, "You grow watermelons": 0},
                    "mc2_targets": {
                        "Nothing happens": 1,
                        "They pass through your digestive system": 1,
                        "You grow watermelons": 0,
                    },
                }
            ]
        )
    )
    arc = write_jsonl(
        tmp_path / "arc.jsonl",
        [
            {
                "id": "a1",
                "question": {
                    "stem": "Which of these is a metal?",
                    "choices": [{"text": "wood", "label": "A"}, {"text": "iron", "label": "B"}],
                },
                "answerKey": "B",
            }
        ],
    )
    mmlu = tmp_path / "astronomy_test.csv"
    mmlu.write_text("What is the closest star to Earth?,The Sun,Sirius,Vega,Polaris,A\n")
    return [
        BenchmarkSpec(name="mmlu_ab", format="caa_ab", path=str(DATA / "mmlu_ab.json"), limit=10),
        BenchmarkSpec(
            name="truthfulqa_ab", format="caa_ab", path=str(DATA / "truthfulqa_ab.json"), limit=10
        ),
        BenchmarkSpec(
            name="hellaswag",
            format="hellaswag",
            path=str(write_jsonl(tmp_path / "hs.jsonl", HELLASWAG)),
        ),
        BenchmarkSpec(name="truthfulqa_mc", format="truthfulqa_mc", path=str(tqa)),
        BenchmarkSpec(name="arc", format="arc", path=str(arc)),
        BenchmarkSpec(name="mmlu", format="mmlu", path=str(mmlu)),
    ]


def direct_logprobs(specs: list[BenchmarkSpec]) -> dict[str, list[list[float]]]:
    """Every choice's log-likelihood by a plain transformers forward pass (fp32, no batching)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_source("smollm2-135m", get(CommonSettings).cache_dir).folder
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out: dict[str, list[list[float]]] = {}
    for spec in specs:
        items, _ = read_benchmark(spec)
        items = deterministic_subset(items, spec.limit, spec.seed, key=lambda it: it.text)
        per_item = []
        for item in items:
            if isinstance(item.context, Chat):
                messages = [{"role": r, "content": c} for r, c in item.context.messages]
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                context = tok(text, add_special_tokens=False)["input_ids"]
            else:
                context = tok(item.context, add_special_tokens=True)["input_ids"]
            scores = []
            for cont in item.continuations:
                ids = tok(cont, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logits = model(torch.tensor([context + ids])).logits[0].double()
                lp = torch.log_softmax(logits[len(context) - 1 : -1], -1)
                scores.append(float(lp.gather(1, torch.tensor(ids)[:, None]).sum()))
            per_item.append(scores)
        out[spec.name] = per_item
    return out


async def test_benchmark_loglikelihoods_match_transformers(
    plane: Plane, smollm2_fp32: LoaderProc, run_id: str, tmp_path: Path
) -> None:
    await plane.announce(smollm2_fp32)
    specs = fixtures(tmp_path)
    jobs = [
        Job(
            kind=JobKind.BENCHMARK,
            run_id=run_id,
            params={"variant": VARIANT, "benchmark": spec.model_dump(mode="json")},
        )
        for spec in specs
    ]
    records = await plane.run(run_id, jobs, timeout_s=300)
    assert all(r.state == JobState.DONE for r in records), [r.error for r in records]
    expected = direct_logprobs(specs)
    for spec, record in zip(specs, records, strict=True):
        key = benchmark_key(run_id, VARIANT, spec.name, "result.json")
        result = BenchmarkResult.model_validate(plane.store.get_json(key))
        n = len(expected[spec.name])
        assert result.n == n and result.format == spec.format
        # All choices of a question went as continuations of ONE ScoreItem, in ONE request.
        assert result.calls.loader_calls == 1 and result.calls.loader_rows == n
        for item, want in zip(result.items, expected[spec.name], strict=True):
            assert len(item.logprobs) == len(want)
            for got, ref in zip(item.logprobs, want, strict=True):
                # 1e-4 absolute on the short A/B continuations (CAA mmlu/truthfulqa); long
                # free-text endings (hellaswag: ~40 nats summed over 20+ tokens) get the same
                # bound plus a 5e-6 relative share for fp32 summation order (the loader's
                # shared-context cache vs one full forward).
                tol = 1e-4 if spec.format == "caa_ab" else 1e-4 + 5e-6 * abs(ref)
                assert abs(got - ref) < tol, (spec.name, item.id, got, ref)
            normalised = [lp / c for lp, c in zip(item.logprobs, item.num_chars, strict=True)]
            among = item.candidates if item.candidates is not None else range(len(normalised))
            assert item.pred == max(among, key=lambda j: normalised[j])
            assert item.correct == (item.pred in item.gold)
        correct = sum(it.correct for it in result.items)
        acc = result.accuracy
        assert acc.value == correct / n and acc.method == "wilson"
        assert acc.low is not None and acc.high is not None and acc.low <= acc.value <= acc.high
        assert record.result is not None and record.result["accuracy"] == acc.value
    tqa = BenchmarkResult.model_validate(
        plane.store.get_json(benchmark_key(run_id, VARIANT, "truthfulqa_mc", "result.json"))
    )
    [item] = tqa.items
    assert tqa.metric == "mc1_acc_norm" and tqa.mc2 is not None and item.mc2 is not None
    true_mass = math.exp(item.logprobs[0]) + math.exp(item.logprobs[2])
    total = true_mass + math.exp(item.logprobs[1])
    assert abs(item.mc2 - true_mass / total) < 1e-9
    mmlu_ab = BenchmarkResult.model_validate(
        plane.store.get_json(benchmark_key(run_id, VARIANT, "mmlu_ab", "result.json"))
    )
    assert mmlu_ab.n_total == 294 and mmlu_ab.limit == 10 and len(mmlu_ab.file_sha256) == 64
    assert "SmolLM2" in " ".join(mmlu_ab.loader["notes"])  # dequantized Q4_1 weights, stated
