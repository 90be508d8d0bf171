"""Readers of the public multiple-choice benchmark formats into ``MCItem`` questions.

The formats, their prompts, where the data comes from and how ``limit`` picks a subset are
described in ``services.steerer.benchmarks``' module docstring.
"""

import csv
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from services.common.errors import InvalidArgument
from services.common.spec import BenchmarkSpec
from services.extractor.datasets import benchmark_file
from services.loader.client import Chat

__all__ = [
    "LETTERS",
    "PROMPT_FORMATS",
    "READERS",
    "MCItem",
    "deterministic_subset",
    "read_arc",
    "read_benchmark",
    "read_caa_ab",
    "read_hellaswag",
    "read_mmlu",
    "read_truthfulqa_mc",
]

T = TypeVar("T")
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question, ready to score."""

    id: str
    context: str | Chat = ""
    continuations: tuple[str, ...] = ()
    gold: tuple[int, ...] = ()
    candidates: tuple[int, ...] | None = None  # indices competing for the prediction
    mc2_true: tuple[int, ...] = ()
    mc2_false: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        """The item's content (for hashing)."""
        ctx = self.context if isinstance(self.context, str) else json.dumps(self.context.messages)
        return ctx + "\x00" + "\x00".join(self.continuations)


def deterministic_subset(
    items: Sequence[T], limit: int | None, seed: int, *, key: Callable[[T], str]
) -> list[T]:
    """The first ``limit`` items in hash order of (seed, key), returned in their file order."""
    if limit is None or limit >= len(items):
        return list(items)

    def rank(i: int) -> tuple[str, int]:
        digest = hashlib.sha256(f"{seed}\x00{key(items[i])}".encode()).hexdigest()
        return digest, i

    chosen = sorted(sorted(range(len(items)), key=rank)[:limit])
    return [items[i] for i in chosen]


# -- file reading -----------------------------------------------------------------------------


