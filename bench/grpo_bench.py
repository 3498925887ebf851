"""Shared harness of the GRPO benchmarks against TRL (`grpo_vs_trl.py`, `learning.py`).

One `Settings` drives both trainers: `ours_flags()` renders it as `trainer.grpo` flags, `trl_config()` as
a TRL `GRPOConfig`. Each side runs in its own child process (`python bench/grpo_bench.py worker ...`), so
peak RSS, threads and allocator state are its own; the worker writes one JSON result with per-step
timings, rewards, the effective settings read back from the trainer that ran, and its peak RSS. The
parent refuses to report a comparison whose effective settings differ (`compare_effective`).

Step phases, measured directly and the same way for both:
- generation: the rollout minus reward scoring (sampling, decoding, padding; reference log-probs when
  beta > 0);
- scoring: the reward functions;
- training: log-prob forward, loss, backward, clipping, optimizer and scheduler step;
- other: the rest of the step's wall time (metrics, logging, the trainers' own bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TRL_VERSION = "0.19.1"
# Loss aggregation: ours -> TRL's name for the same normalisation ("dapo", a token mean over the global
# batch, has no exact TRL 0.19 twin: its "bnpo" normalises per micro-batch).
LOSS_TYPES = {"grpo": "grpo", "dr_grpo": "dr_grpo"}


class BenchError(RuntimeError):
    pass


@dataclass
class Settings:
    """What both trainers get. Sizes are per optimizer step; one process each."""

    model: str  # a stage folder (SFT output) or builtin:tiny
    dataset: str = "builtin:arith"
    steps: int = 20
    prompts_per_step: int = 8
    num_generations: int = 8
    logits_forward_batch_size: int = 32  # rows per forward/backward chunk (TRL: per_device_train_batch_size)
    max_prompt_length: int = 512
    max_completion_length: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0
    epsilon: float = 0.2
    loss_type: str = "grpo"
    scale_rewards: bool = True
    learning_rate: float = 3e-4
    lr_scheduler_type: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    reward_funcs: list[str] = field(default_factory=lambda: ["r1"])
    seed: int = 42
    threads: int = 0  # torch threads per worker; 0 = all cores
    max_train_seconds: float = 0.0  # wall-clock budget of the step loop (learning.py); 0 = run all steps
    # Ours only: no forward/backward for groups whose advantages are all zero (the update is the same; TRL
    # computes them). False measures both trainers doing the same work.
    skip_zero_advantage_groups: bool = True

    def validate(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise BenchError(
                f"--loss_type {self.loss_type!r}: the comparison supports {', '.join(LOSS_TYPES)}"
            )
        rows = self.prompts_per_step * self.num_generations
        if rows % self.logits_forward_batch_size:
            raise BenchError(
                f"--logits_forward_batch_size {self.logits_forward_batch_size} must divide the "
                f"{rows} completions per step (TRL splits a step into equal micro-batches)"
            )
        if self.weight_decay != 0:
            raise BenchError(
                "--weight_decay must be 0: TRL exempts biases and norms from decay, our stage does not"
            )
        if self.num_generations < 2 or self.prompts_per_step < 1 or self.steps < 1:
            raise BenchError("--num_generations must be >= 2, --prompts_per_step and --steps >= 1")

    @property
    def num_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# Rendering the settings for each trainer, and reading back what each one actually uses


def ours_flags(s: Settings, output_dir: Path) -> list[str]:
    flags = {
        "model_name_or_path": s.model,
        "dataset_name": s.dataset,
        "output_dir": str(output_dir),
        "max_steps": s.steps,
        "per_device_train_batch_size": s.prompts_per_step,
        "gradient_accumulation_steps": 1,
        "num_generations": s.num_generations,
        "inference_batch_size": s.prompts_per_step,
        "logits_forward_batch_size": s.logits_forward_batch_size,
        "max_prompt_length": s.max_prompt_length,
        "max_completion_length": s.max_completion_length,
        "initial_temperature": s.temperature,
        "final_temperature": s.temperature,
        "top_p": s.top_p,
        "beta": s.beta,
        "epsilon": s.epsilon,
        "loss_type": s.loss_type,
        "scale_rewards": "group" if s.scale_rewards else "none",
        "learning_rate": s.learning_rate,
        "lr_scheduler_type": s.lr_scheduler_type,
        "warmup_steps": 0,
        "weight_decay": s.weight_decay,
        "max_grad_norm": s.max_grad_norm,
        "seed": s.seed,
        "logging_steps": 1,
        "save_steps": 0,
        "evaluation_strategy": "no",
        "report_to": "jsonl",
        "plugin": "ddp",
        "num_completions_to_print": 0,
        "max_train_seconds": s.max_train_seconds,
        "stop_at_answer_tag": False,  # TRL stops at EOS only
        "skip_zero_advantage_groups": s.skip_zero_advantage_groups,
    }
    out = [f"--{k}={v}" for k, v in flags.items()]
    out += ["--reward_funcs", *s.reward_funcs]
    return out


def trl_config(s: Settings, output_dir: Path, **overrides: Any):
    """`overrides` replace fields (tests use them to make the two sides differ on purpose)."""
    from trl import GRPOConfig

    rows = s.prompts_per_step * s.num_generations
    micro_batches = rows // s.logits_forward_batch_size
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        seed=s.seed,
        data_seed=s.seed,
        max_steps=s.steps,
        per_device_train_batch_size=s.logits_forward_batch_size,
        # one generation per optimizer step, split into micro-batches like our logits_forward_batch_size
        gradient_accumulation_steps=micro_batches,
        steps_per_generation=micro_batches,
        num_generations=s.num_generations,
        max_prompt_length=s.max_prompt_length,
        max_completion_length=s.max_completion_length,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=None,
        min_p=None,
        repetition_penalty=1.0,
        beta=s.beta,
        epsilon=s.epsilon,
        loss_type=LOSS_TYPES[s.loss_type],
        scale_rewards=s.scale_rewards,
        num_iterations=1,
        mask_truncated_completions=False,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler_type,
        warmup_steps=0,
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        adam_beta1=0.9,
        adam_beta2=0.999,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        shuffle_dataset=False,
        log_completions=False,
        disable_dropout=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    return GRPOConfig(**{**kwargs, **overrides})


EFFECTIVE_KEYS = (
    "prompts_per_step",
    "num_generations",
    "completions_per_step",
    "rows_per_forward",
    "max_prompt_length",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "beta",
    "epsilon_low",
    "epsilon_high",
    "loss_aggregation",
    "advantage_std",
    "num_iterations",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "adam_betas",
    "max_grad_norm",
    "reward_funcs",
    "reward_weights",
    "mask_truncated_completions",
    "dtype",
    "stop_at",
    "dynamic_sampling",
    "repetition_penalty",
    "min_p",
)

AGGREGATION = {  # how each name normalises the per-token loss, in words both sides agree on
    "grpo": "mean over tokens of each sequence, then over sequences",
    "dr_grpo": "sum over tokens / (sequences x max_completion_length)",
}


def effective_ours(args: dict[str, Any]) -> dict[str, Any]:
    """From the args our stage recorded in r1_stage.json (parsed flags, after defaults)."""
    if args["initial_temperature"] != args["final_temperature"]:
        raise BenchError("our run used a temperature schedule; TRL has one temperature")
    prompts = args["per_device_train_batch_size"] * args["gradient_accumulation_steps"]
    return {
        "prompts_per_step": prompts,
        "num_generations": args["num_generations"],
        "completions_per_step": prompts * args["num_generations"],
        "rows_per_forward": args["logits_forward_batch_size"],
        "max_prompt_length": args["max_prompt_length"],
        "max_completion_length": args["max_completion_length"],
        "temperature": args["initial_temperature"],
        "top_p": args["top_p"],
        "top_k": None,
        "beta": args["beta"],
        "epsilon_low": args["epsilon"],
        "epsilon_high": args["epsilon_high"] if args["epsilon_high"] is not None else args["epsilon"],
        "loss_aggregation": AGGREGATION.get(args["loss_type"], args["loss_type"]),
        "advantage_std": {"group": "group (unbiased) + 1e-4", "none": "none"}.get(
            args["scale_rewards"], args["scale_rewards"]
        ),
        "num_iterations": args["num_iterations"],
        "learning_rate": args["learning_rate"],
        "lr_scheduler_type": args["lr_scheduler_type"],
        "warmup_steps": args["warmup_steps"],
        "weight_decay": args["weight_decay"],
        "adam_betas": [args["adam_beta1"], args["adam_beta2"]],
        "max_grad_norm": args["max_grad_norm"],
        "reward_funcs": list(args["reward_funcs"]),
        "reward_weights": list(args["reward_weights"] or [1.0] * len(args["reward_funcs"])),
        "mask_truncated_completions": args["mask_truncated_completions"],
        "dtype": "bfloat16" if args["bf16"] else "float32",
        "stop_at": "eos or </answer>" if args["stop_at_answer_tag"] else "eos",
        "dynamic_sampling": args["dynamic_sampling"],
        "repetition_penalty": 1.0,
        "min_p": None,  # not in our sampler
    }


def _generation_value(trainer, name: str) -> Any:
    """What `generate` will use for `name`: transformers fills a field the passed config leaves at its
    default from the model's own generation_config, so a non-default value there wins."""
    from transformers import GenerationConfig

    default = getattr(GenerationConfig(), name)
    value = getattr(trainer.generation_config, name)
    model_value = getattr(getattr(trainer.model, "generation_config", None), name, default)
    return model_value if value == default and model_value != default else value


