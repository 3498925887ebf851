"""Datasets -> (problem, reasoning, answer) examples, and the R1 prompt/completion format.

Sources (``--dataset_name``), tried in this order:

* ``builtin:<task>`` -- rows from :func:`trainer.r1.builtin.builtin_rows` (e.g. ``builtin:arith``).
* A local ``.jsonl`` / ``.json`` / ``.parquet`` file, read with ``datasets`` (``load_dataset("json" |
  "parquet", data_files=...)``, the same loader the hub path uses). A single file serves every split; put
  ``{split}`` in the path (``data/{split}.jsonl``) to use one file per split.
* A folder written by ``Dataset.save_to_disk`` (split ignored) or ``DatasetDict.save_to_disk`` (split
  selects the member), read with ``datasets.load_from_disk``.
* Any other local folder (e.g. ``train.jsonl`` + ``test.jsonl``, or a dataset script/repo clone) and any
  hub id go through ``datasets.load_dataset(name, config, split=split)``.
* Several of the above, comma-separated, each optionally followed by ``:<weight>``:
  ``gsm8k.jsonl:0.7,math.jsonl:0.3`` (see *Mixtures* below).

Schemas (``--dataset_schema``; ``auto`` detects them from the column names, the first match in this order):

================== ================================== ================================================
schema             columns (problem / solution /      fields
                   answer)
================== ================================== ================================================
``builtin``        ``question`` / ``reasoning`` /     answer is the bare final value
                   ``answer``
``verl``           ``prompt`` / - /                   verl's RL parquet layout: ``prompt`` is a chat
                   ``reward_model``                   message list, the answer is
                                                      ``reward_model.ground_truth``; ``data_source``,
                                                      ``ability``, ``extra_info`` are not used
``r1``             ``prompt`` / ``solution`` / -      solution holds ``<think>R</think><answer>A</answer>``:
                                                      reasoning = R, answer = A
``math``           ``problem`` / ``solution`` /       reasoning = solution; answer = the ``answer``
                   ``answer`` (optional)              column when present and non-empty, else the
                                                      content of the last ``\\boxed{...}`` /
                                                      ``\\fbox{...}`` (nested braces allowed)
``problem_answer`` ``problem`` / - / ``answer``       no worked solution: GRPO and evaluation only
``gsm8k``          ``question`` / ``answer`` / -      the ``answer`` column is the solution: answer =
                                                      text after the last ``####`` (thousands commas
                                                      removed); reasoning = text before it, without
                                                      the ``<<48/2=24>>`` calculator annotations
================== ================================== ================================================

So the public math sets load as they are: GSM8K (``gsm8k``); competition_math/MATH, NuminaMath-CoT
(``problem, solution, messages``), AIME/AIMO sets (``id, problem, solution, answer, url``), OpenR1-Math-220k
and NuminaMath-1.5 (``problem, solution, answer, ...``), DeepScaleR (``problem, answer, solution``) (all
``math``: an explicit ``answer`` column wins over ``\\boxed{}``, and a row needs a solution only for SFT);
AMC sets (``id, problem, answer, url``) (``problem_answer``); DAPO-Math-17k and other verl parquet files
(``data_source, prompt, ability, reward_model, extra_info``) (``verl``). A problem given as a chat message
list (``prompt`` of ``r1``/``verl``, or any problem column) is its last user message, verbatim.

Answers may be text, numbers (``27.0`` becomes ``27``; NaN/inf are bad rows) or lists (``[3, 5]`` becomes
``3, 5``). The placeholders NuminaMath-1.5 uses for rows without a final answer (``proof``, ``notfound``)
make a row bad.

``--problem_column`` / ``--solution_column`` / ``--answer_column`` name the columns holding those fields.
With ``--dataset_schema auto`` they select the generic layout: ``math`` when there is a solution column,
else ``problem_answer`` (e.g. ``--problem_column question`` for a question/answer evaluation set, which
would otherwise be read as GSM8K). With a named schema they replace that schema's columns. The schema and
columns used are logged once per split and kept in :class:`LoadReport`.

Schemas without a solution (``problem_answer``, ``verl``, or ``math`` without its solution column) serve
GRPO and evaluation; a loader asked for worked solutions (``require_solutions``, the SFT stage) refuses
them with "SFT needs worked solutions; this dataset has none: columns ...".

A bad row (missing or empty field, no extractable answer, an R1 tag inside the reasoning or answer) raises
:class:`DataError` naming ``<dataset>:<split>:row <i>`` (``i`` is the 0-based row index in that split) and
the field; with ``skip_bad_rows`` it is skipped and counted in the :class:`LoadReport`. ``max_samples``
keeps the first N *good* examples (reading stops there, so later bad rows are not looked at).

Mixtures: ``a.jsonl:0.7,b.jsonl:0.3`` (a name that exists as a file or folder is never split, and hub ids,
``builtin:`` names and ``{split}`` paths keep working inside the list). Every source is read in full, with
the same schema flags and the same per-row errors naming that source. For training (``weighted=True``)
the weights are the shares of the mixture: the largest mixture with those shares that repeats no example
is drawn (a random subset of each source, then shuffled; the same for the same seed on every rank),
capped at ``max_samples``; without weights the sources are concatenated and shuffled. For evaluation the
weights are not used: the sources' examples follow each other in the order given (``max_samples`` is
shared in proportion to their sizes, the first examples of each). Either every source has a weight or
none has; ``--dataset_config`` applies to every hub source.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, get_args

from trainer.r1.builtin import BUILTIN_PREFIX
from trainer.r1.format import ANSWER_CLOSE, ANSWER_OPEN, FORMAT_TAGS, THINK_CLOSE, THINK_OPEN, extract_answer

logger = logging.getLogger(__name__)

FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

SchemaName = Literal["auto", "builtin", "verl", "r1", "math", "problem_answer", "gsm8k"]
SCHEMA_NAMES: tuple[str, ...] = get_args(SchemaName)
ROLES = ("problem", "solution", "answer")


class DataError(ValueError):
    """A dataset cannot be read or one of its rows is unusable; the message names where."""


@dataclass
class Example:
    problem: str
    reasoning: str  # empty when the dataset has no worked solution
    answer: str
    source: str  # "<file or dataset>:<split>:row <i>", for messages


@dataclass
class LoadReport:
    """What :func:`load_examples` read: ``rows`` looked at, ``kept`` and ``skipped`` (with reasons).

    ``columns`` maps each field (problem, solution, answer) to the column it came from. A mixture has one
    report per source in ``sources`` and the number of examples each contributed in ``mixture``.
    """

    dataset: str
    split: str
    schema: str = ""
    rows: int = 0
    kept: int = 0
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)  # "field 'x' is empty" -> count
    columns: dict[str, str] = field(default_factory=dict)
    sources: list[LoadReport] = field(default_factory=list)
    mixture: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{self.dataset}:{self.split} ({self.schema} schema): {self.rows} rows read, {self.kept} kept"
        if self.skipped:
            reasons = "; ".join(f"{n} x {reason}" for reason, n in sorted(self.skipped_reasons.items()))
            text += f", {self.skipped} skipped ({reasons})"
        if self.mixture:
            parts = [f"{r.dataset} {self.mixture[r.dataset]} of {r.kept}" for r in self.sources]
            text += f"; mixture: {', '.join(parts)}"
        return text


def _optional_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise DataError(f"{name} must be a positive integer or unset, got {value!r}")


@dataclass
class DataArgs:
    """The data flags shared by every stage (docs/contract.md)."""

    dataset_name: str = field(
        metadata={
            "help": "Dataset: a hub id, a local .jsonl/.json/.parquet file ('{split}' in the path picks "
            "one file per split), a folder (save_to_disk output or <split>.jsonl files), or builtin:arith; "
            "several comma-separated, each with an optional ':<weight>', are mixed for training "
            "(gsm8k.jsonl:0.7,math.jsonl:0.3)"
        }
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset configuration name (hub datasets)"}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training"})
    dataset_test_split: str = field(default="test", metadata={"help": "Split used for evaluation"})
    dataset_schema: SchemaName = field(
        default="auto",
        metadata={
            "help": "Row layout: auto (detected from the column names) or builtin, verl, r1, math, "
            "problem_answer (no worked solution), gsm8k"
        },
    )
    problem_column: str | None = field(
        default=None, metadata={"help": "Column holding the problem (overrides the schema's)"}
    )
    solution_column: str | None = field(
        default=None, metadata={"help": "Column holding the worked solution (overrides the schema's)"}
    )
    answer_column: str | None = field(
        default=None, metadata={"help": "Column holding the final answer (overrides the schema's)"}
    )
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Skip (and count) unusable rows instead of failing on the first one"}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training examples (the first ones)"}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many evaluation examples (the first ones)"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.dataset_name, str) or not self.dataset_name.strip():
            raise DataError("--dataset_name must not be empty")
        parse_sources(self.dataset_name)  # a malformed mixture fails now, not after the model is loaded
        for split_flag in ("dataset_train_split", "dataset_test_split"):
            if not str(getattr(self, split_flag)).strip():
                raise DataError(f"--{split_flag} must not be empty")
        if self.dataset_schema not in SCHEMA_NAMES:
            raise DataError(
                f"--dataset_schema must be one of {', '.join(SCHEMA_NAMES)}, got {self.dataset_schema!r}"
            )
        _column_overrides(self.problem_column, self.solution_column, self.answer_column)
        _optional_positive("--max_train_samples", self.max_train_samples)
        _optional_positive("--max_eval_samples", self.max_eval_samples)

    @classmethod
    def from_stage_args(cls, args: Mapping[str, Any]) -> DataArgs:
        """The data flags in a stage's ``args`` map (pipeline config, chart values), other keys ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in args.items() if key in names})

    def _load(self, split: str, max_samples: int | None, **kwargs: Any) -> tuple[list[Example], LoadReport]:
        return load_examples(
            self.dataset_name,
            split,
            config=self.dataset_config,
            skip_bad_rows=self.skip_bad_rows,
            max_samples=max_samples,
            schema=self.dataset_schema,
            problem_column=self.problem_column,
            solution_column=self.solution_column,
            answer_column=self.answer_column,
            **kwargs,
        )

    def load_train(
        self, *, seed: int = 0, require_solutions: bool = False
    ) -> tuple[list[Example], LoadReport]:
        """The training split; a mixture is drawn by its weights, deterministically for ``seed``."""
        return self._load(
            self.dataset_train_split,
            self.max_train_samples,
            require_solutions=require_solutions,
            weighted=True,
            seed=seed,
        )

    def load_eval(self, *, require_solutions: bool = False) -> tuple[list[Example], LoadReport]:
        """The evaluation split; a mixture's sources follow each other, unweighted."""
        return self._load(self.dataset_test_split, self.max_eval_samples, require_solutions=require_solutions)


