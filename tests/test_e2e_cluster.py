"""The chart, the controller and the trainer together on a real control plane, as a user runs them.

`helm install` of charts/r1-grpo into a namespace that enforces PodSecurity `restricted`; the controller as a
host process with the flags of the controller Job Helm created and a token of the chart's ServiceAccount,
so the chart's Role decides every call; the training operator v1.9.4 creating the stage pods; kwok's fake
GPU nodes running them, and tests/support/host_kubelet.py's HostKubelet playing their kubelet: it runs a pod's real
container command on this machine (env, args and paths of the pod, the volume's mount path translated to
the hostPath PV's directory) and writes the exit code into the pod status. Scenarios that are about the
controller and the chart, not the trainer, write stage outputs directly instead of training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.controlplane.cluster import ApiError
from tests.support.e2e import PSA_ENFORCE, HelmFailed, Release, merge, wait_until
from tests.support.helmtool import launches_torchrun
from tests.support.host_kubelet import HostKubelet, PodDriver, pod_stage_attempt, write_checkpoint
from trainer.contract.output import (
    MANIFEST_NAME,
    complete_checkpoints,
    latest_checkpoint,
    read_owner,
    verify_stage_output,
)
from trainer.executors.kubernetes.spec import EXIT_FORBIDDEN

GPU_NODES = ("e2e-gpu-0", "e2e-gpu-1")
# An untainted node without GPUs for the pods that do not tolerate the GPU pools' taint, when a test places
# them there (controller.nodeSelector); kwok completes pods owned by a Job at once.
CPU_NODE, SYSTEM_POOL = "e2e-cpu-0", {"r1-grpo.test/role": "system"}


@pytest.fixture(scope="module")
def gpu_nodes(control_plane) -> tuple[str, ...]:
    """Two fake 64-GPU nodes (tainted like a GPU pool) and a CPU node, shared by this module's tests."""
    for name, kwargs in [
        *((n, {"gpus": 64}) for n in GPU_NODES),
        (CPU_NODE, {"gpus": 0, "taint": False, "labels": SYSTEM_POOL}),
    ]:
        try:
            control_plane.create_gpu_node(name, **kwargs)
        except ApiError as e:
            if e.status != 409:
                raise
    return GPU_NODES


def _namespace(control_plane, name: str, level: str) -> str:
    control_plane.create_namespace(name)
    control_plane.request(
        "PATCH", f"/api/v1/namespaces/{name}", {"metadata": {"labels": {PSA_ENFORCE: level}}}
    )
    return name


@pytest.fixture
def release(control_plane, gpu_nodes, request: pytest.FixtureRequest, tmp_path: Path):
    """Release `r1` of the chart in a fresh namespace enforcing PodSecurity restricted, with its volume."""
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    namespace = _namespace(control_plane, f"e2e-{digest}-{os.getpid() % 10000}", "restricted")
    rel = Release(control_plane, namespace, "r1", tmp_path)
    rel.create_volume()
    yield rel
    rel.stop_controllers()
    print(rel.report())  # shown when the test failed
    # Free the fake nodes' GPUs for the next test: delete the namespace (its pods go with it) and the PV.
    with contextlib.suppress(Exception):
        control_plane.request("DELETE", f"/api/v1/namespaces/{namespace}")
    rel.delete_volume()


def refused_pods(rel: Release) -> list[str]:
    """Events saying a pod could not be created (PodSecurity, quota, webhooks), as `reason: message`."""
    events = rel.list("/api/v1", "events")
    return [
        f"{e['involvedObject']['kind']}/{e['involvedObject']['name']}: {e['reason']}: {e['message']}"
        for e in events
        if e.get("reason") in ("FailedCreate", "FailedCreatePod")
    ]


def stage_phase(rel: Release, stage: str) -> str | None:
    status = rel.status() or {}
    return next((s["phase"] for s in status.get("stages") or [] if s["name"] == stage), None)


# --------------------------------------------------------------------------------------------- the user's run


