"""The GRPO objective: group-relative advantages, the temperature schedule, the clipped surrogate loss.

Pure torch (no Colossal-AI import, no model forward) so that it can be unit-tested on CPU against an
independent float64 reference and reused by any training loop. Every public function states its formula.

Notation: ``N`` rows (sequences), ``G`` generations per prompt (rows ``r`` with the same ``r // G``
belong to one group), ``T`` completion tokens per row, ``V`` vocabulary size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

AdvantageScale = Literal["group", "batch", "none"]
LossType = Literal["grpo", "dapo", "dr_grpo"]
TemperatureSchedule = Literal["linear", "cosine"]

ADVANTAGE_SCALES: tuple[str, ...] = ("group", "batch", "none")
LOSS_TYPES: tuple[str, ...] = ("grpo", "dapo", "dr_grpo")
TEMPERATURE_SCHEDULES: tuple[str, ...] = ("linear", "cosine")


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


def rollout_temperature(
    step: int,
    total_steps: int,
    num_iterations: int,
    initial: float,
    final: float,
    schedule: TemperatureSchedule = "linear",
) -> float:
    """Sampling temperature of the rollout that optimizer step ``step`` (0-based) trains on.

    A rollout is sampled every ``num_iterations`` (mu) steps and reused until the next, so the schedule
    runs over rollouts, not steps: rollout ``k = step // mu`` of ``K = ceil(total_steps / mu)`` gets
    ``temperature_at(k, K, initial, final, schedule)``. The last rollout is sampled at exactly ``final``
    (a schedule over steps would stop one rollout short of it: 6 steps, mu = 2, 1.0 -> 0.5 gives
    1.0, 1.0, 0.75, 0.75, 0.5, 0.5 here).
    """
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or num_iterations < 1:
        raise ValueError(f"num_iterations must be an int >= 1, got {num_iterations!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < total_steps:
        raise ValueError(f"step must be in [0, total_steps - 1] = [0, {total_steps - 1}], got {step!r}")
    rollouts = -(-total_steps // num_iterations)
    return temperature_at(step // num_iterations, rollouts, initial, final, schedule)


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