# --------------------------------------------------------------------------------------------------
# Field extraction
# --------------------------------------------------------------------------------------------------


class _RowError(Exception):
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


_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# NuminaMath-1.5 writes these where a problem has no final answer (proofs, answers it could not find).
NO_ANSWER_PLACEHOLDERS = frozenset({"proof", "notfound"})


def _text(row: Mapping[str, Any], name: str) -> str:
    """A required text field, stripped; numbers are accepted and turned into text."""
    if name not in row or row[name] is None:
        raise _RowError(name, "is missing")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _RowError(name, f"must be text, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise _RowError(name, "is empty")
    return text


def _present(row: Mapping[str, Any], name: str | None) -> bool:
    """Whether an optional text field has a non-empty value."""
    if name is None:
        return False
    value = row.get(name)
    return value is not None and not (isinstance(value, str) and not value.strip())


def _no_tags(name: str, text: str) -> str:
    for tag in FORMAT_TAGS:
        if tag in text:
            raise _RowError(name, f"contains the reserved tag {tag}")
    return text


def _number_text(name: str, value: int | float) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _RowError(name, f"is not a finite number ({value})")
        if value.is_integer() and abs(value) < 2**53:  # 27.0 -> "27": the answer a model writes
            return str(int(value))
        return repr(value)
    return str(value)


def _answer_text(name: str, value: Any) -> str:
    """A final answer from text, a number or a list of those (``[3, 5]`` -> ``"3, 5"``)."""
    if value is None:
        raise _RowError(name, "is missing")
    if isinstance(value, bool):
        raise _RowError(name, "must be text, a number or a list, got bool")
    if isinstance(value, int | float):
        text = _number_text(name, value)
    elif isinstance(value, str):
        text = value.strip()
    elif isinstance(value, list | tuple):
        items = []
        for item in value:
            if item is None or isinstance(item, bool) or not isinstance(item, str | int | float):
                raise _RowError(name, f"is a list with an item that is not text or a number: {item!r}")
            items.append(item.strip() if isinstance(item, str) else _number_text(name, item))
        if not all(items):
            raise _RowError(name, "is a list with an empty item")
        text = ", ".join(items)
    else:
        raise _RowError(name, f"must be text, a number or a list, got {type(value).__name__}")
    if not text:
        raise _RowError(name, "is empty")
    if text.lower() in NO_ANSWER_PLACEHOLDERS:
        raise _RowError(name, f"is {text!r}, not a verifiable final answer")
    return _no_tags(name, text)


def _problem_text(row: Mapping[str, Any], name: str) -> str:
    """The problem: text, or a chat message list ``[{"role", "content"}, ...]`` (its last user message)."""
    value = row.get(name)
    if isinstance(value, list):
        users = [m.get("content") for m in value if isinstance(m, Mapping) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str) or not users[-1].strip():
            raise _RowError(name, "is a message list without a non-empty user message")
        return users[-1].strip()
    return _text(row, name)


def _reasoning(row: Mapping[str, Any], name: str | None, need: bool) -> str:
    """A worked solution used as the reasoning: required when ``need`` (SFT), else optional."""
    if need or _present(row, name):
        assert name is not None  # schemas without a solution column are refused before reading rows
        return _no_tags(name, _text(row, name))
    return ""


# A row converter: (row, role -> column, whether a worked solution is required) -> (problem, reasoning, answer).
Converter = Callable[[Mapping[str, Any], Mapping[str, str | None], bool], tuple[str, str, str]]


def _row_builtin(row: Mapping[str, Any], cols: Mapping[str, str | None], need: bool) -> tuple[str, str, str]:
    return (
        _problem_text(row, cols["problem"]),
        _reasoning(row, cols["solution"], need),
        _answer_text(cols["answer"], row.get(cols["answer"])),
    )


def _row_gsm8k(row: Mapping[str, Any], cols: Mapping[str, str | None], need: bool) -> tuple[str, str, str]:
    question = _problem_text(row, cols["problem"])
    name = cols["solution"]
    text = _text(row, name)
    if "####" not in text:
        raise _RowError(name, "has no '#### <final answer>' line")
    before, _, final = text.rpartition("####")
    final = final.strip().rstrip(".").strip()
    if _THOUSANDS_RE.fullmatch(final):
        final = final.replace(",", "")
    if not final:
        raise _RowError(name, "has nothing after '####'")
    reasoning = _CALCULATOR_RE.sub("", before).strip()
    if need and not reasoning:
        raise _RowError(name, "has no reasoning before '####'")
    return question, _no_tags(name, reasoning), _answer_text(name, final)


def _row_r1(row: Mapping[str, Any], cols: Mapping[str, str | None], need: bool) -> tuple[str, str, str]:
    problem = _problem_text(row, cols["problem"])
    name = cols["solution"]
    solution = _text(row, name)
    if solution.count(THINK_OPEN) != 1 or solution.count(THINK_CLOSE) != 1:
        raise _RowError(name, f"needs exactly one {THINK_OPEN}...{THINK_CLOSE} block")
    start, end = solution.find(THINK_OPEN) + len(THINK_OPEN), solution.find(THINK_CLOSE)
    if end < start:
        raise _RowError(name, f"has {THINK_CLOSE} before {THINK_OPEN}")
    reasoning = solution[start:end].strip()
    answer = extract_answer(solution)
    if answer is None:
        raise _RowError(name, f"needs exactly one {ANSWER_OPEN}...{ANSWER_CLOSE} block")
    if need and not reasoning:
        raise _RowError(name, f"has an empty {THINK_OPEN} block")
    if not answer:
        raise _RowError(name, f"has an empty {ANSWER_OPEN} block")
    return problem, _no_tags(name, reasoning), _no_tags(name, answer)


def _row_math(row: Mapping[str, Any], cols: Mapping[str, str | None], need: bool) -> tuple[str, str, str]:
    problem = _problem_text(row, cols["problem"])
    solution_col, answer_col = cols["solution"], cols["answer"]
    assert solution_col is not None  # required by the schema
    reasoning = _reasoning(row, solution_col, need)
    if answer_col is not None and _present(row, answer_col):  # an explicit answer wins over \boxed{}
        return problem, reasoning, _answer_text(answer_col, row[answer_col])
    solution = reasoning or _text(row, solution_col)
    answer = extract_boxed(solution)
    if answer is None:
        raise _RowError(solution_col, "has no complete \\boxed{...} answer")
    if not answer:
        raise _RowError(solution_col, "has an empty \\boxed{} answer")
    return problem, reasoning, _answer_text(solution_col, answer)


def _row_problem_answer(
    row: Mapping[str, Any], cols: Mapping[str, str | None], need: bool
) -> tuple[str, str, str]:
    del need  # refused before any row is read
    answer_col = cols["answer"]
    assert answer_col is not None
    return _problem_text(row, cols["problem"]), "", _answer_text(answer_col, row.get(answer_col))


def _row_verl(row: Mapping[str, Any], cols: Mapping[str, str | None], need: bool) -> tuple[str, str, str]:
    del need
    problem = _problem_text(row, cols["problem"])
    name = cols["answer"]
    assert name is not None
    value = row.get(name)
    if isinstance(value, Mapping):  # reward_model = {"ground_truth": ..., "style": "rule"}
        name, value = f"{name}.ground_truth", value.get("ground_truth")
    return problem, "", _answer_text(name, value)


@dataclass(frozen=True)
class _Schema:
    name: str
    columns: Mapping[str, str]  # role (problem / solution / answer) -> default column
    convert: Converter
    optional: frozenset[str] = frozenset()  # roles whose column may be absent
    hint: str = ""  # appended to row errors: the likely fix when the guess was wrong

    def required(self, cols: Mapping[str, str | None]) -> set[str]:
        return {c for role, c in cols.items() if role not in self.optional and c is not None}


SCHEMAS: tuple[_Schema, ...] = (
    _Schema("builtin", {"problem": "question", "solution": "reasoning", "answer": "answer"}, _row_builtin),
    _Schema("verl", {"problem": "prompt", "answer": "reward_model"}, _row_verl),
    _Schema("r1", {"problem": "prompt", "solution": "solution"}, _row_r1),
    _Schema(
        "math",
        {"problem": "problem", "solution": "solution", "answer": "answer"},
        _row_math,
        optional=frozenset({"answer"}),
    ),
    _Schema("problem_answer", {"problem": "problem", "answer": "answer"}, _row_problem_answer),
    _Schema(
        "gsm8k",
        {"problem": "question", "solution": "answer"},
        _row_gsm8k,
        hint="if 'answer' holds only the final answer, pass --dataset_schema problem_answer "
        "--problem_column question",
    ),
)
_BY_NAME = {s.name: s for s in SCHEMAS}
# The layout the column flags describe when no schema is named: problem + solution (+ answer), or problem + answer.
_GENERIC = (_BY_NAME["math"], _BY_NAME["problem_answer"])


def _column_overrides(
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


def _describe(schema: _Schema, cols: Mapping[str, str | None]) -> str:
    return f"{schema.name} schema: " + ", ".join(f"{r}={c!r}" for r, c in cols.items() if c is not None)


def _choose_schema(
    columns: Iterable[str], where: str, schema: str = "auto", overrides: Mapping[str, str] | None = None
) -> tuple[_Schema, dict[str, str | None]]:
    """The schema for these columns and the column of each of its fields (None: an absent optional one)."""
    present = set(columns)
    overrides = dict(overrides or {})
    found = ", ".join(sorted(present)) or "(none)"
    for role, col in overrides.items():
        if col not in present:
            raise DataError(f"{where}: --{role}_column {col!r} is not a column; columns found: {found}")
    if schema == "auto":
        candidates = _GENERIC if overrides else SCHEMAS
    elif schema in _BY_NAME:
        candidates = (_BY_NAME[schema],)
        extra = sorted(set(overrides) - set(candidates[0].columns))
        if extra:
            raise DataError(
                f"{where}: the {schema} schema has no {extra[0]} field (--{extra[0]}_column); "
                f"its fields: {', '.join(candidates[0].columns)}"
            )
    else:
        raise DataError(f"--dataset_schema must be one of {', '.join(SCHEMA_NAMES)}, got {schema!r}")
    for candidate in candidates:
        cols: dict[str, str | None] = {role: overrides.get(role, c) for role, c in candidate.columns.items()}
        if candidate.required(cols) <= present:
            return candidate, {r: c if c in present else None for r, c in cols.items()}
    if schema != "auto":
        (only,) = candidates
        cols = {role: overrides.get(role, c) for role, c in only.columns.items()}
        missing = sorted(only.required(cols) - present)
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
        f"{s.name}: {', '.join(c for r, c in s.columns.items() if r not in s.optional)}" for s in SCHEMAS
    )
    raise DataError(
        f"{where}: unknown schema, columns found: {found}; known schemas (required columns): {known}; "
        "or name the columns with --problem_column / --solution_column / --answer_column"
    )


def detect_schema(columns: Iterable[str], dataset: str = "dataset") -> str:
    """The name of the schema ``auto`` picks for these columns; :class:`DataError` when none fits."""
    return _choose_schema(columns, dataset)[0].name


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    name: str
    weight: Fraction | None = None


_WEIGHTED_RE = re.compile(r"(?P<name>.+):(?P<weight>\d+(?:\.\d*)?|\.\d+)")


def _exists(name: str) -> bool:
    return Path(os.path.expanduser(name)).exists()


def parse_sources(dataset_name: str) -> list[Source]:
    """``--dataset_name`` as a list of sources: ``a.jsonl:0.7,b.jsonl:0.3`` or a single name.

    A name that exists as a file or folder is taken whole (commas or a ``:<number>`` tail included).
    """
    spec = dataset_name.strip()
    if not spec:
        raise DataError("--dataset_name must not be empty")
    if _exists(spec):
        return [Source(spec)]
    sources: list[Source] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise DataError(f"--dataset_name {spec!r}: an empty entry in the comma-separated list")
        m = _WEIGHTED_RE.fullmatch(part)
        if m and not _exists(part):
            weight = Fraction(m["weight"])
            if weight <= 0:
                raise DataError(f"--dataset_name {spec!r}: the weight of {m['name']!r} must be > 0")
            sources.append(Source(m["name"].strip(), weight))
        else:
            sources.append(Source(part))
    if len({s.weight is None for s in sources}) > 1:
        raise DataError(f"--dataset_name {spec!r}: give every dataset a ':<weight>' or none of them")
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"--dataset_name {spec!r}: {duplicates[0]!r} is listed twice")
    return sources


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix.lower() in FILE_SUFFIXES


