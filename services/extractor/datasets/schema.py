"""The typed form of a trait dataset, its train/validation splits and its contrast examples.

A :class:`TraitDataset` holds one trait's contrast recipe for one methodology:

* ``pv`` (Persona Vectors, Chen et al. 2025, arXiv 2507.21509): ``instructions`` (pos/neg system
  prompts), extraction ``questions``, and an ``eval_prompt`` judge rubric;
* ``caa`` (Contrastive Activation Addition, Rimsky et al. 2024, arXiv 2312.06681): A/B items,
  ``ab_train`` for vectors and ``ab_test`` for logit difference;
* ``arditi`` (refusal direction, Arditi et al. 2024, arXiv 2406.11717): harmful and harmless
  instruction lists (train / val / test).

Every dataset also carries open ``eval_questions`` for steering evaluation (disjoint from the
extraction questions), ``exemplars`` (short answers that do / do not show the trait, used by the
offline embedding judge) and an ``eval_prompt`` rubric with ``{question}`` and ``{answer}``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common.errors import InvalidArgument
from services.common.hashing import stable_hash
from services.common.methodologies import METHODOLOGIES as _REGISTRY
from services.common.methodologies import Contrast, Methodology, methodology_info

__all__ = [
    "DEFAULT_POSITIONS",
    "METHODOLOGIES",
    "ABItem",
    "ChatMessage",
    "ContrastExample",
    "Exemplars",
    "InstructionPair",
    "Methodology",
    "SplitItem",
    "TraitDataset",
    "TraitSplit",
    "TraitSplits",
    "is_valid_position",
    "parse_answer_letter",
]

METHODOLOGIES: tuple[Methodology, ...] = tuple(_REGISTRY)

#: Where each methodology reads activations (DESIGN.md, "Study vocabulary").
DEFAULT_POSITIONS: dict[Methodology, str] = {m: f.default_position for m, f in _REGISTRY.items()}

_POSITION = re.compile(r"^(?:all|prompt\[(?:-1|:)\]|response\[(?:-1|:|:[1-9][0-9]*)\])$")
_TRAIT_NAME = re.compile(rf"^({'|'.join(_REGISTRY)})/[a-z0-9][a-z0-9._-]{{0,63}}$")
# "(A)", " (B)", "A", "(A) Yes", "A)" -> the letter; CAA answers are "(A)"/"(B)".
_ANSWER_LETTER = re.compile(r"^\s*\(?\s*([A-Za-z])\s*(?:\)|$|[\s.:,])")


def is_valid_position(position: str) -> bool:
    """True for the position syntax of DESIGN.md: ``prompt[-1] prompt[:] response[:] response[:k]
    response[-1] all``."""
    return bool(_POSITION.match(position))


def parse_answer_letter(answer: str, field: str = "answer") -> str:
    """The upper-case choice letter of a CAA answer string such as ``"(A)"`` or ``" (B)"``."""
    match = _ANSWER_LETTER.match(answer)
    if not match:
        raise InvalidArgument(field, f"cannot read an answer letter from {answer!r}")
    return match.group(1).upper()


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InstructionPair(_Frozen):
    """One persona-vectors system-prompt pair: ``pos`` elicits the trait, ``neg`` suppresses it."""

    pos: str = Field(min_length=1, description="System prompt that elicits the trait.")
    neg: str = Field(min_length=1, description="System prompt that suppresses the trait.")


class ABItem(_Frozen):
    """One CAA A/B item; the question text already lists its choices."""

    question: str = Field(min_length=1, description="Question with its lettered choices.")
    answer_matching_behavior: str = Field(description="The trait-expressing answer, e.g. '(A)'.")
    answer_not_matching_behavior: str = Field(description="The other answer, e.g. '(B)'.")

    @model_validator(mode="after")
    def _letters(self) -> ABItem:
        matching = parse_answer_letter(self.answer_matching_behavior, "answer_matching_behavior")
        other = parse_answer_letter(
            self.answer_not_matching_behavior, "answer_not_matching_behavior"
        )
        if matching == other:
            raise InvalidArgument(
                "answer_not_matching_behavior", f"same letter {matching!r} as the matching answer"
            )
        return self

    @property
    def matching_letter(self) -> str:
        """The letter of the trait-expressing choice."""
        return parse_answer_letter(self.answer_matching_behavior)

    @property
    def not_matching_letter(self) -> str:
        """The letter of the other choice."""
        return parse_answer_letter(self.answer_not_matching_behavior)


class Exemplars(_Frozen):
    """Short example answers that do (``pos``) and do not (``neg``) show the trait."""

    pos: tuple[str, ...] = Field(min_length=1, description="Answers that express the trait.")
    neg: tuple[str, ...] = Field(min_length=1, description="Answers that do not.")


_CONTENT_FIELDS = {m: f.content_parts for m, f in _REGISTRY.items()}
_REQUIRED_FIELDS = {m: f.required_parts for m, f in _REGISTRY.items()}


class SplitItem(_Frozen):
    """One unit drawn into a split, with ``uid`` naming where it came from (``questions[3]``)."""

    uid: str = Field(description="Source list and index, e.g. 'questions[3]', 'harmful_val[0]'.")
    kind: Literal["question", "ab", "harmful", "harmless"]
    text: str = Field(description="The question or instruction.")
    ab: ABItem | None = Field(None, description="The A/B item (caa only).")


class TraitSplit(_Frozen):
    """The items of one part (train or val) of a dataset split."""

    dataset: str = Field(description="Trait name this split was drawn from.")
    part: Literal["train", "val"]
    seed: int
    items: tuple[SplitItem, ...]

    @property
    def uids(self) -> tuple[str, ...]:
        """Every item's uid, in order."""
        return tuple(item.uid for item in self.items)


