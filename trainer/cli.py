"""`r1-grpo <command> [flags]`: one entry point for the stages, the local pipeline and the controller.

Each command lives in its own module and is imported only when used, so `r1-grpo status` on a laptop
does not import torch.
"""

from __future__ import annotations

import importlib
import sys

from trainer.contract.stages import STAGE_MODULES

COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (module, function, help)
    "prepare": (
        STAGE_MODULES["prepare"],
        "main",
        "optional first stage: download the hub model and datasets for the later stages (offline)",
    ),
    "sft": (
        STAGE_MODULES["sft"],
        "main",
        "supervised fine-tuning stage (HF-style flags; run under torchrun)",
    ),
    "grpo": (STAGE_MODULES["grpo"], "main", "GRPO stage (HF-style flags; run under torchrun)"),
    "eval": (STAGE_MODULES["eval"], "main", "evaluation stage: pass@1 / pass@k / maj@k"),
    "launch": (
        "trainer.launch",
        "main",
        "run torchrun in a stage pod so that SIGTERM gives the trainers the pod's grace period to save",
    ),
    "pipeline": (
        "trainer.executors.local",
        "main",
        "run [prepare ->] sft -> grpo -> eval locally (`r1-grpo pipeline run`)",
    ),
    "controller": (
        "trainer.executors.kubernetes.cli",
        "main",
        "in-cluster controller that runs the stage PyTorchJobs in order",
    ),
    "status": (
        "trainer.executors.kubernetes.cli",
        "status_main",
        "print a release's run status from a kubeconfig",
    ),
    "data": (
        "trainer.r1.data_inspect",
        "main",
        "`r1-grpo data inspect --dataset_name …`: schema, columns, load report and formatted prompts",
    ),
    "build-tiny": ("trainer.r1.builtin", "main", "build the tiny built-in model into a folder"),
    "prompt": (
        "trainer.r1.prompt",
        "main",
        "print the exact prompt a trained model expects for a question (from its r1_stage.json)",
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: r1-grpo <command> [flags]   (r1-grpo <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += [f"  {'version'.ljust(width)}  print the version"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("version", "--version"):
        from trainer import __version__

        print(__version__)
        return 0
    if command not in COMMANDS:
        print(f"r1-grpo: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[command]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
