"""The R1 format: the system prompt, prompt and completion text, the tags, the format rule, answer extraction.

``<think> reasoning </think> <answer> answer </answer>``: one home for the tags and every rule about them.
Standard library only.
"""

from __future__ import annotations

from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
FORMAT_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)

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
# Prompt and completion text
# --------------------------------------------------------------------------------------------------


def format_prompt(tokenizer: Any, problem: str, system_prompt: str = R1_SYSTEM_PROMPT) -> str:
    """The prompt text for ``problem``; the completion is expected to start with ``<think>``.

    With a tokenizer that has a ``chat_template``: ``[system, user]`` through ``apply_chat_template``
    with the generation prompt (templates that reject a system message get it prepended to the user
    message instead). Otherwise (or ``tokenizer=None``) the plain R1 template
    ``"{system}\\nUser: {problem}\\nAssistant: "``.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        from jinja2.exceptions import TemplateError

        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": problem}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as first:
            merged = [{"role": "user", "content": f"{system_prompt}\n\n{problem}"}]
            try:
                return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
            except TemplateError:
                raise first from None
    return f"{system_prompt}\nUser: {problem}\nAssistant: "


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
