"""A stage's output folder: checkpoints, the final export and the `r1_stage.json` manifest.

Layout (docs/contract.md):

    <output_dir>/
        checkpoint-<step>/        complete or absent (written as .tmp-checkpoint-<step>, then renamed)
            model/                Booster-sharded torch files (pytorch_model*.bin + index)
            optimizer/            Booster-sharded optimizer state (on CPU: one optimizer.bin)
            scheduler.pt
            rng_state_<rank>.pt   torch/python/numpy RNG + named generators, one per rank
            trainer_state.json    step, data position, ... (written last inside the temp folder)
        config.json, *.safetensors, tokenizer files     the final model (from_pretrained-loadable)
        r1_stage.json             written last, atomically; nothing trusts the folder without it
        r1_owner.json             on a cluster: the install (and input) the folder was started for

Only rank 0 renames and writes manifests; every rank writes its own shards and RNG file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.contract.stages import MODEL_STAGES, STAGES

logger = logging.getLogger(__name__)

MANIFEST_NAME = "r1_stage.json"
OWNER_NAME = "r1_owner.json"  # which install and input a stage folder belongs to (the controller writes it)
MANIFEST_SCHEMA_VERSION = 1
TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
TEMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
UNSHARDED_OPTIMIZER_NAME = "optimizer.bin"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_RE = re.compile(r"^(.*\.safetensors|pytorch_model.*\.bin)$")


class StageOutputError(Exception):
    """A stage folder that must not be trusted; the message says why, for a user."""


# ---------------------------------------------------------------------------------------------
# Atomic file helpers


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temp file in the same folder and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; the manifest and metrics must stay readable by the other pods/users
        # that share the volume, like every other file the stage writes.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync_dir(folder: Path) -> None:
    # Makes the rename durable on POSIX file systems (ignored where directories can't be opened).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """Weight files of a final export: `*.safetensors` and `pytorch_model*.bin` at the folder root."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and _WEIGHT_RE.match(p.name))


# ---------------------------------------------------------------------------------------------
# The stage manifest


@dataclass
class StageManifest:
    stage: str
    status: str
    steps: int
    inputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    schema_version: int = MANIFEST_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_manifest(
    output_dir: str | os.PathLike,
    stage: str,
    *,
    steps: int,
    inputs: Mapping[str, Any],
    metrics: Mapping[str, Any],
    status: str = "completed",
) -> StageManifest:
    """Hash the weight files at the folder root and write `r1_stage.json` atomically (call it last)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    output_dir = Path(output_dir)
    weights = {p.name: sha256_file(p) for p in weight_files(output_dir)}
    if stage in MODEL_STAGES and status == "completed" and not weights:
        raise StageOutputError(f"{output_dir}: no weight files to record for stage {stage!r}")
    manifest = StageManifest(
        stage=stage,
        status=status,
        steps=int(steps),
        inputs=_jsonable(dict(inputs)),
        metrics=_jsonable(dict(metrics)),
        weights=weights,
        created_at=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    atomic_write_json(output_dir / MANIFEST_NAME, manifest.to_dict())
    return manifest


def read_manifest(folder: str | os.PathLike) -> StageManifest:
    """Parse and type-check `r1_stage.json` (no hashing); raises StageOutputError."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise StageOutputError(f"{path}: missing (the stage did not finish writing its output)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StageOutputError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(data, dict):
        raise StageOutputError(f"{path}: manifest must be a JSON object")
    expected: dict[str, type | tuple[type, ...]] = {
        "schema_version": int,
        "stage": str,
        "status": str,
        "steps": int,
        "inputs": dict,
        "metrics": dict,
        "weights": dict,
        "created_at": str,
    }
    for key, typ in expected.items():
        if key not in data:
            raise StageOutputError(f"{path}: field {key!r} is missing")
        if not isinstance(data[key], typ) or isinstance(data[key], bool) and typ is int:
            raise StageOutputError(f"{path}: field {key!r} has type {type(data[key]).__name__}")
    if data["schema_version"] != MANIFEST_SCHEMA_VERSION:
        raise StageOutputError(f"{path}: schema_version {data['schema_version']} is not supported")
    for name, digest in data["weights"].items():
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise StageOutputError(f"{path}: weights[{name!r}] is not a sha256 hex digest")
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise StageOutputError(f"{path}: weights entry {name!r} is not a file name in the folder")
    unknown = set(data) - set(expected)
    if unknown:
        raise StageOutputError(f"{path}: unknown fields {sorted(unknown)}")
    return StageManifest(**data)


