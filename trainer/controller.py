"""The stage controller: runs a release's stage PyTorchJobs (sft -> grpo -> eval) to a finished run.

It runs in the cluster (`r1-grpo controller`, a Kubernetes Job from the training image, with the checkpoint
volume mounted) and is built to be boring and restart-safe:

* Level-triggered. Every pass reads the world -- the stages ConfigMap, the release's PyTorchJobs (by labels),
  the stage outputs on the volume, pod state, and the controller's own previous status as memory -- then a pure
  function `decide(world, config)` picks at most one action (create a job, prune checkpoints, report a stuck
  pod, finish), the controller performs it, writes the status, and waits on a PyTorchJob watch (relisting on
  timeout and on 410 Gone). Nothing is remembered only in process memory, so killing the controller at any
  moment and starting it again gives the same outcome.
* No duplicates. Job names are deterministic (`<release>-<stage>-<attempt>`), creation is create-if-absent,
  and 409 AlreadyExists counts as success after checking the existing job carries this stage's labels.
* Honest hand-off. A stage is done only when its job Succeeded *and* `verify_stage_output` accepts its
  folder (the same check the local pipeline uses); a Succeeded job with a missing or corrupt manifest is a
  failed attempt with the verification error as its reason.
* Failures. A failed attempt is retried (new attempt, same output folder, so the trainer resumes from its
  last complete checkpoint) up to `--retries` times; then the run is Failed with the job's last condition
  message and the tail of the master pod's log. Pods (or a job no operator picked up) pending longer than
  `--pending-timeout-seconds` are reported in the status and as a Warning event, once each; the controller
  keeps waiting, because capacity may still arrive (an autoscaler), but the user sees why nothing moves.
* A job deleted by hand while its stage is current is recreated under the *same* attempt number (the
  deletion is not the training's fault, so it does not use up a retry); the trainer resumes from the last
  complete checkpoint. A job deleted after its stage finished is not re-run: the status remembers the stage
  succeeded and the output still verifies. To stop a run, uninstall the release.

Status: ConfigMap `<release>-status` (key `status.json`), Events on it, JSON-lines logs on stderr. Exit codes:
0 run succeeded, 1 run failed, 2 configuration error (flags, stages ConfigMap, volume not mounted, a foreign
job holding one of our names), 3 the API refused our credentials (401/403), 4 the controller crashed (a bug;
the traceback is logged), 143 stopped by SIGTERM before the run finished (non-zero so the Job controller
starts the controller again).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import urllib3
import yaml
from kubernetes.client.rest import ApiException

from trainer.checkpoint import (
    StageManifest,
    StageOutputError,
    complete_checkpoints,
    prune_checkpoints,
    verify_stage_output,
)
from trainer.k8s import (
    JOB_NAME_LABEL,
    PYTORCHJOB_GROUP,
    PYTORCHJOB_KIND,
    PYTORCHJOB_VERSION,
    USER_AGENT,
    Cluster,
    WatchExpired,
    api_error_summary,
    default_namespace,
    load_api_client,
)
from trainer.stages import STAGES, TRAINING_STAGES

logger = logging.getLogger("trainer.controller")

INSTANCE_LABEL = "app.kubernetes.io/instance"
NAME_LABEL = "app.kubernetes.io/name"
STAGE_LABEL = "r1-grpo.io/stage"
ATTEMPT_LABEL = "r1-grpo.io/attempt"
COMPONENT = "r1-grpo-controller"
STATUS_KEY = "status.json"
PIPELINE_KEY = "pipeline.yaml"

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_CONFIG, EXIT_FORBIDDEN, EXIT_CRASH, EXIT_SIGTERM = 0, 1, 2, 3, 4, 143
LOG_TAIL_MAX_CHARS = 8000  # per attempt; the status ConfigMap must stay far below the 1 MiB object limit
MAX_NAME_LEN = 63  # the operator names services `<job>-master-0`; services need DNS-1035 labels

# Run and stage phases shown in the status.
PENDING, SUBMITTED, RUNNING, SUCCEEDED, FAILED = "Pending", "Submitted", "Running", "Succeeded", "Failed"
JOB_PHASE_PRIORITY = ("Failed", "Succeeded", "Suspended", "Restarting", "Running", "Created")


class ConfigError(Exception):
    """Input the controller cannot run with; the message names the flag, ConfigMap key or object."""


class _BudgetSpent(BaseException):
    """Raised before a write once `max_writes` is used up: a deterministic stand-in for `kill -9`."""


class _StopRequested(BaseException):
    """Raised by the SIGTERM handler to abandon a wait (waits have no side effects)."""


# --------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ControllerConfig:
    release: str
    namespace: str
    stages_configmap: str
    status_configmap: str
    retries: int = 2
    keep_checkpoints: int = 3
    pending_timeout_seconds: float = 1800.0
    mount_path: str | None = None  # where this pod sees the checkpoint volume; None: pipeline.yaml's mountPath
    resync_seconds: float = 120.0
    log_tail_lines: int = 50
    error_backoff_seconds: float = 2.0
    max_error_backoff_seconds: float = 60.0

    @property
    def selector(self) -> str:
        return f"{INSTANCE_LABEL}={self.release},{STAGE_LABEL},{ATTEMPT_LABEL}"


def job_name(release: str, stage: str, attempt: int) -> str:
    return f"{release}-{stage}-{attempt}"


# --------------------------------------------------------------------------------------------- the stage list


@dataclass(frozen=True)
class StageSpec:
    name: str
    output_dir: str  # as the jobs see it (under the pipeline's mountPath)
    model_from: str  # lineage: the folder or hub id its --model_name_or_path names
    job_key: str
    job: dict  # the ConfigMap's PyTorchJob for attempt 1


@dataclass(frozen=True)
class Pipeline:
    release: str
    mount_path: str
    stages: tuple[StageSpec, ...]
    configmap_uid: str

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def index(self, name: str) -> int:
        return [s.name for s in self.stages].index(name)


def parse_pipeline(cm: dict, release: str) -> Pipeline:
    """Validate the stages ConfigMap (docs/contract.md); every error names the ConfigMap and key."""
    meta = cm.get("metadata") or {}
    where = f"ConfigMap {meta.get('namespace', '?')}/{meta.get('name', '?')}"
    data = cm.get("data") or {}
    if PIPELINE_KEY not in data:
        raise ConfigError(f"{where}: key {PIPELINE_KEY!r} is missing (keys: {sorted(data)})")
    try:
        raw = _load_yaml(data[PIPELINE_KEY])
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {PIPELINE_KEY}: invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {PIPELINE_KEY}: the top level must be a map")
    if raw.get("release") != release:
        raise ConfigError(f"{where}: {PIPELINE_KEY}: release is {raw.get('release')!r}, but the controller runs "
                          f"--release {release!r}")
    mount = raw.get("mountPath")
    if not isinstance(mount, str) or not mount.startswith("/"):
        raise ConfigError(f"{where}: {PIPELINE_KEY}: mountPath must be an absolute path, got {mount!r}")
    items = raw.get("stages")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: {PIPELINE_KEY}: stages must be a non-empty list")
    specs: list[StageSpec] = []
    for i, item in enumerate(items):
        at = f"{where}: {PIPELINE_KEY}: stages[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{at}: must be a map with name, outputDir, modelFrom, job")
        missing = [k for k in ("name", "outputDir", "modelFrom", "job") if not isinstance(item.get(k), str)
                   or not item.get(k)]
        if missing:
            raise ConfigError(f"{at}: missing or non-string keys {missing}")
        name = item["name"]
        if name not in STAGES:
            raise ConfigError(f"{at}.name: unknown stage {name!r}; stages are {', '.join(STAGES)}")
        if specs and STAGES.index(name) <= STAGES.index(specs[-1].name):
            raise ConfigError(f"{at}.name: {name!r} after {specs[-1].name!r}; stages run in the order "
                              f"{', '.join(STAGES)}, each at most once")
        out = PurePosixPath(item["outputDir"])
        if not out.is_absolute() or not out.is_relative_to(mount) or out == PurePosixPath(mount):
            raise ConfigError(f"{at}.outputDir: {item['outputDir']!r} is not a folder under mountPath {mount!r}")
        key = item["job"]
        if key not in data:
            raise ConfigError(f"{at}.job: the ConfigMap has no key {key!r}")
        job = _parse_job_manifest(data[key], f"{where}: {key}", release, name)
        specs.append(StageSpec(name, str(out), item["modelFrom"], key, job))
    # The hand-off contract: a stage after a training stage starts from that stage's folder.
    previous_training: StageSpec | None = None
    for spec in specs:
        if previous_training is not None and spec.model_from != previous_training.output_dir:
            raise ConfigError(f"{where}: {PIPELINE_KEY}: stage {spec.name} has modelFrom {spec.model_from!r}, "
                              f"but it must start from {previous_training.name}'s output "
                              f"{previous_training.output_dir!r}")
        if spec.name in TRAINING_STAGES:
            previous_training = spec
    return Pipeline(release, mount, tuple(specs), str(meta.get("uid") or ""))


def _load_yaml(text: str) -> Any:
    # libyaml's safe loader when present: the stage jobs are parsed on every pass that sees a new ConfigMap
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _parse_job_manifest(text: str, where: str, release: str, stage: str) -> dict:
    try:
        job = _load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from e
    if not isinstance(job, dict):
        raise ConfigError(f"{where}: must be a PyTorchJob object")
    api_version = f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}"
    if job.get("apiVersion") != api_version or job.get("kind") != PYTORCHJOB_KIND:
        raise ConfigError(f"{where}: apiVersion/kind are {job.get('apiVersion')!r}/{job.get('kind')!r}, "
                          f"expected {api_version}/{PYTORCHJOB_KIND}")
    meta = job.get("metadata") or {}
    expected = job_name(release, stage, 1)
    if meta.get("name") != expected:
        raise ConfigError(f"{where}: metadata.name is {meta.get('name')!r}, expected {expected!r}")
    labels = meta.get("labels") or {}
    want = {INSTANCE_LABEL: release, STAGE_LABEL: stage, ATTEMPT_LABEL: "1"}
    wrong = {k: labels.get(k) for k, v in want.items() if labels.get(k) != v}
    if wrong:
        raise ConfigError(f"{where}: metadata.labels {wrong} must be {want}")
    if not isinstance((job.get("spec") or {}).get("pytorchReplicaSpecs"), dict):
        raise ConfigError(f"{where}: spec.pytorchReplicaSpecs is missing")
    return job


def job_manifest(pipeline: Pipeline, spec: StageSpec, attempt: int, namespace: str, owner_name: str) -> dict:
    """Attempt `attempt` of a stage: the ConfigMap's job with name and attempt label rewritten.

    The attempt label is rewritten on the pod templates too where the chart set it there, so pods say which
    attempt they belong to. An ownerReference to the stages ConfigMap lets `helm uninstall` collect the jobs.
    """
    job = copy.deepcopy(spec.job)
    meta = job.setdefault("metadata", {})
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        meta.pop(key, None)
    meta["name"] = job_name(pipeline.release, spec.name, attempt)
    meta["namespace"] = namespace
    meta.setdefault("labels", {})[ATTEMPT_LABEL] = str(attempt)
    for replica in (job.get("spec") or {}).get("pytorchReplicaSpecs", {}).values():
        tmeta = ((replica or {}).get("template") or {}).get("metadata") or {}
        if ATTEMPT_LABEL in (tmeta.get("labels") or {}):
            tmeta["labels"][ATTEMPT_LABEL] = str(attempt)
    if pipeline.configmap_uid:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": owner_name,
                                    "uid": pipeline.configmap_uid}]
    return job


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


@dataclass(frozen=True)
class PendingItem:
    key: str  # "pod/<name>/<uid>" or "job/<name>": reported at most once
    since: datetime
    message: str


@dataclass(frozen=True)
class OutputState:
    checkpoints: tuple[int, ...] = ()  # steps of the complete checkpoint-* folders, oldest first
    latest_checkpoint: str | None = None  # as the jobs see it
    manifest: StageManifest | None = None
    error: str | None = None  # why the folder is not trusted (only when verification was needed)


@dataclass(frozen=True)
class World:
    now: datetime
    pipeline: Pipeline
    jobs: dict[str, dict[int, JobState]]  # stage -> attempt -> job
    outputs: dict[str, OutputState]
    pending: tuple[PendingItem, ...]  # for the current stage's current job
    log_tails: dict[str, str]  # job name -> master log tail, for failed jobs whose tail is not yet recorded
    previous: RunStatus  # what the controller recorded last (its only memory; lives in the status ConfigMap)


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


def job_phase(conditions: list[dict]) -> tuple[str, str, datetime | None]:
    """(phase, message, since) from a job's conditions; the most decisive True condition wins."""
    true = {c.get("type"): c for c in conditions or [] if str(c.get("status")) == "True"}
    for kind in JOB_PHASE_PRIORITY:
        if kind in true:
            c = true[kind]
            return kind, str(c.get("message") or c.get("reason") or ""), _ts(c.get("lastTransitionTime"))
    return SUBMITTED, "", None


