"""Rule-based rewards for DeepSeek-R1-style completions (``<think>...</think><answer>...</answer>``).

The reward follows the DeepSeek-R1 guide:

* ``0.0``  -- the completion is not in the required format (see :func:`check_format`);
* ``1.0``  -- the format is right but the answer is wrong;
* ``10.0`` -- the format is right and the ``<answer>`` equals the ground truth (see :func:`answers_equal`).

Format rule (:func:`check_format`): ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` each occur exactly
once and in that order; only whitespace may appear before ``<think>``, between ``</think>`` and ``<answer>``
and after ``</answer>``. This is the R1 guide's anchored regex
``^<think>.*?</think>\\s*<answer>.*?</answer>$`` (plus tolerated surrounding whitespace), written without
regular expressions so that a 10 MB completion is checked in linear time. Text before ``<think>`` is *not*
allowed: the prompt ends with ``Assistant:`` and the completion must open with ``<think>``.

Answer equality (:func:`answers_equal`): against a ground truth that is a number, the answer must be a
number written as a value (``\\frac{1}{2}`` = ``0.5``, ``1,000`` = ``1000``, ``x = 2`` = ``2``,
``\\boxed{3}`` = ``3``, ``\\$7`` = ``7 dollars`` = ``7``), never an expression still to compute (``12+30``,
``84/2``) or digits apart (``4 2``), so a policy cannot score by copying the question's numbers. Other
ground truths are decided by ``math-verify`` (``2^{1/2}`` = ``\\sqrt{2}``) with a normalised-string fallback.

math-verify runs in a killable helper process (:mod:`trainer.r1.math_verify`).

Composable reward functions for GRPO are registered by name in :data:`REWARD_FUNCS` (``r1``, ``format``,
``accuracy``) and combined with weights by :func:`score`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from trainer.r1.format import check_format, extract_answer
from trainer.r1.math_verify import default_verifier

logger = logging.getLogger(__name__)

# R1 guide reward values.
REWARD_CORRECT = 10.0
REWARD_FORMAT_ONLY = 1.0
REWARD_BAD_FORMAT = 0.0

# --------------------------------------------------------------------------------------------------
# Answer equality
# --------------------------------------------------------------------------------------------------


_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:(?:,\d{3})+|(?: \d{3})+)(?:\.\d*)?")
_WHITESPACE_RE = re.compile(r"\s+")


def _squeeze_space(match: re.Match[str]) -> str:
    # Whitespace between two digits is kept: "4 2" is not the number 42.
    s, start, end = match.string, match.start(), match.end()
    return " " if start > 0 and end < len(s) and s[start - 1].isdecimal() and s[end].isdecimal() else ""


def normalize_answer(text: str) -> str:
    """The plain-string form used by the fallback comparison.

    Strip, drop ``$``, drop trailing ``.``, drop thousands separators (only when the whole answer is one
    number such as ``1,234,567.5`` or ``1 234 567`` -- ``1, 234`` or ``(1,234)`` are lists/tuples and keep
    their comma), drop whitespace except between two digits (``4 2`` stays two numbers), lowercase.
    """
    s = _WHITESPACE_RE.sub(" ", text.replace("$", "")).strip().rstrip(".").strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    return _WHITESPACE_RE.sub(_squeeze_space, s).lower()


# --------------------------------------------------------------------------------------------------
# Numbers: a final answer that is a value
# --------------------------------------------------------------------------------------------------

# Longer text is never a plain number (and is not worth scanning).
MAX_NUMERAL_CHARS = 200
# Trailing words read as a unit ("7 square meters"); more is a sentence, not a value.
MAX_UNIT_WORDS = 3


@dataclass(frozen=True)
class Numeral:
    """A final answer written as a number: an integer, a decimal or a fraction, with its decoration gone."""

    value: Fraction
    text: str  # the bare number ("-3/4", "1234.5"), what math-verify is given
    parts: tuple[int, int] | None = None  # (numerator, denominator) as written, for a fraction

    @property
    def reduced(self) -> bool:
        """A fraction in lowest terms with a denominator above 1 (``1/2``, not ``2/4`` or ``4/1``)."""
        return self.parts is not None and self.parts[1] > 1 and math.gcd(*self.parts) == 1


_WRAPPER_RE = re.compile(r"\\(?:boxed|fbox|text|textbf|textrm|mathrm|mathbf|mbox)\s*\{")
_DELIMITERS = ("\\$", "$", "\\(", "\\)", "\\[", "\\]", "\\displaystyle")
_VARIABLE_RE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?\s*=\s*")  # "x = 2", "a_{1}=2"
_CURRENCY_RE = re.compile(r"(?:[€£¥]|\\euro|\\pounds|\\yen)\s*")
_SPACING_RE = re.compile(r"(?:\\[,;:! ]|~|\s)+")
_UNIT_RE = re.compile(
    r"(?:\\(?:text|textrm|mathrm|mbox|rm)\s*\{(?P<text>[^{}]*)\}"  # \text{ dollars}
    r"|(?<![A-Za-z\\])(?P<word>[A-Za-z]++(?:\s*+/\s*+[A-Za-z]++)*+)\.?"  # dollars, km/h, sq.; not \pi
    r"|(?P<sign>\\%|%|°|\\circ|\\degree|\^\s*\{\s*\\circ\s*\}|\^\s*\\circ))"
    r"(?:\s*\^\s*(?:\{\s*-?\d\s*\}|-?\d)|[²³])?\s*$"  # cm^2
)
# Words that change the value they follow (7 hundred, 7 thirds, 7 squared): never units.
_VALUE_WORDS = frozenset(
    re.findall(
        r"\w+",
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred "
        "thousand million billion trillion dozen score half halves third thirds fourth fourths quarter "
        "quarters fifth fifths sixth sixths seventh sevenths eighth eighths ninth ninths tenth tenths "
        "hundredth hundredths thousandth thousandths squared cubed factorial power powers root roots sqrt "
        "log ln exp mod modulo pi times over plus minus divided by less more than and or of to",
    )
)
_FRACTION_RES = (
    re.compile(r"\\[dt]?frac\s*\{\s*([+-]?)\s*(\d+)\s*\}\s*\{\s*([+-]?)\s*(\d+)\s*\}"),
    re.compile(r"\\[dt]?frac\s*()(\d)()(\d)"),  # \frac12
    re.compile(r"()(\d+)\s*/\s*()(\d+)"),
)
_DECIMAL_RE = re.compile(r"\d{1,3}(?:(?:,\d{3})+|(?: \d{3})+)(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+")


def _unwrap(s: str) -> str:
    """``\\boxed{X}`` / ``\\text{X}`` around the whole answer -> ``X``."""
    m = _WRAPPER_RE.match(s)
    if not m or not s.endswith("}"):
        return s
    depth = 0
    for i in range(m.end() - 1, len(s)):
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        if depth == 0:
            return s[m.end() : i] if i == len(s) - 1 else s
    return s


def _strip_unit(s: str) -> str:
    """``s`` without one trailing unit (``dollars``, ``\\text{cm}^2``, ``\\%``, ``^\\circ``), if it has one."""
    m = _UNIT_RE.search(s)
    if not m or m.start() == 0 or s[m.start() - 1] == "\\":  # "\pi" is not the unit "pi"
        return s
    words = m["text"] if m["text"] is not None else m["word"]
    if words is not None:
        if any(ch.isdecimal() for ch in words):
            return s
        names = re.findall(r"[A-Za-z]+", words)
        # One bare letter could be a variable ("7 x"); units written so are in \text{} ("7\text{ m}").
        if any(n.lower() in _VALUE_WORDS for n in names) or (
            m["word"] is not None and len("".join(names)) < 2
        ):
            return s
    return s[: m.start()]


def parse_numeral(text: str) -> Numeral | None:
    """``text`` as a number when it is one, written as a value: ``None`` for anything else.

    Accepted around the number: math delimiters, ``\\boxed{}``/``\\text{}``, a leading ``x =``, a currency
    sign (``\\$7``), a trailing unit word or ``\\text{}`` unit (``7 dollars``), ``%`` and degrees, thousands
    separators (``1,000``, ``1 000``, ``1{,}000``, ``1\\,000``). Not a value: an expression (``12+30``,
    ``2^3``, ``\\sqrt{4}``), digits apart (``4 2``), number words (``7 hundred``). Linear in ``len(text)``.
    """
    s = text.strip()
    if len(s) > MAX_NUMERAL_CHARS:
        return None
    s = s.replace("\u2212", "-").replace("{,}", ",")
    for delimiter in _DELIMITERS:
        s = s.replace(delimiter, "")
    units = 0
    for _ in range(MAX_UNIT_WORDS + 3):  # each pass peels one layer: \boxed{}, "x =", a unit word
        before = s
        s = _unwrap(_SPACING_RE.sub(" ", s).strip().rstrip(".").strip())
        variable = _VARIABLE_RE.match(s)
        s = s[variable.end() :] if variable else s
        sign = s[:1] if s[:1] in ("+", "-") else ""
        currency = _CURRENCY_RE.match(s, len(sign))
        s = sign + s[currency.end() :] if currency else s
        if units < MAX_UNIT_WORDS:
            stripped = _strip_unit(s)
            units += stripped != s
            s = stripped
        if s == before:
            break
    sign, body = (s[0], s[1:].strip()) if s[:1] in ("+", "-") else ("", s)
    negative = sign == "-"
    for pattern in _FRACTION_RES:
        m = pattern.fullmatch(body)
        if m:
            num_sign, num, den_sign, den = m.groups()
            numerator, denominator = int(num), int(den)
            if denominator == 0:
                return None
            negative ^= (num_sign == "-") ^ (den_sign == "-")
            value = Fraction(numerator, denominator) * (-1 if negative else 1)
            written = f"{'-' if negative else ''}{numerator}/{denominator}"
            return Numeral(value, written, (numerator, denominator))
    if _DECIMAL_RE.fullmatch(body):
        digits = body.replace(",", "").replace(" ", "")
        return Numeral(Fraction(digits) * (-1 if negative else 1), f"{'-' if negative else ''}{digits}")
    return None


def answers_equal(predicted: str, ground_truth: str) -> bool:
    """Whether ``predicted`` and ``ground_truth`` denote the same answer.

    Normalised-string equality first (cheap and always safe). When the ground truth is a number (see
    :func:`parse_numeral`), the prediction must be a number too -- a value, not an expression still to
    compute (``12+30`` or ``84/2`` against ``42``; a fraction only in lowest terms and against a
    non-integer truth) -- compared exactly, and through math-verify's rounding only when very close. Other
    ground truths go to math-verify in the helper process (bounded time, see :class:`MathVerifier`). An
    empty answer never equals anything. Never raises or hangs on adversarial text; safe from any thread.
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
    gold = parse_numeral(ground_truth)
    if gold is not None:
        pred = parse_numeral(predicted)
        if pred is None:
            return False
        # A fraction is a value in lowest terms against a non-integer truth (or written as the truth is).
        fraction_ok = pred.reduced and gold.value.denominator > 1
        if pred.parts is not None and pred.parts != gold.parts and not fraction_ok:
            return False
        if pred.value == gold.value:
            return True
        # math-verify calls numbers equal after rounding to 6 decimals (and to 15 significant digits for
        # huge ones); beyond this margin it cannot, so skip the helper round trip.
        margin = Fraction(1, 10**5) + max(abs(pred.value), abs(gold.value)) / 10**12
        if abs(pred.value - gold.value) > margin:
            return False
        return default_verifier().equal(pred.text, gold.text)
    return default_verifier().equal(predicted.strip(), ground_truth.strip())


