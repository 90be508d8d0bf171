"""The methodology registry: what each trait methodology (pv, caa, arditi) means to every stage.

Stages ask this table instead of comparing methodology names: the spec and the extractor for
the default capture position and the dataset parts, the planner for which jobs a trait gets
(logit difference, ablation), the extractor for its contrast and its chat-template needs, the
steerer for where steering applies and which traits carry harmful instructions.

* ``pv`` — persona vectors (Chen et al. 2025): system prompts that do and do not elicit the
  trait; responses are generated and captured over the response.
* ``caa`` — contrastive activation addition (Rimsky et al. 2024): A/B questions whose answer
  letter matches the trait or not; captured at the answer letter's prompt position.
* ``arditi`` — refusal direction (Arditi et al. 2024): harmful against harmless instructions,
  captured at the last prompt token; ablating the direction is evaluated on harmful prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from services.common.errors import InvalidArgument

__all__ = [
    "METHODOLOGIES",
    "Contrast",
    "Methodology",
    "MethodologyFacts",
    "SteerPositions",
    "default_position",
    "methodology_info",
    "position_reads_response",
]

Methodology = Literal["pv", "caa", "arditi"]

Contrast = Literal["system_prompt", "answer_letter", "instruction_kind"]
"""How a methodology's positive and negative rows differ (the extractor's contrast builder)."""

SteerPositions = Literal["prompt", "response", "all"]


@dataclass(frozen=True)
class MethodologyFacts:
    """One methodology's facts."""

    name: Methodology
    title: str
    default_position: str
    contrast: Contrast
    content_parts: tuple[str, ...]  # dataset fields that carry its items
    required_parts: tuple[str, ...]  # of those, the ones a dataset must have
    needs_system_role: bool  # the contrast is a system prompt
    generates_responses: bool  # contrast rows are answered by the model (rollouts apply)
    logit_diff: bool  # A/B items: logit-difference jobs
    harmful_instructions: bool  # probes and directional ablation; refusal is the trait
    steer_positions: SteerPositions = "all"  # where a steering vector is added

    @property
    def ablation(self) -> bool:
        """Directional ablation is evaluated on harmful instructions."""
        return self.harmful_instructions


_ARDITI_PARTS = tuple(
    f"{side}_{part}" for side in ("harmful", "harmless") for part in ("train", "val", "test")
)

METHODOLOGIES: dict[Methodology, MethodologyFacts] = {
    "pv": MethodologyFacts(
        name="pv",
        title="persona vectors",
        default_position="response[:]",
        contrast="system_prompt",
        content_parts=("instructions", "questions"),
        required_parts=("instructions", "questions"),
        needs_system_role=True,
        generates_responses=True,
        logit_diff=False,
        harmful_instructions=False,
    ),
    "caa": MethodologyFacts(
        name="caa",
        title="contrastive activation addition",
        default_position="prompt[-1]",
        contrast="answer_letter",
        content_parts=("ab_train", "ab_test"),
        required_parts=("ab_train",),
        needs_system_role=False,
        generates_responses=False,
        logit_diff=True,
        harmful_instructions=False,
    ),
    "arditi": MethodologyFacts(
        name="arditi",
        title="refusal direction",
        default_position="prompt[-1]",
        contrast="instruction_kind",
        content_parts=_ARDITI_PARTS,
        required_parts=("harmful_train", "harmless_train"),
        needs_system_role=False,
        generates_responses=False,
        logit_diff=False,
        harmful_instructions=True,
    ),
}
assert set(METHODOLOGIES) == set(get_args(Methodology))


def methodology_info(name: str, field: str = "methodology") -> MethodologyFacts:
    """The facts of methodology ``name``; InvalidArgument naming ``field`` when unknown."""
    facts = METHODOLOGIES.get(name)  # type: ignore[call-overload]
    if facts is None:
        raise InvalidArgument(field, f"unknown methodology {name!r} ({', '.join(METHODOLOGIES)})")
    assert isinstance(facts, MethodologyFacts)
    return facts


def default_position(name: str) -> str:
    """The capture position a methodology's traits use unless the spec overrides it."""
    return methodology_info(name).default_position


def position_reads_response(position: str) -> bool:
    """True when a capture position covers response tokens (they must be generated first)."""
    return position.replace(" ", "").startswith("response")