def _rows(path: Path) -> list[Any]:
    """JSON list, JSON object with a list under data/rows/items, or JSON Lines."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(text)
        return list(data)
    if stripped.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            for name in ("data", "rows", "items", "examples"):
                if isinstance(data.get(name), list):
                    return list(data[name])
            return [data]
    rows = []
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{path}:{i + 1}", f"bad JSON line: {exc.msg}") from None
    return rows


def _field(row: Any, name: str, where: str) -> Any:
    if not isinstance(row, dict) or name not in row:
        raise InvalidArgument(where, f"missing {name!r}")
    return row[name]


def _letter_index(value: Any, n: int, where: str) -> int:
    if isinstance(value, bool):
        raise InvalidArgument(where, f"bad answer {value!r}")
    if isinstance(value, int):
        index = value
    else:
        text = str(value).strip().strip("()").upper()
        if text.isdigit():
            # ARC uses "1".."4" where choices are labelled 1..4; HF MMLU uses 0-based ints.
            index = int(text) - 1
        elif len(text) == 1 and text in LETTERS:
            index = LETTERS.index(text)
        else:
            raise InvalidArgument(where, f"cannot read an answer from {value!r}")
    if not 0 <= index < n:
        raise InvalidArgument(where, f"answer {value!r} is outside the {n} choices")
    return index


_BRACKETS = re.compile(r"\[.*?\]")


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETS.sub("", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[MCItem]:
    """HellaSwag JSONL (``ctx``/``ctx_a``+``ctx_b``, ``endings``, ``label``)."""
    items = []
    for i, row in enumerate(_rows(path)):
        where = f"{path.name}[{i}]"
        endings = _field(row, "endings", where)
        if not isinstance(endings, list) or len(endings) < 2:
            raise InvalidArgument(f"{where}.endings", "needs a list of at least two endings")
        if "ctx_a" in row and "ctx_b" in row:
            ctx = f"{row['ctx_a']} {str(row['ctx_b']).capitalize()}"
        else:
            ctx = str(_field(row, "ctx", where))
        activity = row.get("activity_label")
        query = _hellaswag_clean(f"{activity}: {ctx}" if activity else ctx)
        label = _letter_index(int(_field(row, "label", where)), len(endings), f"{where}.label")
        items.append(
            MCItem(
                id=str(row.get("ind", i)),
                context=query,
                continuations=tuple(" " + _hellaswag_clean(str(e)) for e in endings),
                gold=(label,),
            )
        )
    return items


def _mmlu_prompt(subject: str, question: str, choices: Sequence[str]) -> str:
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    lines = [question.strip()]
    lines += [f"{LETTERS[j]}. {str(c).strip()}" for j, c in enumerate(choices)]
    return head + "\n".join(lines) + "\nAnswer:"


def _subject(path: Path) -> str:
    stem = path.stem
    for suffix in ("_test", "_val", "_dev", "_train"):
        stem = stem.removesuffix(suffix)
    return stem.replace("_", " ")


def read_mmlu(path: Path) -> list[MCItem]:
    """MMLU: the original CSV (question,A,B,C,D,answer) or HF-style JSON/JSONL."""
    items = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["question", "a"]:
            rows = rows[1:]
        subject = _subject(path)
        for i, row in enumerate(rows):
            where = f"{path.name}:{i + 1}"
            if len(row) < 4:
                raise InvalidArgument(where, f"expected question, choices and answer; got {row}")
            question, choices, answer = row[0], row[1:-1], row[-1]
            items.append(
                MCItem(
                    id=str(i),
                    context=_mmlu_prompt(subject, question, choices),
                    continuations=tuple(f" {LETTERS[j]}" for j in range(len(choices))),
                    gold=(_letter_index(answer, len(choices), f"{where}.answer"),),
                )
            )
        return items
    for i, row in enumerate(_rows(path)):
        where = f"{path.name}[{i}]"
        question = str(_field(row, "question", where))
        if "choices" in row:
            choices = [str(c) for c in row["choices"]]
        else:
            choices = [str(row[k]) for k in LETTERS[:4] if k in row]
        if len(choices) < 2:
            raise InvalidArgument(f"{where}.choices", "needs at least two choices")
        subject = str(row.get("subject") or _subject(path)).replace("_", " ")
        items.append(
            MCItem(
                id=str(row.get("id", i)),
                context=_mmlu_prompt(subject, question, choices),
                continuations=tuple(f" {LETTERS[j]}" for j in range(len(choices))),
                gold=(
                    _letter_index(_field(row, "answer", where), len(choices), f"{where}.answer"),
                ),
            )
        )
    return items


def _targets(value: Any, where: str) -> list[tuple[str, int]]:
    if isinstance(value, dict) and "choices" in value and "labels" in value:
        pairs = list(zip(value["choices"], value["labels"], strict=True))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise InvalidArgument(where, "expected {choice: label} or {choices, labels}")
    if not pairs:
        raise InvalidArgument(where, "no choices")
    return [(str(c), int(label)) for c, label in pairs]


def read_truthfulqa_mc(path: Path) -> list[MCItem]:
    """TruthfulQA multiple choice (``mc1_targets``, ``mc2_targets``)."""
    items = []
    for i, row in enumerate(_rows(path)):
        where = f"{path.name}[{i}]"
        question = str(_field(row, "question", where)).strip()
        mc1 = _targets(_field(row, "mc1_targets", where), f"{where}.mc1_targets")
        mc2 = _targets(row.get("mc2_targets", row["mc1_targets"]), f"{where}.mc2_targets")
        union: list[str] = []
        for text, _ in [*mc1, *mc2]:
            if text not in union:
                union.append(text)
        gold = [union.index(t) for t, label in mc1 if label == 1]
        if len(gold) != 1:
            raise InvalidArgument(f"{where}.mc1_targets", "needs exactly one true choice")
        items.append(
            MCItem(
                id=str(row.get("id", i)),
                context=f"Q: {question}\nA:",
                continuations=tuple(" " + t for t in union),
                gold=(gold[0],),
                candidates=tuple(union.index(t) for t, _ in mc1),
                mc2_true=tuple(union.index(t) for t, label in mc2 if label == 1),
                mc2_false=tuple(union.index(t) for t, label in mc2 if label != 1),
            )
        )
    return items


def read_arc(path: Path) -> list[MCItem]:
    """ARC (original JSONL with ``question.stem``, or HF style)."""
    items = []
    for i, row in enumerate(_rows(path)):
        where = f"{path.name}[{i}]"
        q = _field(row, "question", where)
        if isinstance(q, dict):
            stem = str(_field(q, "stem", f"{where}.question"))
            raw = _field(q, "choices", f"{where}.question")
            texts = [str(c["text"]) for c in raw]
            labels = [str(c["label"]) for c in raw]
        else:
            stem = str(q)
            ch = _field(row, "choices", where)
            texts, labels = [str(t) for t in ch["text"]], [str(x) for x in ch["label"]]
        key = str(_field(row, "answerKey", where)).strip()
        if key not in labels:
            raise InvalidArgument(f"{where}.answerKey", f"{key!r} is not among labels {labels}")
        items.append(
            MCItem(
                id=str(row.get("id", i)),
                context=f"Question: {stem.strip()}\nAnswer:",
                continuations=tuple(" " + t.strip() for t in texts),
                gold=(labels.index(key),),
            )
        )
    return items


def _caa_letter(answer: str, where: str) -> str:
    match = re.match(r"^\s*\(?\s*([A-Za-z])\s*\)?", answer)
    if not match:
        raise InvalidArgument(where, f"cannot read an answer letter from {answer!r}")
    return match.group(1).upper()


def read_caa_ab(path: Path) -> list[MCItem]:
    """CAA A/B capability items (``prompt``/``question``, ``correct``, ``incorrect``)."""
    items = []
    for i, row in enumerate(_rows(path)):
        where = f"{path.name}[{i}]"
        prompt = row.get("prompt", row.get("question")) if isinstance(row, dict) else None
        if not prompt:
            raise InvalidArgument(where, "missing 'prompt' (or 'question')")
        correct = str(_field(row, "correct", where))
        incorrect = str(_field(row, "incorrect", where))
        pair = sorted(
            [
                (_caa_letter(correct, f"{where}.correct"), correct),
                (_caa_letter(incorrect, f"{where}.incorrect"), incorrect),
            ]
        )
        if pair[0][0] == pair[1][0]:
            raise InvalidArgument(where, "correct and incorrect name the same letter")
        answers = tuple(a for _, a in pair)
        items.append(
            MCItem(
                id=str(row.get("id", i)),
                context=Chat((("user", str(prompt)),)),
                continuations=answers,
                gold=(answers.index(correct),),
            )
        )
    return items


READERS: dict[str, Callable[[Path], list[MCItem]]] = {
    "hellaswag": read_hellaswag,
    "mmlu": read_mmlu,
    "truthfulqa_mc": read_truthfulqa_mc,
    "arc": read_arc,
    "caa_ab": read_caa_ab,
}

PROMPT_FORMATS: dict[str, str] = {
    "hellaswag": "text '<activity>: <ctx>'; continuations ' <ending>' (lm-eval style)",
    "mmlu": "text 'The following are multiple choice questions (with answers) about <subject>."
    "\\n\\n<question>\\nA. ..\\nAnswer:'; continuations ' A'..' D' (zero-shot)",
    "truthfulqa_mc": "text 'Q: <question>\\nA:'; continuations ' <choice>' (zero-shot, no primer)",
    "arc": "text 'Question: <stem>\\nAnswer:'; continuations ' <choice>'",
    "caa_ab": "chat [user: <prompt>] with the generation prompt; continuations the answers "
    "'(A)'/'(B)' in letter order",
}


def read_benchmark(spec: BenchmarkSpec) -> tuple[list[MCItem], str]:
    """All items of ``spec``'s data (a built-in, an ``s3://`` object or a local file) and its
    sha256; InvalidArgument for a missing or bad file."""
    field = "params.benchmark.path"
    path = benchmark_file(spec, field)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    fmt = spec.file_format
    try:
        items = READERS[fmt](path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(field, f"{spec.location}: not {fmt} data: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InvalidArgument(field, f"{spec.location}: malformed {fmt} data: {exc!r}") from None
    if not items:
        raise InvalidArgument(field, f"{spec.location} has no items")
    return items, digest
