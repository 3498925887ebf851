"""GRPO stage: group-relative policy optimisation with verifiable math rewards (DeepSeekMath / R1).

    torchrun --nproc_per_node=2 -m trainer.grpo --model_name_or_path runs/local/sft \\
        --dataset_name builtin:arith --output_dir runs/local/grpo --num_generations 8 --plugin ddp

One optimizer step, read top to bottom in `train()`:
1. rollout  — each rank takes its next `per_device_train_batch_size x gradient_accumulation_steps`
   prompts and samples `num_generations` completions per prompt with the KV-cached group sampler
   (prompt prefilled once per group, `inference_batch_size` prompts per call), stopping at EOS or
   `</answer>`, at this step's temperature (`--initial_temperature` → `--final_temperature`).
2. score    — the weighted reward functions (default: the R1 guide's 0/1/10 reward); group-relative
   advantages `(r - mean_group) / (std + eps)` (`--scale_rewards`); with `--dynamic_sampling`, groups
   whose rewards are all equal are dropped and replaced by fresh prompts.
3. train    — the clipped surrogate (+ `--beta` x k3 KL to the frozen initial model) on chunks of
   `--logits_forward_batch_size` rows (each group's prompt run once, its G completions packed behind it,
   where that is cheaper), log-probs at the sampling temperature, aggregated per
   `--loss_type`; a rollout is reused for `--num_iterations` optimizer steps (old log-probs are the
   sampler's, so no extra forward pass is spent on them).
Checkpoints (`checkpoint-<step>/`, with prompt positions and the sampling generator), resume,
SIGTERM and the final export + `r1_stage.json` work as in the SFT stage.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as td

from trainer import checkpoint as ckpt
from trainer.contract import output as contract
from trainer.r1.data import DataArgs, DataError, Example
from trainer.r1.format import format_prompt, stop_sequences
from trainer.r1.lengths import prompt_ids
from trainer.r1.rewards import DEFAULT_REWARD_FUNCS, REWARD_FUNCS, accuracy_reward, format_reward, score
from trainer.r1.scoring import evaluate_model
from trainer.rl.logprobs import completion_logprobs
from trainer.rl.objective import group_advantages, grpo_loss, informative_groups, temperature_at
from trainer.rl.sampling import sample_groups
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
    broadcast_,
    clip_gradients,
    init_distributed,
    load_model_and_tokenizer,
    make_booster,
    make_optimizer,
    make_scheduler,
    parse_args,
    progress,
    setup_logging,
)

logger = logging.getLogger("r1_grpo.grpo")


@dataclass
class GRPOArgs(TrainingArgs):
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate"})
    num_generations: int = field(
        default=8, metadata={"help": "G: completions sampled per prompt (one group)"}
    )
    inference_batch_size: int = field(
        default=16, metadata={"help": "Prompts per sampler call (each with G samples)"}
    )
    logits_forward_batch_size: int = field(
        default=32, metadata={"help": "Rows per forward/backward chunk for log-probs"}
    )
    initial_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature at the first step"}
    )
    final_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature at the last step"})
    temperature_schedule: str = field(default="linear", metadata={"help": "linear | cosine"})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling for rollouts"})
    beta: float = field(
        default=0.04,
        metadata={"help": "KL coefficient (k3 to the initial model); 0 loads no reference model"},
    )
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip range"})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clip range (clip-higher); default = epsilon"}
    )
    loss_type: str = field(
        default="grpo",
        metadata={"help": "grpo (per-sequence mean) | dapo (token mean) | dr_grpo (constant normaliser)"},
    )
    scale_rewards: str = field(
        default="group", metadata={"help": "group | batch | none: divide advantages by this std"}
    )
    num_iterations: int = field(default=1, metadata={"help": "Optimizer steps per rollout batch (mu)"})
    max_prompt_length: int = field(
        default=512,
        metadata={
            "help": "Prompts longer than this (tokens) are an error before step 0 (--skip_bad_rows drops them)"
        },
    )
    max_completion_length: int = field(default=256, metadata={"help": "New tokens per completion"})
    dynamic_sampling: bool = field(
        default=False, metadata={"help": "Drop groups with equal rewards and refill (DAPO)"}
    )
    max_resample_rounds: int = field(
        default=4, metadata={"help": "Refill rounds per step with --dynamic_sampling"}
    )
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Exclude completions that hit max_completion_length from the loss"}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: list(DEFAULT_REWARD_FUNCS),
        metadata={"help": f"Reward functions: {', '.join(REWARD_FUNCS)}"},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (default 1.0 each)"}
    )
    num_completions_to_print: int = field(default=2, metadata={"help": "Completions logged per logging step"})
    stop_at_answer_tag: bool = field(
        default=True, metadata={"help": "End a completion at </answer> as well as at EOS (false: EOS only)"}
    )
    skip_zero_advantage_groups: bool = field(
        default=True,
        metadata={
            "help": "With --beta 0, run no forward/backward for groups whose "
            "advantages are all zero: their loss and gradient are exactly zero, so the update is the same"
        },
    )
    max_train_seconds: float = field(
        default=0.0,
        metadata={
            "help": "Stop after this many seconds of this run's step loop (0: no limit); "
            "the final model and r1_stage.json are written as after --max_steps"
        },
    )

    def validate(self) -> None:
        super().validate()
        for name in (
            "num_generations",
            "inference_batch_size",
            "logits_forward_batch_size",
            "num_iterations",
            "max_prompt_length",
            "max_completion_length",
        ):
            if getattr(self, name) < 1:
                raise ArgsError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_train_seconds >= 0:
            raise ArgsError(f"--max_train_seconds must be >= 0 (0: no limit), got {self.max_train_seconds}")
        if self.num_generations < 2:
            raise ArgsError("--num_generations must be >= 2: advantages are relative to the group")
        for name in ("initial_temperature", "final_temperature"):
            if not getattr(self, name) > 0:
                raise ArgsError(f"--{name} must be > 0 (GRPO samples; greedy groups have no variance)")
        if not 0 < self.top_p <= 1:
            raise ArgsError("--top_p must be in (0, 1]")
        if (
            self.beta < 0
            or self.epsilon < 0
            or (self.epsilon_high is not None and self.epsilon_high < self.epsilon)
        ):
            raise ArgsError("--beta and --epsilon must be >= 0 and --epsilon_high >= --epsilon")
        for name, allowed in (
            ("loss_type", ("grpo", "dapo", "dr_grpo")),
            ("scale_rewards", ("group", "batch", "none")),
            ("temperature_schedule", ("linear", "cosine")),
        ):
            if getattr(self, name) not in allowed:
                raise ArgsError(f"--{name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        unknown = [n for n in self.reward_funcs if n not in REWARD_FUNCS]
        if unknown or not self.reward_funcs:
            raise ArgsError(
                f"--reward_funcs {unknown or '(empty)'}: known reward functions are {', '.join(REWARD_FUNCS)}"
            )
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ArgsError(
                f"--reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} --reward_funcs"
            )


@dataclass
class Rollout:
    """One optimizer step's samples on this rank: rows are grouped consecutively, G per prompt."""

    input_ids: torch.Tensor  # [N, P+T] left-padded prompt + right-padded completion
    attention_mask: torch.Tensor  # [N, P+T]
    completion_ids: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T] float; 0 on padding (and on truncated rows if masked)
    sample_logprobs: torch.Tensor  # [N, T] from the sampler = old-policy log-probs
    advantages: torch.Tensor  # [N]
    rewards: torch.Tensor  # [N]
    temperature: float
    texts: list[str]
    answers: list[str]
    stats: dict[str, float]
    ref_logprobs: torch.Tensor | None = None


