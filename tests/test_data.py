"""Tests for trainer.r1.data and trainer.r1.format: sources, schemas (the public math sets' shapes), bad rows,
mixtures, DataArgs flags and their pass-through, prompt and completion text."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import datasets
import pytest

from trainer.r1.data import (
    DataArgs,
    DataError,
    Example,
    Source,
    detect_schema,
    extract_boxed,
    load_examples,
    mixture_counts,
    parse_sources,
)
from trainer.r1.format import check_format, format_completion
from trainer.r1.prompt import R1_SYSTEM_PROMPT, PromptSettings, format_prompt
from trainer.r1.rewards import reward_function

MATH_ROWS = [
    {
        "problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
        "solution": "Add: $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$.",
        "level": "Level 1",
    },
    {
        "problem": "Find the set.",
        "solution": "First $\\boxed{1}$ is wrong; it is $\\boxed{\\{1, {2}\\}}$.",
        "level": "Level 2",
    },
]
GSM8K_ROWS = [
    {
        "question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
        "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72",
    },
    {"question": "How many grams?", "answer": "It is 1,000 * 2 = <<1000*2=2000>>2,000 grams.\n#### 2,000"},
]
R1_ROWS = [
    {"prompt": "What is 3 * 4?", "solution": "<think>\n3 * 4 = 12\n</think>\n<answer> 12 </answer>"},
    {
        "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 2 + 5?"}],
        "solution": "<think>2 + 5 = 7</think><answer>7</answer>",
    },
]
BUILTIN_ROWS = [
    {"question": "Compute 1 + 2.", "reasoning": "1 + 2 = 3", "answer": "3"},
    {"question": "Compute 5 - 7.", "reasoning": "5 - 7 = -2", "answer": "-2"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------------


def test_math_schema(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    examples, report = load_examples(str(path), "train")
    assert report.schema == "math"
    assert [e.answer for e in examples] == ["\\frac{3}{4}", "\\{1, {2}\\}"]  # the last \boxed, nested braces
    assert examples[0].reasoning == MATH_ROWS[0]["solution"]
    assert examples[0].problem == MATH_ROWS[0]["problem"]
    assert examples[1].source == f"{path}:train:row 1"
    assert (report.rows, report.kept, report.skipped) == (2, 2, 0)


def test_math_schema_prefers_answer_column(tmp_path: Path) -> None:
    rows = [dict(MATH_ROWS[0], answer="0.75"), dict(MATH_ROWS[1], answer="")]
    examples, _ = load_examples(str(write_jsonl(tmp_path / "m.jsonl", rows)), "train")
    assert [e.answer for e in examples] == ["0.75", "\\{1, {2}\\}"]  # empty column: back to \boxed


def test_gsm8k_schema(tmp_path: Path) -> None:
    examples, report = load_examples(str(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)), "train")
    assert report.schema == "gsm8k"
    assert [e.answer for e in examples] == ["72", "2000"]
    assert examples[0].reasoning == "In May she sold 48/2 = 24 clips.\nIn total 48+24 = 72."
    assert "<<" not in examples[1].reasoning and "####" not in examples[1].reasoning


def test_r1_schema(tmp_path: Path) -> None:
    examples, report = load_examples(str(write_jsonl(tmp_path / "r1.jsonl", R1_ROWS)), "train")
    assert report.schema == "r1"
    assert [(e.problem, e.reasoning, e.answer) for e in examples] == [
        ("What is 3 * 4?", "3 * 4 = 12", "12"),
        ("What is 2 + 5?", "2 + 5 = 7", "7"),  # chat-format prompt: the user message
    ]


def test_builtin_schema_from_file(tmp_path: Path) -> None:
    examples, report = load_examples(str(write_jsonl(tmp_path / "b.jsonl", BUILTIN_ROWS[:1])), "train")
    assert report.schema == "builtin"
    assert examples == [Example("Compute 1 + 2.", "1 + 2 = 3", "3", f"{tmp_path / 'b.jsonl'}:train:row 0")]


def test_builtin_task() -> None:
    examples, report = load_examples("builtin:arith", "test", max_samples=5)
    assert report.schema == "builtin" and len(examples) == 5
    for ex in examples:
        assert ex.source.startswith("builtin:arith:test:row ")
        # "Compute a + b." with a column-by-column trace (one line per digit) and the true sum.
        a, b = (int(t) for t in ex.problem.removeprefix("Compute ").removesuffix(".").split(" + "))
        assert int(ex.answer) == a + b
        assert len(ex.reasoning.splitlines()) == max(len(str(a)), len(str(b)))
    train, _ = load_examples("builtin:arith", "train", max_samples=50)
    assert not {e.problem for e in train} & {e.problem for e in examples}


def test_builtin_unknown_task_or_split() -> None:
    with pytest.raises(DataError, match="builtin:nope"):
        load_examples("builtin:nope", "train")
    with pytest.raises(DataError, match="'validation'"):
        load_examples("builtin:arith", "validation")


def test_builtin_rows_with_numbers(tmp_path: Path) -> None:
    path = tmp_path / "b.parquet"
    datasets.Dataset.from_list(BUILTIN_ROWS).to_parquet(str(path))
    examples, _ = load_examples(str(path), "anything")  # a single file serves every split
    assert [e.answer for e in examples] == ["3", "-2"]
    numeric = [{**r, "answer": int(r["answer"])} for r in BUILTIN_ROWS]  # numbers become text
    examples, _ = load_examples(str(write_jsonl(tmp_path / "n.jsonl", numeric)), "train")
    assert [e.answer for e in examples] == ["3", "-2"]


def test_unknown_schema(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello", "label": 1}])
    with pytest.raises(DataError) as err:
        load_examples(str(path), "train")
    message = str(err.value)
    assert str(path) in message and "label, text" in message
    for schema in ("builtin", "gsm8k", "r1", "math"):
        assert schema in message
    assert detect_schema(["problem", "solution", "level"]) == "math"


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def test_json_array_and_parquet_files(tmp_path: Path) -> None:
    json_path = tmp_path / "gsm.json"
    json_path.write_text(json.dumps(GSM8K_ROWS))
    parquet_path = tmp_path / "math.parquet"
    datasets.Dataset.from_list(MATH_ROWS).to_parquet(str(parquet_path))
    assert [e.answer for e in load_examples(str(json_path), "train")[0]] == ["72", "2000"]
    assert [e.answer for e in load_examples(str(parquet_path), "train")[0]] == [
        "\\frac{3}{4}",
        "\\{1, {2}\\}",
    ]


def test_split_placeholder(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS[1:])
    pattern = str(tmp_path / "{split}.jsonl")
    train, _ = load_examples(pattern, "train")
    test, _ = load_examples(pattern, "test")
    assert (len(train), len(test)) == (2, 1)
    assert test[0].source == f"{tmp_path / 'test.jsonl'}:test:row 0"
    with pytest.raises(DataError, match="validation.jsonl: no such file"):
        load_examples(pattern, "validation")


def test_saved_dataset_dict(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(MATH_ROWS), "test": datasets.Dataset.from_list(MATH_ROWS[:1])}
    ).save_to_disk(str(folder))
    train, report = load_examples(str(folder), "train")
    test, _ = load_examples(str(folder), "test")
    assert (len(train), len(test), report.schema) == (2, 1, "math")
    assert test[0].source == f"{folder}:test:row 0"
    with pytest.raises(DataError, match=r"no split 'validation'; splits: train, test"):
        load_examples(str(folder), "validation")


def test_saved_single_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "one"
    datasets.Dataset.from_list(R1_ROWS[:1]).save_to_disk(str(folder))
    examples, _ = load_examples(str(folder), "test")
    assert [e.answer for e in examples] == ["12"]


def test_folder_goes_through_load_dataset(tmp_path: Path) -> None:
    # A folder of <split>.jsonl files is what datasets.load_dataset(<dir>, split=...) reads: the same call
    # as for a hub id.
    folder = tmp_path / "repo"
    write_jsonl(folder / "train.jsonl", GSM8K_ROWS)
    write_jsonl(folder / "test.jsonl", GSM8K_ROWS[:1])
    train, _ = load_examples(str(folder), "train")
    test, _ = load_examples(str(folder), "test")
    assert [e.answer for e in train] == ["72", "2000"]
    assert [e.answer for e in test] == ["72"]
    with pytest.raises(DataError, match=rf"cannot load dataset {folder} \(split 'dev'\)"):
        load_examples(str(folder), "dev")


def test_missing_unsupported_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothere.jsonl: no such file or folder"):
        load_examples(str(tmp_path / "nothere.jsonl"), "train")
    csv = tmp_path / "data.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(DataError, match=r"data.csv: unsupported file type '.csv'"):
        load_examples(str(csv), "train")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    with pytest.raises(DataError, match=rf"cannot load dataset {broken}"):
        load_examples(str(broken), "train")


# --------------------------------------------------------------------------------------------------
# Bad rows, skipping, max_samples
# --------------------------------------------------------------------------------------------------

BAD_ROWS = [
    ("math", {"problem": "p", "solution": "no box here"}, "solution", "no complete \\boxed"),
    ("math", {"problem": "p", "solution": "$\\boxed{\\frac{1}{2}$"}, "solution", "no complete \\boxed"),
    ("math", {"problem": "", "solution": "\\boxed{1}"}, "problem", "is empty"),
    ("gsm8k", {"question": "q", "answer": "The answer is 5"}, "answer", "no '#### <final answer>'"),
    ("gsm8k", {"question": "q", "answer": "so\n#### "}, "answer", "nothing after '####'"),
    ("gsm8k", {"question": None, "answer": "x\n#### 5"}, "question", "is missing"),
    ("r1", {"prompt": "p", "solution": "<think>r</think> 5"}, "solution", "exactly one <answer>"),
    ("r1", {"prompt": "p", "solution": "<answer>5</answer>"}, "solution", "exactly one <think>"),
    ("math", {"problem": "p", "solution": "no box", "answer": ""}, "solution", "no complete \\boxed"),
    ("math", {"problem": "p", "solution": "s", "answer": "notfound"}, "answer", "not a verifiable final"),
    ("builtin", {"question": "q", "reasoning": "r", "answer": "  "}, "answer", "is empty"),
    (
        "builtin",
        {"question": "q", "reasoning": "r", "answer": "<answer>1</answer>"},
        "answer",
        "reserved tag",
    ),
    ("problem_answer", {"problem": "p", "answer": ""}, "answer", "is empty"),
    ("problem_answer", {"problem": "p", "answer": "proof"}, "answer", "'proof', not a verifiable final"),
    ("problem_answer", {"problem": None, "answer": "3"}, "problem", "is missing"),
    (
        "verl",
        {
            "prompt": [{"role": "system", "content": "s"}],
            "reward_model": {"ground_truth": "1", "style": "rule"},
        },
        "prompt",
        "without a non-empty user message",
    ),
    (
        "verl",
        {
            "prompt": [{"role": "user", "content": "q"}],
            "reward_model": {"ground_truth": None, "style": "rule"},
        },
        "reward_model.ground_truth",
        "is missing",
    ),
]
GOOD_ROW = {
    "math": MATH_ROWS[0],
    "gsm8k": GSM8K_ROWS[0],
    "r1": R1_ROWS[0],
    "builtin": BUILTIN_ROWS[0],
    "problem_answer": {"problem": "What is 3 * 9?", "answer": "27"},
    "verl": {
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "reward_model": {"ground_truth": "4", "style": "rule"},
    },
}


@pytest.mark.parametrize(("schema", "bad", "field", "problem"), BAD_ROWS)
def test_bad_row_error_names_file_split_row_and_field(
    tmp_path: Path, schema: str, bad: dict, field: str, problem: str
) -> None:
    good = GOOD_ROW[schema]
    if "answer" in bad and schema == "math":
        good = {**good, "answer": "0.75"}  # the same columns in every row
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, bad])
    with pytest.raises(DataError) as err:
        load_examples(str(path), "train")
    message = str(err.value)
    assert f"{path}:train:row 2 ({schema} schema)" in message
    assert f"field '{field}'" in message
    assert problem in message
    assert "--skip_bad_rows" in message
    examples, report = load_examples(str(path), "train", skip_bad_rows=True)
    assert (len(examples), report.skipped) == (2, 1)


# Rows that GRPO and evaluation can use but SFT cannot: their worked solution is missing or empty.
NO_SOLUTION_ROWS = [
    (
        "builtin",
        BUILTIN_ROWS[0],
        {"question": "q", "reasoning": "  ", "answer": "1"},
        "reasoning",
        "is empty",
    ),
    (
        "math",
        {**MATH_ROWS[0], "answer": "0.75"},
        {"problem": "p", "solution": "", "answer": "3", "level": "Level 1"},
        "solution",
        "is empty",
    ),
    ("gsm8k", GSM8K_ROWS[0], {"question": "q", "answer": "#### 5"}, "answer", "no reasoning before '####'"),
    (
        "r1",
        R1_ROWS[0],
        {"prompt": "p", "solution": "<think> </think><answer>5</answer>"},
        "solution",
        "empty",
    ),
]


@pytest.mark.parametrize(("schema", "good", "bad", "field", "problem"), NO_SOLUTION_ROWS)
def test_rows_without_a_solution_serve_grpo_but_not_sft(
    tmp_path: Path, schema: str, good: dict, bad: dict, field: str, problem: str
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad])
    examples, report = load_examples(str(path), "train")
    assert report.schema == schema and len(examples) == 2 and examples[1].reasoning == ""
    assert reward_function(f"<think>r</think><answer>{examples[1].answer}</answer>", examples[1].answer) == 10
    with pytest.raises(DataError) as err:
        load_examples(str(path), "train", require_solutions=True)
    assert f"{path}:train:row 1 ({schema} schema): field '{field}'" in str(err.value)
    assert problem in str(err.value)


def test_skip_bad_rows_counts_reasons(tmp_path: Path) -> None:
    rows = [
        GSM8K_ROWS[0],
        {"question": "q", "answer": "no marker"},
        GSM8K_ROWS[1],
        {"question": "", "answer": "r\n#### 1"},
        {"question": "q2", "answer": "also none"},
    ]
    examples, report = load_examples(
        str(write_jsonl(tmp_path / "g.jsonl", rows)), "train", skip_bad_rows=True
    )
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["row 0", "row 2"]
    assert (report.rows, report.kept, report.skipped) == (5, 2, 3)
    assert report.skipped_reasons == {
        "field 'answer' has no '#### <final answer>' line": 2,
        "field 'question' is empty": 1,
    }
    assert "3 skipped" in report.summary()


def test_all_rows_bad_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": ""}])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(str(path), "train", skip_bad_rows=True)


def test_a_schema_refusing_every_row_names_itself_the_reason_and_the_flags(tmp_path: Path) -> None:
    # Question + final answer read as GSM8K on purpose: with --skip_bad_rows every row is refused, and the
    # error says which schema refused them, why (the first row) and the flags that read the file.
    path = write_jsonl(tmp_path / "qa.jsonl", QUESTION_ANSWER_ROWS)
    for skip in (True, False):
        with pytest.raises(DataError) as err:
            load_examples(str(path), "test", schema="gsm8k", skip_bad_rows=skip)
        message = str(err.value)
        assert "gsm8k schema" in message and "no '#### <final answer>' line" in message
        assert "--dataset_schema problem_answer --problem_column question --answer_column answer" in message
        if skip:
            assert "refused every row, first row 0: field 'answer'" in message


def test_max_samples_keeps_first_good_examples(tmp_path: Path) -> None:
    rows = [{"question": "q", "answer": "none"}] + GSM8K_ROWS + [{"question": "late bad row", "answer": ""}]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    examples, report = load_examples(str(path), "train", skip_bad_rows=True, max_samples=1)
    assert [e.answer for e in examples] == ["72"]
    assert (report.rows, report.kept, report.skipped) == (2, 1, 1)
    # Reading stops at max_samples, so the bad last row is never reached even without skipping.
    examples, _ = load_examples(str(write_jsonl(tmp_path / "h.jsonl", rows[1:])), "train", max_samples=2)
    assert len(examples) == 2
    with pytest.raises(DataError, match="max_samples must be a positive integer"):
        load_examples(str(path), "train", max_samples=0)


# --------------------------------------------------------------------------------------------------
# DataArgs
# --------------------------------------------------------------------------------------------------


def test_data_args_as_flags(tmp_path: Path) -> None:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(DataArgs)
    (args,) = parser.parse_args_into_dataclasses(
        args=["--dataset_name", "builtin:arith", "--skip_bad_rows", "true", "--max_train_samples", "3"]
    )
    assert args == DataArgs(dataset_name="builtin:arith", skip_bad_rows=True, max_train_samples=3)
    assert (args.dataset_train_split, args.dataset_test_split, args.max_eval_samples) == (
        "train",
        "test",
        None,
    )
    assert args.dataset_config is None
    assert all(action.help for action in parser._actions if action.dest != "help")
    train, _ = args.load_train()
    evals, _ = DataArgs(dataset_name="builtin:arith", max_eval_samples=2).load_eval()
    assert (len(train), len(evals)) == (3, 2)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(args=["--skip_bad_rows", "true"])  # --dataset_name is required
    with pytest.raises(DataError, match="--max_eval_samples must be a positive integer"):
        DataArgs(dataset_name="builtin:arith", max_eval_samples=-1)


def test_data_args_schema_and_column_flags() -> None:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(DataArgs)
    flags = ["--dataset_name", "a.jsonl:0.7,org/set:0.3", "--dataset_schema", "problem_answer"]
    flags += ["--problem_column", "question", "--answer_column", "final", "--solution_column", "worked"]
    (args,) = parser.parse_args_into_dataclasses(args=flags)
    assert (args.dataset_schema, args.problem_column, args.answer_column, args.solution_column) == (
        "problem_answer",
        "question",
        "final",
        "worked",
    )
    assert DataArgs(dataset_name="x.jsonl").dataset_schema == "auto"
    with pytest.raises(SystemExit):  # argparse lists the choices
        parser.parse_args_into_dataclasses(args=["--dataset_name", "x.jsonl", "--dataset_schema", "csv"])
    with pytest.raises(DataError, match="--dataset_schema must be one of auto, builtin, verl"):
        DataArgs(dataset_name="x.jsonl", dataset_schema="csv")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="--answer_column must be a column name"):
        DataArgs(dataset_name="x.jsonl", answer_column=" ")
    with pytest.raises(DataError, match="every dataset a ':<weight>' or none"):
        DataArgs(dataset_name="a.jsonl:0.7,b.jsonl")


# --------------------------------------------------------------------------------------------------
# The public math sets' shapes (small files written here, in each set's own columns and types)
# --------------------------------------------------------------------------------------------------


@dataclass
class Shape:
    file: str  # .jsonl or .parquet, as the set is distributed
    rows: list[dict[str, Any]]
    schema: str
    columns: dict[str, str]
    answers: list[str]  # Example.answer of each kept row
    written: list[list[str]]  # answers a model may write for each kept row, all worth 10
    skip_bad_rows: bool = False


SHAPES: dict[str, Shape] = {
    # AI-MO/aimo-validation-aime (id, problem, solution, answer, url) with the `question` copy of the issue's
    # file: question + answer must not make it GSM8K; the explicit answer wins over the solution's \boxed.
    "aime": Shape(
        "aime.jsonl",
        [
            {
                "id": 60,
                "problem": "Find the remainder when $2^{10}$ is divided by $1000$.",
                "solution": "Since $2^{10} = 1024$, the remainder is $\\boxed{024}$.",
                "answer": "24",
                "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_1",
                "question": "Find the remainder when $2^{10}$ is divided by $1000$.",
            },
            {
                "id": 61,
                "problem": "How many positive divisors does $60$ have?",
                "solution": "$60 = 2^2 \\cdot 3 \\cdot 5$ has $3 \\cdot 2 \\cdot 2 = \\boxed{12}$ divisors.",
                "answer": "012",
                "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_2",
                "question": "How many positive divisors does $60$ have?",
            },
        ],
        "math",
        {"problem": "problem", "solution": "solution", "answer": "answer"},
        ["24", "012"],
        [["24", "024", "\\boxed{24}"], ["12", "012"]],
    ),
    # AI-MO/aimo-validation-amc: a float64 answer and no worked solution.
    "amc": Shape(
        "amc.parquet",
        [
            {
                "id": 0,
                "problem": "What is $3^3$?",
                "answer": 27.0,
                "url": "https://artofproblemsolving.com/wiki/index.php/2023_AMC_12A_Problems/Problem_1",
                "question": "What is $3^3$?",
            },
            {
                "id": 1,
                "problem": "What is half of one?",
                "answer": 0.5,
                "url": "https://artofproblemsolving.com/wiki/index.php/2023_AMC_12A_Problems/Problem_2",
                "question": "What is half of one?",
            },
        ],
        "problem_answer",
        {"problem": "problem", "answer": "answer"},
        ["27", "0.5"],
        [["27", "27.0", "$27$"], ["0.5", "\\frac{1}{2}", "1/2"]],
    ),
    # agentica-org/DeepScaleR-Preview-Dataset: problem, answer, solution (sometimes empty).
    "deepscaler": Shape(
        "deepscaler.jsonl",
        [
            {"problem": "Simplify $\\frac{6}{8}$.", "answer": "\\frac{3}{4}", "solution": ""},
            {
                "problem": "Solve $x + 1 = 7$.",
                "answer": "6",
                "solution": "Subtract 1: $x = \\boxed{6}$.",
            },
        ],
        "math",
        {"problem": "problem", "solution": "solution", "answer": "answer"},
        ["\\frac{3}{4}", "6"],
        [["\\frac{3}{4}", "0.75", "3/4"], ["6", "x = 6"]],
    ),
    # AI-MO/NuminaMath-CoT: source, problem, solution (answer in \boxed), messages.
    "numinamath-cot": Shape(
        "numina_cot.parquet",
        [
            {
                "source": "olympiads",
                "problem": "Find $\\sin 60^\\circ$.",
                "solution": "It is $\\boxed{\\frac{\\sqrt{3}}{2}}$.",
                "messages": [
                    {"role": "user", "content": "Find $\\sin 60^\\circ$."},
                    {"role": "assistant", "content": "It is $\\boxed{\\frac{\\sqrt{3}}{2}}$."},
                ],
            },
            {
                "source": "cn_k12",
                "problem": "Compute $2 + 3$.",
                "solution": "$2 + 3 = \\boxed{5}$",
                "messages": [
                    {"role": "user", "content": "Compute $2 + 3$."},
                    {"role": "assistant", "content": "$2 + 3 = \\boxed{5}$"},
                ],
            },
        ],
        "math",
        {"problem": "problem", "solution": "solution"},
        ["\\frac{\\sqrt{3}}{2}", "5"],
        [["\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", "\\sqrt{3}/2"], ["5"]],
    ),
    # AI-MO/NuminaMath-1.5: an `answer` column that says "proof" where there is no final answer.
    "numinamath-1.5": Shape(
        "numina15.jsonl",
        [
            {
                "problem": "Prove that $\\sqrt{2}$ is irrational.",
                "solution": "Suppose $\\sqrt{2} = p/q$ in lowest terms ...",
                "answer": "proof",
                "problem_type": "Number Theory",
                "question_type": "proof",
                "problem_is_valid": "Yes",
                "solution_is_valid": "Yes",
                "source": "olympiads",
                "synthetic": False,
            },
            {
                "problem": "What is $3 \\times 4$?",
                "solution": "$3 \\times 4 = 12$.",
                "answer": "12",
                "problem_type": "Algebra",
                "question_type": "math-word-problem",
                "problem_is_valid": "Yes",
                "solution_is_valid": "Yes",
                "source": "cn_k12",
                "synthetic": False,
            },
        ],
        "math",
        {"problem": "problem", "solution": "solution", "answer": "answer"},
        ["12"],
        [["12"]],
        skip_bad_rows=True,
    ),
    # open-r1/OpenR1-Math-220k: problem, solution, answer and the generation columns.
    "openr1-math": Shape(
        "openr1.parquet",
        [
            {
                "problem": "A coin is tossed twice. What is the probability of two heads?",
                "solution": "Each toss is heads with probability $\\frac{1}{2}$, so $\\boxed{\\frac{1}{4}}$.",
                "answer": "\\frac{1}{4}",
                "problem_type": "Combinatorics",
                "question_type": "math-word-problem",
                "source": "olympiads",
                "uuid": "5d8c2b2e-0000-5000-8000-000000000001",
                "is_reasoning_complete": [True, True],
                "generations": ["<think>1/2 * 1/2</think> 1/4", "<think>...</think> 0.25"],
                "correctness_math_verify": [True, True],
                "correctness_llama": None,
                "finish_reasons": ["stop", "stop"],
                "correctness_count": 2,
                "messages": [
                    {
                        "role": "user",
                        "content": "A coin is tossed twice. What is the probability of two heads?",
                    },
                    {"role": "assistant", "content": "<think>1/2 * 1/2</think> 1/4"},
                ],
            }
        ],
        "math",
        {"problem": "problem", "solution": "solution", "answer": "answer"},
        ["\\frac{1}{4}"],
        [["\\frac{1}{4}", "0.25", "1/4"]],
    ),
    # BytedTsinghua-SIA/DAPO-Math-17k: verl's RL parquet layout, the instructions inside the user message.
    "dapo-math-17k": Shape(
        "dapo.parquet",
        [
            {
                "data_source": "math_dapo",
                "prompt": [
                    {
                        "content": "Solve the following math problem step by step.\n\nWhat is $17 \\cdot 2$?\n\n"
                        'Remember to put your answer on its own line after "Answer:".',
                        "role": "user",
                    }
                ],
                "ability": "MATH",
                "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"},
            }
        ],
        "verl",
        {"problem": "prompt", "answer": "reward_model"},
        ["34"],
        [["34", "\\boxed{34}"]],
    ),
    # verl's examples/data_preprocess/gsm8k.py output: a system message too, extra_info with split/index.
    "verl-gsm8k": Shape(
        "verl_gsm8k.parquet",
        [
            {
                "data_source": "openai/gsm8k",
                "prompt": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Natalia sold 48 clips and 24 more. How many? Let's think."},
                ],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": "72"},
                "extra_info": {"split": "train", "index": 0},
            }
        ],
        "verl",
        {"problem": "prompt", "answer": "reward_model"},
        ["72"],
        [["72", "\\$72"]],
    ),
    # verl rows whose ground truth is a list (several answers, as "find all x" asks).
    "verl-list": Shape(
        "verl_list.jsonl",
        [
            {
                "data_source": "synthetic",
                "prompt": [{"role": "user", "content": "Find all $x$ with $(x-3)(x-5)=0$."}],
                "reward_model": {"ground_truth": [3, 5], "style": "rule"},
            }
        ],
        "verl",
        {"problem": "prompt", "answer": "reward_model"},
        ["3, 5"],
        [["3, 5", "3,5"]],
    ),
    "gsm8k": Shape(
        "gsm8k.jsonl",
        GSM8K_ROWS,
        "gsm8k",
        {"problem": "question", "solution": "answer"},
        ["72", "2000"],
        [["72"], ["2000", "2,000"]],
    ),
    "competition-math": Shape(
        "math.parquet",
        MATH_ROWS,
        "math",
        {"problem": "problem", "solution": "solution"},
        ["\\frac{3}{4}", "\\{1, {2}\\}"],
        [["\\frac{3}{4}", "0.75"], ["\\{1, {2}\\}"]],
    ),
    "r1-guide": Shape(
        "r1.jsonl",
        R1_ROWS,
        "r1",
        {"problem": "prompt", "solution": "solution"},
        ["12", "7"],
        [["12"], ["7"]],
    ),
}


def write_shape(folder: Path, shape: Shape) -> Path:
    path = folder / shape.file
    if path.suffix == ".parquet":
        datasets.Dataset.from_list(shape.rows).to_parquet(str(path))
        return path
    return write_jsonl(path, shape.rows)


@pytest.mark.parametrize("name", list(SHAPES))
def test_public_math_set_shapes_load_and_their_gold_answers_score_10(tmp_path: Path, name: str) -> None:
    shape = SHAPES[name]
    path = write_shape(tmp_path, shape)
    args = DataArgs(dataset_name=str(path), skip_bad_rows=shape.skip_bad_rows)
    examples, report = args.load_train()
    assert (report.schema, report.columns) == (shape.schema, shape.columns)
    assert [e.answer for e in examples] == shape.answers
    assert len(args.load_eval()[0]) == len(examples)  # the same path serves evaluation
    for example, written in zip(examples, shape.written, strict=True):
        for answer in written:
            completion = f"<think>\nworking\n</think>\n<answer>{answer}</answer>"
            assert reward_function(completion, example.answer) == 10.0, (name, answer, example.answer)
        assert reward_function("<think>w</think><answer>99991</answer>", example.answer) == 1.0
        assert example.problem and "<answer>" not in example.problem
    if name == "dapo-math-17k":  # the user message, verbatim: the problem and its instructions
        assert examples[0].problem == shape.rows[0]["prompt"][0]["content"]
    if name == "verl-gsm8k":  # the last user message; the system message is not the problem
        assert examples[0].problem.startswith("Natalia sold 48 clips")
    if shape.skip_bad_rows:
        assert report.skipped_reasons == {"field 'answer' is 'proof', not a verifiable final answer": 1}


@pytest.mark.parametrize(
    ("columns", "schema"),
    [
        (["id", "problem", "solution", "answer", "url", "question"], "math"),  # AIME: not GSM8K
        (["id", "problem", "answer", "url", "question"], "problem_answer"),  # AMC
        (["id", "problem", "solution", "answer", "url", "year"], "math"),  # HuggingFaceH4/aime_2024
        (["problem", "answer", "solution"], "math"),  # DeepScaleR
        (["source", "problem", "solution", "messages"], "math"),  # NuminaMath-CoT
        (["problem", "solution", "answer", "problem_type", "question_type", "source", "uuid"], "math"),
        (["data_source", "prompt", "ability", "reward_model", "extra_info"], "verl"),  # DAPO-Math-17k
        (["prompt", "reward_model"], "verl"),
        (["question", "answer"], "gsm8k"),
        (["prompt", "solution"], "r1"),
        (["question", "reasoning", "answer"], "builtin"),
    ],
)
def test_detection_prefers_an_explicit_answer_column(columns: list[str], schema: str) -> None:
    assert detect_schema(columns) == schema


def test_detection_error_lists_every_schema_and_the_column_flags(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello", "label": 1}])
    with pytest.raises(DataError) as err:
        load_examples(str(path), "train")
    message = str(err.value)
    assert "problem_answer: problem, answer" in message and "verl: prompt, reward_model" in message
    assert "--problem_column" in message


QUESTION_ANSWER_ROWS = [  # an evaluation set with question + bare answer (e.g. AMC 2023 copies)
    {"id": 0, "question": "What is $3^3$?", "answer": "27"},
    {"id": 1, "question": "What is $2^5$?", "answer": "32"},
]


def test_question_answer_set_is_read_by_its_values(tmp_path: Path) -> None:
    # question + answer without GSM8K's "#### N" line is a question with its final answer.
    path = write_jsonl(tmp_path / "amc23.jsonl", QUESTION_ANSWER_ROWS)
    for schema, column in (("auto", None), ("auto", "question"), ("problem_answer", "question")):
        examples, report = DataArgs(
            dataset_name=str(path), dataset_schema=schema, problem_column=column
        ).load_eval()
        assert report.schema == "problem_answer" and report.columns == {
            "problem": "question",
            "answer": "answer",
        }
        assert [(e.problem, e.answer) for e in examples] == [
            ("What is $3^3$?", "27"),
            ("What is $2^5$?", "32"),
        ]


def test_column_flags_map_any_column_names(tmp_path: Path) -> None:
    rows = [{"query": "What is 6 * 7?", "worked": "6 * 7 = 42", "gold": 42, "meta": "x"}]
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    flags = {"problem_column": "query", "solution_column": "worked", "answer_column": "gold"}
    examples, report = load_examples(str(path), "train", require_solutions=True, **flags)
    assert report.schema == "math"
    assert report.columns == {"problem": "query", "solution": "worked", "answer": "gold"}
    assert (examples[0].problem, examples[0].reasoning, examples[0].answer) == (
        "What is 6 * 7?",
        "6 * 7 = 42",
        "42",
    )
    # verl's layout with the messages under another name.
    verl = [{"messages": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": "1"}}]
    path = write_jsonl(tmp_path / "verl.jsonl", verl)
    examples, report = load_examples(str(path), "train", schema="verl", problem_column="messages")
    assert (report.columns, examples[0].problem, examples[0].answer) == (
        {"problem": "messages", "answer": "reward_model"},
        "q",
        "1",
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"answer_column": "final"}, "--answer_column 'final' is not a column; columns found: answer, id"),
        ({"schema": "math"}, "--dataset_schema math needs the column(s) solution; columns found: answer, id"),
        ({"schema": "problem_answer", "solution_column": "answer"}, "problem_answer schema has no solution"),
        ({"problem_column": "id", "answer_column": "id", "solution_column": "id"}, None),
        ({"schema": "gsm8k", "answer_column": "answer"}, "the gsm8k schema has no answer field"),
    ],
)
def test_schema_and_column_flag_errors(tmp_path: Path, kwargs: dict, message: str | None) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", QUESTION_ANSWER_ROWS)
    if message is None:  # every field from the id column: valid columns, but no usable text answer
        examples, report = load_examples(str(path), "train", **kwargs)
        assert report.schema == "math" and [e.answer for e in examples] == ["0", "1"]
        return
    with pytest.raises(DataError, match=re.escape(message)):
        load_examples(str(path), "train", **kwargs)


def test_schema_and_columns_are_logged_once_per_split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_shape(tmp_path, SHAPES["aime"])
    args = DataArgs(dataset_name=str(path))
    with caplog.at_level(logging.INFO, logger="trainer.r1.data"):
        args.load_train()
        args.load_eval()
    lines = [r.getMessage() for r in caplog.records if "schema:" in r.getMessage()]
    columns = "math schema: problem='problem', solution='solution', answer='answer'"
    assert lines == [f"{path}:train: {columns}", f"{path}:test: {columns}"]


@pytest.mark.parametrize(
    ("shape", "kwargs", "columns"),
    [
        ("amc", {}, "answer, id, problem, question, url"),
        ("dapo-math-17k", {}, "ability, data_source, extra_info, prompt, reward_model"),
        ("deepscaler", {"schema": "problem_answer"}, "answer, problem, solution"),
    ],
)
def test_sft_refuses_datasets_without_worked_solutions(
    tmp_path: Path, shape: str, kwargs: dict, columns: str
) -> None:
    path = write_shape(tmp_path, SHAPES[shape])
    with pytest.raises(DataError) as err:
        load_examples(str(path), "train", require_solutions=True, **kwargs)
    assert f"{path}:train: SFT needs worked solutions; this dataset has none: columns {columns}" in str(
        err.value
    )
    with pytest.raises(DataError, match="SFT needs worked solutions"):
        DataArgs(dataset_name=str(path), dataset_schema=kwargs.get("schema", "auto")).load_train(
            require_solutions=True
        )
    assert load_examples(str(path), "train", **kwargs)[0]  # GRPO and evaluation read it


def test_answer_values_numbers_lists_and_bad_types(tmp_path: Path) -> None:
    rows = [
        {"problem": "a", "answer": 27.0},
        {"problem": "b", "answer": -3.0},
        {"problem": "c", "answer": 2.5},
        {"problem": "d", "answer": 12},
    ]
    examples, _ = load_examples(str(write_jsonl(tmp_path / "n.jsonl", rows)), "train")
    assert [e.answer for e in examples] == ["27", "-3", "2.5", "12"]
    lists = [{"problem": "a", "answer": ["1", " 2 "]}, {"problem": "b", "answer": ["x"]}]
    examples, _ = load_examples(str(write_jsonl(tmp_path / "l.jsonl", lists)), "train")
    assert [e.answer for e in examples] == ["1, 2", "x"]
    for bad, problem in [
        ({"problem": "a", "answer": []}, "is empty"),
        ({"problem": "a", "answer": [""]}, "is a list with an empty item"),
        ({"problem": "a", "answer": [["1"]]}, "is a list with an item that is not text or a number"),
    ]:
        path = write_jsonl(tmp_path / "bad.jsonl", [bad])
        with pytest.raises(
            DataError, match=re.escape(f"{path}:train:row 0 (problem_answer schema): ")
        ) as err:
            load_examples(str(path), "train")
        assert f"field 'answer' {problem}" in str(err.value)
    path = tmp_path / "inf.parquet"
    datasets.Dataset.from_list([{"problem": "a", "answer": float("inf")}]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"field 'answer' is not a finite number \(inf\)"):
        load_examples(str(path), "train")


# --------------------------------------------------------------------------------------------------
# Mixtures
# --------------------------------------------------------------------------------------------------


def test_parse_sources(tmp_path: Path) -> None:
    assert parse_sources("openai/gsm8k") == [Source("openai/gsm8k")]
    assert parse_sources("builtin:arith") == [Source("builtin:arith")]
    assert parse_sources("data/{split}.jsonl:0.7, org/set:0.3,builtin:arith:1") == [
        Source("data/{split}.jsonl", Fraction(7, 10)),
        Source("org/set", Fraction(3, 10)),
        Source("builtin:arith", Fraction(1)),
    ]
    assert parse_sources("a.jsonl,b.jsonl") == [Source("a.jsonl"), Source("b.jsonl")]
    odd = tmp_path / "v1,v2.jsonl:2"  # an existing path is taken whole
    odd.write_text("")
    assert parse_sources(str(odd)) == [Source(str(odd))]
    for spec, message in [
        ("a.jsonl:0.7,b.jsonl", "give every dataset a ':<weight>' or none of them"),
        ("a.jsonl:0,b.jsonl:1", "the weight of 'a.jsonl' must be > 0"),
        ("a.jsonl,,b.jsonl", "an empty entry"),
        ("a.jsonl:1,a.jsonl:2", "'a.jsonl' is listed twice"),
    ]:
        with pytest.raises(DataError, match=re.escape(message)):
            parse_sources(spec)


def test_parse_sources_with_a_config_per_source(tmp_path: Path) -> None:
    assert parse_sources("openai/gsm8k@main:0.7,EleutherAI/hendrycks_math@algebra:0.3") == [
        Source("openai/gsm8k", Fraction(7, 10), "main"),
        Source("EleutherAI/hendrycks_math", Fraction(3, 10), "algebra"),
    ]
    both = parse_sources("org/math@algebra,org/math@geometry,org/other")  # one set, two configs
    assert [(s.name, s.config, s.label) for s in both] == [
        ("org/math", "algebra", "org/math@algebra"),
        ("org/math", "geometry", "org/math@geometry"),
        ("org/other", None, "org/other"),
    ]
    at = tmp_path / "v@2.jsonl"  # an existing path is taken whole, '@' included
    at.write_text("")
    assert parse_sources(f"{at}:1,org/set@main:1") == [
        Source(str(at), Fraction(1)),
        Source("org/set", Fraction(1), "main"),
    ]
    for spec, message in [
        ("org/set@:1,b.jsonl:1", "'org/set@' is not <dataset>@<config>"),
        ("@main", "'@main' is not <dataset>@<config>"),
        ("org/set@main,org/set@main", "'org/set@main' is listed twice"),
    ]:
        with pytest.raises(DataError, match=re.escape(message)):
            parse_sources(spec)
    with pytest.raises(
        DataError, match=re.escape("builtin:arith@x: a dataset config applies to hub datasets")
    ):
        load_examples("builtin:arith@x", "test")


def test_a_config_per_source_loads_that_config(tmp_path: Path) -> None:
    """`<folder>@<config>` goes through datasets.load_dataset(folder, config) as a hub id does (the hub
    cannot be reached here; a local dataset folder whose README declares two configs stands in for it)."""
    folder = tmp_path / "sums"
    for config, pairs in (("small", [(1, 1)]), ("big", [(2, 2), (3, 3)])):
        (folder / config).mkdir(parents=True)
        rows = [json.dumps({"problem": f"Compute {a} + {b}.", "answer": str(a + b)}) for a, b in pairs]
        (folder / config / "test.jsonl").write_text("\n".join(rows) + "\n")
    configs = "".join(
        f"- config_name: {c}\n  data_files:\n  - split: test\n    path: {c}/test.jsonl\n"
        for c in ("small", "big")
    )
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    examples, report = load_examples(f"{folder}@small,{folder}@big", "test")
    assert [(e.problem, e.dataset) for e in examples] == [
        ("Compute 1 + 1.", f"{folder}@small"),
        ("Compute 2 + 2.", f"{folder}@big"),
        ("Compute 3 + 3.", f"{folder}@big"),
    ]
    assert examples[1].source == f"{folder}@big:test:row 0"
    assert report.mixture == {f"{folder}@small": 1, f"{folder}@big": 2}
    # --dataset_config applies where a source names none; a source's own config wins.
    examples, _ = load_examples(f"{folder},{folder}@small", "test", config="big")
    assert [e.dataset for e in examples] == [str(folder), str(folder), f"{folder}@small"]


@pytest.mark.parametrize(
    ("sizes", "weights", "limit", "counts"),
    [
        ([100, 500], ["0.7", "0.3"], None, [99, 43]),  # the 100 rows bound the mixture at 142
        ([500, 100], ["0.7", "0.3"], None, [233, 100]),
        ([10, 10], ["1", "1"], None, [10, 10]),
        ([3, 5], None, None, [3, 5]),  # no weights: everything
        ([3, 5], None, 4, [2, 2]),  # a limit is shared by size; ties go to the earlier source
        ([100, 500], ["1", "1"], 10, [5, 5]),
        ([100, 500], ["0.999", "0.001"], None, [100, 0]),
    ],
)
def test_mixture_counts(
    sizes: list[int], weights: list[str] | None, limit: int | None, counts: list[int]
) -> None:
    fractions = None if weights is None else [Fraction(w) for w in weights]
    assert mixture_counts(sizes, fractions, limit) == counts


def _numbered_gsm8k(n: int) -> list[dict]:
    return [{"question": f"g{i}", "answer": f"so\n#### {i}"} for i in range(n)]


def _numbered_math(n: int) -> list[dict]:
    return [{"problem": f"m{i}", "solution": f"$\\boxed{{{i}}}$"} for i in range(n)]


def test_weighted_mixture_for_training(tmp_path: Path) -> None:
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", _numbered_gsm8k(10))
    math_ = write_jsonl(tmp_path / "math.jsonl", _numbered_math(10))
    spec = f"{gsm}:0.7,{math_}:0.3"
    examples, report = DataArgs(dataset_name=spec).load_train(seed=3)
    # 10 GSM8K rows bound the mixture at 14: 9.8 -> 10 GSM8K, 4.2 -> 4 MATH, drawn without repeats.
    by_source = [e.source.rsplit(":", 2)[0] for e in examples]
    assert (by_source.count(str(gsm)), by_source.count(str(math_))) == (10, 4)
    assert len({e.source for e in examples}) == 14
    assert report.mixture == {str(gsm): 10, str(math_): 4} and report.schema == "gsm8k+math"
    assert (report.rows, report.kept) == (20, 14)
    assert f"mixture: {gsm} 10 of 10, {math_} 4 of 10" in report.summary()
    again, _ = DataArgs(dataset_name=spec).load_train(seed=3)
    other, _ = DataArgs(dataset_name=spec).load_train(seed=4)
    assert again == examples  # deterministic for a seed (every rank draws the same mixture)
    assert other != examples and sorted(e.source for e in other) != sorted(e.source for e in examples)
    assert by_source != sorted(by_source)  # shuffled, not one source after the other
    for example in examples:
        assert reward_function(f"<think>r</think><answer>{example.answer}</answer>", example.answer) == 10.0
    limited, _ = DataArgs(dataset_name=spec, max_train_samples=5).load_train(seed=3)
    assert sorted(e.source.rsplit(":", 2)[0] for e in limited) == [str(gsm)] * 4 + [str(math_)]


def test_mixture_for_evaluation_is_every_source_in_order(tmp_path: Path) -> None:
    gsm = write_jsonl(tmp_path / "test" / "gsm8k.jsonl", _numbered_gsm8k(3))
    write_jsonl(tmp_path / "test" / "math.jsonl", _numbered_math(5))
    spec = f"{gsm}:0.9,{tmp_path}/{{split}}/math.jsonl:0.1"  # weights are for training only
    examples, report = DataArgs(dataset_name=spec).load_eval()
    assert [e.problem for e in examples] == ["g0", "g1", "g2", "m0", "m1", "m2", "m3", "m4"]
    assert report.mixture == {str(gsm): 3, str(tmp_path / "test" / "math.jsonl"): 5}
    examples, _ = DataArgs(dataset_name=spec, max_eval_samples=4).load_eval()
    assert [e.problem for e in examples] == ["g0", "g1", "m0", "m1"]  # shared by size: 1.5 + 2.5


def test_mixture_row_errors_name_the_source(tmp_path: Path) -> None:
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", _numbered_gsm8k(4))
    bad = write_jsonl(tmp_path / "math.jsonl", [*_numbered_math(3), {"problem": "p", "solution": "no box"}])
    spec = f"{gsm}:1,{bad}:1"
    with pytest.raises(DataError, match=re.escape(f"{bad}:train:row 3 (math schema): field 'solution'")):
        DataArgs(dataset_name=spec).load_train()
    examples, report = DataArgs(dataset_name=spec, skip_bad_rows=True).load_train()
    assert len(examples) == 6 and report.skipped == 1
    assert report.skipped_reasons == {f"{bad}: field 'solution' has no complete \\boxed{{...}} answer": 1}
    amc = write_shape(tmp_path, SHAPES["amc"])
    with pytest.raises(DataError, match=re.escape(f"{amc}:train: SFT needs worked solutions")):
        DataArgs(dataset_name=f"{gsm},{amc}").load_train(require_solutions=True)
    examples, report = DataArgs(dataset_name=f"{gsm},{amc}").load_train()  # GRPO mixes them
    assert len(examples) == 6 and report.schema == "gsm8k+problem_answer"


# --------------------------------------------------------------------------------------------------
# The flags pass through the pipeline config and the chart unchanged (stages.<name>.args -> CLI flags)
# --------------------------------------------------------------------------------------------------

DATA_FLAGS = {
    "dataset_name": "/data/gsm8k.jsonl:0.7,/data/{split}/math.parquet:0.3",
    "dataset_schema": "problem_answer",
    "problem_column": "question",
    "answer_column": "final",
    "solution_column": "worked",
}


def _data_args_of(flags: list[str], stage: str) -> DataArgs:
    from trainer.evaluate import EvalArgs
    from trainer.grpo import GRPOArgs
    from trainer.runtime import parse_args
    from trainer.sft import SFTArgs

    classes = {"sft": SFTArgs, "grpo": GRPOArgs, "eval": EvalArgs}
    data_args, _ = parse_args((DataArgs, classes[stage]), flags, prog=stage)
    return data_args


def test_local_pipeline_passes_the_data_flags_through() -> None:
    from trainer.contract.stages import parse_config, plan

    stages = {name: {"args": dict(DATA_FLAGS)} for name in ("sft", "grpo", "eval")}
    for run in plan(parse_config({"stages": stages}, "test.yaml")):
        data_args = _data_args_of(run.cli_args(), run.name)
        assert {key: getattr(data_args, key) for key in DATA_FLAGS} == DATA_FLAGS, run.name
    assert DataArgs.from_stage_args({**DATA_FLAGS, "learning_rate": 0.1}) == DataArgs(**DATA_FLAGS)


def test_chart_passes_the_data_flags_through() -> None:
    from tests.support.helmtool import render_chart, stage_jobs

    args = {key: value for key, value in DATA_FLAGS.items() if key != "dataset_name"}
    values = {
        "dataset": {"name": DATA_FLAGS["dataset_name"]},
        "stages": {name: {"args": args} for name in ("sft", "grpo", "eval")},
    }
    jobs = stage_jobs(render_chart(values))
    assert set(jobs) == {"sft", "grpo", "eval"}
    for stage, job in jobs.items():
        container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        flags = container["args"][container["args"].index("--module") + 2 :]
        data_args = _data_args_of(flags, stage)
        assert {key: getattr(data_args, key) for key in DATA_FLAGS} == DATA_FLAGS, stage


# --------------------------------------------------------------------------------------------------
# Prompt / completion text
# --------------------------------------------------------------------------------------------------


def test_extract_boxed() -> None:
    assert extract_boxed("a \\boxed{1} b \\boxed{\\frac{a}{b^{2}}} c") == "\\frac{a}{b^{2}}"
    assert extract_boxed("\\fbox{ 7 }") == "7"
    assert extract_boxed("so \\boxed 5$.") == "5"
    assert extract_boxed("\\boxed{\\{x\\}}") == "\\{x\\}"  # escaped braces are not groups
    assert extract_boxed("\\boxed{1") is None
    assert extract_boxed("\\boxed{}") == ""
    assert extract_boxed("no box") is None


def test_format_completion_round_trip(tmp_path: Path) -> None:
    examples = []
    for name, rows in (("m", MATH_ROWS), ("g", GSM8K_ROWS), ("r", R1_ROWS), ("b", BUILTIN_ROWS)):
        examples += load_examples(str(write_jsonl(tmp_path / f"{name}.jsonl", rows)), "train")[0]
    assert len(examples) == 8
    for ex in examples:
        completion = format_completion(ex.reasoning, ex.answer)
        assert completion == f"<think>\n{ex.reasoning}\n</think>\n<answer>{ex.answer}</answer>"
        assert check_format(completion), ex.source
        assert reward_function(completion, ex.answer) == 10.0, ex.source
    with pytest.raises(ValueError, match="reasoning contains the reserved tag </think>"):
        format_completion("a </think> b", "1")


def test_format_prompt_without_template() -> None:
    assert format_prompt(None, "What is 1+1?") == f"{R1_SYSTEM_PROMPT}\nUser: What is 1+1?\nAssistant: "
    assert format_prompt(None, "q", PromptSettings(system_prompt="S")) == "S\nUser: q\nAssistant: "
    assert R1_SYSTEM_PROMPT.startswith("A conversation between User and Assistant.")
    assert R1_SYSTEM_PROMPT.endswith(
        "<think> reasoning process here </think> <answer> answer here </answer>."
    )


def _tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["what is one plus one", "user assistant system"], trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = chat_template
    return fast


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_format_prompt_with_chat_template() -> None:
    prompt = format_prompt(_tokenizer(CHAT_TEMPLATE), "what is one plus one")
    assert prompt == f"<|system|>{R1_SYSTEM_PROMPT}<|end|><|user|>what is one plus one<|end|><|assistant|>"
    assert format_prompt(_tokenizer(None), "q") == f"{R1_SYSTEM_PROMPT}\nUser: q\nAssistant: "


def test_format_prompt_template_without_system_role() -> None:
    prompt = format_prompt(_tokenizer(NO_SYSTEM_TEMPLATE), "q")
    assert prompt == f"<|user|>{R1_SYSTEM_PROMPT}\n\nq<|end|><|assistant|>"


# --------------------------------------------------------------------------------------------------
# Token lengths (trainer.r1.lengths): checked once, before training
# --------------------------------------------------------------------------------------------------


def _tiny_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _problems_of_words(counts: list[int]) -> list[Example]:
    words = re.findall(r"\S+", "Let the triangle ABC have sides a, b and c with area K; find the value of x.")
    return [
        Example(" ".join(words[j % len(words)] for j in range(n)), "r", "1", f"m.jsonl:train:row {i}")
        for i, n in enumerate(counts)
    ]


def _one_by_one(tok, examples: list[Example]) -> list[int]:
    return [
        len(tok(format_prompt(tok, ex.problem), add_special_tokens=False)["input_ids"]) for ex in examples
    ]


def test_overlong_prompts_are_one_error_naming_the_first_rows(tiny_model_dir: Path) -> None:
    from trainer.r1.lengths import LengthError, prompt_ids

    tok = _tiny_tokenizer(tiny_model_dir)
    examples = _problems_of_words([5, 400, 10, 300, 350, 320, 310, 330, 340, 8])
    tokens = _one_by_one(tok, examples)
    limit = 200
    over = [i for i, n in enumerate(tokens) if n > limit]
    assert len(over) == 7 and min(tokens[i] for i in over) > limit >= max(tokens[0], tokens[2], tokens[9])
    with pytest.raises(LengthError) as e:
        prompt_ids(tok, examples, max_prompt_length=limit)
    first = ", ".join(f"m.jsonl:train:row {i} ({tokens[i]} tokens)" for i in over[:5])
    assert str(e.value) == (
        f"m.jsonl:train: 7 of 10 prompts are longer than --max_prompt_length {limit} tokens: {first}, and 2 more; "
        f"pass --skip_bad_rows true to drop them, or raise --max_prompt_length "
        f"(the longest is {max(tokens)} tokens)"
    )
    assert isinstance(e.value, DataError)  # the stages' bad-input path: exit code 2


def test_overlong_prompts_skipped_are_counted_in_the_load_report(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from trainer.r1.lengths import LengthError, prompt_ids

    tok = _tiny_tokenizer(tiny_model_dir)
    examples = _problems_of_words([5, 400, 10, 300, 5])  # row 4 repeats row 0's problem
    path = write_jsonl(
        tmp_path / "m.jsonl", [{"problem": ex.problem, "solution": "\\boxed{1}"} for ex in examples]
    )
    loaded, report = load_examples(str(path), "train")
    tokens = _one_by_one(tok, loaded)
    with caplog.at_level(logging.WARNING, logger="trainer.r1.lengths"):
        kept, cache = prompt_ids(tok, loaded, max_prompt_length=200, skip=True, report=report)
    assert [ex.source for ex in kept] == [f"{path}:train:row {i}" for i in (0, 2, 4)]
    line = (
        f"{path}:train (math schema): 5 rows read, 3 kept, 2 skipped "
        "(2 x prompt longer than --max_prompt_length 200 tokens)"
    )
    assert report.summary() == line and line in caplog.text
    assert (report.kept, report.skipped) == (3, 2)
    # The ids are the prompts' own (as one-by-one tokenization gives them), kept once per problem text.
    assert set(cache) == {ex.problem for ex in kept}
    assert [len(cache[ex.problem]) for ex in kept] == [tokens[0], tokens[2], tokens[4]]
    assert (
        cache[kept[0].problem]
        == tok(format_prompt(tok, kept[0].problem), add_special_tokens=False)["input_ids"]
    )
    # A problem already in the cache is not tokenized again (the cached ids decide).
    fake = {examples[0].problem: [7] * 201}
    kept, cache = prompt_ids(tok, examples[:1] + examples[2:3], max_prompt_length=200, skip=True, cache=fake)
    assert [ex.source for ex in kept] == ["m.jsonl:train:row 2"] and cache is fake
    with pytest.raises(LengthError, match="all 2 prompts are longer than --max_prompt_length 5 tokens"):
        prompt_ids(tok, examples[:2], max_prompt_length=5, skip=True)


def test_dropped_rows_are_counted_against_their_mixture_source(tmp_path: Path) -> None:
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", _numbered_gsm8k(4))
    math_ = write_jsonl(tmp_path / "math.jsonl", _numbered_math(4))
    examples, report = load_examples(f"{gsm}:1,{math_}:1", "train", weighted=True, seed=0)
    dropped = [ex.source for ex in examples if ex.source.startswith(str(math_))][:2]
    report.drop(dropped, "prompt longer than --max_prompt_length 9 tokens")
    assert (report.kept, report.skipped) == (6, 2)
    assert report.skipped_reasons == {f"{math_}: prompt longer than --max_prompt_length 9 tokens": 2}
    assert report.mixture == {str(gsm): 4, str(math_): 2}
    assert f"mixture: {gsm} 4 of 4, {math_} 2 of 4" in report.summary()


def test_sft_sequences_truncate_with_a_warning_and_refuse_prompts_without_room(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from trainer.r1.lengths import LengthError, sft_sequences

    tok = _tiny_tokenizer(tiny_model_dir)
    examples = [
        Example("Compute 1 + 2.", "1 + 2 = 3", "3", "s.jsonl:train:row 0"),
        Example("Compute 12 + 30.", "12 + 30 = 42 " * 20, "42", "s.jsonl:train:row 1"),
        Example("Compute 5 + 5. " * 30, "5 + 5 = 10", "10", "s.jsonl:train:row 2"),
    ]
    prompts = _one_by_one(tok, examples)
    completions = [
        len(tok(format_completion(ex.reasoning, ex.answer), add_special_tokens=False)["input_ids"])
        for ex in examples
    ]
    full = [p + c + 1 for p, c in zip(prompts, completions, strict=True)]
    limit = full[0] + 5
    assert prompts[2] >= limit > full[0] and full[1] > limit > prompts[1]
    with pytest.raises(LengthError) as e:
        sft_sequences(tok, examples, max_seq_length=limit)
    assert str(e.value).startswith(
        f"s.jsonl:train: 1 of 3 prompts leave no room for a completion within --max_seq_length {limit} tokens: "
        f"s.jsonl:train:row 2 ({prompts[2]} tokens); pass --skip_bad_rows true"
    )
    with caplog.at_level(logging.WARNING, logger="trainer.r1.lengths"):
        seqs = sft_sequences(tok, examples, max_seq_length=limit, skip=True)
    assert [ex.source for ex in seqs.examples] == ["s.jsonl:train:row 0", "s.jsonl:train:row 1"]
    assert [len(ids) for ids, _ in seqs.rows] == [full[0], limit]
    assert [n for _, n in seqs.rows] == prompts[:2]
    assert [(t.source, t.tokens) for t in seqs.truncated] == [("s.jsonl:train:row 1", full[1])]
    assert (
        f"s.jsonl:train: 1 of 2 sequences (prompt + completion) are longer than --max_seq_length {limit} tokens "
        f"and are truncated to it, losing the end of their completion: s.jsonl:train:row 1 ({full[1]} tokens)"
    ) in caplog.text
