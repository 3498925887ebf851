"""charts/r1-grpo with `jobApi: trainjob`: every stage as a Kubeflow Trainer v2 TrainJob running the same pods
as its PyTorchJob, checked with the real helm and strictly against the CRDs of the pinned Trainer v2 module
(tests/controlplane-jobs/build.sh copies them)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.helmtool import HelmError, find_doc, render_chart, stage_jobs
from tests.test_chart import VALUE_SETS, _strict, crd_errors, deep_merge, k8s_errors

TRAINJOB = {"jobApi": "trainjob"}
# Value sets whose pods differ in every way the chart can vary them (layout, placement, secrets, queues).
CASES = (
    "defaults",
    "multi-node-2x8",
    "kueue",
    "wandb",
    "placement-and-cpu-only-eval",
    "grpo-only-from-volume",
    "prepare-rewards-pod-options",
)
CRD_KINDS = ("TrainJob", "TrainingRuntime", "ClusterTrainingRuntime")
CLUSTER_RUNTIME = {"trainJob": {"clusterTrainingRuntime": "torch-distributed"}}


def rendered(*overrides: dict[str, Any]) -> list[dict]:
    values: dict[str, Any] = {}
    for override in overrides:
        values = deep_merge(values, override)
    return render_chart(values or None)


def runtimes(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["labels"]["r1-grpo.io/stage"]: d for d in docs if d["kind"] == "TrainingRuntime"}


def runtime_pod(runtime: dict) -> dict:
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return job["template"]["spec"]["template"]


def as_pytorchjob_pod(pod: dict) -> dict:
    """A TrainJob pod template written as the PyTorchJob's: what differs by design (container name, the
    rendezvous variables and port each operator sets, the Job pod's restartPolicy) mapped back."""
    pod = copy.deepcopy(pod)
    pod["spec"].pop("restartPolicy")
    container = pod["spec"]["containers"][0]
    assert container["name"] == "node"
    container["name"] = "pytorch"
    container["args"] = [
        a.replace("$(PET_MASTER_ADDR)", "$(MASTER_ADDR)").replace("$(PET_MASTER_PORT)", "$(MASTER_PORT)")
        for a in container["args"]
    ]
    assert container["ports"] == [{"name": "torchrun", "containerPort": 29500, "protocol": "TCP"}]
    container["ports"] = [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
    return pod


@pytest.fixture(scope="module")
def trainer_validators(jobapi_build: Path) -> dict[str, jsonschema.protocols.Validator]:
    """kind -> the strict v1alpha1 schema of the Trainer v2 CRDs the test control plane installs."""
    out = {}
    for kind, plural in zip(
        CRD_KINDS, ("trainjobs", "trainingruntimes", "clustertrainingruntimes"), strict=True
    ):
        path = jobapi_build / "manifests" / "trainer-v2" / "crds" / f"trainer.kubeflow.org_{plural}.yaml"
        crd = yaml.safe_load(path.read_text())
        assert crd["spec"]["names"]["kind"] == kind
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
        schema = _strict(version["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        out[kind] = jsonschema.Draft7Validator(schema)
    return out


@pytest.mark.parametrize("name", CASES)
def test_trainjob_stages_run_the_pytorchjob_pods(name: str) -> None:
    """One pod partial: a TrainJob stage's pods are its PyTorchJob's, but for what each operator needs."""
    pytorch = stage_jobs(rendered(VALUE_SETS[name]))
    docs = rendered(VALUE_SETS[name], TRAINJOB)
    trainjobs, shipped = stage_jobs(docs), runtimes(docs)
    assert list(trainjobs) == list(pytorch) == list(shipped)
    for stage, job in trainjobs.items():
        master = pytorch[stage]["spec"]["pytorchReplicaSpecs"]["Master"]
        runtime = shipped[stage]
        assert job["kind"] == "TrainJob" and job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
        assert job["metadata"] == pytorch[stage]["metadata"], stage  # name, attempt and Kueue labels
        assert job["spec"]["runtimeRef"] == {
            "apiGroup": "trainer.kubeflow.org",
            "kind": "TrainingRuntime",
            "name": runtime["metadata"]["name"],
        }
        nodes = 1 + pytorch[stage]["spec"]["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 0)
        container = master["template"]["spec"]["containers"][0]
        assert job["spec"]["trainer"] == {
            "numNodes": nodes,
            "numProcPerNode": int(pytorch[stage]["spec"]["nprocPerNode"]),
            "command": container["command"],
            "args": runtime_pod(runtime)["spec"]["containers"][0]["args"],
        }
        assert runtime["spec"]["mlPolicy"] == {"numNodes": nodes, "torch": {}}
        pod = runtime_pod(runtime)
        assert pod["spec"]["restartPolicy"] == master["restartPolicy"] == "Never"
        assert as_pytorchjob_pod(pod) == master["template"], stage
        (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
        assert rjob["name"] == "node" and rjob["template"]["spec"]["backoffLimit"] == 0
        assert rjob["template"]["metadata"]["labels"] == {
            "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"
        }
        assert runtime["spec"]["template"]["spec"]["failurePolicy"] == {"maxRestarts": 0}


@pytest.mark.parametrize("name", CASES)
def test_trainjobs_and_runtimes_validate_against_the_trainer_crds(
    trainer_validators: dict[str, jsonschema.protocols.Validator], name: str
) -> None:
    errors = []
    for extra in ({}, CLUSTER_RUNTIME):
        docs = rendered(VALUE_SETS[name], TRAINJOB, extra)
        for stage, job in stage_jobs(docs).items():
            errors += [f"{stage} TrainJob: {e}" for e in crd_errors(trainer_validators["TrainJob"], job)]
        for stage, runtime in runtimes(docs).items():
            errors += [
                f"{stage} runtime: {e}" for e in crd_errors(trainer_validators["TrainingRuntime"], runtime)
            ]
        errors += [e for doc in docs if doc["kind"] not in CRD_KINDS for e in k8s_errors(doc)]
    assert not errors, "\n".join(errors)


def test_trainer_validators_reject_unknown_fields(
    trainer_validators: dict[str, jsonschema.protocols.Validator],
) -> None:
    """Negative control: the strict CRD validators do fail on an unknown or mistyped field."""
    docs = rendered(TRAINJOB)
    job = stage_jobs(docs)["sft"]
    job["spec"]["trainer"]["gpus"] = 8
    job["spec"]["trainer"]["numNodes"] = "one"
    errors = crd_errors(trainer_validators["TrainJob"], job)
    assert any("gpus" in e for e in errors) and any("numNodes" in e for e in errors), errors
    runtime = runtimes(docs)["sft"]
    runtime_pod(runtime)["spec"]["containers"][0]["gpus"] = 1
    assert any("gpus" in e for e in crd_errors(trainer_validators["TrainingRuntime"], runtime))


def test_cluster_training_runtime_gets_the_same_pod_through_the_trainjob() -> None:
    """With a ClusterTrainingRuntime the TrainJob carries the stage pod's container and patches the rest."""
    base = rendered(VALUE_SETS["wandb"], TRAINJOB)
    docs = rendered(VALUE_SETS["wandb"], TRAINJOB, CLUSTER_RUNTIME)
    assert not runtimes(docs)
    for stage, job in stage_jobs(docs).items():
        pod = runtime_pod(runtimes(base)[stage])
        container = pod["spec"]["containers"][0]
        spec = job["spec"]
        assert spec["runtimeRef"] == {
            "apiGroup": "trainer.kubeflow.org",
            "kind": "ClusterTrainingRuntime",
            "name": "torch-distributed",
        }
        trainer = spec["trainer"]
        assert trainer["image"] == container["image"]
        assert trainer["command"] == container["command"] and trainer["args"] == container["args"]
        assert trainer["env"] == container["env"] and trainer["resourcesPerNode"] == container["resources"]
        (patch,) = spec["runtimePatches"]
        assert patch["manager"] == "r1-grpo.io/chart"
        (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        assert rjob["name"] == "node"
        patched = rjob["template"]["spec"]["template"]
        assert patched["metadata"] == {k: pod["metadata"][k] for k in ("labels", "annotations")}
        for key in ("serviceAccountName", "volumes", "imagePullSecrets", "securityContext", "tolerations"):
            assert patched["spec"].get(key) == pod["spec"].get(key), (stage, key)
        assert (
            patched["spec"]["terminationGracePeriodSeconds"] == pod["spec"]["terminationGracePeriodSeconds"]
        )
        assert patched["spec"]["containers"] == [
            {k: container[k] for k in ("name", "volumeMounts", "securityContext")}
        ]


def test_trainjob_role_and_kueue_rules() -> None:
    def rules(docs: list[dict]) -> set[tuple[str, str, frozenset[str]]]:
        role = find_doc(docs, "Role", "r1-grpo-controller")
        return {
            (g, r, frozenset(rule["verbs"]))
            for rule in role["rules"]
            for g in rule["apiGroups"]
            for r in rule["resources"]
        }

    plain, trainjob = rules(rendered()), rules(rendered(TRAINJOB, VALUE_SETS["kueue"]))
    job_rule = frozenset({"get", "list", "watch", "create"})
    assert ("kubeflow.org", "pytorchjobs", job_rule) in plain
    assert trainjob - plain == {
        ("trainer.kubeflow.org", "trainjobs", job_rule),
        ("kueue.x-k8s.io", "workloads", frozenset({"list"})),
        ("kueue.x-k8s.io", "localqueues", frozenset({"get"})),
    }
    assert plain - trainjob == {("kubeflow.org", "pytorchjobs", job_rule)}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"jobApi": "tfjob"}, "jobApi"),
        (
            {"jobApi": "trainjob", "stages": {"grpo": {"restartPolicy": "ExitCode"}}},
            "stages.grpo.restartPolicy ExitCode works only with jobApi pytorchjob",
        ),
        ({"trainJob": {"clusterTrainingRuntime": "Bad_Name"}}, "clusterTrainingRuntime"),
        ({"trainJob": {"runtime": "x"}}, "runtime"),
    ],
)
def test_bad_job_api_values_fail_clearly(values: dict, message: str) -> None:
    with pytest.raises(HelmError) as err:
        render_chart(values)
    assert message in str(err.value)


def test_trainjob_on_failure_restarts_in_the_job() -> None:
    docs = rendered(TRAINJOB, {"stages": {"sft": {"restartPolicy": "OnFailure", "backoffLimit": 2}}})
    runtime = runtimes(docs)["sft"]
    (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["template"]["spec"]["backoffLimit"] == 2
    assert runtime_pod(runtime)["spec"]["restartPolicy"] == "OnFailure"
