"""Token log-probs straight from the last hidden states: the lm-head and log-softmax in row chunks.

A causal LM's loss needs ``log_softmax(h @ W^T)[id]`` at the trained positions only. Computing the logits
first holds [B, L, V] of them (plus float32 copies): with a 152k vocabulary that is GBs for a model of 10M
parameters. Here the model body runs to its final hidden states, and the lm-head matmul, log-softmax and
gather run on at most ``chunk_rows`` rows at a time, forward and backward (the backward recomputes each
chunk's logits), so one [chunk_rows, V] float32 block is alive at once.

:func:`final_hidden_states` gets the hidden states by calling the *wrapped* model (a Booster's DDP or
ZeRO wrapper), so the wrapper's forward-time set-up (DDP's gradient reducer, input casts) runs as for a
normal forward; the lm-head computes nothing there (``logits_to_keep`` is an empty index).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from trainer.rl.logprobs import _check_temperature, _compute_dtype, _forward_parameters, unwrap_model

# Plugins whose lm-head weight is a plain tensor of the full vocabulary outside the wrapper's forward, so
# a loss can run the head itself (fused). Gemini fetches parameters only inside its own forward's op
# hooks and 3d's tensor parallelism splits the head over the vocabulary: they take the logits path.
FUSED_HEAD_PLUGINS = ("ddp", "zero2", "zero2_cpu")

# Bytes of float32 logits per chunk: 256 MiB is ~440 rows of a 152k vocabulary (enough rows to keep the
# matmul efficient, small next to any model with such a vocabulary).
DEFAULT_CHUNK_BYTES = 256 * 2**20


def chunk_rows_for(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's float32 logits take about ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * max(vocab_size, 1)))


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the lm-head matmul runs in: autocast's (DDP --bf16), else the operands' common dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _ChunkedLinearLogProbs(torch.autograd.Function):
    """``log_softmax((h @ W^T) / T)[id]`` for rows of ``h`` [N, H], chunk by chunk.

    Saves ``h``, ``W``, the ids and the per-row log-normaliser; the backward recomputes each chunk's
    logits ``z`` and uses ``d logp_i / d z_iv = (1[v == id_i] - softmax(z_i)_v) / T``, then
    ``dh = dz @ W`` and ``dW = dz^T @ h`` (accumulated in float32 over the chunks).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        ids: Tensor,
        temperature: float,
        chunk_rows: int,
        mm_dtype: torch.dtype,
    ) -> Tensor:
        dtype = _compute_dtype(mm_dtype)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=dtype, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        w = weight.to(mm_dtype)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit here
            for s in range(0, n, chunk_rows):
                z = (hidden[s : s + chunk_rows].to(mm_dtype) @ w.T).to(dtype)
                z.div_(temperature)
                block_lse = torch.logsumexp(z, dim=-1)
                lse[s : s + chunk_rows] = block_lse
                out[s : s + chunk_rows] = z.gather(-1, ids[s : s + chunk_rows, None]).squeeze(-1) - block_lse
                del z
        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.temperature, ctx.chunk_rows, ctx.mm_dtype = temperature, chunk_rows, mm_dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, ids, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        temperature, mm_dtype = ctx.temperature, ctx.mm_dtype
        dtype = lse.dtype
        w = weight.to(mm_dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], ctx.chunk_rows):
                h = hidden[s : s + ctx.chunk_rows].to(mm_dtype)
                g = grad_out[s : s + ctx.chunk_rows, None].to(dtype)
                z = (h @ w.T).to(dtype)
                # dz = g * (onehot - softmax(z / T)) / T, in place on the chunk's logits
                dz = torch.exp(z.div_(temperature).sub_(lse[s : s + ctx.chunk_rows, None])).mul_(-g)
                dz.scatter_add_(-1, ids[s : s + ctx.chunk_rows, None], g)
                dz.div_(temperature)
                if grad_h is not None:
                    grad_h[s : s + ctx.chunk_rows] = (dz.to(mm_dtype) @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w.addmm_(dz.T, h.to(dtype))
                del z, dz
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None,
            None,
            None,
            None,
        )


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    *,
    chunk_rows: int | None = None,
) -> Tensor:
    """``log_softmax((hidden @ weight^T) / T, -1).gather(-1, ids)`` for ``hidden`` [N, H], ``weight`` [V, H]
    (an lm-head without bias), ``ids`` [N] -> [N] in float32 (float64 for float64 operands).

    The matmul runs in autocast's dtype when autocast is on (as the lm-head would), the softmax in float32;
    never more than ``chunk_rows`` rows of logits at once (default: :func:`chunk_rows_for` the vocabulary).
    Differentiable w.r.t. ``hidden`` and ``weight``.
    """
    temperature = _check_temperature(temperature)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if ids.shape != hidden.shape[:1]:
        raise ValueError(f"ids must be [N={hidden.shape[0]}], got {tuple(ids.shape)}")
    ids = ids.to(device=hidden.device, dtype=torch.int64)
    vocab = weight.shape[0]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"ids must be in [0, {vocab}), got range [{int(ids.min())}, {int(ids.max())}]")
    rows = chunk_rows_for(vocab) if chunk_rows is None else chunk_rows
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    mm_dtype = _matmul_dtype(hidden, weight)
    return _ChunkedLinearLogProbs.apply(hidden, weight, ids, temperature, rows, mm_dtype)


# --------------------------------------------------------------------------------------------------
# The model body's output, through the Booster's wrapper
# --------------------------------------------------------------------------------------------------
def lm_head_of(model: nn.Module) -> tuple[nn.Module, Tensor] | None:
    """``(body, lm-head weight)`` of the Hugging Face causal LM inside ``model``'s wrappers, when the head is
    a bias-free linear layer over the body's last hidden state and the forward takes ``logits_to_keep``
    (Llama, Qwen2/3, Gemma, Mistral, ... in transformers 4.51); else None (the caller takes the logits)."""
    inner = unwrap_model(model)
    get_decoder = getattr(inner, "get_decoder", None)
    body = get_decoder() if callable(get_decoder) else None
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    if getattr(getattr(inner, "config", None), "final_logit_softcapping", None):  # Gemma 2: not a plain head
        return None
    if "logits_to_keep" not in _forward_parameters(model):
        return None
    return body, head.weight


def final_hidden_states(model: nn.Module, body: nn.Module, **inputs: Any) -> Tensor:
    """The body's last hidden states [B, L, H] from one forward of ``model`` (wrapped or not) whose
    lm-head computes no logits. ``body`` comes from :func:`lm_head_of`."""
    captured: list[Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(output[0] if hidden is None else hidden)

    device = inputs["input_ids"].device
    handle = body.register_forward_hook(keep)
    try:
        model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=device), use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one forward of the model body, saw {len(captured)}")
    return captured[0]


def hidden_token_logprobs(
    model: nn.Module,
    head: tuple[nn.Module, Tensor],
    rows: Tensor,
    targets: Tensor,
    temperature: float,
    **inputs: Any,
) -> Tensor:
    """Log-probs of ``targets`` [N] predicted at ``rows`` [N] (indices into the forward's flattened
    [B * L] positions) from one forward of ``model`` on ``inputs`` that computes no logits; the lm-head
    and log-softmax run on those N rows alone, in chunks (:func:`linear_token_logprobs`). ``head`` comes
    from :func:`lm_head_of`."""
    body, weight = head
    hidden = final_hidden_states(model, body, **inputs)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.to(hidden.device))
    return linear_token_logprobs(picked, weight, targets, temperature)
