"""The GRPO benchmarks against TRL (bench/grpo_vs_trl.py, bench/learning.py), run for real at toy sizes:
both trainers train, the effective settings read back from each are equal, and a difference is caught."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402
import grpo_bench  # noqa: E402

TOY = [
    "--steps",
    "3",
    "--prompts_per_step",
    "2",
    "--num_generations",
    "4",
    "--logits_forward_batch_size",
    "4",
    "--max_completion_length",
    "12",
    "--threads",
    "1",
    "--no-warm_up",
    # Two rounds (the bench's default is 5): both orders run (ours first, then TRL first) and the medians and
    # per-round ratios cover more than one round, in 4 worker processes instead of 10.
    "--rounds",
    "2",
]


def _run(script: str, argv: list[str], cwd: Path, stage_runner) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *argv],
        cwd=cwd,
        env=stage_runner.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def toy_comparison(
    warm_model_dir: Path, stage_runner, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    pytest.importorskip("trl")  # the bench extra (make setup installs it)
    out = tmp_path_factory.mktemp("gvt")
    proc = _run(
        "grpo_vs_trl.py", ["--model", str(warm_model_dir), "--out", str(out), *TOY], out, stage_runner
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    return out, proc.stdout


@pytest.mark.slow
def test_grpo_vs_trl_runs_both_trainers_with_equal_settings(toy_comparison) -> None:
    out, stdout = toy_comparison
    data = json.loads((out / "grpo_vs_trl.json").read_text())
    assert data["rounds"] == 2 and len(data["speedup_per_round"]) == 2
    assert [len(data["results"][name]) for name in ("ours", "trl")] == [2, 2]
    ours, trl = data["results"]["ours"][0], data["results"]["trl"][0]
    assert grpo_bench.compare_effective(ours["effective"], trl["effective"]) == []
    eff = ours["effective"]
    assert (
        eff["num_generations"],
        eff["completions_per_step"],
        eff["rows_per_forward"],
        eff["max_completion_length"],
    ) == (4, 8, 4, 12)
    assert eff["loss_aggregation"] == grpo_bench.AGGREGATION["grpo"] and eff["beta"] == 0.0
    for result in (ours, trl):
        assert [s["step"] for s in result["steps"]] == [1, 2, 3]
        for s in result["steps"]:
            assert s["wall_s"] > 0 and s["train_s"] > 0 and s["generate_s"] > 0 and s["score_s"] >= 0
            assert (
                0 <= s["reward_mean"] <= 11
                and 0 <= s["accuracy"] <= 1
                and 0 < s["completion_tokens"] <= 8 * 12
            )
        assert result["peak_rss_mib"] > 100
    assert (out / "grpo_vs_trl.png").stat().st_size > 10_000
    table = (out / "grpo_vs_trl.md").read_text()
    assert "| GRPO steps / min |" in table and "ours ÷ TRL" in table
    assert "GRPO step throughput: r1-grpo is" in stdout


@pytest.mark.slow
def test_a_setting_trl_resolves_differently_is_reported(
    toy_comparison, warm_model_dir: Path, tmp_path: Path
) -> None:
    """Build TRL's trainer as the worker does but with its own defaults for loss type and top-k: the
    comparison must name both differences."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    out, _ = toy_comparison
    ours = json.loads((out / "grpo_vs_trl.json").read_text())["results"]["ours"][0]["effective"]
    settings = grpo_bench.Settings(
        model=str(warm_model_dir),
        steps=3,
        prompts_per_step=2,
        num_generations=4,
        logits_forward_batch_size=4,
        max_completion_length=12,
    )
    config = grpo_bench.trl_config(settings, tmp_path, loss_type="bnpo", top_k=50)
    tokenizer = AutoTokenizer.from_pretrained(warm_model_dir)
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(warm_model_dir),
        args=config,
        reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
        train_dataset=Dataset.from_list([{"prompt": "x"}] * 8),
        processing_class=tokenizer,
    )
    diffs = grpo_bench.compare_effective(ours, grpo_bench.effective_trl(trainer, ["r1"]))
    assert sorted(d.split(":")[0] for d in diffs) == ["loss_aggregation", "top_k"], diffs


def test_settings_the_comparison_cannot_make_equal_are_refused() -> None:
    with pytest.raises(grpo_bench.BenchError, match="loss_type 'dapo'"):
        grpo_bench.Settings(model="m", loss_type="dapo").validate()
    with pytest.raises(grpo_bench.BenchError, match="must divide the 64 completions"):
        grpo_bench.Settings(model="m", logits_forward_batch_size=24).validate()


def test_compare_effective_names_every_difference() -> None:
    base = {k: 1 for k in grpo_bench.EFFECTIVE_KEYS}
    assert grpo_bench.compare_effective(base, dict(base)) == []
    assert grpo_bench.compare_effective(base, {**base, "temperature": 1.0 + 1e-12}) == []
    other = {**base, "temperature": 0.9, "num_generations": 8}
    other.pop("beta")
    assert grpo_bench.compare_effective(base, other) == [
        "num_generations: ours=1 trl=8",
        "temperature: ours=1 trl=0.9",
        "beta: ours=1 trl='<missing>'",
    ]


