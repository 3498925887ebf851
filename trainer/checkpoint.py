"""Training state in `checkpoint-<step>/`: model and optimizer shards through the Colossal-AI Booster,
scheduler, per-rank RNG, the data position; and the final model export at the stage folder's root.

The folder layout and its atomic completion live in :mod:`trainer.contract.output`; this module fills
the folders.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer.contract.output import (
    CHECKPOINT_PREFIX,
    TEMP_CHECKPOINT_PREFIX,
    TRAINER_STATE_NAME,
    UNSHARDED_OPTIMIZER_NAME,
    StageOutputError,
    _fsync_dir,
    _jsonable,
    atomic_write_json,
    weight_files,
)
from trainer.runtime import ArgsError, Dist

logger = logging.getLogger(__name__)


def capture_rng_state(generators: Mapping[str, Any] | None = None) -> dict[str, Any]:
    import numpy as np
    import torch

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, Any] | None = None) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])


def save_training_checkpoint(
    booster: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    output_dir: str | os.PathLike,
    step: int,
    trainer_state: Mapping[str, Any],
    dist: Dist,
    generators: Mapping[str, Any] | None = None,
) -> Path:
    """Write `checkpoint-<step>/` through a temp folder; every rank must call it."""
    import torch

    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f"{TEMP_CHECKPOINT_PREFIX}{step}"
    if dist.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "optimizer").mkdir()
    dist.barrier()
    # Torch shards, not safetensors: safetensors refuses tied weights (embeddings = lm_head).
    booster.save_model(model, str(tmp / "model"), shard=True, use_safetensors=False)
    if torch.cuda.is_available():
        booster.save_optimizer(optimizer, str(tmp / "optimizer"), shard=True)
    else:
        # colossalai 0.5.0 loads sharded optimizer states through accelerator.synchronize(), which its CPU
        # accelerator refuses; on CPU (ddp only: the state is a full replica) one file in optimizer/.
        booster.save_optimizer(optimizer, str(tmp / "optimizer" / UNSHARDED_OPTIMIZER_NAME), shard=False)
    if dist.rank == 0 and scheduler is not None:
        booster.save_lr_scheduler(scheduler, str(tmp / "scheduler.pt"))
    torch.save(capture_rng_state(generators), tmp / f"rng_state_{dist.rank}.pt")
    dist.barrier()
    if dist.rank == 0:
        state = dict(trainer_state, step=step, world_size=dist.world_size)
        atomic_write_json(tmp / TRAINER_STATE_NAME, _jsonable(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
    dist.barrier()
    return final


def load_training_checkpoint(
    booster: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    checkpoint_dir: str | os.PathLike,
    dist: Dist,
    generators: Mapping[str, Any] | None = None,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns `trainer_state.json`. Refused
    (nothing loaded) when the checkpoint's world size, or its total steps, differ from this run's."""
    import torch

    checkpoint_dir = Path(checkpoint_dir)
    state = json.loads((checkpoint_dir / TRAINER_STATE_NAME).read_text())
    if state.get("world_size", dist.world_size) != dist.world_size:
        raise StageOutputError(
            f"{checkpoint_dir}: saved with world size {state['world_size']}, resuming with {dist.world_size}; "
            "bit-exact resume needs the same number of processes"
        )
    saved_total = state.get("total_steps", total_steps)
    if total_steps is not None and saved_total != total_steps:
        # The learning-rate (and GRPO temperature) schedules are functions of the total: a different one
        # would silently bend them at the resumed step.
        raise ArgsError(
            f"--max_steps: {checkpoint_dir} belongs to a run of {saved_total} steps, this run has "
            f"{total_steps}; resume with the same --max_steps (and epochs, batch sizes and processes), or "
            "use a new --output_dir"
        )
    booster.load_model(model, str(checkpoint_dir / "model"))
    unsharded = checkpoint_dir / "optimizer" / UNSHARDED_OPTIMIZER_NAME
    booster.load_optimizer(optimizer, str(unsharded if unsharded.is_file() else checkpoint_dir / "optimizer"))
    if scheduler is not None:
        booster.load_lr_scheduler(scheduler, str(checkpoint_dir / "scheduler.pt"))
    rng = torch.load(checkpoint_dir / f"rng_state_{dist.rank}.pt", weights_only=False)
    restore_rng_state(rng, generators)
    return state


def save_final_model(
    booster: Any,
    model: Any,
    tokenizer: Any,
    output_dir: str | os.PathLike,
    dist: Dist,
    full_replica: bool,
    dtype: Any = None,
) -> None:
    """Export the final model at the folder root in safetensors, loadable with `from_pretrained`, its
    weights in ``dtype`` (default: as they are; `trainer.modeling.save_dtype` picks it for the stages).

    `full_replica` (DDP): every rank holds all weights, rank 0 saves them directly. Otherwise (ZeRO,
    Gemini, 3D) the Booster gathers the shards into torch files first and rank 0 converts them; both
    go through `save_pretrained`, which handles tied embeddings that raw safetensors refuses.
    """
    from trainer.modeling import cast_state_dict, set_saved_dtype
    from trainer.rl.logprobs import unwrap_model

    output_dir = Path(output_dir)
    if dist.rank == 0:
        for p in weight_files(output_dir):  # a previous export's shards would be left dangling
            p.unlink()
    unwrapped = unwrap_model(model)
    dtype = dtype or unwrapped.dtype
    gathered = output_dir / ".tmp-export"
    if not full_replica:
        if dist.rank == 0:
            shutil.rmtree(gathered, ignore_errors=True)
        dist.barrier()
        booster.save_model(model, str(gathered), shard=True, use_safetensors=False)
    dist.barrier()
    if dist.rank == 0:
        if full_replica:
            state = cast_state_dict(unwrapped, dtype)
            unwrapped.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
            del state
            set_saved_dtype(output_dir, dtype)
        else:
            from transformers import AutoModelForCausalLM

            unwrapped.config.save_pretrained(gathered)
            full = AutoModelForCausalLM.from_pretrained(gathered, torch_dtype=dtype)
            full.generation_config = unwrapped.generation_config
            full.save_pretrained(output_dir, safe_serialization=True)
            shutil.rmtree(gathered, ignore_errors=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        logger.info("final model saved in %s", str(dtype).removeprefix("torch."))
    dist.barrier()