def effective_trl(trainer, reward_names: list[str]) -> dict[str, Any]:
    """From the live GRPOTrainer: its resolved attributes and generation config, not our inputs."""
    a = trainer.args
    per_gen = a.generation_batch_size  # completions generated at once = one optimizer step here
    trl_to_ours = {v: k for k, v in LOSS_TYPES.items()}
    do_sample = _generation_value(trainer, "do_sample")
    eos = _generation_value(trainer, "eos_token_id")
    stop_strings = _generation_value(trainer, "stop_strings")
    stop_at = " or ".join((["eos"] if eos is not None else []) + list(stop_strings or []))
    if eos is not None and eos not in (
        trainer.processing_class.eos_token_id,
        [trainer.processing_class.eos_token_id],
    ):
        stop_at = f"token ids {eos}"
    return {
        "prompts_per_step": per_gen // trainer.num_generations
        if a.steps_per_generation == a.gradient_accumulation_steps
        else None,
        "num_generations": trainer.num_generations,
        "completions_per_step": a.per_device_train_batch_size * a.gradient_accumulation_steps,
        "rows_per_forward": a.per_device_train_batch_size,
        "max_prompt_length": trainer.max_prompt_length,
        "max_completion_length": _generation_value(trainer, "max_new_tokens"),
        "temperature": _generation_value(trainer, "temperature") if do_sample else 0.0,
        "top_p": _generation_value(trainer, "top_p"),
        "top_k": _generation_value(trainer, "top_k") or None,
        "beta": trainer.beta,
        "epsilon_low": trainer.epsilon_low,
        "epsilon_high": trainer.epsilon_high,
        "loss_aggregation": AGGREGATION.get(trl_to_ours.get(trainer.loss_type, ""), trainer.loss_type),
        "advantage_std": "group (unbiased) + 1e-4" if trainer.scale_rewards else "none",
        "num_iterations": trainer.num_iterations,
        "learning_rate": a.learning_rate,
        "lr_scheduler_type": str(getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)),
        "warmup_steps": a.warmup_steps,
        "weight_decay": a.weight_decay,
        "adam_betas": [a.adam_beta1, a.adam_beta2],
        "max_grad_norm": a.max_grad_norm,
        "reward_funcs": reward_names,
        "reward_weights": [float(w) for w in trainer.reward_weights.tolist()],
        "mask_truncated_completions": trainer.mask_truncated_completions,
        "dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
        "stop_at": stop_at,
        "dynamic_sampling": False,  # TRL 0.19 has no dynamic sampling
        "repetition_penalty": _generation_value(trainer, "repetition_penalty"),
        "min_p": _generation_value(trainer, "min_p"),
    }


