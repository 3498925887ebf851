"""GRPO rollout sampler: ``num_generations`` completions per prompt, KV-cached, prompt prefilled once.

``sample_groups`` is the only entry point the trainer and the evaluator use.

Two decoders sit behind it:

* ``lean`` (``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` and subclasses): a hand-written decode step that
  reads the HF module's parameters (fused q/k/v and gate/up copies are made once per call), with
  preallocated static KV caches (no per-step ``torch.cat``). The B prompts are prefilled once ([B, P],
  left-padded, positions starting at 0 on each prompt's first real token). Two cache layouts, picked by
  the K/V traffic they save (``share_prefix``):
  - shared: the prompt's K/V stays one copy per group; the G samples attend to it together, one batched
    matmul per (group, kv head) whose G*n_rep query rows form one small GEMM, so the prompt's K/V is
    read once per group instead of G times. Each sample's own tokens live in a per-row cache. The
    prompt scores and the per-sample scores are concatenated (they are tiny next to K/V) and go through
    one softmax, so the attention is exactly the standard one.
  - expanded: the prompt's K/V is copied into each of its G rows once after prefill; each row then has
    one cache. On CPU that cache is contiguous per row and the attention is one SDPA call per layer and
    step, the n_rep query heads of a KV head folded into its query positions (fewest ops: wins for
    short prompts and small batches); elsewhere it is three ops per cache chunk.
  The shared layout's per-row caches on CPU are stored in chunks of ``_KV_CHUNK_CPU`` positions, each
  complete chunk one contiguous block over all rows (the attention streams it), and the chunk being
  filled is staged position-major so that each step's new K/V is one contiguous write (see
  ``_KV_CHUNK_CPU``).
* ``hf`` (any other causal LM): the model's own forward with ``past_key_values``; the prompt cache is
  prefilled once and repeated G times.

Rows that finished (EOS or a stop sequence) emit only padding and are dropped from the decode batch
(their K/V rows are compacted away) once enough of them have finished, so they stop costing compute.

Sampling and log-probs:

* ``temperature > 0``: tokens are drawn from softmax(logits / temperature), after nucleus (top-p)
  filtering when ``top_p < 1``. The returned ``logprobs`` are always the log-probs of the *unfiltered*
  temperature-scaled softmax at the sampled tokens: that is exactly what the GRPO loss recomputes with a
  full forward pass, so with ``num_iterations == 1`` they can be used as the old-policy log-probs.
* ``temperature == 0``: greedy decoding (argmax); ``logprobs`` are then those of softmax(logits), i.e.
  temperature 1.
* All randomness comes from ``generator`` (one uniform per sampled token, inverse-CDF sampling), never
  from the global RNG, so a run is reproducible from the generator's state. With ``generator=None`` the
  default generator of the logits' device is used.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SampleBatch", "sample_groups", "lean_path_unsupported_reason"]

# Rope variants whose cos/sin at a position do not depend on the length of the sequence being run
# (the "dynamic" and "longrope" variants do, so a KV-cached decode would not equal the full forward).
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
_LEAN_MODEL_TYPES = frozenset({"llama", "qwen2"})
# Compact the decode batch once at least this fraction of its rows has finished: each compaction copies
# the filled part of the per-sample cache once, about what one decode step reads anyway.
_COMPACT_FRACTION = 0.125
# K/V bytes per layer and decode step that sharing the prompt cache must save to be used
# (see _prefer_shared_prefix).
_SHARED_PREFIX_MIN_SAVED_BYTES_CPU = 5 << 20
_SHARED_PREFIX_MIN_SAVED_BYTES = 128 << 20
# Per-row K/V caches on CPU are stored in chunks of this many positions ([chunks, rows, KV, chunk, hd]), so
# that each complete chunk is one contiguous block across all rows: the attention then streams it instead
# of reading a short run per (row, kv head) out of a wide buffer, which ran at under half the memory
# bandwidth (bench/rollout.py). The chunk being filled lives in a position-major staging buffer
# ([chunk, rows, KV, hd]) so that each step's new K/V is one contiguous write (scattered 256-byte writes
# into the cache cost as much as reading it), and is copied into the cache once complete. Elsewhere the
# cache is one chunk written in place (fewer kernel launches).
_KV_CHUNK_CPU = 32


@dataclass
class SampleBatch:
    """Completions of ``B`` prompts x ``G`` samples; row ``r`` belongs to prompt ``r // G``.

    ``T`` is the longest completion in the batch (at most ``max_new_tokens``); shorter rows are
    right-padded with ``pad_token_id``.
    """

    completion_ids: torch.LongTensor  # [B*G, T] right-padded with pad_token_id
    completion_mask: torch.Tensor  # [B*G, T] int64; 1 for generated tokens incl. the stop token(s), 0 after
    # [B*G, T] float32 log p(token) under softmax(logits / temperature) (temperature 1 when greedy); 0 masked
    logprobs: torch.Tensor
    truncated: torch.BoolTensor  # [B*G] hit max_new_tokens without EOS / stop sequence
    num_generated_tokens: int  # == completion_mask.sum()
    completion_lengths: torch.LongTensor  # [B*G] == completion_mask.sum(1)
    backend: str = "lean"  # which decoder produced it: "lean" or "hf"
    # [B*G, T, V] float32 raw logits each token was sampled from (0 where masked); only with keep_logits=True
    logits: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_groups(
    model: nn.Module,
    prompt_ids: list[list[int]],
    *,
    num_generations: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int],
    stop_sequences: Sequence[Sequence[int]] = (),
    pad_token_id: int,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    keep_logits: bool = False,
    share_prefix: bool | None = None,
) -> SampleBatch:
    """Sample ``num_generations`` completions for each prompt in ``prompt_ids``.

    Generation of a row stops after it emits a token of ``eos_token_ids`` (may be empty) or when its
    completion ends with one of ``stop_sequences`` (token-id suffix match inside the completion, e.g. the
    tokenization of ``</answer>``); the stop token(s) are part of the completion and its mask.

    ``backend``: ``"auto"`` (lean decoder when the model supports it, else HF forward), ``"lean"`` (error
    when unsupported) or ``"hf"``. ``keep_logits`` additionally returns every step's raw logits (tests,
    debugging; costs B*G*T*V floats). ``share_prefix`` (lean backend only): True shares one prompt cache per
    group, False copies it into each row, None picks by the memory traffic saved (see module docstring).

    The model is run in eval mode (dropout off) and its training flag is restored afterwards.
    """
    model = _unwrap(model)
    vocab_size = _vocab_size(model)
    prompts = _check_inputs(
        prompt_ids,
        num_generations=num_generations,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_token_ids=eos_token_ids,
        stop_sequences=stop_sequences,
        pad_token_id=pad_token_id,
        vocab_size=vocab_size,
    )
    if backend not in ("auto", "lean", "hf"):
        raise ValueError(f"backend must be 'auto', 'lean' or 'hf', got {backend!r}")
    max_total = max(len(p) for p in prompts) + max_new_tokens
    reason = lean_path_unsupported_reason(model, max_total_length=max_total)
    if backend == "lean" and reason is not None:
        raise ValueError(f"backend='lean' is not supported for this model: {reason}")
    use_lean = backend == "lean" or (backend == "auto" and reason is None)

    was_training = model.training
    model.eval()
    try:
        if use_lean:
            decoder: _Decoder = _LeanDecoder(
                model, prompts, num_generations, max_new_tokens, share_prefix=share_prefix
            )
        else:
            decoder = _HFDecoder(model, prompts, num_generations, max_new_tokens, pad_token_id)
        batch = _run(
            decoder,
            num_prompts=len(prompts),
            num_generations=num_generations,
            max_new_tokens=max_new_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            eos_token_ids=[int(e) for e in eos_token_ids],
            stop_sequences=[[int(t) for t in s] for s in stop_sequences],
            pad_token_id=int(pad_token_id),
            generator=generator,
            keep_logits=keep_logits,
        )
    finally:
        model.train(was_training)
    batch.backend = "lean" if use_lean else "hf"
    return batch


def lean_path_unsupported_reason(model: nn.Module, max_total_length: int | None = None) -> str | None:
    """Why the lean decoder cannot run ``model`` exactly like its HF forward, or None when it can."""
    model = _unwrap(model)
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _LEAN_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {sorted(_LEAN_MODEL_TYPES)}"
    base = getattr(model, "model", None)
    lm_head = getattr(model, "lm_head", None)
    if base is None or lm_head is None or not hasattr(base, "layers") or not hasattr(base, "embed_tokens"):
        return "model lacks the model.layers / model.embed_tokens / lm_head layout of LlamaForCausalLM"
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r} (only 'silu' is implemented)"
    rope_type = _rope_type(cfg)
    if rope_type not in _STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} (cos/sin depend on the sequence length)"
    if getattr(base, "rotary_emb", None) is None and rope_type != "default":
        return f"no model.rotary_emb module to compute rope type {rope_type!r}"
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        return "partial_rotary_factor != 1"
    if model_type == "qwen2":
        num_layers = cfg.num_hidden_layers
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "max_window_layers", 0) < num_layers:
            return "Qwen2 sliding-window attention is enabled"
        window = getattr(cfg, "sliding_window", None)
        if window is not None and max_total_length is not None and max_total_length > window:
            # transformers 4.51 masks beyond `sliding_window` in its eager/sdpa mask even when
            # use_sliding_window is False; the HF path reproduces whatever the installed version does.
            return f"prompt + max_new_tokens ({max_total_length}) exceeds sliding_window ({window})"
    for i, layer in enumerate(base.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in names):
            return f"layer {i} lacks self_attn.q/k/v/o_proj"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return f"layer {i} lacks mlp.gate/up/down_proj"
    return None


# --------------------------------------------------------------------------------------------------------
# Input checks and small helpers
# --------------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside Colossal-AI / DDP wrappers (sampling needs its config and submodules)."""
    for _ in range(8):
        if hasattr(model, "config") and hasattr(model, "get_input_embeddings"):
            return model
        if callable(getattr(model, "unwrap", None)):
            model = model.unwrap()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            break
    if not hasattr(model, "config") or not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"model must be a Hugging Face causal LM (got {type(model).__name__})")
    return model


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def _check_inputs(
    prompt_ids: list[list[int]],
    *,
    num_generations: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_ids: Sequence[int],
    stop_sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    vocab_size: int,
) -> list[list[int]]:
    def token_ok(tok: object) -> bool:
        return isinstance(tok, int) and not isinstance(tok, bool) and 0 <= tok < vocab_size

    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise ValueError("prompt_ids must be a non-empty list of token-id lists")
    prompts: list[list[int]] = []
    for i, prompt in enumerate(prompt_ids):
        prompt = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if not prompt:
            raise ValueError(f"prompt_ids[{i}] is empty")
        for j, tok in enumerate(prompt):
            if not token_ok(tok):
                raise ValueError(f"prompt_ids[{i}][{j}] = {tok!r} is not a token id in [0, {vocab_size})")
        prompts.append(prompt)
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be an int >= 1, got {num_generations!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not token_ok(pad_token_id):
        raise ValueError(f"pad_token_id = {pad_token_id!r} is not a token id in [0, {vocab_size})")
    for i, tok in enumerate(eos_token_ids):
        if not token_ok(tok):
            raise ValueError(f"eos_token_ids[{i}] = {tok!r} is not a token id in [0, {vocab_size})")
    for i, seq in enumerate(stop_sequences):
        seq = list(seq)
        if not seq:
            raise ValueError(f"stop_sequences[{i}] is empty")
        for j, tok in enumerate(seq):
            if not token_ok(tok):
                raise ValueError(f"stop_sequences[{i}][{j}] = {tok!r} is not a token id in [0, {vocab_size})")
    return prompts


def _rope_type(cfg: object) -> str:
    scaling = getattr(cfg, "rope_scaling", None)
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def _left_pad(prompts: list[list[int]], fill: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] left-padded ids and the [B] prompt lengths."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), fill, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), lengths.to(device)


# --------------------------------------------------------------------------------------------------------
# The shared decode loop: sampling, stop detection, bookkeeping, compaction
# --------------------------------------------------------------------------------------------------------


class _Decoder:
    """Runs the model. Rows are the current decode batch; ``compact`` drops rows (keeps order)."""

    device: torch.device

    def prefill(self) -> torch.Tensor:
        """[B, V] float32 logits of the first completion token of each prompt."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Feed completion token ``t`` of every current row ([R] ids); [R, V] float32 logits of token t+1."""
        raise NotImplementedError

    def compact(self, keep: torch.Tensor) -> bool:
        """Keep only the rows ``keep`` (sorted indices into the current rows); False if it cannot."""
        raise NotImplementedError


def _run(
    decoder: _Decoder,
    *,
    num_prompts: int,
    num_generations: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_ids: list[int],
    stop_sequences: list[list[int]],
    pad_token_id: int,
    generator: torch.Generator | None,
    keep_logits: bool,
) -> SampleBatch:
    device = decoder.device
    n_rows, steps = num_prompts * num_generations, max_new_tokens
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device) if eos_token_ids else None
    stops = [torch.tensor(s, dtype=torch.long, device=device) for s in stop_sequences]
    check_stops = eos is not None or bool(stops)

    logits = decoder.prefill().repeat_interleave(num_generations, dim=0)  # the G samples share step 0
    # Per-row state in *current decode-row order*: each step writes plain columns. `rows` maps current
    # rows to original rows; results are scattered into `final` when rows are dropped and at the end.
    cur = _RowState(
        ids=torch.full((n_rows, steps), pad_token_id, dtype=torch.long, device=device),
        logprobs=torch.zeros((n_rows, steps), dtype=torch.float32, device=device),
        lengths=torch.full((n_rows,), steps, dtype=torch.long, device=device),
        stopped=torch.zeros(n_rows, dtype=torch.bool, device=device),
        logits=torch.zeros((n_rows, steps, logits.shape[-1]), dtype=torch.float32, device=device)
        if keep_logits
        else None,
    )
    final = cur.select(torch.arange(n_rows, device=device))  # same shapes, separate storage
    rows = torch.arange(n_rows, device=device)
    alive = torch.ones(n_rows, dtype=torch.bool, device=device)
    n_dead = 0  # finished rows still in the decode batch (they emit padding until compacted away)
    for t in range(steps):
        tok, lp = _sample(logits, temperature, top_p, generator)
        if n_dead:
            tok = torch.where(alive, tok, pad_token_id)
            lp = torch.where(alive, lp, 0.0)
        cur.ids[:, t] = tok
        cur.logprobs[:, t] = lp
        if cur.logits is not None:
            cur.logits[:, t] = logits * alive[:, None] if n_dead else logits
        if check_stops:
            hit = torch.isin(tok, eos) if eos is not None else torch.zeros_like(alive)
            for seq in stops:
                if seq.numel() <= t + 1:
                    hit |= (cur.ids[:, t + 1 - seq.numel() : t + 1] == seq).all(dim=1)
            hit &= alive
            cur.lengths = torch.where(hit, t + 1, cur.lengths)
            cur.stopped |= hit
            alive &= ~hit
            n_dead = alive.numel() - int(alive.sum())  # the loop's one host sync per step
            if n_dead == alive.numel():
                break
        if t == steps - 1:
            break
        if n_dead and n_dead >= _COMPACT_FRACTION * alive.numel():
            keep = alive.nonzero().squeeze(1)
            if decoder.compact(keep):
                final.scatter_from(cur, rows)
                cur, rows, alive, tok = cur.select(keep), rows[keep], alive[keep], tok[keep]
                n_dead = 0
        logits = decoder.step(tok, t)
    final.scatter_from(cur, rows)

    width = int(final.lengths.max())
    mask = (torch.arange(width, device=device)[None, :] < final.lengths[:, None]).long()
    return SampleBatch(
        completion_ids=final.ids[:, :width].contiguous(),
        completion_mask=mask,
        logprobs=final.logprobs[:, :width].contiguous(),
        truncated=~final.stopped,
        num_generated_tokens=int(final.lengths.sum()),
        completion_lengths=final.lengths,
        logits=None if final.logits is None else final.logits[:, :width].contiguous(),
    )


