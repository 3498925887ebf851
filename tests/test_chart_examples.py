"""charts/r1-grpo/examples/: every values file lints (helm 3 and 4, --strict) and renders resources that
validate strictly (Kubernetes schemas, the training pods as Pods, the kubeflow SDK models, the PyTorchJob
CRD) and that the controller accepts; the issue-25 scenario file has what the scenario asks for.

The files are passed to helm as files (`-f`), exactly as a user would, YAML anchors included.
"""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest

from tests.support.helmtool import CHART_DIR, REPO_ROOT, find_doc, parse_documents, run_helm, stage_jobs
from tests.test_chart import (
    GPU,
    _as_pods,
    crd_errors,
    crd_validator,  # noqa: F401 (a fixture)
    helm,  # noqa: F401 (a fixture)
    k8s_errors,
    sdk_errors,
    sdk_round_trip,
    trainer_flags,
)
from trainer.executors.kubernetes.spec import parse_pipeline

EXAMPLES_DIR = CHART_DIR / "examples"
EXAMPLES = sorted(p.name for p in EXAMPLES_DIR.glob("*.yaml"))
SCENARIO = "qwen2.5-7b-2x8-h100.yaml"
MULTUS = "k8s.v1.cni.cncf.io/networks"

_RENDERED: dict[str, list[dict]] = {}


def render_example(name: str, release: str = "example") -> list[dict]:
    """`helm template` with the example file as the user's values file, newest helm, cached."""
    if name not in _RENDERED:
        text = run_helm(
            ["template", release, str(CHART_DIR), "--namespace", "ml", "-f", str(EXAMPLES_DIR / name)]
        )
        _RENDERED[name] = parse_documents(text)
    return _RENDERED[name]


def _flags(job: dict) -> dict[str, str]:
    _, _, flags = trainer_flags(job)
    return dict(zip(flags[::2], flags[1::2], strict=True))


def _pod(job: dict, replica: str = "Master") -> dict:
    return job["spec"]["pytorchReplicaSpecs"][replica]["template"]


