"""Eval stage: accuracy of a model on a dataset split, by generating and scoring with the R1 reward.

    r1-grpo eval --model_name_or_path runs/local/grpo --dataset_name builtin:arith --output_dir runs/local/eval
    r1-grpo eval ... --num_samples_per_problem 8 --temperature 0.6     # pass@1 (mean), pass@8, maj@8

pass@1 is the mean correctness over the k samples of a problem (greedy decoding when k == 1 and
--temperature 0); pass@k = at least one of the k samples correct; maj@k = the most frequent extracted
answer is correct. Writes `predictions.jsonl` (one line per problem), `metrics.json` and, last,
`r1_stage.json` (stage `eval`, no weights) into --output_dir. Under torchrun each rank evaluates its
shard of problems; rank 0 gathers and writes.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as td

from trainer import checkpoint as ckpt
from trainer.data import DataArgs, DataError, Example, format_prompt, load_examples
from trainer.rewards import answers_equal, check_format, extract_answer, normalize_answer, reward_function
from trainer.runtime import (
    ArgsError,
    init_distributed,
    load_model_and_tokenizer,
    parse_args,
    progress,
    setup_logging,
)
from trainer.sampling import sample_groups

logger = logging.getLogger("r1_grpo.eval")


@dataclass
class EvalArgs:
    model_name_or_path: str = field(metadata={"help": "Hub id, local folder (e.g. the grpo stage's output) or builtin:tiny"})
    output_dir: str = field(metadata={"help": "predictions.jsonl, metrics.json and r1_stage.json go here"})
    num_samples_per_problem: int = field(default=1, metadata={"help": "k: samples per problem (pass@k, maj@k)"})
    inference_batch_size: int = field(default=64, metadata={"help": "Problems generated together (each with k samples)"})
    max_completion_length: int = field(default=256, metadata={"help": "New tokens per completion"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (only with k = 1)"})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling"})
    seed: int = field(default=1234, metadata={"help": "Sampling seed"})
    bf16: bool = field(default=False, metadata={"help": "Load the model in bfloat16"})
    tf32: bool = field(default=False, metadata={"help": "Allow TF32 matmuls"})
    report_to: str = field(default="jsonl", metadata={"help": "jsonl | wandb | none"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Unused at inference (accepted for symmetry)"})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager | sdpa | flash_attention_2"})

    def validate(self) -> None:
        if self.num_samples_per_problem < 1:
            raise ArgsError("--num_samples_per_problem must be >= 1")
        if self.inference_batch_size < 1 or self.max_completion_length < 1:
            raise ArgsError("--inference_batch_size and --max_completion_length must be >= 1")
        if self.temperature < 0:
            raise ArgsError("--temperature must be >= 0")
        if self.temperature == 0 and self.num_samples_per_problem > 1:
            raise ArgsError("--num_samples_per_problem > 1 needs --temperature > 0 (greedy samples are identical)")
        if not 0 < self.top_p <= 1:
            raise ArgsError("--top_p must be in (0, 1]")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    records: list[dict[str, Any]]


def stop_sequences(tokenizer) -> list[list[int]]:
    ids = tokenizer.encode("</answer>", add_special_tokens=False)
    return [ids] if ids else []


def majority_answer(answers: list[str | None]) -> str | None:
    """Most frequent extracted answer (by normalised text; ties go to the earliest)."""
    present = [a for a in answers if a is not None]
    if not present:
        return None
    counts = Counter(normalize_answer(a) for a in present)
    best = max(counts.values())
    return next(a for a in present if counts[normalize_answer(a)] == best)


@torch.no_grad()
def evaluate_model(model, tokenizer, examples: list[Example], *, k: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                   max_new_tokens: int = 256, batch_size: int = 64, seed: int = 1234, show_progress: bool = False) -> EvalResult:
    """Generate k completions per example and score them; single process (callers shard)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    eos = [tokenizer.eos_token_id]
    stops = stop_sequences(tokenizer)
    records: list[dict[str, Any]] = []
    bar = progress(len(examples), 0, "eval", ckpt.Dist()) if show_progress else None
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tokenizer(format_prompt(tokenizer, ex.problem), add_special_tokens=False)["input_ids"] for ex in chunk]
        out = sample_groups(model, prompts, num_generations=k, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, eos_token_ids=eos, stop_sequences=stops, pad_token_id=tokenizer.pad_token_id,
                            generator=generator)
        lengths = out.completion_mask.sum(1).tolist()
        for i, ex in enumerate(chunk):
            rows = range(i * k, (i + 1) * k)
            texts = [tokenizer.decode(out.completion_ids[r, : lengths[r]], skip_special_tokens=True) for r in rows]
            rewards = [reward_function(t, ex.answer) for t in texts]
            answers = [extract_answer(t) for t in texts]
            correct = [r == 10.0 for r in rewards]
            majority = majority_answer(answers)
            records.append({
                "source": ex.source,
                "problem": ex.problem,
                "answer": ex.answer,
                "completions": texts,
                "rewards": rewards,
                "pass@1": sum(correct) / k,
                f"pass@{k}": float(any(correct)),
                f"maj@{k}": float(majority is not None and answers_equal(majority, ex.answer)),
                "format_ok": [check_format(t) for t in texts],
                "completion_tokens": [lengths[r] for r in rows],
                "truncated": [bool(out.truncated[r]) for r in rows],
            })
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return EvalResult(summarize(records, k), records)