def test_helm_install_runs_sft_grpo_eval_with_the_pods_real_commands(release: Release) -> None:
    """Issue 12's end-to-end run: every stage's container command from its PyTorchJob runs the real trainer."""
    notes = release.install()
    assert "r1-grpo status --release r1" in notes
    controller = release.start_controller()
    with PodDriver(release, lambda pod: "run") as driver:
        code = controller.wait(1500)
    assert code == 0, controller.log()[-6000:]
    assert [(name, code) for name, code, _ in driver.runs] == [
        ("r1-sft-1-master-0", 0),
        ("r1-grpo-1-master-0", 0),
        ("r1-eval-1-master-0", 0),
    ], [log[-3000:] for _, _, log in driver.runs]

    # The pods ran what the chart rendered: torchrun under `r1-grpo launch` with the operator's layout
    # variables, the stage module and the chain of output folders on the volume.
    jobs = release.jobs()
    assert sorted(jobs) == ["r1-eval-1", "r1-grpo-1", "r1-sft-1"]
    for stage, module in (("sft", "trainer.sft"), ("grpo", "trainer.grpo"), ("eval", "trainer.evaluate")):
        (container,) = jobs[f"r1-{stage}-1"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
            "containers"
        ]
        assert launches_torchrun(container) and module in container["args"]
        assert container["args"][container["args"].index("--output_dir") + 1] == f"/checkpoints/r1/{stage}"
        manifest = verify_stage_output(release.stage_dir(stage), stage)
        assert manifest.status == "completed"
    grpo = verify_stage_output(release.stage_dir("grpo"), "grpo")
    assert grpo.steps == 2 and driver.host_path(
        "r1-grpo-1-master-0", grpo.inputs["model_name_or_path"]
    ) == release.stage_dir("sft")
    assert complete_checkpoints(release.stage_dir("sft")), "sft saved no checkpoint (save_steps 2 of 4 steps)"
    assert (release.stage_dir("eval") / "metrics.json").is_file()

    status = release.status()
    assert status["phase"] == "Succeeded", status
    assert [(s["name"], s["phase"], s["attempt"]) for s in status["stages"]] == [
        ("sft", "Succeeded", 1),
        ("grpo", "Succeeded", 1),
        ("eval", "Succeeded", 1),
    ]
    shown = release.status_command()
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "release r1" in shown.stdout and "Succeeded" in shown.stdout

    # PodSecurity restricted admitted every pod: the controller Job's and the three stage masters.
    assert not refused_pods(release)
    assert release.list("/api/v1", "pods", "app.kubernetes.io/component=controller")
    assert MANIFEST_NAME in os.listdir(release.stage_dir("eval"))
    assert json.loads((release.stage_dir("eval") / "metrics.json").read_text())


# --------------------------------------------------------------------------------------------- helm upgrade


