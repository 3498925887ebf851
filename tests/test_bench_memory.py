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
    from transformers import Qwen3Config, Qwen3ForCausalLM

    size = memory.SIZES[name]
    config = Qwen3Config(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    assert size.params() == sum(p.numel() for p in model.parameters())
    floor = memory.floor_bytes(size, "sft", imports=10**9)
    assert floor["weights"] + floor["grads"] + floor["adam"] == 16 * size.params()
    assert floor["imports"] == 10**9 and floor["logits"] <= 2 * memory.CHUNK_BYTES
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
