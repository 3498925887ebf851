"""--reward_module: a user reward function from a file, run in a killable helper process (the guards of the
built-in rewards: a timeout or an exception is reward 0 and counted), and its flag checks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from trainer import grpo
from trainer.r1.reward_module import RewardModule, RewardModuleError, check_specs, parse_spec
from trainer.r1.rewards import REWARD_FUNCS, score

# A hang guard, not a speed target: a timed-out call returns after timeout_s (1 s here) plus a kill; without
# the guard it would never return. 30 s leaves a loaded 2-core machine a wide margin.
HANG_GUARD_S = 30.0

REWARDS = """
import os
import time

from helper_lib import BONUS  # a sibling module: the file's folder is on sys.path


def length_bonus(response, ground_truth):
    print("printed by the reward function")  # must not break the protocol
    return BONUS * len(response) / 10


def exact(response: str, ground_truth: str) -> bool:
    return response.strip() == ground_truth


def moody(response, ground_truth):
    if response == "raise":
        raise ZeroDivisionError("no luck")
    if response == "sleep":
        time.sleep(600)
    if response == "die":
        os._exit(3)
    if response == "text":
        return "ten"
    if response == "nan":
        return float("nan")
    return 2.5


def one_argument(response):
    return 1.0


async def later(response, ground_truth):
    return 1.0


NOT_A_FUNCTION = 3
"""


@pytest.fixture
def reward_file(tmp_path: Path) -> Path:
    (tmp_path / "helper_lib.py").write_text("BONUS = 2\n")
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def test_module_reward_is_called_like_the_builtin_ones(
    reward_file: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    bonus = RewardModule(f"{reward_file}:length_bonus")
    exact = RewardModule(f"{reward_file}:exact")
    try:
        assert bonus.name == "length_bonus" and bonus("abcde", "1") == 1.0
        assert exact(" 7 ", "7") == 1.0 and exact("8", "7") == 0.0  # a bool is a number
        total, per_func = score(
            ["<think>x</think><answer>7</answer>", "7"],
            ["7", "7"],
            ["r1", "exact"],
            [1.0, 0.5],
            extra={"exact": exact},
        )
        assert per_func == {"r1": [10.0, 0.0], "exact": [0.0, 1.0]} and total == [10.0, 0.5]
        assert (bonus.stats.calls, bonus.stats.errors, bonus.stats.timeouts) == (1, 0, 0)
    finally:
        bonus.close()
        exact.close()
    assert "printed by the reward function" in capfd.readouterr().err


def test_errors_and_timeouts_give_zero_and_are_counted(
    reward_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    moody = RewardModule(f"{reward_file}:moody", timeout_s=1.0)
    try:
        moody.start()
        assert moody("fine", "1") == 2.5
        for bad in ("raise", "text", "nan", "raise"):
            assert moody(bad, "1") == 0.0
        assert (moody.stats.errors, moody.stats.timeouts, moody.stats.restarts) == (4, 0, 0)
        started = time.monotonic()
        assert moody("sleep", "1") == 0.0
        assert time.monotonic() - started < HANG_GUARD_S
        assert moody.stats.timeouts == 1
        assert moody("fine", "1") == 2.5 and moody.stats.restarts == 1  # a fresh helper took over
        assert moody("die", "1") == 0.0 and moody.stats.errors == 5
        assert moody("fine", "1") == 2.5 and moody.stats.restarts == 2
        assert moody.stats.calls == 9
    finally:
        moody.close()
    logged = caplog.text
    assert "ZeroDivisionError: no luck" in logged and logged.count("ZeroDivisionError") == 1  # once per kind
    assert "returned str 'ten', not a number" in logged and "returned nan, not a finite number" in logged
    assert "took over 1s" in logged and "helper process died" in logged


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{dir}/my_rewards.py:nope", "{dir}/my_rewards.py has no function 'nope' (functions: exact, "),
        ("{dir}/my_rewards.py:NOT_A_FUNCTION", "NOT_A_FUNCTION is a int, not a function"),
        ("{dir}/my_rewards.py:one_argument", "one_argument(response) cannot be called as"),
        ("{dir}/my_rewards.py:later", "later is async"),
        ("{dir}/broken.py:f", "{dir}/broken.py: importing it failed: ModuleNotFoundError"),
    ],
)
def test_unusable_functions_are_named_at_start(reward_file: Path, spec: str, message: str) -> None:
    (reward_file.parent / "broken.py").write_text(
        "import no_such_module_here\n\ndef f(r, g):\n    return 1\n"
    )
    spec = spec.format(dir=reward_file.parent)
    module = RewardModule(spec)
    with pytest.raises(RewardModuleError) as e:
        module.start()
    assert str(e.value).startswith(f"--reward_module {spec}: ")
    assert message.format(dir=reward_file.parent) in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rewards.py", "--reward_module 'rewards.py': expected path/to/file.py:function"),
        ("rewards.py:", "--reward_module 'rewards.py:': expected path/to/file.py:function"),
        ("rewards.py:2x", "--reward_module 'rewards.py:2x': '2x' is not a Python function name"),
        ("rewards.txt:f", "--reward_module 'rewards.txt:f': rewards.txt is not a .py file"),
    ],
)
def test_malformed_specs(spec: str, message: str) -> None:
    with pytest.raises(RewardModuleError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        parse_spec(spec)


def test_check_specs_names_and_clashes(reward_file: Path) -> None:
    builtin = set(REWARD_FUNCS)
    assert check_specs([f"{reward_file}:exact", f"{reward_file}:moody"], builtin) == ["exact", "moody"]
    with pytest.raises(RewardModuleError, match=r"/missing\.py: no such file$"):
        check_specs([f"{reward_file.parent}/missing.py:f"], builtin)
    (reward_file.parent / "format.py").write_text("def format(r, g):\n    return 1\n")
    with pytest.raises(RewardModuleError, match="'format' is the name of a built-in reward"):
        check_specs([f"{reward_file.parent}/format.py:format"], builtin)
    with pytest.raises(RewardModuleError, match="a second reward module function named 'exact'"):
        check_specs([f"{reward_file}:exact", f"{reward_file}:exact"], builtin)


def _argv(out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        "unused",
        "--dataset_name",
        "unused.jsonl",
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        *extra,
    ]


def test_grpo_flag_errors_exit_2_before_the_stage_folder(
    reward_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = f"{reward_file}:exact"
    cases = [
        ([], f"--reward_module {spec}: add 'exact' to --reward_funcs (and its weight to --reward_weights)"),
        (
            ["--reward_funcs", "r1", "exakt"],
            "--reward_funcs ['exakt']: known reward functions are r1, format",
        ),
        (
            ["--reward_funcs", "exact", "--reward_module_timeout_seconds", "0"],
            "--reward_module_timeout_seconds must be > 0, got 0.0",
        ),
        (
            ["--reward_funcs", "exact", "exact"],
            "--reward_funcs ['exact', 'exact']: a reward function is listed twice",
        ),
    ]
    out = tmp_path / "out"
    for extra, message in cases:
        assert grpo.main(_argv(out, "--reward_module", spec, *extra)) == 2
        assert f"r1-grpo grpo: error: {message}" in capsys.readouterr().out
    # The function's own checks run in its helper, still before the stage's folder is made.
    bad = f"{reward_file}:one_argument"
    assert grpo.main(_argv(out, "--reward_module", bad, "--reward_funcs", "one_argument")) == 2
    printed = capsys.readouterr().out
    assert f"r1-grpo grpo: error: --reward_module {bad}: {reward_file}: one_argument(response)" in printed
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# A real GRPO run: two --reward_module functions weighted with r1, eval over two datasets


STAGE_REWARDS = """
def short(response, ground_truth):
    return 1.0 if len(response) < 40 else 0.0


