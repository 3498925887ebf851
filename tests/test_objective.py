"""Tests for trainer/rl/objective.py against an independent float64 reference in plain Python.

The reference functions below use only ``math`` and lists of floats; they never call the code under
test. Gradients of the reference are analytic and are themselves checked by finite differences.
"""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch
from torch import nn

from trainer.rl.logprobs import (
    completion_logprobs,
    entropy_from_logits,
    position_ids_from_mask,
    token_logprobs,
)
from trainer.rl.objective import (
    group_advantages,
    grpo_loss,
    informative_groups,
    rollout_temperature,
    temperature_at,
    zero_std_fraction,
)
from trainer.rl.packed_forward import (
    grouped_completion_logprobs,
    shared_prompt_plan,
    split_attention_supported,
)

Matrix = list[list[float]]


# --------------------------------------------------------------------------------------------------
# Independent float64 reference (plain Python)
# --------------------------------------------------------------------------------------------------
def ref_std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def ref_advantages(rewards: list[float], group: int, scale: str, eps: float = 1e-4) -> list[float]:
    batch_std = ref_std(rewards)
    out: list[float] = []
    for start in range(0, len(rewards), group):
        values = rewards[start : start + group]
        if max(values) == min(values):
            out.extend([0.0] * group)
            continue
        mean = sum(values) / group
        denom = {"group": ref_std(values) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        out.extend([(v - mean) / denom for v in values])
    return out


def ref_loss_and_grad(
    lp: Matrix,
    old: Matrix,
    adv: list[float],
    mask: list[list[int]],
    *,
    ref: Matrix | None,
    beta: float,
    eps_low: float,
    eps_high: float,
    loss_type: str,
    max_len: int | None = None,
    num_items: float | None = None,
) -> tuple[float, Matrix, dict[str, float]]:
    """Loss, analytic d loss / d lp, and token-mean stats, per the formulas in the task brief."""
    n, t = len(lp), len(lp[0])
    total_tokens = sum(sum(row) for row in mask)
    loss = 0.0
    grad = [[0.0] * t for _ in range(n)]
    clip_low = clip_high = 0
    ratio_sum = kl_sum = 0.0
    for i in range(n):
        count = sum(mask[i])
        if loss_type == "grpo":
            weight = 1.0 / (n * max(count, 1))
        elif loss_type == "dapo":
            weight = 1.0 / (num_items if num_items is not None else max(total_tokens, 1))
        else:
            weight = 1.0 / (n * max_len)
        for j in range(t):
            if not mask[i][j]:
                continue
            a = adv[i]
            r = math.exp(lp[i][j] - old[i][j])
            c = min(max(r, 1.0 - eps_low), 1.0 + eps_high)
            inside = 1.0 - eps_low <= r <= 1.0 + eps_high
            if r * a <= c * a:
                term, dterm = -r * a, -a * r
            else:
                term, dterm = -c * a, (-a * r if inside else 0.0)
            if ref is not None:
                d = ref[i][j] - lp[i][j]
                kl = math.exp(d) - d - 1.0
                kl_sum += kl
                if beta > 0:
                    term += beta * kl
                    dterm += beta * (1.0 - math.exp(d))
            loss += weight * term
            grad[i][j] = weight * dterm
            ratio_sum += r
            clip_low += int(r < 1.0 - eps_low and a < 0)
            clip_high += int(r > 1.0 + eps_high and a > 0)
    denom = max(total_tokens, 1)
    stats = {
        "clip_ratio_low": clip_low / denom,
        "clip_ratio_high": clip_high / denom,
        "clip_ratio": (clip_low + clip_high) / denom,
        "ratio_mean": ratio_sum / denom,
        "num_tokens": float(total_tokens),
    }
    if ref is not None:
        stats["kl"] = kl_sum / denom
    return loss, grad, stats


# --------------------------------------------------------------------------------------------------
# Test data
# --------------------------------------------------------------------------------------------------
N_ROWS, GROUP, T_LEN = 9, 3, 6


def make_case(seed: int = 0) -> dict:
    rng = random.Random(seed)
    lp = [[rng.uniform(-3.0, -0.05) for _ in range(T_LEN)] for _ in range(N_ROWS)]
    # Old log-probs far from the current ones: ratios roughly in [e^-1.2, e^1.2] so the clip is active.
    old = [[v + rng.uniform(-1.2, 1.2) for v in row] for row in lp]
    ref = [[v + rng.uniform(-0.8, 0.8) for v in row] for row in lp]
    lengths = [6, 3, 1, 0, 5, 6, 2, 4, 6]  # ragged; row 3 entirely masked (e.g. a truncated completion)
    mask = [[1 if j < length else 0 for j in range(T_LEN)] for length in lengths]
    # Group 0 mixed, group 1 all equal (zero std), group 2 mixed with ties.
    rewards = [1.0, 0.0, 0.5, 0.3, 0.3, 0.3, 2.0, 0.0, 0.0]
    return {"lp": lp, "old": old, "ref": ref, "mask": mask, "rewards": rewards}


def rel_err(actual: torch.Tensor, expected: list | float) -> float:
    exp = torch.tensor(expected, dtype=torch.float64)
    act = actual.detach().to(torch.float64)
    return float((act - exp).abs().max() / exp.abs().max().clamp(min=1e-30))


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_advantages_match_reference(scale: str, dtype: torch.dtype) -> None:
    rng = random.Random(1)
    rewards = [rng.choice([0.0, 0.25, 1.0, 1.5]) for _ in range(16)] + [0.7] * 4  # last group constant
    got = group_advantages(torch.tensor(rewards, dtype=dtype), 4, scale)
    expected = ref_advantages(rewards, 4, scale)
    assert got.dtype == dtype and got.shape == (20,)
    assert rel_err(got, expected) < (1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_std_groups_give_exact_zero(scale: str) -> None:
    # 0.1 repeated: the float mean is not exactly 0.1, so only an explicit zero avoids tiny / eps noise.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9], dtype=torch.float32)
    adv = group_advantages(rewards, 4, scale)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:4], torch.zeros(4))
    assert (adv[4:7] < 0).all() and adv[7] > 0
    everything_equal = group_advantages(torch.full((6,), 3.0), 3, scale)
    assert torch.equal(everything_equal, torch.zeros(6))


