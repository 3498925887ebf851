"""What a GRPO step reports: its metrics reduced over the ranks (one ``metrics.jsonl`` record), sample
completions (``samples.jsonl``) and the held-out eval (greedy accuracy and format rate, overall and per
dataset). Read by ``trainer.grpo``'s loop; kept apart so the recipe reads as the step itself."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as td

from trainer.lifecycle import Stage
from trainer.r1 import module_rewards
from trainer.r1.data import Example
from trainer.r1.prompt import Prompter
from trainer.r1.scoring import evaluate_model
from trainer.rl.logprobs import unwrap_model
from trainer.rl.metrics import GAP_SUM_KEYS, gap_metrics
from trainer.rl.rollout import Rollout
from trainer.runtime import all_reduce_

if TYPE_CHECKING:  # the recipe imports this module: its args type only for annotations
    from trainer.grpo import GRPOArgs

logger = logging.getLogger("r1_grpo.grpo")


def reduce_step_metrics(
    rollout: Rollout, train_stats: dict[str, float], timings: dict[str, float], dist
) -> dict[str, float]:
    s = rollout.stats
    keys = [
        "rows",
        "reward_sum",
        "reward_sq_sum",
        "format_sum",
        "accuracy_sum",
        "length_sum",
        "truncated_sum",
        "zero_std_sum",
        "groups",
        "entropy_sum",
        "generated_tokens",
        *GAP_SUM_KEYS,
        *sorted(k for k in s if k.startswith("module:")),  # the same --reward_module names on every rank
    ]
    weighted = ["kl", "clip_ratio", "clip_ratio_low", "clip_ratio_high", "ratio_mean"]
    vec = torch.tensor(
        [s.get(k, 0.0) for k in keys]
        + [train_stats.get(k, 0.0) * train_stats["tokens"] for k in weighted]
        + [train_stats["tokens"], train_stats["loss"], train_stats["trained_rows"]],
        dtype=torch.float64,
    )
    maxes = torch.tensor(
        [
            s["length_max"],
            s["generate_s"],
            s["score_s"],
            timings.get("train_s", 0.0),
            timings.get("rollout_s", 0.0),
            s.get("gap_max", 0.0),
            train_stats["chunks"],
            train_stats["trained_rows"],
        ],
        dtype=torch.float64,
    )
    # Per-rank counts that differ between ranks under dynamic sampling (rows) and must not (chunks).
    mins = torch.tensor([train_stats["chunks"], train_stats["trained_rows"]], dtype=torch.float64)
    all_reduce_(vec)
    all_reduce_(maxes, op=td.ReduceOp.MAX)
    all_reduce_(mins, op=td.ReduceOp.MIN)
    v = dict(zip(keys + weighted + ["tokens", "loss", "trained_rows"], vec.tolist(), strict=True))
    n = max(v["rows"], 1.0)
    mean = v["reward_sum"] / n
    out = {
        "loss": v["loss"] / dist.world_size,
        "reward_mean": mean,
        "reward_std": math.sqrt(max(v["reward_sq_sum"] / n - mean * mean, 0.0)),
        "format_rate": v["format_sum"] / n,
        "accuracy": v["accuracy_sum"] / n,
        "completion_length_mean": v["length_sum"] / n,
        "completion_length_max": maxes[0].item(),
        "truncated_fraction": v["truncated_sum"] / n,
        "zero_std_fraction": v["zero_std_sum"] / dist.world_size,
        "entropy": v["entropy_sum"] / max(v["length_sum"], 1.0),
        "generate_s": maxes[1].item(),
        "score_s": maxes[2].item(),
        "train_s": maxes[3].item(),
        "rollout_s": maxes[4].item(),
        "trained_fraction": v["trained_rows"] / n,  # rows the update ran forward/backward on (rows_to_train)
        "rank_chunks_min": mins[0].item(),
        "rank_chunks_max": maxes[6].item(),
        "rank_trained_rows_min": mins[1].item(),
        "rank_trained_rows_max": maxes[7].item(),
    }
    out.update(gap_metrics({**{k: v[k] for k in GAP_SUM_KEYS}, "gap_max": maxes[5].item()}))
    out["rollout_tokens_per_s"] = (
        v["generated_tokens"] / max(out["generate_s"], 1e-9) if out["generate_s"] > 0 else 0.0
    )
    for k in weighted:
        if train_stats.get(k) is not None and k in train_stats:
            out[k] = v[k] / max(v["tokens"], 1.0)
    out.update(module_rewards.step_metrics(v))
    return out


def log_samples(output_dir: Path, step: int, rollout: Rollout, n: int, dist) -> None:
    if dist.rank != 0 or n <= 0:
        return
    # Rows are sorted by group length: spread the picks from the shortest group to the longest.
    total = len(rollout.texts)
    picks = sorted({round(k * (total - 1) / max(n - 1, 1)) for k in range(min(n, total))})
    samples = [
        {
            "step": step,
            "answer": rollout.answers[i],
            "reward": float(rollout.rewards[i]),
            "advantage": float(rollout.advantages[i]),
            "completion": rollout.texts[i],
        }
        for i in picks
    ]
    with (output_dir / "samples.jsonl").open("a", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    logger.info(
        "step %d sample (reward %.1f, answer %s): %r",
        step,
        samples[0]["reward"],
        samples[0]["answer"],
        samples[0]["completion"][:300],
    )


def log_eval(stage: Stage, result: dict[str, float]) -> None:
    """One metrics record and one log line per evaluation."""
    stage.log(result)
    logger.info(
        "eval at step %d: accuracy %.4f, format rate %.4f",
        stage.step,
        result["eval_accuracy"],
        result["eval_format_rate"],
    )


def evaluate_sharded(
    model,
    tokenizer,
    examples: list[Example],
    args: GRPOArgs,
    dist,
    prompts: dict[str, list[int]] | None = None,
    prompter: Prompter | None = None,
) -> dict[str, float]:
    """Greedy accuracy and format rate on the eval split, each rank a shard, reduced to global means, and
    per dataset (``eval_accuracy/<dataset>``) when the split comes from several (``prompts``: the token
    ids of the examples' prompts, from :func:`trainer.r1.lengths.prompt_ids`)."""
    unwrapped = unwrap_model(model)
    mine = examples[dist.rank :: dist.world_size]
    result = evaluate_model(
        unwrapped,
        tokenizer,
        mine,
        k=1,
        temperature=0.0,
        max_new_tokens=args.max_completion_length,
        batch_size=args.inference_batch_size * 4,
        seed=args.seed,
        prompt_ids=prompts,
        prompter=prompter,
    )
    names = list(dict.fromkeys(ex.dataset for ex in examples))  # every rank's list: all the examples
    sums = torch.zeros(len(names), 3, dtype=torch.float64)  # accuracy, format rate, problems per dataset
    for rec in result.records:
        row = sums[names.index(rec["dataset"])]
        row += torch.tensor([rec["pass@1"], sum(rec["format_ok"]) / len(rec["format_ok"]), 1.0])
    sums = all_reduce_(sums)
    out: dict[str, float] = {}
    for suffix, (acc, fmt, n) in [("", sums.sum(0).tolist())] + [
        (f"/{name}", row) for name, row in zip(names, sums.tolist(), strict=True) if len(names) > 1
    ]:
        out[f"eval_accuracy{suffix}"] = acc / max(n, 1.0)
        out[f"eval_format_rate{suffix}"] = fmt / max(n, 1.0)
    return out
