"""The GRPO stage: a 2-process torchrun run on the Colossal-AI Booster (ddp), bit-exact resume, flag errors,
and the dynamic-sampling refill of `make_rollout`, in process with the real sampler and rewards."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from trainer import grpo
from trainer.contract import output as contract
from trainer.r1.data import load_examples
from trainer.r1.prompt import DEFAULT_PROMPT, Prompter
from trainer.rl.rollout import plan_chunks, rows_to_train, select_rows

# Fields of a metrics.jsonl record that measure wall-clock time (everything else must repeat exactly).
TIMING_KEYS = {"time", "generate_s", "score_s", "train_s", "rollout_s", "rollout_tokens_per_s", "runtime_s"}
# 25 digits: more tokens than --max_completion_length 24 allows (digits are single tokens), so no
# completion can ever be this answer and a group asked for it has accuracy reward 0 in every sample.
UNREACHABLE = "1234567890123456789012345"


def grpo_argv(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "2",
        "--num_generations",
        "4",
        "--max_completion_length",
        "24",
        "--inference_batch_size",
        "2",
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        "--logging_steps",
        "1",
        "--learning_rate",
        "1e-4",
        "--beta",
        "0.04",
        "--dynamic_sampling",
        "--report_to",
        "none",
        "--evaluation_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--max_eval_samples",
        "4",
        "--plugin",
        "ddp",
        "--seed",
        "5",
    ]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _records(folder: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def _untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture(scope="module")
def grpo_run(warm_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("grpo") / "grpo"
    result = stage_runner.run("trainer.grpo", grpo_argv(warm_model_dir, arith_jsonl, out), nproc=2)
    assert result.returncode == 0, result.describe()
    return out, result


def test_two_process_grpo_run(grpo_run, warm_model_dir: Path) -> None:
    out, result = grpo_run
    from transformers import AutoModelForCausalLM

    assert [s for s, _ in contract.complete_checkpoints(out)] == [1]
    state = json.loads((out / "checkpoint-1" / contract.TRAINER_STATE_NAME).read_text())
    assert (state["step"], state["world_size"], state["stage"], state["total_steps"]) == (1, 2, "grpo", 2)
    # Each rank's own prompt position (dynamic sampling may have drawn more prompts on one rank).
    assert len(state["prompt_positions"]) == 2 and all(p >= 2 for p in state["prompt_positions"])
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= {p.name for p in (out / "checkpoint-1").iterdir()}

    manifest = contract.verify_stage_output(out, "grpo")
    assert manifest.steps == 2 and list(manifest.weights) == ["model.safetensors"]
    assert (
        manifest.inputs["args"]["num_generations"] == 4
        and manifest.inputs["args"]["dynamic_sampling"] is True
    )
    assert {"reward_mean", "accuracy", "format_rate", "eval_accuracy", "eval_format_rate"} <= set(
        manifest.metrics
    )
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"

    steps = [r for r in _records(out) if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for key in (
            "loss",
            "reward_mean",
            "reward_std",
            "kl",
            "entropy",
            "format_rate",
            "completion_length_mean",
        ):
            assert math.isfinite(r[key]), (key, r)
        assert r["completion_length_max"] <= 24 and r["temperature"] == 1.0
    # With --dynamic_sampling every trained group had rewards that differ.
    assert steps[0]["reward_std"] > 0
    # The last step (2) is an eval step: that evaluation is the final model's, not run again at the end.
    assert [r["step"] for r in _records(out) if "eval_accuracy" in r] == [2]
    assert result.output.count("eval at step") == 1, result.describe()
    trained, start = _tensors(out), _tensors(warm_model_dir)
    assert any(not torch.equal(trained[k], start[k]) for k in start), "GRPO did not change the weights"


def test_resume_is_bit_exact(
    grpo_run, warm_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    reference, _ = grpo_run
    out = tmp_path / "grpo"
    shutil.copytree(reference, out)
    # What a kill after checkpoint-1 leaves: no final export, no manifest.
    (out / "model.safetensors").unlink()
    (out / contract.MANIFEST_NAME).unlink()
    result = stage_runner.run("trainer.grpo", grpo_argv(warm_model_dir, arith_jsonl, out), nproc=2)
    assert result.returncode == 0, result.describe()
    assert f"resumed from {out / 'checkpoint-1'} (step 1)" in result.output
    contract.verify_stage_output(out, "grpo")
    got, want = _tensors(out), _tensors(reference)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    # Same prompts, same samples (the sampling generator and prompt positions were restored), same losses.
    assert _untimed(_records(out)) == _untimed(_records(reference))
    assert _records(out, "samples.jsonl") == _records(reference, "samples.jsonl")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num_generations", "1"], "--num_generations must be >= 2: advantages are relative to the group"),
        (["--reward_funcs", "r1", "length"], "--reward_funcs ['length']: known reward functions are"),
        (["--reward_weights", "1.0", "2.0"], "--reward_weights has 2 values for 1 --reward_funcs"),
        (["--initial_temperature", "0"], "--initial_temperature must be > 0"),
        (["--loss_type", "ppo"], "--loss_type 'ppo': expected one of grpo, dapo, dr_grpo"),
        (
            ["--epsilon", "0.2", "--epsilon_high", "0.1"],
            "--beta and --epsilon must be >= 0 and --epsilon_high >= --epsilon",
        ),
        (["--top_p", "0"], "--top_p must be in (0, 1]"),
        (["--plugin", "zero9"], "--plugin 'zero9': expected one of ddp, zero2, zero2_cpu, gemini, 3d"),
        (["--max_completion_length", "0"], "--max_completion_length must be >= 1, got 0"),
        (["--max_train_seconds", "-1"], "--max_train_seconds must be >= 0 (0: no limit), got -1.0"),
    ],
)
def test_bad_flag_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = grpo_argv(Path("unused"), Path("unused.jsonl"), tmp_path / "out") + extra
    assert grpo.main(argv) == 2
    assert f"r1-grpo grpo: error: {message}" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_max_train_seconds_ends_the_run_like_max_steps(
    warm_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    """A time limit shorter than one step: one step is done, then the final model and manifest are written."""
    out = tmp_path / "grpo"
    argv = grpo_argv(warm_model_dir, arith_jsonl, out)
    argv[argv.index("--max_steps") + 1] = "50"
    argv[argv.index("--save_steps") + 1] = "0"
    result = stage_runner.run("trainer.grpo", argv + ["--max_train_seconds", "0.001"])
    assert result.returncode == 0, result.describe()
    assert "--max_train_seconds 0.001 reached after 1 steps" in result.output
    manifest = contract.verify_stage_output(out, "grpo")
    assert manifest.steps == 1 and manifest.inputs["args"]["max_train_seconds"] == 0.001
    assert [r["step"] for r in _records(out) if "reward_mean" in r] == [1]
    assert not list(out.glob("checkpoint-*"))


def test_unknown_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        grpo.main(grpo_argv(Path("m"), Path("d.jsonl"), tmp_path / "out") + ["--temprature", "0.7"])
    assert e.value.code == 2
    assert "r1-grpo grpo: error: unrecognized arguments: --temprature 0.7" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Prompt stream and dynamic sampling, in process


def test_prompt_stream_shards_and_resumes() -> None:
    from trainer.r1.data import Example

    examples = [Example(f"q{i}", "r", str(i), f"t:{i}") for i in range(10)]
    ranks = [grpo.PromptStream(examples, seed=1, rank=r, world_size=2) for r in range(2)]
    first_epoch = [ex.problem for step in range(5) for s in ranks for ex in s.take(1)]
    assert sorted(first_epoch) == sorted(e.problem for e in examples)  # the ranks interleave one global order
    later = [ranks[0].take(3) for _ in range(2)]
    resumed = grpo.PromptStream(examples, seed=1, rank=0, world_size=2, position=5)
    assert [resumed.take(3) for _ in range(2)] == later
    assert ranks[0].position == 11


@pytest.fixture(scope="module")
def policy(warm_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(warm_model_dir), AutoTokenizer.from_pretrained(warm_model_dir)


def _rollout(policy, examples, *, dynamic: bool, rounds: int = 8, seed: int = 0):
    model, tokenizer = policy
    args = grpo.GRPOArgs(
        model_name_or_path="m",
        output_dir="o",
        num_generations=8,
        inference_batch_size=4,
        max_completion_length=24,
        reward_funcs=["accuracy"],
        beta=0.0,
        dynamic_sampling=dynamic,
        max_resample_rounds=rounds,
    )
    args.validate()
    stream = grpo.PromptStream(examples, seed=3, rank=0, world_size=1)
    timings = {"generate_s": 0.0, "score_s": 0.0}
    rollout = grpo.make_rollout(
        model,
        None,
        tokenizer,
        stream,
        2,
        1.0,
        args,
        torch.device("cpu"),
        torch.Generator().manual_seed(seed),
        {},
        timings,
        Prompter(DEFAULT_PROMPT, tokenizer),
    )
    return rollout, stream


def _with_unreachable_first_prompts(examples: list, n: int) -> list:
    # The stream's order depends only on the number of examples and the seed: find its first n and make
    # their answers unreachable, so those groups are uninformative (all rewards 0) by construction.
    first = {id(ex) for ex in grpo.PromptStream(examples, seed=3, rank=0, world_size=1).take(n)}
    return [dataclasses.replace(ex, answer=UNREACHABLE) if id(ex) in first else ex for ex in examples]


def test_dynamic_sampling_refills_uninformative_groups(policy, arith_jsonl: Path) -> None:
    examples, _ = load_examples(str(arith_jsonl), "train")
    examples = _with_unreachable_first_prompts(examples, 2)

    plain, stream = _rollout(policy, examples, dynamic=False)
    assert stream.position == 2
    assert plain.answers == [UNREACHABLE] * 16
    assert plain.rewards.eq(0).all() and plain.advantages.eq(0).all()  # nothing to learn from

    rollout, stream = _rollout(policy, examples, dynamic=True)
    refill_rounds, rest = divmod(stream.position - 2, 4)
    assert rest == 0 and 1 <= refill_rounds <= 8, stream.position
    assert rollout.input_ids.shape[0] == 16 and rollout.stats["groups"] == 2
    assert UNREACHABLE not in rollout.answers
    assert rollout.stats["zero_std_sum"] == 1.0  # reported for the groups first drawn: both uninformative
    for g in range(2):
        group = slice(8 * g, 8 * g + 8)
        assert len(set(rollout.answers[group])) == 1
        assert rollout.rewards[group].unique().numel() > 1, "a kept group has equal rewards"
        assert rollout.advantages[group].abs().sum() > 0
        # The rewards are the accuracy of each completion against its own problem's answer.
        for text, answer, reward in zip(
            rollout.texts[group], rollout.answers[group], rollout.rewards[group].tolist(), strict=True
        ):
            from trainer.r1.rewards import accuracy_reward

            assert reward == accuracy_reward(text, answer)


def test_dynamic_sampling_falls_back_when_nothing_is_informative(policy, arith_jsonl: Path) -> None:
    examples, _ = load_examples(str(arith_jsonl), "train")
    examples = [dataclasses.replace(ex, answer=UNREACHABLE) for ex in examples]
    rollout, stream = _rollout(policy, examples, dynamic=True, rounds=2)
    assert stream.position == 2 + 2 * 4  # tried the allowed rounds, then gave up
    assert rollout.input_ids.shape[0] == 16  # trains on the original groups (zero advantages)
    assert rollout.advantages.eq(0).all()


def _rollout_with_advantages(advantages: list[float], group_size: int) -> grpo.Rollout:
    n = len(advantages)
    ids = torch.arange(n)[:, None].repeat(1, 3)
    return grpo.Rollout(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        completion_ids=ids[:, 1:],
        completion_mask=torch.ones(n, 2),
        sample_logprobs=torch.zeros(n, 2),
        advantages=torch.tensor(advantages),
        rewards=torch.zeros(n),
        temperature=1.0,
        texts=[""] * n,
        answers=[""] * n,
        stats={},
    )


def test_rows_to_train_skips_only_groups_without_advantage() -> None:
    def rows(rollout: grpo.Rollout, chunk: int, skip: bool = True):
        return rows_to_train(rollout, chunk, group_size=2, skip_zero_advantage=skip)

    # Groups of 2: group 1 and 3 have all-zero advantages; group 2 has one zero row (it is informative).
    rollout = _rollout_with_advantages([1, -1, 0, 0, 0.5, 0, 0, 0], 2)
    assert rows(rollout, chunk=2).tolist() == [0, 1, 4, 5]
    # Chunks of 4 rows: the 2 informative groups fill one chunk.
    assert rows(rollout, chunk=4).tolist() == [0, 1, 4, 5]
    # Nothing informative: one group still runs, so the gradients are defined (zeros).
    silent = _rollout_with_advantages([0] * 8, 2)
    assert rows(silent, chunk=4).tolist() == [0, 1]
    # Everything informative, a KL term, the flag off, or chunks that split groups: every row.
    assert rows(_rollout_with_advantages([1, -1] * 4, 2), chunk=4) is None
    assert rows(rollout, chunk=3) is None
    assert rows(rollout, chunk=2, skip=False) is None
    with_kl = dataclasses.replace(rollout, ref_logprobs=torch.zeros(8, 2))
    assert rows(with_kl, chunk=2) is None
    selected = select_rows(rollout, torch.tensor([4, 5]))
    assert selected.advantages.tolist() == [0.5, 0.0] and selected.input_ids[:, 0].tolist() == [4, 5]


def test_skipping_zero_advantage_groups_gives_the_same_update(
    warm_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    # The format reward: the warm model writes the R1 format often but not always, so some groups of 4
    # samples are all formatted or all not (zero advantage), others mixed.
    runs = {}
    for skip in ("true", "false"):
        out = tmp_path / f"skip-{skip}"
        argv = [
            "--model_name_or_path",
            str(warm_model_dir),
            "--dataset_name",
            str(arith_jsonl),
            "--output_dir",
            str(out),
            "--per_device_train_batch_size",
            "8",
            "--num_generations",
            "4",
            "--inference_batch_size",
            "8",
            "--logits_forward_batch_size",
            "4",
            "--max_completion_length",
            "24",
            "--max_steps",
            "1",
            "--save_steps",
            "0",
            "--logging_steps",
            "1",
            "--learning_rate",
            "1e-3",
            "--beta",
            "0",
            "--reward_funcs",
            "format",
            "--evaluation_strategy",
            "no",
            "--report_to",
            "none",
            "--plugin",
            "ddp",
            "--seed",
            "5",
            "--skip_zero_advantage_groups",
            skip,
        ]
        result = stage_runner.run("trainer.grpo", argv, nproc=2)
        assert result.returncode == 0, result.describe()
        runs[skip] = (_tensors(out), [r for r in _records(out) if "reward_mean" in r][0])
    (skipped, with_skip), (full, without_skip) = runs["true"], runs["false"]
    assert without_skip["trained_fraction"] == 1.0
    assert 0 < with_skip["trained_fraction"] < 1, with_skip
    assert with_skip["reward_mean"] == without_skip["reward_mean"]  # same samples
    assert with_skip["loss"] == pytest.approx(without_skip["loss"], rel=1e-5, abs=1e-8)
    start = _tensors(warm_model_dir)
    assert any(not torch.equal(full[k], start[k]) for k in start), (
        "no informative group: the test shows nothing",
        without_skip,
    )
    for k in start:
        torch.testing.assert_close(skipped[k], full[k], rtol=1e-5, atol=1e-7)


def test_plan_chunks_matches_the_rank_that_needs_most() -> None:
    assert plan_chunks(8, 4) == 2 and plan_chunks(9, 4) == 3 and plan_chunks(1, 4) == 1
    # Another rank needs 3 chunks: this one runs 3 (the extra one with zero weight), never fewer.
    assert plan_chunks(4, 4, max_over_ranks=lambda n: max(n, 3)) == 3
    assert plan_chunks(12, 4, max_over_ranks=lambda n: max(n, 1)) == 3
    for bad in ({"n_rows": 0, "chunk": 4}, {"n_rows": 4, "chunk": 0}, {"n_rows": 4.0, "chunk": 4}):
        with pytest.raises(ValueError, match="n_rows|chunk"):
            plan_chunks(**bad)


def test_reference_model_takes_the_policys_dtype_and_attention(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    # What the ZeRO plugin under --bf16 leaves (module.to(bfloat16): buffers too), and a model loaded in
    # bfloat16 (its rotary frequencies stay float32); each with another attention than the copy's.
    zero_cast = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    loaded = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, torch_dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    for policy in (zero_cast.to(torch.bfloat16), loaded):
        initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
        ref = grpo.reference_model(initial, policy)
        assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
        assert [b.dtype for b in ref.buffers()] == [b.dtype for b in policy.buffers()]
        assert ref.config._attn_implementation == "sdpa"
        assert not ref.training and not any(p.requires_grad for p in ref.parameters())
        with torch.no_grad():
            assert torch.equal(ref(ids).logits, policy(ids).logits)  # same weights, dtypes and kernels


def test_resume_refuses_a_checkpoint_of_another_max_steps(
    grpo_run, warm_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    reference, _ = grpo_run
    out = tmp_path / "grpo"
    shutil.copytree(reference / "checkpoint-1", out / "checkpoint-1")
    argv = grpo_argv(warm_model_dir, arith_jsonl, out)
    argv[argv.index("--max_steps") + 1] = "3"
    result = stage_runner.run("trainer.grpo", argv, nproc=2)  # same world size: only the total differs
    # torchrun exits 1 when a worker fails; every worker exited 2 (bad input) with the message.
    assert result.returncode != 0, result.describe()
    assert set(re.findall(r"exitcode\s*: (-?\d+)", result.output)) == {"2"}, result.describe()
    message = f"r1-grpo grpo: error: --max_steps: {out / 'checkpoint-1'} belongs to a run of 2 steps, this run has 3"
    assert message in result.output
    assert not (out / "model.safetensors").exists()


def _bf16_argv(model: Path, data: Path, out: Path, old_logprobs: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "2",
        "--num_generations",
        "4",
        "--max_completion_length",
        "24",
        "--max_steps",
        "2",
        "--num_iterations",
        "2",
        "--save_steps",
        "0",
        "--logging_steps",
        "1",
        "--learning_rate",
        "0",  # the weights stay the initial ones: step 2 re-scores exactly the first pass's policy
        "--beta",
        "0.04",
        "--bf16",
        "--old_logprobs",
        old_logprobs,
        "--report_to",
        "none",
        "--plugin",
        "ddp",
        "--seed",
        "5",
    ]


def test_bf16_kl_is_zero_at_step_0_and_old_logprobs_are_the_trainers(
    warm_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    runs = {}
    for old in ("trainer", "sampler"):
        out = tmp_path / old
        result = stage_runner.run("trainer.grpo", _bf16_argv(warm_model_dir, arith_jsonl, out, old))
        assert result.returncode == 0, result.describe()
        runs[old] = [r for r in _records(out) if "reward_mean" in r]
    for records in runs.values():
        first, second = records
        # The reference is the policy's own forward (same dtype, attention, autocast): KL exactly 0.
        assert first["kl"] == 0.0 and second["kl"] == 0.0, records
        assert first["ratio_mean"] == 1.0 and first["clip_ratio"] == 0.0  # on-policy first pass
        # The sampler's bf16 log-probs are not the trainer's; both passes log the rollout's gap.
        assert 0 < first["logprob_gap_mean"] <= first["logprob_gap_max"], first
        assert 0 <= first["logprob_gap_off_fraction"] <= 1
        assert second["logprob_gap_mean"] == first["logprob_gap_mean"]
        # The update ran (one process: equal chunks across ranks is the 2-process dynamic-sampling test's).
        assert first["rank_chunks_max"] >= 1
    # Unchanged weights: the first pass's own log-probs give ratio 1 exactly; the sampler's give noise.
    assert runs["trainer"][1]["ratio_mean"] == 1.0 and runs["trainer"][1]["clip_ratio"] == 0.0
    assert runs["sampler"][1]["ratio_mean"] != 1.0
    assert runs["sampler"][0]["logprob_gap_mean"] == runs["trainer"][0]["logprob_gap_mean"]  # same samples


@pytest.mark.parametrize(
    "extra",
    [
        ["--beta", "0.04"],
        ["--beta", "0", "--skip_zero_advantage_groups", "true"],
        ["--beta", "0", "--skip_zero_advantage_groups", "false"],
    ],
    ids=["kl", "beta0-skip", "beta0-noskip"],
)
def test_dynamic_sampling_runs_equal_chunks_on_every_rank(
    extra: list[str], warm_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    """No refill rounds: each rank trains on the informative groups it drew, so their row counts differ;
    every rank must still run the same number of forward/backward chunks (ZeRO and Gemini would hang)."""
    out = tmp_path / "grpo"
    argv = grpo_argv(warm_model_dir, arith_jsonl, out)
    settings = {
        "--per_device_train_batch_size": "8",
        "--inference_batch_size": "8",
        "--max_steps": "3",
        "--save_steps": "0",
        "--evaluation_strategy": "no",
        "--beta": extra[1],
    }
    for flag, value in settings.items():
        argv[argv.index(flag) + 1] = value
    argv += ["--reward_funcs", "format", "--max_resample_rounds", "0", "--logits_forward_batch_size", "4"]
    argv += extra[2:]
    result = stage_runner.run("trainer.grpo", argv, nproc=2, timeout=420)
    assert result.returncode == 0, result.describe()
    steps = [r for r in _records(out) if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["rank_chunks_min"] for r in steps] == [r["rank_chunks_max"] for r in steps], steps
    assert any(r["rank_trained_rows_min"] != r["rank_trained_rows_max"] for r in steps), (
        "the ranks trained on equal row counts at every step: the test shows nothing",
        steps,
    )
