"""The R1 guide's reward API at its documented path: `trainer.rewards.reward_function(response, ground_truth)`
and `trainer.rewards.extract_answer(text)`. The rewards live in :mod:`trainer.r1.rewards`."""

from trainer.r1.format import extract_answer
from trainer.r1.rewards import REWARD_FUNCS, reward_function

__all__ = ["REWARD_FUNCS", "extract_answer", "reward_function"]
