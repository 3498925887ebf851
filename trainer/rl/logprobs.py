"""Token log-probs of completions: chunked log-softmax, the model forward, and the shared-prompt packed forward.

The training side of GRPO runs the policy (and the reference model) over prompt + completion and needs the
log-prob of every completion token. This module does that without materialising [N, T, V] float32 tensors
(chunked autograd), and, for Llama/Qwen2, packs each group as one sequence whose attention computes only
the blocks that exist (the prompt causally, each completion against its prompt and itself).

Notation as in :mod:`trainer.rl.objective`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

# Rows per chunk when turning [rows, V] logits into per-token values: 1024 rows of a 152k vocabulary
# is ~600 MiB of float32, small next to the model, and big enough to keep kernels efficient.
DEFAULT_CHUNK_ROWS = 1024


# Token log-probs and entropy, chunked over rows
# --------------------------------------------------------------------------------------------------
def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_chunk_rows(chunk_rows: int) -> int:
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    return chunk_rows


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits are upcast per chunk; float64 stays float64 (used by the exactness tests).
    return torch.promote_types(dtype, torch.float32)


def _blocks(batch: int, seq: int, chunk_rows: int) -> list[tuple[int, int, int, int]]:
    """Split a [batch, seq] grid of rows into blocks ``(b0, b1, s0, s1)`` of at most ``chunk_rows`` rows.

    Blocks are rectangular so that ``logits[b0:b1, s0:s1]`` stays a view of a [B, S, V] tensor even
    when it is itself a slice (e.g. ``logits[:, -(T + 1):-1]``): no copy of the whole batch is made.
    """
    if seq >= chunk_rows:
        return [
            (b, b + 1, s, min(s + chunk_rows, seq)) for b in range(batch) for s in range(0, seq, chunk_rows)
        ]
    per_block = max(1, chunk_rows // max(seq, 1))
    return [(b, min(b + per_block, batch), 0, seq) for b in range(0, batch, per_block)]


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """``log_softmax(logits / T)[ids]`` on [B, S, V] with a backward that recomputes softmax per block.

    Autograd through ``log_softmax`` would keep a float32 [rows, V] tensor alive per chunk until the
    backward pass, i.e. a float32 copy of the whole batch's logits. Here only the (already existing)
    logits, the ids and the per-row log-normaliser are saved; the backward

        d logp_i / d logits_iv = (1[v == id_i] - softmax(logits_i / T)_v) / T

    is evaluated block by block.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, ids: Tensor, temperature: float, chunk_rows: int) -> Tensor:
        dtype = _compute_dtype(logits.dtype)
        batch, seq = logits.shape[0], logits.shape[1]
        out = torch.empty(batch, seq, dtype=dtype, device=logits.device)
        lse = torch.empty(batch, seq, dtype=dtype, device=logits.device)
        for b0, b1, s0, s1 in _blocks(batch, seq, chunk_rows):
            scaled = logits[b0:b1, s0:s1].to(dtype) / temperature
            block_lse = torch.logsumexp(scaled, dim=-1)
            lse[b0:b1, s0:s1] = block_lse
            out[b0:b1, s0:s1] = scaled.gather(-1, ids[b0:b1, s0:s1, None]).squeeze(-1) - block_lse
        ctx.save_for_backward(logits, ids, lse)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        logits, ids, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        temperature = ctx.temperature
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for b0, b1, s0, s1 in _blocks(logits.shape[0], logits.shape[1], ctx.chunk_rows):
            g = grad_out[b0:b1, s0:s1, None].to(lse.dtype)
            scaled = logits[b0:b1, s0:s1].to(lse.dtype) / temperature
            grad = torch.exp(scaled.sub_(lse[b0:b1, s0:s1, None])).mul_(-g)
            grad.scatter_add_(-1, ids[b0:b1, s0:s1, None], g)
            grad_logits[b0:b1, s0:s1] = grad.div_(temperature).to(logits.dtype)
        return grad_logits, None, None, None


