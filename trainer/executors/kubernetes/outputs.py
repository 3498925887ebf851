"""The stage folders on the checkpoint volume as the controller sees them: complete checkpoints, the verified
output of a finished stage (hashed once per change of the files), and whose folder it is (ownership.py). A
mixin of the Controller (it uses `self.config`, `self._verifier` and the Controller's `_write`)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path, PurePosixPath

from trainer.contract.output import (
    StageManifest,
    StageOutputError,
    complete_checkpoints,
    read_owner,
    verify_stage_output,
    write_owner,
)
from trainer.executors.kubernetes.ownership import check_folder, owner_record
from trainer.executors.kubernetes.spec import SUCCEEDED, ControllerConfig, Pipeline, StageSpec
from trainer.executors.kubernetes.world import OutputState


class OutputVerifier:
    """verify_stage_output with a cache keyed by file metadata: hashing large weights once, not every pass."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple, StageManifest | None, str | None]] = {}

    @staticmethod
    def _fingerprint(folder: Path) -> tuple:
        try:
            entries = sorted(
                (e.name, e.stat().st_size, e.stat().st_mtime_ns, e.inode())
                for e in os.scandir(folder)
                if e.is_file()
            )
        except OSError:
            return ()
        return tuple(entries)

    def verify(self, folder: Path, stage: str) -> tuple[StageManifest | None, str | None]:
        key = str(folder)
        fp = self._fingerprint(folder)
        cached = self._cache.get(key)
        if cached and cached[0] == fp and fp:
            return cached[1], cached[2]
        try:
            manifest, error = verify_stage_output(folder, stage), None
        except StageOutputError as e:
            manifest, error = None, str(e)
        self._cache[key] = (fp, manifest, error)
        return manifest, error


class StageOutputs:
    config: ControllerConfig
    _verifier: OutputVerifier

    def local_path(self, pipeline: Pipeline, job_path: str) -> Path:
        """Where this pod sees a path the jobs use (the volume may be mounted elsewhere here)."""
        rel = PurePosixPath(job_path).relative_to(pipeline.mount_path)
        return Path(self.config.mount_path or pipeline.mount_path) / rel

    def _output_state(self, pipeline: Pipeline, spec: StageSpec, phase: str | None) -> OutputState:
        local = self.local_path(pipeline, spec.output_dir)
        steps = tuple(step for step, _ in complete_checkpoints(local))
        latest = str(PurePosixPath(spec.output_dir) / f"checkpoint-{steps[-1]}") if steps else None
        manifest, error = None, None
        if phase == SUCCEEDED:  # hashing is only worth it once the job says it is done
            manifest, error = self._verifier.verify(local, spec.name)
            if error:
                error = error.replace(str(local), spec.output_dir)  # name the path as the user knows it
        return OutputState(steps, latest, manifest, error)

    def _ownership(self, pipeline: Pipeline, spec: StageSpec, out: OutputState | None) -> OutputState:
        """The output state, marked stale when the folder holds another install's or input's work."""
        out = out or OutputState()
        if not pipeline.configmap_uid:  # no install identity to compare (not a real API server)
            return out
        expected = owner_record(pipeline, spec, lambda p: self.local_path(pipeline, p))
        reason, target = check_folder(self.local_path(pipeline, spec.output_dir), expected)
        if reason is None or target is None:
            return out
        return replace(
            out, stale=reason, stale_target=str(PurePosixPath(spec.output_dir).with_name(target.name))
        )

    def _claim_folder(self, pipeline: Pipeline, spec: StageSpec) -> None:
        """Record in the stage folder which install and input it is for, before its job starts."""
        if not pipeline.configmap_uid:
            return
        local = self.local_path(pipeline, spec.output_dir)
        expected = owner_record(pipeline, spec, lambda p: self.local_path(pipeline, p))
        if read_owner(local) == expected:
            return
        self._write(f"claim {spec.output_dir}")
        local.mkdir(parents=True, exist_ok=True)
        write_owner(local, expected)