def test_helm_upgrade_mid_run_replaces_the_controller_and_later_stages_take_the_new_args(
    release: Release,
) -> None:
    """Issue 13 item 6: an upgrade that changes the controller Job's pod template (image, retries,
    resources) and a later stage's args, while sft runs. The new controller resumes; sft is not restarted."""
    sft_done = threading.Event()

    def policy(pod: dict) -> str | None:
        stage = pod["metadata"]["labels"]["r1-grpo.io/stage"]
        if stage == "sft" and not sft_done.is_set():
            return "hold"
        return "output"

    release.install()
    first_job = release.controller_job()
    # What the hash in the name is for: the API server refuses any change to a Job's pod template.
    with pytest.raises(ApiError) as refused:
        release.cp.request(
            "PATCH",
            f"/apis/batch/v1/namespaces/{release.namespace}/jobs/{first_job['metadata']['name']}",
            {"spec": {"template": {"metadata": {"labels": {"try": "1"}}}}},
        )
    assert refused.value.status == 422 and "field is immutable" in refused.value.body

    controller = release.start_controller()
    with PodDriver(release, policy):
        wait_until("sft running", lambda: stage_phase(release, "sft") == "Running", 120)
        write_checkpoint(release.stage_dir("sft"), 2)  # what the trainer had saved when the upgrade came

        values = merge(
            release.values,
            {
                "image": {"tag": "dev2"},
                "controller": {"retries": 3, "resources": {"limits": {"cpu": "600m"}}},
                "stages": {"grpo": {"args": {"max_steps": 7}}},
            },
        )
        release.upgrade(values)
        (second_job,) = wait_until(
            "one controller Job",
            lambda: len(release.controller_jobs()) == 1 and release.controller_jobs(),
            60,
        )
        assert second_job["metadata"]["name"] != first_job["metadata"]["name"]
        assert second_job["metadata"]["name"].startswith("r1-controller-")

        # The old Job's pod is deleted with it: its controller gets SIGTERM and stops (143, retryable).
        assert controller.stop() == 143, controller.log()[-3000:]
        controller = release.start_controller()
        assert (
            "--retries" in controller.proc.args
            and controller.proc.args[controller.proc.args.index("--retries") + 1] == "3"
        )
        sft_done.set()
        code = controller.wait(300)
    assert code == 0, controller.log()[-6000:]

    status = release.status()
    assert status["phase"] == "Succeeded" and status["settings"]["retries"] == 3, status
    assert [(s["name"], s["attempt"]) for s in status["stages"]] == [("sft", 1), ("grpo", 1), ("eval", 1)]
    sft = next(s for s in status["stages"] if s["name"] == "sft")
    assert [a["attempt"] for a in sft["attempts"]] == [1], "sft was restarted by the upgrade"
    jobs = release.jobs()
    assert sorted(jobs) == ["r1-eval-1", "r1-grpo-1", "r1-sft-1"]
    sft_container = jobs["r1-sft-1"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"
    ][0]
    grpo_container = jobs["r1-grpo-1"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"
    ][0]
    assert sft_container["image"] == "r1-grpo-test:dev"  # created before the upgrade
    assert grpo_container["image"] == "r1-grpo-test:dev2"
    args = grpo_container["args"]
    assert args[args.index("--max_steps") + 1] == "7"
    assert (release.stage_dir("sft") / "checkpoint-2").is_dir()


# --------------------------------------------------------------------------------------------- reinstall


