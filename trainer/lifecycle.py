"""The life of a stage, written once for the recipes: flags and errors, the process group and the stage
folder, the Booster, resume, checkpoints and preemption, the final export and `r1_stage.json`.

A training recipe calls the phases in order and keeps its algorithm in between (torchtune's recipe
phases: setup, train, save)::

    stage = Stage.start("sft", data_args, args, prompt_args)  # process group, logging, folder incomplete
    stage.prompt = resolve_prompt(prompt_args, ...)  # prompt settings, recorded in r1_stage.json
    model = stage.boost(model, total_steps)        # Booster, optimizer, learning-rate schedule
    stage.resume()                                # newest complete checkpoint, metrics, SIGTERM, progress
    while stage.step < stage.total_steps:
        ...                                       # the recipe's own forward/backward
        stage.optimizer_step()                    # clip, step, schedule, count
        if stage.save_if_due(lambda: {...}):      # checkpoint-<step>/; on SIGTERM saved and stop
            return PREEMPTED_EXIT_CODE
    return stage.finish(tokenizer, final_metrics) # final model, r1_stage.json, barrier

`Stage` is a plain object the recipe holds, not a base class: nothing is overridden.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from trainer import checkpoint as ckpt
from trainer.contract import output as contract
from trainer.modeling import save_dtype
from trainer.quiet import silence_notices
from trainer.r1.data import DataArgs, DataError
from trainer.r1.prompt import PromptArgs, Prompter
from trainer.runtime import (
    ArgsError,
    Dist,
    MetricsLogger,
    Preemption,
    TrainingArgs,
    args_dict,
    bad_input_exit,
    clip_gradients,
    init_distributed,
    make_booster,
    make_optimizer,
    make_scheduler,
    parse_args,
    progress,
    setup_logging,
)


def run_cli(prog: str, arg_types: tuple[type, ...], argv: list[str] | None, body: Callable[..., int]) -> int:
    """Parse and validate the flags, run ``body(*parsed)``; a bad input (flag, dataset, stage folder) is
    one line ``<prog>: error: <what, naming the input>`` and exit code 2."""
    silence_notices()
    parsed = parse_args(arg_types, argv, prog=prog)
    try:
        parsed[-1].validate()
        return body(*parsed)
    except (ArgsError, DataError, contract.StageOutputError) as e:
        return bad_input_exit(prog, e)  # the same verdict and message on every rank


def open_stage(output_dir: str, seed: int, colossal: bool = True) -> tuple[Dist, Any, Path]:
    """Process group, logging, and the stage folder, whose `r1_stage.json` is removed first: a running
    stage's folder is not trustworthy until the stage writes it again, last."""
    dist, device = init_distributed(seed, colossal=colossal)
    setup_logging(dist)
    folder = Path(output_dir)
    if dist.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        contract.invalidate_manifest(folder)
    return dist, device, folder


def barrier() -> None:
    import torch.distributed as td

    if td.is_initialized():
        td.barrier()