def test_single_generation_groups_and_integer_rewards() -> None:
    adv = group_advantages(torch.tensor([1, 0, 3]), 1, "group")
    assert adv.is_floating_point() and torch.equal(adv, torch.zeros(3))


def test_informative_groups_and_zero_std_fraction() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 1.0])
    assert informative_groups(rewards, 2).tolist() == [False, False, False, True]
    assert zero_std_fraction(rewards, 2) == pytest.approx(0.75)
    assert zero_std_fraction(rewards, 4) == pytest.approx(0.0)
    assert informative_groups(rewards, 8).tolist() == [True]


def test_advantage_input_errors() -> None:
    with pytest.raises(ValueError, match="num_generations=4"):
        group_advantages(torch.zeros(6), 4, "group")
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(6), 0, "group")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(6), 3, "global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rows \\[2\\]"):
        group_advantages(torch.tensor([0.0, 1.0, float("nan"), 0.0]), 2, "group")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 3), 3, "group")
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(6), 3, "group", eps=0.0)


# --------------------------------------------------------------------------------------------------
# Temperature schedule
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(("initial", "final"), [(1.0, 0.7), (0.7, 1.0), (0.9, 0.9), (0.3, 1.3)])
@pytest.mark.parametrize("total", [2, 7, 100])
def test_temperature_endpoints_exact_and_monotone(
    schedule: str, initial: float, final: float, total: int
) -> None:
    values = [temperature_at(s, total, initial, final, schedule) for s in range(total)]  # type: ignore[arg-type]
    assert values[0] == initial and values[-1] == final
    diffs = [b - a for a, b in itertools.pairwise(values)]
    if final < initial:
        assert all(d <= 0 for d in diffs)
    else:
        assert all(d >= 0 for d in diffs)
    # No jumps: no single step moves more than the steepest point of the schedule allows.
    steepest = (math.pi / 2 if schedule == "cosine" else 1.0) * abs(final - initial) / (total - 1)
    assert all(abs(d) <= steepest + 1e-12 for d in diffs)


def test_temperature_midpoints_and_single_step() -> None:
    assert temperature_at(2, 5, 1.0, 0.6, "cosine") == pytest.approx(0.8, abs=1e-15)
    assert temperature_at(2, 5, 1.0, 0.6, "linear") == pytest.approx(0.8, abs=1e-15)
    # A quarter of the way: linear is at 1/4 of the change, cosine at (1 - cos(pi/4)) / 2 of it.
    assert temperature_at(1, 5, 1.0, 0.6, "linear") == pytest.approx(0.9, abs=1e-15)
    assert temperature_at(1, 5, 1.0, 0.6, "cosine") == pytest.approx(
        1.0 - 0.4 * (1 - math.sqrt(0.5)) / 2, abs=1e-15
    )
    assert temperature_at(0, 1, 1.2, 0.5, "cosine") == 1.2


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"step": -1}, "step"),
        ({"step": 10}, "step"),
        ({"step": 1.5}, "step"),
        ({"total_steps": 0, "step": 0}, "total_steps"),
        ({"initial": 0.0}, "initial"),
        ({"final": float("nan")}, "final"),
        ({"final": -1.0}, "final"),
        ({"schedule": "exp"}, "schedule"),
    ],
)
def test_temperature_argument_errors(kwargs: dict, name: str) -> None:
    args = {"step": 0, "total_steps": 10, "initial": 1.0, "final": 0.7, "schedule": "linear"} | kwargs
    with pytest.raises(ValueError, match=name):
        temperature_at(**args)


def test_rollout_temperature_reaches_the_final_temperature_with_reused_rollouts() -> None:
    # 6 steps, each rollout reused for 2: three rollouts, the last one sampled at the final temperature.
    values = [rollout_temperature(s, 6, 2, 1.0, 0.5) for s in range(6)]
    assert values == [1.0, 1.0, 0.75, 0.75, 0.5, 0.5]
    # A step count that is not a multiple of mu: the last rollout (trained on once) is the final one.
    assert [rollout_temperature(s, 5, 2, 1.0, 0.5, "cosine") for s in range(5)] == [1.0, 1.0, 0.75, 0.75, 0.5]
    # mu = 1 is the schedule over optimizer steps.
    assert [rollout_temperature(s, 7, 1, 1.3, 0.3) for s in range(7)] == [
        temperature_at(s, 7, 1.3, 0.3) for s in range(7)
    ]
    assert rollout_temperature(0, 3, 4, 0.9, 0.2) == 0.9  # a single rollout: the initial temperature


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_iterations": 0}, "num_iterations"),
        ({"num_iterations": True}, "num_iterations"),
        ({"step": 6}, "step"),
        ({"total_steps": 0}, "total_steps"),
        ({"final": 0.0}, "final"),
    ],
)
def test_rollout_temperature_argument_errors(kwargs: dict, name: str) -> None:
    args = {"step": 0, "total_steps": 6, "num_iterations": 2, "initial": 1.0, "final": 0.5} | kwargs
    with pytest.raises(ValueError, match=name):
        rollout_temperature(**args)


