"""The chart, the controller and the trainer together on a real control plane, as a user runs them.

`helm install` of charts/r1-grpo into a namespace that enforces PodSecurity `restricted`; the controller as a
host process with the flags of the controller Job Helm created and a token of the chart's ServiceAccount,
so the chart's Role decides every call; the training operator v1.9.4 creating the stage pods; kwok's fake
GPU nodes running them, and tests/support/e2e.py's HostKubelet playing their kubelet: it runs a pod's real
container command on this machine (env, args and paths of the pod, the volume's mount path translated to
the hostPath PV's directory) and writes the exit code into the pod status. Scenarios that are about the
controller and the chart, not the trainer, write stage outputs directly instead of training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.support.e2e import (
    PSA_ENFORCE,
    PodDriver,
    Release,
)
from trainer.contract.output import MANIFEST_NAME, complete_checkpoints, verify_stage_output

GPU_NODES = ("e2e-gpu-0", "e2e-gpu-1")


@pytest.fixture(scope="module")
def gpu_nodes(control_plane) -> tuple[str, ...]:
    """Two fake 64-GPU nodes (tainted like a GPU pool), shared by this module's tests."""
    from tests.controlplane.cluster import ApiError

    for name in GPU_NODES:
        try:
            control_plane.create_gpu_node(name, gpus=64)
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

    # The pods ran what the chart rendered: torchrun with the operator's layout variables, the stage module
    # and the chain of output folders on the volume.
    jobs = release.jobs()
    assert sorted(jobs) == ["r1-eval-1", "r1-grpo-1", "r1-sft-1"]
    for stage, module in (("sft", "trainer.sft"), ("grpo", "trainer.grpo"), ("eval", "trainer.evaluate")):
        (container,) = jobs[f"r1-{stage}-1"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
            "containers"
        ]
        assert container["command"] == ["torchrun"] and module in container["args"]
        assert container["args"][container["args"].index("--output_dir") + 1] == f"/checkpoints/r1/{stage}"
        manifest = verify_stage_output(release.stage_dir(stage), stage)
        assert manifest.status == "completed"
    grpo = verify_stage_output(release.stage_dir("grpo"), "grpo")
    assert grpo.steps == 2 and grpo.inputs["model_name_or_path"] == str(release.stage_dir("sft"))
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
