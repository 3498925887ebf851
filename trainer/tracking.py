"""Weights & Biases: one run per stage per release, resumed by every retry and resume of that stage.

The run id lives in the stage's output folder (`wandb_run_id`, written once, atomically), so a pod retried
by the controller, a preempted stage resumed from its checkpoint, or `pipeline run` re-run over an
interrupted stage all log into the same run; a stage folder moved aside (`<stage>.stale-<n>`) takes its id
with it and the fresh run gets a new one. The group is the release (`WANDB_RUN_GROUP`, which the chart
sets; else the folder above the stage's, `<root>/<release>/<stage>`), the job type the stage.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any

from trainer.contract.output import atomic_write_text

RUN_ID_FILE = "wandb_run_id"


def stable_run_id(output_dir: str | os.PathLike, stage: str) -> str:
    """The stage folder's W&B run id: read from `wandb_run_id`, or made (`<stage>-<16 hex>`) and written."""
    path = Path(output_dir) / RUN_ID_FILE
    if path.is_file():
        found = path.read_text(encoding="utf-8").strip()
        # W&B ids may hold letters, digits, '-' and '_'; anything else is a damaged file, not an id.
        if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", found):
            return found
    run_id = f"{stage}-{secrets.token_hex(8)}"
    atomic_write_text(path, run_id + "\n")
    return run_id


def run_group(output_dir: str | os.PathLike) -> str:
    return os.environ.get("WANDB_RUN_GROUP") or Path(output_dir).resolve().parent.name


def open_run(output_dir: str | os.PathLike, stage: str, run_name: str | None, config: dict[str, Any]):
    """wandb.init for this stage folder (rank 0 only); offline when no API key and no WANDB_MODE is set."""
    import wandb

    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"  # no key, no network: keep the run on disk
    group = run_group(output_dir)
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "r1-grpo"),
        id=stable_run_id(output_dir, stage),
        resume="allow",
        name=run_name or f"{group}-{stage}",
        group=group,
        job_type=stage,
        dir=str(output_dir),
        config=config,
    )
