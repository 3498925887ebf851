"""The DeepSeek-R1 guide's own commands, verbatim, under `torchrun --nproc_per_node=2`, on a
competition_math-shaped file with problems longer than --max_prompt_length; then the guide's inference
snippet on the GRPO output. Only the model (builtin:tiny) and the data are replaced, and a few flags that cut
the run short are appended after the guide's. Also: over-long prompts fail before any training, the same on
every rank, with our message in torchrun's last lines (one rank's bad input: tests/test_rank_setup.py); flag
values refused while parsing exit 2 with the flag named; the guide's troubleshooting flags run on CPU."""

from __future__ import annotations

import json
import logging
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.support.competition_math import competition_math_row
from trainer import evaluate, grpo
from trainer.contract import output as contract
from trainer.r1.data import load_examples
from trainer.r1.format import format_completion
from trainer.r1.prompt import format_prompt
from trainer.runtime import ArgsError, check_device_flags

REPO = Path(__file__).resolve().parents[1]

GUIDE_SFT = [
    "--num_train_epochs",
    "3",
    "--per_device_train_batch_size",
    "2",
    "--gradient_accumulation_steps",
    "4",
    "--learning_rate",
    "2e-5",
    "--warmup_steps",
    "100",
    "--logging_steps",
    "10",
    "--save_steps",
    "500",
    "--evaluation_strategy",
    "steps",
    "--eval_steps",
    "500",
    "--report_to",
    "wandb",
    "--gradient_checkpointing",
    "True",
]
GUIDE_GRPO = [
    "--num_generations",
    "8",
    "--inference_batch_size",
    "4",
    "--logits_forward_batch_size",
    "1",
    "--initial_temperature",
    "1.0",
    "--final_temperature",
    "0.1",
    "--learning_rate",
    "1e-6",
]
# Appended after the guide's flags (the last value of a flag wins): a shorter run, nothing else.
SHORTER_SFT = ["--max_steps", "2"]
SHORTER_GRPO = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--max_completion_length", "32"]

# The guide's inference snippet; the model folder and the question come from the command line.
INFERENCE_SNIPPET = """\
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_path, prompt = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.bfloat16)
inputs = tokenizer(prompt, return_tensors="pt")
outputs = model.generate(**inputs, max_new_tokens=32, temperature=0.1, do_sample=True)
print(tokenizer.decode(outputs[0], skip_special_tokens=True))
print("new tokens:", outputs.shape[1] - inputs["input_ids"].shape[1])
"""

ROWS = 64
MAX_PROMPT_LENGTH = 512  # GRPO's default: the guide's command does not set it
MAX_SEQ_LENGTH = 1024  # SFT's default
LONG_ANSWER = 5000  # + row: the answers of rows whose prompt is over MAX_PROMPT_LENGTH


def _prompt_tokens(tokenizer, problem: str) -> int:
    return len(tokenizer(format_prompt(tokenizer, problem), add_special_tokens=False)["input_ids"])


@dataclass
class MathFile:
    path: Path
    prompts: list[int]  # tokens of each row's prompt
    sequences: list[int]  # tokens of each row's SFT sequence (prompt + completion + EOS)
    answers: list[str]  # each row's answer; a long prompt's is unique to its row

    def over(self, lengths: list[int], limit: int) -> list[int]:
        return [i for i, n in enumerate(lengths) if n > limit]


@pytest.fixture(scope="module")
def math_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """64 MATH-style rows (problem, level, type, solution with \\boxed{}): most of 20-70 words, some with
    a small [asy] figure, every 8th of 150-200 words; with their token counts, one row at a time with the
    tiny tokenizer."""
    from transformers import AutoTokenizer

    rng = random.Random(5)
    rows = []
    for i in range(ROWS):
        if i % 8 == 3:
            rows.append(competition_math_row(rng, words=rng.randint(150, 200), diagram_chars=0))
        else:
            rows.append(
                competition_math_row(rng, words=rng.randint(20, 70), diagram_chars=300 * (i % 8 == 5))
            )
    path = tmp_path_factory.mktemp("guide-data") / "competition_math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples, _ = load_examples(str(path), "train")
    prompts = [_prompt_tokens(tok, ex.problem) for ex in examples]
    long_prompts = [i for i, n in enumerate(prompts) if n > MAX_PROMPT_LENGTH]
    # Each long row gets an answer no other row has (answer_text's integers stop at 999), so a sample's
    # answer tells whether its prompt was a long one. The solution is not part of the prompt.
    for i in long_prompts:
        rows[i]["solution"] = rows[i]["solution"].rsplit("\\boxed{", 1)[0] + f"\\boxed{{{LONG_ANSWER + i}}}$."
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    examples, _ = load_examples(str(path), "train")
    assert [_prompt_tokens(tok, ex.problem) for ex in examples] == prompts
    completions = [
        len(tok(format_completion(ex.reasoning, ex.answer), add_special_tokens=False)["input_ids"])
        for ex in examples
    ]
    sequences = [p + c + 1 for p, c in zip(prompts, completions, strict=True)]
    # The data this test needs: some prompts over GRPO's limit, every prompt short enough for SFT.
    assert 0 < len(long_prompts) < ROWS // 2 and max(prompts) < MAX_SEQ_LENGTH, prompts
    answers = [ex.answer for ex in examples]
    long_answers = {answers[i] for i in long_prompts}
    assert not long_answers & {a for i, a in enumerate(answers) if i not in long_prompts}
    return MathFile(path, prompts, sequences, answers)