# --------------------------------------------------------------------------------------------------
# Token log-probs and entropy
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 1000])
def test_token_logprobs_equal_full_log_softmax(dtype: torch.dtype, chunk_rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 50, generator=gen) * 4).to(dtype)
    ids = torch.randint(0, 50, (3, 5), generator=gen)
    temperature = 0.7
    got = token_logprobs(logits, ids, temperature, chunk_rows=chunk_rows)
    expected = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)

    # Gradient: the chunked analytic backward equals autograd through log_softmax.
    leaf = logits.clone().requires_grad_(True)
    leaf_ref = logits.clone().requires_grad_(True)
    weights = torch.randn(3, 5, generator=gen)
    (token_logprobs(leaf, ids, temperature, chunk_rows=chunk_rows) * weights).sum().backward()
    naive = torch.log_softmax(leaf_ref.float() / temperature, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    (naive * weights).sum().backward()
    assert leaf.grad is not None and leaf.grad.dtype == dtype
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    torch.testing.assert_close(leaf.grad, leaf_ref.grad, **tol)


def test_token_logprobs_gradcheck_float64_and_sliced_views() -> None:
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(2, 6, 11, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = torch.randint(0, 11, (2, 4), generator=gen)
    # A non-contiguous slice, as completion_logprobs passes logits[:, -(T + 1):-1].
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x[:, 1:-1], ids, 1.3, chunk_rows=3), (full,))
    got = token_logprobs(full[:, 1:-1], ids, 1.3, chunk_rows=3)
    expected = torch.log_softmax(full[:, 1:-1] / 1.3, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # 2-D [rows, V] input.
    flat_ids = ids.reshape(-1)
    torch.testing.assert_close(
        token_logprobs(full[:, 1:-1].reshape(-1, 11), flat_ids, 1.3, chunk_rows=5), got.reshape(-1)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_logits(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(4, 3, 20, generator=gen) * 3).to(dtype)
    got = entropy_from_logits(logits, 0.9, chunk_rows=5)
    logp = torch.log_softmax(logits.float() / 0.9, dim=-1)
    expected = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    uniform = entropy_from_logits(torch.zeros(2, 20))
    torch.testing.assert_close(uniform, torch.full((2,), math.log(20)))


def test_token_logprobs_input_errors() -> None:
    logits = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="ids must be in \\[0, 10\\)"):
        token_logprobs(logits, torch.full((2, 3), 10), 1.0)
    with pytest.raises(ValueError, match="ids shape"):
        token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), 1.0, chunk_rows=0)


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------
def run_loss(case: dict, dtype: torch.dtype, scale: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor, dict]:
    lp = torch.tensor(case["lp"], dtype=dtype, requires_grad=True)
    adv = group_advantages(torch.tensor(case["rewards"], dtype=dtype), GROUP, scale)  # type: ignore[arg-type]
    ref = torch.tensor(case["ref"], dtype=dtype) if kwargs.pop("with_ref", True) else None
    loss, stats = grpo_loss(
        lp,
        torch.tensor(case["old"], dtype=dtype),
        adv,
        torch.tensor(case["mask"]),
        ref_logprobs=ref,
        **kwargs,
    )
    loss.backward()
    assert lp.grad is not None
    return loss, lp.grad, stats


LOSS_GRID = list(
    itertools.product(["grpo", "dapo", "dr_grpo"], ["group", "batch", "none"], [0.0, 0.04], [None, 0.28])
)


