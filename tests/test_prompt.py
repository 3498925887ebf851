"""The prompt choice (trainer/r1/prompt.py): what each --prompt_format renders with the real Qwen3, Llama 3.1,
DeepSeek-V3 (R1) and Gemma 3 tokenizers, the think prefill end to end (SFT target, reward text), the flags'
errors, the record in r1_stage.json and how the next stage picks it up (a real sft → grpo → eval chain on
the built-in tiny model, and `r1-grpo prompt`)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from tests.support.real_tokenizers import tokenizer_dir
from trainer.contract import output as contract
from trainer.r1.format import check_format, extract_answer
from trainer.r1.prompt import (
    R1_SYSTEM_PROMPT,
    PromptArgs,
    Prompter,
    PromptRecordError,
    PromptSettings,
    recorded_prompt,
    resolve_prompt,
)
from trainer.r1.rewards import reward_function
from trainer.runtime import ArgsError

FAMILIES = ("qwen3", "llama3_1", "deepseek_v3", "gemma3")
SYSTEM = "Think, then answer."
QUESTION = "What is 2+3?"

# The exact prompt of each family and format for SYSTEM and QUESTION (chat: the family's own template).
EXPECTED = {
    "qwen3": {
        "chat": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n",
        # Qwen has no BOS: the guide's text prompt as it is.
        "plain": f"{SYSTEM}\nUser: {QUESTION}\nAssistant: ",
    },
    "llama3_1": {
        "chat": f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "plain": f"<|begin_of_text|>{SYSTEM}\nUser: {QUESTION}\nAssistant: ",
    },
    "deepseek_v3": {
        "chat": f"<｜begin▁of▁sentence｜>{SYSTEM}<｜User｜>{QUESTION}<｜Assistant｜>",
        "plain": f"<｜begin▁of▁sentence｜>{SYSTEM}\nUser: {QUESTION}\nAssistant: ",
    },
    "gemma3": {
        # Gemma 3's template has no system role: it folds the system prompt into the first user turn.
        "chat": f"<bos><start_of_turn>user\n{SYSTEM}\n\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n",
        "plain": f"<bos>{SYSTEM}\nUser: {QUESTION}\nAssistant: ",
    },
}


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    from transformers import AutoTokenizer

    return {family: AutoTokenizer.from_pretrained(tokenizer_dir(family)) for family in FAMILIES}


# ---- rendering with the real tokenizers ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_format", ["chat", "plain", "auto"])
def test_each_format_renders_the_family_prompt(tokenizers, family: str, prompt_format: str) -> None:
    tok = tokenizers[family]
    prompter = Prompter(PromptSettings(prompt_format=prompt_format, system_prompt=SYSTEM), tok)
    # Every one of these tokenizers, Qwen3's included (base models ship it too), has a chat template.
    expected = EXPECTED[family]["chat" if prompt_format == "auto" else prompt_format]
    assert prompter.prompt(QUESTION) == expected
    assert prompter.settings.prompt_format == ("chat" if prompt_format == "auto" else prompt_format)
    assert prompter.prefill == ""
    ids = tok(prompter.prompt(QUESTION), add_special_tokens=False)["input_ids"]
    # The text carries the BOS the family's tokenizer adds, once, first; Qwen adds none and has none.
    if family == "qwen3":
        assert (
            tok.bos_token_id is None
            and tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]
        )
    else:
        assert tok("x")["input_ids"][0] == tok.bos_token_id
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_default_settings_use_the_r1_system_prompt(tokenizers, family: str) -> None:
    prompt = Prompter(PromptSettings(), tokenizers[family]).prompt(QUESTION)
    assert prompt == EXPECTED[family]["chat"].replace(SYSTEM, R1_SYSTEM_PROMPT)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_system_prompt(tokenizers, family: str) -> None:
    tok = tokenizers[family]
    chat = Prompter(PromptSettings(prompt_format="chat", system_prompt=""), tok).prompt(QUESTION)
    assert chat == tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    assert "system" not in chat and SYSTEM not in chat
    plain = Prompter(PromptSettings(prompt_format="plain", system_prompt=""), tok).prompt(QUESTION)
    assert plain.endswith(f"User: {QUESTION}\nAssistant: ") and plain.count("\n") == 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
def test_think_prefill_agrees_across_target_reward_and_extraction(
    tokenizers, family: str, prompt_format: str
) -> None:
    tok = tokenizers[family]
    prompter = Prompter(
        PromptSettings(prompt_format=prompt_format, system_prompt=SYSTEM, think_prefill=True), tok
    )
    prompt = prompter.prompt(QUESTION)
    assert prompt == EXPECTED[family][prompt_format] + "<think>\n"
    assert prompter.prefill == "<think>\n"
    target = prompter.target("2 plus 3 is 5", "5")
    assert target == "2 plus 3 is 5\n</think>\n<answer>5</answer>"  # the SFT completion starts inside
    response = prompter.response(target)
    assert response == "<think>\n2 plus 3 is 5\n</think>\n<answer>5</answer>"
    assert check_format(response) and extract_answer(response) == "5"
    assert reward_function(response, "5") == 10.0
    assert (
        reward_function(target, "5") == 0.0
    )  # the completion alone is not in the format: why response exists
    # The prompt and the completion, tokenized apart (as SFT and the sampler do), decode back to the whole.
    ids = (
        tok(prompt, add_special_tokens=False)["input_ids"]
        + tok(target, add_special_tokens=False)["input_ids"]
    )
    assert tok.decode(ids) == prompt + target


def test_qwen3_enable_thinking_false(tokenizers) -> None:
    tok = tokenizers["qwen3"]
    settings = PromptSettings(
        prompt_format="chat", system_prompt=SYSTEM, chat_template_kwargs={"enable_thinking": False}
    )
    prompter = Prompter(settings, tok)
    # Qwen3's template closes an empty thinking block itself; the model's completion follows it.
    assert prompter.prompt(QUESTION) == EXPECTED["qwen3"]["chat"] + "<think>\n\n</think>\n\n"
    assert prompter.prefill == ""
    assert prompter.target("r", "5") == "<think>\nr\n</think>\n<answer>5</answer>"
    # enable_thinking true is the template's default rendering.
    on = Prompter(PromptSettings("chat", SYSTEM, False, {"enable_thinking": True}), tok)
    assert on.prompt(QUESTION) == EXPECTED["qwen3"]["chat"]


def test_a_template_that_opens_think_itself_counts_as_prefilled(tokenizers) -> None:
    """DeepSeek-R1's later templates end the generation prompt with '<think>\\n'; then the completion starts
    inside the thinking as with --think_prefill, and no second '<think>' is added."""
    tok = tokenizers["deepseek_v3"]
    template = tok.chat_template.replace("{{'<｜Assistant｜>'}}", "{{'<｜Assistant｜><think>\\n'}}")
    assert template != tok.chat_template
    tok2 = copy.deepcopy(tok)
    tok2.chat_template = template
    for prefill in (False, True):
        prompter = Prompter(PromptSettings("chat", SYSTEM, prefill, {}), tok2)
        assert prompter.prompt(QUESTION).endswith("<｜Assistant｜><think>\n")
        assert prompter.prompt(QUESTION).count("<think>") == 1
        assert prompter.prefill == "<think>\n"


def test_plain_prompt_of_a_tokenizer_without_template_is_unchanged(tiny_model_dir: Path) -> None:
    """auto on a tokenizer without a chat template (builtin:tiny) is today's plain prompt, without BOS: the
    built-in tokenizer adds none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompter = Prompter(PromptSettings(), tok)
    assert prompter.settings.prompt_format == "plain"
    assert prompter.prompt("q") == f"{R1_SYSTEM_PROMPT}\nUser: q\nAssistant: "


