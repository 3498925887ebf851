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

Schemas (``--dataset_schema``; ``auto`` detects them, see :mod:`trainer.r1.schemas`): column names are
matched case-insensitively under the names published sets use (problem: ``problem``, ``question``,
``input``, ``content``, ``query``, ``prompt``; solution: ``solution``, ``solutions``, ``steps``,
``rationale``; answer: ``answer``, ``final_answer``, ``target``, ``ground_truth``, ``gt``), and a ``body``
column is joined before the question (``Body+Question``). In this order:

================== ================================== ================================================
schema             columns (problem / solution /      fields
                   answer)
================== ================================== ================================================
``builtin``        ``question`` / ``reasoning`` /     answer is the bare final value
                   ``answer``
``verl``           ``prompt`` / - /                   verl's RL parquet layout: ``prompt`` is a chat
                   ``reward_model``                   message list, the answer is
                                                      ``reward_model.ground_truth``
``r1``             ``prompt`` / ``solution`` / -      (when a solution holds ``<think>``) solution is
                                                      ``<think>R</think><answer>A</answer>``
``gsm8k``          ``question`` / ``answer`` / -      (when the answers carry ``#### N``) answer = text
                                                      after the last ``####`` (thousands commas
                                                      removed); reasoning = text before it, without
                                                      the ``<<48/2=24>>`` calculator annotations
``math``           problem / solution / answer        reasoning = the solution (of a list of them, the
                   (optional)                         first); answer = the answer column when present
                                                      and non-empty, else the content of the last
                                                      ``\\boxed{...}`` / ``\\fbox{...}``
``problem_answer`` problem / - / answer               no worked solution: GRPO and evaluation only
================== ================================== ================================================

So the public math sets load as they are: GSM8K (``gsm8k``); competition_math/MATH, NuminaMath-CoT,
AIME/AIMO sets, OpenR1-Math-220k, NuminaMath-1.5, DeepScaleR, OlympiadBench (``question``, list-valued
``solution`` and ``final_answer``), CARP-en (``content``, ``steps``, ``answer``) (all ``math``); AMC sets,
college_math and gaokao2023en (``question``, ``answer``), SVAMP (``Body`` + ``Question``, ``Answer``),
ASDiv (``body`` + ``question``, ``answer`` such as ``9 (apples)``), MAWPS (``input``, ``target``)
(``problem_answer``); DAPO-Math-17k and other verl parquet files (``verl``). A solution column with no
value in the first rows is no solution. A problem given as a chat message list is its last user message,
verbatim.

Answers may be text, numbers (``27.0`` becomes ``27``; NaN/inf are bad rows) or lists (``[3, 5]`` becomes
``3, 5``). The placeholders NuminaMath-1.5 uses for rows without a final answer (``proof``, ``notfound``)
make a row bad.

``--problem_column`` / ``--solution_column`` / ``--answer_column`` name the columns holding those fields
(case-insensitively; ``--problem_column Body+Question`` joins columns). With ``--dataset_schema auto``
they select the generic layout: ``math`` when there is a solution column, else ``problem_answer``. With a
named schema they replace that schema's columns. The schema and columns used are logged once per split
and kept in :class:`LoadReport`; ``r1-grpo data inspect`` prints them with the first prompts.

Schemas without a solution (``problem_answer``, ``verl``, or ``math`` without its solution column) serve
GRPO and evaluation; a loader asked for worked solutions (``require_solutions``, the SFT stage) refuses
them with "SFT needs worked solutions; this dataset has none: columns ...".

A bad row (missing or empty field, no extractable answer, an R1 tag inside the reasoning or answer) raises
:class:`DataError` naming ``<dataset>:<split>:row <i>`` (``i`` is the 0-based row index in that split) and
the field, and the flags of another layout that reads the first rows when there is one; with
``skip_bad_rows`` it is skipped and counted in the :class:`LoadReport`, and when every row is refused the
error names the schema, the first row's reason and those flags. ``max_samples``
keeps the first N *good* examples (reading stops there, so later bad rows are not looked at).

Mixtures: ``a.jsonl:0.7,b.jsonl:0.3`` (a name that exists as a file or folder is never split, and hub ids,
``builtin:`` names and ``{split}`` paths keep working inside the list). Every source is read in full, with
the same schema flags and the same per-row errors naming that source. For training (``weighted=True``)
the weights are the shares of the mixture: the largest mixture with those shares that repeats no example
is drawn (a random subset of each source, then shuffled; the same for the same seed on every rank),
capped at ``max_samples``; without weights the sources are concatenated and shuffled. For evaluation the
weights are not used: the sources' examples follow each other in the order given (``max_samples`` is
shared in proportion to their sizes, the first examples of each) and the eval stage reports every metric
per source as well as over all of them. Either every source has a weight or none has.
``--dataset_config`` applies to every hub source; a source written ``<name>@<config>``
(``openai/gsm8k@main:0.7,EleutherAI/hendrycks_math@algebra:0.3``) has its own config instead (hub
datasets and dataset folders only; a local file or folder whose name holds ``@`` is still taken whole).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any, Literal