def compare_effective(ours: dict[str, Any], trl: dict[str, Any]) -> list[str]:
    """Every difference between the two effective configs, as 'key: ours=... trl=...'."""
    diffs = []
    for key in EFFECTIVE_KEYS:
        a, b = ours.get(key, "<missing>"), trl.get(key, "<missing>")
        if isinstance(a, float) or isinstance(b, float):
            same = (
                isinstance(a, int | float)
                and isinstance(b, int | float)
                and abs(a - b) <= 1e-9 * max(1.0, abs(a))
            )
        else:
            same = a == b
        if not same:
            diffs.append(f"{key}: ours={a!r} trl={b!r}")
    return diffs


# ---------------------------------------------------------------------------------------------
# Workers (child processes)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_ours(s: Settings, out_dir: Path) -> dict[str, Any]:
    from trainer import grpo
    from trainer.contract.output import verify_stage_output

    run_dir = out_dir / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.time()
    code = grpo.main(ours_flags(s, run_dir))
    if code != 0:
        raise BenchError(f"trainer.grpo exited with {code}")
    manifest = verify_stage_output(run_dir, "grpo")
    records = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    records = [r for r in records if "reward_mean" in r]
    rows = s.prompts_per_step * s.num_generations
    # metrics.jsonl is written once per step (logging_steps 1), after the optimizer step: consecutive
    # timestamps are step wall times. The first step has no predecessor; its time is its phases' sum.
    steps, previous = [], None
    for r in records:
        phases = r["rollout_s"] + r["train_s"]
        wall = r["time"] - previous if previous is not None else phases
        previous = r["time"]
        steps.append(
            {
                "step": r["step"],
                "wall_s": wall,
                "score_s": r["score_s"],
                "train_s": r["train_s"],
                "generate_s": r["rollout_s"] - r["score_s"],
                "other_s": max(wall - phases, 0.0),
                "completion_tokens": r["completion_length_mean"] * rows,
                "reward_mean": r["reward_mean"],
                "accuracy": r["accuracy"],
                "format_rate": r["format_rate"],
                "trained_fraction": r.get("trained_fraction", 1.0),
                "zero_std_fraction": r["zero_std_fraction"],
            }
        )
    import torch

    return {
        "trainer": "ours",
        "steps": steps,
        "effective": effective_ours(manifest.inputs["args"]),
        "model_dir": str(run_dir),
        "process_s": time.time() - started,
        "torch_threads": torch.get_num_threads(),
    }


