"""The sampler-vs-trainer log-prob gap: how far the rollout sampler's token log-probs are from the training
forward's for the same tokens and weights.

Both compute ``log softmax(logits / T)[token]`` of one policy, but with different kernels (a KV-cached
decoder against a full or packed forward) and, under ``--bf16``, different roundings. The gap is the noise
in the importance ratio when the old log-probs come from the sampler (``--old_logprobs sampler``), and the
first thing to check when a bf16 run diverges. Pure torch; sums here, so chunks and ranks reduce them by
adding (``max`` by taking the maximum) before :func:`gap_metrics` turns them into means.

Notation as in :mod:`trainer.rl.objective`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# A token is "off" when its probability ratio exp(|trainer - sampler|) differs from 1 by more than this.
OFF_TOLERANCE = 0.01

GAP_SUM_KEYS: tuple[str, ...] = ("gap_abs_sum", "gap_off_count", "gap_tokens")


def logprob_gap_sums(sampler: Tensor, trainer: Tensor, mask: Tensor) -> dict[str, float]:
    """Sums over the valid tokens (``mask`` [N, T] == 1) of ``d = |trainer - sampler|`` ([N, T] each):
    ``gap_abs_sum`` = sum d, ``gap_max`` = max d (0 when nothing is valid), ``gap_off_count`` = number of
    tokens with ``exp(d) - 1 > OFF_TOLERANCE``, ``gap_tokens`` = number of valid tokens."""
    if sampler.shape != trainer.shape or mask.shape != trainer.shape:
        raise ValueError(
            f"sampler {tuple(sampler.shape)}, trainer {tuple(trainer.shape)} and mask {tuple(mask.shape)} "
            "must have the same [N, T] shape"
        )
    valid = mask.to(trainer.device) > 0
    gap = (trainer.detach().double() - sampler.to(trainer.device).double()).abs()[valid]
    return {
        "gap_abs_sum": float(gap.sum()),
        "gap_max": float(gap.max()) if gap.numel() else 0.0,
        "gap_off_count": float((torch.expm1(gap) > OFF_TOLERANCE).sum()),
        "gap_tokens": float(gap.numel()),
    }


def add_gap_sums(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    """``total`` with ``part`` added in (sums added, max taken); ``total`` may be empty."""
    out = {k: total.get(k, 0.0) + part[k] for k in GAP_SUM_KEYS}
    out["gap_max"] = max(total.get("gap_max", 0.0), part["gap_max"])
    return out


def gap_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The logged metrics from (reduced) sums: ``logprob_gap_mean``, ``logprob_gap_max`` (nats) and
    ``logprob_gap_off_fraction`` (tokens whose probability ratio is off by more than 1 %)."""
    tokens = sums["gap_tokens"]
    if not tokens > 0 or not math.isfinite(tokens):
        return {}
    return {
        "logprob_gap_mean": sums["gap_abs_sum"] / tokens,
        "logprob_gap_max": sums["gap_max"],
        "logprob_gap_off_fraction": sums["gap_off_count"] / tokens,
    }
