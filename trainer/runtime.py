"""What every training stage shares: HF-style flags, the process group, the Colossal-AI Booster,
model loading, the optimizer and schedule, metrics logging and preemption (SIGTERM) handling."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from trainer.contract.exits import BAD_INPUT_EXIT_CODE, report_bad_input

logger = logging.getLogger("r1_grpo")

PLUGINS = ("ddp", "zero2", "zero2_cpu", "gemini", "3d")
REPORT_TO = ("none", "jsonl", "wandb")


class ArgsError(ValueError):
    """A flag value that cannot work; the message names the flag."""


@dataclass
class TrainingArgs:
    """Flags shared by `sft` and `grpo` (the names the DeepSeek-R1 guide and HF Trainer use)."""

    model_name_or_path: str = field(metadata={"help": "Hub id, local folder, or builtin:tiny"})
    output_dir: str = field(metadata={"help": "Checkpoints, final model and r1_stage.json go here"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training prompts"})
    max_steps: int = field(
        default=-1, metadata={"help": "Optimizer steps; overrides num_train_epochs when > 0"}
    )
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Rows (SFT) or prompts (GRPO) per process per micro-step"}
    )
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Rows per process for eval loss"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step"})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "cosine | linear | constant (all with warmup)"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)"})
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every N optimizer steps"})
    save_steps: int = field(
        default=500,
        metadata={"help": "Write checkpoint-<step>/ every N optimizer steps (0: only at preemption)"},
    )
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the newest N checkpoints"}
    )
    evaluation_strategy: str = field(
        default="no", metadata={"help": "no | steps | epoch", "aliases": ["--eval_strategy"]}
    )
    eval_steps: int = field(
        default=100, metadata={"help": "Evaluate every N optimizer steps (strategy steps)"}
    )
    report_to: str = field(
        default="jsonl", metadata={"help": "jsonl | wandb | none (jsonl metrics are always written)"}
    )
    run_name: str | None = field(default=None, metadata={"help": "wandb run name"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward"}
    )
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision"})
    tf32: bool = field(default=False, metadata={"help": "Allow TF32 matmuls on Ampere+ GPUs"})
    seed: int = field(default=42, metadata={"help": "Seed for init, data order and sampling"})
    plugin: str = field(
        default="ddp", metadata={"help": "Colossal-AI Booster plugin: ddp | zero2 | zero2_cpu | gemini | 3d"}
    )
    tp_size: int = field(default=1, metadata={"help": "Tensor-parallel size (plugin 3d)"})
    pp_size: int = field(default=1, metadata={"help": "Pipeline-parallel size (plugin 3d)"})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager | sdpa | flash_attention_2 (default: best available)"}
    )
    save_dtype: str = field(
        default="auto",
        metadata={
            "help": "auto | float32 | bfloat16 | float16: dtype of the final model's weights "
            "(auto: the base model's, so a bfloat16 base stays bfloat16)"
        },
    )

    def require_at_least_one(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise ArgsError(f"--{name} must be >= 1, got {getattr(self, name)}")

    def require_one_of(self, choices: dict[str, tuple[str, ...]]) -> None:
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ArgsError(f"--{name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")

    def validate(self) -> None:
        self.require_at_least_one(
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "eval_steps",
        )
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ArgsError("--num_train_epochs must be > 0 (or set --max_steps)")
        if self.learning_rate < 0:
            raise ArgsError(f"--learning_rate must be >= 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.save_steps < 0:
            raise ArgsError("--warmup_steps and --save_steps must be >= 0")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ArgsError("--save_total_limit must be >= 1")
        self.require_one_of(
            {
                "plugin": PLUGINS,
                "report_to": REPORT_TO,
                "evaluation_strategy": ("no", "steps", "epoch"),
                "lr_scheduler_type": ("cosine", "linear", "constant"),
                "save_dtype": ("auto", "float32", "bfloat16", "float16"),
            }
        )
        if self.plugin != "3d" and (self.tp_size != 1 or self.pp_size != 1):
            raise ArgsError("--tp_size/--pp_size need --plugin 3d")


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None, prog: str) -> tuple[Any, ...]:
    """HfArgumentParser with a clear message and exit code 2 on unknown or bad flags."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, prog=prog, allow_abbrev=False)
    argparse_error = parser.error

    def error(message: str):
        _write_elastic_error_file(f"{prog}: error: {message}")  # torchrun's failure summary shows it
        report_bad_input(f"{prog}: error: {message}")  # `r1-grpo launch` exits 2 with it
        argparse_error(message)

    parser.error = error  # type: ignore[method-assign]
    argv = sys.argv[1:] if argv is None else argv
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except SystemExit as e:  # argparse already printed "prog: error: ..."
        raise SystemExit(2 if e.code else 0) from None
    except ValueError as e:  # an args dataclass refused a value (ArgsError, DataError); it names the flag
        parser.error(str(e))
    *objs, remaining = parsed
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    return tuple(objs)


