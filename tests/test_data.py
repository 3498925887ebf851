"""Tests for trainer.r1.data and trainer.r1.format: sources, schemas, bad rows, DataArgs flags, prompt and completion text."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from trainer.r1.data import DataArgs, DataError, Example, detect_schema, extract_boxed, load_examples
from trainer.r1.format import R1_SYSTEM_PROMPT, check_format, format_completion, format_prompt
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
    ("builtin", {"question": "q", "reasoning": "  ", "answer": "1"}, "reasoning", "is empty"),
    (
        "builtin",
        {"question": "q", "reasoning": "r", "answer": "<answer>1</answer>"},
        "answer",
        "reserved tag",
    ),
]
GOOD_ROW = {
    "math": MATH_ROWS[0],
    "gsm8k": GSM8K_ROWS[0],
    "r1": R1_ROWS[0],
    "builtin": BUILTIN_ROWS[0],
}


@pytest.mark.parametrize(("schema", "bad", "field", "problem"), BAD_ROWS)
def test_bad_row_error_names_file_split_row_and_field(
    tmp_path: Path, schema: str, bad: dict, field: str, problem: str
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_ROW[schema], GOOD_ROW[schema], bad])
    with pytest.raises(DataError) as err:
        load_examples(str(path), "train")
    message = str(err.value)
    assert f"{path}:train:row 2" in message
    assert f"field '{field}'" in message
    assert problem in message
    assert "--skip_bad_rows" in message


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
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "none"}])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(str(path), "train", skip_bad_rows=True)


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
    assert format_prompt(None, "q", system_prompt="S") == "S\nUser: q\nAssistant: "
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