@pytest.mark.parametrize(("loss_type", "scale", "beta", "eps_high"), LOSS_GRID)
def test_grpo_loss_and_gradient_match_float64_reference(
    loss_type: str, scale: str, beta: float, eps_high: float | None
) -> None:
    case = make_case()
    kwargs = {"beta": beta, "epsilon_low": 0.2, "epsilon_high": eps_high, "loss_type": loss_type}
    if loss_type == "dr_grpo":
        kwargs["max_completion_length"] = 8
    ref_kwargs = {
        "beta": beta,
        "eps_low": 0.2,
        "eps_high": 0.2 if eps_high is None else eps_high,
        "loss_type": loss_type,
        "max_len": kwargs.get("max_completion_length"),
    }
    adv = ref_advantages(case["rewards"], GROUP, scale)
    exp_loss, exp_grad, exp_stats = ref_loss_and_grad(
        case["lp"], case["old"], adv, case["mask"], ref=case["ref"], **ref_kwargs
    )
    # The case really exercises both clip directions and a non-trivial loss.
    assert exp_stats["clip_ratio_low"] > 0 and exp_stats["clip_ratio_high"] > 0 and abs(exp_loss) > 1e-3

    loss64, grad64, stats64 = run_loss(case, torch.float64, scale, **kwargs)
    assert loss64.dtype == torch.float64
    assert rel_err(loss64, exp_loss) < 1e-6
    assert rel_err(grad64, exp_grad) < 1e-6
    for key, value in exp_stats.items():
        assert stats64[key].item() == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert not stats64[key].requires_grad
    # The all-masked row (3) and padding positions get exactly zero gradient.
    mask = torch.tensor(case["mask"], dtype=torch.bool)
    assert torch.equal(grad64[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))

    loss32, grad32, stats32 = run_loss(case, torch.float32, scale, **kwargs)
    assert loss32.dtype == torch.float32
    assert rel_err(loss32, exp_loss) < 1e-5
    assert rel_err(grad32, exp_grad) < 1e-5
    assert stats32["clip_ratio"].item() == pytest.approx(exp_stats["clip_ratio"], abs=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_reference_gradient_agrees_with_finite_differences(loss_type: str) -> None:
    """Guards the analytic derivative used above: central differences of the reference loss."""
    case = make_case(seed=3)
    adv = ref_advantages(case["rewards"], GROUP, "group")
    kwargs = {
        "ref": case["ref"],
        "beta": 0.1,
        "eps_low": 0.2,
        "eps_high": 0.28,
        "loss_type": loss_type,
        "max_len": 8,
    }
    _, grad, _ = ref_loss_and_grad(case["lp"], case["old"], adv, case["mask"], **kwargs)
    h = 1e-6
    for i in range(N_ROWS):
        for j in range(T_LEN):
            plus = [row[:] for row in case["lp"]]
            minus = [row[:] for row in case["lp"]]
            plus[i][j] += h
            minus[i][j] -= h
            f_plus = ref_loss_and_grad(plus, case["old"], adv, case["mask"], **kwargs)[0]
            f_minus = ref_loss_and_grad(minus, case["old"], adv, case["mask"], **kwargs)[0]
            assert (f_plus - f_minus) / (2 * h) == pytest.approx(grad[i][j], abs=1e-8)


def test_without_ref_there_is_no_kl_and_beta_needs_ref() -> None:
    case = make_case()
    loss, grad, stats = run_loss(case, torch.float64, "group", with_ref=False, loss_type="grpo")
    adv = ref_advantages(case["rewards"], GROUP, "group")
    exp_loss, exp_grad, _ = ref_loss_and_grad(
        case["lp"],
        case["old"],
        adv,
        case["mask"],
        ref=None,
        beta=0.0,
        eps_low=0.2,
        eps_high=0.2,
        loss_type="grpo",
    )
    assert "kl" not in stats
    assert rel_err(loss, exp_loss) < 1e-6 and rel_err(grad, exp_grad) < 1e-6
    with pytest.raises(ValueError, match="ref_logprobs"):
        run_loss(case, torch.float64, "group", with_ref=False, beta=0.1)


def test_dapo_num_items_in_batch_makes_micro_batches_sum_to_full_batch() -> None:
    case = make_case()
    lp = torch.tensor(case["lp"], dtype=torch.float64, requires_grad=True)
    old = torch.tensor(case["old"], dtype=torch.float64)
    ref = torch.tensor(case["ref"], dtype=torch.float64)
    mask = torch.tensor(case["mask"])
    adv = group_advantages(torch.tensor(case["rewards"], dtype=torch.float64), GROUP, "group")
    full, _ = grpo_loss(lp, old, adv, mask, ref_logprobs=ref, beta=0.04, loss_type="dapo")
    (full_grad,) = torch.autograd.grad(full, lp)

    total = int(mask.sum())
    accumulated = torch.zeros((), dtype=torch.float64)
    for rows in (slice(0, 4), slice(4, 7), slice(7, 9)):
        part, stats = grpo_loss(
            lp[rows], old[rows], adv[rows], mask[rows], ref_logprobs=ref[rows], beta=0.04,
            loss_type="dapo", num_items_in_batch=total,
        )  # fmt: skip
        accumulated = accumulated + part
    (acc_grad,) = torch.autograd.grad(accumulated, lp)
    assert rel_err(accumulated, full.item()) < 1e-12
    assert rel_err(acc_grad, full_grad.tolist()) < 1e-12


def test_on_policy_default_and_masked_garbage_stays_finite() -> None:
    case = make_case()
    lp = torch.tensor(case["lp"], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(case["mask"], dtype=torch.bool)
    adv = torch.tensor(ref_advantages(case["rewards"], GROUP, "group"), dtype=torch.float64)
    # Padding positions of old/ref log-probs may hold -inf (padding ids); they must not leak NaN.
    old = torch.tensor(case["old"], dtype=torch.float64).masked_fill(~mask, float("-inf"))
    ref = torch.tensor(case["ref"], dtype=torch.float64).masked_fill(~mask, float("inf"))
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        loss, stats = grpo_loss(
            lp, old, adv, mask, ref_logprobs=ref, beta=0.1, loss_type=loss_type, max_completion_length=6
        )
        (grad,) = torch.autograd.grad(loss, lp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(v) for v in stats.values())

    # old_logprobs=None: ratio 1 everywhere, gradient -A_i / (N * n_i) for "grpo".
    loss, stats = grpo_loss(lp, None, adv, mask)
    (grad,) = torch.autograd.grad(loss, lp)
    exp_loss, exp_grad, _ = ref_loss_and_grad(
        case["lp"], case["lp"], adv.tolist(), case["mask"], ref=None, beta=0.0, eps_low=0.2, eps_high=0.2,
        loss_type="grpo",
    )  # fmt: skip
    assert stats["ratio_mean"].item() == 1.0 and stats["clip_ratio"].item() == 0.0
    assert abs(loss.item() - exp_loss) < 1e-15 and rel_err(grad, exp_grad) < 1e-12


def test_all_rows_masked_gives_zero_loss() -> None:
    lp = torch.randn(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        loss, stats = grpo_loss(
            lp, lp.detach() + 1, torch.tensor([1.0, -1.0]), mask, loss_type=loss_type, max_completion_length=3
        )
        (grad,) = torch.autograd.grad(loss, lp)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros(2, 3))
        assert stats["num_tokens"].item() == 0 and stats["ratio_mean"].item() == 0.0


def test_grpo_loss_input_errors() -> None:
    lp = torch.zeros(2, 3)
    adv = torch.zeros(2)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(lp, lp, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        grpo_loss(lp, lp, adv, mask, loss_type="grpo", num_items_in_batch=6)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        grpo_loss(lp, lp, adv, mask, loss_type="dapo", num_items_in_batch=0)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(lp, lp, adv, mask, loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="old_logprobs shape"):
        grpo_loss(lp, torch.zeros(2, 4), adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(lp, lp, torch.zeros(2, 1), mask)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(lp, lp, adv, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="epsilon_low"):
        grpo_loss(lp, lp, adv, mask, epsilon_low=1.0)
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(lp, lp, adv, mask, beta=-0.1, ref_logprobs=lp)


# --------------------------------------------------------------------------------------------------
# completion_logprobs on a tiny random Llama
# --------------------------------------------------------------------------------------------------
VOCAB, PAD = 61, 0


def tiny_llama(attn: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]], list[int]]:
    """Left-padded prompts of lengths 5, 2, 7 followed by 4 completion tokens (row 1 stops after 2)."""
    gen = torch.Generator().manual_seed(5)
    prompt_lens, t = [5, 2, 7], 4
    completion_lens = [4, 2, 4]
    width = max(prompt_lens)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in prompt_lens]
    completions = torch.randint(1, VOCAB, (3, t), generator=gen)
    completions[1, 2:] = PAD
    rows, masks = [], []
    for prompt, comp, c_len in zip(prompts, completions.tolist(), completion_lens, strict=True):
        pad = width - len(prompt)
        rows.append([PAD] * pad + prompt + comp)
        masks.append([0] * pad + [1] * len(prompt) + [1] * c_len + [0] * (t - c_len))
    return torch.tensor(rows), torch.tensor(masks), completions, prompts, completion_lens


def unpadded_logprobs(
    model: nn.Module, prompt: list[int], completion: list[int], temperature: float
) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    positions = range(len(prompt) - 1, len(prompt) - 1 + len(completion))
    return torch.stack([logp[p, tok] for p, tok in zip(positions, completion, strict=True)])


class FullLogitsOnly(nn.Module):
    """A model whose forward has no logits_to_keep: completion_logprobs must slice the full logits."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen_lengths: list[int] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        self.seen_lengths.append(out.logits.shape[1])
        return (out.logits,)


class KwargsWrapper(nn.Module):
    """Like a booster ModelWrapper: forward(*args, **kwargs) delegating to ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.seen_kwargs: list[dict] = []

    def forward(self, *args, **kwargs):
        self.seen_kwargs.append(dict(kwargs))
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_completion_logprobs_left_padded_equals_unpadded_forward(attn: str) -> None:
    model = tiny_llama(attn)
    input_ids, attention_mask, completions, prompts, completion_lens = padded_batch()
    temperature = 0.8
    with torch.no_grad():
        got = completion_logprobs(model, input_ids, attention_mask, completions, temperature, batch_size=2)
        expected = [
            unpadded_logprobs(model, p, completions[i, : completion_lens[i]].tolist(), temperature)
            for i, p in enumerate(prompts)
        ]
    assert got.shape == (3, 4) and got.dtype == torch.float32 and not got.requires_grad
    for i, exp in enumerate(expected):
        torch.testing.assert_close(got[i, : completion_lens[i]], exp, rtol=1e-5, atol=1e-5)

    # Every batch size, without trimming, with explicit position ids, and through both wrappers.
    with torch.no_grad():
        for batch_size in (1, 3, 8):
            torch.testing.assert_close(
                completion_logprobs(model, input_ids, attention_mask, completions, temperature, batch_size),
                got,
            )
        untrimmed = completion_logprobs(
            model, input_ids, attention_mask, completions, temperature, 2, trim_padding=False
        )
        explicit = completion_logprobs(
            model,
            input_ids,
            attention_mask,
            completions,
            temperature,
            2,
            position_ids_from_mask(attention_mask),
        )
        full_only = FullLogitsOnly(model)
        sliced = completion_logprobs(full_only, input_ids, attention_mask, completions, temperature, 3)
        wrapped = KwargsWrapper(model)
        via_wrapper = completion_logprobs(wrapped, input_ids, attention_mask, completions, temperature, 3)
    valid = torch.tensor([[c > j for j in range(4)] for c in completion_lens])
    for other in (untrimmed, explicit, sliced, via_wrapper):
        torch.testing.assert_close(other[valid], got[valid], rtol=1e-5, atol=1e-5)
    assert full_only.seen_lengths == [input_ids.shape[1]]  # full logits, sliced by us
    assert wrapped.seen_kwargs[0]["logits_to_keep"] == 5 and wrapped.seen_kwargs[0]["use_cache"] is False
    # RoPE is shift-invariant, so equal outputs alone cannot prove the positions: check what the
    # model received. The attended tokens of each row are numbered 0, 1, 2, ... (left padding skipped).
    seen_mask = wrapped.seen_kwargs[0]["attention_mask"]
    seen_pos = wrapped.seen_kwargs[0]["position_ids"]
    for row_mask, row_pos in zip(seen_mask.tolist(), seen_pos.tolist(), strict=True):
        attended = [p for p, m in zip(row_pos, row_mask, strict=True) if m]
        assert attended == list(range(sum(row_mask)))


def test_position_ids_from_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 1, 1, 0, 0]])
    expected = [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3], [0, 0, 1, 1, 1]]
    assert position_ids_from_mask(mask).tolist() == expected
    assert position_ids_from_mask(mask.bool()).tolist() == expected


