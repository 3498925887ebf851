"""Whether two final answers are the same: :func:`answers_equal`, one verdict whichever side is the gold.

The rules, in order (each is symmetric in its two arguments):

1. Equal normalised strings (:func:`~trainer.r1.numerals.normalize_answer`) are equal; an empty answer
   equals nothing.
2. Items: an answer is split at its top-level commas (``1, 3`` or ``d=5, M=(1,2)``; not inside brackets,
   and not a lone number with thousands separators). Both sides need as many items, and every item of one
   must equal its own item of the other: one item of a multi-item gold never scores. (At most
   :data:`MAX_ITEMS` items, matched within :data:`ITEMS_BUDGET_S` seconds.)
3. Equations: a leading lone variable is dropped (``x = 2`` is ``2``; ``x = 2`` against ``y = 2`` is
   not equal). Any other equation (``2x = \\sqrt{3}``) only equals another equation.
4. Numbers: when either side is a numeral (:func:`~trainer.r1.numerals.parse_numeral`), both must be,
   compared exactly as rationals: no tolerance, so ``12+30`` or ``4 2`` never equal ``42``. A fraction
   counts only in lowest terms against a non-integer (or written as the other side writes it). ``p%`` reads
   as ``p`` or ``p/100`` (``50\\%`` equals ``50`` and ``0.5``, never ``5``; two percents compare as
   written). A decimal with at least :data:`ROUNDED_DIGITS` significant digits equals a rational that is
   not a terminating decimal when it is that value correctly rounded (``0.333333`` = ``1/3``).
5. Anything else goes to math-verify in its guarded helper process (:mod:`trainer.r1.math_verify`),
   asked both ways round; there two numeric values must be exactly equal (math-verify's own closeness
   rule would call ``\\frac{1}{2^{98}}`` and ``\\frac{1}{2^{99}}`` equal).

Standard library only in the caller.
"""

from __future__ import annotations

import re
import time
from fractions import Fraction

from trainer.r1.math_verify import default_verifier
from trainer.r1.numerals import MAX_NUMERAL_CHARS, Numeral, normalize_answer, parse_numeral

# A decimal this precise may stand for a value it rounds (0.333333 for 1/3); shorter ones are exact.
ROUNDED_DIGITS = 6
# More items than this is a list, not an answer; compared as a whole string only.
MAX_ITEMS = 12
# Matching the items of two multi-item answers stops (not equal) past this many seconds: each symbolic pair
# may take the helper's deadline, and a completion must not cost minutes.
ITEMS_BUDGET_S = 6.0

_OPEN, _CLOSE = "([{", ")]}"
_DELIMITERS_RE = re.compile(r"(?<!\\)\$|\\\(|\\\)|\\\[|\\\]|\\displaystyle")
# "(pounds)" after a number, "$" or "}" ("\\log (xy)" keeps its argument).
_LABEL_TAIL_RE = re.compile(r"(?<=[\d$}])\s+\([A-Za-z][A-Za-z '.-]+\)\s*$")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GREEK = (
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi pi rho "
    "sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Phi Psi Omega"
)
# "x =", "a_{1} =", "\theta =": a lone variable on the left of the only "=".
_LONE_VARIABLE_RE = re.compile(
    r"\s*(?P<var>(?:[A-Za-z]|\\(?:" + "|".join(_GREEK.split()) + r")(?![A-Za-z]))"
    r"(?:_\{?\w+\}?)?)\s*=(?![=<>])\s*(?P<rest>.*)",
    re.DOTALL,
)
_EQUALS_RE = re.compile(r"(?<![<>!=\\])=(?![=<>])")


def _strip_box(s: str) -> str:
    """``s`` without math delimiters, a trailing label in parentheses after a value or ``$`` (``$Q=5$
    (pounds)``) and a ``\\boxed{}`` around the whole of it."""
    s = _DELIMITERS_RE.sub("", _LABEL_TAIL_RE.sub("", s)).strip()
    m = _BOXED_RE.match(s)
    if m and s.endswith("}") and _closing(s, m.end() - 1) == len(s) - 1:
        s = s[m.end() : -1].strip()
    return s


