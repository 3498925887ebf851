"""The controller's failure handling on the real control plane (tests/controlplane: kube-apiserver v1.36.3
with RBAC and default admission, kube-controller-manager, kwok nodes, training-operator v1.9.4 with its
validating webhook).

The stages ConfigMap and the checkpoint claim come from `helm template` of the chart; the controller runs
in this process (as cluster admin, except in the RBAC scenario). The test plays the kubelet: the real
operator makes the pods, kwok marks them Running, and the test writes a stage's outputs into the hostPath
volume folder and sets a pod's phase and container exit code through the pods/status subresource, which
moves the PyTorchJob along exactly as a real trainer's exit would.

Pods run no containers: a test gives a pod its log through kwok's kubelet API (`set_pod_log`); the
log-tail logic is also tested in tests/test_controller_unit.py against the kubelet's semantics.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.controlplane.cluster import ApiError, ControlPlane
from tests.support.helmtool import find_doc, render_chart
from trainer.contract.output import write_manifest
from trainer.executors.kubernetes.cli import format_status
from trainer.executors.kubernetes.cluster import Cluster
from trainer.executors.kubernetes.controller import Controller, RunResult
from trainer.executors.kubernetes.spec import (
    EXIT_CONFIG,
    EXIT_FORBIDDEN,
    EXIT_SIGTERM,
    EXIT_SUCCEEDED,
    ControllerConfig,
)
from trainer.executors.kubernetes.status import RunStatus

RELEASE = "r1"
MOUNT = "/checkpoints"
JOBS = "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"
HOLD = "r1-grpo.test/hold"  # a finalizer of our own: keeps an object in Terminating until the test lets go
NODE = "ctl-gpu-0"

# Small pods: the session's fake nodes are shared, and kwok pods run until something ends them.
SMALL = {"resources": {"gpu": 0, "cpu": "100m", "memory": "128Mi"}}


def chart_values(**stages: dict) -> dict:
    values: dict[str, Any] = {
        "storage": {"storageClass": "-"},
        "stages": {s: copy.deepcopy(SMALL) for s in ("sft", "grpo", "eval")},
    }
    for stage, extra in stages.items():
        values["stages"][stage].update(extra)
    return values


@pytest.fixture(scope="module")
def node(control_plane: ControlPlane) -> str:
    try:
        control_plane.request("GET", f"/api/v1/nodes/{NODE}")
    except ApiError as e:
        if e.status != 404:
            raise
        control_plane.create_gpu_node(NODE)
    return NODE


TRAINER_LOG = "step 1/10\nTraceback (most recent call last):\nRuntimeError: the trainer failed on purpose"


class Scenario:
    """One release in one namespace: its chart objects, its checkpoint volume, a controller, the kubelet."""

    def __init__(self, cp: ControlPlane, namespace: str, root: Path, values: dict | None = None):
        self.cp, self.ns = cp, namespace
        self.volume = root / "volume"
        self.volume.mkdir(parents=True)
        self.docs = render_chart(values or chart_values(), release=RELEASE, namespace=namespace)
        self.stages_cm = find_doc(self.docs, "ConfigMap", f"{RELEASE}-stages")
        self.threads: list[tuple[Controller, threading.Thread, list[RunResult]]] = []

    # -- set-up
    def install(self, stages_cm: dict | None = None) -> dict:
        """The stages ConfigMap and the checkpoint claim bound to a hostPath volume at self.volume."""
        pvc = find_doc(self.docs, "PersistentVolumeClaim", f"{RELEASE}-checkpoints")
        self.cp.create_hostpath_pv(f"pv-{self.ns}", self.volume, claim=(self.ns, pvc["metadata"]["name"]))
        self.post(f"/api/v1/namespaces/{self.ns}/persistentvolumeclaims", pvc)
        trainer = find_doc(self.docs, "ServiceAccount", f"{RELEASE}-trainer")  # the training pods' account
        self.post(f"/api/v1/namespaces/{self.ns}/serviceaccounts", trainer)
        return self.post(f"/api/v1/namespaces/{self.ns}/configmaps", stages_cm or self.stages_cm)

    def post(self, path: str, body: dict) -> dict:
        return self.cp.request("POST", path, body)

    def patch(self, path: str, body: dict) -> dict:
        return self.cp.request("PATCH", path, body)

    def get(self, path: str) -> dict | None:
        try:
            return self.cp.request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    # -- the controller
    def config(self, **overrides: Any) -> ControllerConfig:
        base: dict[str, Any] = dict(
            release=RELEASE,
            namespace=self.ns,
            stages_configmap=f"{RELEASE}-stages",
            status_configmap=f"{RELEASE}-status",
            retries=2,
            pending_timeout_seconds=1800.0,
            mount_path=str(self.volume),
            resync_seconds=1.0,
            error_backoff_seconds=0.2,
            max_error_backoff_seconds=1.0,
        )
        base.update(overrides)
        return ControllerConfig(**base)

    def controller(self, api: client.ApiClient | None = None, **overrides: Any) -> Controller:
        return Controller(Cluster(api or self.cp.api_client(), self.ns), self.config(**overrides))

    def run(self, controller: Controller, timeout: float = 60.0) -> RunResult:
        timer = threading.Timer(timeout, controller.stop)
        timer.start()
        try:
            return controller.run()
        finally:
            timer.cancel()

    def start(self, **overrides: Any) -> tuple[Controller, list[RunResult]]:
        controller = self.controller(**overrides)
        out: list[RunResult] = []
        thread = threading.Thread(target=lambda: out.append(controller.run()), daemon=True)
        thread.start()
        self.threads.append((controller, thread, out))
        return controller, out

    def finish(self, timeout: float = 60.0) -> RunResult:
        controller, thread, out = self.threads[-1]
        thread.join(timeout)
        assert out, f"the controller did not finish within {timeout} s"
        return out[0]

    def close(self) -> None:
        for controller, thread, _ in self.threads:
            controller.stop()
            thread.join(10)

    # -- what there is
    def job(self, name: str) -> dict | None:
        return self.get(f"{JOBS.format(ns=self.ns)}/{name}")

    def jobs(self) -> list[str]:
        return sorted(j["metadata"]["name"] for j in self.cp.request("GET", JOBS.format(ns=self.ns))["items"])

    def pod(self, name: str) -> dict | None:
        return self.get(f"/api/v1/namespaces/{self.ns}/pods/{name}")

    def status(self) -> RunStatus | None:
        cm = self.get(f"/api/v1/namespaces/{self.ns}/configmaps/{RELEASE}-status")
        return RunStatus.from_json(json.loads(cm["data"]["status.json"])) if cm else None

    def stage(self, name: str) -> Any:
        status = self.status()
        return status.stage_record(name) if status else None

    def events(self, reason: str) -> list[dict]:
        items = self.cp.request("GET", f"/api/v1/namespaces/{self.ns}/events")["items"]
        return [e for e in items if e.get("reason") == reason]

    def wait(self, what: str, ready: Callable[[], Any], timeout: float = 180.0) -> Any:
        deadline = time.monotonic() + timeout
        pause = 0.02  # fast first polls, backing off to 0.2 s
        while time.monotonic() < deadline:
            for _, thread, out in self.threads:
                if not thread.is_alive() and out and out[0].exit_code != EXIT_SIGTERM:
                    raise AssertionError(f"the controller ended while waiting for {what}: {out[0]}")
            value = ready()
            if value:
                return value
            time.sleep(pause)
            pause = min(pause * 1.5, 0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    # -- the kubelet and the trainer
    def running(self, pod: str) -> dict:
        return self.wait(
            f"pod {pod} Running", lambda: (p := self.pod(pod)) and p["status"].get("phase") == "Running" and p
        )

    def exit(self, pod: str, code: int) -> None:
        """The trainer in `pod` exits with `code` (restartPolicy Never: the pod ends with it)."""
        current = self.running(pod)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        statuses = [
            {
                "name": c["name"],
                "image": c["image"],
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "started": False,
                "state": {
                    "terminated": {
                        "exitCode": code,
                        "reason": "Completed" if code == 0 else "Error",
                        "startedAt": current["status"].get("startTime") or now,
                        "finishedAt": now,
                    }
                },
            }
            for c in current["spec"]["containers"]
        ]
        phase = "Succeeded" if code == 0 else "Failed"
        self.patch(
            f"/api/v1/namespaces/{self.ns}/pods/{pod}/status",
            {"status": {"phase": phase, "containerStatuses": statuses}},
        )

    def write_outputs(self, stage: str) -> None:
        """What a successful stage leaves in its folder (checkpoints, weights, r1_stage.json last)."""
        folder = self.volume / RELEASE / stage
        (folder / "checkpoint-10" / "model").mkdir(parents=True, exist_ok=True)
        (folder / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"step": 10}))
        if stage in ("sft", "grpo"):
            (folder / "model.safetensors").write_bytes(os.urandom(256))
            (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        else:
            (folder / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))
        write_manifest(folder, stage, steps=10, inputs={}, metrics={"accuracy": 0.5})


@pytest.fixture
def scenario(control_plane: ControlPlane, k8s_namespace: str, node: str, tmp_path: Path):
    made: list[Scenario] = []

    def make(values: dict | None = None) -> Scenario:
        s = Scenario(control_plane, k8s_namespace, tmp_path / f"s{len(made)}", values)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def job_condition(job: dict | None, kind: str) -> bool:
    return bool(job) and any(
        c["type"] == kind and c["status"] == "True" for c in (job.get("status") or {}).get("conditions") or []
    )


# ============================================================================================ item 1


def test_next_attempt_starts_only_after_the_failed_attempts_pods_have_stopped(scenario) -> None:
    """Master + Worker, restartPolicy Never, cleanPodPolicy Running: when the trainer fails, the operator
    keeps the failed Master pod (its log) and deletes the Worker; attempt 2 is created only once that
    Worker is gone, so two trainers never write into one folder."""
    s = scenario(chart_values(sft={"nodes": 2}, grpo={"enabled": False}, eval={"enabled": False}))
    s.install()
    job1 = yaml.safe_load(s.stages_cm["data"]["sft.yaml"])
    assert job1["spec"]["runPolicy"] == {"cleanPodPolicy": "Running"}  # no backoffLimit with Never
    assert {r["restartPolicy"] for r in job1["spec"]["pytorchReplicaSpecs"].values()} == {"Never"}
    s.start(retries=1, pending_timeout_seconds=2.0)

    s.running("r1-sft-1-worker-0")
    s.patch(f"/api/v1/namespaces/{s.ns}/pods/r1-sft-1-worker-0", {"metadata": {"finalizers": [HOLD]}})
    s.running("r1-sft-1-master-0")
    s.cp.set_pod_log(s.ns, "r1-sft-1-master-0", TRAINER_LOG, container="pytorch")
    s.exit("r1-sft-1-master-0", 1)

    s.wait("job r1-sft-1 Failed", lambda: job_condition(s.job("r1-sft-1"), "Failed"))
    s.wait(
        "the operator to delete the running Worker",
        lambda: (s.pod("r1-sft-1-worker-0") or {}).get("metadata", {}).get("deletionTimestamp"),
    )
    master = s.pod("r1-sft-1-master-0")
    assert master["status"]["phase"] == "Failed" and "deletionTimestamp" not in master["metadata"]
    report = s.wait(
        "the lingering Worker reported",
        lambda: [e for e in s.events("PendingTooLong") if "r1-sft-1-worker-0" in e["message"]],
    )
    assert "pod r1-sft-1-worker-0 is still Running (being deleted)" in report[0]["message"]
    assert s.jobs() == ["r1-sft-1"]  # attempt 2 waits
    sft = s.stage("sft")
    assert sft.phase == "Failed" and sft.attempt == 1
    assert (
        "attempt 2 starts once the pods of attempt 1 have stopped (one trainer per output folder)"
        in sft.message
    )

    s.patch(f"/api/v1/namespaces/{s.ns}/pods/r1-sft-1-worker-0", {"metadata": {"finalizers": None}})
    s.wait("the Worker gone", lambda: s.pod("r1-sft-1-worker-0") is None)
    s.wait("attempt 2", lambda: s.job("r1-sft-2"))
    first = s.stage("sft").attempt_record(1)
    assert (
        first.phase == "Failed"
        and first.message == "PyTorchJob r1-sft-1 is failed because 1 Master replica(s) failed."
    )
    # the failed attempt's log tail ends with the trainer's error (served by kwok's kubelet API)
    assert first.log_tail.rstrip().endswith(TRAINER_LOG.splitlines()[-1])
    print("\n" + format_status(s.status()))

    s.write_outputs("sft")
    s.running("r1-sft-2-worker-0")
    s.exit("r1-sft-2-master-0", 0)
    result = s.finish()
    assert result.exit_code == EXIT_SUCCEEDED, result
    sft = s.stage("sft")
    assert (sft.phase, sft.attempt) == ("Succeeded", 2)
    assert [a.phase for a in sft.attempts] == ["Failed", "Succeeded"]


def test_an_onfailure_trainer_crash_looping_at_its_backoff_limit_is_stopped_before_the_retry(
    scenario,
) -> None:
    """restartPolicy OnFailure (a non-default choice): at backoffLimit the operator fails the job, and with
    cleanPodPolicy Running it deletes the crash-looping pod, which is still Running. With cleanPodPolicy
    None (the chart before) that pod stayed and kept restarting the old trainer into the stage's folder."""
    values = chart_values(sft={"restartPolicy": "OnFailure", "backoffLimit": 1})
    values["stages"]["grpo"]["enabled"] = values["stages"]["eval"]["enabled"] = False
    s = scenario(values)
    s.install()
    job1 = yaml.safe_load(s.stages_cm["data"]["sft.yaml"])
    assert job1["spec"]["runPolicy"] == {"backoffLimit": 1, "cleanPodPolicy": "Running"}
    s.start(retries=1)
    s.running("r1-sft-1-master-0")
    s.cp.set_pod_log(s.ns, "r1-sft-1-master-0", TRAINER_LOG, container="pytorch")
    pod = s.running("r1-sft-1-master-0")
    s.patch(f"/api/v1/namespaces/{s.ns}/pods/r1-sft-1-master-0", {"metadata": {"finalizers": [HOLD]}})
    # the kubelet restarted the trainer once: the pod stays Running with restartCount 1
    (status,) = pod["status"]["containerStatuses"]
    status["restartCount"] = 1
    s.patch(
        f"/api/v1/namespaces/{s.ns}/pods/r1-sft-1-master-0/status",
        {"status": {"containerStatuses": [status]}},
    )

    job = s.wait("job r1-sft-1 Failed", lambda: (j := s.job("r1-sft-1")) and job_condition(j, "Failed") and j)
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert failed["message"] == "Job r1-sft-1 has failed because it has reached the specified backoff limit"
    s.wait(
        "the crash-looping pod deleted",
        lambda: (s.pod("r1-sft-1-master-0") or {}).get("metadata", {}).get("deletionTimestamp"),
    )
    s.wait(
        "the wait reported", lambda: "attempt 2 starts once the pods of attempt 1" in s.stage("sft").message
    )
    assert s.jobs() == ["r1-sft-1"]
    s.patch(f"/api/v1/namespaces/{s.ns}/pods/r1-sft-1-master-0", {"metadata": {"finalizers": None}})
    s.wait("attempt 2", lambda: s.job("r1-sft-2"))
    # read while our finalizer still held the pod
    assert s.stage("sft").attempt_record(1).log_tail.rstrip().endswith(TRAINER_LOG.splitlines()[-1])