# --------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------


def reward_function(response: str, ground_truth: str) -> float:
    """The R1 guide's reward: 0.0 bad format, 1.0 right format but wrong answer, 10.0 correct."""
    if not check_format(response):
        return REWARD_BAD_FORMAT
    answer = extract_answer(response)
    if answer is not None and answers_equal(answer, ground_truth):
        return REWARD_CORRECT
    return REWARD_FORMAT_ONLY


def format_reward(response: str, ground_truth: str) -> float:
    """1.0 when :func:`check_format` holds, else 0.0 (``ground_truth`` is unused)."""
    del ground_truth
    return 1.0 if check_format(response) else 0.0


def accuracy_reward(response: str, ground_truth: str) -> float:
    """1.0 when the extracted ``<answer>`` equals ``ground_truth`` (format not required), else 0.0."""
    answer = extract_answer(response)
    return 1.0 if answer is not None and answers_equal(answer, ground_truth) else 0.0


RewardFunc = Callable[[str, str], float]

REWARD_FUNCS: dict[str, RewardFunc] = {
    "r1": reward_function,
    "format": format_reward,
    "accuracy": accuracy_reward,
}
DEFAULT_REWARD_FUNCS = ("r1",)


def get_reward_funcs(names: Sequence[str]) -> list[RewardFunc]:
    """The registered reward functions called ``names``; ``ValueError`` naming any unknown one."""
    if isinstance(names, str):
        raise TypeError("names must be a list of reward function names, not a str")
    funcs = []
    for name in names:
        if name not in REWARD_FUNCS:
            raise ValueError(f"unknown reward function {name!r}; known: {', '.join(sorted(REWARD_FUNCS))}")
        funcs.append(REWARD_FUNCS[name])
    return funcs


def score(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    names: Sequence[str] = DEFAULT_REWARD_FUNCS,
    weights: Sequence[float] | None = None,
) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of the named reward functions for each (response, ground truth) pair.

    Returns ``(total, per_func)`` where ``total[i] = sum_j weights[j] * per_func[names[j]][i]`` and
    ``per_func`` holds the unweighted values. ``weights`` defaults to 1.0 for every function.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"got {len(responses)} responses but {len(ground_truths)} ground truths")
    if not names:
        raise ValueError("at least one reward function name is required")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate reward function names: {list(names)}")
    if weights is None:
        weights = [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} reward weights for {len(names)} reward functions {list(names)}")
    funcs = get_reward_funcs(names)
    per_func = {
        name: [float(func(r, g)) for r, g in zip(responses, ground_truths, strict=True)]
        for name, func in zip(names, funcs, strict=True)
    }
    total = [
        sum(float(w) * per_func[name][i] for name, w in zip(names, weights, strict=True))
        for i in range(len(responses))
    ]
    return total, per_func