def run_trl(s: Settings, out_dir: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from trainer.grpo import PromptStream
    from trainer.r1.builtin import resolve_model
    from trainer.r1.data import load_examples
    from trainer.r1.prompt import format_prompt
    from trainer.r1.rewards import accuracy_reward, format_reward, score
    from trainer.runtime import best_attention

    run_dir = out_dir / "trl"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.time()
    path = resolve_model(s.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, attn_implementation=best_attention()
    )
    examples, _ = load_examples(s.dataset, "train")
    # The prompts our stage draws, in the order it draws them (one process): both see the same prompts.
    stream = PromptStream(examples, s.seed, 0, 1)
    wanted = stream.take(s.steps * s.prompts_per_step)
    dataset = Dataset.from_list(
        [{"prompt": format_prompt(tokenizer, ex.problem), "answer": ex.answer} for ex in wanted]
    )

    names = list(s.reward_funcs)

    phase: dict[str, float] = {
        "rollout_s": 0.0,
        "score_s": 0.0,
        "stats_s": 0.0,
        "micro_s": 0.0,
        "micro_end": 0.0,
    }
    rollout_stats: dict[str, float] = {}

    def r1_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        total = score(completions, answer, names)[0]
        # Accuracy / format rate for the curves (ours computes them outside its scoring phase too).
        t0 = time.time()
        n = max(len(completions), 1)
        rollout_stats["accuracy"] = (
            sum(accuracy_reward(c, a) for c, a in zip(completions, answer, strict=True)) / n
        )
        rollout_stats["format_rate"] = (
            sum(format_reward(c, a) for c, a in zip(completions, answer, strict=True)) / n
        )
        phase["stats_s"] += time.time() - t0
        return total

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.time()
            out = super()._generate_and_score_completions(inputs)
            phase["rollout_s"] += time.time() - t0
            return out

        def training_step(self, *args, **kwargs):  # one micro-batch: (rollout) + forward + backward
            t0 = time.time()
            out = super().training_step(*args, **kwargs)
            phase["micro_end"] = time.time()
            phase["micro_s"] += phase["micro_end"] - t0
            return out

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            t0 = time.time()
            out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            phase["score_s"] += time.time() - t0
            return out

    steps: list[dict[str, Any]] = []

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.last = 0.0
            self.tokens = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.time()

        def on_step_end(self, args, state, control, **kw):
            now = time.time()
            wall = now - self.last
            self.last = now
            score_s = phase["score_s"] - phase["stats_s"]
            # Training = the micro-steps without their rollout + clipping, optimizer, scheduler, zero_grad
            # (from the last micro-step's end to here).
            train_s = phase["micro_s"] - phase["rollout_s"] + (now - phase["micro_end"])
            steps.append(
                {
                    "step": state.global_step,
                    "wall_s": wall,
                    "score_s": score_s,
                    "generate_s": phase["rollout_s"] - score_s,
                    "train_s": train_s,
                    "other_s": max(wall - phase["rollout_s"] - train_s, 0.0),
                    **rollout_stats,
                }
            )
            phase.update(rollout_s=0.0, score_s=0.0, stats_s=0.0, micro_s=0.0)
            if s.max_train_seconds and now - budget_start[0] >= s.max_train_seconds:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            # The log of step k comes after on_step_end(k): attach the rollout statistics to it.
            if logs and "reward" in logs and steps and "reward_mean" not in steps[-1]:
                rows = s.prompts_per_step * s.num_generations
                steps[-1].update(
                    reward_mean=logs["reward"], completion_tokens=logs["completions/mean_length"] * rows
                )

    budget_start = [0.0]

    class BudgetClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            budget_start[0] = time.time()

    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=[r1_reward],
        args=trl_config(s, run_dir),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[BudgetClock(), StepTimer()],
    )
    # One RepeatSampler pass in dataset order = the prompt order above.
    trainer.train()
    trainer.save_model(str(run_dir))
    tokenizer.save_pretrained(str(run_dir))
    return {
        "trainer": "trl",
        "steps": steps,
        "effective": effective_trl(trainer, names),
        "model_dir": str(run_dir),
        "process_s": time.time() - started,
        "torch_threads": torch.get_num_threads(),
    }


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grpo_bench.py worker", allow_abbrev=False)
    p.add_argument("trainer", choices=["ours", "trl"])
    p.add_argument("--settings", required=True, help="JSON file with the Settings")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    s = Settings(**json.loads(Path(a.settings).read_text()))
    import torch

    torch.set_num_threads(s.num_threads)
    out_dir = Path(a.out_dir)
    result = (run_ours if a.trainer == "ours" else run_trl)(s, out_dir)
    result["peak_rss_mib"] = peak_rss_mib()
    tmp = Path(a.result).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, a.result)
    return 0