def test_completion_logprobs_gradient_equals_unpadded_gradient() -> None:
    model = tiny_llama("sdpa")
    input_ids, attention_mask, completions, prompts, completion_lens = padded_batch()
    valid = torch.tensor([[c > j for j in range(4)] for c in completion_lens], dtype=torch.float32)
    params = [
        model.model.embed_tokens.weight,
        model.model.layers[0].self_attn.q_proj.weight,
        model.lm_head.weight,
    ]

    got = completion_logprobs(model, input_ids, attention_mask, completions, 1.1, batch_size=2)
    assert got.requires_grad
    grads = torch.autograd.grad((got * valid).sum(), params)
    total = sum(
        unpadded_logprobs(model, p, completions[i, : completion_lens[i]].tolist(), 1.1).sum()
        for i, p in enumerate(prompts)
    )
    expected = torch.autograd.grad(total, params)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_completion_logprobs_input_errors() -> None:
    model = tiny_llama("sdpa")
    input_ids, attention_mask, completions, _, _ = padded_batch()
    with pytest.raises(ValueError, match="completion_ids must equal"):
        completion_logprobs(model, input_ids, attention_mask, (completions + 1) % VOCAB, 1.0, 2)
    with pytest.raises(ValueError, match="logits_forward_batch_size"):
        completion_logprobs(model, input_ids, attention_mask, completions, 1.0, 0)
    with pytest.raises(ValueError, match="attention_mask shape"):
        completion_logprobs(model, input_ids, attention_mask[:, 1:], completions, 1.0, 2)
    with pytest.raises(ValueError, match="completion length"):
        completion_logprobs(model, input_ids[:, -4:], attention_mask[:, -4:], completions, 1.0, 2)