def _as_3d(logits: Tensor, ids: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Validate and view ``logits`` [..., V] as [B, S, V] (a view for 2-D and 3-D inputs)."""
    if not isinstance(logits, Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor of shape [..., V]")
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    seq = logits.shape[-2] if logits.dim() >= 2 else 1
    view = logits.reshape(-1, seq, vocab)
    if ids is None:
        return view, None
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError("ids must be an integer tensor")
    if tuple(ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"ids shape {tuple(ids.shape)} must equal logits shape without vocab {tuple(logits.shape[:-1])}"
        )
    ids3 = ids.to(device=logits.device, dtype=torch.int64).reshape(-1, seq)
    if ids3.numel() and (int(ids3.min()) < 0 or int(ids3.max()) >= vocab):
        raise ValueError(
            f"ids must be in [0, {vocab}) (the logits' vocabulary), got range [{int(ids3.min())}, {int(ids3.max())}]"
        )
    return view, ids3


def token_logprobs(
    logits: Tensor, ids: Tensor, temperature: float = 1.0, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Tensor:
    """Per-token log-probability ``log_softmax(logits / T, dim=-1).gather(-1, ids)``.

    ``logits`` [..., V] (any float dtype, e.g. bf16), ``ids`` [...] -> [...] in float32 (float64 for
    float64 logits). Computed in blocks of at most ``chunk_rows`` rows as ``logits[id] / T - logsumexp(logits / T)``
    in float32, so neither the forward nor the backward (see ``_ChunkedTokenLogProbs``) ever holds a
    float32 copy of the whole batch's logits. Differentiable w.r.t. ``logits``.
    """
    temperature = _check_temperature(temperature)
    chunk_rows = _check_chunk_rows(chunk_rows)
    view, ids3 = _as_3d(logits, ids)
    out = _ChunkedTokenLogProbs.apply(view, ids3, temperature, chunk_rows)
    return out.view(ids.shape)


@torch.no_grad()
def entropy_from_logits(
    logits: Tensor, temperature: float = 1.0, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Tensor:
    """Entropy of ``p = softmax(logits / T)`` per position: ``H = logsumexp(z) - sum_v p_v z_v``, ``z = logits / T``.

    ``logits`` [..., V] -> [...] in float32 (float64 for float64 logits), chunked like
    ``token_logprobs``. A metric: computed without autograd (the result is detached).
    """
    temperature = _check_temperature(temperature)
    chunk_rows = _check_chunk_rows(chunk_rows)
    view, _ = _as_3d(logits, None)
    dtype = _compute_dtype(view.dtype)
    out = torch.empty(view.shape[:2], dtype=dtype, device=view.device)
    for b0, b1, s0, s1 in _blocks(view.shape[0], view.shape[1], chunk_rows):
        z = view[b0:b1, s0:s1].to(dtype) / temperature
        out[b0:b1, s0:s1] = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)
    return out.view(logits.shape[:-1])


# --------------------------------------------------------------------------------------------------
# Model forward for completion log-probs
# --------------------------------------------------------------------------------------------------
def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counting only attended tokens: ``cumsum(mask) - 1``, 0 at (left) padding.

    With left-padded prompts the first real token gets position 0, exactly as in an unpadded
    forward; pad positions get 0 (their value is irrelevant: nothing attends to them).
    """
    mask = attention_mask.long()
    return (mask.cumsum(dim=-1) - 1).clamp_(min=0)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model (the module with a ``config``) inside Colossal-AI Booster / DDP / Gemini
    wrappers, through their ``unwrap()`` or ``.module``; the innermost module when none has a config."""
    current: Any = model
    for _ in range(8):  # wrappers nest a few levels at most
        if getattr(current, "config", None) is not None:
            return current
        unwrap = getattr(current, "unwrap", None)
        inner = unwrap() if callable(unwrap) else getattr(current, "module", None)
        if not isinstance(inner, nn.Module):
            break
        current = inner
    return current


def _forward_parameters(model: nn.Module) -> set[str]:
    """Names the model's forward accepts explicitly, looking through ``*args, **kwargs`` wrappers.

    Booster wrappers (Colossal-AI ``ModelWrapper``, DDP, Gemini) forward everything to ``.module``;
    the innermost forward's signature (possibly replaced by a shardformer policy) decides whether
    ``logits_to_keep`` may be passed.
    """
    current: Any = model
    for _ in range(8):  # wrappers nest a few levels at most
        try:
            params = inspect.signature(current.forward).parameters
        except (TypeError, ValueError):
            return set()
        named = {
            name
            for name, p in params.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }
        inner = getattr(current, "module", None)
        if named or not isinstance(inner, nn.Module):
            return named
        current = inner
    return set()


def _logits_of(output: Any) -> Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple | list) and output:
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"model output has no logits tensor (got {type(output).__name__})")
    return logits


def completion_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_ids: Tensor,
    temperature: float,
    batch_size: int,
    position_ids: Tensor | None = None,
    *,
    trim_padding: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    group_size: int | None = None,
    fused_head: bool = False,
) -> Tensor:
    """Log-probs [N, T] of ``completion_ids`` under ``model`` at ``temperature``.

    ``input_ids`` [N, L] is the left-padded prompt followed by the completion, so the completion is
    ``input_ids[:, L - T:]``; the logits at positions ``L - T - 1 .. L - 2`` predict it. The model runs
    on ``batch_size`` rows at a time (``--logits_forward_batch_size``) with
    ``logits_to_keep = T + 1`` (or ``num_logits_to_keep``) when its forward accepts it, else the full
    logits are sliced. ``position_ids`` default to ``position_ids_from_mask(attention_mask)``.
    With ``trim_padding`` the columns that are padding in every row of a chunk are dropped before
    the forward (they are never attended to, so the result is unchanged, only cheaper).

    With ``group_size`` G (rows ``r`` with the same ``r // G`` share one prompt, as in a GRPO rollout)
    the shared-prompt forward (`grouped_completion_logprobs`) is used where it is valid and cheaper:
    each prompt runs once per group instead of G times. Same values up to float rounding.

    With ``fused_head`` (and a model whose head :func:`trainer.rl.head_logprobs.lm_head_of` understands)
    the model computes no logits: its body's last hidden states at the predicting positions go through
    the lm-head and log-softmax a chunk of ~256 MiB of float32 logits at a time, forward and backward,
    instead of [rows, T + 1, V] logits per forward kept alive for the backward (``chunk_rows`` then
    does not apply). Only where the wrapper leaves the head's weight a plain tensor
    (``FUSED_HEAD_PLUGINS``); the reference must take the policy's path for a KL of exactly 0.

    Differentiable when grad is enabled (policy), cheap under ``torch.no_grad()`` (reference/old).
    Returns float32 (float64 for a float64 model); values at completion padding are meaningless and
    must be masked by the caller.
    """
    temperature = _check_temperature(temperature)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"batch_size (--logits_forward_batch_size) must be a positive int, got {batch_size!r}"
        )
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N, L], got shape {tuple(input_ids.shape)}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
        )
    if completion_ids.dim() != 2 or completion_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"completion_ids must be [N={input_ids.shape[0]}, T], got shape {tuple(completion_ids.shape)}"
        )
    n, length = input_ids.shape
    t = completion_ids.shape[1]
    if t < 1 or t >= length:
        raise ValueError(
            f"completion length T={t} must be in [1, L - 1] with L={length} (a prompt token is needed)"
        )
    if not torch.equal(input_ids[:, length - t :], completion_ids.to(input_ids.device)):
        raise ValueError("completion_ids must equal the last T columns of input_ids (prompt + completion)")
    head = None
    if fused_head:
        from trainer.rl.head_logprobs import hidden_token_logprobs, lm_head_of  # imports this module

        head = lm_head_of(model)
    if group_size is not None and position_ids is None:
        from trainer.rl.packed_forward import (  # imports this module
            grouped_completion_logprobs,
            shared_prompt_plan,
        )

        plan = shared_prompt_plan(model, input_ids, attention_mask, t, group_size, batch_size)
        if plan is not None:
            return grouped_completion_logprobs(
                model,
                input_ids,
                attention_mask,
                t,
                group_size,
                plan.groups_per_forward,
                temperature,
                chunk_rows=chunk_rows,
                split_attention=plan.split_attention,
                head=head,
            )
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    elif tuple(position_ids.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"position_ids shape {tuple(position_ids.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
        )

    accepted = _forward_parameters(model)
    extra: dict[str, Any] = {}
    keep_kwarg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in accepted), None)
    if keep_kwarg is not None:
        extra[keep_kwarg] = t + 1
    if "use_cache" in accepted:
        extra["use_cache"] = False  # no KV cache needed for a single scoring forward

    results: list[Tensor] = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        ids = input_ids[start:stop]
        mask = attention_mask[start:stop]
        pos = position_ids[start:stop]
        if trim_padding:
            # First column attended in any row of the chunk; never cut into the completion.
            attended = mask.bool().any(dim=0)
            first = int(attended.long().argmax()) if bool(attended.any()) else 0
            first = min(first, length - t - 1)
            ids, mask, pos = ids[:, first:], mask[:, first:], pos[:, first:]
        if head is not None:
            # Position j predicts token j + 1: the T positions before each row's last one.
            width = ids.shape[1]
            cols = torch.arange(width - t - 1, width - 1, device=ids.device)
            rows = (torch.arange(stop - start, device=ids.device)[:, None] * width + cols).flatten()
            targets = completion_ids[start:stop].to(ids.device).reshape(-1)
            inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
            values = hidden_token_logprobs(model, head, rows, targets, temperature, **inputs)
            results.append(values.view(stop - start, t))
            continue
        logits = _logits_of(model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra))
        if logits.shape[1] < t + 1:
            raise ValueError(
                f"model returned logits for {logits.shape[1]} positions, need at least T + 1 = {t + 1}"
            )
        # Position j predicts token j + 1: keep the T positions before the last one.
        logits = logits[:, -(t + 1) : -1, :]
        results.append(
            token_logprobs(
                logits, completion_ids[start:stop].to(logits.device), temperature, chunk_rows=chunk_rows
            )
        )
        del logits
    return torch.cat(results, dim=0)
