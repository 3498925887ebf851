"""A GRPO rollout: the prompt stream, sampled and scored groups, packed into one padded training batch.

Each group is one prompt with its G completions, as the sampler returns them; the batch keeps the groups
consecutive (rows ``r`` with the same ``r // G`` share a prompt), which the packed forward and the
advantages rely on. Notation as in :mod:`trainer.rl.objective`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td

from trainer.rl.objective import informative_groups
from trainer.rl.sampling import SampleBatch


class PromptStream:
    """This rank's endless, epoch-shuffled stream of prompts; `position` is all resume needs."""

    def __init__(self, examples: Sequence[Any], seed: int, rank: int, world_size: int, position: int = 0):
        self.examples, self.seed, self.rank, self.world = examples, seed, rank, world_size
        self.position = position
        self._order_epoch, self._order = -1, []

    def take(self, n: int) -> list[Any]:
        out = []
        for _ in range(n):
            index = self.position * self.world + self.rank  # interleaved shards of one global order
            epoch, offset = divmod(index, len(self.examples))
            if epoch != self._order_epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order, self._order_epoch = (
                    torch.randperm(len(self.examples), generator=g).tolist(),
                    epoch,
                )
            out.append(self.examples[self._order[offset]])
            self.position += 1
        return out

    def all_positions(self) -> list[int]:
        """Every rank's position, in rank order (a collective: every rank calls it)."""
        positions: list[Any] = [None] * self.world
        if td.is_initialized():
            td.all_gather_object(positions, self.position)
        else:
            positions = [self.position]
        return positions


@dataclass
class Rollout:
    """One optimizer step's samples on this rank: rows are grouped consecutively, G per prompt."""

    input_ids: torch.Tensor  # [N, P+T] left-padded prompt + right-padded completion
    attention_mask: torch.Tensor  # [N, P+T]
    completion_ids: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T] float; 0 on padding (and on truncated rows if masked)
    # [N, T] from the sampler (old-policy log-probs with --old_logprobs sampler)
    sample_logprobs: torch.Tensor
    advantages: torch.Tensor  # [N]
    rewards: torch.Tensor  # [N]
    temperature: float
    texts: list[str]
    answers: list[str]
    stats: dict[str, float]
    ref_logprobs: torch.Tensor | None = None
    # [N, T] the first training pass's own log-probs (detached): old-policy log-probs of the later passes
    train_logprobs: torch.Tensor | None = None


@torch.no_grad()
def sample_scored_groups(
    sample: Callable[[list[list[int]]], SampleBatch],
    decode: Callable[[torch.Tensor], str],
    score: Callable[[list[str], list[str]], list[float]],
    prompts: list[list[int]],
    answers: list[str],
    *,
    group_size: int,
    batch_size: int,
    timings: dict[str, float],
) -> list[dict[str, Any]]:
    """``group_size`` samples of each prompt, ``batch_size`` prompts per ``sample`` call, decoded and
    scored against the prompt's answer; one dict per group (lists, so groups can be filtered). Adds the
    seconds spent to ``timings["generate_s"]`` and ``timings["score_s"]``."""
    groups = []
    G = group_size
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        t0 = time.time()
        out = sample(chunk)
        t1 = time.time()
        lengths = out.completion_mask.sum(1).tolist()
        texts = [decode(out.completion_ids[r, : lengths[r]]) for r in range(len(lengths))]
        chunk_answers = [a for a in answers[start : start + batch_size] for _ in range(G)]
        total = score(texts, chunk_answers)
        timings["generate_s"] += t1 - t0
        timings["score_s"] += time.time() - t1
        for i, prompt in enumerate(chunk):
            rows = slice(i * G, (i + 1) * G)
            groups.append(
                {
                    "prompt": prompt,
                    "completions": [out.completion_ids[r, : lengths[r]] for r in range(i * G, (i + 1) * G)],
                    "logprobs": [out.logprobs[r, : lengths[r]] for r in range(i * G, (i + 1) * G)],
                    "truncated": out.truncated[rows].tolist(),
                    "texts": texts[rows],
                    "answers": chunk_answers[rows],
                    "rewards": total[rows],
                }
            )
    return groups


def keep_informative(
    groups: list[dict[str, Any]],
    n_groups: int,
    draw_more: Callable[[], list[dict[str, Any]]],
    max_rounds: int,
) -> list[dict[str, Any]]:
    """Dynamic sampling (DAPO): keep the groups whose rewards are not all equal, refilling from
    ``draw_more()`` up to ``max_rounds`` times, until there are ``n_groups``. When nothing is informative
    at all, the original groups (zero advantages, only a KL term acts on them)."""
    kept = [g for g in groups if len(set(g["rewards"])) > 1]
    rounds = 0
    while len(kept) < n_groups and rounds < max_rounds:
        kept += [g for g in draw_more() if len(set(g["rewards"])) > 1]
        rounds += 1
    return kept[:n_groups] or groups


