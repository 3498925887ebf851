"""`r1-grpo pipeline run`: the README's main job, here on a small config (real torchrun stages).

One pipeline run is shared by the tests of this module: a fresh run, then re-runs that skip finished
stages, resume an interrupted one and start over a stage whose input was re-trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from trainer.contract.output import MANIFEST_NAME, complete_checkpoints, read_manifest, verify_stage_output


def pipeline_config(model: Path, data: Path) -> dict:
    common = {"report_to": "none", "seed": 3}
    return {
        "release": "t",
        "model": str(model),
        "dataset": str(data),
        "stages": {
            "sft": {
                "nproc_per_node": 1,
                "args": {
                    **common,
                    "max_steps": 12,
                    "per_device_train_batch_size": 16,
                    "learning_rate": 3e-3,
                    "save_steps": 6,
                    "logging_steps": 6,
                },
            },
            "grpo": {
                "nproc_per_node": 2,
                "args": {
                    **common,
                    "max_steps": 4,
                    "per_device_train_batch_size": 2,
                    "num_generations": 4,
                    "inference_batch_size": 2,
                    "max_completion_length": 24,
                    "learning_rate": 1e-4,
                    "save_steps": 2,
                    "logging_steps": 1,
                    "evaluation_strategy": "steps",
                    "eval_steps": 2,
                    "max_eval_samples": 8,
                },
            },
            "eval": {"args": {"max_completion_length": 24, "max_eval_samples": 16}},
        },
    }


@pytest.fixture(scope="module")
def pipeline(warm_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pipeline")
    config = root / "pipeline.yaml"
    config.write_text(yaml.safe_dump(pipeline_config(warm_model_dir, arith_jsonl)))

    def run(*extra: str):
        return stage_runner.run_script(
            "r1-grpo", ["pipeline", "run", "--config", str(config), "--root", str(root), *extra], timeout=900
        )

    first = run()
    assert first.returncode == 0, first.describe()
    return root / "t", first, run


def test_runs_every_stage_and_hands_verified_folders_on(pipeline) -> None:
    release, first, _ = pipeline
    manifests = {stage: verify_stage_output(release / stage, stage) for stage in ("sft", "grpo", "eval")}
    assert manifests["sft"].steps == 12 and manifests["grpo"].steps == 4
    assert manifests["grpo"].inputs["model_name_or_path"] == str(release / "sft")
    assert manifests["eval"].inputs["model_name_or_path"] == str(release / "grpo")
    # The table: accuracy and format rate of the base model and after each training stage.
    for stage in ("base", "sft", "grpo"):
        assert f"│ {stage} " in first.output, first.describe()
    summary = json.loads((release / "summary.json").read_text())
    assert set(summary["stages"]) == {"base", "sft", "grpo"}
    for metrics in summary["stages"].values():
        assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["format_rate"] <= 1.0
    assert summary["eval"] == json.loads((release / "eval" / "metrics.json").read_text())
    assert (release / "grpo_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_complete_stages(pipeline) -> None:
    release, _, run = pipeline
    before = {stage: (release / stage / MANIFEST_NAME).read_bytes() for stage in ("sft", "grpo", "eval")}
    again = run("--skip_summary")
    assert again.returncode == 0, again.describe()
    for stage in ("sft", "grpo", "eval"):
        assert f"[{stage}] complete ({release / stage}/{MANIFEST_NAME} verified): skipped" in again.output
        assert (release / stage / MANIFEST_NAME).read_bytes() == before[stage]
    assert "torchrun" not in again.output


def test_interrupted_stage_resumes_and_later_stages_start_over(pipeline) -> None:
    release, _, run = pipeline
    grpo = release / "grpo"
    # An interruption after checkpoint-2 (the last one: step 4 is the final model): no manifest was written.
    assert [p.name for _, p in complete_checkpoints(grpo)] == ["checkpoint-2"]
    (grpo / MANIFEST_NAME).unlink()
    eval_before = read_manifest(release / "eval")
    again = run("--skip_summary")
    assert again.returncode == 0, again.describe()
    assert "[sft] complete" in again.output
    assert f"resumed from {grpo / 'checkpoint-2'} (step 2" in again.output, again.describe()
    assert verify_stage_output(grpo, "grpo").steps == 4
    # eval had judged the old grpo model: it is moved aside and run again on the new one.
    assert f"[eval] older than its input stage's output: moved to {release / 'eval.stale-1'}" in again.output
    assert read_manifest(release / "eval.stale-1").created_at == eval_before.created_at
    assert verify_stage_output(release / "eval", "eval").created_at >= read_manifest(grpo).created_at


def test_bad_config_is_a_clear_error(stage_runner, tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"stages": {"sft": {"args": {"learning_rate": 1e-3}}, "rlhf": {}}}))
    result = stage_runner.run_script(
        "r1-grpo", ["pipeline", "run", "--config", str(config), "--root", str(tmp_path)]
    )
    assert result.returncode == 2
    assert f"r1-grpo pipeline: error: {config}" in result.output and "rlhf" in result.output, (
        result.describe()
    )
    assert os.listdir(tmp_path) == ["p.yaml"]  # nothing was started


def test_same_seed_twice_gives_the_same_run_and_another_seed_starts_over(pipeline) -> None:
    """`--seed` reaches every stage (data order, init, sampling): two runs with one seed on one machine
    make the same weights and the same summary; a finished stage of another seed is moved aside."""
    release, _, run = pipeline
    root = release.parent
    for name in ("seed-a", "seed-b"):
        result = run("--release", name, "--seed", "7")
        assert result.returncode == 0, result.describe()
    a, b = root / "seed-a", root / "seed-b"
    summaries = [json.loads((r / "summary.json").read_text()) for r in (a, b)]
    assert summaries[0]["seed"] == 7
    assert summaries[0]["stages"] == summaries[1]["stages"]
    timeless = [{k: v for k, v in s["eval"].items() if k != "runtime_s"} for s in summaries]
    assert timeless[0] == timeless[1] and "accuracy" in timeless[0]
    assert set(summaries[0]["stage_wall_s"]) == {"sft", "grpo", "eval"}
    for stage in ("sft", "grpo", "eval"):
        first, second = read_manifest(a / stage), read_manifest(b / stage)
        assert first.inputs["args"]["seed"] == 7
        assert first.weights == second.weights, stage  # sha256 of every weight file
    # seed 3 (the config's own) made other weights than seed 7
    assert read_manifest(a / "sft").weights != read_manifest(release / "sft").weights

    again = run("--release", "seed-a", "--seed", "8", "--skip_summary")
    assert again.returncode == 0, again.describe()
    assert f"[sft] run with other settings (--seed 7 → 8): moved to {a / 'sft.stale-1'}" in again.output
    assert read_manifest(a / "sft.stale-1").weights == read_manifest(b / "sft").weights
    assert read_manifest(a / "sft").inputs["args"]["seed"] == 8
    assert read_manifest(a / "eval").inputs["args"]["seed"] == 8