def test_uninstall_keeps_the_volume_and_a_reinstall_moves_the_old_folders_aside(release: Release) -> None:
    """`helm uninstall` removes everything but the claim (real garbage collection of the PyTorchJobs, their
    pods and the status); a new install of the same release must not resume the old install's folders
    (issue 13 item 4): they are moved aside, never deleted, and the stages start over."""
    grpo_saved = threading.Event()

    def first(pod: dict) -> str | None:
        if pod["metadata"]["labels"]["r1-grpo.io/stage"] == "sft":
            return "output"
        write_checkpoint(release.stage_dir("grpo"), 1)  # grpo is interrupted by the uninstall
        grpo_saved.set()
        return None  # stays running

    release.install()
    old_uid = release.get("configmaps/r1-stages")["metadata"]["uid"]
    controller = release.start_controller()
    with PodDriver(release, first):
        wait_until(
            "grpo running with a checkpoint",
            lambda: grpo_saved.is_set() and stage_phase(release, "grpo") == "Running",
            120,
        )
    old_sft_manifest = (release.stage_dir("sft") / MANIFEST_NAME).read_text()

    release.uninstall()
    controller.stop()  # its pod went with its Job
    ns = release.namespace
    wait_until(
        "garbage collection of the release",
        lambda: (
            not release.jobs()
            and release.status() is None
            and not release.list("/api/v1", "pods", "app.kubernetes.io/instance=r1")
            and not release.controller_jobs()
        ),
        120,
    )
    pvc = release.get(f"persistentvolumeclaims/{release.claim}")
    assert (
        pvc["status"]["phase"] == "Bound"
        and pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    )
    for kind, path in (
        ("ConfigMap", "configmaps/r1-stages"),
        ("ServiceAccount", "serviceaccounts/r1-controller"),
    ):
        with pytest.raises(ApiError) as gone:
            release.get(path)
        assert gone.value.status == 404, kind
    with pytest.raises(ApiError):
        release.cp.request("GET", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/r1-controller")

    release.install()  # the same release again: Helm adopts the kept claim
    new_uid = release.get("configmaps/r1-stages")["metadata"]["uid"]
    assert new_uid != old_uid
    controller = release.start_controller()
    with PodDriver(release, lambda pod: "output"):
        code = controller.wait(300)
    assert code == 0, controller.log()[-6000:]

    # The old folders are kept beside the new ones, untouched; the new ones belong to the new install.
    assert (release.stage_dir("sft").with_name("sft.stale-1") / MANIFEST_NAME).read_text() == old_sft_manifest
    assert (release.stage_dir("grpo").with_name("grpo.stale-1") / "checkpoint-1").is_dir()
    assert not release.stage_dir("eval").with_name("eval.stale-1").exists()  # it had not started
    for stage in ("sft", "grpo", "eval"):
        verify_stage_output(release.stage_dir(stage), stage)
        assert read_owner(release.stage_dir(stage))["install"] == new_uid
    assert not complete_checkpoints(release.stage_dir("grpo"))  # started over, not resumed

    status = release.status()
    assert status["phase"] == "Succeeded"
    moved = {s["name"]: s["movedAside"] for s in status["stages"]}
    assert [len(moved["sft"]), len(moved["grpo"]), len(moved["eval"])] == [1, 1, 0], moved
    assert f"made by another install of release r1 (stages ConfigMap uid {old_uid}" in moved["sft"][0]
    shown = release.status_command()
    assert shown.returncode == 0
    assert "moved aside sft:" in shown.stdout and "/checkpoints/r1/grpo.stale-1" in shown.stdout
    print(f"\n$ r1-grpo status --release r1 --namespace {ns}\n{shown.stdout}")


def test_a_retry_resumes_but_not_after_an_upgrade_changed_its_input(release: Release) -> None:
    """Within one install a failed attempt's retry resumes from the folder's checkpoints; if a `helm
    upgrade` changed the stage's input meanwhile, the retry starts over in a fresh folder."""
    attempts: dict[str, int] = {}
    upgraded = threading.Event()

    def policy(pod: dict) -> str | None:
        stage, attempt = pod_stage_attempt(pod)
        attempts[stage] = attempt
        if attempt == 1 and stage in ("sft", "grpo"):
            write_checkpoint(release.stage_dir(stage), 3)
            if stage == "sft" and not upgraded.is_set():
                return "hold"
            return "fail:1"
        return "output"

    release.install()
    controller = release.start_controller()
    with PodDriver(release, policy):
        wait_until(
            "sft attempt 1 running",
            lambda: attempts.get("sft") == 1 and stage_phase(release, "sft") == "Running",
            120,
        )
        release.upgrade(merge(release.values, {"model": {"nameOrPath": "Qwen/Qwen2.5-0.5B-Instruct"}}))
        upgraded.set()
        code = controller.wait(300)
    assert code == 0, controller.log()[-6000:]

    status = release.status()
    by_stage = {s["name"]: s for s in status["stages"]}
    assert by_stage["sft"]["attempt"] == 2 and by_stage["grpo"]["attempt"] == 2
    # sft's input changed under it: the checkpoint of the old base model was moved aside, not resumed.
    assert (
        "made from another input ('builtin:tiny'; now 'Qwen/Qwen2.5-0.5B-Instruct')"
        in by_stage["sft"]["movedAside"][0]
    )
    assert (release.stage_dir("sft").with_name("sft.stale-1") / "checkpoint-3").is_dir()
    assert read_owner(release.stage_dir("sft"))["modelFrom"] == "Qwen/Qwen2.5-0.5B-Instruct"
    # grpo's input did not change: its retry resumes in place.
    assert not by_stage["grpo"]["movedAside"]
    assert [a["resumeFrom"] for a in by_stage["grpo"]["attempts"]] == [
        None,
        "/checkpoints/r1/grpo/checkpoint-3",
    ]
    assert (release.stage_dir("grpo") / "checkpoint-3").is_dir()


def _trained_steps(folder: Path) -> list[int]:
    """Steps with a train loss in metrics.jsonl so far (the last line may still be being written)."""
    path = folder / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [r["step"] for r in map(json.loads, filter(None, lines)) if "loss" in r]


def test_a_deleted_training_pod_saves_on_sigterm_and_the_next_pod_resumes(release: Release) -> None:
    """Issue 13 item 8: `kubectl delete pod` of the sft pod while it trains. The pod's first process is the
    chart's `r1-grpo launch -- torchrun …` (grace 600 s); the stand-in kubelet sends it SIGTERM when the API
    shows the deletion, as a kubelet does; the trainer saves a checkpoint and exits 143; the pod is then
    Failed (exit 143) and gone, the job fails, and the controller's next attempt resumes from the checkpoint.

    kwok removes a deleted pod's object at once (kwok v0.8.0 stage pod/fast/pod-delete: `delete: true`),
    where a kubelet keeps it Terminating until its containers have stopped; a finalizer held by the test
    keeps it until the process has exited, and the test then writes the container's exit code and lets
    it go, the kubelet's order."""
    # Still training when the deletion lands, a second or two after the first step (about 8 steps/s on the
    # 2-core AMD VM); the resumed pod trains the rest, so more steps only cost time.
    steps = 600
    sft_args = {"max_steps": steps, "save_steps": 0, "logging_steps": 1}  # save_steps 0: SIGTERM's save only
    values = merge(release.values, {"stages": {"sft": {"args": sft_args}}})
    sft_dir = release.stage_dir("sft")
    kubelet = HostKubelet(release.cp, release.namespace, release.workdir)
    first: dict = {}

    def policy(pod: dict) -> str | None:
        stage, _ = pod_stage_attempt(pod)
        if stage != "sft":
            return "output"
        if not first:
            run = kubelet.prepare(pod)
            first.update(pod=pod, run=run, log=release.workdir / "deleted-pod.log")
            first["proc"] = kubelet.start(run, first["log"])
            return None  # left running: the test stops it below, as the kubelet does on deletion
        # One writer per folder: the next pod may start only once the deleted one's trainer has exited.
        first.setdefault("next_started_while_running", first["proc"].poll() is None)
        return "run"

    def deletion_seen(pod: dict) -> bool:
        try:
            now = release.get(f"pods/{pod['metadata']['name']}")
        except ApiError as e:
            return e.status == 404
        return (
            bool(now["metadata"].get("deletionTimestamp")) or now["metadata"]["uid"] != pod["metadata"]["uid"]
        )

    release.install(values)
    controller = release.start_controller()
    with PodDriver(release, policy) as driver:
        wait_until("sft training", lambda: first and _trained_steps(sft_dir), 300)
        pod, proc = first["pod"], first["proc"]
        assert (
            launches_torchrun(pod["spec"]["containers"][0])
            and pod["spec"]["terminationGracePeriodSeconds"] == 600
        )
        pod_path = f"/api/v1/namespaces/{release.namespace}/pods/{pod['metadata']['name']}"
        release.cp.request("PATCH", pod_path, {"metadata": {"finalizers": [HOLD_FINALIZER]}})
        release.cp.request("DELETE", pod_path)
        wait_until("the pod's deletion", lambda: deletion_seen(pod), 60)
        proc.send_signal(signal.SIGTERM)  # to the container's first process only
        rc = proc.wait(300)
        log = first["log"].read_text(errors="replace")
        saved = latest_checkpoint(sft_dir)
        kubelet.finish(pod, rc)  # the container's exit code, then the object may go
        release.cp.request("PATCH", pod_path, {"metadata": {"finalizers": None}})
        code = controller.wait(900)
    assert rc == 143, log[-6000:]
    assert "r1-grpo launch: SIGTERM: passed on to workers" in log, log[-6000:]
    assert saved is not None, log[-6000:]
    step = int(saved.name.split("-")[1])
    assert 1 <= step < steps and f"preempted at step {step}; checkpoint saved" in log, log[-6000:]
    assert code == 0, controller.log()[-6000:]
    sft_runs = [(name, c, text) for name, c, text in driver.runs if "-sft-" in name]
    assert [c for _, c, _ in sft_runs] == [0], [(n, c, t[-3000:]) for n, c, t in sft_runs]
    assert driver.resumed_from(sft_runs[0][0], sft_runs[0][2]) == (saved, step), sft_runs[0][2][-6000:]
    assert first["next_started_while_running"] is False
    assert verify_stage_output(sft_dir, "sft").steps == steps
    sft_status = next(s for s in release.status()["stages"] if s["name"] == "sft")
    # The job failed with its pod (exit 143); the controller's retry was created once the pod had stopped,
    # so it saw the checkpoint and says it resumes from it.
    assert [(a["attempt"], a["phase"]) for a in sft_status["attempts"]] == [(1, "Failed"), (2, "Succeeded")]
    assert sft_status["attempts"][1]["resumeFrom"] == f"/checkpoints/r1/sft/{saved.name}", sft_status
    print(f"sft: deleted at step {step}; resumed by {sft_runs[0][0]}; status attempt {sft_status['attempt']}")


# --------------------------------------------------------------------------------------------- the Role

# The chart's Role, verb by verb (templates/controller-role.yaml); test_the_run_needs_every_rule_of_the_role
# holds this list equal to the installed Role.
ROLE_VERBS = [
    *(("kubeflow.org", "pytorchjobs", v) for v in ("get", "list", "watch", "create")),
    *(("", "configmaps", v) for v in ("get", "create", "patch")),
    *(("", "events", v) for v in ("create", "list")),
    *(("", "pods", v) for v in ("get", "list")),
    ("", "pods/log", "get"),
    ("", "persistentvolumeclaims", "get"),
]
POOL_LABEL = "r1-grpo.test/pool"
HOLD_FINALIZER = "r1-grpo.test/hold"


def role_scenario(release: Release, drop: tuple[str, str, str] | None = None) -> tuple[int, str]:
    """A run that makes every call the Role allows, with `drop` (group, resource, verb) taken out of the
    installed Role first. Returns the controller's exit code and its log.

    The calls and what provokes them: the status ConfigMap is created and patched, events are created; a
    job of an earlier install still holds sft's name (409: the controller reads it back, sees another owner
    and waits until the garbage collector has deleted it); a ResourceQuota refuses
    its pod (the job's missing pods are overdue after 1 s: the operator's FailedCreatePod events are
    listed); its attempt 1 fails (the master pod and its log are read) and attempt 2 succeeds; grpo's pod
    stays Pending (no node matches its nodeSelector yet: the claim is checked); jobs are listed and
    watched, pods listed, throughout."""
    ns, cp = release.namespace, release.cp
    cp.request(
        "POST",
        f"/api/v1/namespaces/{ns}/resourcequotas",
        {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "gpus"},
         "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}},
    )  # fmt: skip
    values = merge(
        release.values,
        {
            "controller": {"pendingTimeoutSeconds": 1},
            "stages": {"grpo": {"placement": {"nodeSelector": {POOL_LABEL: ns}}}},
        },
    )
    release.install(values)
    if drop is not None:
        role_path = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/r1-controller"
        role = cp.request("GET", role_path)
        group, resource, verb = drop
        rules = []
        for rule in role["rules"]:
            if group in rule["apiGroups"] and resource in rule["resources"]:
                rule = {**rule, "verbs": [v for v in rule["verbs"] if v != verb]}
            if rule["verbs"]:
                rules.append(rule)
        cp.request("PATCH", role_path, {"rules": rules})
    # sft's job name is still held by an earlier install's job, which the garbage collector is deleting
    # (its owner is gone) but a finalizer keeps for now.
    job = yaml.safe_load(release.get("configmaps/r1-stages")["data"]["sft.yaml"])
    job["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": "r1-stages",
            "uid": "0e4d2a3c-0000-4000-8000-000000000001",
        }
    ]
    job["metadata"]["finalizers"] = [HOLD_FINALIZER]
    jobs_path = f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"
    cp.request("POST", jobs_path, job)

    def policy(pod: dict) -> str:
        return "fail:1" if pod_stage_attempt(pod) == ("sft", 1) else "output"

    def message(stage: str) -> str:
        status = release.status() or {}
        return next((s["message"] for s in status.get("stages") or [] if s["name"] == stage), "")

    controller = release.start_controller()
    held, quota, pool = True, True, False
    with PodDriver(release, policy):
        deadline = time.monotonic() + 240
        while controller.proc.poll() is None and time.monotonic() < deadline:
            if held and "of an earlier install" in message("sft"):
                cp.request("PATCH", f"{jobs_path}/r1-sft-1", {"metadata": {"finalizers": None}})
                held = False
            if quota and message("sft").startswith("pending for more than"):
                cp.request("DELETE", f"/api/v1/namespaces/{ns}/resourcequotas/gpus")
                quota = False
            if not pool and message("grpo").startswith("pending for more than"):
                node = GPU_NODES[1]
                cp.request("PATCH", f"/api/v1/nodes/{node}", {"metadata": {"labels": {POOL_LABEL: ns}}})
                pool = True
            time.sleep(0.3)
        code = controller.wait(30)
    return code, controller.log()