# --------------------------------------------------------------------------------------------------
# Shared-prompt forward (each group's prompt once, its completions packed behind it)
# --------------------------------------------------------------------------------------------------
def grouped_batch(group_size: int = 3) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], list[list[int]]]:
    """Two groups (prompts of 6 and 3 tokens, left-padded) of ``group_size`` completions of 1-5 tokens,
    right-padded to 6 columns (the last column is padding in every row, as after a rollout trim)."""
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (6, 3)]
    width, t = 6, 6
    rows, masks, completions = [], [], []
    for g, prompt in enumerate(prompts):
        for i in range(group_size):
            n = 1 + (3 * g + 2 * i) % 5
            comp = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
            completions.append(comp)
            pad = width - len(prompt)
            rows.append([PAD] * pad + prompt + comp + [PAD] * (t - n))
            masks.append([0] * pad + [1] * (len(prompt) + n) + [0] * (t - n))
    return (
        torch.tensor(rows),
        torch.tensor(masks),
        [p for p in prompts for _ in range(group_size)],
        completions,
    )


def tiny_qwen2(attn: str, qwen3: bool = False) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = (Qwen3Config if qwen3 else Qwen2Config)(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        attn_implementation=attn,
    )
    # Qwen2: q/k/v projections with biases, unlike Llama; Qwen3: no biases, a q/k RMSNorm per head.
    return (Qwen3ForCausalLM if qwen3 else Qwen2ForCausalLM)(config).eval()


