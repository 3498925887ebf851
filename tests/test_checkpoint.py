"""The stage folder contract: `r1_stage.json`, atomic writes and `checkpoint-<step>/` bookkeeping."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import stat
from pathlib import Path

import pytest

from trainer import checkpoint as ckpt
from trainer.contract import output as contract
from trainer.contract.output import StageOutputError
from trainer.runtime import Dist


def _weights(folder: Path, name: str = "model.safetensors", data: bytes = b"weights-v1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def _sft_folder(tmp_path: Path) -> Path:
    out = tmp_path / "sft"
    _weights(out)
    (out / "config.json").write_text("{}")
    contract.write_manifest(
        out,
        "sft",
        steps=12,
        inputs={"model_name_or_path": "builtin:tiny", "args": {"lr": 2e-5}},
        metrics={"train_loss": 0.5},
    )
    return out


def _rewrite(folder: Path, **changes) -> None:
    path = folder / contract.MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------
# The manifest


def test_write_read_verify_roundtrip(tmp_path: Path) -> None:
    out = _sft_folder(tmp_path)
    data = json.loads((out / contract.MANIFEST_NAME).read_text())
    assert set(data) == {
        "schema_version",
        "stage",
        "status",
        "steps",
        "inputs",
        "metrics",
        "weights",
        "created_at",
    }
    assert data["weights"] == {"model.safetensors": hashlib.sha256(b"weights-v1").hexdigest()}
    assert data["schema_version"] == 1 and data["status"] == "completed" and data["steps"] == 12
    assert data["created_at"].endswith("Z")

    manifest = contract.verify_stage_output(out, "sft")
    assert manifest == contract.read_manifest(out)
    assert manifest.inputs == {"model_name_or_path": "builtin:tiny", "args": {"lr": 2e-5}}
    assert manifest.metrics == {"train_loss": 0.5}
    assert contract.verify_stage_output(out).stage == "sft"  # stage=None accepts any stage
    assert contract.is_trusted(out, "sft")


def test_manifest_inputs_that_json_cannot_hold_are_stringified(tmp_path: Path) -> None:
    _weights(tmp_path)
    manifest = contract.write_manifest(tmp_path, "grpo", steps=1, inputs={"path": tmp_path}, metrics={})
    assert manifest.inputs == {"path": str(tmp_path)}
    assert contract.verify_stage_output(tmp_path, "grpo").inputs == {"path": str(tmp_path)}


def test_missing_manifest(tmp_path: Path) -> None:
    _weights(tmp_path)
    with pytest.raises(StageOutputError, match=r"r1_stage\.json: missing"):
        contract.verify_stage_output(tmp_path)
    assert not contract.is_trusted(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(StageOutputError, match="does not exist"):
        contract.verify_stage_output(tmp_path / "nope")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "unreadable manifest"),
        ("[1, 2]", "must be a JSON object"),
        (b"\xff\xfe".decode("latin-1"), "unreadable manifest"),
    ],
)
def test_unparsable_manifest(tmp_path: Path, text: str, reason: str) -> None:
    out = _sft_folder(tmp_path)
    (out / contract.MANIFEST_NAME).write_text(text, encoding="latin-1")
    with pytest.raises(StageOutputError, match=reason) as e:
        contract.verify_stage_output(out)
    assert str(out / contract.MANIFEST_NAME) in str(e.value)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"steps": True}, "field 'steps' has type bool"),
        ({"steps": "12"}, "field 'steps' has type str"),
        ({"weights": []}, "field 'weights' has type list"),
        ({"schema_version": 2}, "schema_version 2 is not supported"),
        ({"extra": 1}, r"unknown fields \['extra'\]"),
        ({"weights": {"model.safetensors": "abc"}}, "not a sha256 hex digest"),
        ({"weights": {"../model.safetensors": "0" * 64}}, "not a file name in the folder"),
    ],
)
def test_malformed_manifest_fields(tmp_path: Path, changes: dict, reason: str) -> None:
    out = _sft_folder(tmp_path)
    _rewrite(out, **changes)
    with pytest.raises(StageOutputError, match=reason):
        contract.verify_stage_output(out)


def test_missing_field_is_named(tmp_path: Path) -> None:
    out = _sft_folder(tmp_path)
    data = json.loads((out / contract.MANIFEST_NAME).read_text())
    del data["status"]
    (out / contract.MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(StageOutputError, match="field 'status' is missing"):
        contract.read_manifest(out)


def test_wrong_stage(tmp_path: Path) -> None:
    out = _sft_folder(tmp_path)
    with pytest.raises(StageOutputError, match="written by stage 'sft', expected 'grpo'"):
        contract.verify_stage_output(out, "grpo")
    assert not contract.is_trusted(out, "grpo")


def test_not_completed(tmp_path: Path) -> None:
    _weights(tmp_path)
    contract.write_manifest(tmp_path, "sft", steps=3, inputs={}, metrics={}, status="failed")
    with pytest.raises(StageOutputError, match="status is 'failed', not 'completed'"):
        contract.verify_stage_output(tmp_path, "sft")


def test_sha_mismatch(tmp_path: Path) -> None:
    out = _sft_folder(tmp_path)
    (out / "model.safetensors").write_bytes(b"weights-v2")
    with pytest.raises(
        StageOutputError, match=r"model\.safetensors: sha256 .* does not match r1_stage\.json"
    ):
        contract.verify_stage_output(out, "sft")


def test_listed_weight_file_missing(tmp_path: Path) -> None:
    out = _sft_folder(tmp_path)
    (out / "model.safetensors").unlink()
    with pytest.raises(StageOutputError, match="listed in r1_stage.json but missing"):
        contract.verify_stage_output(out)


@pytest.mark.parametrize(
    "extra", ["model-00002-of-00002.safetensors", "pytorch_model.bin", "adapter.safetensors"]
)
def test_extra_unlisted_weight_file(tmp_path: Path, extra: str) -> None:
    out = _sft_folder(tmp_path)
    _weights(out, extra, b"stray")
    with pytest.raises(StageOutputError, match=f"weight files not listed in r1_stage.json: \\['{extra}'\\]"):
        contract.verify_stage_output(out)


def test_training_stage_needs_weights(tmp_path: Path) -> None:
    with pytest.raises(StageOutputError, match="no weight files to record for stage 'grpo'"):
        contract.write_manifest(tmp_path, "grpo", steps=1, inputs={}, metrics={})
    assert not (tmp_path / contract.MANIFEST_NAME).exists()
    # A hand-written (or truncated) manifest of a training stage with no weights is refused too.
    _weights(tmp_path / "x")
    contract.write_manifest(tmp_path / "x", "sft", steps=1, inputs={}, metrics={})
    _rewrite(tmp_path / "x", weights={})
    (tmp_path / "x" / "model.safetensors").unlink()
    with pytest.raises(StageOutputError, match="stage sft lists no weight files"):
        contract.verify_stage_output(tmp_path / "x")


def test_eval_stage_without_weights_is_fine(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("{}")
    manifest = contract.write_manifest(tmp_path, "eval", steps=0, inputs={}, metrics={"accuracy": 0.25})
    assert manifest.weights == {}
    assert contract.verify_stage_output(tmp_path, "eval").metrics == {"accuracy": 0.25}


def test_unknown_stage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown stage 'dpo'"):
        contract.write_manifest(tmp_path, "dpo", steps=0, inputs={}, metrics={})


def test_invalidate_manifest(tmp_path: Path) -> None:
    out = _sft_folder(tmp_path)
    contract.invalidate_manifest(out)
    assert not (out / contract.MANIFEST_NAME).exists()
    assert not contract.is_trusted(out)
    contract.invalidate_manifest(out)  # nothing to remove is fine


def test_weight_files_selection(tmp_path: Path) -> None:
    names = [
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "pytorch_model.bin",
        "pytorch_model-00001-of-00002.bin",
        "model.safetensors.index.json",
        "optimizer.bin",
        "config.json",
    ]
    for n in names:
        (tmp_path / n).write_text("x")
    (tmp_path / "sub.safetensors").mkdir()
    assert [p.name for p in contract.weight_files(tmp_path)] == [
        "model-00001-of-00002.safetensors",
        "model.safetensors",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model.bin",
    ]


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = random.Random(0).randbytes(3 * 1024 * 1024 + 17)  # several read chunks
    (tmp_path / "blob").write_bytes(data)
    assert contract.sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    assert contract.sha256_file(tmp_path / "blob", chunk_size=1000) == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_writes_leave_no_temp_files(tmp_path: Path) -> None:
    contract.atomic_write_text(tmp_path / "a" / "notes.txt", "one\n")
    contract.atomic_write_text(tmp_path / "a" / "notes.txt", "two\n")
    contract.atomic_write_json(tmp_path / "a" / "data.json", {"b": 1, "a": [1, 2]})
    _weights(tmp_path / "a")
    contract.write_manifest(tmp_path / "a", "sft", steps=1, inputs={}, metrics={})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "data.json",
        "model.safetensors",
        "notes.txt",
        "r1_stage.json",
    ]
    assert (tmp_path / "a" / "notes.txt").read_text() == "two\n"
    assert json.loads((tmp_path / "a" / "data.json").read_text()) == {"a": [1, 2], "b": 1}


def test_atomic_write_is_readable_by_others(tmp_path: Path) -> None:
    # Stage folders live on a shared volume; a 0600 manifest would be unreadable to another user.
    contract.atomic_write_json(tmp_path / "r1_stage.json", {})
    assert stat.S_IMODE((tmp_path / "r1_stage.json").stat().st_mode) == 0o644


def test_failed_atomic_write_keeps_old_file_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")  # os.replace cannot put a file over a non-empty folder
    with pytest.raises(OSError):
        contract.atomic_write_text(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    assert (target / "keep").read_text() == "x"


# ---------------------------------------------------------------------------------------------
# checkpoint-<step>/ folders


def _checkpoint(out: Path, name: str, complete: bool = True) -> Path:
    path = out / name
    (path / "model").mkdir(parents=True)
    if complete:
        (path / contract.TRAINER_STATE_NAME).write_text(json.dumps({"step": 0}))
    return path


def test_complete_checkpoints_skip_partial_ones(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-7"):
        _checkpoint(tmp_path, name)
    _checkpoint(tmp_path, "checkpoint-12", complete=False)  # no trainer_state.json: not to be trusted
    _checkpoint(tmp_path, ".tmp-checkpoint-14", complete=True)  # killed while saving
    _checkpoint(tmp_path, "checkpoint-abc")
    (tmp_path / "checkpoint-20").write_text("a file, not a folder")
    with caplog.at_level(logging.WARNING, logger="trainer.contract.output"):
        found = contract.complete_checkpoints(tmp_path)
        latest = contract.latest_checkpoint(tmp_path)
    assert [step for step, _ in found] == [2, 7, 10]  # numeric, not lexical, order
    assert [p.name for _, p in found] == ["checkpoint-2", "checkpoint-7", "checkpoint-10"]
    assert latest == tmp_path / "checkpoint-10"
    messages = caplog.text
    assert f"ignoring partial checkpoint {tmp_path / 'checkpoint-12'}" in messages
    assert f"ignoring partial checkpoint {tmp_path / '.tmp-checkpoint-14'}" in messages


def test_no_checkpoints(tmp_path: Path) -> None:
    assert contract.complete_checkpoints(tmp_path / "missing") == []
    assert contract.latest_checkpoint(tmp_path / "missing") is None
    _checkpoint(tmp_path, "checkpoint-3", complete=False)
    assert contract.latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize("keep", [1, 2, 3, 5])
def test_prune_keeps_exactly_the_newest(tmp_path: Path, keep: int) -> None:
    for step in (4, 8, 12, 16):
        _checkpoint(tmp_path, f"checkpoint-{step}")
    _checkpoint(tmp_path, "checkpoint-20", complete=False)
    _weights(tmp_path)  # the final export at the root is never touched
    removed = contract.prune_checkpoints(tmp_path, keep)
    kept = [step for step, _ in contract.complete_checkpoints(tmp_path)]
    assert kept == [4, 8, 12, 16][-keep:]
    assert sorted(p.name for p in removed) == sorted(
        f"checkpoint-{s}" for s in [4, 8, 12, 16][: max(0, 4 - keep)]
    )
    assert all(not p.exists() for p in removed)
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "checkpoint-20").exists()


def test_prune_rejects_keep_zero(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep must be >= 1"):
        contract.prune_checkpoints(tmp_path, 0)


def test_rng_state_roundtrip() -> None:
    import numpy as np
    import torch

    sampling = torch.Generator().manual_seed(3)
    torch.rand(5, generator=sampling)
    state = ckpt.capture_rng_state({"sampling": sampling})

    def draw() -> tuple:
        return (
            random.random(),
            float(np.random.rand()),
            torch.rand(3).tolist(),
            torch.rand(3, generator=sampling).tolist(),
        )

    first = draw()
    draw()
    ckpt.restore_rng_state(state, {"sampling": sampling})
    assert draw() == first


def test_dist_defaults_to_a_world_of_one() -> None:
    dist = Dist.from_torch()
    assert (dist.rank, dist.world_size) == (0, 1)
    dist.barrier()
