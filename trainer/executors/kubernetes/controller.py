"""The stage controller: runs a release's stage jobs (sft -> grpo -> eval) to a finished run.

The jobs are PyTorchJobs or Kubeflow Trainer v2 TrainJobs, whichever the stages ConfigMap holds (chart value
jobApi); jobkinds.py is all that differs between them. Creating jobs is creating.py, what pods and events
say is reports.py, what Kueue says is admission.py.

It runs in the cluster (`r1-grpo controller`, a Kubernetes Job from the training image, with the checkpoint
volume mounted) and is built to be boring and restart-safe:

* Level-triggered. Every pass reads the world -- the stages ConfigMap, the release's jobs (by labels),
  the stage outputs on the volume, pod state, and the controller's own previous status as memory -- then a pure
  function `decide(world, config)` picks at most one action (create a job, prune checkpoints, report a stuck
  pod, finish), the controller performs it, writes the status, and waits on a watch of the jobs (relisting on
  timeout and on 410 Gone). Nothing is remembered only in process memory, so killing the controller at any
  moment and starting it again gives the same outcome.
* No duplicates. Job names are deterministic (`<release>-<stage>-<attempt>`), creation is create-if-absent,
  and 409 AlreadyExists counts as success after checking the existing job carries this stage's labels and
  is owned by this install's stages ConfigMap (by uid: a job of an earlier install of the release, still
  waiting for the garbage collector, is waited out, never adopted).
* Checked before anything runs. When it starts (and whenever the stages ConfigMap changes) the controller
  parses every stage's flags with the stage's own rules (trainer/contract/stage_args.py), then creates
  every stage's job as a server-side dry run with strict field validation: an unknown field, a
  schema error or an admission webhook's refusal fails the run at once, naming the stage and the field,
  instead of when that stage's turn comes hours later.
* Honest hand-off. A stage is done only when its job Succeeded *and* `verify_stage_output` accepts its
  folder (the same check the local pipeline uses); a Succeeded job with a missing or corrupt manifest is a
  failed attempt with the verification error as its reason.
* Failures. An attempt whose trainer exited 2 (bad input) fails the run at once: another attempt would
  refuse the same input. Any other failed attempt is retried (new attempt, same output folder, so the trainer resumes from its
  last complete checkpoint) up to `--retries` times; then the run is Failed with the job's last condition
  message and the tail of the master pod's log. One trainer per output folder: the next attempt is created
  only once every pod of the failed one has stopped (the chart's jobs use restartPolicy Never, so the
  operator never restarts a trainer in place, and cleanPodPolicy Running, so it deletes the pods still
  running when the job fails and keeps the failed ones with their logs). Pods (or a job no operator picked
  up, or a job whose pods the API refuses) pending longer than `--pending-timeout-seconds` are reported in
  the status and as a Warning event, once each, with the reason the API gave; the controller keeps
  waiting, because capacity may still arrive (an autoscaler), but the user sees why nothing moves. So does
  a job the API refuses for a full ResourceQuota.
* A job deleted by hand while its stage is current is recreated under the *same* attempt number (the
  deletion is not the training's fault, so it does not use up a retry); the trainer resumes from the last
  complete checkpoint. A job deleted after its stage finished is not re-run: the status remembers the stage
  succeeded and the output still verifies. To stop a run, uninstall the release.

Status: ConfigMap `<release>-status` (key `status.json`), Events on it, JSON-lines logs on stderr. Exit codes:
0 run succeeded, 1 run failed, 2 configuration error (flags, stages ConfigMap, volume not mounted, a foreign
job holding one of our names, a stage job the API server or an admission webhook rejects, a stage flag
the stage would refuse), 3 the API refused our credentials or the Role lacks a permission (401, or a 403
that is neither quota, a terminating namespace nor an admission webhook; for a call the server allowed
before, or right after a lost connection, only once --refusal-grace-seconds of retries have not helped:
a restarting API server refuses until its authorizer is ready; the reason goes into the status first),
4 the controller crashed (a bug; the traceback is
logged), 143 stopped before the run finished: SIGTERM, or the namespace is being deleted (non-zero so the
Job controller starts the controller again, if there still is one).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import urllib3
from kubernetes.client.rest import ApiException

from trainer.contract.output import (
    move_aside,
    prune_checkpoints,
)
from trainer.executors.kubernetes.admission import KueueAdmission
from trainer.executors.kubernetes.cluster import (
    DENIED_ADMISSION,
    DENIED_QUOTA,
    DENIED_TERMINATING,
    Cluster,
    WatchExpired,
    api_error_summary,
    classify_api_error,
    role_lacks_rule,
)
from trainer.executors.kubernetes.creating import JobCreation
from trainer.executors.kubernetes.decide import (
    BROKEN,
    MISSING,
    Action,
    CreateBlocked,
    CreateJob,
    Finish,
    MoveAside,
    PruneCheckpoints,
    ReportPending,
    Wait,
    attempt_outcome,
    bad_input,
    current_attempt,
    decide,
    frontier,
    recorded_phase,
)
from trainer.executors.kubernetes.jsonlog import log
from trainer.executors.kubernetes.outputs import OutputVerifier, StageOutputs
from trainer.executors.kubernetes.reports import PodReports
from trainer.executors.kubernetes.spec import (
    COMPONENT,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_SIGTERM,
    EXIT_SUCCEEDED,
    FAILED,
    INSTANCE_LABEL,
    NAME_LABEL,
    STATUS_KEY,
    SUCCEEDED,
    ConfigError,
    ControllerConfig,
    Pipeline,
    StageRejected,
    parse_pipeline,
)
from trainer.executors.kubernetes.status import (
    RunStatus,
    _to_json,
    encode_status,
    render_status,
    status_events,
)
from trainer.executors.kubernetes.stops import RunResult, Stops
from trainer.executors.kubernetes.world import (
    JobState,
    PendingItem,
    TrainerExit,
    World,
    _ts,
    parse_job,
    trainer_exit,
)

logger = logging.getLogger("trainer.controller")


class _BudgetSpent(BaseException):
    """Raised before a write once `max_writes` is used up: a deterministic stand-in for `kill -9`."""


class _StopRequested(BaseException):
    """Raised by the SIGTERM handler to abandon a wait (waits have no side effects)."""


# --------------------------------------------------------------------------------------------- the controller


class Controller(StageOutputs, PodReports, KueueAdmission, Stops, JobCreation):
    """Read the world, decide, act once, publish the status, wait on the watch; repeat until the run ends."""

    def __init__(
        self,
        cluster: Cluster,
        config: ControllerConfig,
        *,
        max_writes: int | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
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
        self._verifier = OutputVerifier()
        self._pipeline: tuple[tuple, Pipeline] | None = None
        self._validated: tuple | None = None  # the stages ConfigMap version whose jobs passed the dry run
        self._instance = os.environ.get("HOSTNAME") or socket.gethostname()
        self._trouble_at: float | None = None  # monotonic time of the last lost connection, 5xx or 429

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
        refused_since: float | None = None  # monotonic time of the first refusal of the current streak
        try:
            while not self.stopping:
                try:
                    if self.status is None:
                        self._load_status()
                    result = self.reconcile_once()
                    backoff = self.config.error_backoff_seconds
                    refused_since = None
                except ConfigError as e:
                    return self._config_failure(str(e))
                except ApiException as e:
                    denied = classify_api_error(e)
                    if denied == DENIED_ADMISSION:
                        return self._config_failure(f"an admission webhook refused: {api_error_summary(e)}")
                    if denied == DENIED_TERMINATING:
                        return self._namespace_terminating(api_error_summary(e))
                    if denied is not None and denied != DENIED_QUOTA:
                        now = time.monotonic()
                        refused_since = refused_since if refused_since is not None else now
                        if (
                            not self._refusal_may_pass(e)
                            or now - refused_since >= self.config.refusal_grace_seconds
                        ):
                            return self._give_up(e, now - refused_since)
                        log(
                            "warning",
                            "the API server refused a call that it allowed before, or refused it just after "
                            "the connection was lost (an API server restarting answers 403 until its "
                            "authorizer has loaded the RBAC objects); retrying",
                            error=api_error_summary(e),
                            backoff_seconds=backoff,
                            gives_up_in_seconds=round(
                                self.config.refusal_grace_seconds - (now - refused_since)
                            ),
                        )
                    else:
                        if e.status in (0, 429) or e.status >= 500:
                            self._trouble_at = time.monotonic()
                        log(
                            "warning",
                            "API error; retrying",
                            error=api_error_summary(e),
                            backoff_seconds=backoff,
                        )
                    self._sleep(backoff)
                    backoff = min(backoff * 2, self.config.max_error_backoff_seconds)
                    continue
                except (urllib3.exceptions.HTTPError, OSError) as e:
                    if isinstance(e, urllib3.exceptions.HTTPError | ConnectionError):
                        self._trouble_at = time.monotonic()
                    log(
                        "warning",
                        "transient error (network or volume); retrying",
                        error=repr(e),
                        backoff_seconds=backoff,
                    )
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
        try:
            self.validate_jobs(world.pipeline)
        except StageRejected as e:
            log("error", "configuration error", stage=e.stage, error=str(e))
            rejected = Finish(FAILED, str(e), e.stage)
            self.publish(render_status(world, rejected, self.config), rejected, [])
            return RunResult(EXIT_CONFIG, str(e))
        action = decide(world, self.config)
        log(
            "info",
            "decided",
            action=type(action).__name__,
            **{k: v for k, v in _to_json(action).items() if k not in ("items", "deadline")},
        )
        pruned, blocked = self.execute(action, world)
        if blocked is not None:  # the create was refused for now; the status says why
            action = blocked
            log(
                "warning",
                "job not created yet",
                stage=blocked.stage,
                attempt=blocked.attempt,
                why=blocked.message,
            )
        self.publish(render_status(world, action, self.config), action, pruned)
        if isinstance(action, Finish):
            code = EXIT_SUCCEEDED if action.phase == SUCCEEDED else EXIT_FAILED
            log("info", "run finished", phase=action.phase, message=action.message, exit_code=code)
            return RunResult(code, action.message)
        if isinstance(action, Wait | CreateBlocked) and not self.stopping:
            self.wait(resource_version, getattr(action, "deadline", None))
        return None

    # -- reading the world
    def _load_status(self) -> None:
        cfg = self.config
        cm = self.cluster.get_configmap(cfg.status_configmap)
        fresh = RunStatus(cfg.release, cfg.namespace)
        if cm is None:
            stages_cm = self.cluster.get_configmap(cfg.stages_configmap)
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": cfg.status_configmap,
                    "namespace": cfg.namespace,
                    "labels": {
                        INSTANCE_LABEL: cfg.release,
                        NAME_LABEL: "r1-grpo",
                        "app.kubernetes.io/component": "status",
                        "app.kubernetes.io/managed-by": COMPONENT,
                    },
                },
                "data": {STATUS_KEY: encode_status(fresh)},
            }
            if stages_cm and (stages_cm.get("metadata") or {}).get("uid"):
                # garbage-collected with the stages ConfigMap on `helm uninstall`
                body["metadata"]["ownerReferences"] = [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "name": cfg.stages_configmap,
                        "uid": stages_cm["metadata"]["uid"],
                    }
                ]
            self._write("create status ConfigMap")
            cm = self.cluster.create_configmap(body) or self.cluster.get_configmap(cfg.status_configmap)
            if cm is None:
                raise ApiException(
                    status=404, reason=f"ConfigMap {cfg.status_configmap} vanished after creation"
                )
        self._status_cm = cm
        raw = (cm.get("data") or {}).get(STATUS_KEY)
        try:
            status = RunStatus.from_json(json.loads(raw)) if raw else fresh
        except (ValueError, TypeError) as e:
            log(
                "warning",
                "unreadable status; rebuilding it from the cluster",
                configmap=cfg.status_configmap,
                error=str(e),
            )
            status = fresh
        self.status = status

    def observe(self) -> tuple[World, str]:
        cfg = self.config
        now = self.clock()
        cm = self.cluster.get_configmap(cfg.stages_configmap)
        if cm is None:
            raise ConfigError(
                f"ConfigMap {cfg.namespace}/{cfg.stages_configmap} (--stages-configmap) not found"
            )
        meta = cm.get("metadata") or {}
        key = (meta.get("uid"), meta.get("resourceVersion"))
        if self._pipeline is None or self._pipeline[0] != key or not all(key):
            self._pipeline = (
                key,
                parse_pipeline(cm, cfg.release),
            )  # re-parse only when the ConfigMap changed
        pipeline = self._pipeline[1]
        self.cluster.job_kind = pipeline.kind
        volume = Path(cfg.mount_path or pipeline.mount_path)
        if not volume.is_dir():
            # without the volume every finished stage would look unverifiable and be retried: refuse instead
            raise ConfigError(
                f"the checkpoint volume is not mounted at {volume} (--mount-path, or pipeline.yaml "
                f"mountPath {pipeline.mount_path!r}); the controller pod must mount the same PVC"
            )
        previous = self.status or RunStatus(cfg.release, cfg.namespace)
        if previous.stages_uid and pipeline.configmap_uid and previous.stages_uid != pipeline.configmap_uid:
            log(
                "warning",
                "the status belongs to an earlier install of this release; starting afresh",
                status_uid=previous.stages_uid,
                stages_uid=pipeline.configmap_uid,
            )
            previous = RunStatus(cfg.release, cfg.namespace)
        try:
            listed = self.cluster.list_jobs(cfg.selector)
        except ApiException as e:
            if e.status == 404:
                raise ConfigError(
                    f"cannot list {pipeline.kind.kind}s ({api_error_summary(e)}): is "
                    f"{pipeline.kind.installed} installed?"
                ) from e
            raise
        jobs: dict[str, dict[int, JobState]] = {}
        objects: dict[str, dict] = {}
        for obj in listed.items:
            job = parse_job(obj, pipeline)
            if job is not None:
                jobs.setdefault(job.stage, {})[job.attempt] = job
                objects[job.name] = obj
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
        for candidate in pipeline.stages[fi : fi + 2]:  # the stages a job may be created for next
            outputs[candidate.name] = self._ownership(pipeline, candidate, outputs.get(candidate.name))
        pending: list[PendingItem] = []
        log_tails: dict[str, str] = {}
        admission = None
        if job is not None and job.phase not in (SUCCEEDED, FAILED) and not job.deleting:
            pending = self._pending_items(job, now)
            admission, warnings = self._kueue_state(objects[job.name], job, now)
            pending += warnings
        exits: dict[str, TrainerExit] = {}
        if job is not None and job.phase == FAILED:
            rec = previous.stage_record(spec.name)
            arec = rec.attempt_record(attempt) if rec else None
            if arec is None or arec.log_tail is None:
                log_tails[job.name] = self.master_log_tail(job.name)
            if arec is None or arec.exit_code is None:  # read once: the pods may go, the status stays
                ended = trainer_exit(
                    self.cluster.list_pods(pipeline.kind.pod_selector(job.name)),
                    log_tails.get(job.name) or (arec.log_tail if arec else None),
                    pipeline.kind,
                )
                if ended.code is not None:
                    exits[job.name] = ended
        world = replace(
            world,
            outputs=outputs,
            pending=tuple(pending),
            log_tails=log_tails,
            exits=exits,
            admission=admission,
        )
        lingering: list[PendingItem] = []
        if attempt > 0:
            outcome, _ = attempt_outcome(world, spec.name, attempt)
            retried = (
                outcome == BROKEN and attempt <= cfg.retries and bad_input(world, spec.name, attempt) is None
            )
            if outcome == MISSING or retried:
                lingering = self._lingering_pods(pipeline, spec, attempt, job)
        return replace(world, lingering=tuple(lingering)), listed.resource_version

    # -- acting
    def execute(self, action: Action, world: World) -> tuple[list[str], CreateBlocked | None]:
        """Carry out the action: (checkpoint folders pruned, what became of a refused CreateJob)."""
        if isinstance(action, CreateJob):
            return [], self.create_job(action, world)
        if isinstance(action, MoveAside):
            spec = world.pipeline.stage(action.stage)
            self._write(f"move aside {spec.output_dir}")
            moved = move_aside(
                self.local_path(world.pipeline, spec.output_dir),
                self.local_path(world.pipeline, action.target),
            )
            log(
                "warning",
                "moved a stage folder aside; the stage starts over",
                stage=action.stage,
                folder=spec.output_dir,
                to=str(PurePosixPath(spec.output_dir).with_name(moved.name)),
                reason=action.reason,
            )
            return [], None
        if isinstance(action, PruneCheckpoints):
            spec = world.pipeline.stage(action.stage)
            self._write(f"prune {spec.output_dir}")
            removed = prune_checkpoints(self.local_path(world.pipeline, spec.output_dir), action.keep)
            names = [p.name for p in removed]
            log("info", "pruned checkpoints", stage=action.stage, removed=names, keep=action.keep)
            return names, None
        if isinstance(action, ReportPending):
            for item in action.items:
                log("warning", "pending too long", stage=action.stage, item=item.key, detail=item.message)
        return [], None

    def publish(self, status: RunStatus, action: Action, pruned: list[str]) -> None:
        prev = self.status or RunStatus(self.config.release, self.config.namespace)
        written = _ts(prev.updated_at)
        # a finished run has nothing more to say: a controller restarted after the end writes nothing
        heartbeat = status.phase not in (SUCCEEDED, FAILED) and (
            written is None or (self.clock() - written).total_seconds() >= self.config.heartbeat_seconds
        )
        if not status.same_as(prev) or heartbeat:  # updatedAt is the controller's heartbeat
            self._write("patch status")
            self._status_cm = self.cluster.patch_configmap_data(
                self.config.status_configmap, {STATUS_KEY: encode_status(status)}
            )
            if not status.same_as(prev):
                log("info", "status", phase=status.phase, stage=status.stage, message=status.message)
        else:
            status = replace(status, updated_at=prev.updated_at)
        self.status = status
        for ev in status_events(prev, status, action, pruned):
            self._write(f"event {ev.reason}")
            try:
                self.cluster.create_event(
                    self._status_cm or {"metadata": {"name": self.config.status_configmap}},
                    ev.type,
                    ev.reason,
                    ev.message,
                    COMPONENT,
                    self._instance,
                )
            except (ApiException, urllib3.exceptions.HTTPError) as e:  # events are best effort...
                if isinstance(e, ApiException) and role_lacks_rule(e):
                    raise  # ...but a Role without the rule is a broken install: exit 3 like any call
                log("warning", "could not create event", reason=ev.reason, error=str(e))

    # -- waiting
    def wait(self, resource_version: str, deadline: datetime | None) -> None:
        """Block until a job changes, the deadline passes, the resync period ends, or a stop is requested."""
        timeout = min(self.config.resync_seconds, self.config.heartbeat_seconds)
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
