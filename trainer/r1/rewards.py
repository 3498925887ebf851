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

Answer equality (:func:`answers_equal`) is decided by ``math-verify`` (``\\frac{1}{2}`` = ``0.5``,
``1,000`` = ``1000``, ``x = 2`` = ``2``, ``\\boxed{3}`` = ``3``) with a normalised-string fallback.

math-verify runs in a killable helper process (:mod:`trainer.r1.math_verify`).

Composable reward functions for GRPO are registered by name in :data:`REWARD_FUNCS` (``r1``, ``format``,
``accuracy``) and combined with weights by :func:`score`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
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


_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_WHITESPACE_RE = re.compile(r"\s+")
_INT_RE = re.compile(r"[+-]?\d{1,30}")
_DECIMAL_RE = re.compile(r"[+-]?(?:\d{1,30}(?:\.\d{0,30})?|\.\d{1,30})")
_FRACTION_RE = re.compile(r"([+-]?\d{1,30})/(\d{1,30})")


def normalize_answer(text: str) -> str:
    """The plain-string form used by the fallback comparison.

    Strip, drop ``$``, drop trailing ``.``, drop thousands separators (only when the whole answer is one
    number such as ``1,234,567.5`` -- ``1, 234`` or ``(1,234)`` are lists/tuples and keep their comma),
    drop all whitespace, lowercase.
    """
    s = text.replace("$", "").strip().rstrip(".").strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return _WHITESPACE_RE.sub("", s).lower()


def _plain_number(s: str) -> Fraction | None:
    """``s`` (already normalised) as an exact number when it is a plain decimal or ``a/b`` fraction."""
    if _DECIMAL_RE.fullmatch(s):
        return Fraction(s)
    m = _FRACTION_RE.fullmatch(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


def answers_equal(predicted: str, ground_truth: str) -> bool:
    """Whether ``predicted`` and ``ground_truth`` denote the same answer.

    Normalised-string equality first (cheap and always safe), then exact comparison of plain numbers, then
    math-verify in the helper process (bounded time, see :class:`MathVerifier`). An empty answer never
    equals anything. Never raises or hangs on adversarial text; safe to call from any thread.
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
    # Two integers: math-verify could only disagree through float rounding of 16+ digit numbers.
    if _INT_RE.fullmatch(pred_norm) and _INT_RE.fullmatch(gold_norm):
        return int(pred_norm) == int(gold_norm)
    pred_num, gold_num = _plain_number(pred_norm), _plain_number(gold_norm)
    if pred_num is not None and gold_num is not None:
        if pred_num == gold_num:
            return True
        # math-verify calls numbers equal after rounding to 6 decimals (and to 15 significant digits for
        # huge ones); beyond this margin it cannot, so skip the helper round trip.
        if abs(pred_num - gold_num) > Fraction(1, 10**5) + max(abs(pred_num), abs(gold_num)) / 10**12:
            return False
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
