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
   `--loss_type`; a rollout is reused for `--num_iterations` optimizer steps (old log-probs of the later
   passes: the first pass's own, detached, with `--old_logprobs trainer`; or the sampler's). Every rank
   runs the same number of chunks (zero-weight ones where it has fewer rows), so collectives stay matched.
   The temperature schedule runs over rollouts, so the last one is sampled at `--final_temperature`.
The prompt stream, the rollout batch and the zero-advantage skip live in `trainer/rl/rollout.py`;
checkpoints (`checkpoint-<step>/`, with prompt positions and the sampling generator), resume, SIGTERM and
the final export + `r1_stage.json` are the shared stage lifecycle (`trainer/lifecycle.py`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as td

from trainer.grpo_report import evaluate_sharded, log_eval, log_samples, reduce_step_metrics
from trainer.lifecycle import Stage, run_cli
from trainer.modeling import load_model_and_tokenizer, load_reference_weights
from trainer.r1 import module_rewards
from trainer.r1.data import DataArgs, Example
from trainer.r1.format import STOP_STRINGS
from trainer.r1.lengths import prompt_ids
from trainer.r1.prompt import PromptArgs, Prompter, resolve_prompt
from trainer.r1.reward_module import RewardModule
from trainer.r1.rewards import DEFAULT_REWARD_FUNCS, REWARD_FUNCS, accuracy_reward, format_reward, score
from trainer.rl.head_logprobs import FUSED_HEAD_PLUGINS, lm_head_of
from trainer.rl.logprobs import completion_logprobs, unwrap_model
from trainer.rl.metrics import add_gap_sums, logprob_gap_sums
from trainer.rl.objective import (
    ADVANTAGE_SCALES,
    LOSS_TYPES,
    TEMPERATURE_SCHEDULES,
    group_advantages,
    grpo_loss,
    informative_groups,
    rollout_temperature,
)
from trainer.rl.rollout import (
    PromptStream,
    Rollout,
    keep_informative,
    pack_groups,
    plan_chunks,
    rows_to_train,
    sample_scored_groups,
    select_rows,
)
from trainer.rl.sampling import sample_groups
from trainer.rl.stopping import StopStrings, eos_token_ids
from trainer.runtime import (
    PREEMPTED_EXIT_CODE,
    ArgsError,
    TrainingArgs,
    agree_on_setup,
    all_reduce_,
    autocast,
    broadcast_,
    drop_records_after,
)

logger = logging.getLogger("r1_grpo.grpo")

OLD_LOGPROBS: tuple[str, ...] = ("trainer", "sampler")


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
    old_logprobs: str = field(
        default="trainer",
        metadata={
            "help": "Old-policy log-probs of passes 2..mu over a rollout: trainer (the first pass's own, "
            "detached, as TRL and verl) | sampler (the sampler's, computed by other kernels)"
        },
    )
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
    reward_module: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions from files, path/to/file.py:function, each "
            "function(response, ground_truth) -> float, named by its function name in --reward_funcs"
        },
    )
    reward_module_timeout_seconds: float = field(
        default=5.0,
        metadata={
            "help": "A --reward_module call longer than this gives reward 0 and is counted "
            "(reward_<name>_timeouts); its helper process is restarted"
        },
    )
    num_completions_to_print: int = field(default=2, metadata={"help": "Completions logged per logging step"})
    stop_at_answer_tag: bool = field(
        default=True,
        metadata={
            "help": "End a completion once its text contains </answer>, as well as at EOS (false: EOS only)"
        },
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
        self.require_at_least_one(
            "num_generations",
            "inference_batch_size",
            "logits_forward_batch_size",
            "num_iterations",
            "max_prompt_length",
            "max_completion_length",
        )
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
        self.require_one_of(
            {
                "loss_type": LOSS_TYPES,
                "scale_rewards": ADVANTAGE_SCALES,
                "temperature_schedule": TEMPERATURE_SCHEDULES,
                "old_logprobs": OLD_LOGPROBS,
            }
        )
        module_rewards.check_flags(self.reward_funcs, self.reward_module, self.reward_module_timeout_seconds)
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ArgsError(
                f"--reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} --reward_funcs"
            )


# The stage's command line, in --help order; trainer/flag_table.py reads both (`make schema`).
PROG = "r1-grpo grpo"
ARG_TYPES = (DataArgs, PromptArgs, GRPOArgs)


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, ARG_TYPES, argv, train)


