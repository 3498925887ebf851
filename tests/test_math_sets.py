"""Published math evaluation sets load as published (issue 23): rows of seven sets from Qwen2.5-Math's
evaluation/data, verbatim (tests/fixtures/math_sets/README.md), auto-detected, their golds graded; the
error naming the flags when a schema refuses every row; `r1-grpo data inspect`; bench/math_sets.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.r1.data import DataArgs, DataError, load_examples
from trainer.r1.rewards import reward_function

ROOT = Path(__file__).resolve().parents[1]
SETS = ROOT / "tests" / "fixtures" / "math_sets"


def path_of(name: str) -> str:
    return str(SETS / name / "test.jsonl")


def completion(answer: str) -> str:
    return f"<think>\nworking\n</think>\n<answer>{answer}</answer>"


# set -> (schema, columns, gold answers kept, the answers a model would write, start of the first problem)
EXPECTED = {
    "olympiadbench": (
        "math",
        {"problem": "question", "solution": "solution", "answer": "final_answer"},
        ["5", "14", "-1,0,1"],
        ["5", "14", "x=1, x=-1, x=0"],
        "Let $T=2$. Compute the product",
    ),
    "college_math": (
        "problem_answer",
        {"problem": "question", "answer": "answer"},
        ["$10-4 n$", "$(45,2),(-10,-9)$", "$Q(50)=47.5$ (pounds)"],
        ["-4n + 10", "(-10,-9), (45,2)", "Q(50) = 47.5"],
        "Simplify: $-10-4(n-5)$",
    ),
    "gaokao2023en": (
        "problem_answer",
        {"problem": "question", "answer": "answer"},
        ["$\\{x|-2\\leq x < 1\\}$", "$-1-\\sqrt{3}$"],
        ["\\{x|-2\\leq x < 1\\}", "-\\sqrt{3}-1"],
        "Given sets $M=",
    ),
    "svamp": (
        "problem_answer",
        {"problem": "Body+Question", "answer": "Answer"},
        ["145", "19", "3"],
        ["145", "19 pounds", "3.0"],
        "There are 87 oranges and 290 bananas in Philip's collection. If the bananas are organized into 2 "
        "groups and oranges are organized into 93 groups How big is each group of bananas?",
    ),
    "asdiv": (
        "problem_answer",
        {"problem": "body+question", "answer": "answer"},
        ["9 (apples)", "350 (g)", "3:30 p.m."],
        ["9", "350\\text{ g}", "3:30 p.m."],
        "Seven red apples and two green apples are in the basket. How many apples are in the basket?",
    ),
    "mawps": (
        "problem_answer",
        {"problem": "input", "answer": "target"},
        ["43", "26", "135"],
        ["43", "26 bales", "\\boxed{135}"],
        "Joan found 70 seashells on the beach.",
    ),
    "carp_en": (
        "math",
        {"problem": "content", "solution": "steps", "answer": "answer"},
        ["b ^ { 2 } - 9 a ^ { 2 }", "20", "x < - 2"],
        ["b^2-9a^2", "20", "x<-2"],
        "Calculate $( 3 a - b ) ( - 3 a - b )$ equals to ____?",
    ),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_published_sets_load_by_auto_detection_and_grade(name: str) -> None:
    schema, columns, golds, written, problem = EXPECTED[name]
    examples, report = load_examples(path_of(name), "test", skip_bad_rows=True)
    assert (report.schema, report.columns) == (schema, columns)
    assert [e.answer for e in examples] == golds
    assert examples[0].problem.startswith(problem)
    assert report.rows == 3 and report.kept == len(golds)
    for example, answer in zip(examples, written, strict=True):
        assert reward_function(completion(example.answer), example.answer) == 10.0
        assert reward_function(completion(answer), example.answer) == 10.0, (name, answer, example.answer)
        assert reward_function(completion("99991"), example.answer) == 1.0
    if "solution" in columns:  # a worked solution (OlympiadBench: the first of its list) serves SFT
        sft, _ = load_examples(path_of(name), "test", require_solutions=True)
        assert all(e.reasoning for e in sft)
    else:
        with pytest.raises(DataError, match="SFT needs worked solutions"):
            load_examples(path_of(name), "test", require_solutions=True)


def test_a_row_without_an_answer_is_named_and_skippable() -> None:
    with pytest.raises(DataError) as err:
        load_examples(path_of("gaokao2023en"), "test")
    assert "gaokao2023en/test.jsonl:test:row 2 (problem_answer schema): field 'answer' is empty" in str(
        err.value
    )
    _, report = load_examples(path_of("gaokao2023en"), "test", skip_bad_rows=True)
    assert report.skipped_reasons == {"field 'answer' is empty": 1}


@pytest.mark.parametrize("skip", [False, True])
def test_a_refusing_schema_names_itself_the_first_reason_and_the_flags(skip: bool) -> None:
    # OlympiadBench named as GSM8K: every row is refused; the message says how it would load.
    with pytest.raises(DataError) as err:
        load_examples(
            path_of("olympiadbench"),
            "test",
            schema="gsm8k",
            solution_column="final_answer",
            skip_bad_rows=skip,
        )
    message = str(err.value)
    assert "gsm8k schema" in message and "field 'final_answer' must be text, got list" in message
    flags = "--dataset_schema math --problem_column question --solution_column solution --answer_column final_answer"
    assert flags in message
    if skip:
        assert "refused every row, first row 0: field 'final_answer' must be text" in message


def test_column_flags_are_matched_case_insensitively_and_join() -> None:
    examples, report = DataArgs(
        dataset_name=path_of("svamp"),
        dataset_schema="problem_answer",
        problem_column="Question",
        answer_column="answer",
    ).load_eval()
    assert report.columns == {"problem": "Question", "answer": "Answer"}
    assert examples[0].problem == "How big is each group of bananas?"
    examples, report = load_examples(
        path_of("asdiv"), "test", problem_column="question+body", answer_column="answer"
    )
    assert report.columns == {"problem": "question+body", "answer": "answer"}
    assert examples[0].problem.startswith("How many apples are in the basket? Seven red apples")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_data_inspect_prints_schema_report_prompts_and_golds() -> None:
    out = run_cli(
        "data", "inspect", "--dataset_name", path_of("asdiv"), "--split", "test", "--num_examples", "2"
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "schema: problem_answer (problem=body+question, answer=answer)" in text
    assert "3 rows read, 3 kept" in text
    assert "worked solutions: none" in text
    assert text.count("--- example ") == 2 and "--- gold answer: 9 (apples)" in text
    assert "User: Seven red apples and two green apples are in the basket. How many apples" in text
    assert "Assistant:" in text and "350 (g)" in text and "3:30" not in text


def test_data_inspect_bad_input_is_one_line_and_exit_2() -> None:
    out = run_cli("data", "inspect", "--dataset_name", path_of("gaokao2023en"), "--split", "test")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("r1-grpo data: error: ")
    assert "row 2 (problem_answer schema): field 'answer' is empty" in out.stderr
    out = run_cli("data", "inspect", "--dataset_name", path_of("gaokao2023en"), "--skip_bad_rows", "true")
    assert out.returncode == 0 and "1 skipped (1 x field 'answer' is empty)" in out.stdout
    assert run_cli("data", "nope").returncode == 2


def test_data_inspect_does_not_import_torch() -> None:
    code = (
        "import sys; from trainer.r1.data_inspect import main; "
        f"main(['inspect', '--dataset_name', {path_of('mawps')!r}]); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_bench_table_on_the_fixture_rows() -> None:
    out = subprocess.run(
        [sys.executable, "bench/math_sets.py", str(SETS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 1, out.stdout  # gaokao keeps 2 of 3 fixture rows: under 99%
    lines = {
        line.split(" | ")[0].strip("| "): line for line in out.stdout.splitlines() if line.startswith("| ")
    }
    assert (
        "| 3 | 3 | 100.0% | problem_answer | problem=input, answer=target | 100.0% | 100.0% | 3 | 0 |"
        in lines["mawps"]
    )
    assert "| 3 | 2 | 66.7% |" in lines["gaokao2023en"]
    assert "failing: gaokao2023en" in out.stderr


def test_data_inspect_formats_with_a_real_tokenizers_chat_template() -> None:
    from tests.support.real_tokenizers import tokenizer_dir

    folder = tokenizer_dir("qwen3")
    out = run_cli(
        "data",
        "inspect",
        "--dataset_name",
        path_of("mawps"),
        "--num_examples",
        "1",
        "--tokenizer_name_or_path",
        str(folder),
    )
    assert out.returncode == 0, out.stderr
    assert "prompts: the tokenizer's chat template" in out.stdout
    assert "<|im_start|>user\nJoan found 70 seashells" in out.stdout and "--- gold answer: 43" in out.stdout