def _wrap_load_error(label: str, split: str, config: str | None, e: Exception) -> DataError:
    where = f"split {split!r}" + (f", config {config!r}" if config else "")
    return DataError(f"cannot load dataset {label} ({where}): {type(e).__name__}: {e}")


def _open(
    dataset_name: str, split: str, config: str | None
) -> tuple[str, Iterable[Mapping[str, Any]], list[str]]:
    """(label for messages, rows, column names) of one split."""
    if dataset_name.startswith(BUILTIN_PREFIX):
        from trainer.r1.builtin import builtin_rows

        task = dataset_name[len(BUILTIN_PREFIX) :]
        try:
            rows = builtin_rows(task, split)
        except ValueError as e:
            raise DataError(f"{dataset_name}: {e}") from e
        columns = sorted({key for row in rows[:1] for key in row})
        return dataset_name, rows, columns

    import datasets

    name = dataset_name.replace("{split}", split)
    path = Path(os.path.expanduser(name))
    if path.is_file():
        builder = FILE_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"{name}: unsupported file type {path.suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}"
            )
        if "{split}" not in dataset_name:
            logger.info(
                "%s is a single file: it serves split %r (use '{split}' in the path for per-split files)",
                name,
                split,
            )
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, ...)
            raise _wrap_load_error(name, split, None, e) from e
        return name, ds, list(ds.column_names)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:
            raise _wrap_load_error(name, split, None, e) from e
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{name}: no split {split!r}; splits: {', '.join(loaded) or '(none)'}")
            loaded = loaded[split]
        return name, loaded, list(loaded.column_names)
    if not path.exists() and _looks_like_path(name):
        raise DataError(f"{name}: no such file or folder")
    # A plain folder or a hub id: the hub path proper.
    try:
        ds = datasets.load_dataset(str(path) if path.is_dir() else name, config, split=split)
    except Exception as e:
        raise _wrap_load_error(name, split, config, e) from e
    if not isinstance(ds, datasets.Dataset):  # e.g. an IterableDataset from a custom builder
        raise DataError(f"{name}: split {split!r} did not load as a datasets.Dataset ({type(ds).__name__})")
    return name, ds, list(ds.column_names)


