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

Rows that finished (EOS, a stop sequence or a stop string) emit only padding and are dropped from the decode batch
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
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from trainer.rl.logprobs import unwrap_model
from trainer.rl.stopping import StopStrings

logger = logging.getLogger(__name__)

# Rope variants whose cos/sin at a position do not depend on the length of the sequence being run
# (the "dynamic" and "longrope" variants do, so a KV-cached decode would not equal the full forward).

_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
# Qwen3 is Qwen2 without the qkv bias and with an RMSNorm over each head's q and k before RoPE (the lean
# decoder applies it). Gemma 3 (scaled embeddings, sandwich norms, (1 + w) norms, sliding-window layers) and
# DeepSeek-V3 (latent attention, routed experts) take the generic decoder.
_LEAN_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3"})
# Compact the decode batch once at least this fraction of its rows has finished: each compaction copies
# the filled part of the per-sample cache once, about what one decode step reads anyway.
_COMPACT_FRACTION = 0.125
# K/V bytes per layer and decode step that sharing the prompt cache must save to be used


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
    stop_strings: StopStrings | None = None,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    keep_logits: bool = False,
    share_prefix: bool | None = None,
) -> SampleBatch:
    """Sample ``num_generations`` completions for each prompt in ``prompt_ids``.

    Generation of a row stops after it emits a token of ``eos_token_ids`` (may be empty; use
    :func:`trainer.rl.stopping.eos_token_ids`), when its completion ends with one of ``stop_sequences``
    (token-id suffix match inside the completion), or at the first token after which its decoded text
    contains one of ``stop_strings`` (:class:`trainer.rl.stopping.StopStrings`, whatever the tokenization);
    the stop token is part of the completion and its mask.

    ``backend``: ``"auto"`` (lean decoder when the model supports it, else HF forward), ``"lean"`` (error
    when unsupported) or ``"hf"``. ``keep_logits`` additionally returns every step's raw logits (tests,
    debugging; costs B*G*T*V floats). ``share_prefix`` (lean backend only): True shares one prompt cache per
    group, False copies it into each row, None picks by the memory traffic saved (see module docstring).

    The model is run in eval mode (dropout off) and its training flag is restored afterwards.
    """
    model = _hf_model(model)
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
    _log_path(model, "lean" if use_lean else "hf", reason if backend == "auto" else f"backend={backend!r}")

    was_training = model.training
    model.eval()
    try:
        if use_lean:
            from trainer.rl.lean_decoder import _LeanDecoder  # imports this module

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
            stop_strings=stop_strings,
            pad_token_id=int(pad_token_id),
            generator=generator,
            keep_logits=keep_logits,
        )
    finally:
        model.train(was_training)
    batch.backend = "lean" if use_lean else "hf"
    return batch


_LOGGED_PATHS: set[tuple[str, str]] = set()


def _log_path(model: nn.Module, path: str, reason: str | None) -> None:
    """One log line per model class and path: which decoder samples it, and why not the lean one."""
    key = (type(model).__name__, path)
    if key in _LOGGED_PATHS:
        return
    _LOGGED_PATHS.add(key)
    if path == "lean":
        logger.info("sampler: lean decoder for %s", key[0])
    else:
        logger.info("sampler: generic HF decoder for %s (%s)", key[0], reason)


def lean_path_unsupported_reason(model: nn.Module, max_total_length: int | None = None) -> str | None:
    """Why the lean decoder cannot run ``model`` exactly like its HF forward, or None when it can."""
    model = _hf_model(model)
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
    if model_type in ("qwen2", "qwen3"):
        num_layers = cfg.num_hidden_layers
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "max_window_layers", 0) < num_layers:
            return f"{model_type} sliding-window attention is enabled"
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
        if (model_type == "qwen3") != (hasattr(attn, "q_norm") and hasattr(attn, "k_norm")):
            return (
                f"layer {i}: q/k norms {'missing' if model_type == 'qwen3' else 'present'} for {model_type!r}"
            )
    return None


# --------------------------------------------------------------------------------------------------------
# Input checks and small helpers
# --------------------------------------------------------------------------------------------------------


