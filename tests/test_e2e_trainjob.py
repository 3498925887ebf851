"""The chart with `jobApi: trainjob`, and Kueue admission, on a real control plane with the real JobSet
controller, Kubeflow Trainer v2 controller manager and Kueue (tests/controlplane/jobcontrollers.py, built by
tests/controlplane-jobs/build.sh), as a user runs them: `helm install`, the controller as a host process with the chart's
ServiceAccount token, the Trainer making each TrainJob a JobSet, JobSet its batch Job, the Job controller
the pods, and tests/support/host_kubelet.py's HostKubelet running the pods' real container commands on this machine.

Kueue here manages batch Jobs and TrainJobs (batch/job, trainer.kubeflow.org/trainjob): its
kubeflow.org/pytorchjob integration is off, as in recent Kueue defaults.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
from pathlib import Path

import pytest
import yaml

from tests.controlplane.cluster import ApiError
from tests.support.e2e import JOBSET_NAME_LABEL, Release, merge, wait_until
from tests.support.helmtool import launches_torchrun
from tests.support.host_kubelet import HostKubelet, PodDriver
from tests.test_e2e_cluster import HOLD_FINALIZER, _trained_steps
from trainer.contract.output import complete_checkpoints, latest_checkpoint, verify_stage_output
from trainer.executors.kubernetes.admission import workload_admitted

GPU_NODE = "tj-gpu-0"  # the jobs_plane fixture's GPU node (tests/conftest.py)
TRAINJOB = {"jobApi": "trainjob"}
KUEUE = "kueue.x-k8s.io/v1beta2"


@pytest.fixture
def release(jobs_plane, request: pytest.FixtureRequest, tmp_path: Path):
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    namespace = f"tj-{digest}-{os.getpid() % 10000}"
    jobs_plane.create_namespace(namespace)
    rel = Release(jobs_plane, namespace, "r1", tmp_path)
    rel.values = merge(rel.values, TRAINJOB)
    rel.create_volume()
    yield rel
    rel.stop_controllers()
    print(rel.report())
    with contextlib.suppress(Exception):
        jobs_plane.request("DELETE", f"/api/v1/namespaces/{namespace}")
    rel.delete_volume()


def stage(rel: Release, name: str) -> dict:
    return next((s for s in (rel.status() or {}).get("stages") or [] if s["name"] == name), {})


def test_helm_install_with_trainjob_runs_sft_grpo_eval_through_trainjobs_and_jobsets(
    release: Release,
) -> None:
    release.install()
    controller = release.start_controller()
    with PodDriver(release, lambda pod: "run", selector=JOBSET_NAME_LABEL) as driver:
        code = controller.wait(1500)
    assert code == 0, controller.log()[-6000:]
    ran = [(name.rsplit("-", 1)[0], code) for name, code, _ in driver.runs]  # Job pods: a random suffix
    assert ran == [("r1-sft-1-node-0-0", 0), ("r1-grpo-1-node-0-0", 0), ("r1-eval-1-node-0-0", 0)], [
        log[-3000:] for _, _, log in driver.runs
    ]
    trainjobs = release.trainjobs()
    assert sorted(trainjobs) == ["r1-eval-1", "r1-grpo-1", "r1-sft-1"]
    assert not release.jobs(), "no PyTorchJob may be made with jobApi trainjob"
    for name, job in trainjobs.items():
        assert any(c["type"] == "Complete" and c["status"] == "True" for c in job["status"]["conditions"]), (
            job
        )
        jobset = release.cp.request(
            "GET", f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{release.namespace}/jobsets/{name}"
        )
        assert jobset["metadata"]["ownerReferences"][0]["kind"] == "TrainJob"
    for name, module in (("sft", "trainer.sft"), ("grpo", "trainer.grpo"), ("eval", "trainer.evaluate")):
        trainer = trainjobs[f"r1-{name}-1"]["spec"]["trainer"]
        assert launches_torchrun(trainer) and module in trainer["args"]
        assert verify_stage_output(release.stage_dir(name), name).status == "completed"
    assert complete_checkpoints(release.stage_dir("sft"))
    status = release.status()
    assert status["phase"] == "Succeeded", status
    shown = release.status_command()
    assert shown.returncode == 0 and "Succeeded" in shown.stdout, shown.stdout + shown.stderr


def _queues(cp, namespace: str, gpus: int, *, preempt: bool = False) -> None:
    for path, body in (
        ("/apis/kueue.x-k8s.io/v1beta2/resourceflavors", {"metadata": {"name": "default-flavor"}}),
        (
            "/apis/kueue.x-k8s.io/v1beta2/clusterqueues",
            {
                "metadata": {"name": f"cq-{namespace}"},
                "spec": {
                    "namespaceSelector": {},
                    **({"preemption": {"withinClusterQueue": "LowerPriority"}} if preempt else {}),
                    "resourceGroups": [
                        {
                            "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                            "flavors": [
                                {
                                    "name": "default-flavor",
                                    "resources": [
                                        {"name": "cpu", "nominalQuota": "64"},
                                        {"name": "memory", "nominalQuota": "256Gi"},
                                        {"name": "nvidia.com/gpu", "nominalQuota": gpus},
                                    ],
                                }
                            ],
                        }
                    ],
                },
            },
        ),
        (
            f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{namespace}/localqueues",
            {"metadata": {"name": "q"}, "spec": {"clusterQueue": f"cq-{namespace}"}},
        ),
    ):
        kind = path.rsplit("/", 1)[1]
        body = {
            "apiVersion": KUEUE,
            "kind": {
                "resourceflavors": "ResourceFlavor",
                "clusterqueues": "ClusterQueue",
                "localqueues": "LocalQueue",
            }[kind],
            **body,
        }
        try:
            cp.request("POST", path, body)
        except ApiError as e:
            if e.status != 409:
                raise


def test_kueue_holds_a_stage_over_quota_as_pending_and_admits_it_when_the_quota_is_raised(
    release: Release,
) -> None:
    """ClusterQueue with nvidia.com/gpu quota 4, a stage asking 8: suspended, Pending with Kueue's reason in
    `r1-grpo status`; raising the quota to 8 admits it and the run finishes."""
    cp = release.cp
    _queues(cp, release.namespace, 4)
    gpus8 = {"resources": {"gpu": 8, "cpu": "1", "memory": "2Gi"}}
    values = merge(
        release.values,
        {
            "kueue": {"enabled": True, "queueName": "q"},
            "stages": {"sft": gpus8, "grpo": {"enabled": False}, "eval": {"enabled": False}},
        },
    )
    release.install(values)
    controller = release.start_controller()
    with PodDriver(release, lambda pod: "output", selector=JOBSET_NAME_LABEL) as driver:
        wait_until(
            "the Pending reason",
            # Until Kueue has tried to admit the Workload the message has no reason yet: wait for both.
            lambda: (
                "waiting for Kueue admission in LocalQueue q"
                in (message := stage(release, "sft").get("message") or "")
                and "nvidia.com/gpu" in message
            ),
            180,
        )
        sft = stage(release, "sft")
        assert sft["phase"] == "Pending", sft
        assert (
            f"ClusterQueue cq-{release.namespace}" in sft["message"] and "nvidia.com/gpu" in sft["message"]
        ), sft
        assert release.trainjobs()["r1-sft-1"]["spec"].get("suspend") is True
        assert not driver.handled, "no pod may run before admission"
        shown = release.status_command()
        print("r1-grpo status while pending:\n" + shown.stdout)
        assert "waiting for Kueue admission" in shown.stdout, shown.stdout
        assert (release.status() or {})["phase"] != "Failed"
        cp.request(
            "PATCH",
            f"/apis/kueue.x-k8s.io/v1beta2/clusterqueues/cq-{release.namespace}",
            json.dumps(
                [
                    {
                        "op": "replace",
                        "path": "/spec/resourceGroups/0/flavors/0/resources/2/nominalQuota",
                        "value": 8,
                    }
                ]
            ).encode(),
            content_type="application/json-patch+json",
        )
        code = controller.wait(600)
    assert code == 0, controller.log()[-6000:]
    assert stage(release, "sft")["attempt"] == 1  # waiting was no failure and no retry


def test_pytorchjob_with_a_queue_label_that_kueue_ignores_is_reported_with_the_fix(release: Release) -> None:
    """Kueue's pytorchjob integration is off here: the PyTorchJob gets no Workload and runs outside the
    quota; after --kueue-workload-timeout-seconds the status and a Warning event say so and how to fix it."""
    cp = release.cp
    _queues(cp, release.namespace, 64)
    values = merge(
        release.values,
        {
            "jobApi": "pytorchjob",
            "kueue": {"enabled": True, "queueName": "q"},
            "stages": {"grpo": {"enabled": False}, "eval": {"enabled": False}},
        },
    )
    release.install(values)
    controller = release.start_controller("--kueue-workload-timeout-seconds", "3")
    wait_until(
        "the warning",
        lambda: "Kueue has made no Workload" in (stage(release, "sft").get("message") or ""),
        180,
    )
    message = stage(release, "sft")["message"]
    assert "enable the kubeflow.org/pytorchjob integration" in message and "jobApi: trainjob" in message, (
        message
    )
    shown = release.status_command()
    print("r1-grpo status with the warning:\n" + shown.stdout)
    assert "Kueue has made no Workload" in shown.stdout
    events = release.list("/api/v1", "events")
    assert any("no-kueue-workload" in e.get("message", "") and e["type"] == "Warning" for e in events), events
    controller.stop()


def test_with_kueues_pytorchjob_integration_on_the_pytorchjob_is_admitted_through_its_workload(
    jobapi_build: Path, controlplane_build: Path, tmp_path: Path
) -> None:
    """The other side of the warning: a Kueue that manages kubeflow.org/pytorchjob (its own control plane)
    makes a Workload for the stage's PyTorchJob, admits it against the quota, and the controller says
    nothing about a missing Workload."""
    from tests.controlplane.cluster import ControlPlane

    frameworks = ("batch/job", "trainer.kubeflow.org/trainjob", "kubeflow.org/pytorchjob")
    with ControlPlane(tmp_path / "plane", jobs=True, kueue_frameworks=frameworks) as cp:
        cp.create_gpu_node(GPU_NODE, gpus=64)
        cp.create_namespace("tj-pytorch")
        rel = Release(cp, "tj-pytorch", "r1", tmp_path / "release")
        rel.create_volume()
        _queues(cp, rel.namespace, 8)
        values = merge(
            rel.values,
            {
                "jobApi": "pytorchjob",
                "kueue": {"enabled": True, "queueName": "q"},
                "stages": {"grpo": {"enabled": False}, "eval": {"enabled": False}},
            },
        )
        rel.install(values)
        controller = rel.start_controller("--kueue-workload-timeout-seconds", "3")
        admitted: list[bool] = []

        def policy(pod: dict) -> str:
            # the pod exists, so Kueue admitted the job: its Workload says so while it runs
            job = rel.jobs()["r1-sft-1"]
            selector = f"kueue.x-k8s.io/job-uid={job['metadata']['uid']}"
            workloads = rel.list("/apis/kueue.x-k8s.io/v1beta2", "workloads", selector)
            admitted.extend(workload_admitted(w) for w in workloads)
            return "output"

        try:
            with PodDriver(rel, policy):
                code = controller.wait(600)
            assert code == 0, controller.log()[-6000:]
            assert admitted == [True], admitted
            assert "Kueue has made no Workload" not in controller.log()
        finally:
            rel.stop_controllers()
            print(rel.report())


def test_a_stage_preempted_by_kueue_saves_a_checkpoint_and_resumes_when_readmitted(release: Release) -> None:
    """A higher-priority TrainJob takes the ClusterQueue's one GPU from the running sft stage (one GPU, one
    rank): Kueue evicts its Workload and suspends the TrainJob, JobSet's Job deletes its pod, the stand-in
    kubelet sends the trainer SIGTERM (a finalizer keeps the pod Terminating until it has exited, as a
    kubelet does) and it saves a checkpoint; while the other job holds the quota the stage is Pending with
    Kueue's reason, never failed; once that job is done Kueue re-admits the TrainJob and its new pod resumes
    from the checkpoint and finishes, all in attempt 1 (a preemption is no failed attempt)."""
    cp, ns = release.cp, release.namespace
    _queues(cp, ns, 1, preempt=True)
    for name, value in (("low", 10), ("high", 1000)):
        body = {
            "apiVersion": KUEUE,
            "kind": "WorkloadPriorityClass",
            "metadata": {"name": name},
            "value": value,
        }
        try:
            cp.request("POST", "/apis/kueue.x-k8s.io/v1beta2/workloadpriorityclasses", body)
        except ApiError as e:
            if e.status != 409:  # cluster-scoped: made once per control plane
                raise
    # ~8 steps/s here: still training when the preemption lands seconds after checkpoint-25, and the
    # resumed pod finishes the rest in about a minute; save_steps: checkpoints as it goes, SIGTERM's last
    steps = 600
    values = merge(
        release.values,
        {
            "kueue": {"enabled": True, "queueName": "q", "priorityClass": "low"},
            "stages": {
                "sft": {"args": {"max_steps": steps, "save_steps": 25, "logging_steps": 1}},
                "grpo": {"enabled": False},
                "eval": {"enabled": False},
            },
        },
    )
    assert release.values["stages"]["sft"]["resources"]["gpu"] == 1
    sft_dir = release.stage_dir("sft")
    kubelet = HostKubelet(cp, ns, release.workdir)
    first: dict = {}
    intruder_may_finish = threading.Event()

    def policy(pod: dict) -> str | None:
        if pod["metadata"]["labels"][JOBSET_NAME_LABEL] == "intruder":
            # the higher-priority job holds the quota until the test has seen the stage Pending
            return "fail:0" if intruder_may_finish.is_set() else "hold"
        if not first:
            pod_path = f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}"
            cp.request("PATCH", pod_path, {"metadata": {"finalizers": [HOLD_FINALIZER]}})
            first.update(pod=pod, path=pod_path, log=release.workdir / "preempted-pod.log")
            first["proc"] = kubelet.start(kubelet.prepare(pod), first["log"])
            return None  # left running: stopped below when the API shows the pod's deletion
        if first["proc"].poll() is None:
            first["next_started_while_running"] = True
            return "hold"  # one trainer per folder
        return "run"

    def deleting() -> bool:
        try:
            pod = release.get(f"pods/{first['pod']['metadata']['name']}")
        except ApiError as e:
            return e.status == 404
        return bool(pod["metadata"].get("deletionTimestamp"))

    release.install(values)
    controller = release.start_controller()
    with PodDriver(release, policy, selector=JOBSET_NAME_LABEL) as driver:
        # preempted after a periodic checkpoint: the resume must take SIGTERM's newer one
        periodic = wait_until("sft's first checkpoint", lambda: first and latest_checkpoint(sft_dir), 300)
        intruder = yaml.safe_load(release.get("configmaps/r1-stages")["data"]["sft.yaml"])
        assert intruder["kind"] == "TrainJob"
        intruder["metadata"] = {
            "name": "intruder",
            "labels": {"kueue.x-k8s.io/queue-name": "q", "kueue.x-k8s.io/priority-class": "high"},
        }
        cp.request("POST", f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs", intruder)
        wait_until("the preemption", deleting, 180)
        assert first["proc"].poll() is None, "sft finished before the preemption: more --max_steps"
        first["proc"].send_signal(signal.SIGTERM)  # to the container's first process, as the kubelet does
        rc = first["proc"].wait(300)
        saved = latest_checkpoint(sft_dir)
        kubelet.finish(first["pod"], rc)  # the container's exit code, then the object may go
        cp.request("PATCH", first["path"], {"metadata": {"finalizers": None}})
        wait_until(
            "Pending with Kueue's reason",
            lambda: "waiting for Kueue admission" in (stage(release, "sft").get("message") or ""),
            180,
        )
        preempted = stage(release, "sft")
        shown = release.status_command()
        print("r1-grpo status while preempted:\n" + shown.stdout)
        assert release.trainjobs()["r1-sft-1"]["spec"].get("suspend") is True
        assert not driver.runs, "no new sft pod may run while the other job holds the quota"
        intruder_may_finish.set()
        code = controller.wait(900)
    log = first["log"].read_text(errors="replace")
    assert rc == 143 and "r1-grpo launch: SIGTERM: passed on to workers" in log, log[-6000:]
    assert saved is not None, log[-6000:]
    step = int(saved.name.split("-")[1])
    assert periodic.name == "checkpoint-25", periodic
    assert 25 <= step < steps and f"preempted at step {step}; checkpoint saved" in log, log[-6000:]
    assert preempted["phase"] == "Pending" and preempted["attempt"] == 1, preempted
    assert f"LocalQueue q (ClusterQueue cq-{ns})" in preempted["message"], preempted
    assert shown.returncode == 0 and "waiting for Kueue admission in LocalQueue q" in shown.stdout, (
        shown.stdout + shown.stderr
    )
    assert code == 0, controller.log()[-6000:]
    sft_runs = [(name, c, text) for name, c, text in driver.runs if name.startswith("r1-sft-1-")]
    assert [c for _, c, _ in sft_runs] == [0], [(n, c, t[-3000:]) for n, c, t in sft_runs]
    assert driver.resumed_from(sft_runs[0][0], sft_runs[0][2]) == (saved, step), sft_runs[0][2][-6000:]
    assert "next_started_while_running" not in first
    resumed_steps = _trained_steps(sft_dir)
    assert step + 1 in resumed_steps and resumed_steps[-1] == steps, resumed_steps[-5:]
    assert verify_stage_output(sft_dir, "sft").steps == steps
    sft = stage(release, "sft")
    assert [(a["attempt"], a["phase"]) for a in sft["attempts"]] == [(1, "Succeeded")], sft
    print(f"sft: preempted by Kueue at step {step}; resumed by {sft_runs[0][0]} in attempt {sft['attempt']}")
