"""Decisions: the one action a pass takes, a pure function of the world (`decide(world, config)`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from trainer.contract.exits import BAD_INPUT_EXIT_CODE
from trainer.executors.kubernetes.spec import (
    FAILED,
    LINGER_POLL_SECONDS,
    SUCCEEDED,
    ControllerConfig,
    job_name,
)
from trainer.executors.kubernetes.world import OutputState, PendingItem, World

# --------------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class CreateJob:
    stage: str
    attempt: int
    reason: str  # "start", "retry" (after a failed attempt) or "recreate" (the job disappeared)
    message: str = ""


@dataclass(frozen=True)
class PruneCheckpoints:
    stage: str
    keep: int


@dataclass(frozen=True)
class ReportPending:
    stage: str
    items: tuple[PendingItem, ...]


@dataclass(frozen=True)
class Finish:
    phase: str  # Succeeded or Failed
    message: str
    stage: str | None = None
    attempt: int = 0


@dataclass(frozen=True)
class MoveAside:
    """Rename a stage folder made by another install or from another input before starting the stage."""

    stage: str
    reason: str
    target: str  # the new name, as the jobs see the volume


@dataclass(frozen=True)
class CreateBlocked:
    """Not a decision but what became of a CreateJob the API refused for a reason that may pass: a full
    ResourceQuota, or a job of an earlier install still holding the name. The status says so; the
    controller tries again after the next wait."""

    stage: str
    attempt: int
    reason: str  # the CreateJob's reason
    message: str


@dataclass(frozen=True)
class Wait:
    deadline: datetime | None = None  # wake up by then even without a watch event
    message: str = ""


Action = CreateJob | PruneCheckpoints | ReportPending | Finish | Wait | CreateBlocked | MoveAside

ACTIVE, DONE, BROKEN, MISSING, DELETING = "active", "done", "broken", "missing", "deleting"


def frontier(world: World) -> int:
    """Index of the last stage that was ever started: stages before it are settled (done)."""
    idx = 0
    for i, spec in enumerate(world.pipeline.stages):
        rec = world.previous.stage_record(spec.name)
        if world.jobs.get(spec.name) or (rec is not None and rec.attempt > 0):
            idx = i
    return idx


def current_attempt(world: World, stage: str) -> int:
    rec = world.previous.stage_record(stage)
    return max([0, *world.jobs.get(stage, {}), rec.attempt if rec else 0])


def recorded_phase(world: World, stage: str, attempt: int) -> str | None:
    """The phase of an attempt: from its job, else from memory (the job may have been deleted)."""
    job = world.jobs.get(stage, {}).get(attempt)
    if job is not None:
        return job.phase
    rec = world.previous.stage_record(stage)
    arec = rec.attempt_record(attempt) if rec else None
    return arec.phase if arec else None


def attempt_outcome(world: World, stage: str, attempt: int) -> tuple[str, str]:
    """(ACTIVE | DONE | BROKEN | MISSING | DELETING, reason) for one attempt of a stage."""
    job = world.jobs.get(stage, {}).get(attempt)
    if job is not None and job.deleting:
        return DELETING, f"job {job.name} is being deleted"
    phase = recorded_phase(world, stage, attempt)
    name = job_name(world.pipeline.release, stage, attempt)
    if job is None and phase not in (SUCCEEDED, FAILED):
        return MISSING, f"job {name} disappeared (deleted by hand?)"
    if phase == SUCCEEDED:
        out = world.outputs.get(stage) or OutputState()
        if out.manifest is None:
            return BROKEN, (
                f"job {name} succeeded but its output is not trustworthy: {out.error or 'not verified'}"
            )
        return DONE, ""
    if phase == FAILED:
        if job is not None:
            return BROKEN, job.message or f"job {name} failed without a condition message"
        rec = world.previous.stage_record(stage)
        arec = rec.attempt_record(attempt) if rec else None
        return BROKEN, (arec.message if arec and arec.message else f"job {name} failed")
    return ACTIVE, ""


def bad_input(world: World, stage: str, attempt: int) -> str | None:
    """The trainer's error line when the attempt failed on bad input (exit code 2), else None. Another
    attempt would refuse the same input, so the run fails at once; crashes, OOM kills (137) and
    preemptions (143) are retried."""
    name = job_name(world.pipeline.release, stage, attempt)
    ended = world.exits.get(name)
    if ended is None:
        rec = world.previous.stage_record(stage)
        arec = rec.attempt_record(attempt) if rec else None
        code, error = (arec.exit_code, arec.error) if arec else (None, "")
    else:
        code, error = ended.code, ended.error
    return error if code == BAD_INPUT_EXIT_CODE else None


def decide(world: World, config: ControllerConfig) -> Action:
    """The one action this pass takes. Pure: everything it needs is in `world`."""
    action = _next_step(world, config)
    if isinstance(action, CreateJob):
        # a job must not start in a folder of another install or input (ownership.py): clear it first
        out = world.outputs.get(action.stage) or OutputState()
        if out.stale and out.stale_target:
            return MoveAside(action.stage, out.stale, out.stale_target)
    return action


def _next_step(world: World, config: ControllerConfig) -> Action:
    stages = world.pipeline.stages
    i = frontier(world)
    spec = stages[i]
    attempt = current_attempt(world, spec.name)
    if attempt == 0:
        return CreateJob(spec.name, 1, "start")
    outcome, reason = attempt_outcome(world, spec.name, attempt)
    out = world.outputs.get(spec.name) or OutputState()
    too_many = len(out.checkpoints) > config.keep_checkpoints
    refused = bad_input(world, spec.name, attempt) if outcome == BROKEN else None
    if refused is not None:
        return Finish(
            FAILED,
            f"stage {spec.name} refused its input on attempt {attempt} (exit code {BAD_INPUT_EXIT_CODE}, not "
            f"retried: another attempt would fail the same way): {refused or reason}",
            spec.name,
            attempt,
        )
    replacing = outcome == MISSING or (outcome == BROKEN and attempt <= config.retries)
    if replacing and world.lingering:
        # one trainer per output folder: the next attempt starts only when this one's pods have stopped
        # (no watch event says when a pod is gone: look again soon)
        action = _report_or_wait(world, config, spec.name, world.lingering)
        if isinstance(action, Wait):
            poll = world.now + timedelta(seconds=LINGER_POLL_SECONDS)
            return Wait(
                min(action.deadline or poll, poll), "waiting for the pods of the last attempt to stop"
            )
        return action
    if outcome == MISSING:
        return CreateJob(spec.name, attempt, "recreate", reason)
    if outcome == DELETING:
        return Wait(None, reason)
    if outcome == DONE:
        if too_many:
            return PruneCheckpoints(spec.name, config.keep_checkpoints)
        if i + 1 < len(stages):
            return CreateJob(stages[i + 1].name, 1, "start")
        return Finish(SUCCEEDED, f"all stages succeeded ({', '.join(s.name for s in stages)})")
    if outcome == BROKEN:
        if attempt <= config.retries:
            return CreateJob(spec.name, attempt + 1, "retry", reason)
        return Finish(
            FAILED,
            f"stage {spec.name} failed on attempt {attempt} of {config.retries + 1}: {reason}",
            spec.name,
            attempt,
        )
    # ACTIVE: housekeeping and reporting while the job runs
    if too_many:
        return PruneCheckpoints(spec.name, config.keep_checkpoints)
    return _report_or_wait(world, config, spec.name, world.pending)


def _report_or_wait(
    world: World, config: ControllerConfig, stage: str, items: tuple[PendingItem, ...]
) -> Action:
    """Report the items overdue and not yet reported, else wait until the next one falls due."""
    rec = world.previous.stage_record(stage)
    reported = set(rec.reported) if rec else set()
    fresh = [p for p in items if p.key not in reported]
    overdue = tuple(p for p in fresh if world.now >= p.due(config.pending_timeout_seconds))
    if overdue:
        return ReportPending(stage, overdue)
    deadlines = [p.due(config.pending_timeout_seconds) for p in fresh]
    return Wait(min(deadlines) if deadlines else None)
