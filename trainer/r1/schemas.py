"""Dataset schemas: which columns hold the problem, the worked solution and the final answer, and how a row
becomes ``(problem, reasoning, answer)``.

Detection (``--dataset_schema auto``) reads the column names case-insensitively, under the names the
published sets use (:data:`ALIASES`), and looks at the first rows' values where the names alone are
ambiguous: ``question`` + ``answer`` is GSM8K only when the answers carry its ``#### N`` line, else a
question with a short final answer (``problem_answer``); a ``solution`` column with no value in those rows
does not count; ``prompt`` + ``solution`` is the R1 layout only when a solution holds ``<think>``. A
``body`` column next to the question is joined before it (``Body+Question``: SVAMP, ASDiv).

When a schema refuses a row, :func:`suggest_flags` finds the flags of another layout that reads the first
rows, for the error message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trainer.r1.fields import (
    JOIN,
    DataError,
    RowError,
    answer_text,
    extract_boxed,
    field_text,
    no_tags,
    present,
    problem_text,
    reasoning_text,
    solution_text,
)
from trainer.r1.format import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, extract_answer

ROLES = ("problem", "solution", "answer")

# Column names of each field in published sets, most specific first (matched case-insensitively).
ALIASES: dict[str, tuple[str, ...]] = {
    "problem": ("problem", "question", "input", "content", "query", "prompt"),  # MAWPS input, CARP content
    "solution": ("solution", "solutions", "steps", "rationale"),  # CARP-en steps
    "answer": ("answer", "final_answer", "target", "ground_truth", "gt"),  # OlympiadBench, MAWPS
}
# Joined before the question when present (SVAMP "Body", ASDiv "body").
CONTEXT_COLUMNS = ("body",)
# Rows looked at to tell layouts apart by their values.
SAMPLE_ROWS = 50

_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")

Converter = Callable[[Mapping[str, Any], Mapping[str, str | None], bool], tuple[str, str, str]]


def _row_builtin(row: Mapping[str, Any], cols: Mapping[str, str | None], need: bool) -> tuple[str, str, str]:
    return (
        problem_text(row, cols["problem"]),
        reasoning_text(row, cols["solution"], need),
        answer_text(cols["answer"], row.get(cols["answer"])),
    )


def _row_gsm8k(row: Mapping[str, Any], cols: Mapping[str, str | None], need: bool) -> tuple[str, str, str]:
    question = problem_text(row, cols["problem"])
    name = cols["solution"]
    text = field_text(row, name)
    if "####" not in text:
        raise RowError(name, "has no '#### <final answer>' line")
    before, _, final = text.rpartition("####")
    final = final.strip().rstrip(".").strip()
    if _THOUSANDS_RE.fullmatch(final):
        final = final.replace(",", "")
    if not final:
        raise RowError(name, "has nothing after '####'")
    reasoning = _CALCULATOR_RE.sub("", before).strip()
    if need and not reasoning:
        raise RowError(name, "has no reasoning before '####'")
    return question, no_tags(name, reasoning), answer_text(name, final)


def _row_r1(row: Mapping[str, Any], cols: Mapping[str, str | None], need: bool) -> tuple[str, str, str]:
    problem = problem_text(row, cols["problem"])
    name = cols["solution"]
    solution = field_text(row, name)
    if solution.count(THINK_OPEN) != 1 or solution.count(THINK_CLOSE) != 1:
        raise RowError(name, f"needs exactly one {THINK_OPEN}...{THINK_CLOSE} block")
    start, end = solution.find(THINK_OPEN) + len(THINK_OPEN), solution.find(THINK_CLOSE)
    if end < start:
        raise RowError(name, f"has {THINK_CLOSE} before {THINK_OPEN}")
    reasoning = solution[start:end].strip()
    answer = extract_answer(solution)
    if answer is None:
        raise RowError(name, f"needs exactly one {ANSWER_OPEN}...{ANSWER_CLOSE} block")
    if need and not reasoning:
        raise RowError(name, f"has an empty {THINK_OPEN} block")
    if not answer:
        raise RowError(name, f"has an empty {ANSWER_OPEN} block")
    return problem, no_tags(name, reasoning), no_tags(name, answer)


def _row_math(row: Mapping[str, Any], cols: Mapping[str, str | None], need: bool) -> tuple[str, str, str]:
    problem = problem_text(row, cols["problem"])
    solution_col, answer_col = cols["solution"], cols["answer"]
    assert solution_col is not None  # required by the schema
    reasoning = reasoning_text(row, solution_col, need)
    if answer_col is not None and present(row, answer_col):  # an explicit answer wins over \boxed{}
        return problem, reasoning, answer_text(answer_col, row[answer_col])
    solution = reasoning or solution_text(row, solution_col)
    answer = extract_boxed(solution)
    if answer is None:
        raise RowError(solution_col, "has no complete \\boxed{...} answer")
    if not answer:
        raise RowError(solution_col, "has an empty \\boxed{} answer")
    return problem, reasoning, answer_text(solution_col, answer)


def _row_problem_answer(
    row: Mapping[str, Any], cols: Mapping[str, str | None], need: bool
) -> tuple[str, str, str]:
    del need  # refused before any row is read
    answer_col = cols["answer"]
    assert answer_col is not None
    return problem_text(row, cols["problem"]), "", answer_text(answer_col, row.get(answer_col))


def _row_verl(row: Mapping[str, Any], cols: Mapping[str, str | None], need: bool) -> tuple[str, str, str]:
    del need
    problem = problem_text(row, cols["problem"])
    name = cols["answer"]
    assert name is not None
    value = row.get(name)
    if isinstance(value, Mapping):  # reward_model = {"ground_truth": ..., "style": "rule"}
        name, value = f"{name}.ground_truth", value.get("ground_truth")
    return problem, "", answer_text(name, value)


@dataclass(frozen=True)
class Schema:
    name: str
    columns: Mapping[str, tuple[str, ...]]  # role (problem / solution / answer) -> its column names
    convert: Converter
    optional: frozenset[str] = frozenset()  # roles whose column may be absent

    def default(self, role: str) -> str:
        return self.columns[role][0]


SCHEMAS: tuple[Schema, ...] = (
    Schema(
        "builtin", {"problem": ("question",), "solution": ("reasoning",), "answer": ("answer",)}, _row_builtin
    ),
    Schema("verl", {"problem": ("prompt",), "answer": ("reward_model",)}, _row_verl),
    Schema("r1", {"problem": ("prompt",), "solution": ("solution",)}, _row_r1),
    Schema(
        "math",
        {"problem": ALIASES["problem"], "solution": ALIASES["solution"], "answer": ALIASES["answer"]},
        _row_math,
        optional=frozenset({"answer"}),
    ),
    Schema(
        "problem_answer", {"problem": ALIASES["problem"], "answer": ALIASES["answer"]}, _row_problem_answer
    ),
    Schema("gsm8k", {"problem": ("question",) + ALIASES["problem"], "solution": ("answer",)}, _row_gsm8k),
)
BY_NAME = {s.name: s for s in SCHEMAS}
SCHEMA_NAMES: tuple[str, ...] = ("auto", *BY_NAME)


def column_overrides(
    problem: str | None = None, solution: str | None = None, answer: str | None = None
) -> dict[str, str]:
    out = {}
    for role, value in zip(ROLES, (problem, solution, answer), strict=True):
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"--{role}_column must be a column name, got {value!r}")
        out[role] = value.strip()
    return out


def describe(schema: Schema, cols: Mapping[str, str | None]) -> str:
    return f"{schema.name} schema: " + ", ".join(f"{r}={c!r}" for r, c in cols.items() if c is not None)


class _Columns:
    """The dataset's column names, looked up case-insensitively (an exact match first)."""

    def __init__(self, columns: Iterable[str]) -> None:
        self.names = list(dict.fromkeys(columns))
        self.lower: dict[str, str] = {}
        for name in self.names:
            self.lower.setdefault(name.lower(), name)

    def find(self, name: str) -> str | None:
        if name in self.names:
            return name
        if JOIN in name and name.lower() not in self.lower:  # a join of existing columns: Body+Question
            parts = [self.find(part.strip()) for part in name.split(JOIN)]
            return JOIN.join(parts) if all(parts) else None  # type: ignore[arg-type]
        return self.lower.get(name.lower())

    def first(self, names: Sequence[str]) -> str | None:
        return next((c for c in map(self.find, names) if c is not None), None)