def _env(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def test_the_examples_are_there() -> None:
    """The files README.md and docs/networking.md point at exist (a rename must update the docs)."""
    assert {SCENARIO, "rdma-sriov.yaml", "tcp-named-interface.yaml"} <= set(EXAMPLES), EXAMPLES
    docs = (REPO_ROOT / "docs" / "networking.md").read_text() + (REPO_ROOT / "README.md").read_text()
    for name in ("rdma-sriov.yaml", "tcp-named-interface.yaml"):
        assert f"charts/r1-grpo/examples/{name}" in docs, name
    assert "docs/networking.md" in (REPO_ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_lints_strict(helm: Path, name: str) -> None:  # noqa: F811
    output = run_helm(["lint", "--strict", str(CHART_DIR), "-f", str(EXAMPLES_DIR / name)], helm=helm)
    assert "1 chart(s) linted, 0 chart(s) failed" in output
    assert "[WARNING]" not in output and "[ERROR]" not in output


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_validates_strictly(crd_validator: jsonschema.protocols.Validator, name: str) -> None:  # noqa: F811
    docs = render_example(name)
    errors = [e for doc in docs for e in k8s_errors(doc)]
    jobs = stage_jobs(docs, release="example")
    assert jobs, "no stage rendered"
    for stage, job in jobs.items():
        errors += [e for pod in _as_pods(job) for e in k8s_errors(pod)]
        errors += [f"{stage} (SDK models): {e}" for e in sdk_errors(job)]
        errors += [f"{stage} (CRD): {e}" for e in crd_errors(crd_validator, job)]
        if sdk_round_trip(job) != job:
            errors.append(f"{stage}: the SDK round trip changed the job (a value of the wrong type?)")
    assert not errors, "\n".join(errors)
    # The controller parses the stages ConfigMap, every stage's flags included, as it would on start.
    configmap = find_doc(docs, "ConfigMap", "example-stages")
    configmap["metadata"]["namespace"] = "ml"
    pipeline = parse_pipeline(configmap, "example")
    assert [s.name for s in pipeline.stages] == list(jobs)


def test_scenario_has_what_the_issue_asks_for() -> None:
    """Qwen2.5-7B on 2 nodes x 8 H100, GPU taint, Kueue, RWX storage class, private registry with pull
    secrets, W&B and hub token Secrets, GSM8K + MATH for training, AIME24 + AMC23 for eval."""
    docs = render_example(SCENARIO)
    jobs = stage_jobs(docs, release="example")
    assert list(jobs) == ["sft", "grpo", "eval"]
    pvc = find_doc(docs, "PersistentVolumeClaim", "example-checkpoints")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "nfs-rwx"
    assert _flags(jobs["sft"])["--model_name_or_path"] == "Qwen/Qwen2.5-7B-Instruct"
    for stage, job in jobs.items():
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-h100", stage
        replicas = job["spec"]["pytorchReplicaSpecs"]
        if stage in ("sft", "grpo"):
            assert set(replicas) == {"Master", "Worker"} and replicas["Worker"]["replicas"] == 1, stage
        for replica in replicas:
            pod = _pod(job, replica)
            spec = pod["spec"]
            assert spec["containers"][0]["image"].startswith("registry.example.com/ml/r1-grpo:"), stage
            assert spec["imagePullSecrets"] == [{"name": "regcred"}], stage
            assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"], stage
            assert spec["containers"][0]["resources"]["limits"][GPU] == "8", stage
            env = {e["name"]: e for e in spec["containers"][0]["env"]}
            assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "wandb-api", stage
            assert env["HF_TOKEN_PATH"]["value"] == "/var/run/secrets/huggingface/token", stage
            token = next(v for v in spec["volumes"] if v["name"] == "hub-token")
            assert token["secret"]["secretName"] == "hf-token", stage
    train_data = _flags(jobs["grpo"])["--dataset_name"]
    assert re.search(r"gsm8k", train_data) and re.search(r"/math/", train_data), train_data
    assert _flags(jobs["sft"])["--dataset_name"] == train_data
    eval_data = _flags(jobs["eval"])["--dataset_name"]
    assert "aime24" in eval_data and "amc23" in eval_data, eval_data
    # One --dataset_config for every source would be wrong for a mix of local files: none is passed.
    assert "--dataset_config" not in _flags(jobs["grpo"])


def test_rdma_example_puts_the_fabric_on_the_multi_node_stage_only() -> None:
    jobs = stage_jobs(render_example("rdma-sriov.yaml"), release="example")
    assert list(jobs) == ["grpo", "eval"]
    for replica in ("Master", "Worker"):
        pod = _pod(jobs["grpo"], replica)
        assert pod["metadata"]["annotations"][MULTUS] == "rdma-net0,rdma-net1", replica
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/rdma_vf"] == "2" and limits[GPU] == "8", replica
        env = _env(pod)
        assert env["NCCL_IB_HCA"] == "mlx5" and env["NCCL_SOCKET_IFNAME"] == "=eth0", replica
        # The base model comes from the read-only weights claim, not the hub.
        mounts = {m["name"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["model"] == {
            "name": "model",
            "mountPath": "/model",
            "readOnly": True,
            "subPath": "Qwen2.5-7B-Instruct",
        }
    assert _flags(jobs["grpo"])["--model_name_or_path"] == "/model"
    evaluation = _pod(jobs["eval"])
    assert MULTUS not in evaluation["metadata"]["annotations"]
    assert "nvidia.com/rdma_vf" not in evaluation["spec"]["containers"][0]["resources"]["limits"]
    # No host namespaces or privileges: the devices come from the device plugin.
    for job in jobs.values():
        for pod in _as_pods(job):
            assert "hostNetwork" not in pod["spec"]
            assert all("hostPath" not in v for v in pod["spec"]["volumes"])
            assert pod["spec"]["containers"][0]["securityContext"]["privileged"] is False


def test_tcp_example_names_the_interface_on_the_multi_node_stages_only() -> None:
    jobs = stage_jobs(render_example("tcp-named-interface.yaml"), release="example")
    for stage in ("sft", "grpo"):
        for replica in ("Master", "Worker"):
            pod = _pod(jobs[stage], replica)
            assert pod["metadata"]["annotations"][MULTUS] == "data-net", (stage, replica)
            env = _env(pod)
            assert env["NCCL_SOCKET_IFNAME"] == "=net1" and env["NCCL_IB_DISABLE"] == "1", (stage, replica)
    evaluation = _pod(jobs["eval"])
    assert MULTUS not in evaluation["metadata"]["annotations"]
    assert "NCCL_SOCKET_IFNAME" not in _env(evaluation)
