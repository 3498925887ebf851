"""The optional prepare stage on the real control plane with the chart installed (issue 25), as
tests/test_e2e_cluster.py runs the chart: the controller as a host process, the training operator creating
the pods and tests/support/host_kubelet.py's HostKubelet running their real commands.

The model hub cannot be reached from here: the prepare pod downloads from tests/support/standin_hub.py, a
STAND-IN for the hub served on loopback (HF_ENDPOINT).
"""

from __future__ import annotations

from pathlib import Path

from tests.support.e2e import Release, merge
from tests.support.host_kubelet import PodDriver
from tests.support.standin_hub import TOKEN, StandinHub, serve_tiny
from tests.test_e2e_cluster import CPU_NODE, gpu_nodes, refused_pods, release  # noqa: F401 - fixtures
from trainer.contract.output import MANIFEST_NAME, verify_stage_output


def test_prepare_downloads_on_a_cpu_pod_and_sft_trains_from_it_offline(
    release: Release,  # noqa: F811 - the fixture imported above
    tiny_model_dir: Path,
) -> None:
    """Issue 25: stages.prepare on a CPU pod (no GPU request or toleration) downloads the private model with
    the token of hub.existingSecret and the dataset sft names from the hub -- here tests/support/standin_hub.py,
    a STAND-IN for the hub on loopback (HF_ENDPOINT), since the hub cannot be reached -- and sft's pod starts
    from the prepared folder and reads the prepared dataset with the hub offline."""
    release.cp.request(
        "POST",
        f"/api/v1/namespaces/{release.namespace}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "hub-token"},
            "stringData": {"token": TOKEN},
        },
    )
    with StandinHub() as hub:
        serve_tiny(hub, tiny_model_dir)
        values = merge(
            release.values,
            {
                "model": {"nameOrPath": "org/tiny"},
                "dataset": {"name": "org/arith", "config": "main"},
                "hub": {"existingSecret": "hub-token"},
                # Every stage is pointed at the stand-in, so a request from sft would be seen below.
                "env": {"HF_ENDPOINT": hub.url},
                "stages": {
                    "prepare": {"enabled": True, "resources": {"cpu": "1", "memory": "2Gi"}},
                    "sft": {"args": {"max_steps": 1, "per_device_train_batch_size": 4}},
                    "grpo": {"enabled": False},
                    "eval": {"enabled": False},
                },
            },
        )
        release.install(values)
        controller = release.start_controller()
        with PodDriver(release, lambda pod: "run") as driver:
            code = controller.wait(1200)
        assert code == 0, controller.log()[-6000:]
        assert [(name, code) for name, code, _ in driver.runs] == [
            ("r1-prepare-1-master-0", 0),
            ("r1-sft-1-master-0", 0),
        ], [log[-3000:] for _, _, log in driver.runs]
        requests = list(hub.requests)

    prepared = release.stage_dir("prepare")
    manifest = verify_stage_output(prepared, "prepare")
    assert manifest.inputs["model_revision"] == hub.repos[("models", "org/tiny")].sha
    assert manifest.inputs["datasets"]["org/arith"]["configs"] == {"main": {"train": 64, "test": 16}}
    sft = verify_stage_output(release.stage_dir("sft"), "sft")
    assert sft.steps == 1
    assert driver.host_path("r1-sft-1-master-0", sft.inputs["model_name_or_path"]) == prepared
    assert (
        driver.host_path("r1-sft-1-master-0", sft.inputs["dataset_name"])
        == prepared / "datasets" / "org" / "arith"
    )
    # The hub was asked only while prepare ran (the private model with the Secret's token); sft, pointed at
    # the same hub, asked nothing.
    finished = (prepared / MANIFEST_NAME).stat().st_mtime
    assert requests and all(at <= finished for at, _, _ in requests), requests[-3:]
    # The prepare pod is CPU-only: no GPU request, no GPU toleration, so it landed on the CPU node.
    pods = {
        p["metadata"]["labels"]["r1-grpo.io/stage"]: p
        for p in release.list("/api/v1", "pods", "r1-grpo.io/stage")
    }
    spec = pods["prepare"]["spec"]
    assert spec["nodeName"] == CPU_NODE
    assert not [t for t in spec.get("tolerations") or [] if t.get("key") == "nvidia.com/gpu"]
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"].get("requests", {})
    env = {e["name"]: e.get("value") for e in pods["sft"]["spec"]["containers"][0]["env"]}
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    status = release.status()
    assert [(s["name"], s["phase"]) for s in status["stages"]] == [
        ("prepare", "Succeeded"),
        ("sft", "Succeeded"),
    ]
    assert not refused_pods(release)
