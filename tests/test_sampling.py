"""Exactness and behaviour of the GRPO rollout sampler (`trainer.rl.sampling`).

The reference everywhere is the plain HF forward of one unpadded sequence without a cache,
`model(input_ids=prompt + completion).logits`: every step's logits of the sampler (both the lean
Llama/Qwen2 decoder, in both prompt-cache layouts, and the generic HF-cache decoder) must match it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from trainer.rl.lean_decoder import _LeanDecoder
from trainer.rl.sampling import lean_path_unsupported_reason, sample_groups

VOCAB = 97
ATOL = 1e-4
PAD = 0
# Odd lengths, one prompt of a single token: left padding, position ids and masking all matter.
PROMPTS = [[5, 17, 42, 8, 9, 61, 3], [11, 2, 90], [7], [33, 34, 35, 36, 37]]


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    # Larger-than-default weights (norm weights and biases too) give peaked, varied distributions, so
    # greedy paths differ between prompts and errors in any term would show in the logits.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.35 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def tiny_llama(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    kw: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return _randomize(LlamaForCausalLM(LlamaConfig(**kw)), seed)


def tiny_qwen2(seed: int = 1) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,  # GQA with a single kv head
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=1000.0,
        tie_word_embeddings=True,  # q/k/v biases and tied embeddings
    )
    return _randomize(Qwen2ForCausalLM(config), seed)


def tiny_qwen3(seed: int = 2) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # not hidden / heads: Qwen3 sets it on its own
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=1000.0,
        tie_word_embeddings=True,  # q/k RMSNorm per head, no qkv bias
    )
    return _randomize(Qwen3ForCausalLM(config), seed)


def tiny_gemma3(seed: int = 3) -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        # Longer than prompt + completion: HF's own uncached forward without an attention mask (the
        # reference) does not apply the window, so a shorter one would compare two different models.
        sliding_window=64,
        sliding_window_pattern=2,
        max_position_embeddings=128,
    )
    return _randomize(Gemma3ForCausalLM(config), seed)


def reference_logits(model: nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)]


def sample(model: nn.Module, prompts=PROMPTS, **kw: object):
    args: dict[str, object] = dict(
        num_generations=3,
        max_new_tokens=12,
        temperature=1.0,
        eos_token_ids=[],
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(1234),
    )
    args.update(kw)
    return sample_groups(model, prompts, **args)


def check_against_reference(model: nn.Module, out, prompts, num_generations: int, temperature: float) -> None:
    """Every generated step's logits and log-probs equal the uncached per-sequence HF forward."""
    assert out.logits is not None
    n_rows = len(prompts) * num_generations
    assert out.completion_ids.shape[0] == n_rows
    for r in range(n_rows):
        length = int(out.completion_lengths[r])
        completion = out.completion_ids[r, :length].tolist()
        ref = reference_logits(model, prompts[r // num_generations], completion)
        torch.testing.assert_close(out.logits[r, :length], ref, atol=ATOL, rtol=0, msg=f"row {r}")
        scale = temperature if temperature > 0 else 1.0
        ref_lp = (
            torch.log_softmax(ref / scale, dim=-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)
        )
        torch.testing.assert_close(out.logprobs[r, :length], ref_lp, atol=ATOL, rtol=0, msg=f"row {r}")
        # Everything after the completion is padding.
        assert (out.completion_ids[r, length:] == PAD).all()
        assert (out.logprobs[r, length:] == 0).all()
        assert out.completion_mask[r, :length].all() and not out.completion_mask[r, length:].any()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These tiny models are all per-op overhead; a second OpenMP thread only adds barrier waits on the
    # shared CI cores. Restored for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3}
# (backend, share_prefix): lean with the prompt cache copied per row, lean with it shared, generic HF.
DECODERS = [("lean", False), ("lean", True), ("hf", None)]


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> nn.Module:
    return MODELS[request.param]()


@pytest.mark.parametrize(("backend", "share_prefix"), DECODERS)
@pytest.mark.parametrize(("temperature", "top_p"), [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_logits_match_uncached_forward(model, backend, share_prefix, temperature, top_p) -> None:
    # Many EOS ids: rows finish at different steps, so finished rows are compacted away mid-run.
    eos = list(range(60, 72))
    G = 3
    out = sample(
        model,
        num_generations=G,
        temperature=temperature,
        top_p=top_p,
        eos_token_ids=eos,
        backend=backend,
        share_prefix=share_prefix,
        keep_logits=True,
    )
    assert out.backend == backend
    check_against_reference(model, out, PROMPTS, G, temperature)
    lengths = out.completion_lengths.tolist()
    for r, length in enumerate(lengths):
        last = int(out.completion_ids[r, length - 1])
        assert out.truncated[r] == (last not in eos)
        if out.truncated[r]:
            assert length == 12
        # No EOS before the last token of a completion.
        assert not set(out.completion_ids[r, : length - 1].tolist()) & set(eos)
    assert out.num_generated_tokens == sum(lengths) == int(out.completion_mask.sum())
    assert out.completion_ids.shape[1] == max(lengths)
    if temperature == 0.0:  # greedy: the G samples of a group are identical
        ids = out.completion_ids.view(len(PROMPTS), G, -1)
        assert (ids == ids[:, :1]).all()


def test_runs_finish_early_and_late() -> None:
    # Guards the test above: with its settings some rows do stop early while others run on (otherwise
    # the compaction paths would go untested).
    out = sample(tiny_llama(), eos_token_ids=list(range(60, 72)), backend="lean")
    lengths = out.completion_lengths.tolist()
    assert sum(length < 6 for length in lengths) >= 2 and max(lengths) > 8


@pytest.mark.parametrize("share_prefix", [False, True])
@pytest.mark.parametrize("transpose_weights", [True, False], ids=["cpu-weights", "gpu-weights"])
def test_compaction_keeps_rows_exact(share_prefix: bool, transpose_weights: bool) -> None:
    """Drop a whole group and part of another from the decode batch mid-run; the survivors stay exact.

    Also runs the weight layout used off-CPU (F.linear on the HF layout, final norm not folded)."""
    model = tiny_qwen2(seed=3) if transpose_weights else tiny_llama(seed=3)
    G = 3
    dec = _LeanDecoder(model, PROMPTS, G, 10, share_prefix=share_prefix, transpose_weights=transpose_weights)
    logits = dec.prefill().repeat_interleave(G, dim=0)
    rows = torch.arange(len(PROMPTS) * G)
    tokens: list[list[int]] = [[] for _ in rows]
    steps: list[list[torch.Tensor]] = [[] for _ in rows]
    gen = torch.Generator().manual_seed(5)
    # step -> rows dropped after it: group 1 and one row of group 2, then groups 0 and 2 (rows 0-8)
    drops = {2: [3, 4, 5, 7], 5: [0, 1, 2, 6, 8]}
    for t in range(9):
        tok = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1)
        for i, r in enumerate(rows.tolist()):
            tokens[r].append(int(tok[i]))
            steps[r].append(logits[i])
        if t in drops:
            keep = torch.tensor([i for i, r in enumerate(rows.tolist()) if r not in drops[t]])
            assert dec.compact(keep)
            rows, tok = rows[keep], tok[keep]
        logits = dec.step(tok, t)
    assert rows.tolist() == [9, 10, 11]
    for r in range(len(PROMPTS) * G):
        n = len(steps[r])
        ref = reference_logits(model, PROMPTS[r // G], tokens[r][:n])
        torch.testing.assert_close(torch.stack(steps[r]), ref, atol=ATOL, rtol=0, msg=f"row {r}")
    with torch.no_grad():  # the logits after the last step: next token after all 9 of row 9
        last = model(input_ids=torch.tensor([PROMPTS[3] + tokens[9]])).logits[0, -1]
    torch.testing.assert_close(logits[0], last, atol=ATOL, rtol=0)


def test_same_generator_same_samples_and_no_global_rng(model) -> None:
    state = torch.random.get_rng_state()
    a = sample(model, generator=torch.Generator().manual_seed(7), eos_token_ids=[60, 61])
    b = sample(model, generator=torch.Generator().manual_seed(7), eos_token_ids=[60, 61])
    c = sample(model, generator=torch.Generator().manual_seed(8), eos_token_ids=[60, 61])
    assert torch.equal(torch.random.get_rng_state(), state), "sampling touched the global RNG"
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    assert torch.equal(a.truncated, b.truncated)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # The generator advanced deterministically: continuing from equal states gives equal draws.
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    sample(model, generator=g1)
    sample(model, generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_lean_and_hf_backends_draw_the_same_samples(model) -> None:
    # Same logits (to float tolerance) and the same draws from the generator -> the same tokens.
    lean = sample(
        model, backend="lean", eos_token_ids=[60, 61, 62], generator=torch.Generator().manual_seed(3)
    )
    hf = sample(model, backend="hf", eos_token_ids=[60, 61, 62], generator=torch.Generator().manual_seed(3))
    assert torch.equal(lean.completion_ids, hf.completion_ids)
    torch.testing.assert_close(lean.logprobs, hf.logprobs, atol=ATOL, rtol=0)


def _greedy_rows(model, **kw):
    return sample(model, num_generations=1, temperature=0.0, max_new_tokens=16, **kw)


@pytest.mark.parametrize("backend", ["lean", "hf"])
def test_stops_at_eos_and_pads_after(model, backend) -> None:
    free = _greedy_rows(model, backend=backend)
    row = free.completion_ids[0].tolist()
    eos = row[4]
    expected = row.index(eos) + 1  # first occurrence, at index <= 4
    out = _greedy_rows(model, backend=backend, eos_token_ids=[eos])
    assert int(out.completion_lengths[0]) == expected
    assert out.completion_ids[0, :expected].tolist() == row[:expected]
    assert not out.truncated[0]
    assert (out.completion_ids[0, expected:] == PAD).all()
    assert (out.logprobs[0, expected:] == 0).all()
    for r in range(1, len(PROMPTS)):  # the other rows stop at their own first EOS, or run to the end
        other = free.completion_ids[r].tolist()
        n = other.index(eos) + 1 if eos in other else 16
        assert int(out.completion_lengths[r]) == n and bool(out.truncated[r]) == (eos not in other)
        assert out.completion_ids[r, :n].tolist() == other[:n]


@pytest.mark.parametrize("backend", ["lean", "hf"])
def test_stops_at_multi_token_stop_sequence(model, backend) -> None:
    free = _greedy_rows(model, backend=backend)
    row = free.completion_ids[1].tolist()
    stop = row[5:8]  # a 3-token "</answer>"

    def first_end(seq: list[int]) -> int | None:
        for end in range(len(stop), len(seq) + 1):
            if seq[end - len(stop) : end] == stop:
                return end
        return None

    out = _greedy_rows(model, backend=backend, stop_sequences=[stop, [96, 95, 94, 93]])
    for r in range(len(PROMPTS)):
        full = free.completion_ids[r].tolist()
        end = first_end(full)
        n = end if end is not None else 16
        assert int(out.completion_lengths[r]) == n, f"row {r}"
        assert out.completion_ids[r, :n].tolist() == full[:n]
        assert bool(out.truncated[r]) == (end is None)
    assert int(out.completion_lengths[1]) <= 8 and not out.truncated[1]
    assert (
        out.completion_ids[1, int(out.completion_lengths[1]) - 3 : int(out.completion_lengths[1])].tolist()
        == stop
    )


@pytest.mark.parametrize("pad", [PAD, 62], ids=["pad-0", "pad-is-eos"])
def test_sampled_stops_end_with_stop_sequence_and_truncation_flags(model, pad: int) -> None:
    # pad == an EOS id is the common tokenizer setup: finished rows then emit "EOS" padding, which must
    # not count as stopping again (it would rewrite their lengths).
    stop = [60, 61]
    out = sample(
        model,
        pad_token_id=pad,
        num_generations=4,
        max_new_tokens=20,
        temperature=2.0,
        eos_token_ids=[62, 63, 64, 65],
        stop_sequences=[stop, [70]],
    )
    stops = (62, 63, 64, 65, 70)
    for r in range(out.completion_ids.shape[0]):
        n = int(out.completion_lengths[r])
        ids = out.completion_ids[r, :n].tolist()
        ended = ids[-1] in stops or ids[-2:] == stop
        assert bool(out.truncated[r]) == (not ended), f"row {r}"
        if out.truncated[r]:
            assert n == 20
        for i in range(n - 1):  # no earlier stop inside the completion
            assert ids[i] not in stops and ids[i : i + 2] != stop, f"row {r} continued past a stop at {i}"
        assert (out.completion_ids[r, n:] == pad).all()
        assert int(out.completion_mask[r].sum()) == n
    assert int((~out.truncated).sum()) >= 4  # with 5 stop tokens of 97 at temperature 2 most rows stop


def test_top_p_samples_only_from_the_nucleus(model) -> None:
    top_p = 0.6
    out = sample(model, top_p=top_p, temperature=1.0, keep_logits=True, num_generations=4)
    for r in range(out.completion_ids.shape[0]):
        for t in range(int(out.completion_lengths[r])):
            probs = torch.softmax(out.logits[r, t], -1)
            tok = int(out.completion_ids[r, t])
            mass_before = probs[probs > probs[tok]].sum()
            assert mass_before < top_p + 1e-5, f"row {r} step {t}: token outside the top-p nucleus"
            # The log-prob is the unfiltered one.
            assert abs(float(out.logprobs[r, t]) - float(torch.log(probs[tok]))) < ATOL


def test_max_new_tokens_one_and_single_generation(model) -> None:
    out = sample(model, num_generations=1, max_new_tokens=1, keep_logits=True)
    assert out.completion_ids.shape == (len(PROMPTS), 1)
    assert out.truncated.all() and out.num_generated_tokens == len(PROMPTS)
    check_against_reference(model, out, PROMPTS, 1, 1.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "num_key_value_heads": 4},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ],
    ids=["biases-tied", "linear-rope-mha", "llama3-rope"],
)
def test_llama_variants_exact(overrides: dict) -> None:
    model = tiny_llama(seed=4, **overrides)
    assert lean_path_unsupported_reason(model) is None
    for share in (False, True):
        out = sample(model, share_prefix=share, keep_logits=True, eos_token_ids=[60, 61, 62])
        assert out.backend == "lean"
        check_against_reference(model, out, PROMPTS, 3, 1.0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2, tiny_qwen3], ids=["llama", "qwen2", "qwen3"])
def test_bfloat16_as_accurate_as_hf_bfloat16(make) -> None:
    # 16-bit runs cannot match bit for bit; they must be as close to the float32 model as HF's own
    # bfloat16 forward is (measured: equal mean errors to within 15%).
    model = make().to(torch.bfloat16)
    model32 = make().to(torch.bfloat16).float()  # the same (bf16-rounded) weights in float32
    out = sample(model, temperature=0.0, keep_logits=True)
    assert out.backend == "lean" and out.logprobs.dtype == torch.float32
    ours, theirs = [], []
    for r in range(out.completion_ids.shape[0]):
        n = int(out.completion_lengths[r])
        completion = out.completion_ids[r, :n].tolist()
        exact = reference_logits(model32, PROMPTS[r // 3], completion)
        ours.append((out.logits[r, :n] - exact).abs().mean())
        theirs.append((reference_logits(model, PROMPTS[r // 3], completion) - exact).abs().mean())
    assert float(torch.stack(ours).mean()) <= 1.5 * float(torch.stack(theirs).mean()) + 0.01


def test_other_models_use_the_hf_path_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64)
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    assert lean_path_unsupported_reason(model) is not None
    with pytest.raises(ValueError, match="backend='lean' is not supported"):
        sample(model, backend="lean")
    out = sample(model, keep_logits=True, eos_token_ids=[60, 61, 62, 63])
    assert out.backend == "hf"
    check_against_reference(model, out, PROMPTS, 3, 1.0)


def test_gemma3_uses_the_hf_path_exactly() -> None:
    """Gemma 3 (its fixed-size HybridCache) on the generic decoder, equal to the uncached forward; the
    reason it is not on the lean path is named."""
    model = tiny_gemma3()
    assert "gemma3_text" in lean_path_unsupported_reason(model)
    out = sample(model, keep_logits=True, eos_token_ids=[60, 61, 62, 63])
    assert out.backend == "hf"
    check_against_reference(model, out, PROMPTS, 3, 1.0)


def test_dynamic_rope_falls_back_to_hf() -> None:
    model = tiny_llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "rope type 'dynamic'" in lean_path_unsupported_reason(model)
    assert sample(model).backend == "hf"


def test_wrapped_model_and_training_flag_restored() -> None:
    class Wrapper(nn.Module):  # the shape of DDP / Colossal-AI wrappers: the model under `.module`
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    inner = tiny_llama()
    inner.train()
    out = sample(Wrapper(inner), keep_logits=True)
    assert inner.training, "the training flag must be restored"
    inner.eval()
    check_against_reference(inner, out, PROMPTS, 3, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": []}, "prompt_ids must be a non-empty list"),
        ({"prompts": [[1, 2], []]}, r"prompt_ids\[1\] is empty"),
        ({"prompts": [[1, VOCAB]]}, r"prompt_ids\[0\]\[1\] = 97"),
        ({"num_generations": 0}, "num_generations"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"eos_token_ids": [3, 200]}, r"eos_token_ids\[1\] = 200"),
        ({"stop_sequences": [[4], []]}, r"stop_sequences\[1\] is empty"),
        ({"backend": "vllm"}, "backend must be"),
    ],
)
def test_bad_input_names_the_field(kwargs: dict, message: str) -> None:
    model = tiny_llama()
    prompts = kwargs.pop("prompts", PROMPTS)
    with pytest.raises(ValueError, match=message):
        sample(model, prompts=prompts, **kwargs)
