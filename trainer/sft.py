"""SFT stage: teach the base model the `<think>…</think><answer>…</answer>` format on reference reasoning.

    torchrun --nproc_per_node=2 -m trainer.sft --model_name_or_path builtin:tiny \\
        --dataset_name builtin:arith --output_dir runs/local/sft --num_train_epochs 1 --plugin ddp

Loss is next-token cross-entropy on completion tokens only, averaged over every completion token of the
optimizer step (all micro-batches, all ranks), so gradient accumulation and the number of processes
do not change the objective. Cosine schedule with warmup, gradient clipping, eval loss every
`--eval_steps`, `checkpoint-<step>/` every `--save_steps`, automatic resume, SIGTERM-safe, and at the end
the final model plus `r1_stage.json` in `--output_dir` (the shared stage lifecycle, `trainer/lifecycle.py`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as td

from trainer.lifecycle import Stage, run_cli
from trainer.modeling import load_model_and_tokenizer
from trainer.r1.data import DataArgs, LoadReport
from trainer.r1.lengths import sft_sequences
from trainer.r1.prompt import PromptArgs, Prompter, resolve_prompt
from trainer.rl.head_logprobs import (
    FUSED_HEAD_PLUGINS,
    chunk_rows_for,
    final_hidden_states,
    linear_token_logprobs,
    lm_head_of,
)
from trainer.rl.logprobs import token_logprobs
from trainer.runtime import (
    PREEMPTED_EXIT_CODE,
    TrainingArgs,
    agree_on_setup,
    all_reduce_,
    autocast,
    total_optimizer_steps,
)

logger = logging.getLogger("r1_grpo.sft")
IGNORE_INDEX = -100


@dataclass
class SFTArgs(TrainingArgs):
    max_seq_length: int = field(
        default=1024,
        metadata={
            "help": "Longest prompt+completion in tokens; longer rows are truncated (logged), a prompt that "
            "leaves no room for the completion is an error (--skip_bad_rows drops it)"
        },
    )


@dataclass
class TokenizedRow:
    input_ids: list[int]
    prompt_len: int  # tokens before the completion; only later positions are trained on


def tokenize_examples(
    examples,
    tokenizer,
    max_seq_length: int,
    skip: bool = False,
    report: LoadReport | None = None,
    prompter: Prompter | None = None,
) -> tuple[list[TokenizedRow], int]:
    """Prompt and completion (+EOS) ids (``prompter``'s prompt and target), checked against
    --max_seq_length (trainer.r1.lengths.sft_sequences); returns rows and #truncated."""
    sequences = sft_sequences(
        tokenizer, examples, max_seq_length=max_seq_length, skip=skip, report=report, prompter=prompter
    )
    return [TokenizedRow(ids, prompt_len) for ids, prompt_len in sequences.rows], len(sequences.truncated)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_micro_batches(
    order: list[int], step_in_epoch: int, accum: int, global_micro: int
) -> list[list[int]]:
    """Row indices of each micro-batch (all ranks) of one optimizer step; a pure function of the step."""
    first = step_in_epoch * accum
    return [order[(first + m) * global_micro : (first + m + 1) * global_micro] for m in range(accum)]


def collate(rows: list[TokenizedRow], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[i, :n] = torch.tensor(r.input_ids)
        attention[i, :n] = 1
        labels[i, r.prompt_len : n] = input_ids[i, r.prompt_len : n]
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention.to(device),
        "labels": labels.to(device),
    }


def completion_loss_sum(
    model, batch: dict[str, torch.Tensor], fused: bool = True, chunk_rows: int | None = None
) -> torch.Tensor:
    """Summed next-token cross-entropy over completion tokens (the caller normalises), in float32.

    ``fused`` (and a model :func:`lm_head_of` understands): the body runs to its last hidden states and
    the lm-head + cross-entropy run on completion positions only, a chunk of rows at a time, so no
    [B, L, V] logits exist. Otherwise the model's logits, read in chunks (:func:`token_logprobs`) with
    no float32 copy of them. ``chunk_rows``: rows of logits per chunk (default: ~256 MiB of them). Both equal ``cross_entropy(logits.float(), labels, reduction="sum")``."""
    targets = batch["labels"][:, 1:]
    trained = targets != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    head = lm_head_of(model) if fused else None
    if head is not None:
        body, weight = head
        hidden = final_hidden_states(model, body, **inputs)[:, :-1][trained]
        return -linear_token_logprobs(hidden, weight, targets[trained], chunk_rows=chunk_rows).sum()
    logits = model(**inputs).logits[:, :-1]
    rows = chunk_rows_for(logits.shape[-1]) if chunk_rows is None else chunk_rows
    logprobs = token_logprobs(logits, targets.masked_fill(~trained, 0), chunk_rows=rows)
    return -torch.where(trained, logprobs, 0.0).sum()


def n_completion_tokens(rows: list[TokenizedRow]) -> int:
    return sum(len(r.input_ids) - 1 - max(r.prompt_len - 1, 0) for r in rows)


@torch.no_grad()
def eval_loss(model, rows: list[TokenizedRow], args: SFTArgs, dist, pad_id: int, device) -> float:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    mine = rows[dist.rank :: dist.world_size]
    for i in range(0, len(mine), args.per_device_eval_batch_size):
        chunk = mine[i : i + args.per_device_eval_batch_size]
        with autocast(args, device):
            batch = collate(chunk, pad_id, device)
            total[0] += completion_loss_sum(model, batch, args.plugin in FUSED_HEAD_PLUGINS).double().cpu()
        total[1] += n_completion_tokens(chunk)
    if td.is_initialized():
        t = total.to(device)
        td.all_reduce(t)
        total = t.cpu()
    model.train()
    return float(total[0] / total[1].clamp(min=1))


# The stage's command line, in --help order; trainer/flag_table.py reads both (`make schema`).
PROG = "r1-grpo sft"
ARG_TYPES = (DataArgs, PromptArgs, SFTArgs)


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, ARG_TYPES, argv, train)


