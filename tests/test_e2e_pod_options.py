"""model.existingClaim and the pod escape hatches on the real control plane (issue 25, items 1 and 4).

`helm install` into a namespace enforcing PodSecurity `restricted`, the controller as a host process, the
training operator creating the SFT pod from the chart's job, and tests/support/host_kubelet.py's HostKubelet running
its real container command with the weights claim's folder (subPath) where the pod sees `/model`
(test_e2e_cluster.py describes the set-up). The API server, PodSecurity admission and the operator are
real; the weights are the built-in tiny model copied onto a hostPath PersistentVolume bound read-only-many.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from tests.support.e2e import TINY_VALUES, Release, merge
from tests.support.host_kubelet import PodDriver
from tests.test_e2e_cluster import (
    gpu_nodes,  # noqa: F401 (a fixture)
    refused_pods,
    release,  # noqa: F401 (a fixture)
)
from trainer.contract.output import verify_stage_output


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _weights_claim(rel: Release, folder: Path, name: str = "weights") -> None:
    """A hostPath PV holding `folder`, and the user's claim on it (the chart only refers to it)."""
    pv = f"{rel.namespace}-{name}"[:63]
    rel.cp.create_hostpath_pv(
        pv, folder, capacity="1Gi", access_modes=("ReadOnlyMany",), claim=(rel.namespace, name)
    )
    rel.cp.request(
        "POST",
        f"/api/v1/namespaces/{rel.namespace}/persistentvolumeclaims",
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )


def test_sft_trains_from_a_read_only_weights_claim_with_the_pod_options(
    release: Release,  # noqa: F811
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, weights / "tiny-base")
    before = _digest(weights)
    _weights_claim(release, weights)
    values = merge(
        TINY_VALUES,
        {
            "model": {"nameOrPath": "", "existingClaim": "weights", "subPath": "tiny-base"},
            "podLabels": {"team": "ml"},
            "podAnnotations": {"example.com/owner": "ml-platform"},
            "extraVolumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}],
            "stages": {
                "sft": {"extraVolumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
                "grpo": {"enabled": False},
                "eval": {"enabled": False},
            },
            "controller": {"podAnnotations": {"example.com/owner": "ml-platform"}},
        },
    )
    release.install(values)
    controller = release.start_controller()
    with PodDriver(release, lambda pod: "run") as driver:
        code = controller.wait(1200)
    assert code == 0, controller.log()[-6000:]
    assert [(name, code) for name, code, _ in driver.runs] == [("r1-sft-1-master-0", 0)], [
        log[-3000:] for _, _, log in driver.runs
    ]

    # The pod the operator created from the chart's template, read back from the API server.
    (pod,) = release.list("/api/v1", "pods", "training.kubeflow.org/job-name=r1-sft-1")
    assert pod["metadata"]["labels"]["team"] == "ml"
    assert pod["metadata"]["annotations"]["example.com/owner"] == "ml-platform"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    assert volumes["scratch"]["emptyDir"] == {"sizeLimit": "1Gi"}
    (container,) = pod["spec"]["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["model"]["readOnly"] is True and mounts["model"]["subPath"] == "tiny-base"
    assert mounts["model"]["mountPath"] == "/model" and mounts["scratch"]["mountPath"] == "/scratch"
    args = container["args"]
    assert args[args.index("--model_name_or_path") + 1] == "/model"
    # PodSecurity `restricted` admitted it (a read-only claim and an emptyDir need no laxer level).
    assert not refused_pods(release)

    # SFT trained from the weights (the pod's /model is the claim's tiny-base folder) and left them as they were.
    manifest = verify_stage_output(release.stage_dir("sft"), "sft")
    assert manifest.status == "completed"
    assert (
        driver.host_path("r1-sft-1-master-0", manifest.inputs["model_name_or_path"]) == weights / "tiny-base"
    )
    assert _digest(weights) == before
    # The controller pod carries its own annotation.
    controller_pods = release.list("/api/v1", "pods", "app.kubernetes.io/component=controller")
    assert controller_pods and all(
        p["metadata"]["annotations"]["example.com/owner"] == "ml-platform" for p in controller_pods
    )
