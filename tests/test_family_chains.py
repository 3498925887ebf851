"""SFT -> GRPO -> eval under `torchrun --nproc_per_node=2` for each real model family's small random-init
model (:mod:`tests.support.families`) with its real tokenizer and generation config: the README's chain
runs end to end with each family's tokenization, chat template and eos list. Each stage's wall time and the peak
RSS of its largest process (a rank) are printed (``pytest -s``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.support.families import FAMILIES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory  # noqa: E402  (bench/memory.py: the peak-RSS probe)

COMMON = ["--report_to", "none", "--seed", "3", "--logging_steps", "1", "--save_steps", "0"]


def _run(stage_runner, module: str, argv: list[str], log: Path) -> tuple[float, float]:
    """Run one stage under torchrun; (wall seconds, peak RSS in MiB of its largest process: a rank), measured
    by bench/memory.py's launcher (a child of pytest itself would report at least pytest's own size)."""
    command = stage_runner.command(module, argv, nproc=2)
    run = memory.run_measured(command, stage_runner.env(), log, timeout=900)
    output = log.read_text(errors="replace")
    assert run["exit_code"] == 0, (
        f"$ {' '.join(command)}\nexit code {run['exit_code']}\n--- output (tail) ---\n{output[-6000:]}"
    )
    return run["wall_s"], run["peak_rss"] / 2**20


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_grpo_eval_chain(
    family: str, family_models, arith_jsonl: Path, stage_runner, tmp_path: Path
) -> None:
    model = family_models(family)
    data = ["--dataset_name", str(arith_jsonl)]
    sft, grpo, evaluation = tmp_path / "sft", tmp_path / "grpo", tmp_path / "eval"
    times = {}
    times["sft"] = _run(
        stage_runner,
        "trainer.sft",
        ["--model_name_or_path", str(model), *data, "--output_dir", str(sft), "--max_steps", "2"]
        + [
            "--per_device_train_batch_size",
            "2",
            "--max_seq_length",
            "320",
            "--learning_rate",
            "1e-3",
            *COMMON,
        ],
        tmp_path / "sft.log",
    )
    times["grpo"] = _run(
        stage_runner,
        "trainer.grpo",
        ["--model_name_or_path", str(sft), *data, "--output_dir", str(grpo), "--max_steps", "1"]
        + ["--per_device_train_batch_size", "2", "--num_generations", "2", "--max_completion_length", "8"]
        + ["--inference_batch_size", "2", "--max_prompt_length", "320", "--plugin", "ddp", *COMMON],
        tmp_path / "grpo.log",
    )
    times["eval"] = _run(
        stage_runner,
        "trainer.evaluate",
        ["--model_name_or_path", str(grpo), *data, "--output_dir", str(evaluation), "--max_eval_samples", "4"]
        + ["--max_completion_length", "8", "--inference_batch_size", "2", "--seed", "3"],
        tmp_path / "eval.log",
    )
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["num_problems"] == 4, metrics
    print(
        f"{family}: " + ", ".join(f"{k} {t:.1f} s, peak RSS {rss:.0f} MiB" for k, (t, rss) in times.items())
    )
