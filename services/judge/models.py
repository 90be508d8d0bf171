"""The judge's wire types: items, rubrics (with trait exemplars), requests and per-item results.

A request carries its rubrics once, keyed by trait (``pv/evil``); each item names the rubric it
is judged by, or ``coherence`` for the built-in coherence rubric. Every result records the
backend, judge model and rubric hash that produced it, and why an item could not be scored.
A ``fresh`` request bypasses the verdict cache (a re-judging) without updating it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)

from services.common.errors import InvalidArgument

__all__ = [
    "COHERENCE",
    "REQUEST_LIMIT",
    "Exemplars",
    "JudgeItem",
    "JudgeReply",
    "JudgeRequest",
    "JudgeResult",
    "JudgeStatus",
    "Reason",
    "ReplyError",
    "Rubric",
    "TokenLogprob",
    "Verdict",
    "invalid_argument",
    "parse_request",
]

#: The rubric key every item may use without sending a rubric: the built-in coherence rubric.
COHERENCE = "coherence"
#: Most items in one request (the client chunks larger batches).
REQUEST_LIMIT = 4096


class Exemplars(BaseModel):
    """Short texts that show a trait (``positive``) and its opposite (``negative``).

    The embedding backend scores an answer by its calibrated similarity to these; the openai
    backend ignores them. Example answers work best; a trait's pos/neg instructions also work.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    # ``pos``/``neg`` are accepted too: the trait datasets' exemplars validate as they are.
    positive: tuple[str, ...] = Field(
        min_length=1, max_length=256, validation_alias=AliasChoices("positive", "pos")
    )
    negative: tuple[str, ...] = Field(
        min_length=1, max_length=256, validation_alias=AliasChoices("negative", "neg")
    )


class Rubric(BaseModel):
    """How one trait (or coherence) is judged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["trait", "coherence"] = Field(
        "trait",
        description="What the score measures; the embedding backend scores them differently.",
    )
    eval_prompt: str = Field(
        min_length=1,
        max_length=64_000,
        description="Judge prompt with {question} and {answer} placeholders (persona-vectors form).",
    )
    exemplars: Exemplars | None = Field(
        None, description="Trait exemplars for the embedding backend."
    )


class JudgeItem(BaseModel):
    """One answer to judge."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    question: str = Field(max_length=200_000)
    answer: str = Field(max_length=200_000)
    rubric: str = Field(
        COHERENCE, min_length=1, max_length=200, description="A key of the request's rubrics."
    )


class JudgeRequest(BaseModel):
    """A batch of items with the rubrics they reference (each rubric travels once)."""

    model_config = ConfigDict(extra="forbid")

    items: list[JudgeItem] = Field(max_length=REQUEST_LIMIT)
    rubrics: dict[str, Rubric] = Field(default_factory=dict)
    request_id: str = Field("", max_length=200, description="Caller's id, echoed in logs.")
    fresh: StrictBool = Field(
        False,
        description="Score every item with the backend again: no cached verdict, no sharing "
        "with identical items other requests are scoring (a re-judging, e.g. the noise floor's). "
        "Fresh verdicts are returned but never written to the cache, so the cached verdict "
        "stays the one the first judging used. Identical items within the request are still "
        "scored once.",
    )

    @model_validator(mode="after")
    def _rubrics_resolve(self) -> JudgeRequest:
        # Raised as ValueError so pydantic reports it; services map it to InvalidArgument.
        if COHERENCE in self.rubrics:
            raise ValueError(f"rubrics.{COHERENCE}: the coherence rubric is built in")
        for i, item in enumerate(self.items):
            if item.rubric != COHERENCE and item.rubric not in self.rubrics:
                raise ValueError(f"items[{i}].rubric: unknown rubric {item.rubric!r}")
        return self


class JudgeStatus(StrEnum):
    """What the judge concluded about an item."""

    SCORED = "scored"
    REFUSAL = "refusal"
    UNSCORABLE = "unscorable"


