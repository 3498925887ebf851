"""GRPO rollout sampler: ``num_generations`` completions per prompt, KV-cached, prompt prefilled once.

``sample_groups`` is the only entry point the trainer and the evaluator use.

Two decoders sit behind it:

* ``lean`` (``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` and subclasses): a hand-written decode step that
  reads the HF module's parameters directly. The B prompts are prefilled once ([B, P], left-padded,
  positions starting at 0 on each prompt's first real token) into a *shared prefix cache*; the G samples
  of a group attend to it together with one batched matmul per (group, kv-head) - the G*n_rep query rows
  of a group form one small GEMM instead of G GEMVs, and the prefix K/V is read once per group instead of
  G times. Each sample's own tokens live in a preallocated static cache [rows, kv_heads, T, head_dim]
  (no per-step ``torch.cat`` of K/V). The prefix scores and the per-sample scores are concatenated (they
  are tiny next to K/V) and go through one softmax, so the attention is exactly the standard one.
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


@dataclass
class SampleBatch:
    """Completions of ``B`` prompts x ``G`` samples; row ``r`` belongs to prompt ``r // G``.

    ``T`` is the longest completion in the batch (at most ``max_new_tokens``); shorter rows are
    right-padded with ``pad_token_id``.
    """

    completion_ids: torch.LongTensor  # [B*G, T] right-padded with pad_token_id
    completion_mask: torch.Tensor  # [B*G, T] int64; 1 for generated tokens incl. the stop token(s), 0 after
    logprobs: torch.Tensor  # [B*G, T] float32 log p(token) under softmax(logits / temperature); 0 where masked
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
    share_prefix: bool = True,
) -> SampleBatch:
    """Sample ``num_generations`` completions for each prompt in ``prompt_ids``.

    Generation of a row stops after it emits a token of ``eos_token_ids`` (may be empty) or when its
    completion ends with one of ``stop_sequences`` (token-id suffix match inside the completion, e.g. the
    tokenization of ``</answer>``); the stop token(s) are part of the completion and its mask.

    ``backend``: ``"auto"`` (lean decoder when the model supports it, else HF forward), ``"lean"`` (error
    when unsupported) or ``"hf"``. ``keep_logits`` additionally returns every step's raw logits (tests,
    debugging; costs B*G*T*V floats). ``share_prefix=False`` copies the prompt cache G times instead of
    sharing it (lean backend only; kept for benchmarking the two layouts).

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
    out_ids = torch.full((n_rows, steps), pad_token_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((n_rows, steps), dtype=torch.float32, device=device)
    lengths = torch.full((n_rows,), steps, dtype=torch.long, device=device)
    stopped = torch.zeros(n_rows, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device) if eos_token_ids else None
    stops = [torch.tensor(s, dtype=torch.long, device=device) for s in stop_sequences]
    pad = torch.tensor(pad_token_id, dtype=torch.long, device=device)

    logits = decoder.prefill().repeat_interleave(num_generations, dim=0)  # the G samples share step 0
    out_logits = None
    if keep_logits:
        out_logits = torch.zeros((n_rows, steps, logits.shape[-1]), dtype=torch.float32, device=device)
    rows = torch.arange(n_rows, device=device)  # original row id of each current decode row
    alive = torch.ones(n_rows, dtype=torch.bool, device=device)
    for t in range(steps):
        tok, lp = _sample(logits, temperature, top_p, generator)
        tok = torch.where(alive, tok, pad)
        out_ids[rows, t] = tok
        out_lp[rows, t] = torch.where(alive, lp, 0.0)
        if out_logits is not None:
            out_logits[rows, t] = logits * alive[:, None]
        hit = torch.zeros_like(alive) if eos is None else torch.isin(tok, eos)
        for seq in stops:
            n = seq.numel()
            if n <= t + 1:
                hit |= (out_ids[rows, t + 1 - n : t + 1] == seq).all(dim=1)
        hit &= alive
        lengths[rows] = torch.where(hit, t + 1, lengths[rows])
        stopped[rows] |= hit
        alive &= ~hit
        n_alive = int(alive.sum())  # the loop's one host sync per step
        if n_alive == 0 or t == steps - 1:
            break
        n_dead = alive.numel() - n_alive
        if n_dead > 0 and n_dead >= _COMPACT_FRACTION * alive.numel():
            keep = alive.nonzero().squeeze(1)
            if decoder.compact(keep):
                rows, alive, tok = rows[keep], alive[keep], tok[keep]
        logits = decoder.step(tok, t)

    width = int(lengths.max())
    mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    return SampleBatch(
        completion_ids=out_ids[:, :width].contiguous(),
        completion_mask=mask,
        logprobs=out_lp[:, :width].contiguous(),
        truncated=~stopped,
        num_generated_tokens=int(lengths.sum()),
        completion_lengths=lengths,
        logits=None if out_logits is None else out_logits[:, :width].contiguous(),
    )


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [R] and their log-probs [R] (see the module docstring for which distribution)."""
    if temperature == 0.0:
        tok = logits.argmax(dim=-1)
        lp = logits.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        return tok, lp
    scaled = logits if temperature == 1.0 else logits / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(dim=-1) - sorted_p >= top_p, 0.0)
        tok = order.gather(1, _inverse_cdf(sorted_p, generator)[:, None]).squeeze(1)
    else:
        tok = _inverse_cdf(probs, generator)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


def _inverse_cdf(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row drawn proportionally to the non-negative ``weights`` [R, V].

    One uniform per row from ``generator`` (much cheaper than ``torch.multinomial``, which draws V
    exponentials per row). Zero-weight indices are never returned: with ``right=True`` the search lands
    on the first index whose cumulative weight exceeds u * total, and u * total is kept below the total.
    """
    cdf = weights.to(torch.float64).cumsum(dim=-1)  # float64 keeps tiny probabilities' buckets exact
    total = cdf[:, -1:]
    gen_device = generator.device if generator is not None else weights.device
    u = torch.rand((weights.shape[0], 1), generator=generator, dtype=torch.float64, device=gen_device)
    x = torch.minimum(u.to(weights.device) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(1)


# --------------------------------------------------------------------------------------------------------
# Lean decoder for Llama / Qwen2
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    ln_in: torch.Tensor
    ln_post: torch.Tensor
    w_qkv: torch.Tensor  # [(H + 2*KV) * hd, D]; q rows pre-multiplied by 1/sqrt(hd)
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    w_gate_up: torch.Tensor  # [2 * I, D]
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


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as LlamaRMSNorm / Qwen2RMSNorm: normalise in float32, scale in the model dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class _LeanDecoder(_Decoder):
    """Prefix-shared, static-cache decode for Llama/Qwen2 (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        num_generations: int,
        max_new_tokens: int,
        *,
        share_prefix: bool,
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
        self.final_norm = base.norm.weight
        self.lm_w = model.lm_head.weight  # the embedding itself when tied
        self.lm_b = getattr(model.lm_head, "bias", None)
        self.G = num_generations
        self.T = max_new_tokens
        self.share_prefix = share_prefix

        # Fusing q/k/v and gate/up costs one copy of those weights per call and saves two GEMM launches
        # per layer per step; folding the softmax scale into q is free while copying.
        scale = self.head_dim**-0.5
        self.layers: list[_Layer] = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    ln_in=layer.input_layernorm.weight,
                    ln_post=layer.post_attention_layernorm.weight,
                    w_qkv=torch.cat([attn.q_proj.weight * scale, attn.k_proj.weight, attn.v_proj.weight]),
                    b_qkv=_cat_bias(attn.q_proj, attn.k_proj, attn.v_proj, scales=(scale, 1.0, 1.0)),
                    w_o=attn.o_proj.weight,
                    b_o=attn.o_proj.bias,
                    w_gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    b_gate_up=_cat_bias(mlp.gate_proj, mlp.up_proj, scales=(1.0, 1.0)),
                    w_down=mlp.down_proj.weight,
                    b_down=mlp.down_proj.bias,
                )
            )
        self.intermediate = self.layers[0].w_gate_up.shape[0] // 2 if self.layers else 0

        # RoPE tables for every position this call can reach, from the model's own rotary module.
        max_pos = max(len(p) for p in prompts) + max_new_tokens
        cos, sin = self._rope_tables(model, max_pos)
        half = self.head_dim // 2
        self.cos = cos
        # rotate_half(x) * sin == roll(x, half) * sin_signed, with the first half of sin negated.
        self.sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    # ----- rope --------------------------------------------------------------------------------------
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
        return x * cos + torch.roll(x, self.head_dim // 2, dims=-1) * sin_signed

    # ----- prefill -----------------------------------------------------------------------------------
    def prefill(self) -> torch.Tensor:
        ids, plen = _left_pad(self.prompts, 0, self.device)  # pad id is irrelevant: masked everywhere
        B, P = ids.shape
        H, KV, hd = self.num_heads, self.num_kv, self.head_dim
        n_pad = P - plen
        col = torch.arange(P, device=self.device)
        pos = (col[None, :] - n_pad[:, None]).clamp(min=0)  # 0 at each prompt's first real token
        valid = col[None, :] >= n_pad[:, None]  # [B, P] real (non-pad) key positions
        causal = col[None, :] <= col[:, None]
        # Pad query rows may attend to themselves only (keeps them finite; nothing reads them).
        allowed = (causal[None] & valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=self.device)[None]
        allowed = allowed[:, None]  # [B, 1, P, P]
        cos, sin = self.cos[pos][:, :, None, :], self.sin_signed[pos][:, :, None, :]  # [B, P, 1, hd]

        self.prefix_k: list[torch.Tensor] = []
        self.prefix_v: list[torch.Tensor] = []
        x = F.embedding(ids, self.embed)
        for L in self.layers:
            h = _rms_norm(x, L.ln_in, self.eps)
            qkv = F.linear(h, L.w_qkv, L.b_qkv)
            qk = self._rope(qkv[..., : (H + KV) * hd].view(B, P, H + KV, hd), cos, sin)
            q = qk[:, :, :H].transpose(1, 2)  # [B, H, P, hd], already scaled by 1/sqrt(hd)
            k = qk[:, :, H:].transpose(1, 2).contiguous()  # [B, KV, P, hd]
            v = qkv[..., (H + KV) * hd :].view(B, P, KV, hd).transpose(1, 2).contiguous()
            self.prefix_k.append(k)
            self.prefix_v.append(v)
            k_rep = k.repeat_interleave(self.n_rep, dim=1) if self.n_rep > 1 else k
            v_rep = v.repeat_interleave(self.n_rep, dim=1) if self.n_rep > 1 else v
            o = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=allowed, scale=1.0)
            x = x + F.linear(o.transpose(1, 2).reshape(B, P, H * hd), L.w_o, L.b_o)
            x = x + self._mlp(_rms_norm(x, L.ln_post, self.eps), L)
        logits = self._head(x[:, -1])

        # Decode-time state. Rows are (group, member) in group-major order; a group owns G slots of the
        # prefix-attention batch (or 1 slot when the prefix is copied per row).
        G = self.G
        n_rows = B * G
        self.prefix_bias = torch.zeros(B, 1, 1, P, dtype=self.dtype, device=self.device)
        self.prefix_bias.masked_fill_(~valid[:, None, None, :], float("-inf"))
        self.group_size = G if self.share_prefix else 1
        if not self.share_prefix:
            self.prefix_k = [k.repeat_interleave(G, dim=0) for k in self.prefix_k]
            self.prefix_v = [v.repeat_interleave(G, dim=0) for v in self.prefix_v]
            self.prefix_bias = self.prefix_bias.repeat_interleave(G, dim=0)
        self.num_groups = self.prefix_bias.shape[0]
        self.slots = torch.arange(n_rows, device=self.device)  # prefix slot of each decode row
        self.slots_are_rows = True  # every slot holds a live row, in order: no scatter/gather needed
        self.row_pos = plen.repeat_interleave(G)  # position of completion token 0 of each row
        # Static per-sample caches; token t of the completion is written at [:, :, t].
        shape = (n_rows, KV, max(self.T - 1, 1), hd)
        self.cache_k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.cache_v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.filled = 0
        return logits

    def _mlp(self, h: torch.Tensor, L: _Layer) -> torch.Tensor:
        gate_up = F.linear(h, L.w_gate_up, L.b_gate_up)
        act = F.silu(gate_up[..., : self.intermediate]) * gate_up[..., self.intermediate :]
        return F.linear(act, L.w_down, L.b_down)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(x, self.final_norm, self.eps), self.lm_w, self.lm_b).float()

    # ----- decode ------------------------------------------------------------------------------------
    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        R = tokens.shape[0]
        H, KV, hd, n_rep = self.num_heads, self.num_kv, self.head_dim, self.n_rep
        pos = self.row_pos + t
        cos, sin = self.cos[pos][:, None, :], self.sin_signed[pos][:, None, :]  # [R, 1, hd]
        x = F.embedding(tokens, self.embed)
        for li, L in enumerate(self.layers):
            h = _rms_norm(x, L.ln_in, self.eps)
            qkv = F.linear(h, L.w_qkv, L.b_qkv)
            qk = self._rope(qkv[:, : (H + KV) * hd].view(R, H + KV, hd), cos, sin)
            q = qk[:, :H].view(R, KV, n_rep, hd)
            kc, vc = self.cache_k[li], self.cache_v[li]
            kc[:, :, t] = qk[:, H:]
            vc[:, :, t] = qkv[:, (H + KV) * hd :].view(R, KV, hd)
            k_self, v_self = kc[:, :, : t + 1], vc[:, :, : t + 1]  # [R, KV, t+1, hd]
            s_self = torch.matmul(q, k_self.transpose(-1, -2))  # [R, KV, n_rep, t+1]
            s_prefix = self._prefix_scores(q, li)  # [R, KV, n_rep, P]
            P = s_prefix.shape[-1]
            p = torch.softmax(torch.cat([s_prefix, s_self], dim=-1), dim=-1, dtype=torch.float32)
            p = p.to(self.dtype)
            o = torch.matmul(p[..., P:], v_self) + self._prefix_values(p[..., :P], li)
            x = x + F.linear(o.reshape(R, H * hd), L.w_o, L.b_o)
            x = x + self._mlp(_rms_norm(x, L.ln_post, self.eps), L)
        self.filled = t + 1
        return self._head(x)

    def _to_slots(self, rows: torch.Tensor) -> torch.Tensor:
        if self.slots_are_rows:
            return rows
        out = rows.new_zeros((self.num_groups * self.group_size, *rows.shape[1:]))
        return out.index_copy_(0, self.slots, rows)

    def _from_slots(self, slots: torch.Tensor) -> torch.Tensor:
        return slots if self.slots_are_rows else slots.index_select(0, self.slots)

    def _prefix_scores(self, q: torch.Tensor, li: int) -> torch.Tensor:
        # One matmul per (group, kv head) covering the group's G * n_rep query rows.
        ng, g = self.num_groups, self.group_size
        KV, n_rep, hd = self.num_kv, self.n_rep, self.head_dim
        qs = self._to_slots(q).reshape(ng, g, KV, n_rep, hd).transpose(1, 2).reshape(ng, KV, g * n_rep, hd)
        s = torch.matmul(qs, self.prefix_k[li].transpose(-1, -2)) + self.prefix_bias  # [ng, KV, g*n_rep, P]
        P = s.shape[-1]
        s = s.view(ng, KV, g, n_rep, P).transpose(1, 2).reshape(ng * g, KV, n_rep, P)
        return self._from_slots(s)

    def _prefix_values(self, p: torch.Tensor, li: int) -> torch.Tensor:
        ng, g = self.num_groups, self.group_size
        KV, n_rep, hd = self.num_kv, self.n_rep, self.head_dim
        P = p.shape[-1]
        ps = self._to_slots(p).reshape(ng, g, KV, n_rep, P).transpose(1, 2).reshape(ng, KV, g * n_rep, P)
        o = torch.matmul(ps, self.prefix_v[li])  # [ng, KV, g*n_rep, hd]
        o = o.view(ng, KV, g, n_rep, hd).transpose(1, 2).reshape(ng * g, KV, n_rep, hd)
        return self._from_slots(o)

    def compact(self, keep: torch.Tensor) -> bool:
        n, t = keep.numel(), self.filled
        for li in range(len(self.layers)):
            for cache in (self.cache_k, self.cache_v):
                buf = cache[li]
                # Gather first (a temporary), then write into the front rows of the same buffer.
                buf[:n, :, :t] = buf[keep, :, :t]
                cache[li] = buf[:n]
        self.row_pos = self.row_pos[keep]
        slots = self.slots[keep]
        g = self.group_size
        groups = torch.div(slots, g, rounding_mode="floor")
        live = torch.unique(groups)  # sorted
        if live.numel() < self.num_groups:  # whole groups finished: drop their prefix cache too
            self.prefix_k = [k.index_select(0, live) for k in self.prefix_k]
            self.prefix_v = [v.index_select(0, live) for v in self.prefix_v]
            self.prefix_bias = self.prefix_bias.index_select(0, live)
            slots = torch.searchsorted(live, groups) * g + slots % g
            self.num_groups = live.numel()
        self.slots = slots
        self.slots_are_rows = n == self.num_groups * g
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