def _closing(s: str, start: int) -> int:
    """Index of the bracket closing the one at ``start`` (-1 if none)."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] in _OPEN:
            depth += 1
        elif s[i] in _CLOSE:
            depth -= 1
            if depth == 0:
                return i
    return -1


def split_items(text: str) -> list[str]:
    """The top-level comma-separated items of an answer (one item for a lone number like ``1,000``)."""
    s = _strip_box(text)
    if parse_numeral(s) is not None:
        return [s]
    items, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0 and not s.startswith("\\,", i - 1):  # "\," is a thin space
            items.append(s[start:i])
            start = i + 1
    items.append(s[start:])
    items = [_strip_box(item) for item in items]
    return [item for item in items if item] or [s]


def _lone_variable(s: str) -> tuple[str | None, str]:
    """(``x``, ``2``) for ``x = 2``; (None, ``s``) when the left side is not a lone variable."""
    m = _LONE_VARIABLE_RE.fullmatch(s)
    if m is None or _EQUALS_RE.search(m["rest"]):
        return None, s
    return re.sub(r"[\s{}]", "", m["var"]), m["rest"].strip()


def terminating(value: Fraction) -> bool:
    """Whether ``value`` has a finite decimal expansion (its denominator has no prime but 2 and 5)."""
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _rounds_to(decimal: Numeral, value: Fraction) -> bool:
    """Whether ``decimal`` is ``value`` (not a terminating decimal) correctly rounded to its places."""
    if decimal.places is None or decimal.places == 0 or decimal.digits < ROUNDED_DIGITS:
        return False
    if terminating(value):
        return False
    return abs(decimal.value - value) <= Fraction(1, 2 * 10**decimal.places)


def _fraction_ok(x: Numeral, y: Numeral) -> bool:
    """A fraction is a value in lowest terms against a non-integer (or written as the other side is)."""
    if x.parts is None or x.parts == y.parts:
        return True
    return x.reduced and any(value.denominator > 1 for value in y.readings())


def numerals_equal(x: Numeral, y: Numeral) -> bool:
    """Exact (rational) equality of two numerals under the percent, fraction and rounding rules."""
    if not (_fraction_ok(x, y) and _fraction_ok(y, x)):
        return False
    if x.percent and y.percent:
        return x.value == y.value
    if any(a == b for a in x.readings() for b in y.readings()):
        return True
    return _rounds_to(x, y.value) or _rounds_to(y, x.value)


def _item_equal(a: str, b: str) -> bool:
    if normalize_answer(a) == normalize_answer(b):
        return True
    var_a, a = _lone_variable(a)
    var_b, b = _lone_variable(b)
    if var_a is not None and var_b is not None and var_a != var_b:
        return False
    if not a or not b:
        return False
    if normalize_answer(a) == normalize_answer(b):
        return True
    equation_a, equation_b = bool(_EQUALS_RE.search(a)), bool(_EQUALS_RE.search(b))
    if equation_a != equation_b:  # "2x = \sqrt{3}" is not the value "\sqrt{3}"
        return False
    if not equation_a:
        x = parse_numeral(a)
        y = parse_numeral(b)
        if x is not None or y is not None:
            return x is not None and y is not None and numerals_equal(x, y)
    first, second = sorted((a, b))  # one cache entry and one verdict for either order
    return default_verifier().equal(first, second)


def answers_equal(predicted: str, ground_truth: str) -> bool:
    """Whether ``predicted`` and ``ground_truth`` denote the same answer (the module docstring's rules).

    Symmetric: swapping the arguments never changes the verdict. Never raises or hangs on adversarial
    text; safe from any thread.
    """
    if not isinstance(predicted, str):
        raise TypeError(f"predicted must be a str, got {type(predicted).__name__}")
    if not isinstance(ground_truth, str):
        raise TypeError(f"ground_truth must be a str, got {type(ground_truth).__name__}")
    pred_norm = normalize_answer(predicted)
    gold_norm = normalize_answer(ground_truth)
    if not pred_norm or not gold_norm:
        return False
    if pred_norm == gold_norm:
        return True
    if max(len(predicted), len(ground_truth)) > 50 * MAX_NUMERAL_CHARS:
        return False  # no final answer is this long; the helper would refuse it anyway
    pred_items, gold_items = split_items(predicted), split_items(ground_truth)
    if len(pred_items) != len(gold_items) or len(gold_items) > MAX_ITEMS:
        return False
    if len(gold_items) == 1:
        return _item_equal(pred_items[0], gold_items[0])
    deadline = time.monotonic() + ITEMS_BUDGET_S
    unmatched = list(gold_items)
    for item in pred_items:  # every item matched to its own item of the other side, cheap pairs first
        norm = normalize_answer(item)
        match = next((i for i, other in enumerate(unmatched) if normalize_answer(other) == norm), None)
        for i, other in enumerate(unmatched):
            if match is not None or time.monotonic() > deadline:
                break
            if _item_equal(item, other):
                match = i
        if match is None:
            return False
        unmatched.pop(match)
    return True
