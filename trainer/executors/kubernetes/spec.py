"""The stage list as the controller reads it: configuration, labels, the stages ConfigMap, job manifests."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import yaml

from trainer.contract.stage_args import StageArgsError, check_stage_argv
from trainer.contract.stages import STAGE_MODULES, STAGES, model_sources
from trainer.executors.kubernetes.jobkinds import KINDS, PYTORCHJOB, JobKind, kind_of

INSTANCE_LABEL = "app.kubernetes.io/instance"
NAME_LABEL = "app.kubernetes.io/name"
STAGE_LABEL = "r1-grpo.io/stage"
ATTEMPT_LABEL = "r1-grpo.io/attempt"
COMPONENT = "r1-grpo-controller"
STATUS_KEY = "status.json"
PIPELINE_KEY = "pipeline.yaml"

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_CONFIG, EXIT_FORBIDDEN, EXIT_CRASH, EXIT_SIGTERM = 0, 1, 2, 3, 4, 143
# The status ConfigMap must stay far below the 1 MiB object limit however many attempts a run makes: a log
# tail is capped in characters and in UTF-8 bytes, a stage keeps its first attempt and its newest ones in
# full (the rest are summarised in one line), and only the newest failed attempts keep their log tails.
LOG_TAIL_MAX_CHARS = 8000
LOG_TAIL_MAX_BYTES = 16 * 1024
LOG_READ_MAX_BYTES = 256 * 1024  # raw bytes kept from the end of the log stream before rendering
ATTEMPTS_SHOWN = 5  # per stage: the first attempt and the newest ATTEMPTS_SHOWN - 1
LOG_TAILS_KEPT = 2  # per stage: log tails of the newest attempts only
MESSAGE_MAX_CHARS = 2000  # condition messages, causes and stage messages
STATUS_MAX_BYTES = 256 * 1024  # a last guard when encoding; the caps above keep the status well below
LINGER_POLL_SECONDS = 5.0  # how often to look whether a finished attempt's pods have stopped (no watch)
STALE_HEARTBEATS = 5  # missed heartbeats after which `r1-grpo status` says the controller is silent
MAX_NAME_LEN = 63  # the operator names services `<job>-master-0`; services need DNS-1035 labels

# Run and stage phases shown in the status.
PENDING, SUBMITTED, RUNNING, SUCCEEDED, FAILED = "Pending", "Submitted", "Running", "Succeeded", "Failed"


class ConfigError(Exception):
    """Input the controller cannot run with; the message names the flag, ConfigMap key or object."""


class StageRejected(ConfigError):
    """A stage's job that the API server or an admission webhook refuses (found by the start-up dry run)."""

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


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
    mount_path: str | None = (
        None  # where this pod sees the checkpoint volume; None: pipeline.yaml's mountPath
    )
    resync_seconds: float = 120.0
    log_tail_lines: int = 50
    error_backoff_seconds: float = 2.0
    max_error_backoff_seconds: float = 60.0
    # A 401/403 for a call the server allowed before, or right after a lost connection, is retried this
    # long before it counts as the Role's or the token's fault (exit 3)
    refusal_grace_seconds: float = 300.0
    # the status is written at least this often while the controller runs (updatedAt); `r1-grpo status`
    # calls a running status silent after STALE_HEARTBEATS of them
    heartbeat_seconds: float = 60.0
    # a stage job with a Kueue queue label and no Kueue Workload after this long is reported (the job runs
    # outside the quota: Kueue does not manage its kind)
    kueue_workload_timeout_seconds: float = 120.0

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
    job: dict  # the ConfigMap's job (PyTorchJob or TrainJob) for attempt 1

    @property
    def kind(self) -> JobKind:
        return kind_of(self.job) or PYTORCHJOB


