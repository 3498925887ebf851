"""Models in and out of a stage: the `--model_name_or_path` folder checked, the weights loaded in the dtype
they train in and where they train, the frozen KL reference loaded the same way, and the dtype the final
model is saved in.

Memory (docs/memory.md): no float32 copy is made of a model that trains in bfloat16, and on GPUs (every
plugin; zero2, gemini and 3d then shard it) every rank streams the memory-mapped weight files straight to
its GPU, so the node's host RAM holds one page-cache copy of the files, shared by its ranks, instead of one
private copy of the model per rank.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from trainer.runtime import ArgsError, best_attention, check_device_flags

logger = logging.getLogger("r1_grpo")

SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_WEIGHTS = re.compile(r"^(model.*\.safetensors|pytorch_model.*\.bin)$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_folder(name_or_path: str, path: str) -> None:
    """ArgsError (exit code 2) naming what ``path`` lacks to be a model: a missing folder, a training
    checkpoint, a stage folder without its final model, a folder without config, weights or tokenizer.
    A hub id (``org/name``) that is not a local folder is left to the hub."""
    folder = Path(path).expanduser()
    flag = f"--model_name_or_path {name_or_path!r}"
    if not folder.exists():
        if _HUB_ID.match(name_or_path) and not name_or_path.startswith("."):
            return  # maybe a hub id: from_pretrained says whether the hub has it
        raise ArgsError(f"{flag}: no such folder")
    if not folder.is_dir():
        raise ArgsError(f"{flag}: a file, not a model folder")
    if (folder / "trainer_state.json").is_file() or re.fullmatch(r"checkpoint-\d+", folder.name):
        raise ArgsError(f"{flag}: a training checkpoint; pass the stage folder ({folder.parent})")
    names = {p.name for p in folder.iterdir()}
    if "config.json" not in names:
        if any(re.fullmatch(r"checkpoint-\d+", n) for n in names):
            raise ArgsError(
                f"{flag}: a stage folder without its final model (no config.json; the stage has not "
                "finished: rerun it to resume from its newest checkpoint)"
            )
        raise ArgsError(f"{flag}: not a model folder (no config.json)")
    if not any(_WEIGHTS.match(n) for n in names):
        raise ArgsError(
            f"{flag}: no model weights (model*.safetensors or pytorch_model*.bin) beside config.json"
        )
    if not any(n in names for n in _TOKENIZER_FILES):
        raise ArgsError(f"{flag}: no tokenizer (tokenizer.json or tokenizer_config.json) beside the model")


def training_dtype(args: Any) -> Any:
    """The dtype the weights train in: bfloat16 under --bf16 on the plugins that cast the model (their
    optimizers keep the float32 master copy, sharded); float32 on ddp, whose --bf16 is autocast over
    float32 weights (evaluation has no plugin: --bf16 is a bfloat16 model)."""
    import torch

    plugin = getattr(args, "plugin", None)
    return torch.bfloat16 if args.bf16 and plugin != "ddp" else torch.float32


def from_pretrained_kwargs(args: Any, device: Any, dtype: Any) -> dict[str, Any]:
    """``from_pretrained`` arguments: ``dtype`` at load (no float32 model first); on a GPU the weights go
    from the memory-mapped files straight to this rank's GPU (``device_map`` of one device: no hooks, the
    plugin shards from there), so the ranks of a node share one page-cache copy instead of each holding
    the model in host RAM."""
    kwargs: dict[str, Any] = {
        "torch_dtype": dtype,
        "attn_implementation": args.attn_implementation or best_attention(),
    }
    if device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}
    return kwargs


def load_pretrained(path: str, args: Any, device: Any, dtype: Any, name_or_path: str | None = None):
    """The causal LM at ``path`` in ``dtype`` on ``device`` (no other copy of it in host memory)."""
    from transformers import AutoModelForCausalLM

    kwargs = from_pretrained_kwargs(args, device, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise load_error(name_or_path or path, path, "model", e) from e
    return model.to(device)


def load_error(name_or_path: str, path: str, what: str, error: OSError) -> ArgsError:
    """One line for a model or tokenizer that did not load (HF's messages run over several lines)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    flag = f"--model_name_or_path {name_or_path!r}"
    if not Path(path).expanduser().exists():
        return ArgsError(
            f"{flag}: no such folder, and no {what} on the Hugging Face Hub by that id ({first})"
        )
    return ArgsError(f"{flag}: cannot load the {what}: {first}")


def load_model_and_tokenizer(name_or_path: str, args: Any, device: Any, dtype: Any = None):
    """The model to train (or evaluate) and its tokenizer; ``dtype`` defaults to :func:`training_dtype`."""
    import torch
    from transformers import AutoTokenizer

    from trainer.r1.builtin import resolve_model

    check_device_flags(args)
    if args.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    path = resolve_model(name_or_path)
    check_model_folder(name_or_path, path)
    dtype = dtype or training_dtype(args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise load_error(name_or_path, path, "tokenizer", e) from e
    model = load_pretrained(path, args, device, dtype, name_or_path)
    where = (
        f"streamed from the memory-mapped weight files to {device} (one page-cache copy per node)"
        if "device_map" in from_pretrained_kwargs(args, device, dtype)
        else f"on {device}"
    )
    logger.info("model %s loaded in %s, %s", name_or_path, str(dtype).removeprefix("torch."), where)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer


def load_reference_weights(name_or_path: str, args: Any, policy: Any, device: Any):
    """The starting weights again, from their files, in the dtype of ``policy`` (the boosted model,
    unwrapped) and on its device: the KL reference's weights without a float32 deep copy of the policy.
    Equal to the policy at step 0: the same files cast the same way (round to nearest)."""
    from trainer.r1.builtin import resolve_model

    params = [p for p in policy.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else training_dtype(args)
    model = load_pretrained(resolve_model(name_or_path), args, device, dtype, name_or_path)
    logger.info(
        "KL reference loaded from %s in %s on %s", name_or_path, str(dtype).removeprefix("torch."), device
    )
    return model


def base_dtype(name_or_path: str) -> Any:
    """The dtype the model at ``name_or_path`` was saved in (its config's ``torch_dtype``), or None."""
    import torch
    from transformers import AutoConfig

    from trainer.r1.builtin import resolve_model

    try:
        saved = AutoConfig.from_pretrained(resolve_model(name_or_path)).torch_dtype
    except (OSError, ValueError):
        return None
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) and saved.is_floating_point else None


def save_dtype(args: Any, model: Any) -> Any:
    """The dtype of the final export: ``--save_dtype``, or (auto) the base model's saved dtype, so a
    bfloat16 base stays bfloat16; else the dtype the weights trained in."""
    import torch

    if getattr(args, "save_dtype", "auto") != "auto":
        return getattr(torch, args.save_dtype)
    return base_dtype(args.model_name_or_path) or next(model.parameters()).dtype


def cast_state_dict(model: Any, dtype: Any) -> dict[str, Any]:
    """``model.state_dict()`` with floating tensors in ``dtype``; tensors that share storage (tied
    embeddings) still share it, so ``save_pretrained`` writes them once."""
    cast: dict[int, Any] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            key = tensor.data_ptr()
            if key not in cast:
                cast[key] = tensor.to(dtype)
            tensor = cast[key]
        out[name] = tensor
    return out


def set_saved_dtype(folder: Path, dtype: Any) -> None:
    """``torch_dtype`` in ``folder/config.json`` (save_pretrained writes the live model's dtype)."""
    from trainer.contract.output import atomic_write_text

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
