"""Tests for trainer.r1 (format, rewards, math_verify): format rule, answer extraction, math-verify equality, rewards, bounded time."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import pytest

from trainer.r1.format import check_format, extract_answer
from trainer.r1.math_verify import MathVerifier, default_verifier
from trainer.r1.rewards import (
    REWARD_FUNCS,
    accuracy_reward,
    answers_equal,
    format_reward,
    get_reward_funcs,
    normalize_answer,
    parse_numeral,
    reward_function,
    score,
)

ROOT = Path(__file__).resolve().parents[1]
GOOD = "<think>\n2 + 2 = 4\n</think>\n<answer>4</answer>"
# A hang guard, not a speed target (those live in bench/): each guarded call takes well under a second on
# an idle machine, and without its guard (caps, deadlines) minutes or forever; 60 s leaves a loaded 2-core
# machine a margin of more than 50x.
HANG_GUARD_S = 60.0


# --------------------------------------------------------------------------------------------------
# check_format / extract_answer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        GOOD,
        "<think>r</think><answer>a</answer>",
        "  \n<think>r</think>  \n <answer>a</answer>",  # leading whitespace and whitespace between blocks
        "<think>r</think><answer>a</answer>\n\n  \t",  # whitespace after </answer>
        "<think></think><answer></answer>",  # empty blocks are still the right format
    ],
)
def test_check_format_accepts(response: str) -> None:
    assert check_format(response) is True


@pytest.mark.parametrize("tag", ["<think>", "</think>", "<answer>", "</answer>"])
def test_check_format_rejects_missing_tag(tag: str) -> None:
    assert check_format(GOOD.replace(tag, "", 1)) is False


@pytest.mark.parametrize("tag", ["<think>", "</think>", "<answer>", "</answer>"])
def test_check_format_rejects_duplicated_tag(tag: str) -> None:
    assert check_format(GOOD.replace(tag, tag + " " + tag, 1)) is False


@pytest.mark.parametrize(
    "response",
    [
        "<answer>4</answer><think>r</think>",  # answer block first
        "</think>r<think><answer>4</answer>",  # think tags swapped
        "<think>r</think></answer>4<answer>",  # answer tags swapped
        "<think>r<answer>4</think></answer>",  # interleaved
    ],
)
def test_check_format_rejects_wrong_order(response: str) -> None:
    assert check_format(response) is False


@pytest.mark.parametrize(
    "response",
    [
        GOOD + " trailing",
        GOOD + "\n<|endoftext|>",
        "Sure! " + GOOD,  # text before <think> is not allowed (the R1 regex anchors at the start)
        "<think>r</think> so: <answer>4</answer>",  # text between the blocks
        "",
        "no tags at all",
    ],
)
def test_check_format_rejects_extra_text(response: str) -> None:
    assert check_format(response) is False


def test_extract_answer() -> None:
    assert extract_answer(GOOD) == "4"
    assert extract_answer("blah <answer>  \\frac{1}{2} \n</answer> tail") == "\\frac{1}{2}"
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("no answer here") is None
    assert extract_answer("<answer>1</answer><answer>2</answer>") is None
    assert extract_answer("</answer>1<answer>") is None
    assert extract_answer("<answer>unterminated") is None


# --------------------------------------------------------------------------------------------------
# answers_equal
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("predicted", "truth"),
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("1,000", "1000"),
        ("x = 2", "2"),
        ("\\boxed{3}", "3"),
        ("$5$", "5"),
        ("5.", "5"),
        ("2^{1/2}", "\\sqrt{2}"),  # only math-verify can decide this one
        ("1 + x^2", "x^2+1"),
        ("\\frac{6}{8}", "\\frac{6}{8}"),  # an unreduced truth is matched as written
        ("6/8", "\\frac{6}{8}"),
        ("Tuesday", " tuesday. "),  # not math: the normalised-string fallback
        ("1/2", "0.5"),
        ("0.333333", "1/3"),  # math-verify's 6-decimal rounding, which the numeric fast path defers to
    ],
)
def test_answers_equal_equivalent(predicted: str, truth: str) -> None:
    assert answers_equal(predicted, truth) is True


@pytest.mark.parametrize(
    ("predicted", "truth"),
    [
        ("3", "2"),
        ("0.49", "\\frac{1}{2}"),
        ("\\sqrt{3}", "\\sqrt{2}"),
        ("x = 3", "2"),
        ("", "2"),
        ("2", ""),
        ("   ", "   "),
        ("Monday", "Tuesday"),
        ("1,234", "1, 234"),
        ("0.33", "1/3"),
        ("0.3333", "1/3"),
    ],
)
def test_answers_equal_different(predicted: str, truth: str) -> None:
    assert answers_equal(predicted, truth) is False


def test_normalize_answer() -> None:
    assert normalize_answer(" $1,234,567.5$. ") == "1234567.5"
    assert normalize_answer("1 234 567") == "1234567"
    assert normalize_answer("(1, 234)") == "(1,234)"  # a tuple keeps its comma
    assert normalize_answer("1, 234") == "1,234"  # a list too: only a lone number loses separators
    assert normalize_answer("ABC D") == "abcd"
    assert normalize_answer(" 4  2 ") == "4 2"  # digits apart stay apart: not the number 42
    assert normalize_answer("2 \\pi") == "2\\pi"


# Issue 15: a final answer must be a value. Copying the question ("Compute 12 + 30.") or spacing the digits
# of the answer must not score, and a correct value with a currency sign or a unit word must.
@pytest.mark.parametrize(
    ("predicted", "truth"),
    [
        ("4 2", "42"),
        ("4  2", "42"),
        ("4\\ 2", "42"),
        ("$4 2$", "42"),
        ("1 2 3 4", "1234"),
        ("10 00", "1000"),  # not thousands groups
        ("12+30", "42"),
        ("12 + 30", "42"),
        ("30+12", "42"),
        ("50-8", "42"),
        ("6*7", "42"),
        ("6 \\times 7", "42"),
        ("84/2", "42"),
        ("\\frac{84}{2}", "42"),
        ("42/1", "42"),
        ("\\boxed{12+30}", "42"),
        ("x = 12 + 30", "42"),
        ("12 + 30 = 42", "42"),
        ("2^3", "8"),
        ("\\sqrt{64}", "8"),
        ("8^{1}", "8"),
        ("\\frac{2}{4}", "0.5"),  # a fraction must be in lowest terms
        ("2/4", "\\frac{1}{2}"),
        ("\\frac{6}{8}", "\\frac{3}{4}"),
        ("7 hundred", "7"),  # words that change the value are not units
        ("7 squared", "7"),
        ("7 thirds", "7"),
        ("7 x", "7"),  # a bare letter could be a variable
        ("7 dollars", "8"),
        ("\\$7", "8"),
        ("seven", "7"),
    ],
)
def test_answers_equal_rejects_what_is_not_the_value(predicted: str, truth: str) -> None:
    assert answers_equal(predicted, truth) is False
    assert reward_function(f"<think>r</think><answer>{predicted}</answer>", truth) == 1.0


@pytest.mark.parametrize(
    ("predicted", "truth"),
    [
        ("\\$7", "7"),
        ("$7", "7"),
        ("\\$7.00", "7"),
        ("7 dollars", "7"),
        ("7 dollars.", "7"),
        ("7\\text{ dollars}", "7"),
        ("\\text{7 dollars}", "7"),
        ("\\$7", "\\$7"),
        ("7", "\\$7"),
        ("€7", "7"),
        ("7 cm", "7"),
        ("7\\,\\text{cm}^2", "7"),
        ("7 square meters", "7"),
        ("7 km/h", "7"),
        ("25\\%", "25"),
        ("25", "25\\%"),
        ("90^\\circ", "90"),
        ("42 000", "42000"),
        ("42{,}000", "42000"),
        ("42\\,000", "42000"),
        ("1/2", "0.5"),  # a reduced fraction against a fractional truth is a value
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "0.5"),
        ("-\\frac{3}{4}", "-0.75"),
        ("\\frac{-3}{4}", "-3/4"),
        ("0.5", "\\frac{1}{2}"),
        ("42.0", "42"),
        ("27", "27.0"),
        ("−5", "-5"),
        ("x = 42", "42"),
        ("\\boxed{42}", "42"),
    ],
)
def test_answers_equal_accepts_a_value_with_its_sign_or_unit(predicted: str, truth: str) -> None:
    assert answers_equal(predicted, truth) is True
    assert reward_function(f"<think>r</think><answer>{predicted}</answer>", truth) == 10.0


def test_parse_numeral() -> None:
    assert parse_numeral("\\$1,234.50").value == Fraction(123450, 100)
    half = parse_numeral("\\frac{1}{2}")
    assert half is not None and half.reduced and half.parts == (1, 2) and half.text == "1/2"
    unreduced = parse_numeral("4/2")
    assert unreduced is not None and not unreduced.reduced and unreduced.value == 2
    for text in ("12+30", "4 2", "2^3", "\\sqrt{4}", "3\\pi", "1/0", "", "x", "1, 2", "(7)"):
        assert parse_numeral(text) is None, text
    assert parse_numeral("7" * 201) is None  # too long to be a written value


def test_symbolic_truths_still_go_to_math_verify() -> None:
    # Only a ground truth that is a number asks for a value: symbolic truths keep math-verify's equivalence.
    assert answers_equal("\\sqrt{12}", "2\\sqrt{3}") is True
    assert answers_equal("4 2x", "42x") is False
    assert answers_equal("(1, 2)", "(1,2)") is True


def test_integer_fast_path_needs_no_helper() -> None:
    stats = default_verifier().stats
    before = stats.requests + stats.cache_hits
    assert answers_equal("1,000", "1000") is True
    assert answers_equal("-17", "17") is False
    assert answers_equal("0.50", "1/2") is True
    assert answers_equal("123/7", "17.5") is False
    assert stats.requests + stats.cache_hits == before


def test_answers_equal_requires_strings() -> None:
    with pytest.raises(TypeError, match="ground_truth"):
        answers_equal("2", 2)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Adversarial input and bounded time
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "9" * 10_000_000,  # 10 MB
        "{" * 10_000 + "1",  # unbalanced braces
        "}}}2{{{",
        "10^10^10^10",
        "10^{10^{10^{10}}}",  # sympy would evaluate this forever
        "\\frac{1}{" * 200 + "2" + "}" * 200,  # deeply nested \frac
        "7\x00\x00\x00\\frac{\x00}{",  # NUL bytes
        "\\begin{pmatrix}" * 50,
        "\ud800 lone surrogate",
    ],
    ids=[
        "10MB",
        "open-braces",
        "close-braces",
        "tower-flat",
        "tower-nested",
        "nested-frac",
        "nul",
        "env",
        "surrogate",
    ],
)
def test_adversarial_answers_finish(text: str) -> None:
    stats = default_verifier().stats
    before = (stats.requests, stats.hard_timeouts)
    start = time.monotonic()
    result = answers_equal(text, "2")
    assert time.monotonic() - start < HANG_GUARD_S
    assert isinstance(result, bool)
    assert result is False  # none of them denotes 2
    # A numeric truth: decided here, none of this text went to math-verify (nor waited on its deadline).
    assert (stats.requests, stats.hard_timeouts) == before


def test_adversarial_response_reward_finishes() -> None:
    huge = "<think>" + "x" * 10_000_000 + "</think><answer>" + "{" * 5000 + "</answer>"
    start = time.monotonic()
    assert reward_function(huge, "2") == 1.0
    assert reward_function("<think>" * 1_000_000, "2") == 0.0
    assert time.monotonic() - start < HANG_GUARD_S


# Deadlines far enough apart for a loaded 2-core machine (where importing math-verify took over 60 s and a
# first small comparison over 1 s, load average 21): which deadline fired is read from the counters.
STARTUP_S = 600.0


def test_soft_deadline_aborts_slow_comparison_without_restart() -> None:
    verifier = MathVerifier(timeout_s=20.0, soft_timeout_s=3.0, startup_timeout_s=STARTUP_S)
    try:
        assert verifier.warm_up()  # the helper's start (math-verify's import) is not what is guarded
        start = time.monotonic()
        assert verifier.equal("2^{2^{2^{2^{2^{2}}}}}", "2") is False  # sympy would compute this forever
        assert time.monotonic() - start < HANG_GUARD_S
        assert verifier.stats.soft_timeouts == 1
        assert verifier.stats.hard_timeouts == 0
        assert verifier.equal("\\frac{1}{2}", "0.5") is True
        assert verifier.stats.starts == 1
    finally:
        verifier.close()


def test_hard_deadline_kills_and_replaces_the_helper() -> None:
    # A helper that does not answer, made so with SIGSTOP: a slow input cannot do it on every CPU (a 40-deep
    # parenthesis parse took minutes on one machine and 6.6 s on CI's). The soft deadline is far away and a
    # stopped process runs none of its own timers, so only the caller's hard deadline can end the wait.
    verifier = MathVerifier(timeout_s=5.0, soft_timeout_s=120.0, startup_timeout_s=STARTUP_S)
    try:
        assert verifier.equal("1", "1") is True  # start the helper so its import time is not measured
        proc = verifier._proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        assert verifier.equal("\\frac{1}{3}", "2") is False
        elapsed = time.monotonic() - start
        assert 4.9 < elapsed < HANG_GUARD_S  # waited for the 5 s deadline, then gave up on the helper
        assert verifier.stats.hard_timeouts == 1
        assert proc.wait(timeout=10) == -signal.SIGKILL  # the stopped helper was killed, not left behind
        assert verifier.equal("\\frac{1}{2}", "0.5") is True  # a fresh helper answers
        assert verifier.stats.starts == 2
        sent, hits = verifier.stats.requests, verifier.stats.cache_hits
        assert verifier.equal("\\frac{1}{3}", "2") is False  # the verdict is cached: no second wait
        assert (verifier.stats.requests, verifier.stats.cache_hits) == (sent, hits + 1)
        assert verifier.stats.hard_timeouts == 1 and verifier.stats.starts == 2
    finally:
        verifier.close()


def test_caps_keep_pathological_text_away_from_the_helper() -> None:
    verifier = MathVerifier(max_chars=20, max_nesting=3)
    try:
        assert verifier.equal("1" * 21, "1") is False
        assert verifier.equal("((((1))))", "1") is False
        assert verifier.stats.capped == 2
        assert verifier.stats.starts == 0
    finally:
        verifier.close()


def test_results_are_cached() -> None:
    verifier = MathVerifier()
    try:
        assert verifier.warm_up() is True
        assert (verifier.stats.starts, verifier.stats.requests) == (1, 0)
        assert verifier.equal("\\frac{2}{4}", "0.5") is True
        assert verifier.equal("\\frac{2}{4}", "0.5") is True
        assert verifier.stats.requests == 1
        assert verifier.stats.cache_hits == 1
    finally:
        verifier.close()


def test_helper_that_dies_is_replaced() -> None:
    verifier = MathVerifier()
    try:
        assert verifier.equal("\\frac{1}{4}", "0.25") is True
        proc = verifier._proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert verifier.equal("\\frac{3}{4}", "0.75") is True
        assert verifier.stats.starts == 2
    finally:
        verifier.close()


def test_helper_that_cannot_start_degrades_to_false(caplog: pytest.LogCaptureFixture) -> None:
    # No helper can import math-verify in a millisecond: every request is answered False, without raising.
    verifier = MathVerifier(startup_timeout_s=0.001, restart_cooldown_s=60.0)
    try:
        with caplog.at_level("WARNING", logger="trainer.r1.math_verify"):
            assert verifier.equal("\\frac{1}{2}", "0.5") is False
            assert verifier.equal("\\frac{1}{2}", "0.5") is False
        assert verifier.stats.unavailable == 2
        assert verifier.stats.starts == 1  # the cooldown stops a restart on every call
        assert "math-verify helper unavailable" in caplog.text
    finally:
        verifier.close()


def test_works_from_worker_threads() -> None:
    # Symbolic truths: these go through the helper (numeric ones are decided in the caller).
    cases = [
        ("\\sqrt{8}", "2\\sqrt{2}", True),
        ("2^{1/2}", "\\sqrt{2}", True),
        ("x^2 + 2x + 1", "(x+1)^2", True),
        ("\\sqrt{3}", "\\sqrt{2}", False),
    ]
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(answers_equal("\\frac{\\pi}{2}", "\\pi/2")))
    thread.start()
    thread.join(timeout=60)
    assert results == [True]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda c: answers_equal(c[0], c[1]), cases * 3))
    assert got == [c[2] for c in cases] * 3


def _child_compare(queue: multiprocessing.Queue) -> None:
    queue.put(answers_equal("\\sqrt{18}", "3\\sqrt{2}"))


def test_forked_child_gets_its_own_helper() -> None:
    assert answers_equal("\\sqrt{8}", "2\\sqrt{2}") is True  # the parent's helper is running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_compare, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) is True
    finally:
        child.join(timeout=30)
    assert child.exitcode == 0
    assert answers_equal("\\sqrt{27}", "3\\sqrt{3}") is True  # and the parent's still works


# --------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------


def test_reward_function_values() -> None:
    assert reward_function(GOOD, "4") == 10.0
    assert reward_function("<think>half</think><answer>\\frac{1}{2}</answer>", "0.5") == 10.0
    assert reward_function(GOOD, "5") == 1.0
    assert reward_function("<think>r</think><answer></answer>", "5") == 1.0
    assert reward_function("<answer>4</answer>", "4") == 0.0  # right answer, wrong format
    assert reward_function(GOOD + " and more", "4") == 0.0
    assert reward_function("Sure. " + GOOD, "4") == 0.0


def test_small_reward_functions() -> None:
    assert format_reward(GOOD, "anything") == 1.0
    assert format_reward("<answer>4</answer>", "4") == 0.0
    assert accuracy_reward("<answer>4</answer>", "4") == 1.0  # accuracy ignores the think block
    assert accuracy_reward(GOOD, "5") == 0.0
    assert accuracy_reward("4", "4") == 0.0  # no extracted answer, no credit


def test_registry() -> None:
    assert REWARD_FUNCS["r1"] is reward_function
    assert {"r1", "format", "accuracy"} <= set(REWARD_FUNCS)
    assert get_reward_funcs(["format", "r1"]) == [format_reward, reward_function]
    with pytest.raises(ValueError, match=r"'lenght'.*accuracy, format, r1"):
        get_reward_funcs(["r1", "lenght"])


def test_score_weights_and_per_func() -> None:
    responses = [GOOD, "<answer>4</answer>", "<think>r</think><answer>7</answer>"]
    truths = ["4", "4", "4"]
    total, per_func = score(responses, truths, ["format", "accuracy"], [0.5, 2.0])
    assert per_func == {"format": [1.0, 0.0, 1.0], "accuracy": [1.0, 1.0, 0.0]}
    assert total == [2.5, 2.0, 0.5]
    total, per_func = score(responses, truths, ["r1"])
    assert total == per_func["r1"] == [10.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": ["r1"], "weights": [1.0, 2.0]}, "2 reward weights for 1"),
        ({"names": []}, "at least one"),
        ({"names": ["r1", "r1"]}, "duplicate"),
        ({"names": ["nope"]}, "unknown reward function 'nope'"),
    ],
)
def test_score_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        score([GOOD], ["4"], **kwargs)


def test_score_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        score([GOOD, GOOD], ["4"], ["r1"])


def test_module_is_light() -> None:
    # The helper runs this file as a script, and trainer processes import it: neither torch nor
    # math-verify may be imported by it in the caller.
    code = "import sys, trainer.rewards, trainer.r1.rewards, trainer.r1.math_verify; print(sorted(m for m in ('torch', 'math_verify', 'sympy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
