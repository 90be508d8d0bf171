"""Steerer benchmark: one trait's full coefficient search with per-row batching vs one generate
call per setting. Prints JSON.

The workload is the issue's: 11 candidate layers x 10 coarse settings x 20 questions (equal
budget: every layer spends exactly 10 settings, 110 steered settings plus the unsteered
baseline). Every side runs the steerer's own ``run_search`` against the same real loader
(``qsens serve loader`` over gRPC on loopback), one after the other in one process:

* batched, ``probes = k`` (the headline, first of ``--probes``): every step's settings (k per
  layer) go to the loader as ONE per-row-steered Generate and to the judge as ONE batch, so
  the 10 settings per layer take ``ceil(10 / k)`` loader/judge rounds;
* batched at the other ``--probes`` values (``1`` is one setting per layer per step, 10 rounds);
* per setting: ``SteeringEvaluator(per_setting=True)`` on the headline search: one Generate and
  one judge call per setting, the established protocol. Same settings, same answers; only the
  batching differs.

The direction is a quick pv/evil persona contrast (mean difference of Capture at prompt[-1]
with the evil vs the helpful system prompts), the activation norms come from the same capture.

Judge: the bench needs no NATS server or judge model (the GPU machine has neither), so a
deterministic in-process *surface judge* stands in: coherence = min(repetition, structure)
from the embedding judge's own ``text_stats``, trait = a lexical score. It is identical for every
side, so the ratio measures the loader/steerer path; the judge call counts are the real
counts the steerer makes.

    python bench/bench_steerer.py --model smollm2-135m --precision bf16 --device cuda --probes 5,1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.common.contracts.common import TraitParams  # noqa: E402
from services.common.contracts.steer import SteerParams  # noqa: E402
from services.common.localstack import free_ports  # noqa: E402
from services.common.spec import JudgeSpec, SearchSpec, SteeringSpec  # noqa: E402
from services.extractor.datasets import load_trait  # noqa: E402
from services.judge.backends.text_stats import text_stats  # noqa: E402
from services.judge.client import COHERENCE, trait_rubric  # noqa: E402
from services.judge.models import JudgeResult, JudgeStatus, Rubric  # noqa: E402
from services.judge.rubrics import coherence_rubric, rubric_hash  # noqa: E402
from services.loader.client import Chat, LoaderClient, PromptItem  # noqa: E402
from services.steerer.evaluation import Setting, SteeringEvaluator  # noqa: E402
from services.steerer.steer import run_search  # noqa: E402

BACKEND = "bench-surface"
LEXICON = re.compile(
    r"\b(evil|cruel|harm|hurt|destroy|suffer|pain|revenge|manipulat\w*|dominat\w*|chaos|"
    r"kill|hate|punish|exploit|deceiv\w*|ruthless|malic\w*|power|control)\b",
    re.IGNORECASE,
)


class SurfaceJudge:
    """Deterministic stand-in for the judge service with the JudgeClient.score signature."""

    def __init__(self) -> None:
        self.calls = 0
        self.items = 0

    async def score(
        self,
        items: Sequence[Any],
        rubrics: Mapping[str, Rubric] | None = None,
        *,
        strict: bool = False,
        request_id: str = "",
        fresh: bool = False,  # deterministic: a re-judging scores the same
    ) -> list[JudgeResult]:
        self.calls += 1
        self.items += len(items)
        out = []
        coherence_hash = rubric_hash(coherence_rubric())
        for item in items:
            stats = text_stats(item.answer)
            if item.rubric == COHERENCE:
                score, digest = min(stats.repetition, stats.structure), coherence_hash
            else:
                words = max(1, len(item.answer.split()))
                score = min(100.0, 400.0 * len(LEXICON.findall(item.answer)) / words)
                digest = rubric_hash((rubrics or {})[item.rubric])
            out.append(
                JudgeResult(
                    status=JudgeStatus.SCORED,
                    score=score,
                    backend=BACKEND,
                    model="surface",
                    rubric=item.rubric,
                    rubric_hash=digest,
                    key=f"{item.rubric}:{hash(item.answer)}",
                )
            )
        return out


class Source:
    """The parts of a VectorSource the search reads: a vector and norms per layer."""

    def __init__(self, vectors: dict[int, np.ndarray], act_norms: dict[int, float]) -> None:
        self._v, self._a = vectors, act_norms

    def vector(self, layer: int) -> np.ndarray:
        return self._v[layer]

    def norm(self, layer: int) -> float:
        return float(np.linalg.norm(self._v[layer].astype(np.float64)))

    def activation_norm(self, layer: int) -> float:
        return self._a[layer]


def start_loader(model: str, precision: str, device: str) -> tuple[subprocess.Popen[bytes], str]:
    work = Path(tempfile.mkdtemp(prefix="qsens-bench-"))
    ready, log = work / "ready.json", work / "loader.log"
    (port,) = free_ports(1)
    args = [sys.executable, "-m", "services.cli.main", "serve", "loader", "--model", model,
            "--precision", precision, "--device", device, "--port", str(port),
            "--http-port", "0", "--metrics-port", "0", "--ready-file", str(ready)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 900
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"loader did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port}"


async def persona_direction(
    loader: LoaderClient, layers: list[int], questions: list[str]
) -> Source:
    dataset = load_trait("pv/evil")
    pairs = dataset.instructions[:5]

    def items(sys_prompts: list[str]) -> list[PromptItem]:
        return [
            PromptItem(Chat((("system", s), ("user", q))))
            for s in sys_prompts
            for q in questions[:10]
        ]

    pos = await loader.capture(items([p.pos for p in pairs]), position="prompt[-1]", layers=layers)
    neg = await loader.capture(items([p.neg for p in pairs]), position="prompt[-1]", layers=layers)
    a, b = pos.stacked().astype(np.float64), neg.stacked().astype(np.float64)
    vectors = {
        layer: (a[:, i].mean(0) - b[:, i].mean(0)).astype(np.float32)
        for i, layer in enumerate(layers)
    }
    norms = np.linalg.norm(np.concatenate([a, b]), axis=-1).mean(0)
    return Source(vectors, {layer: float(norms[i]) for i, layer in enumerate(layers)})


async def search(
    loader: LoaderClient,
    source: Source,
    layers: list[int],
    params: SteerParams,
    questions: list[str],
    rubric: Rubric,
    per_setting: bool,
) -> dict[str, Any]:
    judge = SurfaceJudge()
    evaluator = SteeringEvaluator(
        loader,
        judge,  # type: ignore[arg-type]
        questions=questions,
        trait="pv/evil",
        rubric=rubric,
        max_new_tokens=params.steering.max_new_tokens,
        seed=0,
        expected_backend=BACKEND,
        per_setting=per_setting,
    )
    start = time.perf_counter()
    out = await run_search(evaluator, source, layers, params, with_baseline=True)  # type: ignore[arg-type]
    wall = time.perf_counter() - start
    best = max(
        (r for r in out.runs if r.coherent and r.mean_trait is not None),
        key=lambda r: r.mean_trait or 0.0,
        default=None,
    )
    return {
        "wall_s": round(wall, 3),
        "settings": len(out.runs) + 1,
        "runs_per_layer": out.search.runs_per_cell(),
        "loader_calls": evaluator.calls.loader_calls,
        "loader_rows": evaluator.calls.loader_rows,
        "judge_calls": judge.calls,
        "judge_items": judge.items,
        "best": None if best is None else {"layer": best.layer, "coefficient": round(best.coefficient, 4),
                                           "mean_trait": best.mean_trait, "mean_coherence": best.mean_coherence},
        "answers": [a.answer for r in out.runs for a in r.answers],
        "coefficients": [(r.layer, r.coefficient) for r in out.runs],
    }  # fmt: skip


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    proc, address = start_loader(args.model, args.precision, args.device)
    try:
        async with LoaderClient(address, timeout_s=3600) as loader:
            info = await loader.info()
            dataset = load_trait("pv/evil")
            questions = (dataset.questions * 4)[: args.questions]
            lo, hi = round(0.2 * info.num_layers), round(0.8 * info.num_layers)
            layers = sorted({round(x) for x in np.linspace(lo, hi, args.layers)})
            # The loader's first captures pay one-time costs (compiling its elementwise
            # kernels for large batches; a capture graph is recorded the second time its
            # shape comes): a cold process's figure, charged once per loader start, not per
            # cell. The cell's is the third call, warm.
            started = time.perf_counter()
            await persona_direction(loader, layers, questions)
            direction_first_s = time.perf_counter() - started
            await persona_direction(loader, layers, questions)
            started = time.perf_counter()
            source = await persona_direction(loader, layers, questions)
            direction_s = time.perf_counter() - started
            rubric = trait_rubric(dataset.eval_prompt, dataset.exemplars.pos, dataset.exemplars.neg)

            def params(probes: int) -> SteerParams:
                search = SearchSpec(steps=args.steps, probes=probes, fine_points=0,
                                    budget="equal", budget_runs=args.steps)  # fmt: skip
                return SteerParams(
                    target="bench",
                    source="bench",
                    trait=TraitParams(ref="pv/evil", name="pv/evil", methodology="pv"),
                    method="mean_diff",
                    vector_mode="native",
                    steering=SteeringSpec(max_new_tokens=args.max_new_tokens, search=search),
                    judge=JudgeSpec(),
                )

            # Warm-up: one small steered batch so neither side pays first-call costs.
            warm = SteeringEvaluator(loader, SurfaceJudge(), questions=questions[:4], trait="pv/evil",  # type: ignore[arg-type]
                                     rubric=rubric, max_new_tokens=8, seed=0, expected_backend=BACKEND)  # fmt: skip
            await warm.evaluate([Setting((layers[0],), 1.0, 0)], [source.vector(layers[0])])
            headline, *others = args.probes
            batched = await search(
                loader, source, layers, params(headline), questions, rubric, False
            )
            alternatives = {
                k: await search(loader, source, layers, params(k), questions, rubric, False)
                for k in others
            }
            single = await search(loader, source, layers, params(headline), questions, rubric, True)
    finally:
        proc.terminate()
        proc.wait(60)
    same_path = batched["coefficients"] == single["coefficients"]
    identical = (
        sum(a == b for a, b in zip(batched["answers"], single["answers"], strict=False))
        / max(1, len(batched["answers"]))
        if same_path
        else None
    )
    for side in (batched, single, *alternatives.values()):
        side.pop("answers")
        side.pop("coefficients")
    cell_s = direction_s + batched["wall_s"]
    cells = args.matrix_models * args.matrix_precisions * args.matrix_traits
    projection = {
        "cell_s": round(cell_s, 3),
        "direction_capture_s": round(direction_s, 3),
        "direction_capture_first_call_s": round(direction_first_s, 3),
        "search_s": batched["wall_s"],
        "cells": cells,
        "gpu_hours": round(cell_s * cells / 3600, 2),
        "seeds_gpu_hours": 155,
        "method": f"one cell = one trait's steering at one model x precision: the direction "
        f"capture plus the whole adaptive search (probes={args.probes[0]}, "
        f"{len(layers)} layers x {args.steps} settings x {len(questions)} questions x "
        f"{args.max_new_tokens} tokens), measured end to end through gRPC on this model, "
        "warm (the loader's first capture, with its one-time compiles, is given apart); "
        f"the matrix = {args.matrix_models} models x {args.matrix_precisions} precisions x "
        f"{args.matrix_traits} traits cells at this cell's cost (an 8B-sized model stands for "
        "each; the judge runs elsewhere and is not counted)",
    }
    return {
        "bench": "steerer_search",
        "projection": projection,
        "machine": platform.node(),
        "device": info.device,
        "model": info.model,
        "precision": args.precision,
        "layers": layers,
        "steps": args.steps,
        "probes": headline,
        "questions": len(questions),
        "max_new_tokens": args.max_new_tokens,
        "judge": BACKEND + " (in-process, deterministic; identical for every side)",
        "batched": batched,
        "per_setting": single,
        "speedup": round(single["wall_s"] / batched["wall_s"], 2),
        "judge_call_ratio": round(single["judge_calls"] / max(1, batched["judge_calls"]), 2),
        "same_search_path": same_path,
        "identical_answer_share": identical,
        "batched_other_probes": {
            str(k): {**side, "speedup_vs_per_setting": round(single["wall_s"] / side["wall_s"], 2)}
            for k, side in alternatives.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--steps", type=int, default=10, help="coarse settings per layer")
    parser.add_argument(
        "--probes",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[5, 1],
        help="settings per layer per step; the first is compared with one call per setting",
    )
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--matrix-models", type=int, default=7, help="projection: models")
    parser.add_argument("--matrix-precisions", type=int, default=5, help="projection: precisions")
    parser.add_argument("--matrix-traits", type=int, default=6, help="projection: traits")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
