"""The R1 format: the completion text, the tags, the format rule, answer extraction (the prompt: trainer/r1/prompt.py).

``<think> reasoning </think> <answer> answer </answer>``: one home for the tags and every rule about them.
Standard library only.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
FORMAT_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# --------------------------------------------------------------------------------------------------
# Format and extraction
# --------------------------------------------------------------------------------------------------


def check_format(response: str) -> bool:
    """True when ``response`` is ``<think>...</think> <answer>...</answer>`` (see the module docstring)."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    positions = []
    for tag in FORMAT_TAGS:
        if response.count(tag) != 1:
            return False
        positions.append(response.find(tag))
    think_open, think_close, answer_open, answer_close = positions
    if not think_open < think_close < answer_open < answer_close:
        return False
    # The tags cannot overlap (none is a substring of another), so these slices are well defined.
    before = response[:think_open]
    between = response[think_close + len(THINK_CLOSE) : answer_open]
    after = response[answer_close + len(ANSWER_CLOSE) :]
    return not (before.strip() or between.strip() or after.strip())


def extract_answer(text: str) -> str | None:
    """The stripped content of the single ``<answer>...</answer>`` in ``text``.

    ``None`` when there is no answer block, more than one ``<answer>`` or ``</answer>`` tag, or the
    closing tag comes first: an ambiguous completion has no answer.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return None
    start = text.find(ANSWER_OPEN) + len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE)
    if end < start:
        return None
    return text[start:end].strip()


# --------------------------------------------------------------------------------------------------
# Completion text
# --------------------------------------------------------------------------------------------------


def format_completion(reasoning: str, answer: str) -> str:
    """The target completion ``<think>\\n{reasoning}\\n</think>\\n<answer>{answer}</answer>``.

    ``ValueError`` if either part contains an R1 tag (the result would not pass ``check_format``).
    """
    for name, text in (("reasoning", reasoning), ("answer", answer)):
        for tag in FORMAT_TAGS:
            if tag in text:
                raise ValueError(f"{name} contains the reserved tag {tag}: {text[:80]!r}")
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


# Sampling stops once a completion's decoded text contains one of these (trainer.rl.stopping.StopStrings):
# nothing after the answer can raise its reward, and text after it fails the format rule.
STOP_STRINGS = (ANSWER_CLOSE,)
