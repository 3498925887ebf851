"""The run status the controller publishes (ConfigMap `<release>-status`, key `status.json`) and the events it emits.

Records, their camelCase JSON, and `render_status`, which like `decide` is a pure function of the world."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from trainer.executors.kubernetes.decide import (
    BROKEN,
    DELETING,
    DONE,
    MISSING,
    Action,
    CreateBlocked,
    CreateJob,
    Finish,
    MoveAside,
    PruneCheckpoints,
    ReportPending,
    attempt_outcome,
    bad_input,
    current_attempt,
    frontier,
)
from trainer.executors.kubernetes.spec import (
    ATTEMPTS_SHOWN,
    FAILED,
    LOG_TAILS_KEPT,
    MESSAGE_MAX_CHARS,
    PENDING,
    RUNNING,
    STATUS_MAX_BYTES,
    SUBMITTED,
    SUCCEEDED,
    ControllerConfig,
    job_name,
)
from trainer.executors.kubernetes.world import OutputState, World, _fmt

# --------------------------------------------------------------------------------------------- the status


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _to_json(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {_camel(f.name): _to_json(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, list | tuple):
        return [_to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    return obj


def _from_json(cls: type, data: Any, nested: dict[str, Callable[[Any], Any]] | None = None) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object")
    kwargs = {}
    for f in fields(cls):
        key = _camel(f.name)
        if key in data:
            value = data[key]
            kwargs[f.name] = (nested or {}).get(f.name, lambda v: v)(value)
    return cls(**kwargs)


@dataclass
class AttemptRecord:
    attempt: int
    job: str
    phase: str = SUBMITTED
    start_time: str | None = None
    end_time: str | None = None
    message: str = ""  # the job's latest condition message (or why the attempt counts as failed)
    cause: str = ""  # why this attempt was created: first attempt, retry after ..., recreated after ...
    log_tail: str | None = None  # None: not fetched yet, or dropped for an older attempt (status size)
    resume_from: str | None = None  # newest complete checkpoint when the attempt was created
    exit_code: int | None = None  # the trainer container's, once the attempt failed (None: unknown)
    error: str = ""  # the trainer's error line (its termination message, else the log's `error:` line)

    @classmethod
    def from_json(cls, data: Any) -> AttemptRecord:
        return _from_json(cls, data)


@dataclass
class StageRecord:
    name: str
    phase: str = PENDING
    attempt: int = 0
    job: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    output_dir: str = ""
    model_from: str = ""  # lineage: the folder (or hub id) the stage started from
    latest_checkpoint: str | None = None
    steps: int | None = None
    metrics: dict = field(default_factory=dict)
    message: str = ""
    attempts: list[AttemptRecord] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)  # pending items already reported
    # attempts folded out of `attempts` to bound the status size: {"from": 2, "to": 15, "phases":
    # {"Failed": 14}, "lastMessage": "..."}; empty while every attempt is listed
    earlier_attempts: dict = field(default_factory=dict)
    moved_aside: list[str] = field(default_factory=list)  # stale folders renamed before the stage ran

    @classmethod
    def from_json(cls, data: Any) -> StageRecord:
        return _from_json(cls, data, {"attempts": lambda v: [AttemptRecord.from_json(a) for a in v or []]})

    def attempt_record(self, attempt: int) -> AttemptRecord | None:
        return next((a for a in self.attempts if a.attempt == attempt), None)


@dataclass
class RunStatus:
    release: str
    namespace: str
    phase: str = PENDING
    stage: str | None = None
    message: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    updated_at: str | None = None
    log_tail: str | None = None
    stages_uid: str = ""  # the stages ConfigMap this status belongs to (a reinstall starts afresh)
    settings: dict = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Any) -> RunStatus:
        return _from_json(cls, data, {"stages": lambda v: [StageRecord.from_json(s) for s in v or []]})

    def to_json(self) -> dict:
        return _to_json(self)

    def stage_record(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.name == name), None)

    def same_as(self, other: RunStatus | None) -> bool:
        if other is None:
            return False
        a, b = self.to_json(), other.to_json()
        a.pop("updatedAt", None)
        b.pop("updatedAt", None)
        return a == b


def render_status(world: World, action: Action, config: ControllerConfig) -> RunStatus:
    """The status after `action` is carried out. Pure, like `decide`."""
    prev = world.previous
    now = _fmt(world.now)
    fi = frontier(world)
    records: list[StageRecord] = []
    for i, spec in enumerate(world.pipeline.stages):
        old = prev.stage_record(spec.name) or StageRecord(spec.name)
        rec = StageRecord(
            spec.name,
            phase=old.phase,
            attempt=old.attempt,
            job=old.job,
            start_time=old.start_time,
            end_time=old.end_time,
            output_dir=spec.output_dir,
            model_from=spec.model_from,
            latest_checkpoint=old.latest_checkpoint,
            steps=old.steps,
            metrics=dict(old.metrics),
            message=old.message,
            reported=list(old.reported),
            earlier_attempts=dict(old.earlier_attempts),
            moved_aside=list(old.moved_aside),
        )
        rec.attempts = _merge_attempts(old, world, spec.name)
        if i < fi and rec.phase != SUCCEEDED:
            _render_settled(rec, world)
        elif i == fi:
            _render_current_stage(rec, world, action, config)
        elif i > fi and not (isinstance(action, CreateJob) and action.stage == spec.name):
            rec.phase = PENDING
        if isinstance(action, CreateJob) and action.stage == spec.name:
            _apply_create(rec, world, action)
        if isinstance(action, CreateBlocked) and action.stage == spec.name:
            name = job_name(world.pipeline.release, spec.name, action.attempt)
            rec.phase = PENDING
            rec.message = f"job {name} (attempt {action.attempt}) not created yet: {action.message}"
        if isinstance(action, MoveAside) and action.stage == spec.name:
            _apply_move_aside(rec, world, action)
        if rec.attempts:
            rec.start_time = rec.attempts[0].start_time or rec.start_time
        _compact(rec)
        records.append(rec)

    status = RunStatus(
        prev.release,
        prev.namespace,
        stages_uid=world.pipeline.configmap_uid,
        started_at=prev.started_at or now,
        updated_at=now,
        stages=records,
        settings={
            "retries": config.retries,
            "keepCheckpoints": config.keep_checkpoints,
            "pendingTimeoutSeconds": config.pending_timeout_seconds,
            "heartbeatSeconds": config.heartbeat_seconds,
        },
    )
    current = next((r for r in records if r.name == getattr(action, "stage", None)), records[fi])
    status.stage = current.name
    if isinstance(action, Finish):
        status.phase, status.message = action.phase, action.message
        status.finished_at = prev.finished_at if prev.phase == action.phase and prev.finished_at else now
        if action.phase == FAILED and action.stage:
            arec = (status.stage_record(action.stage) or StageRecord("")).attempt_record(action.attempt)
            status.log_tail = arec.log_tail if arec else None
        if action.phase == FAILED and action.stage and not action.attempt:  # refused before it ever ran
            rejected = status.stage_record(action.stage)
            if rejected is not None:
                rejected.phase, rejected.message = FAILED, _cap(action.message)
    else:
        started = any(world.jobs.values()) or isinstance(action, CreateJob) or any(r.attempt for r in records)
        status.phase = RUNNING if started else PENDING
        status.message = f"{current.name}: {current.phase}" + (
            f" - {current.message}" if current.message else ""
        )
    return status


def _cap(text: str, limit: int = MESSAGE_MAX_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _compact(rec: StageRecord) -> None:
    """Bound a stage's share of the status: the first attempt and the newest ATTEMPTS_SHOWN - 1 stay
    listed (the ones between are counted in `earlier_attempts`), log tails stay on the newest
    LOG_TAILS_KEPT attempts only, and messages are capped."""
    if len(rec.attempts) > ATTEMPTS_SHOWN:
        keep_from = len(rec.attempts) - (ATTEMPTS_SHOWN - 1)
        folded = rec.attempts[1:keep_from]
        summary = dict(rec.earlier_attempts) or {"from": folded[0].attempt, "to": 0, "phases": {}}
        phases = dict(summary.get("phases") or {})
        for a in folded:
            phases[a.phase] = phases.get(a.phase, 0) + 1
        summary.update(
            {
                "from": min(int(summary.get("from") or folded[0].attempt), folded[0].attempt),
                "to": max(int(summary.get("to") or 0), folded[-1].attempt),
                "phases": phases,
                "lastMessage": _cap(folded[-1].message, 500),
            }
        )
        rec.earlier_attempts = summary
        rec.attempts = [rec.attempts[0], *rec.attempts[keep_from:]]
    for i, a in enumerate(rec.attempts):
        if i < len(rec.attempts) - LOG_TAILS_KEPT:
            a.log_tail = None
        a.message, a.cause = _cap(a.message), _cap(a.cause)
    rec.message = _cap(rec.message)


def _merge_attempts(old: StageRecord, world: World, stage: str) -> list[AttemptRecord]:
    by_attempt = {a.attempt: replace(a) for a in old.attempts}
    folded = old.earlier_attempts
    for attempt, job in sorted(world.jobs.get(stage, {}).items()):
        if folded and int(folded.get("from", 0)) <= attempt <= int(folded.get("to", -1)):
            continue  # already counted in earlier_attempts
        rec = by_attempt.get(attempt)
        if rec is None:  # created by a controller that stopped before recording it
            before = by_attempt.get(attempt - 1)
            cause = "first attempt" if attempt == 1 else f"retry after attempt {attempt - 1} failed"
            if before is not None and before.message:
                cause += f": {before.message}"
            rec = AttemptRecord(attempt, job.name, cause=cause)
        if not (rec.phase == FAILED and job.phase == SUCCEEDED):  # keep "succeeded, but output invalid"
            rec.phase, rec.message = job.phase, job.message
        rec.start_time = _fmt(job.start_time or job.created) or rec.start_time
        rec.end_time = _fmt(job.end_time) or rec.end_time
        if job.name in world.log_tails:
            rec.log_tail = world.log_tails[job.name]
        if job.name in world.exits:
            rec.exit_code, rec.error = world.exits[job.name].code, _cap(world.exits[job.name].error)
        by_attempt[attempt] = rec
    return [by_attempt[a] for a in sorted(by_attempt)]


def _render_settled(rec: StageRecord, world: World) -> None:
    """A stage before the current one whose success the status has not recorded yet (the controller was
    stopped between starting the next stage and writing the status): fill it in from its job and output."""
    attempt = current_attempt(world, rec.name)
    out = world.outputs.get(rec.name) or OutputState()
    rec.phase, rec.attempt = SUCCEEDED, attempt
    rec.job = job_name(world.pipeline.release, rec.name, attempt) if attempt else None
    arec = rec.attempt_record(attempt)
    rec.end_time = arec.end_time if arec else rec.end_time
    rec.latest_checkpoint = out.latest_checkpoint or rec.latest_checkpoint
    if out.manifest is not None:
        rec.steps, rec.metrics, rec.message = out.manifest.steps, dict(out.manifest.metrics), ""
    else:
        rec.message = f"a later stage has started, but this stage's output does not verify: {out.error}"


def _render_current_stage(rec: StageRecord, world: World, action: Action, config: ControllerConfig) -> None:
    attempt = current_attempt(world, rec.name)
    out = world.outputs.get(rec.name) or OutputState()
    rec.latest_checkpoint = out.latest_checkpoint or rec.latest_checkpoint
    if attempt == 0:
        rec.phase, rec.attempt, rec.job = PENDING, 0, None
        return
    rec.attempt, rec.job = attempt, job_name(world.pipeline.release, rec.name, attempt)
    outcome, reason = attempt_outcome(world, rec.name, attempt)
    arec = rec.attempt_record(attempt)
    if isinstance(action, ReportPending):
        rec.reported = sorted(set(rec.reported) | {p.key for p in action.items})
    waiting = ""
    retried = outcome == BROKEN and attempt <= config.retries and bad_input(world, rec.name, attempt) is None
    if world.lingering and (outcome == MISSING or retried):
        waiting = (
            f"; attempt {attempt + (outcome == BROKEN)} starts once the pods of attempt {attempt} have "
            "stopped (one trainer per output folder): " + "; ".join(p.message for p in world.lingering)
        )
    if outcome == DONE:
        rec.phase, rec.message = SUCCEEDED, ""
        rec.steps = out.manifest.steps if out.manifest else rec.steps
        rec.metrics = dict(out.manifest.metrics) if out.manifest else rec.metrics
        rec.end_time = arec.end_time if arec else rec.end_time
    elif outcome == BROKEN:
        rec.phase, rec.message = FAILED, reason + waiting
        rec.end_time = arec.end_time if arec else rec.end_time
        if arec:
            arec.phase, arec.message = FAILED, reason
    elif outcome == DELETING:
        rec.phase, rec.message = "Deleting", reason
    elif outcome == MISSING:
        rec.phase, rec.message = "Missing", reason + waiting
    else:
        job = world.jobs[rec.name][attempt]
        rec.phase, rec.end_time = job.phase, None
        rec.message = job.message if job.phase in ("Restarting", "Suspended") else ""
        if world.admission:  # queued, not failing: Kueue admits it when its quota allows
            rec.phase, rec.message = PENDING, world.admission
        due = [p for p in world.pending if world.now >= p.due(config.pending_timeout_seconds)]
        overdue = [p for p in due if p.timeout is None]
        warnings = [p.message for p in due if p.timeout is not None]
        if overdue:
            rec.message = f"pending for more than {_duration(config.pending_timeout_seconds)}: " + "; ".join(
                p.message for p in overdue
            )
        if warnings:
            rec.message = "; ".join([*warnings, *([rec.message] if rec.message else [])])


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


def _apply_create(rec: StageRecord, world: World, action: CreateJob) -> None:
    name = job_name(world.pipeline.release, rec.name, action.attempt)
    out = world.outputs.get(rec.name) or OutputState()
    arec = rec.attempt_record(action.attempt)
    if arec is None:
        arec = AttemptRecord(action.attempt, name)
        rec.attempts.append(arec)
        rec.attempts.sort(key=lambda a: a.attempt)
    arec.phase, arec.start_time, arec.end_time, arec.log_tail = SUBMITTED, _fmt(world.now), None, None
    arec.resume_from = out.latest_checkpoint
    arec.message = ""
    arec.cause = {
        "start": "first attempt",
        "retry": f"retry after attempt {action.attempt - 1} failed: {action.message}",
        "recreate": f"recreated: {action.message}",
    }[action.reason]
    rec.phase, rec.attempt, rec.job, rec.end_time = SUBMITTED, action.attempt, name, None
    rec.message, rec.reported = ("" if action.reason == "start" else arec.cause), []
    rec.start_time = rec.start_time or _fmt(world.now)


def encode_status(status: RunStatus) -> str:
    """status.json as stored: UTF-8 as is (`ensure_ascii` would write most non-ASCII characters as 6-byte
    escapes). Should the record caps ever not suffice, log tails go first: the status must stay writable."""
    text = json.dumps(status.to_json(), indent=1, ensure_ascii=False)
    if len(text.encode("utf-8")) <= STATUS_MAX_BYTES:
        return text
    slim = RunStatus.from_json(status.to_json())
    for rec in slim.stages:
        rec.message = _cap(rec.message, 500)
        for a in rec.attempts:
            a.log_tail, a.message, a.cause = None, _cap(a.message, 500), _cap(a.cause, 500)
    slim.message = _cap(slim.message, 500)
    return json.dumps(slim.to_json(), indent=1, ensure_ascii=False)


MOVED_ASIDE_KEPT = 5  # notes per stage; each reinstall starts a fresh status, so a few are plenty


def _apply_move_aside(rec: StageRecord, world: World, action: MoveAside) -> None:
    spec = world.pipeline.stage(rec.name)
    note = f"{_fmt(world.now)} moved {spec.output_dir} aside to {action.target}: {action.reason}"
    rec.moved_aside = [*rec.moved_aside, note][-MOVED_ASIDE_KEPT:]
    rec.message = f"moved {spec.output_dir} aside to {action.target}; the stage starts over"


@dataclass(frozen=True)
class StatusEvent:
    type: str  # Normal or Warning
    reason: str
    message: str


def status_events(prev: RunStatus, new: RunStatus, action: Action, pruned: list[str]) -> list[StatusEvent]:
    """Kubernetes Events for what changed between two statuses (and for the action itself)."""
    events: list[StatusEvent] = []
    for rec in new.stages:
        old = prev.stage_record(rec.name) or StageRecord(rec.name)
        if isinstance(action, CreateJob) and action.stage == rec.name:
            reason = {"start": "JobCreated", "retry": "JobRetried", "recreate": "JobRecreated"}[action.reason]
            kind = "Normal" if action.reason == "start" else "Warning"
            text = f"{rec.name}: created job {rec.job} (attempt {rec.attempt})"
            events.append(StatusEvent(kind, reason, text + (f"; {rec.message}" if rec.message else "")))
        elif isinstance(action, CreateBlocked) and action.stage == rec.name:
            if rec.message != old.message:
                events.append(StatusEvent("Warning", "JobCreateBlocked", f"{rec.name}: {rec.message}"))
        elif rec.phase != old.phase:
            kind = "Warning" if rec.phase in (FAILED, "Restarting", "Missing", "Deleting") else "Normal"
            text = f"{rec.name}: {rec.phase} (job {rec.job}, attempt {rec.attempt})"
            events.append(
                StatusEvent(kind, f"Stage{rec.phase}", text + (f": {rec.message}" if rec.message else ""))
            )
    if isinstance(action, ReportPending):
        for item in action.items:
            events.append(
                StatusEvent("Warning", "PendingTooLong", f"{action.stage}: {item.key}: {item.message}")
            )
    if isinstance(action, MoveAside):
        rec = new.stage_record(action.stage)
        if rec is not None and rec.moved_aside:
            events.append(
                StatusEvent("Warning", "StageFolderMovedAside", f"{action.stage}: {rec.moved_aside[-1]}")
            )
    if isinstance(action, PruneCheckpoints) and pruned:
        events.append(
            StatusEvent(
                "Normal",
                "CheckpointsPruned",
                f"{action.stage}: removed {', '.join(pruned)} (keeping the newest {action.keep})",
            )
        )
    if new.phase != prev.phase and new.phase in (SUCCEEDED, FAILED):
        events.append(
            StatusEvent("Normal" if new.phase == SUCCEEDED else "Warning", f"Run{new.phase}", new.message)
        )
    return events
