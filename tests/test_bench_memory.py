"""bench/memory.py's parts that decide its table: the parameter counts behind the floor are the built
models', the peak-RSS probe sees a child's (and grandchild's) memory, and the GPU plan covers what
docs/memory.md shows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import memory  # noqa: E402


@pytest.mark.parametrize("name", list(memory.SIZES))
def test_floor_counts_the_parameters_of_the_model_it_builds(name: str) -> None:
    from transformers import Qwen3ForCausalLM

    size = memory.SIZES[name]
    config = memory.qwen3_config(size)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    assert size.params() == sum(p.numel() for p in model.parameters())
    floor = memory.floor_bytes(size, "sft", imports=10**9)
    assert floor["weights"] + floor["grads"] + floor["adam"] == 16 * size.params()
    assert (
        floor["imports"] == 10**9
        and floor["logits"] <= 2 * memory.CHUNK_BYTES
        and memory.floor_bytes(size, "grpo", 0)["logits"] < floor["logits"]
    )
    assert memory.floor_bytes(size, "grpo", 0)["reference"] == 4 * size.params()
    assert "adam" not in memory.floor_bytes(size, "eval", 0)


def test_run_measured_sees_the_peak_of_a_grandchild(tmp_path: Path) -> None:
    """torchrun's ranks are its children: the probe must see below the process it starts."""
    grandchild = "b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096])"
    child = (
        f"import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', {grandchild!r}]).returncode)"
    )
    run = memory.run_measured([sys.executable, "-c", child], memory.child_env(1), tmp_path / "log", 120)
    assert run["exit_code"] == 0
    assert 400 * 2**20 < run["peak_rss"] < 800 * 2**20, run
    failed = memory.run_measured([sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path / "log2", 60)
    assert failed["exit_code"] == 3


def test_run_measured_does_not_count_the_caller(tmp_path: Path) -> None:
    """ru_maxrss survives exec: a command spawned by a big process (pytest after torch; CI saw 938 MiB
    for a 400 MiB child) must still report only its own tree."""
    ballast = bytearray(1024 * 2**20)  # touched (zero-filled), so it is resident in this process
    run = memory.run_measured([sys.executable, "-c", "pass"], memory.child_env(1), tmp_path / "log", 60)
    assert len(ballast) and run["exit_code"] == 0
    assert 0 < run["peak_rss"] < 200 * 2**20, run


def test_imports_rss_does_not_count_the_caller() -> None:
    """The floor's imports term, measured from the bench after it built a model, is the child's own."""
    alone = memory.imports_rss(memory.child_env(1))
    ballast = bytearray(2048 * 2**20)  # resident (zero-filled) in this process while the probe runs
    loaded = memory.imports_rss(memory.child_env(1))
    assert len(ballast) and 100 * 2**20 < loaded < 2048 * 2**20, (alone, loaded)
    assert abs(loaded - alone) < 256 * 2**20, (alone, loaded)


def test_run_measured_kills_the_tree_at_the_timeout(tmp_path: Path) -> None:
    child = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"
    run = memory.run_measured([sys.executable, "-c", child], memory.child_env(1), tmp_path / "log", 2)
    assert run["exit_code"] != 0 and run["wall_s"] < 30 and run["peak_rss"] == 0, run


def test_plan_covers_both_models_and_plugins() -> None:
    rows = [
        line for line in memory.plan().splitlines() if line.startswith("| 1.5b") or line.startswith("| 7b")
    ]
    assert [r.split("|")[1:3] for r in rows] == [
        [" 1.5b ", " zero2 "],
        [" 1.5b ", " gemini "],
        [" 7b ", " zero2 "],
        [" 7b ", " gemini "],
    ]
    for row in rows:
        gib = float(row.split("|")[3])
        assert 0 < gib < 80, row  # fits an 80 GB GPU


def test_gpu_check_memory_flags_are_the_stages_own(tmp_path: Path) -> None:
    """bench/gpu_check.py's memory runs (GPU only) pass flags the stages accept, sized as its plan says."""
    import gpu_check

    from trainer.grpo import GRPOArgs
    from trainer.r1.data import DataArgs
    from trainer.runtime import parse_args
    from trainer.sft import SFTArgs

    args = gpu_check.parse_args(["--device", "cpu", "--plugins", "ddp", "--memory_plugins", "gemini"])
    assert args.memory_sizes is None and args.memory_plugins == ["gemini"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu", "--plugins", "ddp", "--memory_sizes", "1.5b"])
    model, data, out = tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "o"
    _, sft = parse_args(
        (DataArgs, SFTArgs), gpu_check.memory_flags("sft", "gemini", "1.5b", model, data, out), "sft"
    )
    _, grpo = parse_args(
        (DataArgs, GRPOArgs), gpu_check.memory_flags("grpo", "zero2", "1.5b", model, data, out), "grpo"
    )
    assert (sft.plugin, sft.bf16, sft.gradient_checkpointing, sft.max_steps) == ("gemini", True, True, 1)
    assert sft.per_device_train_batch_size == gpu_check.MEMORY_BATCH["sft"]
    assert sft.max_seq_length == memory.SEQ
    assert (grpo.plugin, grpo.beta, grpo.num_generations) == ("zero2", 0.04, gpu_check.MEMORY_BATCH["grpo"])
    assert grpo.max_prompt_length + grpo.max_completion_length == memory.SEQ
    one = memory.gpu_plan("1.5b", "gemini", gpus=1, stage="sft")
    eight = memory.gpu_plan("1.5b", "gemini", gpus=8, stage="sft")
    assert one["reference"] == 0 and one["optimizer"] == 8 * eight["optimizer"]