def train(data_args: DataArgs, prompt_args: PromptArgs, args: SFTArgs) -> int:
    stage = Stage.start("sft", data_args, args, prompt_args)
    dist, device = stage.dist, stage.device
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args, device)
    stage.prompt = prompter = resolve_prompt(prompt_args, args.model_name_or_path, tokenizer)
    train_examples, report = data_args.load_train(seed=args.seed, require_solutions=True)
    skip = data_args.skip_bad_rows
    train_rows, truncated = tokenize_examples(
        train_examples, tokenizer, args.max_seq_length, skip, report, prompter
    )
    eval_rows: list[TokenizedRow] = []
    if args.evaluation_strategy != "no":
        eval_examples, eval_report = data_args.load_eval(require_solutions=True)
        eval_rows, _ = tokenize_examples(
            eval_examples, tokenizer, args.max_seq_length, skip, eval_report, prompter
        )
    logger.info(
        "train rows: %d (skipped %d bad, truncated %d); eval rows: %d",
        len(train_rows),
        report.skipped,
        truncated,
        len(eval_rows),
    )

    global_micro = args.per_device_train_batch_size * dist.world_size
    micro_per_epoch = len(train_rows) // global_micro
    total_steps = total_optimizer_steps(args, micro_per_epoch)
    steps_per_epoch = max(1, micro_per_epoch // args.gradient_accumulation_steps)
    agree_on_setup()
    model = stage.boost(model, total_steps)
    stage.resume()
    pad_id = tokenizer.pad_token_id
    last_eval, evaluated_at = math.nan, -1
    window_loss, window_tokens, window_start = 0.0, 0, time.time()

    fused = args.plugin in FUSED_HEAD_PLUGINS and lm_head_of(model) is not None
    if fused:
        logger.info("loss: lm-head + cross-entropy on completion tokens only, in chunks (no full logits)")
    else:
        logger.info("loss: the model's logits (no fused lm-head for --plugin %s or this model)", args.plugin)
    model.train()
    while stage.step < total_steps:
        epoch, step_in_epoch = divmod(stage.step, steps_per_epoch)
        order = epoch_order(len(train_rows), args.seed, epoch)
        micro_batches = step_micro_batches(
            order, step_in_epoch, args.gradient_accumulation_steps, global_micro
        )
        # Every rank knows the whole optimizer step's rows, so the token normaliser needs no all-reduce.
        step_tokens = max(1, n_completion_tokens([train_rows[i] for mb in micro_batches for i in mb]))
        for micro, indices in enumerate(micro_batches):
            global_rows = [train_rows[i] for i in indices]
            local_rows = global_rows[dist.rank :: dist.world_size]
            batch = collate(local_rows, pad_id, device)
            last_micro = micro == len(micro_batches) - 1
            with stage.no_sync(not last_micro and args.plugin == "ddp"):
                with autocast(args, device):
                    loss_sum = completion_loss_sum(model, batch, fused)
                # DDP averages gradients over ranks, hence the world-size factor.
                stage.backward(loss_sum * dist.world_size / step_tokens)
            window_loss += loss_sum.item()
            window_tokens += n_completion_tokens(local_rows)
        step = stage.optimizer_step()

        if (
            args.evaluation_strategy == "steps"
            and step % args.eval_steps == 0
            or (args.evaluation_strategy == "epoch" and step % steps_per_epoch == 0)
        ):
            last_eval, evaluated_at = eval_loss(model, eval_rows, args, dist, pad_id, device), step
            stage.log({"eval_loss": last_eval})
        if step % args.logging_steps == 0 or step == total_steps:
            stats = all_reduce_(torch.tensor([window_loss, float(window_tokens)], dtype=torch.float64))
            train_loss = float(stats[0] / stats[1].clamp(min=1))
            elapsed = time.time() - window_start
            record = {
                "loss": train_loss,
                "learning_rate": stage.scheduler.get_last_lr()[0],
                "epoch": step / steps_per_epoch,
                "tokens_per_s": float(stats[1]) / max(elapsed, 1e-9),
            }
            if device.type == "cuda":
                record["gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            stage.log(record)
            stage.bar.set_postfix(loss=f"{train_loss:.4f}")
            window_loss, window_tokens, window_start = 0.0, 0, time.time()
        if stage.save_if_due(lambda epoch=epoch: {"epoch": epoch}):
            return PREEMPTED_EXIT_CODE
    stage.bar.close()

    # The final model's eval loss, unless the last step's evaluation just computed it.
    if args.evaluation_strategy != "no" and eval_rows and evaluated_at != stage.step:
        last_eval = eval_loss(model, eval_rows, args, dist, pad_id, device)
        stage.log({"eval_loss": last_eval})

    def final_metrics(runtime_s: float) -> dict[str, float]:
        final = {"train_loss": stage.metrics.last("loss").get("loss"), "runtime_s": runtime_s}
        stage.log(dict(final))  # eval_loss has its own record above: one record per evaluation
        final["train_rows"] = len(train_rows)
        if not math.isnan(last_eval):
            final["eval_loss"] = last_eval
        return final

    return stage.finish(tokenizer, final_metrics)


if __name__ == "__main__":
    raise SystemExit(main())
