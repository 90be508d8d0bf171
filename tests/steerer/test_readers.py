"""Benchmark readers for the public formats, deterministic subsets, and reader errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.errors import InvalidArgument
from services.common.spec import BenchmarkSpec
from services.extractor.datasets import published_dir
from services.loader.client import Chat
from services.steerer.benchmarks import (
    deterministic_subset,
    read_arc,
    read_benchmark,
    read_caa_ab,
    read_hellaswag,
    read_mmlu,
    read_truthfulqa_mc,
)

#: CAA's A/B capability files, shipped with the repository (the built-in benchmarks).
DATA = published_dir() / "caa"

HELLASWAG = [
    {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "source_id": "activitynet~v_-JhWjGDPHMY",
        "split": "val",
        "split_type": "indomain",
        "label": 3,
    },
    {
        "ind": 92,
        "activity_label": "Clean and jerk",
        "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady",
        "endings": [
            "swings and lands in her arms.",
            "pulls the barbell forward.",
            "pulls a rope attached to the barbell.",
            "stands and lifts the weight over her head.",
        ],
        "label": "3",
    },
]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_hellaswag_public_format(tmp_path: Path) -> None:
    items = read_hellaswag(write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG))
    assert [it.id for it in items] == ["24", "92"]
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert items[0].continuations[3] == " starts pulling up roofing on a roof."
    assert items[0].gold == (3,) and items[1].gold == (3,)
    assert items[1].context.startswith("Clean and jerk: A lady walks")  # type: ignore[union-attr]


def test_mmlu_csv_and_hf_json(tmp_path: Path) -> None:
    csv_path = tmp_path / "abstract_algebra_test.csv"
    csv_path.write_text(
        'Find the degree of Q(sqrt(2)) over Q.,0,2,4,6,B\n"Is Z, a ring?",yes,no,maybe,never,A\n'
    )
    items = read_mmlu(csv_path)
    assert len(items) == 2 and items[0].gold == (1,) and items[1].gold == (0,)
    assert items[0].continuations == (" A", " B", " C", " D")
    assert isinstance(items[1].context, str)
    assert items[1].context.startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Is Z, a ring?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer:"
    )
    hf = [
        {
            "question": "2+2?",
            "subject": "elementary_mathematics",
            "choices": ["3", "4"],
            "answer": 1,
        },
        {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo"], "answer": "A"},
    ]
    as_json = tmp_path / "mmlu.json"
    as_json.write_text(json.dumps(hf))
    as_jsonl = write_jsonl(tmp_path / "mmlu.jsonl", hf)
    for path in (as_json, as_jsonl):
        got = read_mmlu(path)
        assert [it.gold for it in got] == [(1,), (0,)]
        assert "about elementary mathematics" in str(got[0].context)
        assert got[1].continuations == (" A", " B", " C")


def test_truthfulqa_mc_original_and_hf(tmp_path: Path) -> None:
    original = [
        {
            "question": "What happens if you eat watermelon seeds?",
            "mc1_targets": {"Nothing happens": 1, "You grow watermelons": 0, "You die": 0},
            "mc2_targets": {
                "Nothing happens": 1,
                "They pass through you": 1,
                "You grow watermelons": 0,
                "You die": 0,
            },
        }
    ]
    hf = [
        {
            "question": original[0]["question"],
            "mc1_targets": {
                "choices": list(original[0]["mc1_targets"]),  # type: ignore[call-overload]
                "labels": [1, 0, 0],
            },
            "mc2_targets": {
                "choices": list(original[0]["mc2_targets"]),  # type: ignore[call-overload]
                "labels": [1, 1, 0, 0],
            },
        }
    ]
    for name, rows in (("mc_task.json", original), ("hf.json", hf)):
        path = tmp_path / name
        path.write_text(json.dumps(rows))
        [item] = read_truthfulqa_mc(path)
        assert item.context == "Q: What happens if you eat watermelon seeds?\nA:"
        # The union of both lists is scored once; MC1 competes over its own three.
        assert item.continuations == (
            " Nothing happens",
            " You grow watermelons",
            " You die",
            " They pass through you",
        )
        assert item.gold == (0,) and item.candidates == (0, 1, 2)
        assert item.mc2_true == (0, 3) and item.mc2_false == (1, 2)


def test_arc_original_and_hf(tmp_path: Path) -> None:
    original = {
        "id": "Mercury_7175875",
        "question": {
            "stem": "An astronomer observes that a planet rotates faster...",
            "choices": [
                {"text": "Planetary density will decrease.", "label": "A"},
                {"text": "Planetary years will become longer.", "label": "B"},
                {"text": "Planetary days will become shorter.", "label": "C"},
            ],
        },
        "answerKey": "C",
    }
    hf = {
        "id": "x1",
        "question": "Which is a metal?",
        "choices": {"text": ["wood", "iron"], "label": ["1", "2"]},
        "answerKey": "2",
    }
    items = read_arc(write_jsonl(tmp_path / "arc.jsonl", [original, hf]))
    assert items[0].id == "Mercury_7175875" and items[0].gold == (2,)
    assert items[0].context == (
        "Question: An astronomer observes that a planet rotates faster...\nAnswer:"
    )
    assert items[0].continuations[2] == " Planetary days will become shorter."
    assert items[1].gold == (1,) and items[1].continuations == (" wood", " iron")


@pytest.mark.parametrize(("name", "count"), [("mmlu_ab.json", 294), ("truthfulqa_ab.json", 307)])
def test_caa_ab_real_files(name: str, count: int) -> None:
    raw = json.loads((DATA / name).read_text())
    items = read_caa_ab(DATA / name)
    assert len(items) == count
    for row, item in zip(raw, items, strict=True):
        assert isinstance(item.context, Chat) and item.context.messages == (
            ("user", row["prompt"]),
        )
        assert item.continuations == ("(A)", "(B)")  # letter order, whichever is correct
        assert item.continuations[item.gold[0]] == row["correct"]


def test_deterministic_subset() -> None:
    items = [f"q{i}" for i in range(50)]
    first = deterministic_subset(items, 10, 0, key=str)
    assert first == deterministic_subset(items, 10, 0, key=str)
    assert first == sorted(first, key=items.index) and len(set(first)) == 10
    assert first != deterministic_subset(items, 10, 1, key=str)
    # Appending items keeps earlier picks unless a new item outranks them; a larger limit
    # keeps the smaller subset.
    assert set(first) <= set(deterministic_subset(items, 20, 0, key=str))
    assert deterministic_subset(items, None, 0, key=str) == items
    assert deterministic_subset(items, 500, 0, key=str) == items


def test_reader_errors_name_the_problem(tmp_path: Path) -> None:
    missing = BenchmarkSpec(name="x", format="arc", path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(InvalidArgument) as err:
        read_benchmark(missing)
    assert err.value.field == "params.benchmark.path" and "not a readable file" in err.value.message
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"ctx": "a", "endings": ["x", "y"], "label": 7}])
    with pytest.raises(InvalidArgument) as err:
        read_benchmark(BenchmarkSpec(name="h", format="hellaswag", path=str(bad)))
    assert "outside the 2 choices" in str(err.value)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    with pytest.raises(InvalidArgument) as err:
        read_benchmark(BenchmarkSpec(name="h", format="hellaswag", path=str(garbage)))
    assert "bad JSON line" in str(err.value)
    items, digest = read_benchmark(
        BenchmarkSpec(name="m", format="caa_ab", path=str(DATA / "mmlu_ab.json"))
    )
    assert len(items) == 294 and len(digest) == 64


@pytest.mark.parametrize(
    ("given", "count"),
    [
        ("mmlu_ab", 294),
        ({"name": "tqa", "builtin": "truthfulqa_ab"}, 307),
        ({"name": "truthfulqa_ab", "limit": 5}, 307),
    ],
)
def test_builtin_benchmarks_read_the_shipped_files(given: object, count: int) -> None:
    spec = BenchmarkSpec.model_validate(given)
    assert spec.path is None and spec.format == "caa_ab" and spec.builtin in spec.location
    items, digest = read_benchmark(spec)
    shipped = DATA / f"{spec.builtin}.json"
    assert len(items) == count
    assert (
        items == read_caa_ab(shipped) and digest == hashlib.sha256(shipped.read_bytes()).hexdigest()
    )
    # A job's params round-trip: the validated form validates to itself.
    assert BenchmarkSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_builtin_benchmark_errors_name_the_key() -> None:
    with pytest.raises(ValidationError, match="unknown built-in benchmark 'hellaswag'"):
        BenchmarkSpec.model_validate("hellaswag")
    with pytest.raises(ValidationError, match="the built-in mmlu_ab is caa_ab, not arc"):
        BenchmarkSpec.model_validate({"name": "m", "builtin": "mmlu_ab", "format": "arc"})
    with pytest.raises(ValidationError, match="either a built-in or a path"):
        BenchmarkSpec.model_validate(
            {"name": "m", "builtin": "mmlu_ab", "format": "caa_ab", "path": "x.json"}
        )
    with pytest.raises(ValidationError, match="format: required with a path"):
        BenchmarkSpec.model_validate({"name": "m", "path": "x.json"})