def train(data_args: DataArgs, prompt_args: PromptArgs, args: GRPOArgs) -> int:
    # A bad --reward_module (no such function, wrong signature, failing import) fails like a bad flag,
    # before the stage folder is touched.
    modules = module_rewards.start_modules(args.reward_module or [], args.reward_module_timeout_seconds)
    stage = Stage.start("grpo", data_args, args, prompt_args)
    dist, device = stage.dist, stage.device
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args, device)
    # The SFT stage's prompt settings (its r1_stage.json) unless a flag says otherwise.
    stage.prompt = prompter = resolve_prompt(prompt_args, args.model_name_or_path, tokenizer)
    # Every prompt tokenized and length-checked now, the same on every rank, not when first sampled.
    limits = dict(max_prompt_length=args.max_prompt_length, skip=data_args.skip_bad_rows, prompter=prompter)
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
    model = stage.boost(model, total_steps)
    ref_model = None
    if args.beta > 0:
        # The KL term's frozen starting policy: loaded again from its files in the boosted policy's dtype
        # (the Booster may have cast it), on its device; no float32 deep copy of the policy.
        policy = unwrap_model(model)
        initial = load_reference_weights(args.model_name_or_path, args, policy, device)
        ref_model = reference_model(initial, policy)
        del initial, policy
    if args.plugin in FUSED_HEAD_PLUGINS and lm_head_of(model) is not None:
        logger.info("log-probs: lm-head + log-softmax on completion positions only, in chunks (no logits)")
    else:
        logger.info(
            "log-probs: the model's logits (no fused lm-head for --plugin %s or this model)", args.plugin
        )
    generator = torch.Generator(device=device).manual_seed(args.seed * 7919 + dist.rank)
    state = stage.resume({"sampling": generator})
    position = state["prompt_positions"][dist.rank] if state else 0
    stream = PromptStream(train_examples, args.seed, dist.rank, dist.world_size, position)
    if dist.rank == 0:
        drop_records_after(stage.output_dir / "samples.jsonl", stage.step)
    rollout: Rollout | None = None
    last_eval: dict[str, float] = {}
    evaluated_at = -1

    def trainer_state() -> dict[str, Any]:
        return {
            "prompt_positions": stream.all_positions(),
            "temperature": rollout_temperature(
                min(stage.step, total_steps - 1),
                total_steps,
                args.num_iterations,
                args.initial_temperature,
                args.final_temperature,
                args.temperature_schedule,
            ),
        }

    model.train()
    loop_started = time.time()
    while stage.step < total_steps:
        step = stage.step
        temperature = rollout_temperature(
            step,
            total_steps,
            args.num_iterations,
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
                prompter,
                modules,
            )
            # sampling + scoring + batching (+ reference log-probs)
            timings["rollout_s"] = time.time() - t_rollout
        assert rollout is not None
        t_train = time.time()
        train_stats = policy_update(stage, rollout, args, reuse=step % args.num_iterations != 0)
        step = stage.optimizer_step()
        timings["train_s"] = time.time() - t_train

        at_cycle_end = step % args.num_iterations == 0  # checkpoints and the time limit never split a rollout
        out_of_budget = (
            at_cycle_end and args.max_train_seconds > 0 and out_of_time(loop_started, args.max_train_seconds)
        )
        if args.evaluation_strategy == "steps" and step % args.eval_steps == 0 and eval_examples:
            last_eval = evaluate_sharded(model, tokenizer, eval_examples, args, dist, prompt_cache, prompter)
            evaluated_at = step
            log_eval(stage, last_eval)
        if step % args.logging_steps == 0 or step == total_steps or out_of_budget:
            record = reduce_step_metrics(rollout, train_stats, timings, dist)
            record.update(temperature=temperature, learning_rate=stage.scheduler.get_last_lr()[0])
            if device.type == "cuda":
                record["gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            stage.log(record)
            log_samples(stage.output_dir, step, rollout, args.num_completions_to_print, dist)
            stage.bar.set_postfix(reward=f"{record['reward_mean']:.2f}", acc=f"{record['accuracy']:.2f}")

        if stage.save_if_due(trainer_state, at_boundary=at_cycle_end):
            return PREEMPTED_EXIT_CODE
        if out_of_budget:
            logger.info(
                "--max_train_seconds %g reached after %d steps; finishing", args.max_train_seconds, step
            )
            break
    stage.bar.close()

    # The final model's accuracy, unless the last step's evaluation just measured it.
    if eval_examples and args.evaluation_strategy != "no" and evaluated_at != stage.step:
        last_eval = evaluate_sharded(model, tokenizer, eval_examples, args, dist, prompt_cache, prompter)
        log_eval(stage, last_eval)

    module_totals = module_rewards.run_totals(modules)

    def final_metrics(runtime_s: float) -> dict[str, float]:
        last = stage.metrics.last("reward_mean")
        logged = {k: last[k] for k in ("reward_mean", "accuracy", "format_rate") if k in last}
        return {**logged, **last_eval, **module_totals, "runtime_s": runtime_s}

    inputs = {"reward_modules": module_rewards.inputs_record(modules)} if modules else None
    return stage.finish(tokenizer, final_metrics, inputs=inputs)


# ---------------------------------------------------------------------------------------------
# 1-2. Rollout and scoring


def encode_prompt(
    tokenizer, example: Example, args: GRPOArgs, cache: dict[str, list[int]], prompter: Prompter
) -> list[int]:
    ids = cache.get(example.problem)
    if ids is None:
        ids = tokenizer(prompter.prompt(example.problem), add_special_tokens=False)["input_ids"]
        if len(ids) > args.max_prompt_length:
            raise ArgsError(
                f"{example.source}: prompt is {len(ids)} tokens, more than --max_prompt_length {args.max_prompt_length}"
            )
        cache[example.problem] = ids
    return ids


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
    prompter: Prompter,
    modules: dict[str, RewardModule] | None = None,
) -> Rollout:
    unwrapped = unwrap_model(model)
    counts = module_rewards.RolloutCounts(modules or {})

    def score_texts(texts: list[str], answers: list[str]) -> list[float]:
        total, per_func = score(texts, answers, args.reward_funcs, args.reward_weights, modules)
        counts.add(per_func)
        return total

    eos = eos_token_ids(tokenizer, unwrapped)
    stops = StopStrings.for_tokenizer(tokenizer, STOP_STRINGS) if args.stop_at_answer_tag else None

    def sample(prompts: list[list[int]]):
        return sample_groups(
            unwrapped,
            prompts,
            num_generations=args.num_generations,
            max_new_tokens=args.max_completion_length,
            temperature=temperature,
            top_p=args.top_p,
            eos_token_ids=eos,
            stop_strings=stops,
            pad_token_id=tokenizer.pad_token_id,
            generator=generator,
        )

    def draw(n: int) -> list[dict[str, Any]]:
        """The next ``n`` prompts of the stream, G samples each, scored by the reward functions."""
        examples = stream.take(n)
        return sample_scored_groups(
            sample,
            # The rewards see the whole response: the prompt's <think> prefill, if any, then the completion.
            lambda ids: prompter.response(tokenizer.decode(ids, skip_special_tokens=True)),
            score_texts,
            [encode_prompt(tokenizer, ex, args, cache, prompter) for ex in examples],
            [ex.answer for ex in examples],
            group_size=args.num_generations,
            batch_size=args.inference_batch_size,
            timings=timings,
        )

    groups = draw(n_prompts)
    G = args.num_generations
    zero_std = sum(len(set(g["rewards"])) == 1 for g in groups) / len(groups)
    if args.dynamic_sampling:
        groups = keep_informative(
            groups, n_prompts, lambda: draw(args.inference_batch_size), args.max_resample_rounds
        )

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

    rollout = pack_groups(
        groups,
        rewards,
        advantages,
        temperature,
        group_size=G,
        pad_token_id=tokenizer.pad_token_id,
        mask_truncated=args.mask_truncated_completions,
        device=device,
    )
    texts, answers = rollout.texts, rollout.answers
    rollout.stats.update(
        format_sum=sum(format_reward(t, a) for t, a in zip(texts, answers, strict=True)),
        accuracy_sum=sum(accuracy_reward(t, a) for t, a in zip(texts, answers, strict=True)),
        zero_std_sum=zero_std,
        generate_s=timings["generate_s"],
        score_s=timings["score_s"],
    )
    rollout.stats.update(counts.stats())
    if ref_model is not None:
        # The policy's forward exactly (autocast, chunking), so the KL is 0 while the weights are equal.
        with torch.no_grad(), autocast(args, device):
            rollout.ref_logprobs = completion_logprobs(
                ref_model,
                rollout.input_ids,
                rollout.attention_mask,
                rollout.completion_ids,
                temperature,
                train_chunk(args),
                group_size=args.num_generations,
                fused_head=args.plugin in FUSED_HEAD_PLUGINS,  # the policy's path: KL 0 at equal weights
            ).float()
    return rollout