def _sample_values(sample: Sequence[Mapping[str, Any]], column: str) -> list[Any]:
    return [row.get(column) for row in sample if present(row, column)]


def _resolve(
    schema: Schema, cols: _Columns, overrides: Mapping[str, str], sample: Sequence[Mapping[str, Any]] | None
) -> dict[str, str | None]:
    """Each role's column in this dataset (None: absent), the overrides first, then the schema's names."""
    out: dict[str, str | None] = {}
    for role, names in schema.columns.items():
        if role in overrides:
            out[role] = cols.find(overrides[role])
            continue
        found = cols.first(names)
        if (
            schema.name == "math"
            and role == "solution"
            and found
            and sample
            and not _sample_values(sample, found)
        ):
            found = None  # a solution column with no value in the first rows is no worked solution
        if role == "problem" and found is not None and found.lower() == "question":
            context = cols.first(CONTEXT_COLUMNS)
            if context is not None:
                found = f"{context}{JOIN}{found}"
        out[role] = found
    return out


def _fits(schema: Schema, resolved: Mapping[str, str | None]) -> bool:
    return all(c is not None for r, c in resolved.items() if r not in schema.optional)


def _auto_order(cols: _Columns, sample: Sequence[Mapping[str, Any]] | None) -> list[Schema]:
    """The schemas ``auto`` tries, in order, given what the first rows hold."""
    order = [BY_NAME["builtin"], BY_NAME["verl"]]
    solution = cols.find("solution")
    if sample is None or (solution and any(THINK_OPEN in str(v) for v in _sample_values(sample, solution))):
        order.append(BY_NAME["r1"])
    answer = cols.find("answer")
    if sample is None:  # names only: question + answer (and no problem column) is GSM8K's layout
        gsm8k = answer is not None and cols.find("question") is not None and cols.find("problem") is None
    else:  # GSM8K's answer column is its worked solution ending "#### N"; a short final answer never has it
        gsm8k = answer is not None and any("####" in str(v) for v in _sample_values(sample, answer))
    if gsm8k:
        order.append(BY_NAME["gsm8k"])
    order += [BY_NAME["math"], BY_NAME["problem_answer"]]
    return order