def load_examples(
    dataset_name: str,
    split: str,
    *,
    config: str | None = None,
    skip_bad_rows: bool = False,
    max_samples: int | None = None,
    schema: str = "auto",
    problem_column: str | None = None,
    solution_column: str | None = None,
    answer_column: str | None = None,
    require_solutions: bool = False,
    weighted: bool = False,
    seed: int = 0,
) -> tuple[list[Example], LoadReport]:
    """Examples of one split of ``dataset_name`` (see the module docstring for sources and schemas).

    ``require_solutions`` (SFT) refuses datasets without worked solutions and rows with an empty one.
    ``weighted``/``seed`` only matter for a mixture of several datasets: ``weighted`` draws it by the
    weights and shuffles it with ``seed`` (training); otherwise the sources follow each other (evaluation).
    """
    if not isinstance(dataset_name, str) or not dataset_name.strip():
        raise DataError("--dataset_name must not be empty")
    if not isinstance(split, str) or not split.strip():
        raise DataError(f"{dataset_name}: the split name must not be empty")
    _optional_positive("max_samples", max_samples)
    overrides = _column_overrides(problem_column, solution_column, answer_column)
    options = dict(
        config=config,
        skip_bad_rows=skip_bad_rows,
        schema=schema,
        overrides=overrides,
        require_solutions=require_solutions,
    )
    sources = parse_sources(dataset_name)
    if len(sources) == 1:
        return _load_one(sources[0].name, split, max_samples=max_samples, **options)
    loaded = [_load_one(s.name, split, max_samples=None, **options) for s in sources]
    weights = [s.weight for s in sources] if weighted and sources[0].weight is not None else None
    return _mix(
        dataset_name.strip(), split, loaded, weights, max_samples, random.Random(seed) if weighted else None
    )