def verify_stage_output(folder: str | os.PathLike, stage: str | None = None) -> StageManifest:
    """The one check that makes a stage folder trustworthy (manifest valid, complete, hashes match)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StageOutputError(f"{folder}: stage output folder does not exist")
    manifest = read_manifest(folder)
    if stage is not None and manifest.stage != stage:
        raise StageOutputError(
            f"{folder / MANIFEST_NAME}: written by stage {manifest.stage!r}, expected {stage!r}"
        )
    if manifest.status != "completed":
        raise StageOutputError(f"{folder / MANIFEST_NAME}: status is {manifest.status!r}, not 'completed'")
    if manifest.stage in MODEL_STAGES and not manifest.weights:
        raise StageOutputError(f"{folder / MANIFEST_NAME}: stage {manifest.stage} lists no weight files")
    for name, digest in manifest.weights.items():
        path = folder / name
        if not path.is_file():
            raise StageOutputError(f"{path}: listed in {MANIFEST_NAME} but missing")
        actual = sha256_file(path)
        if actual != digest:
            raise StageOutputError(
                f"{path}: sha256 {actual[:12]}… does not match {MANIFEST_NAME} ({digest[:12]}…); "
                "the weights changed after the stage finished or the copy is corrupt"
            )
    on_disk = {p.name for p in weight_files(folder)}
    extra = on_disk - set(manifest.weights)
    if extra:
        raise StageOutputError(f"{folder}: weight files not listed in {MANIFEST_NAME}: {sorted(extra)}")
    return manifest


def is_trusted(folder: str | os.PathLike, stage: str | None = None) -> bool:
    try:
        verify_stage_output(folder, stage)
    except StageOutputError:
        return False
    return True


def invalidate_manifest(output_dir: str | os.PathLike) -> None:
    """A stage that starts (again) in a folder makes it untrusted until it writes a new manifest."""
    path = Path(output_dir) / MANIFEST_NAME
    if path.exists():
        path.unlink()
        _fsync_dir(path.parent)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ---------------------------------------------------------------------------------------------
# Ownership: which run a folder belongs to, and moving a stale folder aside


def read_owner(folder: str | os.PathLike) -> dict[str, Any] | None:
    """`r1_owner.json` of a stage folder; None when absent or unreadable (an unknown owner)."""
    try:
        data = json.loads((Path(folder) / OWNER_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_owner(folder: str | os.PathLike, owner: Mapping[str, Any]) -> None:
    atomic_write_json(Path(folder) / OWNER_NAME, dict(owner))


def holds_work(folder: str | os.PathLike) -> bool:
    """Whether a folder holds anything a stage made (its owner record alone is nothing to keep)."""
    folder = Path(folder)
    return folder.is_dir() and any(p.name != OWNER_NAME for p in folder.iterdir())


def stale_name(folder: str | os.PathLike) -> Path:
    """Where `move_aside` would put `folder`: `<name>.stale-<n>`, n the lowest unused number."""
    folder = Path(folder)
    n = 1
    while folder.with_name(f"{folder.name}.stale-{n}").exists():
        n += 1
    return folder.with_name(f"{folder.name}.stale-{n}")


def move_aside(folder: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """Rename a stage folder that must not be trusted or resumed to `target` (default: `stale_name`).

    Nothing is deleted: the folder may hold the only copy of days of training.
    """
    folder = Path(folder)
    target = Path(target) if target is not None else stale_name(folder)
    if target.exists():  # named by an earlier pass, taken since: take the next free name
        target = stale_name(folder)
    os.rename(folder, target)
    _fsync_dir(folder.parent)
    return target


# ---------------------------------------------------------------------------------------------
# checkpoint-<step>/ folders


def complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """`(step, path)` of every complete checkpoint, oldest first; partial ones are logged and skipped."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        if not (p / TRAINER_STATE_NAME).is_file():
            logger.warning("ignoring partial checkpoint %s (no %s)", p, TRAINER_STATE_NAME)
            continue
        found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    for p in Path(output_dir).glob(f"{TEMP_CHECKPOINT_PREFIX}*") if Path(output_dir).is_dir() else []:
        logger.warning("ignoring partial checkpoint %s (interrupted while saving)", p)
    ckpts = complete_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Remove all but the newest `keep` complete checkpoints; never touches the final export."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    ckpts = complete_checkpoints(output_dir)
    removed = []
    for _, path in ckpts[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
