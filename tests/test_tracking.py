"""W&B: one run per stage folder (a stable id in `wandb_run_id`), resumed by retries, grouped by release.
Real wandb in offline mode (no key, no network): the run folders it writes carry the run id."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import tracking
from trainer.runtime import Dist, MetricsLogger, TrainingArgs


def test_stable_run_id_is_made_once_per_stage_folder(tmp_path: Path) -> None:
    sft = tmp_path / "r1" / "sft"
    first = tracking.stable_run_id(sft, "sft")
    assert first.startswith("sft-") and len(first) == len("sft-") + 16
    assert tracking.stable_run_id(sft, "sft") == first
    assert (sft / tracking.RUN_ID_FILE).read_text() == first + "\n"
    # Another folder (a fresh run after the old one was moved aside) gets another id.
    assert tracking.stable_run_id(tmp_path / "r1" / "sft.fresh", "sft") != first
    # A damaged file is replaced rather than handed to W&B.
    (sft / tracking.RUN_ID_FILE).write_text("not an id!\n")
    replaced = tracking.stable_run_id(sft, "sft")
    assert replaced != first and replaced.startswith("sft-")


def test_run_group_is_the_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    assert tracking.run_group(tmp_path / "my-release" / "grpo") == "my-release"
    monkeypatch.setenv("WANDB_RUN_GROUP", "from-chart")
    assert tracking.run_group(tmp_path / "my-release" / "grpo") == "from-chart"


def test_a_retried_stage_logs_into_the_same_wandb_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_GROUP", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # in-process: wandb must not wrap pytest's own stdout
    out = tmp_path / "rel" / "grpo"
    args = TrainingArgs(model_name_or_path="m", output_dir=str(out), report_to="wandb")
    ids = []
    for attempt, resume_step in enumerate((0, 3)):  # the first attempt, then a retry resuming at step 3
        logger = MetricsLogger(str(out), "grpo", args, Dist(), {"attempt": attempt}, resume_step)
        run = logger.wandb
        assert run is not None
        assert (run.group, run.job_type, run.name) == ("rel", "grpo", "rel-grpo")
        ids.append(run.id)
        logger.log(resume_step + 1, {"loss": 1.0})
        logger.close()
    assert ids[0] == ids[1] == (out / tracking.RUN_ID_FILE).read_text().strip()
    run_dirs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and all(d.endswith(ids[0]) for d in run_dirs)


def test_eval_reports_its_metrics_to_wandb(
    warm_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path: Path
):
    out = tmp_path / "rel" / "eval"
    argv = ["eval", "--model_name_or_path", str(warm_model_dir), "--dataset_name", str(arith_jsonl)]
    argv += ["--output_dir", str(out), "--max_eval_samples", "2", "--max_completion_length", "8"]
    result = stage_runner.run_script("r1-grpo", [*argv, "--report_to", "wandb"])
    assert result.returncode == 0, result.describe()
    run_id = (out / tracking.RUN_ID_FILE).read_text().strip()
    assert run_id.startswith("eval-")
    (run_dir,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    assert (run_dir / f"run-{run_id}.wandb").stat().st_size > 0