def _load_one(
    dataset_name: str,
    split: str,
    *,
    config: str | None,
    skip_bad_rows: bool,
    max_samples: int | None,
    schema: str,
    overrides: Mapping[str, str],
    require_solutions: bool,
) -> tuple[list[Example], LoadReport]:
    label, rows, columns = _open(dataset_name, split, config)
    chosen, cols = _choose_schema(columns, f"{label}:{split}", schema, overrides)
    if require_solutions and cols.get("solution") is None:
        raise DataError(
            f"{label}:{split}: SFT needs worked solutions; this dataset has none: columns "
            f"{', '.join(sorted(columns))} (read as the {_describe(chosen, cols)}); use it for GRPO or "
            "evaluation, or name its solution column with --solution_column"
        )
    logger.info("%s:%s: %s", label, split, _describe(chosen, cols))
    report = LoadReport(
        dataset=label, split=split, schema=chosen.name, columns={r: c for r, c in cols.items() if c}
    )
    examples: list[Example] = []
    for i, row in enumerate(rows):
        if max_samples is not None and len(examples) >= max_samples:
            break
        report.rows += 1
        where = f"{label}:{split}:row {i}"
        try:
            problem, reasoning, answer = chosen.convert(row, cols, require_solutions)
        except _RowError as e:
            if not skip_bad_rows:
                hint = f"; {chosen.hint}" if chosen.hint else ""
                raise DataError(
                    f"{where} ({chosen.name} schema): {e.reason} (pass --skip_bad_rows true to skip such "
                    f"rows{hint})"
                ) from None
            report.skipped += 1
            report.skipped_reasons[e.reason] = report.skipped_reasons.get(e.reason, 0) + 1
            continue
        examples.append(Example(problem=problem, reasoning=reasoning, answer=answer, source=where))
    report.kept = len(examples)
    if not examples:
        raise DataError(f"{label}:{split}: no usable examples ({report.summary()})")
    if report.skipped:
        logger.warning("%s", report.summary())
    return examples, report