@pytest.mark.parametrize(
    ("arch", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen3", "sdpa")]
)
def test_shared_prompt_forward_equals_one_unpadded_forward_per_row(arch: str, attn: str) -> None:
    model = tiny_llama(attn) if arch == "llama" else tiny_qwen2(attn, qwen3=arch == "qwen3")
    input_ids, attention_mask, prompts, completions = grouped_batch()
    t = 6
    wrapped = KwargsWrapper(model)
    got = completion_logprobs(
        wrapped, input_ids, attention_mask, input_ids[:, -t:], 0.9, batch_size=6, group_size=3
    )
    # It took the packed path: one sequence per group, its prompt once and its completions without padding
    # (group 0: 6 + 1 + 3 + 5 tokens; group 1: 3 + 4 + 1 + 3, padded to 15), positions restarting per
    # completion, logits from the earliest last-prompt position (2) on. With split attention the model
    # gets a placeholder mask (its attention layers compute only the needed blocks) and its own
    # attention setting back afterwards.
    assert len(wrapped.seen_kwargs) == 1
    seen = wrapped.seen_kwargs[0]
    assert split_attention_supported(model)
    assert tuple(seen["input_ids"].shape) == (2, 15) and tuple(seen["attention_mask"].shape) == (1, 1, 1, 1)
    assert model.config._attn_implementation == attn
    assert seen["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 5, 6, 6, 7, 8, 6, 7, 8, 9, 10],
        [0, 1, 2, 3, 4, 5, 6, 3, 3, 4, 5, 0, 0, 0, 0],
    ]
    assert seen["logits_to_keep"] == 13
    params = [
        model.model.embed_tokens.weight,
        model.model.layers[1].self_attn.k_proj.weight,
        model.lm_head.weight,
    ]
    valid = torch.zeros_like(got)
    for r, comp in enumerate(completions):
        valid[r, : len(comp)] = 1
    grads = torch.autograd.grad((got * valid).sum(), params)
    expected = [unpadded_logprobs(model, prompts[r], comp, 0.9) for r, comp in enumerate(completions)]
    for r, exp in enumerate(expected):
        torch.testing.assert_close(got[r, : len(exp)], exp, rtol=1e-5, atol=1e-5)
    assert got[:, 5].abs().sum() == 0  # the all-padding column is zero, not computed
    expected_grads = torch.autograd.grad(sum(e.sum() for e in expected), params)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    # One group per forward gives the same values, and so does the masked full block (no split attention),
    # gradients included.
    one = grouped_completion_logprobs(model, input_ids, attention_mask, t, 3, 1, 0.9, split_attention=True)
    torch.testing.assert_close(one * valid, got.detach() * valid)
    block = grouped_completion_logprobs(
        wrapped, input_ids, attention_mask, t, 3, 2, 0.9, split_attention=False
    )
    assert tuple(wrapped.seen_kwargs[-1]["attention_mask"].shape) == (2, 1, 15, 15)
    torch.testing.assert_close(block * valid, got.detach() * valid, rtol=1e-5, atol=1e-5)
    block_grads = torch.autograd.grad((block * valid).sum(), params)
    for g, e in zip(block_grads, grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def tiny_deepseek_v3(attn: str) -> nn.Module:
    """DeepSeek-V3's real classes at toy size: multi-head latent attention and a routed MoE layer."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from tests.support.families import TINY_DEEPSEEK_V3

    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,  # layer 1 is the MoE layer
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=PAD,
        attn_implementation=attn,
        **TINY_DEEPSEEK_V3,
    )
    return DeepseekV3ForCausalLM(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_deepseek_v3_block_mask_forward_equals_one_unpadded_forward_per_row(attn: str) -> None:
    """DeepSeek-V3 takes no split attention, so the shared-prompt forward runs it with the block mask: each
    group's prompt once, its completions packed behind it, positions restarting per completion. Values and
    gradients (latent attention, the routed experts) equal one unpadded forward per row."""
    model = tiny_deepseek_v3(attn)
    assert not split_attention_supported(model)
    input_ids, attention_mask, prompts, completions = grouped_batch()
    t = 6
    wrapped = KwargsWrapper(model)
    got = completion_logprobs(
        wrapped, input_ids, attention_mask, input_ids[:, -t:], 0.9, batch_size=6, group_size=3
    )
    assert len(wrapped.seen_kwargs) == 1
    seen = wrapped.seen_kwargs[0]
    assert tuple(seen["input_ids"].shape) == (2, 15) and tuple(seen["attention_mask"].shape) == (2, 1, 15, 15)
    assert seen["position_ids"].tolist()[1] == [0, 1, 2, 3, 4, 5, 6, 3, 3, 4, 5, 0, 0, 0, 0]
    layer = model.model.layers[1]
    params = [
        model.model.embed_tokens.weight,
        layer.self_attn.kv_a_proj_with_mqa.weight,
        layer.mlp.gate.weight,
        *(expert.down_proj.weight for expert in layer.mlp.experts),
        model.lm_head.weight,
    ]
    valid = torch.zeros_like(got)
    for r, comp in enumerate(completions):
        valid[r, : len(comp)] = 1
    grads = torch.autograd.grad((got * valid).sum(), params, allow_unused=True)
    expected = [unpadded_logprobs(model, prompts[r], comp, 0.9) for r, comp in enumerate(completions)]
    for r, exp in enumerate(expected):
        torch.testing.assert_close(got[r, : len(exp)], exp, rtol=1e-5, atol=1e-5)
    expected_grads = torch.autograd.grad(sum(e.sum() for e in expected), params, allow_unused=True)
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g is None) == (e is None)  # an expert no token chose has no gradient either way
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    assert sum(g is not None for g in grads[3:-1]) >= 2  # the routed experts were reached


class OwnKernelAttention(nn.Module):
    """An attention layer whose forward is replaced (as a shardformer policy does) and always runs sdpa."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        inner.config = copy.copy(inner.config)
        inner.config._attn_implementation = "sdpa"
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_split_attention_only_where_the_layers_take_it_from_the_registry() -> None:
    model = tiny_llama("sdpa")
    input_ids, attention_mask, prompts, completions = grouped_batch()
    assert shared_prompt_plan(model, input_ids, attention_mask, 6, 3, 32).split_attention
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Recomputation in backward would run outside the forward that selects the split kernel.
    assert not split_attention_supported(model)
    plan = shared_prompt_plan(model, input_ids, attention_mask, 6, 3, 32)
    assert plan is not None and not plan.split_attention
    model.gradient_checkpointing_disable()
    model.model.layers[1].self_attn = OwnKernelAttention(model.model.layers[1].self_attn)
    assert not split_attention_supported(model)
    wrapped = KwargsWrapper(model)
    got = completion_logprobs(
        wrapped, input_ids, attention_mask, input_ids[:, -6:], 1.0, batch_size=6, group_size=3
    )
    assert tuple(wrapped.seen_kwargs[0]["attention_mask"].shape) == (2, 1, 15, 15)  # the block mask instead
    for r, comp in enumerate(completions):
        torch.testing.assert_close(
            got[r, : len(comp)], unpadded_logprobs(model, prompts[r], comp, 1.0), rtol=1e-5, atol=1e-5
        )
    # Forced onto such a model, the split forward refuses to return what the replaced layer computed.
    with pytest.raises(RuntimeError, match="split attention ran in 1 of 2 layers"):
        grouped_completion_logprobs(model, input_ids, attention_mask, 6, 3, 2, 1.0, split_attention=True)
    assert model.config._attn_implementation == "sdpa"


def test_shared_prompt_plan_falls_back_when_packing_is_invalid_or_dearer() -> None:
    model = tiny_llama("sdpa")
    input_ids, attention_mask, _, _ = grouped_batch()
    t = 6
    plan = shared_prompt_plan(model, input_ids, attention_mask, t, 3, 32)
    assert plan is not None and plan.groups_per_forward == 2 and 0 < plan.cost_ratio < 1
    assert (
        shared_prompt_plan(model, input_ids, attention_mask, t, 4, 32) is None
    )  # 6 rows are not groups of 4
    assert shared_prompt_plan(model, input_ids, attention_mask, t, 1, 32) is None
    other = input_ids.clone()
    other[1, -t - 1] = (other[1, -t - 1] + 1) % VOCAB  # row 1's prompt differs from row 0's
    assert shared_prompt_plan(model, other, attention_mask, t, 3, 32) is None
    model.config._attn_implementation = "flash_attention_2"  # takes no arbitrary mask
    assert shared_prompt_plan(model, input_ids, attention_mask, t, 3, 32) is None
    model.config._attn_implementation = "sdpa"
    no_keep = FullLogitsOnly(model)
    no_keep.config = (
        model.config
    )  # a forward without logits_to_keep: its config alone must not enable packing
    assert shared_prompt_plan(no_keep, input_ids, attention_mask, t, 3, 32) is None
    empty = attention_mask.clone()
    empty[2, -t:] = 0  # row 2 completed with no token at all
    assert shared_prompt_plan(model, input_ids, empty, t, 3, 32) is None
    with pytest.raises(ValueError, match="at least one token"):
        grouped_completion_logprobs(model, input_ids, empty, t, 3, 2, 1.0)
    # A one-token prompt with 8 long completions: with the block mask, (1 + 8 x 40)^2 attention pairs cost
    # more than the 7 prompt passes saved, so the plain forward is chosen, and it is what
    # completion_logprobs runs. Split attention computes the same pairs as the plain forward: packed.
    gen = torch.Generator().manual_seed(3)
    long_ids = torch.cat([torch.full((8, 1), 7), torch.randint(1, VOCAB, (8, 40), generator=gen)], dim=1)
    long_mask = torch.ones_like(long_ids)
    assert shared_prompt_plan(model, long_ids, long_mask, 40, 8, 64).split_attention
    model.model.layers[1].self_attn = OwnKernelAttention(
        model.model.layers[1].self_attn
    )  # no split attention
    assert shared_prompt_plan(model, long_ids, long_mask, 40, 8, 64) is None
    wrapped = KwargsWrapper(model)
    with torch.no_grad():
        completion_logprobs(wrapped, long_ids, long_mask, long_ids[:, 1:], 1.0, 64, group_size=8)
    assert wrapped.seen_kwargs[0]["attention_mask"].dim() == 2


class IgnoresLogitsToKeep(nn.Module):
    """Accepts logits_to_keep but returns every position (e.g. a replaced forward): must be an error."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0, use_cache=None):
        return self.module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def test_shared_prompt_forward_checks_the_model_kept_the_asked_logits() -> None:
    model = tiny_llama("sdpa")
    input_ids, attention_mask, _, _ = grouped_batch()
    with torch.no_grad(), pytest.raises(ValueError, match="asked for logits_to_keep=13"):
        completion_logprobs(
            IgnoresLogitsToKeep(model), input_ids, attention_mask, input_ids[:, -6:], 1.0, 6, group_size=3
        )


# --------------------------------------------------------------------------------------------------
# The sampler-vs-trainer log-prob gap
# --------------------------------------------------------------------------------------------------
def test_logprob_gap_sums_and_metrics() -> None:
    from trainer.rl.metrics import add_gap_sums, gap_metrics, logprob_gap_sums

    sampler = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]])
    # Gaps 0.005, 0.02, (masked: 7.0) | 0.0, 0.3, (masked padding). exp(0.02) - 1 > 1 %, exp(0.005) - 1 not.
    trainer = torch.tensor([[-1.005, -1.98, 4.0], [-0.5, -0.55, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    sums = logprob_gap_sums(sampler, trainer, mask)
    assert sums["gap_tokens"] == 4 and sums["gap_off_count"] == 2
    assert sums["gap_abs_sum"] == pytest.approx(0.325, abs=1e-12) and sums["gap_max"] == pytest.approx(0.3)
    half = logprob_gap_sums(sampler[:1], trainer[:1], mask[:1])
    both = add_gap_sums(add_gap_sums({}, half), logprob_gap_sums(sampler[1:], trainer[1:], mask[1:]))
    assert both == pytest.approx(sums)
    metrics = gap_metrics(both)
    assert metrics == pytest.approx(
        {"logprob_gap_mean": 0.325 / 4, "logprob_gap_max": 0.3, "logprob_gap_off_fraction": 0.5}
    )
    nothing = logprob_gap_sums(sampler, trainer, torch.zeros_like(mask))
    assert nothing["gap_max"] == 0.0 and gap_metrics(nothing) == {}  # no valid token: no metric, no NaN
    with pytest.raises(ValueError, match="same"):
        logprob_gap_sums(sampler, trainer[:, :2], mask)
