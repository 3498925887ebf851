"""GRPO's completion log-probs without logits (``completion_logprobs(..., fused_head=True)``): the body's
hidden states at the predicting positions go through the lm-head in chunks. Same values and gradients as
the logits path in float64 on the plain, split-attention and block-mask forwards, and the model's own
head computes no position at all (with the logits path a chunk of GRPO rows kept [rows x T, V] logits
alive until the backward: 32 rows x 256 tokens of a 152k vocabulary is 5 GB in float32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.test_objective import PAD, VOCAB, KwargsWrapper, grouped_batch
from trainer.rl.head_logprobs import lm_head_of
from trainer.rl.logprobs import completion_logprobs
from trainer.rl.packed_forward import grouped_completion_logprobs, split_attention_supported

T = 6  # completion columns of grouped_batch


def qwen3_f64(tie: bool, attn: str = "sdpa") -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=PAD,
        tie_word_embeddings=tie,
        sliding_window=None,
        attn_implementation=attn,
    )
    return Qwen3ForCausalLM(config).to(torch.float64).eval()


def head_positions(model: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Positions the model's own lm-head computes, per call."""
    seen: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda _m, _a, out: seen.append(out.shape[-2]))
    return seen, handle


def run(path: str, model: nn.Module, fused: bool) -> torch.Tensor:
    input_ids, attention_mask, _, _ = grouped_batch()
    if path == "plain":  # one row per completion, the prompt run G times
        return completion_logprobs(
            model, input_ids, attention_mask, input_ids[:, -T:], 0.9, 4, fused_head=fused
        )
    if path == "wrapped":  # through a Booster-like wrapper, the shared-prompt plan choosing the forward
        wrapped = KwargsWrapper(model)
        out = completion_logprobs(
            wrapped, input_ids, attention_mask, input_ids[:, -T:], 0.9, 6, group_size=3, fused_head=fused
        )
        assert len(wrapped.seen_kwargs) == 1  # both groups in one packed forward
        return out
    head = lm_head_of(model) if fused else None
    split = path == "split"
    return grouped_completion_logprobs(
        model, input_ids, attention_mask, T, 3, 1, 0.9, split_attention=split, head=head
    )


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize(
    ("path", "attn"), [("plain", "sdpa"), ("wrapped", "sdpa"), ("split", "sdpa"), ("block", "eager")]
)
def test_fused_head_equals_the_logits_path_in_float64(tie: bool, path: str, attn: str) -> None:
    model = qwen3_f64(tie, attn)
    assert lm_head_of(model) is not None
    if path == "split":
        assert split_attention_supported(model)
    _, attention_mask, _, _ = grouped_batch()
    valid = attention_mask[:, -T:].to(torch.float64)
    weights = torch.linspace(0.5, 1.5, valid.numel(), dtype=torch.float64).view_as(valid) * valid
    params = [p for p in model.parameters() if p.requires_grad]

    results = {}
    for fused in (False, True):
        seen, handle = head_positions(model)
        try:
            values = run(path, model, fused)
        finally:
            handle.remove()
        grads = torch.autograd.grad((values * weights).sum(), params)
        results[fused] = (values.detach() * valid, grads, seen)

    (want, want_grads, logits_seen), (got, got_grads, fused_seen) = results[False], results[True]
    assert logits_seen and min(logits_seen) > 0  # the logits path ran the head on completion positions
    assert fused_seen and max(fused_seen) == 0  # the fused path: the model's head computed nothing
    assert bool((want != 0).any())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_fused_head_falls_back_to_logits_for_heads_it_cannot_fuse() -> None:
    # A head with a bias is not `h @ W^T`: completion_logprobs reads the model's logits instead.
    model = qwen3_f64(tie=False)
    plain = run("plain", model, fused=False).detach()
    model.lm_head.bias = nn.Parameter(torch.zeros(VOCAB, dtype=torch.float64))
    assert lm_head_of(model) is None
    seen, handle = head_positions(model)
    try:
        with torch.no_grad():
            got = run("plain", model, fused=True)
    finally:
        handle.remove()
    assert seen and min(seen) > 0
    _, attention_mask, _, _ = grouped_batch()
    valid = attention_mask[:, -T:].to(torch.float64)
    torch.testing.assert_close(got * valid, plain * valid, rtol=1e-10, atol=1e-12)