def _hf_model(model: nn.Module) -> nn.Module:
    """The HF model inside Colossal-AI / DDP wrappers (sampling needs its config and submodules)."""
    model = unwrap_model(model)
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
    stop_strings: StopStrings | None,
    pad_token_id: int,
    generator: torch.Generator | None,
    keep_logits: bool,
) -> SampleBatch:
    device = decoder.device
    n_rows, steps = num_prompts * num_generations, max_new_tokens
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device) if eos_token_ids else None
    stops = [torch.tensor(s, dtype=torch.long, device=device) for s in stop_sequences]
    candidates = stop_strings.candidates_on(device) if stop_strings is not None else None
    check_stops = eos is not None or bool(stops) or candidates is not None

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
            if candidates is None:
                n_dead = alive.numel() - int((alive & ~hit).sum())  # the loop's one host sync per step
            else:
                # Rows whose new token may complete a stop string; the count rides on the same sync.
                maybe = candidates[tok] & alive & ~hit
                n_alive, n_maybe = torch.stack([(alive & ~hit).sum(), maybe.sum()]).tolist()
                if n_maybe:
                    found = _stop_string_rows(stop_strings, cur.ids, maybe, t)
                    if found:
                        hit[torch.tensor(found, device=device)] = True
                        n_alive -= len(found)
                n_dead = alive.numel() - n_alive
            cur.lengths = torch.where(hit, t + 1, cur.lengths)
            cur.stopped |= hit
            alive &= ~hit
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


def _stop_string_rows(stop_strings: StopStrings, ids: torch.Tensor, maybe: torch.Tensor, t: int) -> list[int]:
    """The rows among ``maybe`` whose completion text (tokens 0..t of ``ids``) now contains a stop string."""
    rows = maybe.nonzero().squeeze(1).tolist()
    start = max(0, t + 1 - stop_strings.window)
    tails = ids[rows, start : t + 1].tolist()
    return [r for r, tail in zip(rows, tails, strict=True) if stop_strings.hit(tail)]


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


# Models whose forward would build a cache sized to the prompt alone (Gemma 3's HybridCache keeps sliding-window
# layers in a fixed ring): the decoder builds one for the whole prompt + completion, as `generate` does.
_FIXED_SIZE_CACHES = {"hybrid": "HybridCache", "static": "StaticCache"}


class _HFDecoder(_Decoder):
    """Any HF causal LM: prefill once per prompt, repeat the cache G times, decode one token per call.

    A fixed-size cache (``cache_implementation`` "hybrid" / "static") cannot be repeated across samples:
    it is allocated for B*G rows and prompt + completion positions, and each prompt is prefilled G times.
    """

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
        implementation = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
        implementation = implementation or getattr(model.config, "cache_implementation", None)
        self.fixed_cache = _FIXED_SIZE_CACHES.get(implementation) if "cache_position" in params else None

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
        if self.fixed_cache is None:
            logits = self._forward(input_ids=ids, attention_mask=prompt_mask, position_ids=pos)
            self.cache = _cache_repeat(self.cache, self.G)
        else:
            import transformers

            cache = getattr(transformers, self.fixed_cache)(
                config=self.model.config,
                max_batch_size=B * self.G,
                max_cache_len=P + self.T,
                device=self.device,
                dtype=self.model.get_input_embeddings().weight.dtype,
            )
            self.can_compact = False  # the cache's batch size is fixed
            logits = self._forward(
                input_ids=ids.repeat_interleave(self.G, dim=0),
                attention_mask=prompt_mask.repeat_interleave(self.G, dim=0),
                position_ids=pos.repeat_interleave(self.G, dim=0),
                past_key_values=cache,
                cache_position=col,
            )[:: self.G]
        self.prompt_width = P
        self.mask = torch.cat(
            [prompt_mask, torch.ones(B, self.T, dtype=torch.long, device=self.device)], dim=1
        ).repeat_interleave(self.G, dim=0)
        self.row_pos = plen.repeat_interleave(self.G)
        return logits

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        extra = {}
        if self.fixed_cache is not None:
            extra["cache_position"] = torch.tensor([self.prompt_width + t], device=self.device)
        return self._forward(
            input_ids=tokens[:, None],
            attention_mask=self.mask[:, : self.prompt_width + t + 1],
            position_ids=(self.row_pos + t)[:, None],
            past_key_values=self.cache,
            **extra,
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