# ============================================================================================ item 2


def _edit_job(cm: dict, key: str, edit: Callable[[dict], None]) -> dict:
    cm = copy.deepcopy(cm)
    job = yaml.safe_load(cm["data"][key])
    edit(job)
    cm["data"][key] = yaml.safe_dump(job)
    return cm


BAD_JOBS = {
    # a misspelt field: pruned with only a warning header unless validation is strict
    "unknown-field": (
        "eval.yaml",
        lambda j: j["spec"]["runPolicy"].update(backofLimit=3),
        [
            "stage eval: PyTorchJob r1-eval-1",
            "400 BadRequest",
            'strict decoding error: unknown field "spec.runPolicy.backofLimit"',
        ],
    ),
    # a type the CRD schema refuses (422)
    "schema": (
        "grpo.yaml",
        lambda j: j["spec"].update(nprocPerNode=8),
        [
            "stage grpo: PyTorchJob r1-grpo-1",
            "422 Invalid",
            "spec.nprocPerNode in body must be of type string",
        ],
    ),
    # what only the training operator's webhook checks (its denial is a 403)
    "webhook": (
        "grpo.yaml",
        lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2),
        [
            "stage grpo: PyTorchJob r1-grpo-1 (ConfigMap r1-stages key grpo.yaml) is rejected by an admission webhook",
            'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request',
            "spec.pytorchReplicaSpecs[Master].replicas: Forbidden: must be 1",
        ],
    ),
}


