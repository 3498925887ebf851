"""SFT stage: teach the base model the `<think>…</think><answer>…</answer>` format on reference reasoning.

    torchrun --nproc_per_node=2 -m trainer.sft --model_name_or_path builtin:tiny \\
        --dataset_name builtin:arith --output_dir runs/local/sft --num_train_epochs 1 --plugin ddp

Loss is next-token cross-entropy on completion tokens only, averaged over every completion token of the
optimizer step (all micro-batches, all ranks), so gradient accumulation and the number of processes
do not change the objective. Cosine schedule with warmup, gradient clipping, eval loss every
`--eval_steps`, `checkpoint-<step>/` every `--save_steps`, automatic resume, SIGTERM-safe, and at the end
the final model plus `r1_stage.json` in `--output_dir`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as td

from trainer import checkpoint as ckpt
from trainer.contract import output as contract
from trainer.r1.data import DataArgs, DataError, LoadReport
from trainer.r1.lengths import sft_sequences
from trainer.runtime import (
    PREEMPTED_EXIT_CODE,
    ArgsError,
    MetricsLogger,
    Preemption,
    TrainingArgs,
    agree_on_setup,
    all_reduce_,
    args_dict,
    autocast,
    bad_input_exit,
    clip_gradients,
    init_distributed,
    load_model_and_tokenizer,
    make_booster,
    make_optimizer,
    make_scheduler,
    parse_args,
    progress,
    setup_logging,
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
    examples, tokenizer, max_seq_length: int, skip: bool = False, report: LoadReport | None = None
) -> tuple[list[TokenizedRow], int]:
    """Prompt (chat template + R1 system prompt) and completion (+EOS) ids, checked against
    --max_seq_length (trainer.r1.lengths.sft_sequences); returns rows and #truncated."""
    sequences = sft_sequences(tokenizer, examples, max_seq_length=max_seq_length, skip=skip, report=report)
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


def completion_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over completion tokens (the caller normalises)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


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
            total[0] += completion_loss_sum(model, collate(chunk, pad_id, device)).double().cpu()
        total[1] += n_completion_tokens(chunk)
    if td.is_initialized():
        t = total.to(device)
        td.all_reduce(t)
        total = t.cpu()
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def main(argv: list[str] | None = None) -> int:
    data_args, args = parse_args((DataArgs, SFTArgs), argv, prog="r1-grpo sft")
    try:
        args.validate()
        return train(data_args, args)
    except (ArgsError, DataError, contract.StageOutputError) as e:
        return bad_input_exit("r1-grpo sft", e)


