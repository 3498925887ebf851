"""What Kueue says about the current stage job, for the status. A mixin of the Controller (it reads through
`self.cluster` with `self.config`); nothing here writes.

A job with a `kueue.x-k8s.io/queue-name` label waits for admission: Kueue's webhook creates it suspended,
and its Workload (labelled with the job's uid) says why it is not admitted yet (QuotaReserved False: "couldn't
assign flavors ... insufficient quota for nvidia.com/gpu"). That is Pending, never a failure: the controller
keeps waiting. A job Kueue preempts or evicts is suspended again (its pods get SIGTERM and save a checkpoint)
and is Pending the same way until re-admitted, when its new pods resume from the checkpoint.

When Kueue does not manage the job's kind (its `kubeflow.org/pytorchjob` integration is off by default in
recent Kueue releases) no Workload ever appears and the job runs outside the quota; after
`kueue_workload_timeout_seconds` the status and a Warning event say so, with the fix.
"""

from __future__ import annotations

from datetime import datetime

from kubernetes.client.rest import ApiException

from trainer.executors.kubernetes.cluster import Cluster, api_error_summary
from trainer.executors.kubernetes.jobkinds import KUEUE_QUEUE_LABEL, PYTORCHJOB
from trainer.executors.kubernetes.spec import FAILED, SUCCEEDED, ControllerConfig
from trainer.executors.kubernetes.world import JobState, PendingItem, _ts

JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # on every Workload Kueue makes for a job


def _condition(workload: dict, kind: str) -> dict | None:
    return next(
        (c for c in (workload.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None
    )


def workload_admitted(workload: dict) -> bool:
    return str((_condition(workload, "Admitted") or {}).get("status")) == "True"


def workload_wait_reason(workload: dict) -> str:
    """Why a Workload is not admitted, in Kueue's words (the quota or the queue it lacks), else ""."""
    quota = _condition(workload, "QuotaReserved") or {}
    if str(quota.get("status")) == "False" and quota.get("message"):
        return str(quota["message"])
    for kind in ("Evicted", "Preempted"):
        c = _condition(workload, kind) or {}
        if str(c.get("status")) == "True":
            return f"{kind.lower()}: {c.get('message') or c.get('reason') or ''}".strip()
    return ""


class KueueAdmission:
    cluster: Cluster
    config: ControllerConfig

    def _kueue_state(self, obj: dict, job: JobState, now: datetime) -> tuple[str | None, list[PendingItem]]:
        """(why the job waits for admission, or None; warnings) for the current stage's job object."""
        queue = ((obj.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)
        if not queue or job.phase in (SUCCEEDED, FAILED) or job.deleting or not job.uid:
            return None, []
        kind = self.cluster.job_kind
        try:
            workloads = self.cluster.list_workloads(f"{JOB_UID_LABEL}={job.uid}")
        except ApiException as e:
            if e.status != 404:
                raise
            workloads, missing_api = [], api_error_summary(e)
        else:
            missing_api = ""
        if not workloads:
            since = job.created or now
            why = (
                f"Kueue's Workload API is not served ({missing_api}): is Kueue installed?"
                if missing_api
                else (
                    f"Kueue has made no Workload for {kind.kind} {job.name} although it has {KUEUE_QUEUE_LABEL}="
                    f"{queue}, so it runs outside the queue's quota: Kueue does not manage {kind.kind}s"
                )
            )
            fix = (
                f"enable the {kind.kueue_integration} integration in Kueue's configuration "
                f"(integrations.frameworks)"
                + (
                    ", or set the chart value jobApi: trainjob (Kubeflow Trainer v2)"
                    if kind is PYTORCHJOB
                    else ""
                )
            )
            return None, [
                PendingItem(
                    f"job/{job.name}/no-kueue-workload",
                    since,
                    f"{why}; {fix}",
                    timeout=self.config.kueue_workload_timeout_seconds,
                )
            ]
        workload = max(
            workloads, key=lambda w: _ts((w.get("metadata") or {}).get("creationTimestamp")) or now
        )
        if workload_admitted(workload):
            return None, []
        cluster_queue = ((workload.get("status") or {}).get("admission") or {}).get("clusterQueue")
        if not cluster_queue:
            local = self.cluster.get_localqueue(queue)
            cluster_queue = ((local or {}).get("spec") or {}).get("clusterQueue")
        where = f"LocalQueue {queue}" + (f" (ClusterQueue {cluster_queue})" if cluster_queue else "")
        reason = workload_wait_reason(workload)
        return f"waiting for Kueue admission in {where}" + (f": {reason}" if reason else ""), []
