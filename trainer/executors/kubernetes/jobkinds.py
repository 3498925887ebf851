"""The job APIs a stage can run as, one small adapter each: the Kubeflow training operator's PyTorchJob
(kubeflow.org/v1) and Kubeflow Trainer v2's TrainJob (trainer.kubeflow.org/v1alpha1, run as a JobSet).

An adapter says where the kind lives in the API (group, version, plural), how to find its pods and its
first node's pod, how many pods it should have, what phase its status means in the controller's terms
(trainer/executors/kubernetes/spec.py JOB_PHASE_PRIORITY), where its trainer command line is, and what
serves it (for error messages). Everything else -- create with strict validation and dry runs, observe,
decide, act, the status -- is the same code for both (controller.py); the stages ConfigMap's jobs say which
kind a release uses (chart value jobApi).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

SUBMITTED = "Submitted"  # the job exists but its operator has written no condition yet (spec.py)
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def _ts(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


def _true(conditions: list[dict]) -> dict[str, dict]:
    return {c.get("type"): c for c in conditions or [] if str(c.get("status")) == "True"}


def _phase_of(c: dict, phase: str) -> tuple[str, str, datetime | None]:
    return phase, str(c.get("message") or c.get("reason") or ""), _ts(c.get("lastTransitionTime"))


@dataclass(frozen=True)
class JobKind:
    kind: str
    group: str
    version: str
    plural: str
    container: str  # the training container in every pod of the job
    pod_label: str  # on every pod of a job, its value the job's name
    operator: str  # what serves the kind in the cluster, for error messages
    kueue_integration: str  # the name of Kueue's integration for the kind (its configuration's frameworks)
    first_pod_marker: str  # in the names of the first node's pods only
    _phase: Callable[[dict], tuple[str, str, datetime | None]]
    _replicas: Callable[[dict], int]
    _argv_sources: Callable[[dict], list[tuple[str, dict]]]
    _first_pod_selector: Callable[[str], str]

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def installed(self) -> str:
        """What must be installed, as error messages name it."""
        return f"{self.operator} ({self.api_version} {self.kind} CRD)"

    def pod_selector(self, job_name: str) -> str:
        return f"{self.pod_label}={job_name}"

    def first_pod_selector(self, job_name: str) -> str:
        """The pods of the job's first node (rank 0, whose log says why a run failed)."""
        return self._first_pod_selector(job_name)

    def phase(self, obj: dict) -> tuple[str, str, datetime | None]:
        """(phase, message, since) from the job's status, in the controller's phase names."""
        return self._phase(obj.get("status") or {})

    def replicas(self, obj: dict) -> int:
        """Pods the job should have (one per node)."""
        return self._replicas(obj.get("spec") or {})

    def argv_sources(self, job: dict) -> list[tuple[str, dict]]:
        """(role, container-like map with command and args) of each distinct trainer command of the job."""
        return self._argv_sources(job.get("spec") or {})

    def structure_error(self, job: dict) -> str | None:
        """What a job of this kind lacks to be a stage job, or None."""
        spec = job.get("spec") or {}
        if self.kind == PYTORCHJOB.kind and not isinstance(spec.get("pytorchReplicaSpecs"), dict):
            return "spec.pytorchReplicaSpecs is missing"
        if self.kind == TRAINJOB.kind:
            if not (spec.get("runtimeRef") or {}).get("name"):
                return "spec.runtimeRef.name is missing"
            if not isinstance(spec.get("trainer"), dict):
                return "spec.trainer is missing (the Trainer injects torchrun's variables only with it)"
        return None


# --------------------------------------------------------------------------------------------- PyTorchJob

_PYTORCH_PRIORITY = ("Failed", "Succeeded", "Suspended", "Restarting", "Running", "Created")


def _pytorch_phase(status: dict) -> tuple[str, str, datetime | None]:
    true = _true(status.get("conditions") or [])
    for kind in _PYTORCH_PRIORITY:
        if kind in true:
            return _phase_of(true[kind], kind)
    return SUBMITTED, "", None


def _pytorch_replicas(spec: dict) -> int:
    replicas = (spec.get("pytorchReplicaSpecs") or {}).values()
    return sum(int((r or {}).get("replicas", 1) or 0) for r in replicas) or 1


def _pytorch_argv_sources(spec: dict) -> list[tuple[str, dict]]:
    out = []
    for role, replica in sorted((spec.get("pytorchReplicaSpecs") or {}).items()):
        containers = ((((replica or {}).get("template") or {}).get("spec") or {}).get("containers")) or []
        container = next((c for c in containers if c.get("name") == "pytorch"), None)
        if container is not None:
            out.append((role, container))
    return out


PYTORCHJOB = JobKind(
    kind="PyTorchJob",
    group="kubeflow.org",
    version="v1",
    plural="pytorchjobs",
    container="pytorch",
    pod_label="training.kubeflow.org/job-name",
    operator="the Kubeflow training operator",
    kueue_integration="kubeflow.org/pytorchjob",
    first_pod_marker="-master-",
    _phase=_pytorch_phase,
    _replicas=_pytorch_replicas,
    _argv_sources=_pytorch_argv_sources,
    _first_pod_selector=lambda name: (
        f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master,"
        f"training.kubeflow.org/replica-index=0"
    ),
)


# --------------------------------------------------------------------------------------------- TrainJob


def _trainjob_phase(status: dict) -> tuple[str, str, datetime | None]:
    """TrainJob conditions are Complete, Failed and Suspended only; Running and Created come from the
    JobSet's jobs the Trainer reports in jobsStatus."""
    true = _true(status.get("conditions") or [])
    for kind, phase in (("Failed", "Failed"), ("Complete", "Succeeded"), ("Suspended", "Suspended")):
        if kind in true:
            return _phase_of(true[kind], phase)
    jobs = status.get("jobsStatus") or []
    if any(int(j.get("active") or 0) + int(j.get("succeeded") or 0) > 0 for j in jobs):
        return "Running", "", None
    if jobs:
        return "Created", "", None
    return SUBMITTED, "", None


def _trainjob_argv_sources(spec: dict) -> list[tuple[str, dict]]:
    trainer = spec.get("trainer") or {}
    return [("node", trainer)] if trainer.get("command") or trainer.get("args") else []


TRAINJOB = JobKind(
    kind="TrainJob",
    group="trainer.kubeflow.org",
    version="v1alpha1",
    plural="trainjobs",
    container="node",
    pod_label="jobset.sigs.k8s.io/jobset-name",
    operator="Kubeflow Trainer v2 (with the JobSet controller)",
    kueue_integration="trainer.kubeflow.org/trainjob",
    first_pod_marker="-node-0-0-",
    _phase=_trainjob_phase,
    _replicas=lambda spec: int((spec.get("trainer") or {}).get("numNodes") or 1),
    _argv_sources=_trainjob_argv_sources,
    _first_pod_selector=lambda name: (
        f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/job-index=0,"
        f"batch.kubernetes.io/job-completion-index=0"
    ),
)

KINDS = (PYTORCHJOB, TRAINJOB)


def kind_of(obj: dict) -> JobKind | None:
    """The adapter of a job object by its apiVersion and kind, or None."""
    return next(
        (k for k in KINDS if obj.get("apiVersion") == k.api_version and obj.get("kind") == k.kind), None
    )
