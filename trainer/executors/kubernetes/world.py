"""What the controller observes in one pass: jobs, pending items, stage outputs (plain data, parsed from API objects)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.executors.kubernetes.jobkinds import PYTORCHJOB, JobKind
from trainer.executors.kubernetes.jsonlog import logger
from trainer.executors.kubernetes.spec import (
    ATTEMPT_LABEL,
    FAILED,
    STAGE_LABEL,
    SUCCEEDED,
    Pipeline,
    job_name,
)

if TYPE_CHECKING:
    from trainer.executors.kubernetes.status import RunStatus

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from trainer.contract.exits import BAD_INPUT_EXIT_CODE
from trainer.contract.output import (
    StageManifest,
)

# --------------------------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class JobState:
    name: str
    stage: str
    attempt: int
    phase: str  # Submitted (no condition yet), Created, Running, Restarting, Suspended, Succeeded, Failed
    message: str
    created: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    deleting: bool = False
    uid: str = ""
    phase_since: datetime | None = None  # lastTransitionTime of the condition that gives the phase
    replicas: int = 1  # pods the job should have (Master + Workers)


@dataclass(frozen=True)
class PendingItem:
    key: str  # "pod/<name>/<uid>" or "job/<name>": reported at most once
    since: datetime
    message: str
    # seconds after `since` it is reported; None: the controller's pending timeout. An item with its own
    # is a warning about something that is not waiting (its message is shown as it is)
    timeout: float | None = None

    def due(self, pending_timeout_seconds: float) -> datetime:
        return self.since + timedelta(
            seconds=pending_timeout_seconds if self.timeout is None else self.timeout
        )


@dataclass(frozen=True)
class OutputState:
    checkpoints: tuple[int, ...] = ()  # steps of the complete checkpoint-* folders, oldest first
    latest_checkpoint: str | None = None  # as the jobs see it
    manifest: StageManifest | None = None
    error: str | None = None  # why the folder is not trusted (only when verification was needed)
    stale: str | None = None  # why the folder must be moved aside before a job starts in it (ownership.py)
    stale_target: str | None = None  # where to, as the jobs see it


@dataclass(frozen=True)
class World:
    now: datetime
    pipeline: Pipeline
    jobs: dict[str, dict[int, JobState]]  # stage -> attempt -> job
    outputs: dict[str, OutputState]
    pending: tuple[PendingItem, ...]  # for the current stage's current job
    log_tails: dict[str, str]  # job name -> master log tail, for failed jobs whose tail is not yet recorded
    previous: RunStatus  # what the controller recorded last (its only memory; lives in the status ConfigMap)
    # Pods of the current attempt that still run although the attempt is over (failed, or its job gone):
    # the next attempt writes to the same folder, so it waits until they have stopped.
    lingering: tuple[PendingItem, ...] = ()
    # job name -> how its trainer ended, for failed jobs whose exit the status has not recorded yet
    exits: dict[str, TrainerExit] = field(default_factory=dict)
    # why the current job waits for Kueue ("waiting for Kueue admission in LocalQueue q ..."), else None
    admission: str | None = None


@dataclass(frozen=True)
class TrainerExit:
    """How a failed attempt's trainer ended: its container's exit code and the line that says why (the
    termination message `r1-grpo launch` writes on bad input, else the log's last `error:` line)."""

    code: int | None
    error: str = ""


def _ts(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _fmt(value: datetime | None) -> str | None:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def owner_uids(obj: dict) -> list[str]:
    return [str(ref.get("uid")) for ref in (obj.get("metadata") or {}).get("ownerReferences") or []]


def parse_job(obj: dict, pipeline: Pipeline) -> JobState | None:
    """A JobState for one of our jobs, or None (logged) for an object that only looks like one.

    Ours means: this release's labels and name, and (when the stages ConfigMap has a uid) owned by that
    ConfigMap. A job of an earlier install of the release carries the same labels and names but the old
    ConfigMap's uid; it is waiting for the garbage collector and is no attempt of this run.
    """
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    stage, attempt_label, name = labels.get(STAGE_LABEL), labels.get(ATTEMPT_LABEL, ""), meta.get("name")
    if not attempt_label.isdigit() or int(attempt_label) < 1:
        logger.warning(
            "ignoring job with a bad attempt label", extra={"fields": {"job": name, "attempt": attempt_label}}
        )
        return None
    attempt = int(attempt_label)
    if stage not in [s.name for s in pipeline.stages] or name != job_name(pipeline.release, stage, attempt):
        logger.warning(
            "ignoring job that is not one of this release's stage jobs",
            extra={"fields": {"job": name, "stage": stage, "attempt": attempt}},
        )
        return None
    if pipeline.configmap_uid and pipeline.configmap_uid not in owner_uids(obj):
        logger.warning(
            "ignoring job owned by something other than this install's stages ConfigMap",
            extra={"fields": {"job": name, "owners": owner_uids(obj), "stages_uid": pipeline.configmap_uid}},
        )
        return None
    status = obj.get("status") or {}
    phase, message, since = pipeline.kind.phase(obj)
    end = _ts(status.get("completionTime")) or (since if phase in (SUCCEEDED, FAILED) else None)
    return JobState(
        name,
        stage,
        attempt,
        phase,
        message,
        _ts(meta.get("creationTimestamp")),
        _ts(status.get("startTime")),
        end,
        bool(meta.get("deletionTimestamp")),
        meta.get("uid", ""),
        since,
        pipeline.kind.replicas(obj),
    )


POD_TERMINAL_PHASES = ("Succeeded", "Failed")


def pod_is_live(pod: dict) -> bool:
    """Whether a pod may still run a container: every phase but the terminal ones (Pending counts, it may
    start any moment; a pod being deleted counts until it is gone or terminal)."""
    return (pod.get("status") or {}).get("phase") not in POD_TERMINAL_PHASES


def tail_text(text: str, max_chars: int, max_bytes: int) -> str:
    """The end of a log as a terminal shows it: each line's text after its last carriage return (progress
    bars redraw their line that way), then at most `max_chars` characters and `max_bytes` UTF-8 bytes."""
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    out = "\n".join(lines)[-max_chars:]
    encoded = out.encode("utf-8")
    if len(encoded) > max_bytes:
        out = encoded[-max_bytes:].decode("utf-8", errors="ignore")
    return out


def describe_pending_pod(pod: dict) -> str:
    status = pod.get("status") or {}
    parts = []
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            parts.append(f"{c.get('reason') or 'Unschedulable'}: {c.get('message') or ''}".strip())
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            parts.append(
                f"container {cs.get('name')}: {waiting['reason']} {waiting.get('message') or ''}".strip()
            )
    return "; ".join(parts) or "no scheduling information yet"


def trainer_exit(pods: list[dict], log_tail: str | None, kind: JobKind = PYTORCHJOB) -> TrainerExit:
    """The exit of a failed attempt from its pods' trainer containers: bad input (exit 2) on any pod wins,
    since every rank of a stage that refuses its input exits 2 with the same line; else the Master's
    code. `code` is None when no pod shows a terminated trainer (they were deleted)."""
    exits: list[tuple[str, int, str]] = []
    for pod in pods:
        name = str((pod.get("metadata") or {}).get("name") or "")
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        trainer = next(
            (c for c in statuses if c.get("name") == kind.container), statuses[0] if statuses else None
        )
        ended = ((trainer or {}).get("state") or {}).get("terminated") or (
            ((trainer or {}).get("lastState") or {}).get("terminated")
        )
        if ended and ended.get("exitCode") is not None:
            exits.append((name, int(ended["exitCode"]), str(ended.get("message") or "").strip()))
    if not exits:
        return TrainerExit(None)
    bad = [e for e in exits if e[1] == BAD_INPUT_EXIT_CODE]
    name, code, message = (bad or sorted(exits, key=lambda e: (kind.first_pod_marker not in e[0], e[0])))[0]
    if not message and log_tail:
        message = next((line.strip() for line in reversed(log_tail.splitlines()) if ": error: " in line), "")
    return TrainerExit(code, message.splitlines()[-1] if message else "")
