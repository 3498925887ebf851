"""Eval stage: accuracy of a model on a dataset split, by generating and scoring with the R1 reward.

    r1-grpo eval --model_name_or_path runs/local/grpo --dataset_name builtin:arith --output_dir runs/local/eval
    r1-grpo eval ... --num_samples_per_problem 8 --temperature 0.6     # pass@1 (mean), pass@8, maj@8

pass@1 is the mean correctness over the k samples of a problem (greedy decoding when k == 1 and
--temperature 0); pass@k = at least one of the k samples correct; maj@k = the most frequent extracted
answer is correct. Over several datasets (`--dataset_name aime24.jsonl,amc23.jsonl`) every metric is
reported over all problems and again per dataset, as `<metric>/<dataset>` (`pass@1/amc23.jsonl`). Writes
`predictions.jsonl` (one line per problem, with its `dataset`), `metrics.json` and, last, `r1_stage.json`
(stage `eval`, no weights; the same metrics) into --output_dir. Under torchrun each rank evaluates its
shard of problems; rank 0 gathers and writes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as td

from trainer.contract import output as contract
from trainer.lifecycle import barrier, open_stage, run_cli
from trainer.modeling import load_model_and_tokenizer
from trainer.r1.data import DataArgs
from trainer.r1.lengths import prompt_ids
from trainer.r1.prompt import PromptArgs, resolve_prompt
from trainer.r1.scoring import evaluate_model, summarize_by_dataset
from trainer.runtime import REPORT_TO, ArgsError, agree_on_setup

logger = logging.getLogger("r1_grpo.eval")


@dataclass
class EvalArgs:
    model_name_or_path: str = field(
        metadata={"help": "Hub id, local folder (e.g. the grpo stage's output) or builtin:tiny"}
    )
    output_dir: str = field(metadata={"help": "predictions.jsonl, metrics.json and r1_stage.json go here"})
    num_samples_per_problem: int = field(
        default=1, metadata={"help": "k: samples per problem (pass@k, maj@k)"}
    )
    inference_batch_size: int = field(
        default=64, metadata={"help": "Problems generated together (each with k samples)"}
    )
    max_prompt_length: int = field(
        default=1024,
        metadata={
            "help": "Prompts longer than this (tokens) are an error before generating (--skip_bad_rows "
            "drops them; they are counted in skipped_rows)"
        },
    )
    max_completion_length: int = field(default=256, metadata={"help": "New tokens per completion"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (only with k = 1)"})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling"})
    seed: int = field(default=1234, metadata={"help": "Sampling seed"})
    bf16: bool = field(default=False, metadata={"help": "Load the model in bfloat16"})
    tf32: bool = field(default=False, metadata={"help": "Allow TF32 matmuls"})
    report_to: str = field(default="jsonl", metadata={"help": "jsonl | wandb | none"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Unused at inference (accepted for symmetry)"}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager | sdpa | flash_attention_2"}
    )

    def validate(self) -> None:
        if self.num_samples_per_problem < 1:
            raise ArgsError("--num_samples_per_problem must be >= 1")
        if self.inference_batch_size < 1 or self.max_completion_length < 1:
            raise ArgsError("--inference_batch_size and --max_completion_length must be >= 1")
        if self.max_prompt_length < 1:
            raise ArgsError(f"--max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.temperature < 0:
            raise ArgsError("--temperature must be >= 0")
        if self.temperature == 0 and self.num_samples_per_problem > 1:
            raise ArgsError(
                "--num_samples_per_problem > 1 needs --temperature > 0 (greedy samples are identical)"
            )
        if not 0 < self.top_p <= 1:
            raise ArgsError("--top_p must be in (0, 1]")
        if self.report_to not in REPORT_TO:
            raise ArgsError(f"--report_to {self.report_to!r}: expected one of {', '.join(REPORT_TO)}")


# The stage's command line, in --help order; trainer/flag_table.py reads both (`make schema`).
PROG = "r1-grpo eval"
ARG_TYPES = (DataArgs, PromptArgs, EvalArgs)


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, ARG_TYPES, argv, run)


def run(data_args: DataArgs, prompt_args: PromptArgs, args: EvalArgs) -> int:
    dist, device, output_dir = open_stage(args.output_dir, args.seed, colossal=False)
    started = time.time()
    model, tokenizer = load_model_and_tokenizer(
        args.model_name_or_path, args, device, dtype=torch.bfloat16 if args.bf16 else None
    )
    # The evaluated stage's prompt settings (its r1_stage.json) unless a flag says otherwise.
    prompter = resolve_prompt(prompt_args, args.model_name_or_path, tokenizer)
    examples, report = data_args.load_eval()
    examples, prompts = prompt_ids(
        tokenizer,
        examples,
        max_prompt_length=args.max_prompt_length,
        skip=data_args.skip_bad_rows,
        report=report,
        prompter=prompter,
    )
    agree_on_setup()
    mine = examples[dist.rank :: dist.world_size]
    result = evaluate_model(
        model,
        tokenizer,
        mine,
        k=args.num_samples_per_problem,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_completion_length,
        batch_size=args.inference_batch_size,
        seed=args.seed + dist.rank,
        show_progress=dist.rank == 0,
        prompt_ids=prompts,
        prompter=prompter,
    )
    records = result.records
    if dist.world_size > 1:
        gathered: list[Any] = [None] * dist.world_size
        td.all_gather_object(gathered, records)
        # Undo the round-robin shard so predictions.jsonl follows the dataset order.
        records = [gathered[i % dist.world_size][i // dist.world_size] for i in range(len(examples))]
    if dist.rank == 0:
        metrics = summarize_by_dataset(records, args.num_samples_per_problem)
        metrics["skipped_rows"] = float(report.skipped)
        for source in report.sources:  # a mixture: each dataset's own count too
            metrics[f"skipped_rows/{source.dataset}"] = float(source.skipped)
        metrics["runtime_s"] = round(time.time() - started, 2)
        contract.atomic_write_text(
            output_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records)
        )
        contract.atomic_write_json(output_dir / "metrics.json", metrics)
        if args.report_to == "wandb":
            from trainer.tracking import open_run

            run = open_run(output_dir, "eval", None, {**vars(data_args), **vars(args)})
            run.log(metrics)
            run.finish()
        contract.write_manifest(
            output_dir,
            "eval",
            steps=0,
            metrics=metrics,
            inputs={
                "model_name_or_path": args.model_name_or_path,
                "dataset_name": data_args.dataset_name,
                "split": data_args.dataset_test_split,
                "args": {**vars(data_args), **vars(prompt_args), **vars(args)},
                "prompt": prompter.settings.to_record(),
            },
        )
        logger.info("eval: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        print(json.dumps(metrics, indent=2))
    barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