@dataclass
class _RowState:
    ids: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    logits: torch.Tensor | None

    def select(self, index: torch.Tensor) -> _RowState:
        return _RowState(
            ids=self.ids[index],
            logprobs=self.logprobs[index],
            lengths=self.lengths[index],
            stopped=self.stopped[index],
            logits=None if self.logits is None else self.logits[index],
        )

    def scatter_from(self, other: _RowState, index: torch.Tensor) -> None:
        self.ids[index] = other.ids
        self.logprobs[index] = other.logprobs
        self.lengths[index] = other.lengths
        self.stopped[index] = other.stopped
        if self.logits is not None and other.logits is not None:
            self.logits[index] = other.logits


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [R] and their log-probs [R] (see the module docstring for which distribution)."""
    if temperature == 0.0:
        tok = logits.argmax(dim=-1)
        lp = logits.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        return tok, lp
    probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(dim=-1) - sorted_p >= top_p, 0.0)
        tok = order.gather(1, _inverse_cdf(sorted_p, generator)[:, None]).squeeze(1)
    else:
        tok = _inverse_cdf(probs, generator)
    # log of the softmax entry == log_softmax to float32 rounding (a sampled token's p is never 0).
    return tok, probs.gather(1, tok[:, None]).squeeze(1).log()


def _inverse_cdf(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row drawn proportionally to the non-negative ``weights`` [R, V].

    One uniform per row from ``generator`` (``torch.multinomial`` draws V exponentials per row, several
    times slower on CPU). Zero-weight indices are never returned: with ``right=True`` the search lands on
    the first index whose cumulative weight exceeds u * total, and u * total is kept below the total.
    A float32 cumsum perturbs each token's probability by at most one rounding of its bucket (~6e-8).
    """
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    gen_device = generator.device if generator is not None else weights.device
    u = torch.rand((weights.shape[0], 1), generator=generator, dtype=weights.dtype, device=gen_device)
    target = torch.minimum(u.to(weights.device) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


# --------------------------------------------------------------------------------------------------------
# Lean decoder for Llama / Qwen2
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    ln_in: torch.Tensor | None  # None where folded into w_qkv
    ln_post: torch.Tensor | None  # None where folded into w_gate_up
    w_qkv: torch.Tensor  # fused q/k/v; q rows scaled by 1/sqrt(hd), input columns maybe by ln_in
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    w_gate_up: torch.Tensor  # fused gate/up; input columns maybe scaled by ln_post
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None


def _cat_bias(*linears: nn.Linear, scales: Sequence[float]) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    parts = []
    for lin, scale in zip(linears, scales, strict=True):
        b = lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
        parts.append(b * scale if scale != 1.0 else b)
    return torch.cat(parts)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # LlamaRMSNorm / Qwen2RMSNorm arithmetic: normalise in float32, scale in the model dtype. ``weight`` is
    # None where it was folded into the next matmul's weights (diag(w) @ W: equal up to rounding).
    if x.dtype == torch.float32 and hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one call; same arithmetic in float32
    xf = x.float()
    xf = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return xf if weight is None else weight * xf


def _prefer_shared_prefix(
    device: torch.device, num_prompts: int, num_generations: int, prompt_width: int, kv_bytes_per_token: int
) -> bool:
    """Cache layout choice: share the prompt's K/V across a group or copy it into each of the G rows.

    Sharing saves reading (G - 1) copies of the prompt's K/V per layer and step but costs about ten more
    small ops per layer and step. On CPU (bench/rollout.py --compare-layouts, 2 threads, against the
    one-SDPA-call expanded layout) the expanded layout won by 4-9% at 1.8-3.7 MB saved per layer-step
    (4 and 8 prompts of 64 tokens, G = 8, hidden 256) and by 17% for the benchmarks' tiny model (1.2 MB),
    sharing by 7% at 7.3 MB (16 prompts) and more for longer prompts; on GPUs the extra
    kernel launches cost more relative to memory traffic, so the threshold there is set higher (an
    estimate: ~10 launches of ~5 us against HBM at ~2-3 TB/s).
    """
    if num_generations < 2:
        return False
    saved = num_prompts * (num_generations - 1) * prompt_width * kv_bytes_per_token
    return saved >= (
        _SHARED_PREFIX_MIN_SAVED_BYTES_CPU if device.type == "cpu" else _SHARED_PREFIX_MIN_SAVED_BYTES
    )


class _LeanDecoder(_Decoder):
    """Static-cache decode for Llama/Qwen2 reading the HF module's parameters (see the module docstring).

    Two cache layouts:
    * expanded: one cache per row, [rows, KV, P + T - 1, hd]; the prompt's K/V is copied to the G rows of
      its group once after prefill. Attention is one SDPA call on CPU, else baddbmm + softmax + bmm.
    * shared: the prompt's K/V stays [groups, KV, P, hd]; each row has its own [rows, KV, T - 1, hd].
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        num_generations: int,
        max_new_tokens: int,
        *,
        share_prefix: bool | None,
        transpose_weights: bool | None = None,
    ) -> None:
        cfg = model.config
        base = model.model
        self.prompts = prompts
        self.embed = base.embed_tokens.weight
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.num_heads = cfg.num_attention_heads
        self.num_kv = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.n_rep = self.num_heads // self.num_kv
        self.eps = float(cfg.rms_norm_eps)
        self.G = num_generations
        self.T = max_new_tokens
        self.P = max(len(p) for p in prompts)
        if share_prefix is None:
            kv_bytes = 2 * self.num_kv * self.head_dim * self.embed.element_size()
            share_prefix = _prefer_shared_prefix(self.device, len(prompts), num_generations, self.P, kv_bytes)
        self.shared = bool(share_prefix) and num_generations > 1

        # On CPU, torch.mm with a [in, out] weight is 5-25% faster than F.linear with [out, in] for these
        # skinny shapes, so the weights are copied transposed (a few MB per call for the models trained
        # on CPU). Elsewhere the HF weights are used as they are, except the fused q/k/v and gate/up.
        self.transposed = self.device.type == "cpu" if transpose_weights is None else transpose_weights

        def prep(weight: torch.Tensor) -> torch.Tensor:
            return weight.t().contiguous() if self.transposed else weight

        # Folded into the fused copies: 1/sqrt(head_dim) into q (RoPE is linear, so it commutes) and, in
        # float32, the RMSNorm weights into the input columns of the matmul after each norm. In 16-bit
        # dtypes w * W would add a rounding HF does not have, so the norms keep their own multiply there.
        scale = self.head_dim**-0.5
        fold = self.dtype == torch.float32

        def norm_cols(weight: torch.Tensor, norm: nn.Module) -> torch.Tensor:
            return weight * norm.weight[None, :] if fold else weight

        self.layers: list[_Layer] = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            w_qkv = torch.cat([attn.q_proj.weight * scale, attn.k_proj.weight, attn.v_proj.weight])
            w_gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            self.layers.append(
                _Layer(
                    ln_in=None if fold else layer.input_layernorm.weight,
                    ln_post=None if fold else layer.post_attention_layernorm.weight,
                    w_qkv=prep(norm_cols(w_qkv, layer.input_layernorm)),
                    b_qkv=_cat_bias(attn.q_proj, attn.k_proj, attn.v_proj, scales=(scale, 1.0, 1.0)),
                    w_o=prep(attn.o_proj.weight),
                    b_o=attn.o_proj.bias,
                    w_gate_up=prep(norm_cols(w_gate_up, layer.post_attention_layernorm)),
                    b_gate_up=_cat_bias(mlp.gate_proj, mlp.up_proj, scales=(1.0, 1.0)),
                    w_down=prep(mlp.down_proj.weight),
                    b_down=mlp.down_proj.bias,
                )
            )
        self.intermediate = mlp.gate_proj.weight.shape[0] if self.layers else 0
        # lm_head is the embedding matrix itself when tied; fold the final norm only where it is copied.
        if self.transposed and fold:
            self.final_norm, self.lm_w = None, prep(norm_cols(model.lm_head.weight, base.norm))
        else:
            self.final_norm, self.lm_w = base.norm.weight, prep(model.lm_head.weight)
        self.lm_b = getattr(model.lm_head, "bias", None)

        # RoPE tables for every position this call can reach, from the model's own rotary module.
        cos, sin = self._rope_tables(model, self.P + max_new_tokens)
        half = self.head_dim // 2
        self.cos = cos
        # rotate_half(x) * sin == roll(x, half) * sin_signed, with the first half of sin negated.
        self.sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    # ----- building blocks -----------------------------------------------------------------------------
    def _rope_tables(self, model: nn.Module, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = getattr(model.model, "rotary_emb", None)
        positions = torch.arange(max_pos, device=self.device)[None, :]
        if rotary is not None:
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = rotary(probe, positions)
            return cos[0].to(self.dtype), sin[0].to(self.dtype)
        # transformers without a model-level rotary module: the default rope from the config.
        theta = float(getattr(model.config, "rope_theta", 10000.0))
        idx = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=self.device).float()
        inv_freq = 1.0 / (theta ** (idx / self.head_dim))
        freqs = positions[0].float()[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        return (x * cos).addcmul_(torch.roll(x, self.head_dim // 2, dims=-1), sin_signed)

    def _lin(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, w, b)
        if x.dim() == 2:
            return torch.mm(x, w) if b is None else torch.addmm(b, x, w)
        y = torch.matmul(x, w)
        return y if b is None else y + b

    def _lin_residual(self, res: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
        """res + linear(x): one addmm on CPU."""
        if self.transposed and x.dim() == 2:
            y = torch.addmm(res, x, w)
            return y if b is None else y.add_(b)
        return res + self._lin(x, w, b)

    def _mlp_residual(self, x: torch.Tensor, L: _Layer) -> torch.Tensor:
        gate_up = self._lin(_rms_norm(x, L.ln_post, self.eps), L.w_gate_up, L.b_gate_up)
        act = F.silu(gate_up[..., : self.intermediate]).mul_(gate_up[..., self.intermediate :])
        return self._lin_residual(x, act, L.w_down, L.b_down)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self._lin(_rms_norm(x, self.final_norm, self.eps), self.lm_w, self.lm_b).float()

    # ----- prefill -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        ids, plen = _left_pad(self.prompts, 0, self.device)  # pad id is irrelevant: masked everywhere
        B, P = ids.shape
        H, KV, hd, G = self.num_heads, self.num_kv, self.head_dim, self.G
        n_pad = P - plen
        col = torch.arange(P, device=self.device)
        pos = (col[None, :] - n_pad[:, None]).clamp(min=0)  # 0 at each prompt's first real token
        valid = col[None, :] >= n_pad[:, None]  # [B, P] real (non-pad) key positions
        causal = col[None, :] <= col[:, None]
        # Pad query rows may attend to themselves only (keeps them finite; nothing reads them).
        diagonal = torch.eye(P, dtype=torch.bool, device=self.device)
        allowed = (causal[None] & valid[:, None, :]) | diagonal[None]
        allowed = allowed[:, None]  # [B, 1, P, P]
        cos, sin = self.cos[pos][:, :, None, :], self.sin_signed[pos][:, :, None, :]  # [B, P, 1, hd]

        prompt_k: list[torch.Tensor] = []
        prompt_v: list[torch.Tensor] = []
        x = F.embedding(ids, self.embed)
        for L in self.layers:
            qkv = self._lin(_rms_norm(x, L.ln_in, self.eps), L.w_qkv, L.b_qkv)
            qk = self._rope(qkv[..., : (H + KV) * hd].view(B, P, H + KV, hd), cos, sin)
            q = qk[:, :, :H].transpose(1, 2)  # [B, H, P, hd], already scaled by 1/sqrt(hd)
            k = qk[:, :, H:].transpose(1, 2).contiguous()  # [B, KV, P, hd]
            v = qkv[..., (H + KV) * hd :].view(B, P, KV, hd).transpose(1, 2).contiguous()
            prompt_k.append(k)
            prompt_v.append(v)
            k_rep = k.repeat_interleave(self.n_rep, dim=1) if self.n_rep > 1 else k
            v_rep = v.repeat_interleave(self.n_rep, dim=1) if self.n_rep > 1 else v
            o = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=allowed, scale=1.0)
            x = self._lin_residual(x, o.transpose(1, 2).reshape(B, P, H * hd), L.w_o, L.b_o)
            x = self._mlp_residual(x, L)
        logits = self._head(x[:, -1])

        # Decode state. Rows are (prompt, sample) in prompt-major order.
        n_rows = B * G
        self.row_pos = plen.repeat_interleave(G)  # position of completion token 0 of each row
        key_bias = torch.zeros(B, 1, 1, P, dtype=self.dtype, device=self.device)
        key_bias.masked_fill_(~valid[:, None, None, :], float("-inf"))
        if self.shared:
            # A group owns G consecutive "slots" of the prefix-attention batch; `slots` maps decode rows
            # to slots (identity until rows are dropped).
            self.prefix_k, self.prefix_v = prompt_k, prompt_v
            self.prefix_bias = key_bias.expand(B, KV, 1, P).reshape(B * KV, 1, P)
            self.num_groups = B
            self.slots = torch.arange(n_rows, device=self.device)
            self.slots_are_rows = True
            self.base_col, width = 0, max(self.T - 1, 1)
        else:
            self.base_col, width = P, P + max(self.T - 1, 0)
            bias = torch.zeros(n_rows, 1, 1, width, dtype=self.dtype, device=self.device)
            bias[:, :, :, :P] = key_bias.repeat_interleave(G, dim=0)
        self.width = width
        # Expanded on CPU: one SDPA call per layer and step over a contiguous per-row cache (see
        # `_LeanDecoder`), with the key bias as [rows, 1, 1, width]; elsewhere [rows * KV, 1, width].
        self.fused = not self.shared and self.device.type == "cpu"
        if self.fused:
            self.bias4 = bias
        elif not self.shared:
            self.bias = bias.expand(n_rows, KV, 1, width).reshape(n_rows * KV, 1, width)
        self.staged = self.device.type == "cpu" and not self.fused
        C = self.chunk = _KV_CHUNK_CPU if self.staged else width
        shape = (-(-width // C), n_rows, KV, C, hd)
        self.cache_k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.cache_v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        stage_shape = (C if self.staged else 0, n_rows, KV, hd)  # only used on CPU
        self.stage_k = [torch.empty(stage_shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.stage_v = [torch.empty(stage_shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        if not self.shared:  # the prompt's K/V, copied once into each of its G rows
            c0, j0 = divmod(P, C)  # the chunk the first completion token goes to, and its position there
            for cache, stage, src in ((self.cache_k, self.stage_k, prompt_k), (self.cache_v, self.stage_v, prompt_v)):
                for buf, st, part in zip(cache, stage, src, strict=True):
                    for c in range(-(-P // C)):
                        lo, hi = c * C, min(P, (c + 1) * C)
                        buf[c].view(B, G, KV, C, hd)[:, :, :, : hi - lo] = part[:, None, :, lo:hi]
                    if self.staged and j0:
                        st[:j0] = buf[c0, :, :, :j0].permute(2, 0, 1, 3)
        self.filled = self.base_col
        self._chunk_views()
        return logits

    def _chunk_views(self) -> None:
        """Per layer and chunk: the 4-D chunk (for writes), K^T and V as batched matrices (for reads)."""
        hd, C = self.head_dim, self.chunk
        self.k4 = [[buf[i] for i in range(buf.shape[0])] for buf in self.cache_k]
        self.v4 = [[buf[i] for i in range(buf.shape[0])] for buf in self.cache_v]
        self.kT = [[c.view(-1, C, hd).transpose(1, 2) for c in chunks] for chunks in self.k4]
        self.v3 = [[c.view(-1, C, hd) for c in chunks] for chunks in self.v4]

    # ----- decode ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        R = tokens.shape[0]
        H, KV, hd = self.num_heads, self.num_kv, self.head_dim
        pos = self.row_pos + t
        cos, sin = self.cos[pos][:, None, :], self.sin_signed[pos][:, None, :]  # [R, 1, hd]
        col = self.base_col + t
        # Column col goes to position j of chunk c; the attention reads chunks 0..c, the last one up to j.
        c, j = divmod(col, self.chunk)
        full = j + 1 == self.chunk
        x = F.embedding(tokens, self.embed)
        for li, L in enumerate(self.layers):
            qkv = self._lin(_rms_norm(x, L.ln_in, self.eps), L.w_qkv, L.b_qkv)
            qk = self._rope(qkv[:, : (H + KV) * hd].view(R, H + KV, hd), cos, sin)
            k_new, v_new = qk[:, H:], qkv[:, (H + KV) * hd :].view(R, KV, hd)
            if self.fused:
                o = self._attend_fused(qk[:, :H].view(R, KV, self.n_rep, hd), k_new, v_new, li, col)
            else:
                if self.staged:  # chunk c is in the staging buffer, position-major
                    sk, sv = self.stage_k[li], self.stage_v[li]
                    sk[j].copy_(k_new)
                    sv[j].copy_(v_new)
                    kT = [*self.kT[li][:c], sk[: j + 1].view(j + 1, R * KV, hd).permute(1, 2, 0)]
                    v = [*self.v3[li][:c], sv[: j + 1].view(j + 1, R * KV, hd).transpose(0, 1)]
                else:
                    self.k4[li][c].select(2, j).copy_(k_new)
                    self.v4[li][c].select(2, j).copy_(v_new)
                    kT, v = self.kT[li][: c + 1], self.v3[li][: c + 1]
                    if not full:
                        kT[c], v[c] = kT[c][:, :, : j + 1], v[c][:, : j + 1]
                q = qk[:, :H].reshape(R * KV, self.n_rep, hd)
                o = self._attend_shared(q, kT, v, li) if self.shared else self._attend_expanded(q, kT, v, col)
                if self.staged and full:  # chunk c is complete: into the cache
                    self.k4[li][c].copy_(sk.permute(1, 2, 0, 3))
                    self.v4[li][c].copy_(sv.permute(1, 2, 0, 3))
            x = self._lin_residual(x, o.reshape(R, H * hd), L.w_o, L.b_o)
            x = self._mlp_residual(x, L)
        self.filled = col + 1
        return self._head(x)

    def _attend_fused(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, li: int, col: int) -> torch.Tensor:
        """One SDPA call over the contiguous per-row cache; q [R, KV, n_rep, hd] (pre-scaled): the n_rep query
        heads of a KV head are its "query positions", so K/V are not repeated."""
        cache_k, cache_v = self.k4[li][0], self.v4[li][0]
        cache_k.select(2, col).copy_(k_new)
        cache_v.select(2, col).copy_(v_new)
        return F.scaled_dot_product_attention(q, cache_k[:, :, : col + 1], cache_v[:, :, : col + 1],
                                              attn_mask=self.bias4[..., : col + 1], scale=1.0)

    # q [R*KV, n_rep, hd] (GQA: the n_rep query heads of a kv head share one matmul); kT/v: the cache's
    # chunks in order, K^T [R*KV, hd, w] and V [R*KV, w, hd] (w <= chunk).
    def _attend_expanded(
        self, q: torch.Tensor, kT: list[torch.Tensor], v: list[torch.Tensor], col: int
    ) -> torch.Tensor:
        C, P = self.chunk, self.P
        parts = [
            torch.baddbmm(self.bias[:, :, c * C : c * C + k.shape[2]], q, k) if c * C < P else torch.bmm(q, k)
            for c, k in enumerate(kT)
        ]
        s = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(self.dtype)
        return self._own_values(None, p, v)

    def _attend_shared(
        self, q: torch.Tensor, kT: list[torch.Tensor], v: list[torch.Tensor], li: int
    ) -> torch.Tensor:
        P = self.P
        s = torch.cat([self._prefix_scores(q, li), *(torch.bmm(q, k) for k in kT)], dim=-1)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(self.dtype)
        return self._own_values(self._prefix_values(p[..., :P], li), p[..., P:], v)

    def _own_values(self, o: torch.Tensor | None, p: torch.Tensor, v: list[torch.Tensor]) -> torch.Tensor:
        """o + p @ cat(v) one chunk at a time (p [R*KV, n_rep, sum of widths])."""
        start = 0
        for vv in v:
            w = vv.shape[1]
            pc = p[..., start : start + w]
            o = torch.bmm(pc, vv) if o is None else o.baddbmm_(pc, vv)
            start += w
        return o

    def _to_slots(self, x: torch.Tensor) -> torch.Tensor:
        """[R*KV, ...] per decode row -> [slots, KV, ...] (zeros in the slots of dropped rows)."""
        x = x.reshape(-1, self.num_kv, *x.shape[1:])
        if self.slots_are_rows:
            return x
        out = x.new_zeros((self.num_groups * self.G, *x.shape[1:]))
        return out.index_copy_(0, self.slots, x)

    def _from_slots(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.slots_are_rows else x.index_select(0, self.slots)
        return x.reshape(-1, *x.shape[2:])

    def _group_major(self, x: torch.Tensor) -> torch.Tensor:
        """[slots, KV, n_rep, m] -> [groups*KV, G*n_rep, m]: one matmul per (group, kv head)."""
        ng, G, KV, n_rep, m = self.num_groups, self.G, self.num_kv, self.n_rep, x.shape[-1]
        return x.reshape(ng, G, KV, n_rep, m).transpose(1, 2).reshape(ng * KV, G * n_rep, m)

    def _slot_major(self, x: torch.Tensor) -> torch.Tensor:
        ng, G, KV, n_rep, m = self.num_groups, self.G, self.num_kv, self.n_rep, x.shape[-1]
        return x.view(ng, KV, G, n_rep, m).transpose(1, 2).reshape(ng * G, KV, n_rep, m)

    def _prefix_scores(self, q: torch.Tensor, li: int) -> torch.Tensor:
        k = self.prefix_k[li].view(-1, self.P, self.head_dim)  # [groups*KV, P, hd]
        s = torch.baddbmm(self.prefix_bias, self._group_major(self._to_slots(q)), k.transpose(1, 2))
        return self._from_slots(self._slot_major(s))  # [R*KV, n_rep, P]

    def _prefix_values(self, p: torch.Tensor, li: int) -> torch.Tensor:
        v = self.prefix_v[li].view(-1, self.P, self.head_dim)
        o = torch.bmm(self._group_major(self._to_slots(p)), v)
        return self._from_slots(self._slot_major(o))  # [R*KV, n_rep, hd]

    @torch.no_grad()
    def compact(self, keep: torch.Tensor) -> bool:
        n, KV = keep.numel(), self.num_kv
        chunks, staged = divmod(self.filled, self.chunk)  # complete chunks, positions in the staging buffer
        for cache, stage in ((self.cache_k, self.stage_k), (self.cache_v, self.stage_v)):
            for li, (buf, st) in enumerate(zip(cache, stage, strict=True)):
                # Gather the filled part (a temporary), then write it into the front rows in place.
                if self.staged:
                    buf[:chunks, :n] = buf[:chunks, keep]
                    st[:staged, :n] = st[:staged, keep]
                    stage[li] = st[:, :n]
                else:  # one chunk of `width` positions, filled up to `filled`
                    buf[0, :n, :, : self.filled] = buf[0, keep, :, : self.filled]
                cache[li] = buf[:, :n]
        self._chunk_views()
        self.row_pos = self.row_pos[keep]
        if self.fused:
            self.bias4 = self.bias4.index_select(0, keep)
            return True
        if not self.shared:
            self.bias = (
                self.bias.view(-1, KV, 1, self.width).index_select(0, keep).view(n * KV, 1, self.width)
            )
            return True
        slots = self.slots[keep]
        groups = torch.div(slots, self.G, rounding_mode="floor")
        live = torch.unique(groups)  # sorted
        if live.numel() < self.num_groups:  # whole groups finished: drop their prompt cache too
            self.prefix_k = [k.index_select(0, live) for k in self.prefix_k]
            self.prefix_v = [v.index_select(0, live) for v in self.prefix_v]
            bias = self.prefix_bias.view(self.num_groups, KV, 1, self.P).index_select(0, live)
            self.prefix_bias = bias.view(-1, 1, self.P)
            slots = torch.searchsorted(live, groups) * self.G + slots % self.G
            self.num_groups = live.numel()
        self.slots = slots
        self.slots_are_rows = n == self.num_groups * self.G
        return True


# --------------------------------------------------------------------------------------------------------
# Generic decoder: the model's own forward with past_key_values
# --------------------------------------------------------------------------------------------------------


def _cache_repeat(cache: object, repeats: int) -> object:
    if isinstance(cache, (tuple, list)):
        return tuple(tuple(t.repeat_interleave(repeats, dim=0) for t in layer) for layer in cache)
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(repeats)
        return cache
    raise TypeError(f"cannot repeat a {type(cache).__name__} KV cache across samples")


def _cache_select(cache: object, keep: torch.Tensor) -> object | None:
    if isinstance(cache, (tuple, list)):
        return tuple(tuple(t.index_select(0, keep) for t in layer) for layer in cache)
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(keep)
        return cache
    return None


class _HFDecoder(_Decoder):
    """Any HF causal LM: prefill once per prompt, repeat the cache G times, decode one token per call."""

    def __init__(
        self, model: nn.Module, prompts: list[list[int]], num_generations: int, max_new_tokens: int, pad: int
    ) -> None:
        self.model = model
        self.prompts = prompts
        self.G = num_generations
        self.T = max_new_tokens
        self.pad = pad
        self.device = model.get_input_embeddings().weight.device
        params = inspect.signature(model.forward).parameters
        self.accepts_position_ids = "position_ids" in params
        self.logits_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.can_compact = True

    def _forward(self, **kwargs: object) -> torch.Tensor:
        if self.logits_kw is not None:
            kwargs[self.logits_kw] = 1
        if not self.accepts_position_ids:
            kwargs.pop("position_ids")
        out = self.model(use_cache=True, return_dict=True, **kwargs)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def prefill(self) -> torch.Tensor:
        ids, plen = _left_pad(self.prompts, self.pad, self.device)
        B, P = ids.shape
        col = torch.arange(P, device=self.device)
        n_pad = P - plen
        prompt_mask = (col[None, :] >= n_pad[:, None]).long()
        pos = (col[None, :] - n_pad[:, None]).clamp(min=0)
        logits = self._forward(input_ids=ids, attention_mask=prompt_mask, position_ids=pos)
        self.cache = _cache_repeat(self.cache, self.G)
        self.prompt_width = P
        self.mask = torch.cat(
            [prompt_mask, torch.ones(B, self.T, dtype=torch.long, device=self.device)], dim=1
        ).repeat_interleave(self.G, dim=0)
        self.row_pos = plen.repeat_interleave(self.G)
        return logits

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        return self._forward(
            input_ids=tokens[:, None],
            attention_mask=self.mask[:, : self.prompt_width + t + 1],
            position_ids=(self.row_pos + t)[:, None],
            past_key_values=self.cache,
        )

    def compact(self, keep: torch.Tensor) -> bool:
        if not self.can_compact:
            return False
        selected = _cache_select(self.cache, keep)
        if selected is None:  # unknown cache type: keep decoding the finished rows (outputs ignored)
            self.can_compact = False
            return False
        self.cache = selected
        self.mask = self.mask[keep]
        self.row_pos = self.row_pos[keep]
        return True
