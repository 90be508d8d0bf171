"""Log-prob table -> score / REFUSAL / unscorable, on fixed tables with hand-computed answers."""

from __future__ import annotations

import math

import pytest

from services.judge.aggregate import aggregate, is_refusal_token, parse_score_token
from services.judge.models import JudgeStatus, Reason
from tests.judge.fake_openai import table


def test_weighted_mean_over_numbers() -> None:
    # 0.5*80 + 0.25*90 + 0.25*70 = 40 + 22.5 + 17.5 = 80
    out = aggregate(table({"80": 0.5, "90": 0.25, "70": 0.25}))
    assert out.status is JudgeStatus.SCORED
    assert out.score == pytest.approx(80.0)
    assert out.numeric_mass == pytest.approx(1.0)


def test_renormalised_over_numeric_mass() -> None:
    # numbers carry 0.4: (0.3*100 + 0.1*0) / 0.4 = 75
    out = aggregate(table({"100": 0.3, " 0": 0.1, "Hello": 0.6}))
    assert out.status is JudgeStatus.SCORED
    assert out.score == pytest.approx(75.0)
    assert out.numeric_mass == pytest.approx(0.4)


def test_below_min_mass_is_unscorable_not_zero() -> None:
    out = aggregate(table({"50": 0.2, "The": 0.8}))
    assert out.status is JudgeStatus.UNSCORABLE
    assert out.score is None
    assert out.reason is Reason.LOW_NUMERIC_MASS
    assert out.numeric_mass == pytest.approx(0.2)
    assert "0.2000 < 0.25" in (out.detail or "")


def test_exactly_min_mass_is_scored() -> None:
    out = aggregate(table({"40": 0.25, "x": 0.75}))
    assert out.status is JudgeStatus.SCORED
    assert out.score == pytest.approx(40.0)


def test_custom_min_mass() -> None:
    probs = {"40": 0.3, "x": 0.7}
    assert aggregate(table(probs), min_mass=0.5).status is JudgeStatus.UNSCORABLE
    assert aggregate(table(probs), min_mass=0.25).status is JudgeStatus.SCORED


def test_refusal_dominates() -> None:
    # refusal 0.6 > numeric 0.3 + 0.1 = 0.4
    out = aggregate(table({"REF": 0.6, "0": 0.3, "10": 0.1}))
    assert out.status is JudgeStatus.REFUSAL
    assert out.score is None
    assert out.refusal_mass == pytest.approx(0.6)
    assert out.numeric_mass == pytest.approx(0.4)


def test_refusal_below_numeric_mass_is_scored() -> None:
    out = aggregate(table({"REFUSAL": 0.3, "60": 0.7}))
    assert out.status is JudgeStatus.SCORED
    assert out.score == pytest.approx(60.0)
    assert out.refusal_mass == pytest.approx(0.3)


def test_small_refusal_and_small_numbers_are_unscorable() -> None:
    out = aggregate(table({"REFUS": 0.2, "30": 0.1, "I": 0.7}))
    assert out.status is JudgeStatus.UNSCORABLE
    assert out.reason is Reason.LOW_NUMERIC_MASS


def test_strict_parsing_counts_only_exact_integers() -> None:
    # Only "85" (0.15) and " 85" (0.10) count: mass 0.25, score 85.
    probs = {
        "85abc": 0.2,
        "eighty": 0.1,
        "085": 0.1,
        "101": 0.05,
        "8_5": 0.05,
        "85.0": 0.05,
        "+85": 0.05,
        "-5": 0.05,
        "85": 0.15,
        " 85": 0.10,
    }
    out = aggregate(table(probs))
    assert out.status is JudgeStatus.SCORED
    assert out.numeric_mass == pytest.approx(0.25)
    assert out.score == pytest.approx(85.0)


def test_spellings_of_one_number_add_up() -> None:
    # (0.3 + 0.2) * 85 + 0.5 * 95 = 90
    out = aggregate(table({"85": 0.3, " 85": 0.2, "95": 0.5}))
    assert out.score == pytest.approx(90.0)


def test_zero_probability_and_bad_logprobs() -> None:
    out = aggregate([("50", 0.0), ("70", -math.inf)])
    assert out.score == pytest.approx(50.0)
    with pytest.raises(ValueError, match="not a log-probability"):
        aggregate([("50", float("nan"))])
    with pytest.raises(ValueError, match="not a log-probability"):
        aggregate([("50", 0.5)])


def test_empty_table_is_unscorable() -> None:
    out = aggregate([])
    assert out.status is JudgeStatus.UNSCORABLE
    assert out.numeric_mass == 0.0


@pytest.mark.parametrize(
    ("token", "value"),
    [
        ("85", 85),
        (" 85", 85),
        ("85 ", 85),
        ("\n7", 7),
        ("0", 0),
        ("100", 100),
        ("85abc", None),
        ("eighty", None),
        ("085", None),
        ("00", None),
        ("101", None),
        ("1000", None),
        ("+85", None),
        ("-0", None),
        ("8_5", None),
        ("85.0", None),
        ("٨٥", None),  # Arabic-Indic digits
        ("８５", None),  # full-width digits
        ("", None),
        (" ", None),
    ],
)
def test_parse_score_token(token: str, value: int | None) -> None:
    assert parse_score_token(token) == value


@pytest.mark.parametrize(
    ("token", "refusal"),
    [
        ("REFUSAL", True),
        (" REF", True),
        ("RE", True),
        ("REFUS", True),
        ("R", False),
        ("Ref", False),
        ("REFUSE", False),
        ("refusal", False),
    ],
)
def test_refusal_tokens(token: str, refusal: bool) -> None:
    assert is_refusal_token(token) is refusal


def test_refusal_over_score_is_an_option_and_marks_the_tables_it_decides() -> None:
    contested = table({"REFUSAL": 0.6, "20": 0.3, "40": 0.1})  # numeric 0.4 >= 0.25
    on = aggregate(contested)
    assert on.status is JudgeStatus.REFUSAL and on.contested
    off = aggregate(contested, refusal_over_score=False)  # persona-vectors: score it
    assert off.status is JudgeStatus.SCORED and off.contested
    assert off.score == pytest.approx(25.0)
    # Numeric mass below min_mass: REFUSAL either way, and the option decided nothing.
    clear = table({"REFUSAL": 0.8, "20": 0.1, "x": 0.1})
    for flag in (True, False):
        out = aggregate(clear, refusal_over_score=flag)
        assert out.status is JudgeStatus.REFUSAL and not out.contested
    # Refusal mass below numeric mass: scored either way, uncontested.
    scored = aggregate(table({"REFUSAL": 0.3, "60": 0.7}), refusal_over_score=True)
    assert scored.status is JudgeStatus.SCORED and not scored.contested