# --------------------------------------------------------------------------------------------------
# Mixtures
# --------------------------------------------------------------------------------------------------


def mixture_counts(sizes: Sequence[int], weights: Sequence[Fraction] | None, limit: int | None) -> list[int]:
    """How many examples each source gives: shares ``weights`` (default: the sizes), no source repeated.

    The total is the largest one whose shares fit every source (``min(size_i / share_i)``), capped at
    ``limit``; it is split by largest remainders, ties to the earlier source.
    """
    shares = [Fraction(n) for n in sizes] if weights is None else [Fraction(w) for w in weights]
    whole = sum(shares)
    total = min(math.floor(n * whole / s) for n, s in zip(sizes, shares, strict=True) if s > 0)
    if limit is not None:
        total = min(total, limit)
    exact = [total * s / whole for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _mix(
    spec: str,
    split: str,
    loaded: list[tuple[list[Example], LoadReport]],
    weights: list[Fraction | None] | None,
    max_samples: int | None,
    rng: random.Random | None,
) -> tuple[list[Example], LoadReport]:
    sizes = [len(examples) for examples, _ in loaded]
    counts = mixture_counts(sizes, weights, max_samples)  # type: ignore[arg-type]
    mixed: list[Example] = []
    for (examples, report), k in zip(loaded, counts, strict=True):
        if k == 0:
            logger.warning("%s:%s: its weight gives it no example in this mixture", report.dataset, split)
        picked = sorted(rng.sample(range(len(examples)), k)) if rng is not None else range(k)
        mixed.extend(examples[i] for i in picked)
    if rng is not None:
        rng.shuffle(mixed)
    reports = [report for _, report in loaded]
    schemas = list(dict.fromkeys(r.schema for r in reports))
    out = LoadReport(
        dataset=spec,
        split=split,
        schema="+".join(schemas),
        rows=sum(r.rows for r in reports),
        kept=len(mixed),
        skipped=sum(r.skipped for r in reports),
        sources=reports,
        mixture={r.dataset: k for r, k in zip(reports, counts, strict=True)},
    )
    for r in reports:
        for reason, n in r.skipped_reasons.items():
            key = f"{r.dataset}: {reason}"
            out.skipped_reasons[key] = out.skipped_reasons.get(key, 0) + n
    logger.info("%s", out.summary())
    return mixed, out