def flaky(response, ground_truth):
    raise RuntimeError("this reward always fails")
"""


def test_grpo_run_with_module_rewards_and_eval_per_dataset(
    warm_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    import hashlib
    import json

    from tests.conftest import addition_rows
    from trainer.contract import output as contract

    rewards = tmp_path / "site_rewards.py"
    rewards.write_text(STAGE_REWARDS)
    other = tmp_path / "doubles.jsonl"  # a second eval set: other problems, the same schema
    rows = [{**row, "question": row["question"].replace("Compute", "Add")} for row in addition_rows()[:20]]
    other.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "grpo"
    argv = ["--model_name_or_path", str(warm_model_dir), "--dataset_name", str(arith_jsonl)]
    argv += ["--output_dir", str(out), "--per_device_train_batch_size", "2", "--num_generations", "4"]
    argv += ["--max_completion_length", "16", "--inference_batch_size", "2", "--max_steps", "1"]
    argv += ["--save_steps", "0", "--logging_steps", "1", "--report_to", "none", "--plugin", "ddp"]
    argv += ["--reward_module", f"{rewards}:short", f"{rewards}:flaky"]
    argv += ["--reward_funcs", "r1", "short", "flaky", "--reward_weights", "1", "0.5", "0.1"]
    # The eval split: the additions, then the other set (one --dataset_name list serves both splits).
    argv[argv.index("--dataset_name") + 1] = f"{arith_jsonl},{other}"
    argv += ["--evaluation_strategy", "steps", "--eval_steps", "1", "--max_eval_samples", "8"]
    result = stage_runner.run("trainer.grpo", argv, nproc=2)
    assert result.returncode == 0, result.describe()
    assert result.output.count("this reward always fails (reward 0; counted") == 2, (
        result.describe()
    )  # per rank

    step = next(
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line
    )
    scored = 2 * 2 * 4  # ranks x prompts x generations
    assert 0.0 <= step["reward_short_mean"] <= 1.0 and step["reward_short_errors"] == 0
    assert step["reward_flaky_errors"] == scored and step["reward_flaky_mean"] == 0.0
    assert step["reward_flaky_timeouts"] == 0 and step["reward_short_timeouts"] == 0

    manifest = contract.verify_stage_output(out, "grpo")
    digest = hashlib.sha256(rewards.read_bytes()).hexdigest()
    assert manifest.inputs["reward_modules"] == {
        "short": {"spec": f"{rewards}:short", "sha256": digest},
        "flaky": {"spec": f"{rewards}:flaky", "sha256": digest},
    }
    assert manifest.inputs["args"]["reward_funcs"] == ["r1", "short", "flaky"]
    m = manifest.metrics
    assert (m["reward_flaky_calls_total"], m["reward_flaky_errors_total"]) == (scored, scored)
    assert (m["reward_short_calls_total"], m["reward_short_errors_total"]) == (scored, 0)
    # The held-out evaluation, over both sets and per set (4 problems each: shared by size, 81 and 20).
    names = [str(arith_jsonl), str(other)]
    for key in ("eval_accuracy", "eval_format_rate"):
        assert 0.0 <= m[key] <= 1.0
        assert {f"{key}/{name}" for name in names} <= set(m)
    counts = {str(arith_jsonl): 6, str(other): 2}  # 8 shared in proportion to 81 and 20
    overall = sum(m[f"eval_accuracy/{n}"] * c for n, c in counts.items()) / 8
    assert m["eval_accuracy"] == pytest.approx(overall)
