"""The SFT loss without full-vocabulary logits (trainer/rl/head_logprobs.py, trainer.sft.completion_loss_sum):
the same value and gradients as the full-logits cross-entropy it replaced, in float64, under bf16 autocast,
and through the Booster's DDP under torchrun (2 ranks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.rl.head_logprobs import chunk_rows_for, linear_token_logprobs, lm_head_of
from trainer.rl.logprobs import token_logprobs
from trainer.sft import IGNORE_INDEX, completion_loss_sum

WORKER = Path(__file__).parent / "support" / "chunked_loss_worker.py"


def qwen3(dtype: torch.dtype = torch.float32, tie: bool = True, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=tie,
        sliding_window=None,
    )
    return Qwen3ForCausalLM(config).to(dtype)


def sft_batch(vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 21), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0  # right padding, as trainer.sft.collate pads
    mask[3, 9:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    for row, prompt_len in enumerate((3, 7, 1, 8)):
        labels[row, :prompt_len] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits_formula(model, batch) -> torch.Tensor:
    """The SFT loss before chunking (trainer/sft.py up to this change), with the logits' own dtype."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 7, 10_000])
def test_chunked_loss_equals_the_logits_formula_in_float64(tie: bool, fused: bool, chunk_rows: int) -> None:
    model = qwen3(torch.float64, tie=tie)
    batch = sft_batch(model.config.vocab_size)
    want = logits_formula(model, batch)
    want.backward()
    want_grads = grads(model)
    got = completion_loss_sum(model, batch, fused=fused, chunk_rows=chunk_rows)
    assert got.dtype == torch.float64
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_linear_token_logprobs_gradcheck_with_temperature() -> None:
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 11, (9,), generator=g)
    got = linear_token_logprobs(hidden, weight, ids, 0.7, chunk_rows=4)
    want = token_logprobs(hidden @ weight.T, ids, 0.7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda h, w: linear_token_logprobs(h, w, ids, 0.7, chunk_rows=4), (hidden, weight)
    )


def test_bf16_autocast_matches_the_logits_formula() -> None:
    """DDP --bf16: autocast over float32 weights; the head's matmul runs in bf16 in both formulas."""
    model = qwen3(torch.float32)
    batch = sft_batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = logits_formula(model, batch)  # bf16 logits, upcast inside cross_entropy's float math
    want.float().backward()
    want_grads = grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = completion_loss_sum(model, batch, chunk_rows=5)
    assert got.dtype == torch.float32
    got.backward()
    torch.testing.assert_close(got, want.float(), rtol=2e-2, atol=0.0)
    for name, grad in grads(model).items():
        assert grad.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(grad.flatten(), want_grads[name].flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


def test_eval_forward_keeps_no_logits() -> None:
    """Under no_grad the fused path saves nothing and the model's lm-head sees no rows."""
    model = qwen3(torch.float32)
    seen: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    batch = sft_batch(model.config.vocab_size)
    with torch.no_grad():
        got = completion_loss_sum(model, batch, chunk_rows=8)
        want = logits_formula(model, batch)
    assert seen == [(4, 0, model.config.vocab_size), (4, 21, model.config.vocab_size)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lm_head_of_refuses_heads_it_cannot_fuse() -> None:
    model = qwen3()
    body, weight = lm_head_of(model)
    assert body is model.model and weight is model.lm_head.weight
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
    assert lm_head_of(model) is None  # a biased head is not h @ W^T
    assert lm_head_of(torch.nn.Linear(2, 2)) is None


def test_chunk_rows_follow_the_vocabulary() -> None:
    assert chunk_rows_for(151_669) == 442  # ~256 MiB of float32 logits for Qwen's vocabulary
    assert chunk_rows_for(10) == 256 * 2**20 // 40
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        linear_token_logprobs(
            torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), chunk_rows=0
        )
    with pytest.raises(ValueError, match=r"ids must be in \[0, 4\)"):
        linear_token_logprobs(torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([0, 4]))


def test_gradients_through_booster_ddp_on_two_ranks(stage_runner) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(WORKER)]
    proc = subprocess.run(
        cmd, cwd=stage_runner.workdir, env=stage_runner.env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0: 24 gradients equal" in proc.stdout and "rank 1: 24 gradients equal" in proc.stdout
