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
        assert 3 <= run["loop_s"] < 4 + 30  # stops at the first step past the budget
        assert 0 <= run["accuracy"] <= 1
    assert (tmp_path / "learning.png").stat().st_size > 10_000
    assert "gain r1-grpo - TRL:" in proc.stdout