class TraitSplits(_Frozen):
    """A deterministic train/val split of a dataset."""

    train: TraitSplit
    val: TraitSplit


class TraitDataset(_Frozen):
    """One trait's contrast recipe; only the fields of its ``methodology`` may be filled."""

    name: str = Field(description="'<methodology>/<name>', e.g. 'pv/evil'.")
    methodology: Methodology
    position: str = Field(description="Default capture position for this methodology.")
    source: str = Field(description="Provenance: built-in or the local path(s) it was read from.")
    eval_prompt: str = Field(description="Judge rubric with {question} and {answer} placeholders.")
    eval_questions: tuple[str, ...] = Field(
        min_length=1, description="Open questions for steering evaluation."
    )
    exemplars: Exemplars
    # pv
    instructions: tuple[InstructionPair, ...] = ()
    questions: tuple[str, ...] = Field((), description="pv extraction questions.")
    # caa
    ab_train: tuple[ABItem, ...] = Field((), description="CAA items for building vectors.")
    ab_test: tuple[ABItem, ...] = Field((), description="CAA held-out items (logit difference).")
    # arditi
    harmful_train: tuple[str, ...] = ()
    harmful_val: tuple[str, ...] = ()
    harmful_test: tuple[str, ...] = ()
    harmless_train: tuple[str, ...] = ()
    harmless_val: tuple[str, ...] = ()
    harmless_test: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> TraitDataset:
        if not _TRAIT_NAME.match(self.name):
            raise InvalidArgument(
                "name", f"{self.name!r} is not '<{'|'.join(_REGISTRY)}>/<lowercase name>'"
            )
        if self.name.split("/", 1)[0] != self.methodology:
            raise InvalidArgument(
                "name", f"{self.name!r} does not start with methodology {self.methodology!r}"
            )
        if not is_valid_position(self.position):
            raise InvalidArgument("position", f"unknown position {self.position!r}")
        for placeholder in ("{question}", "{answer}"):
            count = self.eval_prompt.count(placeholder)
            if count != 1:
                raise InvalidArgument(
                    "eval_prompt", f"needs exactly one {placeholder} placeholder, found {count}"
                )
        for methodology, fields in _CONTENT_FIELDS.items():
            if methodology == self.methodology:
                continue
            for field in fields:
                if getattr(self, field):
                    raise InvalidArgument(
                        field, f"is {methodology} content; this dataset is {self.methodology}"
                    )
        for field in _REQUIRED_FIELDS[self.methodology]:
            if not getattr(self, field):
                raise InvalidArgument(field, f"a {self.methodology} dataset needs at least one")
        overlap = set(self.eval_questions) & set(self.questions)
        if overlap:
            raise InvalidArgument(
                "eval_questions",
                f"{len(overlap)} also used for extraction, e.g. {sorted(overlap)[0]!r}",
            )
        return self

    def fingerprint(self) -> str:
        """A stable hash of the content, for job ids and provenance."""
        return stable_hash(self.model_dump(mode="json"))

    def split(self, seed: int, n_train: int | None, n_val: int) -> TraitSplits:
        """Draw disjoint train and val items, deterministically for a given ``seed``.

        Units: pv questions (every instruction pair is used on each); caa ``ab_train`` items;
        arditi instructions, ``n_train``/``n_val`` *per class*, train from ``*_train`` and val from
        ``*_val`` (from the rest of ``*_train`` when a dataset has no val lists).
        ``n_train=None`` takes everything not drawn for val.
        """
        if n_val < 0:
            raise InvalidArgument("n_val", f"must be >= 0, got {n_val}")
        if n_train is not None and n_train < 1:
            raise InvalidArgument("n_train", f"must be >= 1, got {n_train}")
        pools = _POOLS[methodology_info(self.methodology).contrast](self)
        train: list[SplitItem] = []
        val: list[SplitItem] = []
        for source, pool, val_pool in pools:
            if val_pool is None:
                # Val is drawn first so that changing n_train never moves an item into val.
                order = _hash_order(pool, seed)
                _need(n_val + (n_train or 1), len(pool), "n_train" if n_train else "n_val", source)
                val += _in_source_order(pool, order[:n_val])
                rest = order[n_val:]
                train += _in_source_order(pool, rest if n_train is None else rest[:n_train])
            else:
                _need(n_val, len(val_pool), "n_val", f"{source.split('_')[0]}_val")
                _need(n_train or 1, len(pool), "n_train", source)
                val += _in_source_order(val_pool, _hash_order(val_pool, seed)[:n_val])
                order = _hash_order(pool, seed)
                train += _in_source_order(pool, order if n_train is None else order[:n_train])
        return TraitSplits(
            train=TraitSplit(dataset=self.name, part="train", seed=seed, items=tuple(train)),
            val=TraitSplit(dataset=self.name, part="val", seed=seed, items=tuple(val)),
        )


