"""Reading one field of a dataset row: problem, worked solution and final answer as text.

Shared by the schemas (:mod:`trainer.r1.schemas`); a field that cannot be used raises :class:`RowError`
naming it, which the loader turns into a :class:`DataError` naming the row (or counts, with
``--skip_bad_rows``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from trainer.r1.format import FORMAT_TAGS

# Joins columns in a problem column name: ``Body+Question``.
JOIN = "+"


class DataError(ValueError):
    """A dataset cannot be read or one of its rows is unusable; the message names where."""


class RowError(Exception):
    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"field '{field_name}' {problem}")
        self.reason = f"field '{field_name}' {problem}"


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``) in ``text``, stripped.

    Braces nest; escaped braces (``\\{``) do not count. ``None`` when there is none or it is unbalanced.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == " ":  # "\boxed 5": the argument is the next token
        token = re.match(r"\s*([^\s$]+)", text[i:])
        return token.group(1) if token else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    j = i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
        j += 1
    return None


# NuminaMath-1.5 writes these where a problem has no final answer (proofs, answers it could not find).
NO_ANSWER_PLACEHOLDERS = frozenset({"proof", "notfound"})


def field_text(row: Mapping[str, Any], name: str) -> str:
    """A required text field, stripped; numbers are accepted and turned into text."""
    if name not in row or row[name] is None:
        raise RowError(name, "is missing")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RowError(name, f"must be text, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise RowError(name, "is empty")
    return text


def present(row: Mapping[str, Any], name: str | None) -> bool:
    """Whether an optional text field has a non-empty value."""
    if name is None:
        return False
    value = row.get(name)
    if isinstance(value, list | tuple):  # a list of solutions or answers: present if any item is
        return any(v is not None and not (isinstance(v, str) and not v.strip()) for v in value)
    return value is not None and not (isinstance(value, str) and not value.strip())


def no_tags(name: str, text: str) -> str:
    for tag in FORMAT_TAGS:
        if tag in text:
            raise RowError(name, f"contains the reserved tag {tag}")
    return text


def number_text(name: str, value: int | float) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RowError(name, f"is not a finite number ({value})")
        if value.is_integer() and abs(value) < 2**53:  # 27.0 -> "27": the answer a model writes
            return str(int(value))
        return repr(value)
    return str(value)


def answer_text(name: str, value: Any) -> str:
    """A final answer from text, a number or a list of those (``[3, 5]`` -> ``"3, 5"``)."""
    if value is None:
        raise RowError(name, "is missing")
    if isinstance(value, bool):
        raise RowError(name, "must be text, a number or a list, got bool")
    if isinstance(value, int | float):
        text = number_text(name, value)
    elif isinstance(value, str):
        text = value.strip()
    elif isinstance(value, list | tuple):
        items = []
        for item in value:
            if item is None or isinstance(item, bool) or not isinstance(item, str | int | float):
                raise RowError(name, f"is a list with an item that is not text or a number: {item!r}")
            items.append(item.strip() if isinstance(item, str) else number_text(name, item))
        if not all(items):
            raise RowError(name, "is a list with an empty item")
        text = ", ".join(items)
    else:
        raise RowError(name, f"must be text, a number or a list, got {type(value).__name__}")
    if not text:
        raise RowError(name, "is empty")
    if text.lower() in NO_ANSWER_PLACEHOLDERS:
        raise RowError(name, f"is {text!r}, not a verifiable final answer")
    return no_tags(name, text)


def problem_text(row: Mapping[str, Any], name: str) -> str:
    """The problem: text, or a chat message list ``[{"role", "content"}, ...]`` (its last user message).

    ``name`` may join several columns with ``+`` (``Body+Question``: SVAMP's and ASDiv's story and
    question), their texts joined by a space, unless the row has a column of that very name.
    """
    if name not in row and JOIN in name:
        return " ".join(problem_text(row, part) for part in name.split(JOIN))
    value = row.get(name)
    if isinstance(value, list):
        users = [m.get("content") for m in value if isinstance(m, Mapping) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str) or not users[-1].strip():
            raise RowError(name, "is a message list without a non-empty user message")
        return users[-1].strip()
    return field_text(row, name)


def solution_value(row: Mapping[str, Any], name: str) -> Any:
    """A solution column's value; of a list of solutions (OlympiadBench), the first non-empty one."""
    value = row.get(name)
    if isinstance(value, list | tuple):
        texts = [v for v in value if isinstance(v, str) and v.strip()]
        if not texts:
            raise RowError(name, "is a list without a non-empty text solution")
        return texts[0]
    return value


def solution_text(row: Mapping[str, Any], name: str) -> str:
    return field_text({name: solution_value(row, name)}, name)


def reasoning_text(row: Mapping[str, Any], name: str | None, need: bool) -> str:
    """A worked solution used as the reasoning: required when ``need`` (SFT), else optional."""
    if need or present(row, name):
        assert name is not None  # schemas without a solution column are refused before reading rows
        return no_tags(name, solution_text(row, name))
    return ""