def test_the_run_needs_every_rule_of_the_role(release: Release) -> None:
    """With the chart's Role the run succeeds; the Role is exactly the verbs listed in ROLE_VERBS, each of
    which the next test removes in turn."""
    code, log = role_scenario(release)
    assert code == 0, log[-6000:]
    status = release.status()
    assert status["phase"] == "Succeeded"
    sft = next(s for s in status["stages"] if s["name"] == "sft")
    assert sft["attempt"] == 2 and sft["attempts"][0]["logTail"] is not None
    role = release.cp.request(
        "GET", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{release.namespace}/roles/r1-controller"
    )
    installed = sorted(
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    )
    assert installed == sorted(ROLE_VERBS)


@pytest.mark.parametrize("rule", ROLE_VERBS, ids=[f"{r}-{v}" for _, r, v in ROLE_VERBS])
def test_without_any_one_verb_of_the_role_the_controller_exits_3_naming_it(
    release: Release, rule: tuple[str, str, str]
) -> None:
    group, resource, verb = rule
    code, log = role_scenario(release, drop=rule)
    assert code == EXIT_FORBIDDEN, log[-6000:]
    errors = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    said = [e.get("error", "") for e in errors if e.get("level") == "error"]
    assert any(f'cannot {verb} resource "{resource}"' in text for text in said), said