def test_sft_sequences_train_on_the_completion_after_the_prefill(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from trainer.r1.data import Example
    from trainer.r1.lengths import sft_sequences

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = Example(problem="12+30", reasoning="2+0=2, 1+3=4", answer="42", source="t:train:row 0")
    prompter = Prompter(PromptSettings(prompt_format="plain", think_prefill=True), tok)
    ((ids, prompt_len),) = sft_sequences(tok, [ex], max_seq_length=1024, prompter=prompter).rows
    assert tok.decode(ids[:prompt_len]) == prompter.prompt("12+30")
    assert tok.decode(ids[:prompt_len]).endswith("Assistant: <think>\n")
    assert tok.decode(ids[prompt_len:-1]) == "2+0=2, 1+3=4\n</think>\n<answer>42</answer>"
    assert ids[-1] == tok.eos_token_id


# ---- the flags -----------------------------------------------------------------------------------------


def test_system_prompt_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "system.txt"
    path.write_text("Line one.\nLine two.\n\n", encoding="utf-8")
    assert PromptArgs(system_prompt=f"@{path}").system_prompt_text() == "Line one.\nLine two."
    assert PromptArgs(system_prompt="@@home").system_prompt_text() == "@home"
    assert PromptArgs(system_prompt="").system_prompt_text() == ""
    assert PromptArgs().system_prompt_text() is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_format": "chatml"}, "--prompt_format 'chatml': expected one of auto, chat, plain"),
        ({"system_prompt": "@/no/such/file.txt"}, "--system_prompt @/no/such/file.txt: no such file"),
        (
            {"chat_template_kwargs": "{enable_thinking: false}"},
            "--chat_template_kwargs '{enable_thinking: false}': not valid JSON",
        ),
        ({"chat_template_kwargs": "[1]"}, "--chat_template_kwargs '[1]': expected a JSON object"),
        (
            {"chat_template_kwargs": '{"tokenize": true}'},
            "--chat_template_kwargs: tokenize are set by the trainer, not by this flag",
        ),
    ],
)
def test_bad_prompt_flags(kwargs: dict, message: str) -> None:
    with pytest.raises(ArgsError) as e:
        PromptArgs(**kwargs)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("module", ["trainer.sft", "trainer.grpo", "trainer.evaluate"])
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--system_prompt", "@/no/such/file.txt"], "--system_prompt @/no/such/file.txt: no such file"),
        (["--chat_template_kwargs", "{bad"], "--chat_template_kwargs '{bad': not valid JSON"),
    ],
)
def test_each_stage_refuses_a_bad_prompt_flag_in_one_line(
    module: str, extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib

    stage = importlib.import_module(module)
    argv = [
        "--model_name_or_path",
        "m",
        "--dataset_name",
        "d.jsonl",
        "--output_dir",
        str(tmp_path / "o"),
        *extra,
    ]
    with pytest.raises(SystemExit) as e:
        stage.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    prog = "eval" if module == "trainer.evaluate" else module.split(".")[1]
    assert f"r1-grpo {prog}: error: {message}" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("module", ["trainer.sft", "trainer.grpo", "trainer.evaluate"])
def test_every_stage_has_the_prompt_flags(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--prompt_format", "--system_prompt", "--think_prefill", "--chat_template_kwargs"):
        assert flag in out, flag


# ---- the record and where the settings come from ------------------------------------------------------


def _stage_folder(folder: Path, prompt: dict | None, stage: str = "sft") -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    inputs: dict = {"model_name_or_path": "base", "dataset_name": "d", "args": {}}
    if prompt is not None:
        inputs["prompt"] = prompt
    contract.write_manifest(folder, stage, steps=1, inputs=inputs, metrics={})
    return folder


def _settings_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prompt: format")]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    return lines[0]


def test_resolve_takes_flag_then_record_then_default(tokenizers, tmp_path: Path, caplog) -> None:
    tok = tokenizers["qwen3"]
    record = PromptSettings("plain", SYSTEM, True, {}).to_record()
    folder = _stage_folder(tmp_path / "sft", record)
    assert recorded_prompt(str(folder)) == (
        PromptSettings("plain", SYSTEM, True, {}),
        str(folder / "r1_stage.json"),
    )

    with caplog.at_level(logging.INFO, logger="trainer.r1.prompt"):
        inherited = resolve_prompt(PromptArgs(), str(folder), tok)
    assert inherited.settings == PromptSettings("plain", SYSTEM, True, {})
    line = _settings_line(caplog)
    assert f"format from {folder / 'r1_stage.json'}" in line and "think prefill from " + str(folder) in line
    texts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prompt text of a problem")]
    assert texts == [
        "prompt text of a problem {problem}: " + repr(f"{SYSTEM}\nUser: {{problem}}\nAssistant: <think>\n")
    ]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer.r1.prompt"):
        overridden = resolve_prompt(PromptArgs(prompt_format="chat", think_prefill=False), str(folder), tok)
    assert overridden.settings == PromptSettings("chat", SYSTEM, False, {})
    line = _settings_line(caplog)
    assert "format from --prompt_format" in line and "think prefill from --think_prefill" in line
    assert f"system prompt from {folder / 'r1_stage.json'}" in line
    assert overridden.prompt(QUESTION) == EXPECTED["qwen3"]["chat"]

    # A hub id (or any folder without r1_stage.json): the defaults, auto decided by the tokenizer.
    default = resolve_prompt(PromptArgs(), "Qwen/Qwen3-0.6B-Base", tok)
    assert default.settings == PromptSettings("chat", R1_SYSTEM_PROMPT, False, {})


def test_a_record_written_before_prompt_settings_means_the_defaults(tokenizers, tmp_path: Path) -> None:
    folder = _stage_folder(tmp_path / "old", None)
    settings, why = recorded_prompt(str(folder))
    assert settings is None and "records no prompt settings" in why
    assert resolve_prompt(PromptArgs(), str(folder), tokenizers["llama3_1"]).settings.prompt_format == "chat"


def test_a_malformed_record_is_an_error_naming_the_file(tmp_path: Path) -> None:
    bad = PromptSettings().to_record() | {"think_prefill": "yes"}
    folder = _stage_folder(tmp_path / "bad", bad)
    with pytest.raises(
        PromptRecordError, match=r"r1_stage.json: inputs.prompt.think_prefill is missing or not a bool"
    ):
        recorded_prompt(str(folder))


def test_chat_without_a_template_and_kwargs_with_plain(
    tiny_model_dir: Path, tokenizers, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tiny = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ArgsError, match="has no chat template; pass --prompt_format plain"):
        resolve_prompt(PromptArgs(prompt_format="chat"), str(tiny_model_dir), tiny)
    with pytest.raises(ArgsError, match="--chat_template_kwargs applies to the chat format only"):
        resolve_prompt(
            PromptArgs(prompt_format="plain", chat_template_kwargs='{"enable_thinking": false}'), "m", tiny
        )
    # Inherited from a chat stage, the template options are dropped when this stage renders plain.
    folder = _stage_folder(
        tmp_path / "sft", PromptSettings("chat", SYSTEM, False, {"enable_thinking": False}).to_record()
    )
    plain = resolve_prompt(PromptArgs(prompt_format="plain"), str(folder), tokenizers["qwen3"])
    assert plain.settings == PromptSettings("plain", SYSTEM, False, {})


# ---- a stage chain: the record is written, picked up, and overridden ---------------------------------------


def _manifest_prompt(folder: Path) -> dict:
    return contract.verify_stage_output(folder).inputs["prompt"]


@pytest.fixture(scope="module")
def chain(tiny_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path_factory) -> dict:
    """SFT with --prompt_format plain, a system prompt from a file and the think prefill; GRPO and eval with no
    prompt flags; a second eval overriding two settings."""
    root = tmp_path_factory.mktemp("prompt-chain")
    system_file = root / "system.txt"
    system_file.write_text(SYSTEM + "\n", encoding="utf-8")
    common = [
        "--dataset_name",
        str(arith_jsonl),
        "--report_to",
        "none",
        "--seed",
        "3",
        "--max_eval_samples",
        "4",
    ]
    sft = stage_runner.run(
        "trainer.sft",
        [
            "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(root / "sft"), *common,
            "--prompt_format", "plain", "--system_prompt", f"@{system_file}", "--think_prefill", "true",
            "--per_device_train_batch_size", "4", "--max_steps", "3", "--learning_rate", "1e-3",
            "--evaluation_strategy", "steps", "--eval_steps", "2", "--logging_steps", "1", "--plugin", "ddp",
        ],
    )  # fmt: skip
    assert sft.returncode == 0, sft.describe()
    grpo = stage_runner.run(
        "trainer.grpo",
        [
            "--model_name_or_path", str(root / "sft"), "--output_dir", str(root / "grpo"), *common,
            "--per_device_train_batch_size", "2", "--num_generations", "2", "--max_completion_length", "16",
            "--inference_batch_size", "2", "--max_steps", "2", "--logging_steps", "1", "--beta", "0",
            "--evaluation_strategy", "steps", "--eval_steps", "2", "--plugin", "ddp",
        ],
    )  # fmt: skip
    assert grpo.returncode == 0, grpo.describe()
    eval_args = ["--model_name_or_path", str(root / "grpo"), *common, "--max_completion_length", "16"]
    inherited = stage_runner.run("trainer.evaluate", [*eval_args, "--output_dir", str(root / "eval")])
    assert inherited.returncode == 0, inherited.describe()
    overridden = stage_runner.run(
        "trainer.evaluate",
        [
            *eval_args,
            "--output_dir",
            str(root / "eval-override"),
            "--think_prefill",
            "false",
            "--system_prompt",
            "",
        ],
    )
    assert overridden.returncode == 0, overridden.describe()
    return {"root": root, "sft": sft, "grpo": grpo, "eval": inherited, "override": overridden}


def test_chain_records_the_sft_prompt_and_the_next_stages_use_it(chain) -> None:
    root = chain["root"]
    expected = {
        "prompt_format": "plain",
        "system_prompt": SYSTEM,
        "think_prefill": True,
        "chat_template_kwargs": {},
    }
    assert _manifest_prompt(root / "sft") == expected
    assert contract.read_manifest(root / "sft").inputs["args"]["system_prompt"] == f"@{root / 'system.txt'}"
    assert _manifest_prompt(root / "grpo") == expected
    assert _manifest_prompt(root / "eval") == expected
    assert f"format from {root / 'sft' / 'r1_stage.json'}" in chain["grpo"].output, chain["grpo"].describe()
    assert f"format from {root / 'grpo' / 'r1_stage.json'}" in chain["eval"].output, chain["eval"].describe()
    # What the rewards and the eval saw is the whole response, prefill included.
    samples = [json.loads(line) for line in (root / "grpo" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["completion"].startswith("<think>\n") for s in samples)
    predictions = [
        json.loads(line) for line in (root / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    assert predictions and all(c.startswith("<think>\n") for p in predictions for c in p["completions"])


def test_chain_flag_overrides_the_record(chain) -> None:
    root = chain["root"]
    assert _manifest_prompt(root / "eval-override") == {
        "prompt_format": "plain",
        "system_prompt": "",
        "think_prefill": False,
        "chat_template_kwargs": {},
    }
    out = chain["override"].output
    assert "think prefill from --think_prefill" in out and "system prompt from --system_prompt" in out
    assert f"format from {root / 'grpo' / 'r1_stage.json'}" in out


def test_chain_evaluates_the_final_model_once(chain) -> None:
    """SFT (3 steps, eval every 2): evaluations at steps 2 and 3 (the final one); GRPO (2 steps, eval every 2):
    only the step-2 evaluation, which is the final model's."""
    root = chain["root"]

    def eval_steps(folder: Path, key: str) -> list[int]:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in records if key in r]

    assert eval_steps(root / "sft", "eval_loss") == [2, 3]
    assert eval_steps(root / "grpo", "eval_accuracy") == [2]
    assert chain["grpo"].output.count("eval at step") == 1, chain["grpo"].describe()
    assert "eval_accuracy" in contract.read_manifest(root / "grpo").metrics


def test_prompt_command_prints_the_recorded_prompt(chain, stage_runner) -> None:
    root = chain["root"]
    result = stage_runner.run_script(
        "r1-grpo", ["prompt", "--model_name_or_path", str(root / "grpo"), QUESTION]
    )
    assert result.returncode == 0, result.describe()
    assert result.output == f"{SYSTEM}\nUser: {QUESTION}\nAssistant: <think>\n"
    override = stage_runner.run_script(
        "r1-grpo",
        ["prompt", "--model_name_or_path", str(root / "grpo"), "--think_prefill", "false", QUESTION],
    )
    assert override.output == f"{SYSTEM}\nUser: {QUESTION}\nAssistant: "
    missing = stage_runner.run_script(
        "r1-grpo",
        ["prompt", "--model_name_or_path", str(root / "grpo"), "--system_prompt", "@/no/such", QUESTION],
    )
    assert (
        missing.returncode == 2
        and missing.output.strip() == "r1-grpo prompt: error: --system_prompt @/no/such: no such file"
    )