@pytest.fixture(scope="module")
def offline_wandb(tmp_path_factory: pytest.TempPathFactory):
    """--report_to wandb without WANDB_API_KEY: the stage goes offline by itself; every wandb folder is here."""
    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_API_KEY", "WANDB_MODE"):
            mp.delenv(name, raising=False)
        for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            mp.setenv(name, str(root / name.lower()))
        yield root


@pytest.fixture(scope="module")
def guide_sft(math_file, tiny_model_dir: Path, stage_runner, offline_wandb, tmp_path_factory):
    data = math_file.path
    out = tmp_path_factory.mktemp("guide") / "sft"
    argv = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
    ]
    result = stage_runner.run("trainer.sft", argv + GUIDE_SFT + SHORTER_SFT, nproc=2)
    return out, result


def _grpo_argv(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
    ] + GUIDE_GRPO


def test_guide_sft_command_runs_and_says_what_it_truncated(guide_sft, math_file) -> None:
    out, result = guide_sft
    data, long_sequences = math_file.path, math_file.over(math_file.sequences, MAX_SEQ_LENGTH)
    assert result.returncode == 0, result.describe()
    manifest = contract.verify_stage_output(out, "sft")
    assert manifest.steps == 2 and manifest.inputs["args"]["gradient_checkpointing"] is True
    assert list((out / "wandb").glob("offline-run-*")), "--report_to wandb without a key runs offline"
    truncated = re.findall(
        rf"{re.escape(str(data))}:train: (\d+) of {ROWS} sequences \(prompt \+ completion\) are longer than "
        rf"--max_seq_length {MAX_SEQ_LENGTH} tokens and are truncated to it",
        result.output,
    )
    said = f"train rows: {ROWS} (skipped 0 bad, truncated {len(long_sequences)})"
    assert said in result.output, result.describe()
    if long_sequences:  # stated with the first rows (rank 0 and rank 1 each say it once)
        assert truncated and set(truncated) == {str(len(long_sequences))}, result.describe()
        first = long_sequences[0]
        assert f"{data}:train:row {first} ({math_file.sequences[first]} tokens)" in result.output
    else:
        assert not truncated


def test_guide_grpo_command_refuses_overlong_prompts_before_training(
    guide_sft, math_file, stage_runner, tmp_path: Path
) -> None:
    sft_out, _ = guide_sft
    data, long_prompts = math_file.path, math_file.over(math_file.prompts, MAX_PROMPT_LENGTH)
    out = tmp_path / "grpo"
    result = stage_runner.run("trainer.grpo", _grpo_argv(sft_out, data, out) + SHORTER_GRPO, nproc=2)
    assert result.returncode != 0
    expected = (
        f"r1-grpo grpo: error: {data}:train: {len(long_prompts)} of {ROWS} prompts are longer than "
        f"--max_prompt_length {MAX_PROMPT_LENGTH} tokens: {data}:train:row {long_prompts[0]} "
        f"({math_file.prompts[long_prompts[0]]} tokens)"
    )
    lines = result.output.splitlines()
    # Printed once (rank 0), and the last lines are torchrun's failure summary showing the same message.
    assert sum(line.startswith(expected) for line in lines) == 1, result.describe()
    assert any(expected in line for line in lines[-3:]), result.describe()
    assert "pass --skip_bad_rows true to drop them, or raise --max_prompt_length" in result.output
    exit_codes = re.findall(r"exitcode\s*: (-?\d+)", result.output)
    assert exit_codes and set(exit_codes) == {"2"}, result.describe()
    # Nothing trained: no metrics, no checkpoint, no model, no r1_stage.json.
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()
    assert not (out / contract.MANIFEST_NAME).exists() and not (out / "model.safetensors").exists()