def run_worker(trainer: str, s: Settings, out_dir: Path, log) -> dict[str, Any]:
    """Run one side in a fresh child process; returns its result JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_file = out_dir / "settings.json"
    settings_file.write_text(json.dumps(asdict(s), indent=1))
    result_file = out_dir / f"{trainer}.result.json"
    result_file.unlink(missing_ok=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(s.num_threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        PYTHONWARNINGS="ignore",
    )
    env.pop("RANK", None)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "worker",
        trainer,
        "--settings",
        str(settings_file),
        "--out_dir",
        str(out_dir),
        "--result",
        str(result_file),
    ]
    what = (
        f"GRPO for {s.max_train_seconds:g} s of training loop"
        if s.max_train_seconds
        else f"{s.steps} GRPO steps"
    )
    log(f"[{trainer}] {what}, {s.num_threads} threads, seed {s.seed} ...")
    t0 = time.time()
    with open(out_dir / f"{trainer}.log", "w") as logf:
        proc = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result_file.exists():
        tail = (out_dir / f"{trainer}.log").read_text()[-3000:]
        raise BenchError(
            f"{trainer} worker failed (exit {proc.returncode}); log {out_dir / f'{trainer}.log'}:\n{tail}"
        )
    log(f"[{trainer}] done in {time.time() - t0:.0f}s")
    return json.loads(result_file.read_text())


def warm_up(s: Settings, out_dir: Path, log) -> None:
    """A short untimed run of each side first: the first processes after a pause load torch and the
    model from a cold page cache and run on a cold CPU (measured: both trainers' first round ~20 %
    slower than later ones)."""
    from dataclasses import replace

    log("[warm-up] 3 steps of each, not measured")
    for name in ("ours", "trl"):
        run_worker(name, replace(s, steps=3, max_train_seconds=0.0), out_dir / "warm-up", lambda _msg: None)


# ---------------------------------------------------------------------------------------------
# The SFT checkpoint both start from, and held-out accuracy


def ensure_sft(sft_dir: Path, log) -> Path:
    """A verified SFT stage folder: reuse `sft_dir` if it holds one, else run the default pipeline's SFT stage."""
    from trainer.contract.output import StageOutputError, verify_stage_output
    from trainer.contract.stages import load_config, plan
    from trainer.executors.local import run_stage

    try:
        verify_stage_output(sft_dir, "sft")
        log(f"[sft] reusing {sft_dir}")
        return sft_dir
    except StageOutputError:
        pass
    cfg = load_config(overrides={"root": str(sft_dir.parent.parent), "release": sft_dir.parent.name})
    run = next(r for r in plan(cfg) if r.name == "sft")
    if run.output_dir.resolve() != sft_dir.resolve():
        raise BenchError(f"--sft_dir must end in <release>/sft, got {sft_dir}")
    shutil.rmtree(sft_dir, ignore_errors=True)  # no valid manifest: nothing here is trusted
    log(
        f"[sft] no verified SFT model in {sft_dir}: running the default pipeline's SFT stage (~3-4 min on 2 cores)"
    )
    run_stage(run, log)
    return sft_dir