def args_dict(*objs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for o in objs:
        out.update(asdict(o))
    return out


@dataclass
class Dist:
    """What checkpointing needs from the process group (kept small so tests can run single-process)."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None

    @classmethod
    def from_torch(cls) -> Dist:
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            return cls(td.get_rank(), td.get_world_size(), td.barrier)
        return cls()


# ---------------------------------------------------------------------------------------------
# Process group and Booster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(seed: int, colossal: bool = True) -> tuple[Dist, Any]:
    """Start the process group (works under torchrun and as a plain single process).

    `colossal=False` (evaluation) uses plain torch.distributed: no Booster, and no 10 s colossalai import.
    """
    import torch

    if "RANK" not in os.environ:  # plain `python -m trainer.sft`: a world of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    global _setup_agreed
    _setup_agreed = False
    cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        if colossal:
            import colossalai

            colossalai.launch_from_torch(backend="nccl" if cuda else "gloo", seed=seed, verbose=False)
        else:
            torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    set_seed(seed)
    return Dist.from_torch(), device


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_booster(args: TrainingArgs):
    """The Colossal-AI Booster for `--plugin`; everything but ddp needs CUDA."""
    from colossalai.booster import Booster
    from colossalai.booster.plugin import (
        GeminiPlugin,
        HybridParallelPlugin,
        LowLevelZeroPlugin,
        TorchDDPPlugin,
    )

    _require_cuda_for_plugin(args)
    precision = "bf16" if args.bf16 else "fp32"
    clip = args.max_grad_norm
    if args.plugin == "ddp":
        plugin = TorchDDPPlugin(find_unused_parameters=False, broadcast_buffers=False)
    elif args.plugin in ("zero2", "zero2_cpu"):
        plugin = LowLevelZeroPlugin(
            stage=2, precision=precision, max_norm=clip, cpu_offload=args.plugin == "zero2_cpu"
        )
    elif args.plugin == "gemini":
        plugin = GeminiPlugin(precision=precision, placement_policy="static", max_norm=clip)
    else:
        plugin = HybridParallelPlugin(
            tp_size=args.tp_size,
            pp_size=args.pp_size,
            precision=precision,
            zero_stage=1 if args.pp_size > 1 else 0,
            max_norm=clip,
            microbatch_size=1 if args.pp_size > 1 else None,
        )
    return Booster(plugin=plugin), plugin


def clip_gradients(args: TrainingArgs, optimizer: Any) -> None:
    # Only DDP leaves clipping to us; the ZeRO/Gemini/3D plugins clip inside optimizer.step (max_norm).
    if args.plugin == "ddp" and args.max_grad_norm > 0:
        optimizer.clip_grad_by_norm(args.max_grad_norm)


def autocast(args: TrainingArgs, device: Any):
    """bf16 autocast for DDP (the other plugins cast the model themselves)."""
    import torch

    if args.bf16 and args.plugin == "ddp":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_device_flags(args: Any) -> None:
    """Refuse (ArgsError) what this machine cannot run and say what a flag does here, before any work.

    On CPU: ``--plugin`` other than ddp needs CUDA (refused); ``--tf32`` is a CUDA matmul mode (Ampere or
    newer) and changes nothing (said, then ignored); ``--bf16`` runs as bfloat16 autocast (DDP) or a
    bfloat16 model (eval), which CPUs without bf16 instructions emulate slowly (said);
    ``--gradient_checkpointing`` works as on GPU.
    """
    import torch

    _require_cuda_for_plugin(args)
    if torch.cuda.is_available():
        return
    if args.tf32:
        logger.warning(
            "--tf32 True has no effect on CPU: TF32 is a CUDA matmul mode (Ampere or newer GPUs); "
            "float32 matmuls stay float32"
        )
    if args.bf16:
        logger.info(
            "--bf16 True on CPU: bfloat16 compute on the CPU (slow on CPUs without bf16 instructions)"
        )


def _require_cuda_for_plugin(args: Any) -> None:
    import torch

    plugin = getattr(args, "plugin", "ddp")  # evaluation has no Booster
    if plugin != "ddp" and not torch.cuda.is_available():
        raise ArgsError(f"--plugin {plugin} needs CUDA GPUs; on CPU use --plugin ddp")
    from trainer.kernels import check_offload_kernels

    if problem := check_offload_kernels(plugin):
        raise ArgsError(problem)


def best_attention() -> str:
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def make_optimizer(model: Any, args: TrainingArgs):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if args.plugin in ("gemini", "zero2_cpu"):
        from colossalai.nn.optimizer import HybridAdam  # CPU-offloaded states need the hybrid kernel

        return HybridAdam(
            params,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.weight_decay,
        )
    return torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.weight_decay,
    )


def make_scheduler(optimizer: Any, args: TrainingArgs, total_steps: int):
    from torch.optim.lr_scheduler import LambdaLR

    warmup = min(args.warmup_steps, total_steps)
    kind = args.lr_scheduler_type

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def total_optimizer_steps(args: TrainingArgs, micro_batches_per_epoch: int) -> int:
    steps_per_epoch = micro_batches_per_epoch // args.gradient_accumulation_steps
    # Checked even with --max_steps: a step needs a full set of micro-batches (an empty one crashes).
    if steps_per_epoch < 1:
        raise ArgsError(
            "the dataset is smaller than one optimizer step "
            "(per_device_train_batch_size x processes x gradient_accumulation_steps); lower them or add data"
        )
    if args.max_steps > 0:
        return args.max_steps
    return max(1, int(steps_per_epoch * args.num_train_epochs))


# ---------------------------------------------------------------------------------------------
# Metrics and preemption


class MetricsLogger:
    """Rank 0 appends one JSON object per line to `<output_dir>/metrics.jsonl`, mirrors to wandb."""

    def __init__(
        self,
        output_dir: str,
        stage: str,
        args: TrainingArgs,
        dist: Dist,
        config: dict[str, Any],
        resume_step: int,
    ):
        self.enabled = dist.rank == 0
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_records_after(self.path, resume_step)
        if args.report_to == "wandb":
            from trainer.tracking import open_run

            self.wandb = open_run(output_dir, stage, args.run_name, config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()

    def last(self, key: str) -> dict[str, Any]:
        """The newest record in metrics.jsonl that has ``key`` ({} if none)."""
        found: dict[str, Any] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                record = json.loads(line)
                if key in record:
                    found = record
        return found


def drop_records_after(path: Path, step: int) -> None:
    """Keep the records of a `.jsonl` log up to ``step``: a resumed run logs the later steps again."""
    if path.exists():
        kept = [
            ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step
        ]
        from trainer.contract.output import atomic_write_text

        atomic_write_text(path, "".join(k + "\n" for k in kept))


class Preemption:
    """SIGTERM (pod eviction, `kubectl delete`) sets a flag; the loop saves and exits at a step boundary."""

    def __init__(self) -> None:
        self.requested = False
        with contextlib.suppress(ValueError):  # not the main thread (tests): no handler, no preemption
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        logger.warning("SIGTERM received: saving a checkpoint at the end of this step")

    def agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (so all ranks save together)."""
        import torch
        import torch.distributed as td

        flag = all_reduce_(torch.tensor([1.0 if self.requested else 0.0]), op=td.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _host_collective(tensor: Any, collective: Any) -> Any:
    """Run `collective(t)` in place on a small host tensor, on the device the backend needs: NCCL takes
    CUDA tensors only, gloo CPU ones. A no-op without a process group."""
    import torch.distributed as td

    if not td.is_initialized():
        return tensor
    if td.get_backend() == "nccl":
        moved = tensor.cuda()
        collective(moved)
        tensor.copy_(moved.cpu())
    else:
        collective(tensor)
    return tensor


def all_reduce_(tensor: Any, op: Any = None) -> Any:
    """In-place all-reduce (default: sum) of a small host tensor: metrics, counts, flags."""
    import torch.distributed as td

    op = td.ReduceOp.SUM if op is None else op
    return _host_collective(tensor, lambda t: td.all_reduce(t, op=op))


def broadcast_(tensor: Any, src: int = 0) -> Any:
    """In-place broadcast of a small host tensor from rank `src`."""
    import torch.distributed as td

    return _host_collective(tensor, lambda t: td.broadcast(t, src=src))


PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the pod failed (to be retried), not completed


def setup_logging(dist: Dist) -> None:
    level = logging.INFO if dist.rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank{dist.rank}] %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("colossalai", "transformers", "datasets", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def progress(total: int, initial: int, desc: str, dist: Dist):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, disable=dist.rank != 0, dynamic_ncols=True, file=sys.stderr
    )


def public_fields(obj: Any) -> list[str]:
    return [f.name for f in fields(obj)]


# ---------------------------------------------------------------------------------------------
# Bad input: the same verdict, error and exit code on every rank

_setup_agreed = False  # agree_on_setup() has run in this process group


class AgreedError(ArgsError):
    """Bad input found during set-up on some rank, raised on every rank by :func:`agree_on_setup`."""


def agree_on_setup(error: BaseException | None = None) -> None:
    """The end of a stage's set-up (flags, model, data, token lengths), before its first collective.

    Every rank says whether its set-up failed on bad input (``error``, passed by :func:`bad_input_exit`);
    when any did, every rank raises the same :class:`AgreedError`, with the lowest failing rank's message.
    So a rank that fails alone (a file another node does not have) cannot leave the others waiting in a
    collective or failing later on another row. A no-op in a world of one (``error`` is raised as it is).
    """
    import torch.distributed as td

    global _setup_agreed
    if not td.is_initialized() or td.get_world_size() == 1:
        if error is not None:
            raise error
        return
    _setup_agreed = True
    said: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(said, None if error is None else str(error))
    failed = [(rank, message) for rank, message in enumerate(said) if message is not None]
    if not failed:
        return
    rank, message = failed[0]
    if len(failed) < len(said) or len({m for _, m in failed}) > 1:
        message = f"on rank {rank}: {message}"
    raise AgreedError(message)


def bad_input_exit(prog: str, error: BaseException) -> int:
    """``<prog>: error: <message>`` and exit code 2, the same on every rank.

    Set-up errors go through :func:`agree_on_setup` first (the other ranks meet this rank there); then
    rank 0 alone prints, and no rank exits before it has (torchrun stops the others at the first exit).
    Under torchrun the message also goes to the worker's error file, so torchrun's closing failure
    summary shows it instead of "To enable traceback see ...".
    """
    import torch.distributed as td

    distributed = td.is_initialized() and td.get_world_size() > 1
    if distributed and not _setup_agreed and not isinstance(error, AgreedError):
        try:
            agree_on_setup(error)
        except AgreedError as agreed:
            error = agreed
    message = f"{prog}: error: {error}"
    _write_elastic_error_file(message)
    report_bad_input(message)  # `r1-grpo launch` exits 2 with it, whatever torchrun's exit code
    if distributed and isinstance(error, AgreedError):
        # torchrun stops the other workers when the first one exits: they exit 2 too, having the verdict.
        with contextlib.suppress(ValueError):  # not the main thread: keep the default handler
            signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(BAD_INPUT_EXIT_CODE))
        if td.get_rank() == 0:
            print(message, flush=True)
        td.barrier()
    else:
        print(message, flush=True)
    return BAD_INPUT_EXIT_CODE


def _write_elastic_error_file(message: str) -> None:
    """The error file torchrun's agent reads when a worker fails (TORCHELASTIC_ERROR_FILE), in the layout
    of torch.distributed.elastic's ``@record``; written to a temporary name, then renamed."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):
        tmp = f"{path}.tmp-{os.getpid()}"
        Path(tmp).write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)
