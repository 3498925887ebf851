"""What the pods and events of the current attempt say, for the status: pending and lingering pods, refused
pod creates, missing claims, the master pod's log tail. A mixin of the Controller (it reads through
`self.cluster` with `self.config` and `self.clock`); nothing here writes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from kubernetes.client.rest import ApiException

from trainer.executors.kubernetes.cluster import Cluster, api_error_summary, role_lacks_rule
from trainer.executors.kubernetes.jobkinds import PYTORCHJOB
from trainer.executors.kubernetes.spec import (
    LOG_READ_MAX_BYTES,
    LOG_TAIL_MAX_BYTES,
    LOG_TAIL_MAX_CHARS,
    SUBMITTED,
    ControllerConfig,
    Pipeline,
    StageSpec,
)
from trainer.executors.kubernetes.world import (
    JobState,
    PendingItem,
    _fmt,
    _ts,
    describe_pending_pod,
    pod_is_live,
    tail_text,
)


class PodReports:
    cluster: Cluster
    config: ControllerConfig
    clock: Callable[[], datetime]

    def _lingering_pods(
        self, pipeline: Pipeline, spec: StageSpec, attempt: int, job: JobState | None
    ) -> list[PendingItem]:
        """Pods of an attempt that is over but may still run a trainer in the stage's folder."""
        name = job.name if job is not None else f"{pipeline.release}-{spec.name}-{attempt}"
        items = []
        for pod in self.cluster.list_pods(self.cluster.job_kind.pod_selector(name)):
            if not pod_is_live(pod):
                continue  # a failed pod stays for its log; nothing runs in it
            meta, phase = pod.get("metadata") or {}, (pod.get("status") or {}).get("phase")
            deleting = _ts(meta.get("deletionTimestamp"))
            since = (
                deleting or (job.end_time if job is not None else None) or _ts(meta.get("creationTimestamp"))
            )
            items.append(
                PendingItem(
                    f"pod/{meta.get('name')}/{str(meta.get('uid', ''))[:8]}/stopping",
                    since or self.clock(),
                    f"pod {meta.get('name')} is still {phase}" + (" (being deleted)" if deleting else ""),
                )
            )
        return items

    def _pending_items(self, job: JobState, now: datetime) -> list[PendingItem]:
        timeout = timedelta(seconds=self.config.pending_timeout_seconds)
        items: list[PendingItem] = []
        pods = self.cluster.list_pods(self.cluster.job_kind.pod_selector(job.name))
        if job.phase != "Suspended" and len(pods) < job.replicas:
            item = self._missing_pods_item(job, len(pods), now)
            if item is not None:
                items.append(item)
        if job.phase == "Suspended" and job.phase_since is not None:
            items.append(
                PendingItem(
                    f"job/{job.name}/suspended/{_fmt(job.phase_since)}",
                    job.phase_since,
                    f"job {job.name} is suspended (waiting in a queue such as Kueue?)"
                    + (f": {job.message}" if job.message else ""),
                )
            )
        for pod in pods:
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

    def _missing_pods_item(self, job: JobState, have: int, now: datetime) -> PendingItem | None:
        """A job with fewer pods than replicas. Before any pod ran (no status yet, or Created) it is
        missing them since its creation; the reason is in the training operator's FailedCreatePod events
        (quota, PodSecurity, a webhook, a missing ServiceAccount), the only place it says why: a refused
        pod create ends its reconcile before it writes any status. A running job misses a pod only
        briefly, between deleting and recreating it, unless those events say its creates are refused."""
        timeout = timedelta(seconds=self.config.pending_timeout_seconds)
        what = f"job {job.name} has {have} of {job.replicas} pods"
        if job.phase in (SUBMITTED, "Created"):
            if job.created is None:
                return None
            key = f"job/{job.name}"
            if now - job.created < timeout:  # the events are only worth the API call once overdue
                return PendingItem(key, job.created, what)
            refused = self._refused_pod_creates(job)
            if refused:
                return PendingItem(key, job.created, f"{what}: {refused}")
            if job.phase == SUBMITTED:
                return PendingItem(
                    key,
                    job.created,
                    f"job {job.name} has no status yet: is {self.cluster.job_kind.operator} running and "
                    f"watching this namespace?" + self._events_report(job),
                )
            return PendingItem(key, job.created, f"{what}: its operator has not created them")
        refused_events = self._refused_pod_create_events(job)
        if not refused_events:
            return None
        last = refused_events[-1]
        since = max(
            t for t in (job.phase_since, _ts(last.get("firstTimestamp")), job.created) if t is not None
        )
        return PendingItem(
            f"job/{job.name}/pods", since, f"{what}: {last.get('reason')}: {last.get('message')}"
        )

    def _refused_pod_create_events(self, job: JobState) -> list[dict]:
        if not job.uid:
            return []
        events = [e for e in self.cluster.list_events(job.uid) if e.get("reason") == "FailedCreatePod"]
        return sorted(events, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))

    def _refused_pod_creates(self, job: JobState) -> str:
        events = self._refused_pod_create_events(job)
        return f"{events[-1].get('reason')}: {events[-1].get('message')}" if events else ""

    def _events_report(self, job: JobState) -> str:
        warnings = (
            [e for e in self.cluster.list_events(job.uid) if e.get("type") == "Warning"] if job.uid else []
        )
        if not warnings:
            return ""
        last = max(warnings, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
        return f"; its latest Warning event: {last.get('reason')}: {last.get('message')}"

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
        """The last lines of the first node's pod's log (or why there are none)."""
        kind = self.cluster.job_kind
        if kind is PYTORCHJOB:
            name = f"{job}-master-0"
            pod = self.cluster.get_pod(name)
            gone = (
                f"(no log: pod {name} not found. With runPolicy.cleanPodPolicy: Running the training "
                f"operator deletes the pods still running when a job fails; a crash-looping pod of "
                f"restartPolicy OnFailure counts as running. With restartPolicy Never, the chart's default, "
                f"the failed pod and its log are kept)"
            )
        else:  # Job pods have generated names: the newest pod of the first node
            pods = self.cluster.list_pods(kind.first_pod_selector(job))
            pods.sort(key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""))
            pod = pods[-1] if pods else None
            name = str(((pod or {}).get("metadata") or {}).get("name") or "")
            gone = f"(no log: no pod of {kind.first_pod_selector(job)} found)"
        if pod is None:
            return gone
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        container = (
            kind.container if kind.container in containers else (containers[0] if containers else None)
        )
        try:
            text = self.cluster.read_pod_log(name, container, self.config.log_tail_lines, LOG_READ_MAX_BYTES)
        except ApiException as e:
            if role_lacks_rule(e):
                raise  # the kubelet may fail to serve a log; the Role must not lack the rule
            return f"(no log from pod {name}: {api_error_summary(e)})"
        return tail_text(text, LOG_TAIL_MAX_CHARS, LOG_TAIL_MAX_BYTES)