class PromptStream:
    """This rank's endless, epoch-shuffled stream of prompts; `position` is all resume needs."""

    def __init__(self, examples: list[Example], seed: int, rank: int, world_size: int, position: int = 0):
        self.examples, self.seed, self.rank, self.world = examples, seed, rank, world_size
        self.position = position
        self._order_epoch, self._order = -1, []

    def take(self, n: int) -> list[Example]:
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


def main(argv: list[str] | None = None) -> int:
    data_args, args = parse_args((DataArgs, GRPOArgs), argv, prog="r1-grpo grpo")
    try:
        args.validate()
        return train(data_args, args)
    except (ArgsError, DataError, contract.StageOutputError) as e:
        return bad_input_exit("r1-grpo grpo", e)


def train(data_args: DataArgs, args: GRPOArgs) -> int:
    dist, device = init_distributed(args.seed)
    setup_logging(dist)
    output_dir = Path(args.output_dir)
    if dist.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        contract.invalidate_manifest(output_dir)
    started = time.time()

    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args, device)
    ref_model = None
    if args.beta > 0:  # frozen copy of the starting policy for the KL term
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    # Every prompt tokenized and length-checked now, the same on every rank, not when first sampled.
    limits = dict(max_prompt_length=args.max_prompt_length, skip=data_args.skip_bad_rows)
    train_examples, report = data_args.load_train(seed=args.seed)
    train_examples, prompt_cache = prompt_ids(tokenizer, train_examples, report=report, **limits)
    eval_examples: list[Example] = []
    if args.evaluation_strategy != "no":
        eval_examples, eval_report = data_args.load_eval()
        eval_examples, _ = prompt_ids(
            tokenizer, eval_examples, report=eval_report, cache=prompt_cache, **limits
        )

    prompts_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    rollouts_per_epoch = len(train_examples) // (prompts_per_step * dist.world_size)
    if args.max_steps > 0:
        total_steps = args.max_steps
    elif rollouts_per_epoch < 1:
        raise ArgsError(
            f"{data_args.dataset_name}: {len(train_examples)} prompts is less than one step "
            f"({prompts_per_step} per process x {dist.world_size} processes)"
        )
    else:
        total_steps = max(1, int(rollouts_per_epoch * args.num_train_epochs)) * args.num_iterations

    agree_on_setup()
    booster, _ = make_booster(args)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args, total_steps)
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    generator = torch.Generator(device=device).manual_seed(args.seed * 7919 + dist.rank)

    step, position = 0, 0
    resume = contract.latest_checkpoint(output_dir)
    if resume is not None:
        state = ckpt.load_training_checkpoint(
            booster, model, optimizer, scheduler, resume, dist, {"sampling": generator}
        )
        step, position = state["step"], state["prompt_positions"][dist.rank]
        logger.info("resumed from %s (step %d, temperature %.4f)", resume, step, state["temperature"])
    stream = PromptStream(train_examples, args.seed, dist.rank, dist.world_size, position)
    metrics = MetricsLogger(str(output_dir), "grpo", args, dist, args_dict(data_args, args), step)
    if dist.rank == 0:
        _drop_samples_after(output_dir / "samples.jsonl", step)
    preemption = Preemption()
    bar = progress(total_steps, step, "grpo", dist)
    rollout: Rollout | None = None
    last_eval: dict[str, float] = {}

    model.train()
    loop_started = time.time()
    while step < total_steps:
        temperature = temperature_at(
            step - step % args.num_iterations,
            total_steps,
            args.initial_temperature,
            args.final_temperature,
            args.temperature_schedule,
        )
        timings = {"generate_s": 0.0, "score_s": 0.0, "rollout_s": 0.0}
        if step % args.num_iterations == 0:  # a fresh rollout; reused for num_iterations steps
            t_rollout = time.time()
            rollout = make_rollout(
                model,
                ref_model,
                tokenizer,
                stream,
                prompts_per_step,
                temperature,
                args,
                device,
                generator,
                prompt_cache,
                timings,
            )
            timings["rollout_s"] = (
                time.time() - t_rollout
            )  # sampling + scoring + batching (+ reference log-probs)
        assert rollout is not None
        t_train = time.time()
        train_stats = policy_update(
            booster, model, optimizer, rollout, args, dist, reuse=step % args.num_iterations != 0
        )
        clip_gradients(args, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        step += 1
        bar.update(1)
        timings["train_s"] = time.time() - t_train

        at_cycle_end = step % args.num_iterations == 0  # checkpoints and the time limit never split a rollout
        out_of_budget = (
            at_cycle_end and args.max_train_seconds > 0 and out_of_time(loop_started, args.max_train_seconds)
        )
        if args.evaluation_strategy == "steps" and step % args.eval_steps == 0 and eval_examples:
            last_eval = evaluate_sharded(model, tokenizer, eval_examples, args, dist, prompt_cache)
            metrics.log(step, last_eval)
        if step % args.logging_steps == 0 or step == total_steps or out_of_budget:
            record = reduce_step_metrics(rollout, train_stats, timings, dist)
            record.update(temperature=temperature, learning_rate=scheduler.get_last_lr()[0])
            metrics.log(step, record)
            log_samples(output_dir, step, rollout, args.num_completions_to_print, dist)
            bar.set_postfix(reward=f"{record['reward_mean']:.2f}", acc=f"{record['accuracy']:.2f}")

        preempted = preemption.agreed()
        if at_cycle_end and (
            (args.save_steps and step % args.save_steps == 0 and step < total_steps) or preempted
        ):
            positions: list[Any] = [None] * dist.world_size
            if td.is_initialized():
                td.all_gather_object(positions, stream.position)
            else:
                positions = [stream.position]
            ckpt.save_training_checkpoint(
                booster,
                model,
                optimizer,
                scheduler,
                output_dir,
                step,
                {
                    "stage": "grpo",
                    "prompt_positions": positions,
                    "total_steps": total_steps,
                    "temperature": temperature_at(
                        min(step, total_steps - 1),
                        total_steps,
                        args.initial_temperature,
                        args.final_temperature,
                        args.temperature_schedule,
                    ),
                },
                dist,
                {"sampling": generator},
            )
            if args.save_total_limit and dist.rank == 0:
                contract.prune_checkpoints(output_dir, args.save_total_limit)
            if preempted:
                logger.warning("preempted at step %d; checkpoint saved, exiting", step)
                metrics.close()
                return PREEMPTED_EXIT_CODE
        if out_of_budget:
            logger.info(
                "--max_train_seconds %g reached after %d steps; finishing", args.max_train_seconds, step
            )
            break
    bar.close()

    if eval_examples and args.evaluation_strategy != "no":
        last_eval = evaluate_sharded(model, tokenizer, eval_examples, args, dist, prompt_cache)
    ckpt.save_final_model(booster, model, tokenizer, output_dir, dist, full_replica=args.plugin == "ddp")
    if dist.rank == 0:
        final = {**_last_logged(output_dir), **last_eval, "runtime_s": round(time.time() - started, 2)}
        contract.write_manifest(
            output_dir,
            "grpo",
            steps=step,
            metrics=final,
            inputs={
                "model_name_or_path": args.model_name_or_path,
                "dataset_name": data_args.dataset_name,
                "args": args_dict(data_args, args),
            },
        )
        logger.info("grpo done: %d steps, final model and %s in %s", step, contract.MANIFEST_NAME, output_dir)
    metrics.close()
    if td.is_initialized():
        td.barrier()
    return 0


# ---------------------------------------------------------------------------------------------
# 1-2. Rollout and scoring


def encode_prompt(tokenizer, example: Example, args: GRPOArgs, cache: dict[str, list[int]]) -> list[int]:
    ids = cache.get(example.problem)
    if ids is None:
        ids = tokenizer(format_prompt(tokenizer, example.problem), add_special_tokens=False)["input_ids"]
        if len(ids) > args.max_prompt_length:
            raise ArgsError(
                f"{example.source}: prompt is {len(ids)} tokens, more than --max_prompt_length {args.max_prompt_length}"
            )
        cache[example.problem] = ids
    return ids


@torch.no_grad()
def sample_and_score(
    model,
    tokenizer,
    examples: list[Example],
    temperature: float,
    args: GRPOArgs,
    generator,
    cache: dict[str, list[int]],
    timings: dict[str, float],
) -> list[dict[str, Any]]:
    """G samples for each example, scored; one dict per group (kept as lists so groups can be filtered)."""
    groups = []
    G = args.num_generations
    for start in range(0, len(examples), args.inference_batch_size):
        chunk = examples[start : start + args.inference_batch_size]
        prompts = [encode_prompt(tokenizer, ex, args, cache) for ex in chunk]
        t0 = time.time()
        out = sample_groups(
            model,
            prompts,
            num_generations=G,
            max_new_tokens=args.max_completion_length,
            temperature=temperature,
            top_p=args.top_p,
            eos_token_ids=[tokenizer.eos_token_id],
            stop_sequences=stop_sequences(tokenizer) if args.stop_at_answer_tag else [],
            pad_token_id=tokenizer.pad_token_id,
            generator=generator,
        )
        t1 = time.time()
        lengths = out.completion_mask.sum(1).tolist()
        texts = [
            tokenizer.decode(out.completion_ids[r, : lengths[r]], skip_special_tokens=True)
            for r in range(len(lengths))
        ]
        answers = [ex.answer for ex in chunk for _ in range(G)]
        total, _ = score(texts, answers, args.reward_funcs, args.reward_weights)
        timings["generate_s"] += t1 - t0
        timings["score_s"] += time.time() - t1
        for i, _ in enumerate(chunk):
            rows = slice(i * G, (i + 1) * G)
            groups.append(
                {
                    "prompt": prompts[i],
                    "completions": [out.completion_ids[r, : lengths[r]] for r in range(i * G, (i + 1) * G)],
                    "logprobs": [out.logprobs[r, : lengths[r]] for r in range(i * G, (i + 1) * G)],
                    "truncated": out.truncated[rows].tolist(),
                    "texts": texts[rows],
                    "answers": answers[rows],
                    "rewards": total[rows],
                }
            )
    return groups


def make_rollout(
    model,
    ref_model,
    tokenizer,
    stream: PromptStream,
    n_prompts: int,
    temperature: float,
    args: GRPOArgs,
    device,
    generator,
    cache: dict[str, list[int]],
    timings: dict[str, float],
) -> Rollout:
    unwrapped = model.unwrap() if hasattr(model, "unwrap") else model
    groups = sample_and_score(
        unwrapped, tokenizer, stream.take(n_prompts), temperature, args, generator, cache, timings
    )
    G = args.num_generations
    zero_std = sum(len(set(g["rewards"])) == 1 for g in groups) / len(groups)
    if args.dynamic_sampling:
        kept = [g for g in groups if len(set(g["rewards"])) > 1]
        rounds = 0
        while len(kept) < n_prompts and rounds < args.max_resample_rounds:
            more = sample_and_score(
                unwrapped,
                tokenizer,
                stream.take(args.inference_batch_size),
                temperature,
                args,
                generator,
                cache,
                timings,
            )
            kept += [g for g in more if len(set(g["rewards"])) > 1]
            rounds += 1
        # Nothing informative at all: train on the original groups (zero advantages, only KL acts).
        groups = kept[:n_prompts] or groups

    # Groups of similar length share a forward chunk (less padding); the loss does not depend on order.
    groups.sort(key=lambda g: len(g["prompt"]) + sum(len(c) for c in g["completions"]))
    rewards = torch.tensor([r for g in groups for r in g["rewards"]], dtype=torch.float32)
    advantages = group_advantages(rewards, G, args.scale_rewards)
    if args.scale_rewards == "batch" and td.is_initialized() and td.get_world_size() > 1:
        # The batch std spans every rank's groups: recompute it from all-reduced moments.
        centered = rewards.view(-1, G) - rewards.view(-1, G).mean(1, keepdim=True)
        moments = all_reduce_(
            torch.tensor(
                [float(rewards.numel()), float(rewards.sum()), float((rewards**2).sum())], dtype=torch.float64
            )
        )
        n, s, ss = moments.tolist()
        std = math.sqrt(max(ss - s * s / n, 0.0) / max(n - 1, 1))
        constant = ~informative_groups(rewards, G)[:, None]  # exactly 0 there, as group_advantages does
        advantages = (centered / (std + 1e-4)).masked_fill(constant, 0.0).flatten()

    rows = [
        (g["prompt"], c, lp, tr)
        for g in groups
        for c, lp, tr in zip(g["completions"], g["logprobs"], g["truncated"], strict=True)
    ]
    P = max(len(p) for p, _, _, _ in rows)
    T = max(1, max(len(c) for _, c, _, _ in rows))
    N = len(rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((N, P + T), pad, dtype=torch.long)
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
        if not (truncated and args.mask_truncated_completions):
            completion_mask[i, :n] = 1.0
    completion_ids = input_ids[:, P:]
    lengths = torch.tensor([len(c) for _, c, _, _ in rows], dtype=torch.float32)
    texts = [t for g in groups for t in g["texts"]]
    answers = [a for g in groups for a in g["answers"]]
    truncated = torch.tensor([tr for _, _, _, tr in rows], dtype=torch.float32)
    stats = {
        "reward_sum": float(rewards.sum()),
        "reward_sq_sum": float((rewards**2).sum()),
        "rows": float(N),
        "format_sum": sum(format_reward(t, a) for t, a in zip(texts, answers, strict=True)),
        "accuracy_sum": sum(accuracy_reward(t, a) for t, a in zip(texts, answers, strict=True)),
        "length_sum": float(lengths.sum()),
        "length_max": float(lengths.max()),
        "truncated_sum": float(truncated.sum()),
        "zero_std_sum": zero_std,
        "informative_groups": float(informative_groups(rewards, G).sum()),
        "groups": float(len(groups)),
        "entropy_sum": float(-(sample_logprobs * (sample_logprobs != 0)).sum()),
        "generated_tokens": float(lengths.sum()),
        "generate_s": timings["generate_s"],
        "score_s": timings["score_s"],
    }
    rollout = Rollout(
        input_ids.to(device),
        attention.to(device),
        completion_ids.to(device),
        completion_mask.to(device),
        sample_logprobs.to(device),
        advantages.to(device),
        rewards,
        temperature,
        texts,
        answers,
        stats,
    )
    if ref_model is not None:
        with torch.no_grad():
            rollout.ref_logprobs = completion_logprobs(
                ref_model,
                rollout.input_ids,
                rollout.attention_mask,
                rollout.completion_ids,
                temperature,
                args.logits_forward_batch_size,
                group_size=args.num_generations,
            )
    return rollout


# ---------------------------------------------------------------------------------------------
# 3. Policy update


def rows_to_train(rollout: Rollout, args: GRPOArgs, chunk: int, world_size: int) -> torch.Tensor | None:
    """Row indices the policy update runs forward/backward on (None: every row, in order).

    A group whose advantages are all zero (equal rewards) contributes exactly zero to the loss and the
    gradient when there is no KL term (beta 0): -min(rho * 0, clip(rho) * 0) = 0 for any ratio rho. Its
    rows are skipped; the loss keeps its normalisation over all rows, so the update is the same. Every
    rank runs the same number of chunks (the most any rank needs, at least one), a rank that needs fewer
    taking skipped groups along (one group per extra chunk), so collective backward passes (DDP's last
    chunk, ZeRO's reductions) stay matched and the gradients are always defined (zeros when nothing is
    informative).
    """
    G = args.num_generations
    N = rollout.advantages.numel()
    if (
        not args.skip_zero_advantage_groups
        or args.beta > 0
        or rollout.ref_logprobs is not None
        or N % G
        or chunk % G
    ):
        return None
    informative = rollout.advantages.view(-1, G).ne(0).any(dim=1).cpu()
    order = torch.cat(
        [informative.nonzero().flatten(), (~informative).nonzero().flatten()]
    )  # stable: length order kept
    informative_rows = int(informative.sum()) * G
    n_chunks = max(1, -(-informative_rows // chunk))
    if world_size > 1:
        n_chunks = int(
            all_reduce_(torch.tensor([float(n_chunks)], dtype=torch.float64), op=td.ReduceOp.MAX).item()
        )
    target = max(informative_rows, (n_chunks - 1) * chunk + G)  # ceil(target / chunk) == n_chunks
    if target >= N:
        return None
    groups = order[: target // G]
    return (groups[:, None] * G + torch.arange(G)).flatten().to(rollout.advantages.device)


def policy_update(
    booster, model, optimizer, rollout: Rollout, args: GRPOArgs, dist, reuse: bool
) -> dict[str, float]:
    """Backward of the GRPO loss over the rollout in chunks; gradients are synchronised once, at the end."""
    N = rollout.input_ids.size(0)
    device = rollout.input_ids.device
    totals = all_reduce_(torch.tensor([float(N), float(rollout.completion_mask.sum())], dtype=torch.float64))
    n_global, tokens_global = totals.tolist()
    W = dist.world_size
    chunk = args.logits_forward_batch_size
    if chunk >= args.num_generations:  # whole groups per chunk, so each can run its prompt once
        chunk -= chunk % args.num_generations
    trained = rows_to_train(rollout, args, chunk, W)
    if trained is not None:
        rollout = _select_rows(rollout, trained)
        N = trained.numel()
    sums: dict[str, float] = {}
    token_sum = 0.0
    for start in range(0, N, chunk):
        rows = slice(start, min(N, start + chunk))
        last = start + chunk >= N
        # DDP all-reduces on the last chunk only; a world of one has nothing to reduce at all.
        skip_sync = args.plugin == "ddp" and (not last or W == 1)
        sync = booster.no_sync(model, optimizer) if skip_sync else nullcontext()
        with sync:
            with autocast(args, device):
                logprobs = completion_logprobs(
                    model,
                    rollout.input_ids[rows],
                    rollout.attention_mask[rows],
                    rollout.completion_ids[rows],
                    rollout.temperature,
                    chunk,
                    group_size=args.num_generations,
                )
            # First pass over a rollout is on-policy (ratio 1 exactly); later passes use the sampler's log-probs.
            old = rollout.sample_logprobs[rows] if reuse else None
            n_rows = rows.stop - rows.start
            loss, stats = grpo_loss(
                logprobs.float(),
                old,
                rollout.advantages[rows],
                rollout.completion_mask[rows],
                ref_logprobs=None if rollout.ref_logprobs is None else rollout.ref_logprobs[rows],
                beta=args.beta,
                epsilon_low=args.epsilon,
                epsilon_high=args.epsilon_high,
                loss_type=args.loss_type,
                max_completion_length=args.max_completion_length,
                num_items_in_batch=max(tokens_global, 1.0) / W if args.loss_type == "dapo" else None,
            )
            # Scale chunk losses so their sum, averaged over ranks by DDP, is the whole batch's loss.
            if args.loss_type != "dapo":
                loss = loss * (n_rows * W / n_global)
            booster.backward(loss, optimizer)
        tokens = float(stats["num_tokens"])
        token_sum += tokens
        for key, value in stats.items():
            if key != "num_tokens":
                sums[key] = sums.get(key, 0.0) + float(value) * tokens
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
    out = {k: v / max(token_sum, 1.0) for k, v in sums.items() if k != "loss"}
    out["loss"] = sums.get("loss", 0.0)
    out["tokens"] = token_sum
    out["trained_rows"] = float(N)
    return out


def _select_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The rollout's training tensors for ``rows`` (whole groups, in the given order)."""
    return dataclasses.replace(
        rollout,
        input_ids=rollout.input_ids[rows],
        attention_mask=rollout.attention_mask[rows],
        completion_ids=rollout.completion_ids[rows],
        completion_mask=rollout.completion_mask[rows],
        sample_logprobs=rollout.sample_logprobs[rows],
        advantages=rollout.advantages[rows],
    )


def out_of_time(started: float, limit_s: float) -> bool:
    """Rank 0's clock decides, so every rank stops after the same step."""
    flag = broadcast_(torch.tensor([1.0 if time.time() - started >= limit_s else 0.0]))
    return bool(flag.item() > 0)


# ---------------------------------------------------------------------------------------------
# Metrics


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
    ]
    weighted = ["kl", "clip_ratio", "clip_ratio_low", "clip_ratio_high", "ratio_mean"]
    vec = torch.tensor(
        [s[k] for k in keys]
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
        ],
        dtype=torch.float64,
    )
    all_reduce_(vec)
    all_reduce_(maxes, op=td.ReduceOp.MAX)
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
    }
    out["rollout_tokens_per_s"] = (
        v["generated_tokens"] / max(out["generate_s"], 1e-9) if out["generate_s"] > 0 else 0.0
    )
    for k in weighted:
        if train_stats.get(k) is not None and k in train_stats:
            out[k] = v[k] / max(v["tokens"], 1.0)
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


def evaluate_sharded(
    model,
    tokenizer,
    examples: list[Example],
    args: GRPOArgs,
    dist,
    prompts: dict[str, list[int]] | None = None,
) -> dict[str, float]:
    """Greedy accuracy on the eval split, each rank a shard, reduced to global means (``prompts``: the
    token ids of the examples' prompts, from :func:`trainer.r1.lengths.prompt_ids`)."""
    unwrapped = model.unwrap() if hasattr(model, "unwrap") else model
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
    )
    n = len(result.records)
    vec = all_reduce_(
        torch.tensor(
            [result.metrics["accuracy"] * n, result.metrics["format_rate"] * n, float(n)], dtype=torch.float64
        )
    )
    total = max(vec[2].item(), 1.0)
    return {"eval_accuracy": vec[0].item() / total, "eval_format_rate": vec[1].item() / total}


def _drop_samples_after(path: Path, step: int) -> None:
    """Samples logged past the checkpoint a run resumes from are logged again; keep one copy (as metrics.jsonl)."""
    if path.exists():
        kept = [
            ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step
        ]
        contract.atomic_write_text(path, "".join(k + "\n" for k in kept))


def _last_logged(output_dir: Path) -> dict[str, float]:
    path = output_dir / "metrics.jsonl"
    last: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "reward_mean" in rec:
                last = {k: rec[k] for k in ("reward_mean", "accuracy", "format_rate") if k in rec}
    return last


if __name__ == "__main__":
    raise SystemExit(main())
