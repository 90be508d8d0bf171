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

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import FailedPrecondition, InvalidArgument
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
    if not supports_chat_template:
        raise FailedPrecondition(
            f"{dataset.name} needs a chat template"
            + (" with a system role" if dataset.methodology == "pv" else "")
            + f"; model {model} has none"
        )
    if dataset.methodology == "pv" and not supports_system_role:
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
    out: list[ContrastExample] = []
    if dataset.methodology == "pv":
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
    elif dataset.methodology == "caa":
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
    else:
        # Harmful and harmless instructions are not paired: each row has its own pair_id.
        for item in split.items:
            out.append(
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
            )
    return out


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
    if dataset.methodology != "caa":
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