class Stage:
    """One run of a training stage (`sft` or `grpo`): what its phases share."""

    def __init__(
        self,
        name: str,
        data_args: DataArgs,
        args: TrainingArgs,
        dist: Dist,
        device: Any,
        prompt_args: PromptArgs | None = None,
    ) -> None:
        self.name, self.data_args, self.args, self.prompt_args = name, data_args, args, prompt_args
        self.prompt: Prompter | None = None  # set by the recipe; its settings go into r1_stage.json
        self.dist, self.device, self.output_dir = dist, device, Path(args.output_dir)
        self.log_to = logging.getLogger(f"r1_grpo.{name}")
        self.started = time.time()
        self.step = 0
        self.total_steps = 0
        self.booster: Any = None
        self.model: Any = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.generators: Mapping[str, Any] | None = None
        self.metrics: MetricsLogger | None = None
        self.preemption: Preemption | None = None
        self.bar: Any = None

    @classmethod
    def start(
        cls, name: str, data_args: DataArgs, args: TrainingArgs, prompt_args: PromptArgs | None = None
    ) -> Stage:
        """Open the stage: process group, logging, the output folder without its `r1_stage.json`."""
        dist, device, _ = open_stage(args.output_dir, args.seed)
        return cls(name, data_args, args, dist, device, prompt_args)

    def flags(self) -> dict[str, Any]:
        """Every flag of the stage, by name (metrics config, `inputs.args` of `r1_stage.json`)."""
        groups = (self.data_args, self.prompt_args, self.args)
        return args_dict(*(g for g in groups if g is not None))

    # -- setup ----------------------------------------------------------------------------------

    def boost(self, model: Any, total_steps: int) -> Any:
        """The Booster for `--plugin`, AdamW and the warmup schedule over ``total_steps``; the boosted model."""
        self.total_steps = total_steps
        self.booster, _ = make_booster(self.args)
        optimizer = make_optimizer(model, self.args)
        scheduler = make_scheduler(optimizer, self.args, total_steps)
        self.model, self.optimizer, _, _, self.scheduler = self.booster.boost(
            model, optimizer, lr_scheduler=scheduler
        )
        return self.model

    def resume(self, generators: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """Load the newest complete checkpoint, if any (model, optimizer, schedule, RNG and ``generators``,
        which later checkpoints save too); then open metrics.jsonl (records past the checkpoint are dropped:
        they will be logged again), listen for SIGTERM and show progress. Returns the checkpoint's
        trainer state, or None for a fresh start."""
        self.generators = generators
        state = None
        latest = contract.latest_checkpoint(self.output_dir)
        if latest is not None:
            state = ckpt.load_training_checkpoint(
                self.booster,
                self.model,
                self.optimizer,
                self.scheduler,
                latest,
                self.dist,
                generators,
                total_steps=self.total_steps,
            )
            self.step = state["step"]
            self.log_to.info("resumed from %s (step %d)", latest, self.step)
        config = self.flags()
        self.metrics = MetricsLogger(str(self.output_dir), self.name, self.args, self.dist, config, self.step)
        self.preemption = Preemption()
        self.bar = progress(self.total_steps, self.step, self.name, self.dist)
        return state

    # -- train ----------------------------------------------------------------------------------

    def no_sync(self, skip_sync: bool):
        """Accumulate gradients without the data-parallel all-reduce (``skip_sync``), else synchronise."""
        return self.booster.no_sync(self.model, self.optimizer) if skip_sync else nullcontext()

    def backward(self, loss: Any) -> None:
        self.booster.backward(loss, self.optimizer)

    def optimizer_step(self) -> int:
        """Clip (DDP; the other plugins clip inside their step), step, clear, advance the schedule; the new step."""
        clip_gradients(self.args, self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.step += 1
        self.bar.update(1)
        return self.step

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.log(self.step, record)

    # -- save -----------------------------------------------------------------------------------

    def save_if_due(self, trainer_state: Callable[[], dict[str, Any]], at_boundary: bool = True) -> bool:
        """Write `checkpoint-<step>/` every `--save_steps` (not at the last step: the final export follows)
        and when any rank got SIGTERM, with ``trainer_state()`` beside the stage's own fields; prune to
        `--save_total_limit`. Every rank must call it after every step; ``at_boundary`` False defers both
        to a later step. True: preempted, the checkpoint is written and the recipe returns
        PREEMPTED_EXIT_CODE."""
        preempted = self.preemption.agreed()
        periodic = bool(self.args.save_steps) and self.step % self.args.save_steps == 0
        if not at_boundary or not ((periodic and self.step < self.total_steps) or preempted):
            return False
        state = {"stage": self.name, "total_steps": self.total_steps, **trainer_state()}
        ckpt.save_training_checkpoint(
            self.booster,
            self.model,
            self.optimizer,
            self.scheduler,
            self.output_dir,
            self.step,
            state,
            self.dist,
            self.generators,
        )
        if self.args.save_total_limit and self.dist.rank == 0:
            contract.prune_checkpoints(self.output_dir, self.args.save_total_limit)
        if preempted:
            self.log_to.warning("preempted at step %d; checkpoint saved, exiting", self.step)
            self.metrics.close()
        return preempted

    def finish(
        self,
        tokenizer: Any,
        final_metrics: Callable[[float], dict[str, Any]],
        inputs: Mapping[str, Any] | None = None,
    ) -> int:
        """Export the final model at the folder root; rank 0 then writes `r1_stage.json` (last) with
        ``final_metrics(runtime_s)`` and ``inputs`` beside the flags. Every rank must call it; returns 0."""
        ckpt.save_final_model(
            self.booster,
            self.model,
            tokenizer,
            self.output_dir,
            self.dist,
            full_replica=self.args.plugin == "ddp",
            dtype=save_dtype(self.args, self.model),
        )
        if self.dist.rank == 0:
            contract.write_manifest(
                self.output_dir,
                self.name,
                steps=self.step,
                metrics=final_metrics(round(time.time() - self.started, 2)),
                inputs={
                    "model_name_or_path": self.args.model_name_or_path,
                    "dataset_name": self.data_args.dataset_name,
                    "args": self.flags(),
                    **({"prompt": self.prompt.settings.to_record()} if self.prompt else {}),
                    **(inputs or {}),
                },
            )
            self.log_to.info(
                "%s done: %d steps, final model and %s in %s",
                self.name,
                self.step,
                contract.MANIFEST_NAME,
                self.output_dir,
            )
        self.metrics.close()
        barrier()
        return 0