def parse_job(obj: dict, pipeline: Pipeline) -> JobState | None:
    """A JobState for one of our jobs, or None (logged) for an object that only looks like one."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    stage, attempt_label, name = labels.get(STAGE_LABEL), labels.get(ATTEMPT_LABEL, ""), meta.get("name")
    if not attempt_label.isdigit() or int(attempt_label) < 1:
        logger.warning("ignoring job with a bad attempt label", extra={"fields": {"job": name,
                                                                                  "attempt": attempt_label}})
        return None
    attempt = int(attempt_label)
    if stage not in [s.name for s in pipeline.stages] or name != job_name(pipeline.release, stage, attempt):
        logger.warning("ignoring job that is not one of this release's stage jobs",
                       extra={"fields": {"job": name, "stage": stage, "attempt": attempt}})
        return None
    status = obj.get("status") or {}
    phase, message, since = job_phase(status.get("conditions") or [])
    end = _ts(status.get("completionTime")) or (since if phase in (SUCCEEDED, FAILED) else None)
    return JobState(name, stage, attempt, phase, message, _ts(meta.get("creationTimestamp")),
                    _ts(status.get("startTime")), end, bool(meta.get("deletionTimestamp")), meta.get("uid", ""),
                    since)


def describe_pending_pod(pod: dict) -> str:
    status = pod.get("status") or {}
    parts = []
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            parts.append(f"{c.get('reason') or 'Unschedulable'}: {c.get('message') or ''}".strip())
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            parts.append(f"container {cs.get('name')}: {waiting['reason']} {waiting.get('message') or ''}".strip())
    return "; ".join(parts) or "no scheduling information yet"


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
    log_tail: str | None = None  # None: not fetched yet
    resume_from: str | None = None  # newest complete checkpoint when the attempt was created

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
class Wait:
    deadline: datetime | None = None  # wake up by then even without a watch event
    message: str = ""


Action = CreateJob | PruneCheckpoints | ReportPending | Finish | Wait

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
            return BROKEN, (f"job {name} succeeded but its output is not trustworthy: "
                            f"{out.error or 'not verified'}")
        return DONE, ""
    if phase == FAILED:
        if job is not None:
            return BROKEN, job.message or f"job {name} failed without a condition message"
        rec = world.previous.stage_record(stage)
        arec = rec.attempt_record(attempt) if rec else None
        return BROKEN, (arec.message if arec and arec.message else f"job {name} failed")
    return ACTIVE, ""


def decide(world: World, config: ControllerConfig) -> Action:
    """The one action this pass takes. Pure: everything it needs is in `world`."""
    stages = world.pipeline.stages
    i = frontier(world)
    spec = stages[i]
    attempt = current_attempt(world, spec.name)
    if attempt == 0:
        return CreateJob(spec.name, 1, "start")
    outcome, reason = attempt_outcome(world, spec.name, attempt)
    out = world.outputs.get(spec.name) or OutputState()
    too_many = len(out.checkpoints) > config.keep_checkpoints
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
        return Finish(FAILED, f"stage {spec.name} failed on attempt {attempt} of {config.retries + 1}: {reason}",
                      spec.name, attempt)
    # ACTIVE: housekeeping and reporting while the job runs
    if too_many:
        return PruneCheckpoints(spec.name, config.keep_checkpoints)
    rec = world.previous.stage_record(spec.name)
    reported = set(rec.reported) if rec else set()
    timeout = timedelta(seconds=config.pending_timeout_seconds)
    fresh = [p for p in world.pending if p.key not in reported]
    overdue = tuple(p for p in fresh if world.now - p.since >= timeout)
    if overdue:
        return ReportPending(spec.name, overdue)
    deadlines = [p.since + timeout for p in fresh]
    return Wait(min(deadlines) if deadlines else None)


def render_status(world: World, action: Action, config: ControllerConfig) -> RunStatus:
    """The status after `action` is carried out. Pure, like `decide`."""
    prev = world.previous
    now = _fmt(world.now)
    fi = frontier(world)
    records: list[StageRecord] = []
    for i, spec in enumerate(world.pipeline.stages):
        old = prev.stage_record(spec.name) or StageRecord(spec.name)
        rec = StageRecord(spec.name, phase=old.phase, attempt=old.attempt, job=old.job,
                          start_time=old.start_time, end_time=old.end_time, output_dir=spec.output_dir,
                          model_from=spec.model_from, latest_checkpoint=old.latest_checkpoint, steps=old.steps,
                          metrics=dict(old.metrics), message=old.message, reported=list(old.reported))
        rec.attempts = _merge_attempts(old, world, spec.name)
        if i < fi and rec.phase != SUCCEEDED:
            _render_settled(rec, world)
        elif i == fi:
            _render_current_stage(rec, world, action, config)
        elif i > fi and not (isinstance(action, CreateJob) and action.stage == spec.name):
            rec.phase = PENDING
        if isinstance(action, CreateJob) and action.stage == spec.name:
            _apply_create(rec, world, action)
        if rec.attempts:
            rec.start_time = rec.attempts[0].start_time or rec.start_time
        records.append(rec)

    status = RunStatus(prev.release, prev.namespace, stages_uid=world.pipeline.configmap_uid,
                       started_at=prev.started_at or now, updated_at=now, stages=records,
                       settings={"retries": config.retries, "keepCheckpoints": config.keep_checkpoints,
                                 "pendingTimeoutSeconds": config.pending_timeout_seconds})
    current = next((r for r in records if r.name == getattr(action, "stage", None)), records[fi])
    status.stage = current.name
    if isinstance(action, Finish):
        status.phase, status.message = action.phase, action.message
        status.finished_at = prev.finished_at if prev.phase == action.phase and prev.finished_at else now
        if action.phase == FAILED and action.stage:
            arec = (status.stage_record(action.stage) or StageRecord("")).attempt_record(action.attempt)
            status.log_tail = arec.log_tail if arec else None
    else:
        started = any(world.jobs.values()) or isinstance(action, CreateJob) or any(r.attempt for r in records)
        status.phase = RUNNING if started else PENDING
        status.message = f"{current.name}: {current.phase}" + (f" - {current.message}" if current.message else "")
    return status


def _merge_attempts(old: StageRecord, world: World, stage: str) -> list[AttemptRecord]:
    by_attempt = {a.attempt: replace(a) for a in old.attempts}
    for attempt, job in sorted(world.jobs.get(stage, {}).items()):
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
    if outcome == DONE:
        rec.phase, rec.message = SUCCEEDED, ""
        rec.steps = out.manifest.steps if out.manifest else rec.steps
        rec.metrics = dict(out.manifest.metrics) if out.manifest else rec.metrics
        rec.end_time = arec.end_time if arec else rec.end_time
    elif outcome == BROKEN:
        rec.phase, rec.message = FAILED, reason
        rec.end_time = arec.end_time if arec else rec.end_time
        if arec:
            arec.phase, arec.message = FAILED, reason
    elif outcome == DELETING:
        rec.phase, rec.message = "Deleting", reason
    elif outcome == MISSING:
        rec.phase, rec.message = "Missing", reason
    else:
        job = world.jobs[rec.name][attempt]
        rec.phase, rec.end_time = job.phase, None
        rec.message = job.message if job.phase in ("Restarting", "Suspended") else ""
        timeout = timedelta(seconds=config.pending_timeout_seconds)
        overdue = [p for p in world.pending if world.now - p.since >= timeout]
        if isinstance(action, ReportPending):
            rec.reported = sorted(set(rec.reported) | {p.key for p in action.items})
        if overdue:
            rec.message = (f"pending for more than {_duration(config.pending_timeout_seconds)}: "
                           + "; ".join(p.message for p in overdue))


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
    arec.cause = {"start": "first attempt",
                  "retry": f"retry after attempt {action.attempt - 1} failed: {action.message}",
                  "recreate": f"recreated: {action.message}"}[action.reason]
    rec.phase, rec.attempt, rec.job, rec.end_time = SUBMITTED, action.attempt, name, None
    rec.message, rec.reported = ("" if action.reason == "start" else arec.cause), []
    rec.start_time = rec.start_time or _fmt(world.now)


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
        elif rec.phase != old.phase:
            kind = "Warning" if rec.phase in (FAILED, "Restarting", "Missing", "Deleting") else "Normal"
            text = f"{rec.name}: {rec.phase} (job {rec.job}, attempt {rec.attempt})"
            events.append(StatusEvent(kind, f"Stage{rec.phase}", text + (f": {rec.message}" if rec.message else "")))
    if isinstance(action, ReportPending):
        for item in action.items:
            events.append(StatusEvent("Warning", "PendingTooLong", f"{action.stage}: {item.key}: {item.message}"))
    if isinstance(action, PruneCheckpoints) and pruned:
        events.append(StatusEvent("Normal", "CheckpointsPruned",
                                  f"{action.stage}: removed {', '.join(pruned)} (keeping the newest {action.keep})"))
    if new.phase != prev.phase and new.phase in (SUCCEEDED, FAILED):
        events.append(StatusEvent("Normal" if new.phase == SUCCEEDED else "Warning", f"Run{new.phase}",
                                  new.message))
    return events


# --------------------------------------------------------------------------------------------- the controller


class _OutputVerifier:
    """verify_stage_output with a cache keyed by file metadata: hashing large weights once, not every pass."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple, StageManifest | None, str | None]] = {}

    @staticmethod
    def _fingerprint(folder: Path) -> tuple:
        try:
            entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns, e.inode())
                             for e in os.scandir(folder) if e.is_file())
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