def held_out_accuracy(
    model_dir: str, dataset: str, max_samples: int | None, max_new_tokens: int
) -> dict[str, float]:
    from trainer.executors.local import stage_accuracy

    return stage_accuracy(
        model_dir,
        dataset,
        {
            "max_eval_samples": max_samples,
            "max_completion_length": max_new_tokens,
            "inference_batch_size": 100,
        },
    )


# ---------------------------------------------------------------------------------------------
# Summaries


def summarize(result: dict[str, Any], skip_first: int = 2) -> dict[str, float]:
    """Medians per step over the steps after the first `skip_first` (warm-up: allocator, lazy init).

    Tokens/s are the median completion tokens of a step over the median step (or generation) time.
    """
    steps = result["steps"]
    timed = steps[skip_first:] if len(steps) > skip_first else steps
    med = {
        k: statistics.median(st[k] for st in timed)
        for k in ("wall_s", "generate_s", "score_s", "train_s", "other_s")
    }
    tokens = statistics.median(st.get("completion_tokens") or 0.0 for st in timed)
    return {
        "steps": len(steps),
        "step_s": med["wall_s"],
        "generate_s": med["generate_s"],
        "score_s": med["score_s"],
        "train_s": med["train_s"],
        "other_s": med["other_s"],
        "steps_per_min": 60.0 / med["wall_s"] if med["wall_s"] else 0.0,
        "tokens_per_s": tokens / med["wall_s"] if med["wall_s"] else 0.0,
        "gen_tokens_per_s": tokens / med["generate_s"] if med["generate_s"] else 0.0,
        "completion_len": tokens / max(result["effective"]["completions_per_step"], 1),
        "peak_rss_mib": result["peak_rss_mib"],
        "total_s": sum(st["wall_s"] for st in steps),
    }


def machine_line() -> str:
    import platform

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    import transformers
    import trl

    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        raise SystemExit(worker_main(sys.argv[2:]))
    raise SystemExit(
        "usage: grpo_bench.py worker {ours,trl} --settings FILE --out_dir DIR --result FILE "
        "(run bench/grpo_vs_trl.py or bench/learning.py instead)"
    )
