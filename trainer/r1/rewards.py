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

Answer equality (:func:`~trainer.r1.answers.answers_equal`): one verdict whichever side is the gold. A
numeric answer must be a value, compared exactly (``\\frac{1}{2}`` = ``0.5``, ``1,000`` = ``1000``,
``x = 2`` = ``2``, ``\\boxed{3}`` = ``3``, ``\\$7`` = ``7 dollars`` = ``9 (apples)``-style units,
``(-3)`` = ``-3``, ``3\\frac{1}{2}`` = ``7/2``, ``1.2 \\times 10^{6}`` = ``1200000``, ``50\\%`` = ``0.5``),
never an expression still to compute (``12+30``, ``84/2``) or digits apart (``4 2``), so a policy cannot
score by copying the question's numbers; every item of a multi-item answer must match; an equation only
matches an equation unless its left side is a lone variable. Other answers are decided by ``math-verify``
(``2^{1/2}`` = ``\\sqrt{2}``), numeric values exactly.

math-verify runs in a killable helper process (:mod:`trainer.r1.math_verify`).

Composable reward functions for GRPO are registered by name in :data:`REWARD_FUNCS` (``r1``, ``format``,
``accuracy``) and combined with weights by :func:`score`, with any ``--reward_module`` functions
(:mod:`trainer.r1.reward_module`, same signature) beside them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from trainer.r1.answers import answers_equal
from trainer.r1.format import check_format, extract_answer
from trainer.r1.numerals import Numeral, normalize_answer, parse_numeral

__all__ = [
    "REWARD_FUNCS",
    "Numeral",
    "accuracy_reward",
    "answers_equal",
    "format_reward",
    "get_reward_funcs",
    "normalize_answer",
    "parse_numeral",
    "reward_function",
    "score",
]

logger = logging.getLogger(__name__)

# R1 guide reward values.
REWARD_CORRECT = 10.0
REWARD_FORMAT_ONLY = 1.0
REWARD_BAD_FORMAT = 0.0

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


def get_reward_funcs(names: Sequence[str], extra: Mapping[str, RewardFunc] | None = None) -> list[RewardFunc]:
    """The reward functions called ``names``: the registered ones and ``extra`` (``--reward_module``
    functions, by their names); ``ValueError`` naming any unknown one."""
    if isinstance(names, str):
        raise TypeError("names must be a list of reward function names, not a str")
    known = {**REWARD_FUNCS, **(extra or {})}
    funcs = []
    for name in names:
        if name not in known:
            raise ValueError(f"unknown reward function {name!r}; known: {', '.join(sorted(known))}")
        funcs.append(known[name])
    return funcs


def score(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    names: Sequence[str] = DEFAULT_REWARD_FUNCS,
    weights: Sequence[float] | None = None,
    extra: Mapping[str, RewardFunc] | None = None,
) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of the named reward functions for each (response, ground truth) pair.

    Returns ``(total, per_func)`` where ``total[i] = sum_j weights[j] * per_func[names[j]][i]`` and
    ``per_func`` holds the unweighted values. ``weights`` defaults to 1.0 for every function. ``extra``:
    functions beside the registered ones, by name (:class:`trainer.r1.reward_module.RewardModule`).
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
    funcs = get_reward_funcs(names, extra)
    per_func = {
        name: [float(func(r, g)) for r, g in zip(responses, ground_truths, strict=True)]
        for name, func in zip(names, funcs, strict=True)
    }
    total = [
        sum(float(w) * per_func[name][i] for name, w in zip(names, weights, strict=True))
        for i in range(len(responses))
    ]
    return total, per_func