def pack_groups(
    groups: Sequence[dict[str, Any]],
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    temperature: float,
    *,
    group_size: int,
    pad_token_id: int,
    mask_truncated: bool,
    device: Any,
) -> Rollout:
    """The rollout of ``groups`` (dicts with ``prompt`` ids, and per completion: ``completions`` id
    tensors, the sampler's ``logprobs``, ``truncated``, ``texts``, ``answers``), whose ``rewards`` and
    ``advantages`` [N] follow the same row order. ``stats`` holds this rank's sums for the step metrics."""
    rows = [
        (g["prompt"], c, lp, tr)
        for g in groups
        for c, lp, tr in zip(g["completions"], g["logprobs"], g["truncated"], strict=True)
    ]
    P = max(len(p) for p, _, _, _ in rows)
    T = max(1, max(len(c) for _, c, _, _ in rows))
    N = len(rows)
    input_ids = torch.full((N, P + T), pad_token_id, dtype=torch.long)
    attention = torch.zeros((N, P + T), dtype=torch.long)
    completion_mask = torch.zeros((N, T), dtype=torch.float32)
    sample_logprobs = torch.zeros((N, T), dtype=torch.float32)
    for i, (prompt, completion, logprobs, truncated) in enumerate(rows):
        input_ids[i, P - len(prompt) : P] = torch.tensor(prompt)
        attention[i, P - len(prompt) : P] = 1
        n = len(completion)
        input_ids[i, P : P + n] = completion.cpu()
        attention[i, P : P + n] = 1
        sample_logprobs[i, :n] = logprobs.float().cpu()
        if not (truncated and mask_truncated):
            completion_mask[i, :n] = 1.0
    completion_ids = input_ids[:, P:]
    lengths = torch.tensor([len(c) for _, c, _, _ in rows], dtype=torch.float32)
    truncated = torch.tensor([tr for _, _, _, tr in rows], dtype=torch.float32)
    stats = {
        "reward_sum": float(rewards.sum()),
        "reward_sq_sum": float((rewards**2).sum()),
        "rows": float(N),
        "length_sum": float(lengths.sum()),
        "length_max": float(lengths.max()),
        "truncated_sum": float(truncated.sum()),
        "informative_groups": float(informative_groups(rewards, group_size).sum()),
        "groups": float(len(groups)),
        "entropy_sum": float(-(sample_logprobs * (sample_logprobs != 0)).sum()),
        "generated_tokens": float(lengths.sum()),
    }
    return Rollout(
        input_ids.to(device),
        attention.to(device),
        completion_ids.to(device),
        completion_mask.to(device),
        sample_logprobs.to(device),
        advantages.to(device),
        rewards,
        temperature,
        [t for g in groups for t in g["texts"]],
        [a for g in groups for a in g["answers"]],
        stats,
    )


def select_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The rollout's training tensors for ``rows`` (whole groups, in the given order)."""
    return dataclasses.replace(
        rollout,
        input_ids=rollout.input_ids[rows],
        attention_mask=rollout.attention_mask[rows],
        completion_ids=rollout.completion_ids[rows],
        completion_mask=rollout.completion_mask[rows],
        sample_logprobs=rollout.sample_logprobs[rows],
        advantages=rollout.advantages[rows],
        train_logprobs=None if rollout.train_logprobs is None else rollout.train_logprobs[rows],
    )


def rows_to_train(
    rollout: Rollout,
    chunk: int,
    *,
    group_size: int,
    skip_zero_advantage: bool,
) -> torch.Tensor | None:
    """Row indices the policy update runs forward/backward on, ``chunk`` rows at a time (None: every row,
    in order).

    A group whose advantages are all zero (equal rewards) contributes exactly zero to the loss and the
    gradient when there is no KL term (``skip_zero_advantage``: beta 0): -min(rho * 0, clip(rho) * 0) = 0
    for any ratio rho. Its rows are skipped; the loss keeps its normalisation over all rows, so the update
    is the same. At least one group is kept, so the gradients are always defined (zeros when nothing is
    informative). The ranks' chunk counts are matched afterwards by :func:`plan_chunks`.
    """
    G = group_size
    N = rollout.advantages.numel()
    if not skip_zero_advantage or rollout.ref_logprobs is not None or N % G or chunk % G:
        return None
    informative = rollout.advantages.view(-1, G).ne(0).any(dim=1).cpu()
    groups = informative.nonzero().flatten()  # in order: the length order is kept
    if groups.numel() == informative.numel():
        return None
    if groups.numel() == 0:
        groups = torch.tensor([0])
    return (groups[:, None] * G + torch.arange(G)).flatten().to(rollout.advantages.device)


def plan_chunks(n_rows: int, chunk: int, max_over_ranks: Callable[[int], int] | None = None) -> int:
    """How many forward/backward chunks of ``chunk`` rows this rank runs over its ``n_rows`` rows: its own
    ``ceil(n_rows / chunk)`` (at least 1), raised to the most any rank needs (``max_over_ranks``, a
    collective every rank calls). Ranks' row counts differ (dynamic sampling keeps what each drew, the
    zero-advantage skip what each can skip), but every backward pass of ZeRO and Gemini is a collective: a
    rank with fewer chunks of its own runs the rest as zero-weight chunks, so none waits forever."""
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 1:
        raise ValueError(f"n_rows must be a positive int, got {n_rows!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    n_chunks = -(-n_rows // chunk)
    return n_chunks if max_over_ranks is None else max(n_chunks, max_over_ranks(n_chunks))
