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

Schemas, detected per dataset from its column names (first match wins):

=========== ================================ ====================================================
schema      columns                          example fields
=========== ================================ ====================================================
``builtin`` ``question, reasoning, answer``  answer is the bare final value
``gsm8k``   ``question, answer``             answer = text after the last ``####`` (thousands
                                             commas removed); reasoning = text before it, without
                                             the ``<<48/2=24>>`` calculator annotations
``r1``      ``prompt, solution``             solution holds ``<think>R</think><answer>A</answer>``:
                                             reasoning = R, answer = A; ``prompt`` may also be a chat
                                             message list (the last user message is the problem)
``math``    ``problem, solution``            (competition_math / MATH) reasoning = solution; answer
                                             = the ``answer`` column when present and non-empty,
                                             else the content of the last ``\\boxed{...}`` /
                                             ``\\fbox{...}`` (nested braces allowed)
=========== ================================ ====================================================

A bad row (missing or empty field, no extractable answer, an R1 tag inside the reasoning or answer) raises
:class:`DataError` naming ``<dataset>:<split>:row <i>`` (``i`` is the 0-based row index in that split) and
the field; with ``skip_bad_rows`` it is skipped and counted in the :class:`LoadReport`. ``max_samples``
keeps the first N *good* examples (reading stops there, so later bad rows are not looked at).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.r1.builtin import BUILTIN_PREFIX
from trainer.r1.format import ANSWER_CLOSE, ANSWER_OPEN, FORMAT_TAGS, THINK_CLOSE, THINK_OPEN, extract_answer

logger = logging.getLogger(__name__)

FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A dataset cannot be read or one of its rows is unusable; the message names where."""


@dataclass
class Example:
    problem: str
    reasoning: str
    answer: str
    source: str  # "<file or dataset>:<split>:row <i>", for messages


@dataclass
class LoadReport:
    """What :func:`load_examples` read: ``rows`` looked at, ``kept`` and ``skipped`` (with reasons)."""

    dataset: str
    split: str
    schema: str = ""
    rows: int = 0
    kept: int = 0
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)  # "field 'x' is empty" -> count

    def summary(self) -> str:
        text = f"{self.dataset}:{self.split} ({self.schema} schema): {self.rows} rows read, {self.kept} kept"
        if self.skipped:
            reasons = "; ".join(f"{n} x {reason}" for reason, n in sorted(self.skipped_reasons.items()))
            text += f", {self.skipped} skipped ({reasons})"
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
            "one file per split), a folder (save_to_disk output or <split>.jsonl files), or builtin:arith"
        }
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset configuration name (hub datasets)"}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training"})
    dataset_test_split: str = field(default="test", metadata={"help": "Split used for evaluation"})
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
        for split_flag in ("dataset_train_split", "dataset_test_split"):
            if not str(getattr(self, split_flag)).strip():
                raise DataError(f"--{split_flag} must not be empty")
        _optional_positive("--max_train_samples", self.max_train_samples)
        _optional_positive("--max_eval_samples", self.max_eval_samples)

    def load_train(self) -> tuple[list[Example], LoadReport]:
        return load_examples(
            self.dataset_name,
            self.dataset_train_split,
            config=self.dataset_config,
            skip_bad_rows=self.skip_bad_rows,
            max_samples=self.max_train_samples,
        )

    def load_eval(self) -> tuple[list[Example], LoadReport]:
        return load_examples(
            self.dataset_name,
            self.dataset_test_split,
            config=self.dataset_config,
            skip_bad_rows=self.skip_bad_rows,
            max_samples=self.max_eval_samples,
        )


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


def _no_tags(name: str, text: str) -> str:
    for tag in FORMAT_TAGS:
        if tag in text:
            raise _RowError(name, f"contains the reserved tag {tag}")
    return text


def _row_builtin(row: Mapping[str, Any]) -> tuple[str, str, str]:
    return (
        _text(row, "question"),
        _no_tags("reasoning", _text(row, "reasoning")),
        _no_tags("answer", _text(row, "answer")),
    )


def _row_gsm8k(row: Mapping[str, Any]) -> tuple[str, str, str]:
    question = _text(row, "question")
    text = _text(row, "answer")
    if "####" not in text:
        raise _RowError("answer", "has no '#### <final answer>' line")
    before, _, final = text.rpartition("####")
    final = final.strip().rstrip(".").strip()
    if _THOUSANDS_RE.fullmatch(final):
        final = final.replace(",", "")
    if not final:
        raise _RowError("answer", "has nothing after '####'")
    reasoning = _CALCULATOR_RE.sub("", before).strip()
    if not reasoning:
        raise _RowError("answer", "has no reasoning before '####'")
    return question, _no_tags("answer", reasoning), _no_tags("answer", final)


def _prompt_text(row: Mapping[str, Any]) -> str:
    value = row.get("prompt")
    if isinstance(value, list):  # chat format: [{"role": ..., "content": ...}, ...]
        users = [m.get("content") for m in value if isinstance(m, Mapping) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str) or not users[-1].strip():
            raise _RowError("prompt", "is a message list without a non-empty user message")
        return users[-1].strip()
    return _text(row, "prompt")


def _row_r1(row: Mapping[str, Any]) -> tuple[str, str, str]:
    problem = _prompt_text(row)
    solution = _text(row, "solution")
    if solution.count(THINK_OPEN) != 1 or solution.count(THINK_CLOSE) != 1:
        raise _RowError("solution", f"needs exactly one {THINK_OPEN}...{THINK_CLOSE} block")
    start, end = solution.find(THINK_OPEN) + len(THINK_OPEN), solution.find(THINK_CLOSE)
    if end < start:
        raise _RowError("solution", f"has {THINK_CLOSE} before {THINK_OPEN}")
    reasoning = solution[start:end].strip()
    answer = extract_answer(solution)
    if answer is None:
        raise _RowError("solution", f"needs exactly one {ANSWER_OPEN}...{ANSWER_CLOSE} block")
    if not reasoning:
        raise _RowError("solution", f"has an empty {THINK_OPEN} block")
    if not answer:
        raise _RowError("solution", f"has an empty {ANSWER_OPEN} block")
    return problem, _no_tags("solution", reasoning), _no_tags("solution", answer)


def _row_math(row: Mapping[str, Any]) -> tuple[str, str, str]:
    problem = _text(row, "problem")
    solution = _text(row, "solution")
    answer_col = row.get("answer")
    if (
        isinstance(answer_col, str | int | float)
        and not isinstance(answer_col, bool)
        and str(answer_col).strip()
    ):
        answer = str(answer_col).strip()
    else:
        answer = extract_boxed(solution)
        if answer is None:
            raise _RowError("solution", "has no complete \\boxed{...} answer")
        if not answer:
            raise _RowError("solution", "has an empty \\boxed{} answer")
    return problem, _no_tags("solution", solution), _no_tags("answer", answer)


@dataclass(frozen=True)
class _Schema:
    name: str
    columns: frozenset[str]
    convert: Callable[[Mapping[str, Any]], tuple[str, str, str]]


SCHEMAS: tuple[_Schema, ...] = (
    _Schema("builtin", frozenset({"question", "reasoning", "answer"}), _row_builtin),
    _Schema("gsm8k", frozenset({"question", "answer"}), _row_gsm8k),
    _Schema("r1", frozenset({"prompt", "solution"}), _row_r1),
    _Schema("math", frozenset({"problem", "solution"}), _row_math),
)


def detect_schema(columns: Iterable[str], dataset: str = "dataset") -> str:
    """The name of the first schema whose columns are all present; :class:`DataError` otherwise."""
    return _detect(columns, dataset).name


def _detect(columns: Iterable[str], dataset: str) -> _Schema:
    present = set(columns)
    for schema in SCHEMAS:
        if schema.columns <= present:
            return schema
    known = "; ".join(f"{s.name}: {', '.join(sorted(s.columns))}" for s in SCHEMAS)
    raise DataError(
        f"{dataset}: unknown schema, columns found: {', '.join(sorted(present)) or '(none)'}; "
        f"known schemas (required columns): {known}"
    )


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


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
) -> tuple[list[Example], LoadReport]:
    """Examples of one split of ``dataset_name`` (see the module docstring for sources and schemas)."""
    if not isinstance(dataset_name, str) or not dataset_name.strip():
        raise DataError("--dataset_name must not be empty")
    if not isinstance(split, str) or not split.strip():
        raise DataError(f"{dataset_name}: the split name must not be empty")
    _optional_positive("max_samples", max_samples)
    dataset_name = dataset_name.strip()
    label, rows, columns = _open(dataset_name, split, config)
    schema = _detect(columns, f"{label}:{split}")
    report = LoadReport(dataset=label, split=split, schema=schema.name)
    examples: list[Example] = []
    for i, row in enumerate(rows):
        if max_samples is not None and len(examples) >= max_samples:
            break
        report.rows += 1
        where = f"{label}:{split}:row {i}"
        try:
            problem, reasoning, answer = schema.convert(row)
        except _RowError as e:
            if not skip_bad_rows:
                raise DataError(
                    f"{where} ({schema.name} schema): {e.reason} "
                    "(pass --skip_bad_rows true to skip such rows)"
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