def reference_model(initial, policy):
    """The frozen reference of the KL term: ``initial`` (a copy of the starting weights) in the dtype and
    attention implementation of ``policy`` (the boosted model, unwrapped). The Booster casts the policy
    under --bf16 (ZeRO, Gemini); a float32 reference would then differ from it at step 0 and, with
    flash-attention, which takes only fp16/bf16, fail on its first forward."""
    ref = initial.eval().requires_grad_(False)
    # Tensor by tensor, buffers too: a cast model's float32 rotary frequencies may or may not stay float32.
    params = {name: p.dtype for name, p in policy.named_parameters()}
    compute = next((d for d in params.values() if d.is_floating_point), torch.float32)
    for name, p in ref.named_parameters():
        p.data = p.data.to(params.get(name, compute))
    buffers = {name: b.dtype for name, b in policy.named_buffers()}
    for prefix, module in ref.named_modules():
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(buffers.get(f"{prefix}.{name}" if prefix else name, b.dtype))
    attn = policy.config._attn_implementation
    if hasattr(ref, "set_attn_implementation"):  # transformers 5
        ref.set_attn_implementation(attn)
    else:
        ref.config._attn_implementation = attn
    return ref


def train_chunk(args: GRPOArgs) -> int:
    """Rows per forward/backward chunk: whole groups when a chunk holds one, so each runs its prompt once."""
    chunk = args.logits_forward_batch_size
    if chunk >= args.num_generations:
        chunk -= chunk % args.num_generations
    return chunk