def test_guide_grpo_command_with_skip_bad_rows_then_the_inference_snippet(
    guide_sft, math_file, stage_runner, tmp_path: Path
) -> None:
    sft_out, _ = guide_sft
    data, long_prompts = math_file.path, math_file.over(math_file.prompts, MAX_PROMPT_LENGTH)
    out = tmp_path / "grpo"
    # Every completion of the logged step is printed to samples.jsonl (rank 0's rollout: 2 prompts x 8).
    argv = _grpo_argv(sft_out, data, out) + SHORTER_GRPO + ["--skip_bad_rows", "true"]
    argv += ["--num_completions_to_print", "16"]
    result = stage_runner.run("trainer.grpo", argv, nproc=2)
    assert result.returncode == 0, result.describe()
    k = len(long_prompts)
    report = (
        f"{data}:train (math schema): {ROWS} rows read, {ROWS - k} kept, {k} skipped "
        f"({k} x prompt longer than --max_prompt_length {MAX_PROMPT_LENGTH} tokens)"
    )
    assert report in result.output, result.describe()
    manifest = contract.verify_stage_output(out, "grpo")
    assert manifest.steps == 1 and manifest.inputs["args"]["skip_bad_rows"] is True
    # Only prompts that fit were sampled: every completion's answer is a kept row's, none a long row's.
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16, samples
    kept = {a for i, a in enumerate(math_file.answers) if i not in long_prompts}
    sampled = {s["answer"] for s in samples}
    assert sampled and sampled <= kept, (sampled, [math_file.answers[i] for i in long_prompts])

    script = tmp_path / "inference.py"
    script.write_text(INFERENCE_SNIPPET, encoding="utf-8")
    question = "What is $1 + 2$?"
    run = subprocess.run(
        [sys.executable, str(script), str(out), question],
        env=stage_runner.env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    new_tokens = re.search(r"^new tokens: (\d+)$", run.stdout, re.M)
    assert new_tokens and int(new_tokens[1]) >= 1, run.stdout + run.stderr
    assert run.stdout.startswith(question)


# ---------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize(
    ("module", "extra", "message"),
    [
        (
            grpo,
            ["--dataset_name", "a.jsonl:0.7,b.jsonl"],
            "--dataset_name 'a.jsonl:0.7,b.jsonl': give every dataset a ':<weight>' or none of them",
        ),
        (grpo, ["--problem_column", ""], "--problem_column must be a column name, got ''"),
        (evaluate, ["--dataset_name", "a.jsonl:0,b.jsonl:1"], "the weight of 'a.jsonl' must be > 0"),
    ],
)
def test_values_refused_while_parsing_exit_2_naming_the_flag(
    module, extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--output_dir", str(tmp_path / "o")]
    prog = "r1-grpo grpo" if module is grpo else "r1-grpo eval"
    with pytest.raises(SystemExit) as e:
        module.main(argv + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{prog}: error: " in err and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the flags say on CPU")
def test_device_flags_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    args = grpo.GRPOArgs(
        model_name_or_path="m", output_dir="o", tf32=True, bf16=True, gradient_checkpointing=True
    )
    with caplog.at_level(logging.INFO, logger="r1_grpo"):
        check_device_flags(args)
    assert "--tf32 True has no effect on CPU" in caplog.text
    assert "--bf16 True on CPU: bfloat16 compute on the CPU" in caplog.text
    with pytest.raises(ArgsError, match="--plugin gemini needs CUDA GPUs; on CPU use --plugin ddp"):
        check_device_flags(grpo.GRPOArgs(model_name_or_path="m", output_dir="o", plugin="gemini"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the flags say on CPU")
def test_guide_troubleshooting_flags_run_on_cpu(
    tiny_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    out = tmp_path / "grpo"
    troubleshooting = [
        "--gradient_checkpointing",
        "True",
        "--bf16",
        "True",
        "--tf32",
        "True",
        "--learning_rate",
        "5e-7",
        "--num_generations",
        "16",
        "--initial_temperature",
        "1.5",
        "--final_temperature",
        "0.05",
    ]
    argv = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--dataset_name",
        str(arith_jsonl),
        "--output_dir",
        str(out),
        *troubleshooting,
        *["--max_steps", "1", "--per_device_train_batch_size", "1", "--max_completion_length", "8"],
        *["--report_to", "none"],
    ]
    result = stage_runner.run("trainer.grpo", argv)
    assert result.returncode == 0, result.describe()
    said = result.output.find("--tf32 True has no effect on CPU")
    assert 0 <= said < result.output.find("prompts tokenized"), result.describe()  # before any work
    args = contract.verify_stage_output(out, "grpo").inputs["args"]
    assert (args["num_generations"], args["learning_rate"], args["bf16"], args["tf32"]) == (
        16,
        5e-7,
        True,
        True,
    )
    assert (args["initial_temperature"], args["final_temperature"]) == (1.5, 0.05)