def _hash_order(pool: list[SplitItem], seed: int) -> list[int]:
    # A hash order, not a PRNG: the same seed picks the same items on every platform and
    # library version, and adding items to a pool never reorders the ones already there.
    def key(i: int) -> tuple[str, int]:
        digest = hashlib.sha256(f"{seed}\x00{pool[i].text}".encode()).hexdigest()
        return digest, i

    return sorted(range(len(pool)), key=key)


def _in_source_order(pool: list[SplitItem], chosen: list[int]) -> list[SplitItem]:
    return [pool[i] for i in sorted(chosen)]


def _need(wanted: int, available: int, field: str, source: str) -> None:
    if wanted > available:
        raise InvalidArgument(field, f"needs {wanted} items but {source} has only {available}")


class ChatMessage(_Frozen):
    """One chat turn."""

    role: Literal["system", "user", "assistant"]
    content: str


class ContrastExample(_Frozen):
    """One row of a contrast set: a prompt whose activations are captured at ``position``."""

    pair_id: str = Field(description="Shared by the positive and negative of one contrast pair.")
    label: Literal[0, 1] = Field(description="1 = expresses the trait / harmful / matching.")
    messages: tuple[ChatMessage, ...]
    continue_final_message: bool = Field(
        description="Continue the last (assistant) message instead of opening a new turn."
    )
    generate: bool = Field(description="The response must be generated (or replayed) first.")
    position: str
    question: str = Field(description="The plain question, without system prompt, for the judge.")
    meta: dict[str, Any] = Field(default_factory=dict)

    def message_dicts(self) -> list[dict[str, str]]:
        """The messages as ``[{"role": ..., "content": ...}]`` for chat templates."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


# (source name, items, held-out items or None) of each contrast's split units.
_Pools = list[tuple[str, list[SplitItem], list[SplitItem] | None]]


def _question_pools(dataset: TraitDataset) -> _Pools:
    items = [
        SplitItem(uid=f"questions[{i}]", kind="question", text=q)
        for i, q in enumerate(dataset.questions)
    ]
    return [("questions", items, None)]


def _ab_pools(dataset: TraitDataset) -> _Pools:
    items = [
        SplitItem(uid=f"ab_train[{i}]", kind="ab", text=it.question, ab=it)
        for i, it in enumerate(dataset.ab_train)
    ]
    return [("ab_train", items, None)]


def _instruction_pools(dataset: TraitDataset) -> _Pools:
    pools: _Pools = []
    for kind in ("harmful", "harmless"):
        train_texts: tuple[str, ...] = getattr(dataset, f"{kind}_train")
        val_texts: tuple[str, ...] = getattr(dataset, f"{kind}_val")
        pools.append(
            (
                f"{kind}_train",
                [
                    SplitItem(uid=f"{kind}_train[{i}]", kind=kind, text=t)
                    for i, t in enumerate(train_texts)
                ],
                [
                    SplitItem(uid=f"{kind}_val[{i}]", kind=kind, text=t)
                    for i, t in enumerate(val_texts)
                ]
                or None,
            )
        )
    return pools


#: The split units of each contrast kind (``services.common.methodologies``).
_POOLS: dict[Contrast, Callable[[TraitDataset], _Pools]] = {
    "system_prompt": _question_pools,
    "answer_letter": _ab_pools,
    "instruction_kind": _instruction_pools,
}