@pytest.mark.parametrize("bad", list(BAD_JOBS))
def test_a_bad_stage_job_fails_the_run_before_sft_starts(scenario, bad: str) -> None:
    key, edit, expected = BAD_JOBS[bad]
    s = scenario()
    s.install(_edit_job(s.stages_cm, key, edit))
    result = s.run(s.controller())
    assert result.exit_code == EXIT_CONFIG, result
    for text in expected:
        assert text in result.message, result.message
    assert s.jobs() == []  # sft never started
    status = s.status()
    assert status.phase == "Failed" and status.message == result.message
    stage = key.removesuffix(".yaml")
    assert [(r.name, r.phase) for r in status.stages] == [
        (n, "Failed" if n == stage else "Pending") for n in ("sft", "grpo", "eval")
    ]
    if bad == "webhook":
        print("\n" + format_status(status))


# ============================================================================================ item 3


def _quota(s: Scenario, name: str, hard: dict[str, str]) -> None:
    path = f"/api/v1/namespaces/{s.ns}/resourcequotas"
    s.post(
        path,
        {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": name}, "spec": {"hard": hard}},
    )
    # admission refuses everything the quota covers until the quota controller has counted
    s.wait(f"quota {name} counted", lambda: (s.get(f"{path}/{name}") or {}).get("status", {}).get("hard"))


def test_a_full_quota_on_pytorchjobs_is_waited_out_and_shown_as_pending(scenario) -> None:
    s = scenario(chart_values(grpo={"enabled": False}, eval={"enabled": False}))
    s.install()
    _quota(s, "jobs", {"count/pytorchjobs.kubeflow.org": "0"})
    s.start()
    sft = s.wait(
        "sft Pending on the quota",
        lambda: (st := s.stage("sft")) and st.phase == "Pending" and "exceeded quota" in st.message and st,
    )
    assert sft.message.startswith(
        "job r1-sft-1 (attempt 1) not created yet: 403 Forbidden: pytorchjobs.kubeflow.org"
    )
    assert "limited: count/pytorchjobs.kubeflow.org=0" in sft.message
    (event,) = s.events("JobCreateBlocked")
    assert event["type"] == "Warning" and "exceeded quota" in event["message"]
    status = s.status()
    assert status.phase == "Pending" and status.message.startswith("sft: Pending - job r1-sft-1")
    print("\n" + format_status(status))
    assert s.threads[-1][1].is_alive() and s.jobs() == []

    s.patch(
        f"/api/v1/namespaces/{s.ns}/resourcequotas/jobs",
        {"spec": {"hard": {"count/pytorchjobs.kubeflow.org": "1"}}},
    )
    s.wait("r1-sft-1 created once the quota allows it", lambda: s.job("r1-sft-1"))
    s.wait("sft Submitted", lambda: s.stage("sft").phase in ("Submitted", "Created", "Running"))


def _token(s: Scenario, account: str) -> str:
    review = s.post(
        f"/api/v1/namespaces/{s.ns}/serviceaccounts/{account}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        },
    )
    return review["status"]["token"]


def test_a_role_without_a_verb_exits_3_naming_verb_and_resource(scenario) -> None:
    s = scenario()
    s.install()
    account = find_doc(s.docs, "ServiceAccount", f"{RELEASE}-controller")
    role = copy.deepcopy(find_doc(s.docs, "Role", f"{RELEASE}-controller"))
    for rule in role["rules"]:
        if rule["resources"] == ["pytorchjobs"]:
            rule["verbs"].remove("create")
    binding = find_doc(s.docs, "RoleBinding", f"{RELEASE}-controller")
    for doc, plural in ((account, "serviceaccounts"), (role, "roles"), (binding, "rolebindings")):
        group = "/api/v1" if plural == "serviceaccounts" else "/apis/rbac.authorization.k8s.io/v1"
        s.post(f"{group}/namespaces/{s.ns}/{plural}", doc)
    cfg = client.Configuration(host=s.cp.server)
    cfg.ssl_ca_cert = str(s.cp.pki_dir / "ca.crt")
    cfg.api_key = {"authorization": f"Bearer {_token(s, account['metadata']['name'])}"}
    result = s.run(s.controller(client.ApiClient(cfg)))
    assert result.exit_code == EXIT_FORBIDDEN, result
    assert (
        f'User "system:serviceaccount:{s.ns}:{RELEASE}-controller" cannot create resource "pytorchjobs" in API '
        f'group "kubeflow.org" in the namespace "{s.ns}"'
    ) in result.message
    assert s.jobs() == []


def test_a_terminating_namespace_stops_the_controller(scenario) -> None:
    s = scenario()
    held = copy.deepcopy(s.stages_cm)
    held["metadata"]["finalizers"] = [
        HOLD
    ]  # keeps the namespace in Terminating (and this ConfigMap readable)
    s.install(held)
    s.cp.request("DELETE", f"/api/v1/namespaces/{s.ns}")
    s.wait(
        "namespace Terminating",
        lambda: s.get(f"/api/v1/namespaces/{s.ns}")["status"]["phase"] == "Terminating",
    )
    try:
        result = s.run(s.controller())
        assert result.exit_code == EXIT_SIGTERM, result
        assert result.message.startswith(f"stopped: namespace {s.ns} is being deleted")
        assert "unable to create new content in namespace" in result.message
    finally:
        s.patch(f"/api/v1/namespaces/{s.ns}/configmaps/{RELEASE}-stages", {"metadata": {"finalizers": None}})


# ============================================================================================ item 5


def test_a_job_whose_pods_the_quota_refuses_is_reported(scenario) -> None:
    s = scenario(chart_values(grpo={"enabled": False}, eval={"enabled": False}))
    s.install()
    _quota(s, "pods", {"pods": "0"})
    s.start(pending_timeout_seconds=2.0)
    sft = s.wait(
        "the report", lambda: (st := s.stage("sft")) and "pending for more than" in st.message and st
    )
    assert sft.message.startswith(
        "pending for more than 2 s: job r1-sft-1 has 0 of 1 pods: FailedCreatePod: Error creating: pods "
        '"r1-sft-1-master-0" is forbidden: exceeded quota: pods'
    ), sft.message
    assert s.job("r1-sft-1") and not job_condition(s.job("r1-sft-1"), "Running")
    (event,) = s.events("PendingTooLong")
    assert event["type"] == "Warning" and "exceeded quota: pods" in event["message"]


def test_a_worker_pod_that_podsecurity_refuses_is_reported(scenario) -> None:
    """The operator gives Worker pods an init container without a securityContext, which PodSecurity
    `restricted` refuses: the Master runs, waiting for a rendezvous that never comes."""
    s = scenario(chart_values(sft={"nodes": 2}, grpo={"enabled": False}, eval={"enabled": False}))
    s.patch(
        f"/api/v1/namespaces/{s.ns}",
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
    )
    s.install()
    s.start(pending_timeout_seconds=2.0)
    s.running("r1-sft-1-master-0")  # the chart's own pod template is admitted
    sft = s.wait(
        "the report", lambda: (st := s.stage("sft")) and "pending for more than" in st.message and st
    )
    assert (
        'job r1-sft-1 has 1 of 2 pods: FailedCreatePod: Error creating: pods "r1-sft-1-worker-0" is forbidden: violates PodSecurity "restricted:latest"'
        in sft.message
    ), sft.message
    assert [e for e in s.events("PendingTooLong") if "violates PodSecurity" in e["message"]]


# ============================================================================================ item 4 (409)


def test_a_job_of_an_earlier_install_is_waited_out_not_adopted(scenario) -> None:
    s = scenario(chart_values(grpo={"enabled": False}, eval={"enabled": False}))
    old_cm = s.install()
    old_job = yaml.safe_load(s.stages_cm["data"]["sft.yaml"])
    old_job["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": f"{RELEASE}-stages",
            "uid": old_cm["metadata"]["uid"],
        }
    ]
    old_job["metadata"]["finalizers"] = [HOLD]
    s.post(JOBS.format(ns=s.ns), old_job)
    # `helm uninstall`: the ConfigMap goes, the garbage collector deletes its job (held by our finalizer)
    s.cp.request("DELETE", f"/api/v1/namespaces/{s.ns}/configmaps/{RELEASE}-stages")
    s.wait("the old job being deleted", lambda: s.job("r1-sft-1")["metadata"].get("deletionTimestamp"))
    new_cm = s.post(f"/api/v1/namespaces/{s.ns}/configmaps", s.stages_cm)  # `helm install` again
    assert new_cm["metadata"]["uid"] != old_cm["metadata"]["uid"]

    s.start()
    sft = s.wait(
        "the wait reported", lambda: (st := s.stage("sft")) and "earlier install" in st.message and st
    )
    assert sft.message == (
        f"job r1-sft-1 (attempt 1) not created yet: PyTorchJob r1-sft-1 of an earlier install of this release "
        f"(owner ConfigMap r1-stages uid {old_cm['metadata']['uid']}, this install's is "
        f"{new_cm['metadata']['uid']}) still exists; waiting for the garbage collector to delete it"
    )
    assert sft.attempt == 0 and sft.attempts == []  # not adopted

    s.patch(f"{JOBS.format(ns=s.ns)}/r1-sft-1", {"metadata": {"finalizers": None}})
    job = s.wait(
        "this install's r1-sft-1",
        lambda: (j := s.job("r1-sft-1")) and "deletionTimestamp" not in j["metadata"] and j,
    )
    assert [r["uid"] for r in job["metadata"]["ownerReferences"]] == [new_cm["metadata"]["uid"]]
    s.wait("sft attempt 1 recorded", lambda: s.stage("sft").attempt == 1)