@pytest.mark.slow
def test_learning_bench_same_budget_and_held_out_accuracy(
    warm_model_dir: Path, stage_runner, tmp_path: Path
) -> None:
    pytest.importorskip("trl")
    proc = _run(
        "learning.py",
        [
            "--sft_dir",
            str(warm_model_dir),
            "--out",
            str(tmp_path),
            "--budget_s",
            "4",
            "--seeds",
            "1",
            "--max_eval_samples",
            "8",
            "--prompts_per_step",
            "2",
            "--num_generations",
            "4",
            "--logits_forward_batch_size",
            "4",
            "--max_completion_length",
            "12",
            "--threads",
            "1",
            "--no-warm_up",
        ],
        tmp_path,
        stage_runner,
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    data = json.loads((tmp_path / "learning.json").read_text())
    assert data["budgets_s"] == [4.0] and data["effective"]["completions_per_step"] == 8
    assert [(r["budget_s"], r["trainer"]) for r in data["summary"]] == [(4.0, "ours"), (4.0, "trl")]
    for name in ("ours", "trl"):
        (run,) = data["results"]["4.0"][name]
        assert run["seed"] == 1 and run["steps_done"] == len(run["steps"]) >= 1
        # Stops at the first step past the budget: the steps before the last one fit in it. (No upper
        # bound on loop_s: one step's time on a loaded machine is not this test's to judge.)
        assert sum(s["wall_s"] for s in run["steps"][:-1]) < 4 and run["loop_s"] >= 3, run["steps"]
        assert 0 <= run["accuracy"] <= 1
    assert (tmp_path / "learning.png").stat().st_size > 10_000
    assert "gain r1-grpo - TRL:" in proc.stdout


# ---------------------------------------------------------------------------------------------
# bench/gpu_check.py: what runs without a GPU


def test_gpu_check_flags_are_the_stages_own(tmp_path: Path) -> None:
    from trainer.grpo import GRPOArgs
    from trainer.r1.data import DataArgs
    from trainer.runtime import parse_args
    from trainer.sft import SFTArgs

    args = gpu_check.parse_args(["--device", "cpu", "--plugins", "ddp"])
    assert args.attn == "sdpa" and args.plugins == ["ddp"]
    model, out = tmp_path / "m", tmp_path / "o"
    _, sft = parse_args((DataArgs, SFTArgs), gpu_check.sft_flags(args, "zero2", model, out), prog="sft")
    _, grpo = parse_args((DataArgs, GRPOArgs), gpu_check.grpo_flags(args, "zero2", model, out), prog="grpo")
    for parsed in (sft, grpo):
        assert parsed.bf16 and parsed.plugin == "zero2" and parsed.attn_implementation == "sdpa"
    assert grpo.beta > 0 and grpo.num_iterations == 2 and grpo.old_logprobs == "trainer"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "cpu"], "--plugins zero2 needs CUDA"),
        (["--device", "cpu", "--plugins", "ddp", "--grpo_steps", "3"], "--grpo_steps must be even"),
        (["--device", "cpu", "--plugins", "ddp", "--new_tokens", "0"], "--new_tokens must be >= 1"),
    ],
)
def test_gpu_check_bad_flags(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_gpu_check_rollout_measurement_on_cpu(tiny_model_dir: Path) -> None:
    """The in-process part on CPU: the sampler and generate make the same tokens; bf16 weights give a gap."""
    result = gpu_check.measure_rollout(
        tiny_model_dir, "cpu", "sdpa", prompts=2, generations=2, prompt_len=8, new_tokens=6, repeats=1
    )
    assert result["tokens_per_run"] == 24
    assert result["sampler_tokens_per_s"] > 0 and result["generate_tokens_per_s"] > 0
    assert 0 < result["bf16_weights_logprob_gap_mean"] <= result["bf16_weights_logprob_gap_max"]
    assert "gpu_memory_peak_gib" not in result


def test_gpu_check_reads_the_grpo_metrics(tmp_path: Path) -> None:
    records = [
        {"step": 1, "reward_mean": 0.5, "kl": 0.0, "logprob_gap_mean": 0.002, "logprob_gap_max": 0.05,
         "logprob_gap_off_fraction": 0.1, "rollout_tokens_per_s": 900.0, "gpu_memory_peak_gib": 1.5,
         "ratio_mean": 1.0},
        {"step": 2, "reward_mean": 0.5, "kl": 0.0, "ratio_mean": 1.0003, "clip_ratio": 0.0,
         "rollout_tokens_per_s": 900.0, "gpu_memory_peak_gib": 1.75},
        {"step": 2, "eval_accuracy": 0.1},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = gpu_check.grpo_summary(tmp_path)
    assert summary == {
        "kl_step0": 0.0,
        "logprob_gap_mean": 0.002,
        "logprob_gap_max": 0.05,
        "logprob_gap_off_fraction": 0.1,
        "rollout_tokens_per_s": 900.0,
        "gpu_memory_peak_gib": 1.75,
        "ratio_mean_pass2": 1.0003,
        "clip_ratio_pass2": 0.0,
    }
    assert gpu_check.grpo_summary(tmp_path / "missing") == {}