# --------------------------------------------------------------------------------------------- helm test


def test_helm_test_fails_before_the_status_exists_and_passes_once_the_run_succeeded(release: Release) -> None:
    """`helm test` runs `r1-grpo status` in a pod of the controller's account (the token it would mount is
    given to the host process as a kubeconfig): exit 2 and a failed test before the controller wrote a
    status, a passed test after the run succeeded."""
    release.install(merge(release.values, {"controller": {"nodeSelector": SYSTEM_POOL}}))
    tests = PodDriver(release, lambda pod: "run", selector="app.kubernetes.io/component=test")
    with tests:
        with pytest.raises(HelmFailed) as early:
            release.helm("test", "r1", "--timeout", "120s")
        assert "r1-test-status" in early.value.output and "Failed" in early.value.output
        ((name, code, log),) = tests.runs
        assert name == "r1-test-status" and code == 2 and "ConfigMap" in log and "not found" in log

        controller = release.start_controller()
        with PodDriver(release, lambda pod: "output"):
            assert controller.wait(300) == 0, controller.log()[-4000:]
        out = release.helm("test", "r1", "--timeout", "120s")
    assert "Phase:          Succeeded" in out or "Succeeded" in out, out
    assert [code for _, code, _ in tests.runs] == [2, 0]
    assert "release r1" in tests.runs[1][2] and "Succeeded" in tests.runs[1][2]