@dataclass
class RunResult:
    exit_code: int
    message: str = ""
    budget_spent: bool = False


class Controller:
    """Read the world, decide, act once, publish the status, wait on the watch; repeat until the run ends."""

    def __init__(self, cluster: Cluster, config: ControllerConfig, *, max_writes: int | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.cluster = cluster
        self.config = config
        self.clock = clock
        self.max_writes = max_writes  # tests: stop (as if killed) just before write number max_writes + 1
        self.writes = 0
        self.write_log: list[str] = []  # what each write was ("create job r1-sft-1", "patch status", ...)
        self.status: RunStatus | None = None
        self._status_cm: dict | None = None
        self._stop = threading.Event()
        self.in_wait = False  # the SIGTERM handler may interrupt only waits
        self._verifier = _OutputVerifier()
        self._pipeline: tuple[tuple, Pipeline] | None = None
        self._instance = os.environ.get("HOSTNAME") or socket.gethostname()

    # -- control
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _write(self, what: str) -> None:
        if self.max_writes is not None and self.writes >= self.max_writes:
            raise _BudgetSpent(what)
        self.writes += 1
        self.write_log.append(what)

    # -- the loop
    def run(self) -> RunResult:
        backoff = self.config.error_backoff_seconds
        try:
            while not self.stopping:
                try:
                    if self.status is None:
                        self._load_status()
                    result = self.reconcile_once()
                    backoff = self.config.error_backoff_seconds
                except ConfigError as e:
                    return self._config_failure(str(e))
                except ApiException as e:
                    if e.status in (401, 403):
                        log("error", "the API server refused the controller's credentials",
                            error=api_error_summary(e))
                        return RunResult(EXIT_FORBIDDEN, api_error_summary(e))
                    log("warning", "API error; retrying", error=api_error_summary(e), backoff_seconds=backoff)
                    self._sleep(backoff)
                    backoff = min(backoff * 2, self.config.max_error_backoff_seconds)
                    continue
                except (urllib3.exceptions.HTTPError, OSError) as e:
                    log("warning", "transient error (network or volume); retrying", error=repr(e),
                        backoff_seconds=backoff)
                    self._sleep(backoff)
                    backoff = min(backoff * 2, self.config.max_error_backoff_seconds)
                    continue
                if result is not None:
                    return result
        except _BudgetSpent as e:
            log("info", "write budget spent; stopping as if killed", next_write=str(e), writes=self.writes)
            return RunResult(EXIT_SIGTERM, "write budget spent", budget_spent=True)
        except _StopRequested:  # a SIGTERM that landed on the edge of a wait; nothing was half done
            pass
        log("info", "stopped before the run finished", phase=self.status.phase if self.status else None)
        return RunResult(EXIT_SIGTERM, "stopped")

    def reconcile_once(self) -> RunResult | None:
        """One pass: observe, decide, act, publish, then wait if there is nothing to do. Returns a result when
        the run is finished."""
        world, resource_version = self.observe()
        action = decide(world, self.config)
        new_status = render_status(world, action, self.config)
        log("info", "decided", action=type(action).__name__,
            **{k: v for k, v in _to_json(action).items() if k not in ("items", "deadline")})
        pruned = self.execute(action, world)
        self.publish(new_status, action, pruned)
        if isinstance(action, Finish):
            code = EXIT_SUCCEEDED if action.phase == SUCCEEDED else EXIT_FAILED
            log("info", "run finished", phase=action.phase, message=action.message, exit_code=code)
            return RunResult(code, action.message)
        if isinstance(action, Wait) and not self.stopping:
            self.wait(resource_version, action.deadline)
        return None

    # -- reading the world
    def _load_status(self) -> None:
        cfg = self.config
        cm = self.cluster.get_configmap(cfg.status_configmap)
        fresh = RunStatus(cfg.release, cfg.namespace)
        if cm is None:
            stages_cm = self.cluster.get_configmap(cfg.stages_configmap)
            body = {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": cfg.status_configmap, "namespace": cfg.namespace,
                             "labels": {INSTANCE_LABEL: cfg.release, NAME_LABEL: "r1-grpo",
                                        "app.kubernetes.io/component": "status",
                                        "app.kubernetes.io/managed-by": COMPONENT}},
                "data": {STATUS_KEY: json.dumps(fresh.to_json(), indent=1)},
            }
            if stages_cm and (stages_cm.get("metadata") or {}).get("uid"):
                # garbage-collected with the stages ConfigMap on `helm uninstall`
                body["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap",
                                                        "name": cfg.stages_configmap,
                                                        "uid": stages_cm["metadata"]["uid"]}]
            self._write("create status ConfigMap")
            cm = self.cluster.create_configmap(body) or self.cluster.get_configmap(cfg.status_configmap)
            if cm is None:
                raise ApiException(status=404, reason=f"ConfigMap {cfg.status_configmap} vanished after creation")
        self._status_cm = cm
        raw = (cm.get("data") or {}).get(STATUS_KEY)
        try:
            status = RunStatus.from_json(json.loads(raw)) if raw else fresh
        except (ValueError, TypeError) as e:
            log("warning", "unreadable status; rebuilding it from the cluster", configmap=cfg.status_configmap,
                error=str(e))
            status = fresh
        self.status = status

    def observe(self) -> tuple[World, str]:
        cfg = self.config
        now = self.clock()
        cm = self.cluster.get_configmap(cfg.stages_configmap)
        if cm is None:
            raise ConfigError(f"ConfigMap {cfg.namespace}/{cfg.stages_configmap} (--stages-configmap) not found")
        meta = cm.get("metadata") or {}
        key = (meta.get("uid"), meta.get("resourceVersion"))
        if self._pipeline is None or self._pipeline[0] != key or not all(key):
            self._pipeline = (key, parse_pipeline(cm, cfg.release))  # re-parse only when the ConfigMap changed
        pipeline = self._pipeline[1]
        volume = Path(cfg.mount_path or pipeline.mount_path)
        if not volume.is_dir():
            # without the volume every finished stage would look unverifiable and be retried: refuse instead
            raise ConfigError(f"the checkpoint volume is not mounted at {volume} (--mount-path, or pipeline.yaml "
                              f"mountPath {pipeline.mount_path!r}); the controller pod must mount the same PVC")
        previous = self.status or RunStatus(cfg.release, cfg.namespace)
        if previous.stages_uid and pipeline.configmap_uid and previous.stages_uid != pipeline.configmap_uid:
            log("warning", "the status belongs to an earlier install of this release; starting afresh",
                status_uid=previous.stages_uid, stages_uid=pipeline.configmap_uid)
            previous = RunStatus(cfg.release, cfg.namespace)
        try:
            listed = self.cluster.list_jobs(cfg.selector)
        except ApiException as e:
            if e.status == 404:
                raise ConfigError(f"cannot list PyTorchJobs ({api_error_summary(e)}): is the Kubeflow training "
                                  f"operator (kubeflow.org/v1 PyTorchJob CRD) installed?") from e
            raise
        jobs: dict[str, dict[int, JobState]] = {}
        for obj in listed.items:
            job = parse_job(obj, pipeline)
            if job is not None:
                jobs.setdefault(job.stage, {})[job.attempt] = job
        world = World(now, pipeline, jobs, {}, (), {}, previous)

        # Only the current stage needs the volume and pods; earlier stages are settled (read once more only
        # when the status has not recorded their success yet).
        fi = frontier(world)
        spec = pipeline.stages[fi]
        attempt = current_attempt(world, spec.name)
        job = jobs.get(spec.name, {}).get(attempt)
        outputs = {spec.name: self._output_state(pipeline, spec, recorded_phase(world, spec.name, attempt))}
        for settled in pipeline.stages[:fi]:
            rec = previous.stage_record(settled.name)
            if rec is None or rec.phase != SUCCEEDED:
                outputs[settled.name] = self._output_state(pipeline, settled, SUCCEEDED)
        pending: list[PendingItem] = []
        log_tails: dict[str, str] = {}
        if job is not None and job.phase not in (SUCCEEDED, FAILED) and not job.deleting:
            pending = self._pending_items(job, now)
        if job is not None and job.phase == FAILED:
            rec = previous.stage_record(spec.name)
            arec = rec.attempt_record(attempt) if rec else None
            if arec is None or arec.log_tail is None:
                log_tails[job.name] = self.master_log_tail(job.name)
        return replace(world, outputs=outputs, pending=tuple(pending), log_tails=log_tails), \
            listed.resource_version

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

    def _pending_items(self, job: JobState, now: datetime) -> list[PendingItem]:
        timeout = timedelta(seconds=self.config.pending_timeout_seconds)
        items: list[PendingItem] = []
        if job.phase == SUBMITTED and job.created is not None:
            items.append(PendingItem(f"job/{job.name}", job.created,
                                     f"job {job.name} has no status yet: is the Kubeflow training operator "
                                     f"running and watching this namespace?"))
        if job.phase == "Suspended" and job.phase_since is not None:
            items.append(PendingItem(f"job/{job.name}/suspended/{_fmt(job.phase_since)}", job.phase_since,
                                     f"job {job.name} is suspended (waiting in a queue such as Kueue?)"
                                     + (f": {job.message}" if job.message else "")))
        for pod in self.cluster.list_pods(f"{JOB_NAME_LABEL}={job.name}"):
            meta, status = pod.get("metadata") or {}, pod.get("status") or {}
            if status.get("phase") != "Pending" or _ts(meta.get("creationTimestamp")) is None:
                continue
            key = f"pod/{meta.get('name')}/{str(meta.get('uid', ''))[:8]}"
            since = _ts(meta["creationTimestamp"])
            message = f"pod {meta.get('name')}: {describe_pending_pod(pod)}"
            if now - since >= timeout:
                message += self._claims_report(pod)  # only worth the API calls once the pod is overdue
            items.append(PendingItem(key, since, message))
        return items

    def _claims_report(self, pod: dict) -> str:
        notes = []
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if not claim:
                continue
            pvc = self.cluster.get_pvc(claim)
            if pvc is None:
                notes.append(f"PersistentVolumeClaim {claim} does not exist")
            elif (pvc.get("status") or {}).get("phase") != "Bound":
                notes.append(f"PersistentVolumeClaim {claim} is {(pvc.get('status') or {}).get('phase')}")
        return ("; " + "; ".join(notes)) if notes else ""

    def master_log_tail(self, job: str) -> str:
        """The last lines of the master pod's log (or why there are none)."""
        name = f"{job}-master-0"
        pod = self.cluster.get_pod(name)
        if pod is None:
            return (f"(no log: pod {name} not found; keep failed pods with the PyTorchJob's "
                    f"runPolicy.cleanPodPolicy: None)")
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        container = "pytorch" if "pytorch" in containers else (containers[0] if containers else None)
        try:
            text = self.cluster.read_pod_log(name, container, self.config.log_tail_lines, 1 << 20)
        except ApiException as e:
            return f"(no log from pod {name}: {api_error_summary(e)})"
        return text[-LOG_TAIL_MAX_CHARS:]

    # -- acting
    def execute(self, action: Action, world: World) -> list[str]:
        cfg = self.config
        if isinstance(action, CreateJob):
            spec = world.pipeline.stage(action.stage)
            body = job_manifest(world.pipeline, spec, action.attempt, cfg.namespace, cfg.stages_configmap)
            name = body["metadata"]["name"]
            self._write(f"create job {name}")
            try:
                created, existing = self.cluster.create_job(body)
            except ApiException as e:
                if e.status in (400, 404, 422):  # retrying cannot help: the job or the CRD is wrong
                    raise ConfigError(f"the API server rejected PyTorchJob {name} (from ConfigMap key "
                                      f"{spec.job_key}): {api_error_summary(e)}"
                                      + (" - is the Kubeflow training operator installed?"
                                         if e.status == 404 else "")) from e
                raise
            if created:
                log("info", "created job", job=name, stage=action.stage, attempt=action.attempt,
                    reason=action.reason)
            elif existing is None:
                raise ApiException(status=409, reason=f"job {name} exists but could not be read back")
            else:
                labels = (existing.get("metadata") or {}).get("labels") or {}
                want = {INSTANCE_LABEL: cfg.release, STAGE_LABEL: action.stage, ATTEMPT_LABEL: str(action.attempt)}
                if any(labels.get(k) != v for k, v in want.items()):
                    raise ConfigError(f"PyTorchJob {cfg.namespace}/{name} already exists but is not this "
                                      f"release's job (labels {labels}); delete or rename it")
                log("info", "job already exists (409); adopting it", job=name, stage=action.stage,
                    attempt=action.attempt)
            return []
        if isinstance(action, PruneCheckpoints):
            spec = world.pipeline.stage(action.stage)
            self._write(f"prune {spec.output_dir}")
            removed = prune_checkpoints(self.local_path(world.pipeline, spec.output_dir), action.keep)
            names = [p.name for p in removed]
            log("info", "pruned checkpoints", stage=action.stage, removed=names, keep=action.keep)
            return names
        if isinstance(action, ReportPending):
            for item in action.items:
                log("warning", "pending too long", stage=action.stage, item=item.key, detail=item.message)
        return []

    def publish(self, status: RunStatus, action: Action, pruned: list[str]) -> None:
        prev = self.status or RunStatus(self.config.release, self.config.namespace)
        if not status.same_as(prev):
            self._write("patch status")
            self._status_cm = self.cluster.patch_configmap_data(
                self.config.status_configmap, {STATUS_KEY: json.dumps(status.to_json(), indent=1)})
            log("info", "status", phase=status.phase, stage=status.stage, message=status.message)
        self.status = status
        for ev in status_events(prev, status, action, pruned):
            self._write(f"event {ev.reason}")
            try:
                self.cluster.create_event(self._status_cm or {"metadata": {"name": self.config.status_configmap}},
                                          ev.type, ev.reason, ev.message, COMPONENT, self._instance)
            except (ApiException, urllib3.exceptions.HTTPError) as e:  # events are best effort
                log("warning", "could not create event", reason=ev.reason, error=str(e))

    def _config_failure(self, message: str) -> RunResult:
        log("error", "configuration error", error=message)
        if self.status is not None and self.status.message != message:
            failed = replace(self.status, phase=FAILED, message=message, updated_at=_fmt(self.clock()))
            try:
                self._write("patch status")
                self.cluster.patch_configmap_data(self.config.status_configmap,
                                                  {STATUS_KEY: json.dumps(failed.to_json(), indent=1)})
                self.status = failed
            except (ApiException, urllib3.exceptions.HTTPError) as e:
                log("warning", "could not record the configuration error in the status", error=str(e))
        return RunResult(EXIT_CONFIG, message)

    # -- waiting
    def wait(self, resource_version: str, deadline: datetime | None) -> None:
        """Block until a job changes, the deadline passes, the resync period ends, or a stop is requested."""
        timeout = self.config.resync_seconds
        if deadline is not None:
            timeout = max(0.0, min(timeout, (deadline - self.clock()).total_seconds()))
        if timeout <= 0:
            return
        events = None
        try:
            self.in_wait = True
            if self.stopping:
                return
            events = self.cluster.watch_jobs(self.config.selector, resource_version, max(1, round(timeout)))
            for event in events:  # the first change is enough: the next pass re-reads everything
                meta = (event["object"] or {}).get("metadata") or {}
                log("debug", "watch event", type=event["type"], job=meta.get("name"))
                return
        except WatchExpired as e:
            log("info", "watch expired (410 Gone); relisting", error=str(e))
        except _StopRequested:
            pass
        finally:
            self.in_wait = False
            if events is not None:
                events.close()

    def _sleep(self, seconds: float) -> None:
        try:
            self.in_wait = True
            self._stop.wait(seconds)
        except _StopRequested:
            pass
        finally:
            self.in_wait = False


