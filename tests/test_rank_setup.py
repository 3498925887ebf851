"""One rank's bad input is every rank's: sft, grpo and eval under `torchrun --nproc_per_node=2`, where only
rank 1's set-up fails (its data file is missing, tests/support/rank1_missing_data.py). Every worker exits 2,
rank 0 prints the one message naming rank 1 (torchrun's last lines show it too), nothing is written and
nothing hangs: rank 0 must not go on alone into the Booster's or the evaluation's collectives."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.support.rank1_missing_data import EXIT_DIR, MISSING
from trainer.contract import output as contract

REPO = Path(__file__).resolve().parents[1]
# A set-up that fails on one rank takes ~30 s on a loaded 2-core VM (two processes importing torch and
# Colossal-AI); a rank left waiting in a collective would wait far longer than this.
TIMEOUT_S = 300


@pytest.mark.parametrize(
    ("module", "prog"), [("trainer.sft", "sft"), ("trainer.grpo", "grpo"), ("trainer.evaluate", "eval")]
)
def test_one_ranks_missing_data_fails_every_rank_with_exit_2(
    module: str,
    prog: str,
    tiny_model_dir: Path,
    arith_jsonl: Path,
    stage_runner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    exits = tmp_path / "exits"
    exits.mkdir()
    monkeypatch.setenv(EXIT_DIR, str(exits))
    out = tmp_path / prog
    argv = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--dataset_name",
        str(arith_jsonl),
        "--output_dir",
        str(out),
        "--report_to",
        "none",
    ]
    result = stage_runner.run("tests.support.rank1_missing_data", [module, *argv], nproc=2, timeout=TIMEOUT_S)
    assert result.returncode != 0, result.describe()
    message = f"r1-grpo {prog}: error: on rank 1: {arith_jsonl.with_name(MISSING)}: no such file or folder"
    lines = result.output.splitlines()
    assert lines.count(message) == 1, result.describe()  # printed by rank 0 only
    assert any(message in line for line in lines[-3:]), result.describe()  # torchrun's failure summary
    # torchrun's summary shows the workers that exited before it stopped the rest (one or both), each 2;
    # each rank's own exit code (a stopped one leaves through os._exit) is recorded by the shim.
    shown = re.findall(r"rank\s*: \d+ \(local_rank: \d+\)\s*exitcode\s*: (-?\d+)", result.output)
    assert shown and set(shown) == {"2"}, result.describe()
    codes = {p.name: p.read_text() for p in exits.glob("exit-*")}
    assert codes == {"exit-0": "2", "exit-1": "2"}, (codes, result.describe())
    # Rank 0 did not go on alone: nothing trained, evaluated or exported.
    assert not (out / "metrics.jsonl").exists() and not (out / "metrics.json").exists()
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()
    assert not (out / "predictions.jsonl").exists() and not (out / contract.MANIFEST_NAME).exists()