def train(data_args: DataArgs, args: SFTArgs) -> int:
    dist, device = init_distributed(args.seed)
    setup_logging(dist)
    output_dir = Path(args.output_dir)
    if dist.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        contract.invalidate_manifest(output_dir)  # a running stage's folder is not trustworthy
    started = time.time()

    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args, device)
    train_examples, report = data_args.load_train(seed=args.seed, require_solutions=True)
    skip = data_args.skip_bad_rows
    train_rows, truncated = tokenize_examples(train_examples, tokenizer, args.max_seq_length, skip, report)
    eval_rows: list[TokenizedRow] = []
    if args.evaluation_strategy != "no":
        eval_examples, eval_report = data_args.load_eval(require_solutions=True)
        eval_rows, _ = tokenize_examples(eval_examples, tokenizer, args.max_seq_length, skip, eval_report)
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
    booster, _ = make_booster(args)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args, total_steps)
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)

    step = 0
    resume = contract.latest_checkpoint(output_dir)
    if resume is not None:
        state = ckpt.load_training_checkpoint(booster, model, optimizer, scheduler, resume, dist)
        step = state["step"]
        logger.info("resumed from %s (step %d)", resume, step)
    metrics = MetricsLogger(str(output_dir), "sft", args, dist, args_dict(data_args, args), step)
    preemption = Preemption()
    bar = progress(total_steps, step, "sft", dist)
    pad_id = tokenizer.pad_token_id
    last_eval = math.nan
    window_loss, window_tokens, window_start = 0.0, 0, time.time()

    model.train()
    while step < total_steps:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
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
            sync = (
                booster.no_sync(model, optimizer)
                if (not last_micro and args.plugin == "ddp")
                else nullcontext()
            )
            with sync:
                with autocast(args, device):
                    loss_sum = completion_loss_sum(model, batch)
                # DDP averages gradients over ranks, hence the world-size factor.
                booster.backward(loss_sum * dist.world_size / step_tokens, optimizer)
            window_loss += loss_sum.item()
            window_tokens += n_completion_tokens(local_rows)
        clip_gradients(args, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        step += 1
        bar.update(1)

        if (
            args.evaluation_strategy == "steps"
            and step % args.eval_steps == 0
            or (args.evaluation_strategy == "epoch" and step % steps_per_epoch == 0)
        ):
            last_eval = eval_loss(model, eval_rows, args, dist, pad_id, device)
            metrics.log(step, {"eval_loss": last_eval})
        if step % args.logging_steps == 0 or step == total_steps:
            stats = all_reduce_(torch.tensor([window_loss, float(window_tokens)], dtype=torch.float64))
            train_loss = float(stats[0] / stats[1].clamp(min=1))
            elapsed = time.time() - window_start
            metrics.log(
                step,
                {
                    "loss": train_loss,
                    "learning_rate": scheduler.get_last_lr()[0],
                    "epoch": step / steps_per_epoch,
                    "tokens_per_s": float(stats[1]) / max(elapsed, 1e-9),
                },
            )
            bar.set_postfix(loss=f"{train_loss:.4f}")
            window_loss, window_tokens, window_start = 0.0, 0, time.time()

        preempted = preemption.agreed()
        if (args.save_steps and step % args.save_steps == 0 and step < total_steps) or preempted:
            ckpt.save_training_checkpoint(
                booster,
                model,
                optimizer,
                scheduler,
                output_dir,
                step,
                {"stage": "sft", "epoch": epoch, "total_steps": total_steps},
                dist,
            )
            if args.save_total_limit and dist.rank == 0:
                contract.prune_checkpoints(output_dir, args.save_total_limit)
        if preempted:
            logger.warning("preempted at step %d; checkpoint saved, exiting", step)
            metrics.close()
            return PREEMPTED_EXIT_CODE
    bar.close()

    if args.evaluation_strategy != "no" and eval_rows:
        last_eval = eval_loss(model, eval_rows, args, dist, pad_id, device)
    final_loss = _last_logged(output_dir, "loss") if dist.rank == 0 else None
    ckpt.save_final_model(booster, model, tokenizer, output_dir, dist, full_replica=args.plugin == "ddp")
    if dist.rank == 0:
        final = {
            "train_loss": final_loss,
            "runtime_s": round(time.time() - started, 2),
            "train_rows": len(train_rows),
        }
        if not math.isnan(last_eval):
            final["eval_loss"] = last_eval
        metrics.log(step, {k: v for k, v in final.items() if k != "train_rows"})
        contract.write_manifest(
            output_dir,
            "sft",
            steps=step,
            metrics=final,
            inputs={
                "model_name_or_path": args.model_name_or_path,
                "dataset_name": data_args.dataset_name,
                "args": args_dict(data_args, args),
            },
        )
        logger.info("sft done: %d steps, final model and %s in %s", step, contract.MANIFEST_NAME, output_dir)
    metrics.close()
    if td.is_initialized():
        td.barrier()
    return 0


def _last_logged(output_dir: Path, key: str):
    path = output_dir / "metrics.jsonl"
    value = None
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if key in rec:
                value = rec[key]
    return value


if __name__ == "__main__":
    raise SystemExit(main())