@dataclass(frozen=True)
class Pipeline:
    release: str
    mount_path: str
    stages: tuple[StageSpec, ...]
    configmap_uid: str

    @property
    def kind(self) -> JobKind:
        """The job API of the release's stages (parse_pipeline checks they all use one)."""
        return self.stages[0].kind if self.stages else PYTORCHJOB

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
        raise ConfigError(
            f"{where}: {PIPELINE_KEY}: release is {raw.get('release')!r}, but the controller runs "
            f"--release {release!r}"
        )
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
        missing = [
            k
            for k in ("name", "outputDir", "modelFrom", "job")
            if not isinstance(item.get(k), str) or not item.get(k)
        ]
        if missing:
            raise ConfigError(f"{at}: missing or non-string keys {missing}")
        name = item["name"]
        if name not in STAGES:
            raise ConfigError(f"{at}.name: unknown stage {name!r}; stages are {', '.join(STAGES)}")
        if specs and STAGES.index(name) <= STAGES.index(specs[-1].name):
            raise ConfigError(
                f"{at}.name: {name!r} after {specs[-1].name!r}; stages run in the order "
                f"{', '.join(STAGES)}, each at most once"
            )
        out = PurePosixPath(item["outputDir"])
        if not out.is_absolute() or not out.is_relative_to(mount) or out == PurePosixPath(mount):
            raise ConfigError(
                f"{at}.outputDir: {item['outputDir']!r} is not a folder under mountPath {mount!r}"
            )
        key = item["job"]
        if key not in data:
            raise ConfigError(f"{at}.job: the ConfigMap has no key {key!r}")
        job = _parse_job_manifest(data[key], f"{where}: {key}", release, name)
        spec = StageSpec(name, str(out), item["modelFrom"], key, job)
        if specs and spec.kind != specs[0].kind:
            raise ConfigError(
                f"{where}: {key}: a {spec.kind.kind}, but {specs[0].job_key} is a {specs[0].kind.kind}; "
                f"all stages of a release use one job API"
            )
        specs.append(spec)
    # The hand-off contract: a stage after a training stage starts from that stage's folder.
    by_name = {spec.name: spec for spec in specs}
    sources = model_sources([spec.name for spec in specs])
    for spec in specs:
        source = sources[spec.name]
        if source is not None and spec.model_from != by_name[source].output_dir:
            raise ConfigError(
                f"{where}: {PIPELINE_KEY}: stage {spec.name} has modelFrom {spec.model_from!r}, "
                f"but it must start from {source}'s output {by_name[source].output_dir!r}"
            )
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
        raise ConfigError(f"{where}: must be a job object (PyTorchJob or TrainJob)")
    kind = kind_of(job)
    if kind is None:
        expected = " or ".join(f"{k.api_version}/{k.kind}" for k in KINDS)
        raise ConfigError(
            f"{where}: apiVersion/kind are {job.get('apiVersion')!r}/{job.get('kind')!r}, expected {expected}"
        )
    meta = job.get("metadata") or {}
    expected = job_name(release, stage, 1)
    if meta.get("name") != expected:
        raise ConfigError(f"{where}: metadata.name is {meta.get('name')!r}, expected {expected!r}")
    labels = meta.get("labels") or {}
    want = {INSTANCE_LABEL: release, STAGE_LABEL: stage, ATTEMPT_LABEL: "1"}
    wrong = {k: labels.get(k) for k, v in want.items() if labels.get(k) != v}
    if wrong:
        raise ConfigError(f"{where}: metadata.labels {wrong} must be {want}")
    problem = kind.structure_error(job)
    if problem:
        raise ConfigError(f"{where}: {problem}")
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
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": owner_name, "uid": pipeline.configmap_uid}
        ]
    return job


def stage_argvs(job: dict) -> list[tuple[str, list[str]]]:
    """(replica type, the stage's flags) for each replica whose trainer container runs a stage module:
    the words after `--module <module>` (or `-m <module>`) of its command and args."""
    out = []
    for kind, container in (kind_of(job) or PYTORCHJOB).argv_sources(job):
        words = [str(w) for w in (container.get("command") or []) + (container.get("args") or [])]
        for i, word in enumerate(words[:-1]):
            if word in ("--module", "-m"):
                out.append((kind, [words[i + 1], *words[i + 2 :]]))
                break
    return out


def check_stage_flags(spec: StageSpec, where: str) -> None:
    """Parse the stage's flags, in every replica, with the stage's own rules (trainer/contract/stage_args.py):
    a flag the stage would refuse fails the run before anything runs, naming the stage and the flag."""
    for kind, (module, *argv) in stage_argvs(spec.job):
        if module != STAGE_MODULES[spec.name]:
            continue  # not one of our stage modules: its flags are not ours to judge
        try:
            check_stage_argv(spec.name, argv)
        except StageArgsError as e:
            value = f"; chart value stages.{spec.name}.args.{e.flag.removeprefix('--')}" if e.flag else ""
            raise StageRejected(f"{e} ({where} {kind}{value})", spec.name) from None