from trainer.r1.fields import DataError, RowError, extract_boxed
from trainer.r1.schemas import (
    SAMPLE_ROWS,
    SCHEMA_NAMES,
    SCHEMAS,
    choose_schema,
    column_overrides,
    describe,
    detect_schema,
    suggest_flags,
)
from trainer.r1.sources import FILE_SUFFIXES, Source, open_split, parse_sources

__all__ = [
    "FILE_SUFFIXES",
    "SCHEMAS",
    "SCHEMA_NAMES",
    "DataArgs",
    "DataError",
    "Example",
    "LoadReport",
    "Source",
    "detect_schema",
    "extract_boxed",
    "load_examples",
    "mixture_counts",
    "parse_sources",
]

logger = logging.getLogger(__name__)

SchemaName = Literal["auto", "builtin", "verl", "r1", "math", "problem_answer", "gsm8k"]


@dataclass
class Example:
    problem: str
    reasoning: str  # empty when the dataset has no worked solution
    answer: str
    source: str  # "<file or dataset>:<split>:row <i>", for messages
    # The mixture entry it came from (its label, e.g. "openai/gsm8k@main"): eval metrics per dataset.
    dataset: str = field(default="", compare=False)


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

    def drop(self, sources: Sequence[str], reason: str) -> None:
        """Count examples dropped after loading (``sources``: their ``Example.source``) as skipped rows,
        for ``reason``; in a mixture each is counted against the source it came from."""
        for where in sources:
            origin = next((r for r in self.sources if where.startswith(f"{r.dataset}:{r.split}:row ")), None)
            key = reason if origin is None else f"{origin.dataset}: {reason}"
            self.skipped_reasons[key] = self.skipped_reasons.get(key, 0) + 1
            if origin is not None and origin.dataset in self.mixture:
                self.mixture[origin.dataset] -= 1
        self.skipped += len(sources)
        self.kept -= len(sources)


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
            "(gsm8k.jsonl:0.7,math.jsonl:0.3); a hub source's own config follows its name after '@' "
            "(openai/gsm8k@main:0.7)"
        }
    )
    dataset_config: str | None = field(
        default=None,
        metadata={"help": "Dataset configuration name (hub datasets; a source's own '@<config>' wins)"},
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
        column_overrides(self.problem_column, self.solution_column, self.answer_column)
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
    overrides = column_overrides(problem_column, solution_column, answer_column)
    options = dict(
        config=config,
        skip_bad_rows=skip_bad_rows,
        schema=schema,
        overrides=overrides,
        require_solutions=require_solutions,
    )
    sources = parse_sources(dataset_name)
    if len(sources) == 1:
        return _load_one(sources[0], split, max_samples=max_samples, **options)
    loaded = [_load_one(s, split, max_samples=None, **options) for s in sources]
    weights = [s.weight for s in sources] if weighted and sources[0].weight is not None else None
    return _mix(
        dataset_name.strip(), split, loaded, weights, max_samples, random.Random(seed) if weighted else None
    )


def _load_one(
    source: Source,
    split: str,
    *,
    config: str | None,
    skip_bad_rows: bool,
    max_samples: int | None,
    schema: str,
    overrides: Mapping[str, str],
    require_solutions: bool,
) -> tuple[list[Example], LoadReport]:
    own_config = source.config is not None
    label, rows, columns = open_split(
        source.name, split, source.config if own_config else config, own_config=own_config
    )
    sample = [row for _, row in zip(range(SAMPLE_ROWS), rows, strict=False)]
    chosen, cols = choose_schema(columns, f"{label}:{split}", schema, overrides, sample)
    if require_solutions and cols.get("solution") is None:
        raise DataError(
            f"{label}:{split}: SFT needs worked solutions; this dataset has none: columns "
            f"{', '.join(sorted(columns))} (read as the {describe(chosen, cols)}); use it for GRPO or "
            "evaluation, or name its solution column with --solution_column"
        )
    logger.info("%s:%s: %s", label, split, describe(chosen, cols))
    report = LoadReport(
        dataset=label, split=split, schema=chosen.name, columns={r: c for r, c in cols.items() if c}
    )

    def fix() -> str:
        """What would read this dataset instead, for the messages of a refused row."""
        flags = suggest_flags(columns, sample, chosen, require_solutions)
        return f"; it reads as another layout with {flags}" if flags else ""

    examples: list[Example] = []
    first_refusal = ""
    for i, row in enumerate(rows):
        if max_samples is not None and len(examples) >= max_samples:
            break
        report.rows += 1
        where = f"{label}:{split}:row {i}"
        try:
            problem, reasoning, answer = chosen.convert(row, cols, require_solutions)
        except RowError as e:
            if not skip_bad_rows:
                raise DataError(
                    f"{where} ({chosen.name} schema): {e.reason} (pass --skip_bad_rows true to skip such "
                    f"rows{fix()})"
                ) from None
            first_refusal = first_refusal or f"row {i}: {e.reason}"
            report.skipped += 1
            report.skipped_reasons[e.reason] = report.skipped_reasons.get(e.reason, 0) + 1
            continue
        examples.append(Example(problem, reasoning, answer, source=where, dataset=label))
    report.kept = len(examples)
    if not examples:
        refused = (
            f"; the {chosen.name} schema refused every row, first {first_refusal}" if first_refusal else ""
        )
        raise DataError(f"{label}:{split}: no usable examples ({report.summary()}){refused}{fix()}")
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