# --------------------------------------------------------------------------------------------- logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg and the record's structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log(level: str, msg: str, **fields_: Any) -> None:
    logger.log(logging.getLevelNamesMapping()[level.upper()], msg, extra={"fields": fields_}, stacklevel=2)


def setup_json_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("kubernetes", "urllib3"):  # their DEBUG output is whole response bodies
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))


# --------------------------------------------------------------------------------------------- CLI


def _positive(kind: type, minimum: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1-grpo controller", allow_abbrev=False,
                                description="Run a release's stage PyTorchJobs in order, in the cluster.")
    p.add_argument("--release", required=True, help="Helm release name (jobs are <release>-<stage>-<attempt>)")
    p.add_argument("-n", "--namespace", help="namespace (default: the pod's own, else the kubeconfig context's)")
    p.add_argument("--stages-configmap", help="ConfigMap with pipeline.yaml and the stage jobs "
                                              "(default <release>-stages)")
    p.add_argument("--status-configmap", help="ConfigMap the status is written to (default <release>-status)")
    p.add_argument("--retries", type=_positive(int, 0), default=2, help="retries per stage after a failure")
    p.add_argument("--keep-checkpoints", type=_positive(int, 1), default=3,
                   help="complete checkpoint-* folders to keep per stage (the final export is never removed)")
    p.add_argument("--pending-timeout-seconds", type=_positive(float, 1), default=1800.0,
                   help="report pods (or a job with no status) pending longer than this")
    p.add_argument("--mount-path", help="where the checkpoint volume is mounted in this pod "
                                        "(default: pipeline.yaml's mountPath)")
    p.add_argument("--resync-seconds", type=_positive(float, 1), default=120.0,
                   help="re-read everything at least this often even without watch events")
    p.add_argument("--log-tail-lines", type=_positive(int, 1), default=50,
                   help="lines of the master pod's log kept for a failed attempt")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account, else ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ControllerConfig:
    release = args.release
    longest = max(len(s) for s in STAGES)
    worst = f"{job_name(release, 'x' * longest, args.retries + 1)}-master-0"
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", release or ""):
        parser.error(f"--release {release!r}: must be a lowercase DNS label (a-z, 0-9, '-', starting with a letter)")
    if len(worst) > MAX_NAME_LEN:
        parser.error(f"--release {release!r}: too long; pod/service names like {worst!r} would exceed "
                     f"{MAX_NAME_LEN} characters")
    if args.mount_path and not os.path.isdir(args.mount_path):
        parser.error(f"--mount-path {args.mount_path!r}: not a directory")
    namespace = args.namespace or default_namespace(args.kubeconfig, args.context)
    return ControllerConfig(
        release=release, namespace=namespace,
        stages_configmap=args.stages_configmap or f"{release}-stages",
        status_configmap=args.status_configmap or f"{release}-status",
        retries=args.retries, keep_checkpoints=args.keep_checkpoints,
        pending_timeout_seconds=args.pending_timeout_seconds, mount_path=args.mount_path,
        resync_seconds=args.resync_seconds, log_tail_lines=args.log_tail_lines,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_json_logging(args.log_level)
    cfg = config_from_args(args, parser)
    try:
        api = load_api_client(args.kubeconfig, args.context, USER_AGENT)
    except Exception as e:  # the kubernetes config loaders raise several unrelated types
        log("error", "cannot load Kubernetes credentials", kubeconfig=args.kubeconfig, error=str(e))
        return EXIT_CONFIG
    controller = Controller(Cluster(api, cfg.namespace), cfg)

    def on_sigterm(signum: int, frame: Any) -> None:
        log("info", "SIGTERM: stopping after the current step")
        controller.stop()
        if controller.in_wait:  # waits have no side effects: abandon them at once
            raise _StopRequested()

    signal.signal(signal.SIGTERM, on_sigterm)
    log("info", "controller starting", release=cfg.release, namespace=cfg.namespace, retries=cfg.retries,
        keep_checkpoints=cfg.keep_checkpoints, pending_timeout_seconds=cfg.pending_timeout_seconds)
    try:
        result = controller.run()
    except Exception:  # a bug: say so in the log and exit with a code that is not "the run failed"
        logger.exception("controller crashed", extra={"fields": {"release": cfg.release}})
        return EXIT_CRASH
    return result.exit_code


# --------------------------------------------------------------------------------------------- status CLI


def format_status(status: RunStatus) -> str:
    """The status as a table a user reads in a terminal."""
    lines = [f"release {status.release} (namespace {status.namespace}): {status.phase}"
             + (f" - {status.message}" if status.message else "")]
    times = [f"started {status.started_at}" if status.started_at else "",
             f"finished {status.finished_at}" if status.finished_at else "",
             f"updated {status.updated_at}" if status.updated_at else ""]
    if any(times):
        lines.append("  " + ", ".join(t for t in times if t))
    retries = int(status.settings.get("retries", 0))
    header = ("STAGE", "PHASE", "ATTEMPT", "JOB", "STARTED", "FINISHED", "CHECKPOINT", "MESSAGE")
    rows = [header]
    for s in status.stages:
        checkpoint = s.output_dir if s.phase == SUCCEEDED else (s.latest_checkpoint or "-")
        rows.append((s.name, s.phase, f"{s.attempt}/{retries + 1}" if s.attempt else "-", s.job or "-",
                     s.start_time or "-", s.end_time or "-", checkpoint, _one_line(s.message) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    lineage = [f"{s.name} <- {s.model_from}" for s in status.stages if s.model_from]
    if lineage:
        lines.append("lineage: " + "; ".join(lineage))
    for s in status.stages:
        if s.metrics:
            lines.append(f"metrics {s.name}: " + ", ".join(f"{k}={_num(v)}" for k, v in sorted(s.metrics.items())))
    if status.log_tail:
        lines.append("log tail of the failed attempt's master pod:")
        lines.extend("  | " + line for line in status.log_tail.rstrip("\n").splitlines())
    return "\n".join(lines)


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def status_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="r1-grpo status", allow_abbrev=False, description="Print a release's run status; exit 1 "
                                                                   "if the run failed, 2 if it cannot be read.")
    p.add_argument("--release", required=True)
    p.add_argument("-n", "--namespace", help="default: the kubeconfig context's namespace")
    p.add_argument("--status-configmap", help="default <release>-status")
    p.add_argument("--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument("--json", action="store_true", help="print status.json instead of a table")
    args = p.parse_args(argv)
    name = args.status_configmap or f"{args.release}-status"
    try:
        namespace = args.namespace or default_namespace(args.kubeconfig, args.context)
        api = load_api_client(args.kubeconfig, args.context, "r1-grpo-status/1")
        cm = Cluster(api, namespace).get_configmap(name)
    except ApiException as e:
        print(f"r1-grpo status: cannot read ConfigMap {name}: {api_error_summary(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # kubeconfig loading and connection errors come in many types
        print(f"r1-grpo status: cannot reach the cluster: {e}", file=sys.stderr)
        return 2
    if cm is None:
        print(f"r1-grpo status: ConfigMap {namespace}/{name} not found: is release {args.release!r} installed "
              f"in namespace {namespace!r} and its controller started?", file=sys.stderr)
        return 2
    raw = (cm.get("data") or {}).get(STATUS_KEY)
    try:
        status = RunStatus.from_json(json.loads(raw or ""))
    except (ValueError, TypeError) as e:
        print(f"r1-grpo status: ConfigMap {namespace}/{name} key {STATUS_KEY}: unreadable: {e}", file=sys.stderr)
        return 2
    print(json.dumps(status.to_json(), indent=2) if args.json else format_status(status))
    return EXIT_FAILED if status.phase == FAILED else 0


if __name__ == "__main__":
    raise SystemExit(main())