def choose_schema(
    columns: Iterable[str],
    where: str,
    schema: str = "auto",
    overrides: Mapping[str, str] | None = None,
    sample: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[Schema, dict[str, str | None]]:
    """The schema for these columns (and first rows, ``sample``) and the column of each of its fields.

    ``None`` as a field's column: an absent optional one.
    """
    cols = _Columns(columns)
    overrides = dict(overrides or {})
    found = ", ".join(sorted(cols.names)) or "(none)"
    for role, col in overrides.items():
        if cols.find(col) is None:
            raise DataError(f"{where}: --{role}_column {col!r} is not a column; columns found: {found}")
    if schema == "auto":
        candidates = [BY_NAME["math"], BY_NAME["problem_answer"]] if overrides else _auto_order(cols, sample)
    elif schema in BY_NAME:
        candidates = [BY_NAME[schema]]
        extra = sorted(set(overrides) - set(candidates[0].columns))
        if extra:
            raise DataError(
                f"{where}: the {schema} schema has no {extra[0]} field (--{extra[0]}_column); "
                f"its fields: {', '.join(candidates[0].columns)}"
            )
    else:
        raise DataError(f"--dataset_schema must be one of {', '.join(SCHEMA_NAMES)}, got {schema!r}")
    for candidate in candidates:
        resolved = _resolve(candidate, cols, overrides, sample)
        if _fits(candidate, resolved):
            return candidate, resolved
    if schema != "auto":
        (only,) = candidates
        resolved = _resolve(only, cols, overrides, sample)
        missing = [
            overrides.get(r, only.default(r))
            for r, c in resolved.items()
            if c is None and r not in only.optional
        ]
        raise DataError(
            f"{where}: --dataset_schema {schema} needs the column(s) {', '.join(missing)}; columns found: "
            f"{found}; name yours with --problem_column / --solution_column / --answer_column"
        )
    if overrides:
        raise DataError(
            f"{where}: the column flags give {', '.join(f'{r}={c!r}' for r, c in overrides.items())}, which "
            f"is neither problem + solution nor problem + answer; columns found: {found}"
        )
    known = "; ".join(
        f"{s.name}: {', '.join(s.default(r) for r in s.columns if r not in s.optional)}" for s in SCHEMAS
    )
    raise DataError(
        f"{where}: unknown schema, columns found: {found}; known schemas (required columns): {known}; "
        "or name the columns with --problem_column / --solution_column / --answer_column"
    )


def detect_schema(
    columns: Iterable[str], dataset: str = "dataset", sample: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """The name of the schema ``auto`` picks for these columns (and first rows); :class:`DataError` if none."""
    return choose_schema(columns, dataset, sample=sample)[0].name


def flags_for(schema: Schema, cols: Mapping[str, str | None]) -> str:
    """The command-line flags that select ``schema`` with these columns."""
    parts = [f"--dataset_schema {schema.name}"]
    parts += [f"--{role}_column {col}" for role, col in cols.items() if col is not None]
    return " ".join(parts)


def suggest_flags(
    columns: Iterable[str], sample: Sequence[Mapping[str, Any]], refused: Schema, need: bool = False
) -> str | None:
    """Flags of another layout that reads every one of the first rows (``sample``), or None.

    Every schema is tried with each of its candidate columns for the answer (``final_answer`` when
    ``answer`` is not one), so a wrong guess of auto-detection or of the user names its fix.
    """
    cols = _Columns(columns)
    rows = list(sample[:5])
    if not rows:
        return None
    for schema in SCHEMAS:
        if schema is refused:
            continue
        options = [_resolve(schema, cols, {}, sample)]
        for name in schema.columns.get("answer", ()):
            col = cols.find(name)
            if col is not None and col != options[0].get("answer"):
                options.append({**options[0], "answer": col})
        for resolved in options:
            if not _fits(schema, resolved) or (need and resolved.get("solution") is None):
                continue
            try:
                for row in rows:
                    schema.convert(row, resolved, need)
            except RowError:
                continue
            return flags_for(schema, resolved)
    return None
