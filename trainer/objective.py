"""The GRPO objective: group-relative advantages, token log-probs, the clipped surrogate loss.

Pure torch (no Colossal-AI import) so that it can be unit-tested on CPU against an independent
float64 reference and reused by any training loop. Every public function states its formula.

Notation: ``N`` rows (sequences), ``G`` generations per prompt (rows ``r`` with the same ``r // G``
belong to one group), ``T`` completion tokens per row, ``V`` vocabulary size.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "AdvantageScale",
    "LossType",
    "TemperatureSchedule",
    "completion_logprobs",
    "grouped_completion_logprobs",
    "shared_prompt_plan",
    "split_attention_supported",
    "entropy_from_logits",
    "group_advantages",
    "grpo_loss",
    "informative_groups",
    "position_ids_from_mask",
    "temperature_at",
    "token_logprobs",
    "zero_std_fraction",
]

AdvantageScale = Literal["group", "batch", "none"]
LossType = Literal["grpo", "dapo", "dr_grpo"]
TemperatureSchedule = Literal["linear", "cosine"]

ADVANTAGE_SCALES: tuple[str, ...] = ("group", "batch", "none")
LOSS_TYPES: tuple[str, ...] = ("grpo", "dapo", "dr_grpo")
TEMPERATURE_SCHEDULES: tuple[str, ...] = ("linear", "cosine")

# Rows per chunk when turning [rows, V] logits into per-token values: 1024 rows of a 152k vocabulary
# is ~600 MiB of float32, small next to the model, and big enough to keep kernels efficient.
DEFAULT_CHUNK_ROWS = 1024


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------
def _grouped(rewards: Tensor, num_generations: int) -> Tensor:
    """Validate ``rewards`` [N] and return it viewed as [N // G, G]."""
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be a positive int, got {num_generations!r}")
    n = rewards.shape[0]
    if n == 0 or n % num_generations != 0:
        raise ValueError(
            f"rewards has {n} rows, which is not a positive multiple of num_generations={num_generations}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if not bool(torch.isfinite(rewards).all()):
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten()[:5].tolist()
        raise ValueError(f"rewards must be finite; non-finite values at rows {bad}")
    return rewards.view(n // num_generations, num_generations)


def _unbiased_std(x: Tensor, dim: int | None = None) -> Tensor:
    """Sample std with Bessel's correction (divisor n - 1); 0 (not NaN) when there is a single value."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros_like(x.sum() if dim is None else x.sum(dim=dim))
    return x.std(dim=dim, correction=1) if dim is not None else x.std(correction=1)


def informative_groups(rewards: Tensor, num_generations: int) -> Tensor:
    """Bool [N // G]: True for groups whose rewards are not all equal (max != min).

    Only these groups carry a learning signal (an all-equal group has zero advantage everywhere);
    dynamic sampling keeps them and drops the others.
    """
    groups = _grouped(rewards, num_generations)
    return groups.amax(dim=1) != groups.amin(dim=1)


def zero_std_fraction(rewards: Tensor, num_generations: int) -> float:
    """Fraction of groups whose rewards are all equal (zero std): ``mean(max_g == min_g)``."""
    return float((~informative_groups(rewards, num_generations)).float().mean().item())


def group_advantages(
    rewards: Tensor,
    num_generations: int,
    scale: AdvantageScale = "group",
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantages, one per row.

    With ``g = r // G`` the group of row ``r`` and ``mu_g`` the mean reward of that group::

        "group": A_r = (R_r - mu_g) / (sigma_g + eps)       (GRPO, DeepSeekMath / TRL default)
        "batch": A_r = (R_r - mu_g) / (sigma_B + eps)       (std over all N rewards of the batch)
        "none":  A_r =  R_r - mu_g                           (Dr. GRPO: no std scaling)

    ``sigma`` is the *unbiased* sample std (Bessel's correction, divisor ``n - 1``), as in TRL's
    ``rewards.view(-1, G).std(dim=1)`` and DeepSeekMath; a single value has std 0.

    Rows of a group whose rewards are all equal get exactly 0 (set explicitly, so that the rounding
    error of ``R_r - mu_g`` is never amplified by ``1 / eps``) — never NaN. Returns a tensor of the
    rewards' floating dtype (integer rewards are promoted to the default float dtype).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    groups = _grouped(rewards, num_generations)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (_unbiased_std(groups, dim=1).unsqueeze(1) + eps)
    elif scale == "batch":
        centred = centred / (_unbiased_std(groups.reshape(-1)) + eps)
    constant = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return centred.masked_fill(constant, 0.0).reshape(-1)


# --------------------------------------------------------------------------------------------------
# Temperature schedule
# --------------------------------------------------------------------------------------------------
def temperature_at(
    step: int,
    total_steps: int,
    initial: float,
    final: float,
    schedule: TemperatureSchedule = "linear",
) -> float:
    """Sampling temperature for optimizer step ``step`` (0-based) of ``total_steps``.

    With ``f = step / (total_steps - 1)`` (``f = 0`` when ``total_steps == 1``)::

        "linear": T = initial + (final - initial) * f
        "cosine": T = initial + (final - initial) * (1 - cos(pi * f)) / 2

    Exactly ``initial`` at step 0, exactly ``final`` at step ``total_steps - 1`` (the last optimizer
    step), monotone in between (the value is clamped to the closed interval between the two ends,
    so floating-point rounding cannot overshoot it).
    """
    for name, value in (("step", step), ("total_steps", total_steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step must be in [0, total_steps - 1] = [0, {total_steps - 1}], got {step}")
    for name, value in (("initial", initial), ("final", final)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"{name} temperature must be a finite number > 0, got {value!r}")
    if schedule not in TEMPERATURE_SCHEDULES:
        raise ValueError(f"schedule must be one of {TEMPERATURE_SCHEDULES}, got {schedule!r}")
    initial, final = float(initial), float(final)
    if step == 0 or total_steps == 1:
        return initial
    if step == total_steps - 1:
        return final
    frac = step / (total_steps - 1)
    weight = frac if schedule == "linear" else (1.0 - math.cos(math.pi * frac)) / 2.0
    value = initial + (final - initial) * weight
    return min(max(value, min(initial, final)), max(initial, final))


# --------------------------------------------------------------------------------------------------
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
    if group_size is not None and position_ids is None:
        plan = shared_prompt_plan(model, input_ids, attention_mask, t, group_size, batch_size)
        if plan is not None:
            return grouped_completion_logprobs(model, input_ids, attention_mask, t, group_size, plan.groups_per_forward,
                                               temperature, chunk_rows=chunk_rows, split_attention=plan.split_attention)
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


# --------------------------------------------------------------------------------------------------
# Shared-prompt forward: one prompt, G completions, one packed sequence
# --------------------------------------------------------------------------------------------------
# A GRPO rollout holds G completions of each prompt. Scoring them as G separate rows runs the prompt
# G times and pads every completion to the longest; packing a group as ``[prompt | c_1 | ... | c_G]``
# (real tokens only) with a block mask (each completion sees the prompt and itself, never another
# completion) and positions that restart after the prompt runs the prompt once and no padding. The
# linear layers - most of the compute - then see n + sum(len_i) tokens instead of G*(P + T); the masked
# attention sees the square of that instead of G*(P + T)^2, so long completions can make it a loss:
# `shared_prompt_plan` compares both costs and the mask's memory, and returns None when the plain
# forward is the better (or the only valid) choice.
#
# Split attention: a masked full block computes (n + sum(len_i))^2 attention pairs, most of them masked
# (CPU kernels do not skip masked blocks). Where the model's attention layers dispatch through
# transformers' attention registry, the packed forward swaps in `_split_attention` instead: prompt
# tokens attend causally among the first ``P`` positions, and the completions, gathered into
# ``[groups * G, C]`` slots, attend to their group's prompt keys and their own keys only - about
# n^2 / 2 + sum(len_i * (n + len_i)) pairs. Same values; the linear layers still see the packed rows.
SHARED_PROMPT_ATTENTION = ("sdpa", "eager")  # kernels that take an arbitrary additive 4-D mask
SHARED_PROMPT_MASK_BYTES = 256 * 2**20  # per forward
SPLIT_ATTENTION_NAME = "r1_grpo_split"  # registered in transformers' AttentionInterface on first use
# Model families whose attention modules take (query, key, value) from the registry after RoPE and
# return [B, L, H, hd] (transformers 4.48+ Llama/Qwen2 style).
SPLIT_ATTENTION_MODEL_TYPES = ("llama", "qwen2")


class SharedPromptPlan:
    def __init__(self, groups_per_forward: int, cost_ratio: float, split_attention: bool = False):
        self.groups_per_forward = groups_per_forward
        self.cost_ratio = cost_ratio  # packed / plain, estimated
        self.split_attention = split_attention  # attention via `_split_attention` (no block mask)


def _inner_model(model: nn.Module) -> nn.Module:
    current: Any = model
    for _ in range(8):
        if getattr(current, "config", None) is not None:
            return current
        inner = getattr(current, "module", None)
        if not isinstance(inner, nn.Module):
            break
        current = inner
    return current


def _real_lengths(attention_mask: Tensor, t: int) -> tuple[int, int]:
    """Width of the prompt region that any row attends to, and of the completion region likewise."""
    length = attention_mask.shape[1]
    prompt = attention_mask[:, : length - t].bool().any(dim=0)
    first = int(prompt.long().argmax()) if bool(prompt.any()) else length - t - 1
    completion = attention_mask[:, length - t :].bool().any(dim=0)
    last = int(completion.nonzero().max()) + 1 if bool(completion.any()) else 1
    return length - t - min(first, length - t - 1), last


def _packed_lengths(attention_mask: Tensor, t: int, group_size: int) -> Tensor:
    """Tokens of each group's packed sequence: its prompt once plus every completion's real tokens."""
    length = attention_mask.shape[1]
    prompt = attention_mask[::group_size, : length - t].long().sum(1)
    completions = attention_mask[:, length - t :].long().sum(1).view(-1, group_size).sum(1)
    return prompt + completions


def shared_prompt_plan(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, t: int, group_size: int,
                       batch_size: int) -> SharedPromptPlan | None:
    """Whether (and how) to score ``input_ids`` with the shared-prompt forward; None: use the plain one."""
    n, length = input_ids.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or n % group_size:
        return None
    inner = _inner_model(model)
    config = getattr(inner, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    if attn not in SHARED_PROMPT_ATTENTION or "logits_to_keep" not in _forward_parameters(model):
        return None  # flash-attention takes no arbitrary mask; old forwards cannot keep chosen positions
    prompt_ids = input_ids[:, : length - t].view(n // group_size, group_size, -1)
    prompt_mask = attention_mask[:, : length - t].view(n // group_size, group_size, -1)
    if not (torch.equal(prompt_ids, prompt_ids[:, :1].expand_as(prompt_ids))
            and torch.equal(prompt_mask, prompt_mask[:, :1].expand_as(prompt_mask))):
        return None  # rows of a group do not share one prompt
    if int(prompt_mask[:, 0].sum(-1).min()) < 1:
        return None  # an empty prompt: no position to predict the first completion token from
    comp_mask = attention_mask[:, length - t :].long()
    if bool((comp_mask[:, 1:] > comp_mask[:, :-1]).any()) or not bool(comp_mask[:, 0].all()):
        return None  # a completion with a hole, or an empty one: not one run of >= 1 tokens
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    if hidden <= 0 or layers <= 0:
        return None
    embeddings = {id(m.weight) for m in inner.modules() if isinstance(m, nn.Embedding)}
    out = getattr(inner, "get_output_embeddings", lambda: None)()
    if out is not None:
        embeddings.add(id(out.weight))
    linear = 2.0 * sum(w.numel() for w in inner.parameters() if id(w) not in embeddings)  # FLOPs per token
    pair = 4.0 * hidden * layers  # QK^T and AV per (query, key) pair
    p, c = _real_lengths(attention_mask, t)
    n_groups = n // group_size
    plain = n_groups * group_size * (linear * (p + c) + pair * (p + c) ** 2)
    width = int(_packed_lengths(attention_mask, t, group_size).max())  # rows of a forward pad to the longest
    if split_attention_supported(model):
        # Prompt causal block plus each completion slot against [prompt | itself]; small masks.
        packed = n_groups * (linear * width + pair * (p * p + group_size * c * (p + c)))
        if packed >= plain:
            return None
        return SharedPromptPlan(max(1, min(n_groups, batch_size // group_size)), packed / plain, split_attention=True)
    packed = n_groups * (linear * width + pair * width**2)
    element = torch.finfo(next(inner.parameters()).dtype).bits // 8
    if packed >= plain or width * width * element > SHARED_PROMPT_MASK_BYTES:
        return None
    groups = max(1, min(n_groups, batch_size // group_size, SHARED_PROMPT_MASK_BYTES // (width * width * element)))
    return SharedPromptPlan(groups, packed / plain)


def split_attention_supported(model: nn.Module) -> bool:
    """Whether the packed forward can run `_split_attention` in ``model``'s attention layers.

    Needs transformers' attention registry (4.48+; 5.x builds its masks differently, so it keeps the
    block mask there), a Llama/Qwen2 model whose every ``self_attn`` forward looks its kernel up in that
    registry (a Colossal-AI shardformer policy replaces those forwards), and no gradient checkpointing
    (its recomputation would run outside the forward that selects the split kernel).
    """
    try:
        import transformers
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: F401
    except ImportError:
        return False
    if int(transformers.__version__.split(".")[0]) != 4:
        return False
    inner = _inner_model(model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in SPLIT_ATTENTION_MODEL_TYPES or getattr(inner, "is_gradient_checkpointing", False):
        return False
    layers = [m for name, m in inner.named_modules() if name.endswith("self_attn")]
    if len(layers) != int(getattr(config, "num_hidden_layers", -1)):
        return False
    return all("ALL_ATTENTION_FUNCTIONS" in getattr(getattr(type(m).forward, "__code__", None), "co_names", ()) for m in layers)


class _SplitLayout:
    """Where each token of a packed forward ``[B groups, L]`` goes in `_split_attention`.

    ``prompt_width`` P: the longest prompt of the forward (group ``b``'s prompt is its first ``n_b <= P``
    positions); ``completion_width`` C: the longest completion. ``completion_src`` [B*G*C]: flat index
    into ``B*L`` of each completion slot's token (padding slots repeat the completion's last token;
    they are masked as keys and never read back). ``output_src`` [B*L]: for each packed position, its
    row in ``cat(prompt outputs [B*P], completion slot outputs [B*G*C])``. ``allowed`` [B*G, C, P+C]:
    which keys a completion slot sees (its group's real prompt tokens, its own tokens up to itself).
    """

    def __init__(self, prompt_lens: list[int], completion_lens: list[int], group_size: int, width: int, device):
        B, G = len(prompt_lens), group_size
        P, C = max(prompt_lens), max(completion_lens)
        self.group_size, self.prompt_width, self.completion_width = G, P, C
        n_prompt = torch.tensor(prompt_lens, device=device)
        lens = torch.tensor(completion_lens, device=device).view(B, G)
        starts = n_prompt[:, None] + torch.cumsum(lens, 1) - lens  # [B, G] first position in the row
        j = torch.arange(C, device=device)
        row = torch.arange(B, device=device)[:, None, None] * width
        within = torch.minimum(j[None, None, :], lens[:, :, None] - 1)  # [B, G, C]
        self.completion_src = (row + starts[:, :, None] + within).reshape(-1)
        output = torch.zeros(B * width, dtype=torch.long, device=device)
        prompt_pos = torch.arange(P, device=device)
        real_prompt = prompt_pos[None, :] < n_prompt[:, None]  # [B, P]
        prompt_flat = (torch.arange(B, device=device)[:, None] * width + prompt_pos[None, :])[real_prompt]
        output[prompt_flat] = (torch.arange(B, device=device)[:, None] * P + prompt_pos[None, :])[real_prompt]
        real_slot = (j[None, None, :] < lens[:, :, None]).reshape(-1)
        output[self.completion_src[real_slot]] = B * P + torch.arange(B * G * C, device=device)[real_slot]
        self.output_src = output
        own = (j[None, :] <= j[:, None])[None] & (j[None, None, :] < lens.reshape(-1, 1, 1))  # [B*G, C, C]
        prompt_keys = real_prompt.repeat_interleave(G, dim=0)[:, None, :].expand(B * G, C, P)
        self.allowed = torch.cat([prompt_keys, own], dim=-1)
        self._bias: dict[tuple[torch.dtype, int], Tensor] = {}
        self.calls = 0

    def bias(self, dtype: torch.dtype, n_rep: int) -> Tensor:
        """Additive mask [B*G, 1, n_rep*C, P+C]: query rows are (repeat, slot), as `_split_attention` folds them."""
        key = (dtype, n_rep)
        if key not in self._bias:
            bias = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
            bias.masked_fill_(~self.allowed, float("-inf"))
            self._bias[key] = bias.repeat(1, n_rep, 1)[:, None]
        return self._bias[key]


_ACTIVE_SPLIT_LAYOUT: list[_SplitLayout] = []  # set for the duration of one packed forward


def _split_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """Attention of one packed forward (see `_SplitLayout`); the transformers attention-function signature.

    ``query`` [B, H, L, hd], ``key``/``value`` [B, KV, L, hd] (after RoPE, KV heads not repeated);
    returns [B, L, H, hd]. ``attention_mask`` (a placeholder) is not read.
    """
    from transformers.integrations.sdpa_attention import repeat_kv

    if not _ACTIVE_SPLIT_LAYOUT:
        raise RuntimeError(f"attention {SPLIT_ATTENTION_NAME!r} called outside a shared-prompt forward")
    layout = _ACTIVE_SPLIT_LAYOUT[-1]
    F = torch.nn.functional
    B, H, L, hd = query.shape
    KV = key.shape[1]
    n_rep = H // KV
    G, P, C = layout.group_size, layout.prompt_width, layout.completion_width
    # Prompt tokens: causal over the first P positions. Where a group's prompt is shorter than P, the
    # positions after it hold completion tokens; real prompt queries never reach them (causality), and
    # the outputs at those positions are taken from the completion slots below.
    key_p, value_p = key[:, :, :P], value[:, :, :P]
    out_prompt = F.scaled_dot_product_attention(query[:, :, :P], repeat_kv(key_p, n_rep), repeat_kv(value_p, n_rep),
                                                dropout_p=dropout, is_causal=True, scale=scaling)

    def slots(x: Tensor) -> Tensor:  # [B, h, L, hd] -> [B*G, C, h, hd]
        heads = x.shape[1]
        flat = x.transpose(1, 2).reshape(B * L, heads, hd)
        return flat.index_select(0, layout.completion_src).view(B * G, C, heads, hd)

    # Completion slots: the n_rep query heads of a KV head are folded into one [n_rep*C] query block,
    # against [its group's prompt keys | its own keys] (no repeated K/V, one mask for all heads).
    q = slots(query).view(B * G, C, KV, n_rep, hd).permute(0, 2, 3, 1, 4).reshape(B * G, KV, n_rep * C, hd)
    k = torch.cat([key_p[:, None].expand(B, G, KV, P, hd).reshape(B * G, KV, P, hd), slots(key).transpose(1, 2)], dim=2)
    v = torch.cat([value_p[:, None].expand(B, G, KV, P, hd).reshape(B * G, KV, P, hd), slots(value).transpose(1, 2)], dim=2)
    out_slots = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.bias(q.dtype, n_rep), dropout_p=dropout,
                                               scale=scaling)
    out_slots = out_slots.view(B * G, KV, n_rep, C, hd).permute(0, 3, 1, 2, 4).reshape(B * G * C, H, hd)
    out = torch.cat([out_prompt.transpose(1, 2).reshape(B * P, H, hd), out_slots]).index_select(0, layout.output_src)
    layout.calls += 1
    return out.view(B, L, H, hd), None


class _split_attention_forward:
    """Context: the model's attention layers run `_split_attention` with ``layout`` for one forward."""

    def __init__(self, inner: nn.Module, layout: _SplitLayout):
        self.config, self.layout = inner.config, layout

    def __enter__(self) -> _SplitLayout:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if SPLIT_ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS.register(SPLIT_ATTENTION_NAME, _split_attention)
        self.previous = self.config._attn_implementation
        self.config._attn_implementation = SPLIT_ATTENTION_NAME
        _ACTIVE_SPLIT_LAYOUT.append(self.layout)
        return self.layout

    def __exit__(self, *exc: object) -> None:
        _ACTIVE_SPLIT_LAYOUT.pop()
        self.config._attn_implementation = self.previous


def grouped_completion_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, t: int, group_size: int,
                                groups_per_forward: int, temperature: float, *,
                                chunk_rows: int = DEFAULT_CHUNK_ROWS, split_attention: bool = False) -> Tensor:
    """`completion_logprobs` with each group's prompt run once (see `shared_prompt_plan` for when).

    Group row: ``[prompt (n real tokens) | c_1 | ... | c_G | padding]``, completions at their real
    lengths. Completion ``i`` token ``j`` has position ``n + j`` (as in its own row) and sees the prompt
    and its own tokens ``<= j`` (padding at the row's end sees the prompt and itself; nothing reads it).
    The last prompt position predicts every completion's first token; token ``j > 0`` is predicted at
    the completion's position ``j - 1``. Only the real completion tokens' logits are gathered.
    With ``split_attention`` (see `split_attention_supported`) the attention layers compute only those
    blocks (`_split_attention`) instead of the masked full block; same values.
    """
    n_rows, length = input_ids.shape
    G = group_size
    device = input_ids.device
    prompt_region = length - t
    comp_lens = attention_mask[:, prompt_region:].long().sum(1).tolist()
    if min(comp_lens) < 1:
        raise ValueError("every completion needs at least one token for the shared-prompt forward")
    prompt_cols = [attention_mask[r, :prompt_region].nonzero().flatten().tolist() for r in range(0, n_rows, G)]
    inner = _inner_model(model)
    dtype = next(inner.parameters()).dtype
    min_value = torch.finfo(dtype).min
    sdpa = inner.config._attn_implementation == "sdpa"
    flat_ids = input_ids.reshape(-1)
    out: Tensor | None = None
    for g0 in range(0, n_rows // G, groups_per_forward):
        g1 = min(n_rows // G, g0 + groups_per_forward)
        # Index lists in plain Python (a few thousand ints), then one tensor op each.
        sources, slots, positions = [], [], []
        pred_row, pred_pos, out_row, out_col = [], [], [], []  # one entry per completion token
        for k, g in enumerate(range(g0, g1)):
            r0 = g * G
            cols = prompt_cols[g]
            n_prompt = len(cols)
            src = [r0 * length + col for col in cols]
            slot, pos, offset = [-1] * n_prompt, list(range(n_prompt)), n_prompt
            for i in range(G):
                n_i = comp_lens[r0 + i]
                start = (r0 + i) * length + prompt_region
                src += range(start, start + n_i)
                slot += [i] * n_i
                pos += range(n_prompt, n_prompt + n_i)
                # Token j is predicted at the last prompt position (j = 0) or at its own position j - 1.
                pred_pos += [n_prompt - 1, *range(offset, offset + n_i - 1)]
                pred_row += [k] * n_i
                out_row += [r0 + i] * n_i
                out_col += range(n_i)
                offset += n_i
            sources.append(src)
            slots.append(slot)
            positions.append(pos)
        width = max(len(x) for x in sources)
        pad = [width - len(x) for x in sources]
        ids = flat_ids[torch.tensor([x + [x[-1]] * k for x, k in zip(sources, pad, strict=True)], device=device)]
        pos = torch.tensor([x + [0] * k for x, k in zip(positions, pad, strict=True)], device=device)
        first_kept = min(len(prompt_cols[g]) for g in range(g0, g1)) - 1  # earliest last-prompt position
        keep = width - first_kept
        if split_attention:
            layout = _SplitLayout([len(prompt_cols[g]) for g in range(g0, g1)], comp_lens[g0 * G : g1 * G], G, width,
                                  device)
            placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)  # a 4-D mask is passed through as is
            with _split_attention_forward(inner, layout):
                output = model(input_ids=ids, attention_mask=placeholder, position_ids=pos, logits_to_keep=keep,
                               use_cache=False)
            if layout.calls != inner.config.num_hidden_layers:
                raise RuntimeError(f"split attention ran in {layout.calls} of {inner.config.num_hidden_layers} layers")
        else:
            slot = torch.tensor([x + [-2] * k for x, k in zip(slots, pad, strict=True)], device=device)  # -2 padding
            col = torch.arange(width, device=device)
            causal = col[None, :] <= col[:, None]  # [q, k]
            key_slot, query_slot = slot[:, None, :], slot[:, :, None]
            allowed = causal[None] & ((key_slot == -1) | (key_slot == query_slot)) & (key_slot != -2)
            allowed |= torch.eye(width, dtype=torch.bool, device=device)[None]  # no query row may be empty
            if sdpa:  # a boolean mask goes to the kernel as is
                mask = allowed[:, None]
            else:
                mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, min_value)[:, None]
            output = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False)
        logits = _logits_of(output)
        if logits.shape[1] != keep:
            raise ValueError(f"model returned logits for {logits.shape[1]} positions, asked for logits_to_keep={keep}")
        rows_t = torch.tensor(out_row, device=device)
        cols_t = torch.tensor(out_col, device=device)
        flat = torch.tensor([r * keep + q - first_kept for r, q in zip(pred_row, pred_pos, strict=True)], device=device)
        picked = logits.reshape(-1, logits.shape[-1]).index_select(0, flat)  # backward: one index_add
        targets = input_ids[rows_t, prompt_region + cols_t]
        values = token_logprobs(picked, targets, temperature, chunk_rows=chunk_rows)  # [tokens]
        del logits, picked
        if out is None:
            out = values.new_zeros(n_rows, t)
        out = out.index_put((rows_t, cols_t), values)  # out of place: autograd keeps every chunk's values
    assert out is not None
    return out


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------
def _check_same_shape(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} shape {tuple(tensor.shape)} must equal logprobs shape {shape}")


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: LossType = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate GRPO loss with optional k3 KL penalty.

    Inputs [N, T] (``advantages`` [N]); ``old_logprobs=None`` means on-policy (``logprobs.detach()``).
    Per valid token (``mask == 1``) of row ``i``::

        rho    = exp(logp - logp_old)
        l_tok  = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i)      (eps_high defaults to eps_low)
        kl     = exp(logp_ref - logp) - (logp_ref - logp) - 1                      (k3, >= 0)
        l_tok += beta * kl                                                         (when beta > 0)

    Aggregation (``M`` = mask, ``n_i = sum_t M_it``)::

        "grpo":    mean_i( sum_t M_it l_it / max(n_i, 1) )
        "dapo":    sum_it M_it l_it / D,  D = num_items_in_batch if given else max(sum_i n_i, 1)
        "dr_grpo": sum_it M_it l_it / (N * max_completion_length)

    With ``num_items_in_batch`` = the valid-token count of the whole (accumulated, all-rank) batch,
    summing "dapo" losses over micro-batches gives the token mean of the whole batch. A row whose
    mask is all zero contributes exactly 0 (never NaN) to every aggregation.

    Stats (detached, means over valid tokens): ``kl`` (only when ``ref_logprobs`` is given),
    ``clip_ratio_low`` (rho < 1 - eps_low and A < 0), ``clip_ratio_high`` (rho > 1 + eps_high and
    A > 0), ``clip_ratio`` (either: the tokens whose gradient the clip removes), ``ratio_mean``,
    and ``num_tokens`` (the valid-token count).
    """
    if not isinstance(logprobs, Tensor) or logprobs.dim() != 2 or not logprobs.is_floating_point():
        raise ValueError(
            f"logprobs must be a floating [N, T] tensor, got {getattr(logprobs, 'shape', logprobs)!r}"
        )
    shape = tuple(logprobs.shape)
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    _check_same_shape("old_logprobs", old_logprobs, shape)
    _check_same_shape("mask", mask, shape)
    if not isinstance(advantages, Tensor) or tuple(advantages.shape) != (shape[0],):
        raise ValueError(
            f"advantages must be a [N={shape[0]}] tensor, got shape {tuple(getattr(advantages, 'shape', ()))}"
        )
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logprobs (the reference model's log-probs)")
    if ref_logprobs is not None:
        _check_same_shape("ref_logprobs", ref_logprobs, shape)
    if not (math.isfinite(epsilon_low) and 0 <= epsilon_low < 1):
        raise ValueError(f"epsilon_low must be in [0, 1), got {epsilon_low!r}")
    if epsilon_high is None:
        epsilon_high = epsilon_low
    if not (math.isfinite(epsilon_high) and epsilon_high >= 0):
        raise ValueError(f"epsilon_high must be a finite number >= 0, got {epsilon_high!r}")
    if loss_type == "dr_grpo" and (
        max_completion_length is None or isinstance(max_completion_length, bool) or max_completion_length < 1
    ):
        raise ValueError(
            f"loss_type='dr_grpo' needs max_completion_length >= 1, got {max_completion_length!r}"
        )
    if num_items_in_batch is not None and loss_type != "dapo":
        raise ValueError(f"num_items_in_batch only applies to loss_type='dapo', got loss_type={loss_type!r}")

    dtype = logprobs.dtype
    valid = mask.to(device=logprobs.device, dtype=dtype)
    if not bool(((valid == 0) | (valid == 1)).all()):
        raise ValueError("mask must hold only 0/1 (or bool) values")
    adv = advantages.to(device=logprobs.device, dtype=dtype).unsqueeze(1)
    old = old_logprobs.to(dtype)

    # Masked positions may hold garbage (e.g. -inf for padding ids): zero the log-ratio there so
    # neither the loss nor its gradient can become NaN through 0 * inf.
    log_ratio = torch.where(valid > 0, logprobs - old, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)

    kl: Tensor | None = None
    if ref_logprobs is not None:
        delta = torch.where(valid > 0, ref_logprobs.to(dtype) - logprobs, torch.zeros_like(logprobs))
        kl = torch.exp(delta) - delta - 1.0
        if beta > 0:
            per_token = per_token + beta * kl

    masked = per_token * valid
    num_tokens = valid.sum()
    if loss_type == "grpo":
        loss = (masked.sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":
        if num_items_in_batch is None:
            denom: Tensor | float = num_tokens.clamp(min=1.0)
        else:
            denom = torch.as_tensor(num_items_in_batch, dtype=dtype, device=logprobs.device)
            if denom.numel() != 1 or not bool(denom > 0):
                raise ValueError(f"num_items_in_batch must be a positive count, got {num_items_in_batch!r}")
        loss = masked.sum() / denom
    else:
        loss = masked.sum() / (shape[0] * float(max_completion_length))  # type: ignore[arg-type]

    with torch.no_grad():
        token_count = num_tokens.clamp(min=1.0)

        def token_mean(x: Tensor) -> Tensor:
            return (x.to(dtype) * valid).sum() / token_count

        low = (ratio < 1.0 - epsilon_low) & (adv < 0)
        high = (ratio > 1.0 + epsilon_high) & (adv > 0)
        stats: dict[str, Tensor] = {
            "clip_ratio_low": token_mean(low),
            "clip_ratio_high": token_mean(high),
            "clip_ratio": token_mean(low | high),
            "ratio_mean": token_mean(ratio),
            "num_tokens": num_tokens.detach(),
        }
        if kl is not None:
            stats["kl"] = token_mean(kl)
    return loss, {k: v.detach() for k, v in stats.items()}
