"""Tests for trainer.r1.answers (issue 23): the grader is neither gameable nor too strict, and gives one
verdict whichever side is the gold. The real math-verify helper decides the symbolic cases."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest

from trainer.r1.answers import ITEMS_BUDGET_S, MAX_ITEMS, answers_equal, numerals_equal, split_items
from trainer.r1.math_verify import MathVerifier, default_verifier
from trainer.r1.numerals import parse_numeral
from trainer.r1.rewards import reward_function


def both_ways(a: str, b: str) -> bool:
    """The verdict, checked to be the same with the sides swapped."""
    forward, backward = answers_equal(a, b), answers_equal(b, a)
    assert forward == backward, (a, b, forward, backward)
    return forward


def scores(answer: str, gold: str) -> float:
    return reward_function(f"<think>\nw\n</think>\n<answer>{answer}</answer>", gold)


# Gameable: a wrong answer that used to score 10 (or could), both ways round.
GAMEABLE = [
    ("2x = \\sqrt{3}", "\\sqrt{3}"),  # an equation whose right side matches
    ("2x = 3", "3"),
    ("12 + 30 = 42", "42"),
    ("\\frac{1}{2^{98}}", "\\frac{1}{2^{99}}"),  # tiny but different values (math-verify's rounding)
    ("2^{-98}", "2^{-99}"),
    ("10^{-7}", "2 \\cdot 10^{-7}"),
    ("1.0000001", "1"),
    ("x=0", "x=0, x=1, x=-1"),  # one item of a multi-item gold
    ("d=5", "d=5, M=(1,2)"),
    ("0", "0, 1, -1"),
    ("1, 2", "1, 2, 3"),
    ("1, 1", "1, 2"),  # an item matched twice
    ("x = 2", "y = 2"),
    ("5", "50\\%"),  # percent reads as p or p/100, never p/10
    ("0.5\\%", "5"),
    ("50\\%", "0.5\\%"),
    ("0.000000", "\\frac{1}{3000000}"),  # rounding needs 6 significant digits, not 6 places
    ("1.2 \\times 10^{6}", "1200001"),
    ("12 \\times 10^{5}", "1200000"),  # not scientific notation: an expression
    ("3\\frac{1}{2}", "\\frac{3}{2}"),  # a mixed number is 7/2
    ("3\\frac{2}{4}", "3.5"),  # its fraction in lowest terms
    ("(-3)", "3"),
    ("(7)", "7"),  # an unsigned number in parentheses is a one-item tuple
    ("9 (x+1)", "9"),  # a label is letters only
    ("4 2", "42"),
    ("12+30", "42"),
    ("2^3", "8"),
]


@pytest.mark.parametrize(("a", "b"), GAMEABLE)
def test_gameable_pairs_do_not_score(a: str, b: str) -> None:
    assert both_ways(a, b) is False
    assert scores(a, b) == 1.0 and scores(b, a) == 1.0


# Too strict: a right answer that used to score 1.
TOO_STRICT = [
    ("(-3)", "-3"),
    ("(-\\frac{1}{2})", "-0.5"),
    ("3\\frac{1}{2}", "\\frac{7}{2}"),
    ("3 \\frac{1}{2}", "3.5"),
    ("-2\\frac{1}{3}", "-\\frac{7}{3}"),
    ("50\\%", "0.5"),
    ("50\\%", "\\frac{1}{2}"),
    ("12.5%", "0.125"),
    ("50 percent", "0.5"),
    ("1.2 \\times 10^{6}", "1200000"),
    ("1.2\\cdot10^6", "1200000"),
    ("1.2e6", "1,200,000"),
    ("3 \\times 10^{-2}", "0.03"),
    ("9", "9 (apples)"),
    ("350", "350 (g)"),
    ("12", "12 (pieces of candy)"),
    ("9", "9\\text{ apples}"),
    ("9 apples", "9 (apples)"),
    ("Q(50)=47.5", "$Q(50)=47.5$ (pounds)"),
    ("x=2, x=3", "x=3, x=2"),  # items in any order
    ("2, 3", "x=2, x=3"),
    ("$2$, $3$", "2, 3"),
    ("(45,2),(-10,-9)", "$(45,2),(-10,-9)$"),
    ("d=5, M=(1,2)", "d = 5, M = (1, 2)"),
    ("\\theta = \\frac{\\pi}{2}", "\\frac{\\pi}{2}"),
    ("a_{1} = 2", "2"),
    ("2^{-98}", "\\frac{1}{2^{98}}"),  # equal values: exact, not merely close
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
    ("y = 2x + 1", "y=1+2x"),
]


@pytest.mark.parametrize(("a", "b"), TOO_STRICT)
def test_right_answers_written_otherwise_score(a: str, b: str) -> None:
    assert both_ways(a, b) is True
    assert scores(a, b) == 10.0 and scores(b, a) == 10.0


# Asymmetric before: a numeric gold was parsed strictly, a symbolic one went to math-verify.
ASYMMETRIC = [
    ("42", "12+30", False),
    ("42", "\\frac{84}{2}", False),  # an unreduced fraction is an expression on either side
    ("8", "2^3", False),
    ("0.5", "\\frac{2}{4}", False),
    ("\\frac{1}{2}", "0.5", True),
    ("\\{1, 2\\}", "\\{2, 1\\}", True),
    ("(1, 2)", "(1,2)", True),
    ("[0, 1)", "[0, 1]", False),
    ("x \\geq 2", "x > 2", False),
]


@pytest.mark.parametrize(("a", "b", "verdict"), ASYMMETRIC)
def test_one_verdict_whichever_side_is_the_gold(a: str, b: str, verdict: bool) -> None:
    assert both_ways(a, b) is verdict


def test_numerals_are_compared_exactly() -> None:
    third = parse_numeral("1/3")
    assert third is not None
    for text, equal in (("0.333333", True), ("0.333334", False), ("0.3333333", True), ("0.33333", False)):
        decimal = parse_numeral(text)
        assert decimal is not None and numerals_equal(decimal, third) is equal, text
    # A terminating value is never matched by rounding: 0.1234567 is written exactly.
    exact, rounded = parse_numeral("0.1234567"), parse_numeral("0.123457")
    assert exact is not None and rounded is not None and not numerals_equal(exact, rounded)
    big = parse_numeral("1.2 \\times 10^{6}")
    assert big is not None and big.value == 1_200_000
    mixed = parse_numeral("3\\frac{1}{2}")
    assert mixed is not None and mixed.value == Fraction(7, 2)
    percent = parse_numeral("50\\%")
    assert percent is not None and percent.percent and percent.readings() == (50, Fraction(1, 2))


def test_numeric_pairs_need_no_helper() -> None:
    stats = default_verifier().stats
    before = stats.requests + stats.cache_hits
    for a, b in (("(-3)", "-3"), ("50\\%", "0.5"), ("1.2e6", "1200000"), ("9", "9 (apples)"), ("4 2", "42")):
        both_ways(a, b)
    assert stats.requests + stats.cache_hits == before


def test_split_items() -> None:
    assert split_items("$(45,2),(-10,-9)$") == ["(45,2)", "(-10,-9)"]
    assert split_items("1,000") == ["1,000"]  # a number with a thousands separator is one item
    assert split_items("\\{1, 2\\}") == ["\\{1, 2\\}"]
    assert split_items("[0, 1), (2, 3]") == ["[0, 1)", "(2, 3]"]
    assert split_items("\\boxed{1, 2}") == ["1", "2"]
    assert split_items("1\\,000") == ["1\\,000"]


def test_the_helper_verdict_is_symmetric_and_exact() -> None:
    verifier = MathVerifier(timeout_s=30.0)  # generous: the machine running the tests may be busy
    try:
        assert verifier.warm_up() is True
        assert verifier.equal("\\frac{1}{2^{98}}", "\\frac{1}{2^{99}}") is False
        assert verifier.equal("\\frac{1}{2^{99}}", "\\frac{1}{2^{98}}") is False
        assert verifier.equal("\\sqrt{2} \\cdot 10^{-9}", "1.414 \\cdot 10^{-9}") is False
        assert verifier.equal("\\sqrt{8}", "2\\sqrt{2}") is True
        assert verifier.equal("\\pi/2", "\\frac{\\pi}{2}") is True
        assert verifier.stats.errors == 0 and verifier.stats.soft_timeouts == 0
    finally:
        verifier.close()


def test_many_slow_items_are_bounded() -> None:
    # Items that each make math-verify work to its deadline: the matching stops at its budget.
    verifier = default_verifier()
    assert verifier.warm_up() is True
    slow = ", ".join(f"2^{{2^{{2^{{2^{{2^{{{n}}}}}}}}}}}" for n in range(2, 2 + MAX_ITEMS))
    gold = ", ".join(f"\\sqrt{{{n}}}" for n in range(2, 2 + MAX_ITEMS))
    start = time.monotonic()
    assert answers_equal(slow, gold) is False
    assert time.monotonic() - start < ITEMS_BUDGET_S + 2 * verifier.timeout_s + 5.0
