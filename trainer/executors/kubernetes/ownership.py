"""Which install of a release, and which input, a stage folder belongs to: the staleness rule on a cluster.

The checkpoint volume outlives `helm uninstall` (its claim is kept on purpose), so a new install of the same
release finds the old install's stage folders at the same paths: its trainers would resume from the old
checkpoints and the controller would hand the old outputs on. As in the local pipeline (docs/contract.md),
a folder made by another install or from another input is moved aside (renamed `<stage>.stale-<n>`,
never deleted) and the stage starts over.

Before it creates a stage's job, the controller records in the stage folder (`r1_owner.json`) what the
folder is for: the release; the install, i.e. the uid of the stages ConfigMap, which a reinstall creates
anew and `helm upgrade` keeps; and the input: the stage's modelFrom and, when that is an earlier stage's
folder, a digest of that stage's `r1_stage.json` (it changes whenever that stage ran again). When the
controller is about to create a job for a stage whose folder holds work recorded for something else (or
not recorded at all), it moves the folder aside first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.contract.output import MANIFEST_NAME, holds_work, read_owner, stale_name
from trainer.executors.kubernetes.spec import Pipeline, StageSpec


def owner_record(pipeline: Pipeline, spec: StageSpec, local_path: Callable[[str], Path]) -> dict[str, Any]:
    """What the stage's folder is for. `local_path` maps a path of the jobs to this process's view."""
    digest = None
    if any(s.output_dir == spec.model_from for s in pipeline.stages):
        # the upstream stage's manifest changes whenever that stage ran again
        try:
            digest = hashlib.sha256((local_path(spec.model_from) / MANIFEST_NAME).read_bytes()).hexdigest()[
                :16
            ]
        except OSError:
            digest = None  # unknown: no evidence either way
    return {
        "release": pipeline.release,
        "install": pipeline.configmap_uid,
        "stage": spec.name,
        "modelFrom": spec.model_from,
        "input": digest,
    }


def stale_reason(found: dict[str, Any] | None, expected: dict[str, Any]) -> str | None:
    """Why a folder holding work is not this install's folder for this input (None: it is)."""
    if found is None:
        return "it was not started by this install (no r1_owner.json: an earlier install, or made by hand)"
    if found.get("install") != expected["install"]:
        return (
            f"it was made by another install of release {expected['release']} (stages ConfigMap uid "
            f"{found.get('install')}; this install's is {expected['install']})"
        )
    if found.get("modelFrom") != expected["modelFrom"]:
        return f"it was made from another input ({found.get('modelFrom')!r}; now {expected['modelFrom']!r})"
    if expected["input"] and found.get("input") and found["input"] != expected["input"]:
        return (
            f"it was made from an earlier output of {expected['modelFrom']} (its {MANIFEST_NAME} has changed "
            f"since: the input stage ran again)"
        )
    return None


def check_folder(local: Path, expected: dict[str, Any]) -> tuple[str | None, Path | None]:
    """(reason, where to move it) when the stage folder `local` must be moved aside, else (None, None)."""
    if not holds_work(local):
        return None, None
    reason = stale_reason(read_owner(local), expected)
    return (reason, stale_name(local)) if reason else (None, None)