class Reason(StrEnum):
    """Why an item is unscorable. Only ``LOW_NUMERIC_MASS`` is a stable verdict (cached)."""

    LOW_NUMERIC_MASS = "low_numeric_mass"  # the judge did not answer with a number
    NO_LOGPROBS = "no_logprobs"  # the endpoint returned no top_logprobs
    INVALID_RESPONSE = "invalid_response"  # truncated or malformed body, after retries
    UPSTREAM_ERROR = "upstream_error"  # 5xx, timeouts, connection errors, after retries
    RATE_LIMITED = "rate_limited"  # 429 after retries, or Retry-After beyond the limit
    BREAKER_OPEN = "breaker_open"  # the circuit breaker refused the call
    REJECTED = "rejected"  # 4xx other than 429 (bad request, auth): not retried
    NO_EXEMPLARS = "no_exemplars"  # the embedding backend needs exemplars for this trait
    EMPTY_ANSWER = "empty_answer"  # nothing to judge for a trait
    INTERNAL = "internal_error"  # a bug; the message says where


class TokenLogprob(BaseModel):
    """One alternative at the judge's first output token."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token: str
    logprob: float


class Verdict(BaseModel):
    """What a backend concluded about one item (the cached part of a result)."""

    model_config = ConfigDict(extra="forbid")

    status: JudgeStatus
    score: float | None = Field(None, ge=0, le=100, description="0-100 when scored.")
    reason: Reason | None = Field(None, description="Why unscorable.")
    detail: str | None = Field(None, max_length=2000, description="Human-readable detail.")
    retryable: bool = Field(False, description="Transient failure: a later call may succeed.")
    numeric_mass: float | None = Field(None, description="Probability on tokens 0-100.")
    refusal_mass: float | None = Field(None, description="Probability on REFUSAL tokens.")
    refusal_over_score: bool = Field(
        False,
        description="openai backend: REFUSAL mass above a numeric mass that alone would score; "
        "the judge setting refusal_over_score chose between REFUSAL and the score.",
    )
    signals: dict[str, float] = Field(
        default_factory=dict, description="Embedding backend: the signals used and their values."
    )
    top_logprobs: list[TokenLogprob] | None = Field(
        None, description="openai backend: the first token's alternatives."
    )
    attempts: int = Field(0, ge=0, description="Upstream calls made for this item.")
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)

    @property
    def cacheable(self) -> bool:
        """Whether this verdict is stable: scored, refused, or a non-numeric judgement."""
        return self.status is not JudgeStatus.UNSCORABLE or self.reason is Reason.LOW_NUMERIC_MASS


class JudgeResult(Verdict):
    """A verdict with its provenance: backend, judge model, rubric and cache key."""

    backend: str
    model: str
    rubric: str = Field(description="The rubric key the item named.")
    rubric_hash: str
    key: str = Field(
        description="Content address: hash of backend, model, rubric, question, answer."
    )
    cached: bool = Field(
        False,
        description="Not scored upstream for this call: from the cache, or shared with an "
        "identical item another request was already scoring.",
    )
    latency_s: float = Field(0.0, ge=0, description="Time from request to verdict in this call.")

    @property
    def ok(self) -> bool:
        """Scored or refused (a usable judgement)."""
        return self.status is not JudgeStatus.UNSCORABLE


class ReplyError(BaseModel):
    """A request-level failure (bad input, or a reply that would exceed the payload limit)."""

    code: Literal["invalid_argument", "too_large", "internal"]
    field: str = ""
    message: str


class JudgeReply(BaseModel):
    """The service's answer to one request: results in item order, or an error."""

    results: list[JudgeResult] = Field(default_factory=list)
    error: ReplyError | None = None


def invalid_argument(exc: ValidationError) -> InvalidArgument:
    """The first pydantic error as ``InvalidArgument`` with a field path like ``items[3].answer``."""
    error = exc.errors()[0]
    path = ""
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = str(error["msg"]).removeprefix("Value error, ")
    # Model-level checks name their own field: "items[0].rubric: unknown rubric 'x'".
    head, sep, rest = message.partition(": ")
    if not path and sep and " " not in head:
        return InvalidArgument(head, rest)
    return InvalidArgument(path or "request", message)


def parse_request(data: bytes | str) -> JudgeRequest:
    """Parse a JSON request, raising InvalidArgument naming the offending field."""
    try:
        return JudgeRequest.model_validate_json(data)
    except ValidationError as exc:
        raise invalid_argument(exc) from None