# ---------------------------------------------------------------------------------------------
# 3. Policy update


def policy_update(stage: Stage, rollout: Rollout, args: GRPOArgs, reuse: bool) -> dict[str, float]:
    """Backward of the GRPO loss over the rollout in chunks; gradients are synchronised once, at the end.

    The first pass (``reuse`` False) is on-policy (ratio 1 exactly); it keeps its log-probs (detached) as
    ``rollout.train_logprobs`` and the sampler-vs-trainer gap sums in ``rollout.stats``. The later passes
    take their old log-probs from ``--old_logprobs``."""
    model, dist = stage.model, stage.dist
    full = rollout
    N = rollout.input_ids.size(0)
    totals = all_reduce_(torch.tensor([float(N), float(rollout.completion_mask.sum())], dtype=torch.float64))
    n_global, tokens_global = totals.tolist()
    W = dist.world_size
    G = args.num_generations
    chunk = train_chunk(args)
    trained = rows_to_train(
        rollout, chunk, group_size=G, skip_zero_advantage=args.skip_zero_advantage_groups and args.beta == 0
    )
    if trained is not None:
        rollout = select_rows(rollout, trained)
        N = trained.numel()
    n_chunks = plan_chunks(N, chunk, max_over_ranks if W > 1 else None)
    keep_old = not reuse and args.num_iterations > 1 and args.old_logprobs == "trainer"
    first_pass_logprobs = torch.zeros_like(rollout.sample_logprobs) if keep_old else None
    gap: dict[str, float] = {}
    sums: dict[str, float] = {}
    token_sum = 0.0
    for k in range(n_chunks):
        start = k * chunk
        padding = start >= N  # this rank is out of rows: a zero-weight chunk keeps collectives matched
        rows = (
            slice(0, min(N, G if chunk >= G else chunk)) if padding else slice(start, min(N, start + chunk))
        )
        last = k == n_chunks - 1
        # DDP all-reduces on the last chunk only; a world of one has nothing to reduce at all.
        with stage.no_sync(args.plugin == "ddp" and (not last or W == 1)):
            with autocast(args, device=rollout.input_ids.device):
                logprobs = completion_logprobs(
                    model,
                    rollout.input_ids[rows],
                    rollout.attention_mask[rows],
                    rollout.completion_ids[rows],
                    rollout.temperature,
                    chunk,
                    group_size=G,
                    fused_head=args.plugin in FUSED_HEAD_PLUGINS,
                ).float()
            old = None
            if reuse:
                old = (rollout.train_logprobs if args.old_logprobs == "trainer" else rollout.sample_logprobs)[
                    rows
                ]
            n_rows = rows.stop - rows.start
            loss, stats = grpo_loss(
                logprobs,
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
            if padding:
                loss = loss * 0.0
            elif args.loss_type != "dapo":
                loss = loss * (n_rows * W / n_global)
            stage.backward(loss)
        if padding:
            continue
        if not reuse:
            sample = rollout.sample_logprobs[rows]
            gap = add_gap_sums(gap, logprob_gap_sums(sample, logprobs, rollout.completion_mask[rows]))
            if first_pass_logprobs is not None:
                first_pass_logprobs[rows] = logprobs.detach()
        tokens = float(stats["num_tokens"])
        token_sum += tokens
        for key, value in stats.items():
            if key != "num_tokens":
                sums[key] = sums.get(key, 0.0) + float(value) * tokens
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
    if not reuse:
        full.stats.update(gap)
    if first_pass_logprobs is not None:
        if trained is None:
            full.train_logprobs = first_pass_logprobs
        else:  # the later passes select the same rows (rows_to_train depends on the rollout alone)
            full.train_logprobs = torch.zeros_like(full.sample_logprobs)
            full.train_logprobs[trained] = first_pass_logprobs
    out = {k: v / max(token_sum, 1.0) for k, v in sums.items() if k != "loss"}
    out["loss"] = sums.get("loss", 0.0)
    out["tokens"] = token_sum
    out["trained_rows"] = float(N)
    out["chunks"] = float(n_chunks)
    return out


def max_over_ranks(value: int) -> int:
    return int(all_reduce_(torch.tensor([float(value)], dtype=torch.float64), op=td.ReduceOp.MAX).item())


def out_of_time(started: float, limit_s: float) -> bool:
    """Rank 0's clock decides, so every rank stops after the same step."""
    flag = broadcast_(torch.tensor([1.0 if time.time() - started >= limit_s else 0.0]))
    return bool(flag.item() > 0)


if __name__ == "__main__":
    raise SystemExit(main())
