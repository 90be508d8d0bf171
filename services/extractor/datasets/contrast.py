"""Turn a dataset split into contrast examples (chat prompts, labels, positions) per methodology.

* pv: ``system = pos | neg instruction``, ``user = question``, one row per instruction pair and
  rollout; the response is generated (or replayed) and read at ``response[:]``.
* caa: ``user = question with its choices``, then an assistant message ``"(A"`` continued in
  place, so ``prompt[-1]`` is the answer-letter token, as CAA reads the letter of the matching vs
  not-matching answer.
* arditi: ``user = instruction`` with the generation prompt; ``prompt[-1]`` is the last
  post-instruction token.

Also: the methodology check against a model's chat template, and the A/B prompts for the
steerer's logit difference (assistant message ``"("``; compare the two letters' logits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.methodologies import Contrast, methodology_info
from services.extractor.datasets.schema import (
    ChatMessage,
    ContrastExample,
    TraitDataset,
    TraitSplit,
)

__all__ = [
    "LogitDiffItem",
    "build_contrast_set",
    "check_methodology",
    "logit_diff_items",
]


def check_methodology(
    dataset: TraitDataset,
    supports_system_role: bool,
    supports_chat_template: bool,
    *,
    model: str = "this model",
) -> None:
    """Raise FailedPrecondition when ``dataset``'s methodology cannot run on the model.

    pv needs a chat template with a system role (the contrast is the system prompt); caa and
    arditi need a chat template (the answer prefix and post-instruction tokens come from it).
    """
    system_role = methodology_info(dataset.methodology).needs_system_role
    if not supports_chat_template:
        raise FailedPrecondition(
            f"{dataset.name} needs a chat template"
            + (" with a system role" if system_role else "")
            + f"; model {model} has none"
        )
    if system_role and not supports_system_role:
        raise FailedPrecondition(
            f"{dataset.name} needs a chat template with a system role (persona vectors contrast "
            f"system prompts); model {model}'s template has no system role"
        )


def _check_split(dataset: TraitDataset, split: TraitSplit) -> None:
    if split.dataset != dataset.name:
        raise InvalidArgument(
            "split", f"was drawn from {split.dataset!r}, not from {dataset.name!r}"
        )


def build_contrast_set(
    dataset: TraitDataset, split: TraitSplit, *, rollouts: int = 1
) -> list[ContrastExample]:
    """The contrast rows for one split part; positives and negatives share a ``pair_id``.

    ``rollouts`` repeats each pv row (sampled responses differ); caa and arditi prompts are
    deterministic, so it is ignored there (a repeat would capture identical activations).
    """
    _check_split(dataset, split)
    if rollouts < 1:
        raise InvalidArgument("rollouts", f"must be >= 1, got {rollouts}")
    build = _BUILDERS[methodology_info(dataset.methodology).contrast]
    return build(dataset, split, rollouts)


def _system_prompt_rows(
    dataset: TraitDataset, split: TraitSplit, rollouts: int
) -> list[ContrastExample]:
    """pv: each question under the positive and the negative system prompt of every pair."""
    out: list[ContrastExample] = []
    for item in split.items:
        for i, pair in enumerate(dataset.instructions):
            for r in range(rollouts):
                for label, system in ((1, pair.pos), (0, pair.neg)):
                    out.append(
                        ContrastExample(
                            pair_id=f"{item.uid}/instruction[{i}]/rollout[{r}]",
                            label=1 if label else 0,
                            messages=(
                                ChatMessage(role="system", content=system),
                                ChatMessage(role="user", content=item.text),
                            ),
                            continue_final_message=False,
                            generate=True,
                            position=dataset.position,
                            question=item.text,
                            meta={
                                "split": split.part,
                                "item": item.uid,
                                "instruction": i,
                                "rollout": r,
                            },
                        )
                    )
    return out


def _answer_letter_rows(
    dataset: TraitDataset, split: TraitSplit, rollouts: int
) -> list[ContrastExample]:
    """caa: each A/B question answered with the matching and the not-matching letter."""
    out: list[ContrastExample] = []
    for item in split.items:
        ab = item.ab
        if ab is None:
            raise InvalidArgument(f"split.items[{item.uid}].ab", "missing for a caa dataset")
        for label, letter in ((1, ab.matching_letter), (0, ab.not_matching_letter)):
            out.append(
                ContrastExample(
                    pair_id=item.uid,
                    label=1 if label else 0,
                    messages=(
                        ChatMessage(role="user", content=ab.question),
                        ChatMessage(role="assistant", content=f"({letter}"),
                    ),
                    continue_final_message=True,
                    generate=False,
                    position=dataset.position,
                    question=ab.question,
                    meta={"split": split.part, "item": item.uid, "letter": letter},
                )
            )
    return out


def _instruction_kind_rows(
    dataset: TraitDataset, split: TraitSplit, rollouts: int
) -> list[ContrastExample]:
    """arditi: harmful against harmless instructions."""
    # Harmful and harmless instructions are not paired: each row has its own pair_id.
    return [
        ContrastExample(
            pair_id=item.uid,
            label=1 if item.kind == "harmful" else 0,
            messages=(ChatMessage(role="user", content=item.text),),
            continue_final_message=False,
            generate=False,
            position=dataset.position,
            question=item.text,
            meta={"split": split.part, "item": item.uid, "kind": item.kind},
        )
        for item in split.items
    ]


#: The contrast builder of each contrast kind (``services.common.methodologies``).
_BUILDERS: dict[Contrast, Callable[[TraitDataset, TraitSplit, int], list[ContrastExample]]] = {
    "system_prompt": _system_prompt_rows,
    "answer_letter": _answer_letter_rows,
    "instruction_kind": _instruction_kind_rows,
}


class LogitDiffItem(BaseModel):
    """One CAA A/B prompt ending in the assistant prefix ``"("``; compare the letters' logits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    item_id: str = Field(description="'ab_test[i]' or 'ab_train[i]'.")
    messages: tuple[ChatMessage, ...]
    continue_final_message: bool = True
    matching: str = Field(description="Letter of the trait-expressing answer, e.g. 'A'.")
    not_matching: str = Field(description="Letter of the other answer.")
    question: str

    def message_dicts(self) -> list[dict[str, str]]:
        """The messages as ``[{"role": ..., "content": ...}]`` for chat templates."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


def logit_diff_items(
    dataset: TraitDataset, part: Literal["test", "train"] = "test"
) -> list[LogitDiffItem]:
    """The A/B prompts of a caa dataset for logit difference (held-out ``ab_test`` by default)."""
    if not methodology_info(dataset.methodology).logit_diff:
        raise FailedPrecondition(
            f"{dataset.name} is a {dataset.methodology} dataset; logit difference needs caa A/B items"
        )
    items = dataset.ab_test if part == "test" else dataset.ab_train
    if not items:
        raise FailedPrecondition(f"{dataset.name} has no ab_{part} items")
    return [
        LogitDiffItem(
            item_id=f"ab_{part}[{i}]",
            messages=(
                ChatMessage(role="user", content=ab.question),
                ChatMessage(role="assistant", content="("),
            ),
            matching=ab.matching_letter,
            not_matching=ab.not_matching_letter,
            question=ab.question,
        )
        for i, ab in enumerate(items)
    ]