def summarize(records: list[dict[str, Any]], k: int) -> dict[str, float]:
    n = max(1, len(records))
    samples = [(f, r, t, tr) for rec in records for f, r, t, tr in
               zip(rec["format_ok"], rec["rewards"], rec["completion_tokens"], rec["truncated"], strict=True)]
    m = max(1, len(samples))
    metrics = {
        "num_problems": float(len(records)),
        "accuracy": sum(rec["pass@1"] for rec in records) / n,
        "pass@1": sum(rec["pass@1"] for rec in records) / n,
        "format_rate": sum(s[0] for s in samples) / m,
        "mean_reward": sum(s[1] for s in samples) / m,
        "mean_completion_tokens": sum(s[2] for s in samples) / m,
        "truncated_rate": sum(s[3] for s in samples) / m,
    }
    if k > 1:
        metrics[f"pass@{k}"] = sum(rec[f"pass@{k}"] for rec in records) / n
        metrics[f"maj@{k}"] = sum(rec[f"maj@{k}"] for rec in records) / n
    return metrics


def main(argv: list[str] | None = None) -> int:
    data_args, args = parse_args((DataArgs, EvalArgs), argv, prog="r1-grpo eval")
    try:
        args.validate()
        return run(data_args, args)
    except (ArgsError, DataError, ckpt.StageOutputError) as e:
        print(f"r1-grpo eval: error: {e}", flush=True)
        return 2


def run(data_args: DataArgs, args: EvalArgs) -> int:
    dist, device = init_distributed(args.seed, colossal=False)
    setup_logging(dist)
    output_dir = Path(args.output_dir)
    if dist.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.invalidate_manifest(output_dir)
    started = time.time()
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args, device,
                                                dtype=torch.bfloat16 if args.bf16 else None)
    examples, report = load_examples(data_args.dataset_name, data_args.dataset_test_split, config=data_args.dataset_config,
                                     skip_bad_rows=data_args.skip_bad_rows, max_samples=data_args.max_eval_samples)
    mine = examples[dist.rank :: dist.world_size]
    result = evaluate_model(model, tokenizer, mine, k=args.num_samples_per_problem, temperature=args.temperature,
                            top_p=args.top_p, max_new_tokens=args.max_completion_length, batch_size=args.inference_batch_size,
                            seed=args.seed + dist.rank, show_progress=dist.rank == 0)
    records = result.records
    if dist.world_size > 1:
        gathered: list[Any] = [None] * dist.world_size
        td.all_gather_object(gathered, records)
        # Undo the round-robin shard so predictions.jsonl follows the dataset order.
        records = [gathered[i % dist.world_size][i // dist.world_size] for i in range(len(examples))]
    if dist.rank == 0:
        metrics = summarize(records, args.num_samples_per_problem)
        metrics["skipped_rows"] = float(report.skipped)
        metrics["runtime_s"] = round(time.time() - started, 2)
        ckpt.atomic_write_text(output_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        ckpt.atomic_write_json(output_dir / "metrics.json", metrics)
        ckpt.write_manifest(output_dir, "eval", steps=0, metrics=metrics,
                            inputs={"model_name_or_path": args.model_name_or_path, "dataset_name": data_args.dataset_name,
                                    "split": data_args.dataset_test_split, "args": {**vars(data_args), **vars(args)}})
        logger.info("eval: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        print(json.dumps(metrics, indent=2))
    if td.is_initialized():
        td.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
