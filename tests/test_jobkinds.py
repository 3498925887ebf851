"""The job-API adapters (trainer/executors/kubernetes/jobkinds.py) and the Kueue reading (admission.py) on the
objects the real controllers write: a PyTorchJob and a TrainJob rendered by the chart, status shapes of the
training operator v1.9, Trainer v2.3 and Kueue v0.17 (field names from their API types)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import yaml

from tests.support.helmtool import render_chart, stage_jobs
from trainer.executors.kubernetes.admission import workload_admitted, workload_wait_reason
from trainer.executors.kubernetes.decide import ReportPending, Wait, _report_or_wait
from trainer.executors.kubernetes.jobkinds import PYTORCHJOB, TRAINJOB, kind_of
from trainer.executors.kubernetes.spec import ConfigError, ControllerConfig, parse_pipeline, stage_argvs
from trainer.executors.kubernetes.status import RunStatus
from trainer.executors.kubernetes.world import PendingItem, World

T0 = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)


def _configmap(values: dict | None = None) -> dict:
    docs = render_chart(values)
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "r1-grpo-stages")
    cm["metadata"].update(namespace="default", uid="u-1", resourceVersion="1")
    return cm


def test_the_chart_jobs_pick_their_adapter_and_flags() -> None:
    for values, kind in ((None, PYTORCHJOB), ({"jobApi": "trainjob"}, TRAINJOB)):
        pipeline = parse_pipeline(_configmap(values), "r1-grpo")
        assert pipeline.kind is kind
        for spec in pipeline.stages:
            ((role, argv),) = [(r, a) for r, a in stage_argvs(spec.job)]  # one command per job
            assert (
                argv[0]
                == {"sft": "trainer.sft", "grpo": "trainer.grpo", "eval": "trainer.evaluate"}[spec.name]
            )
            assert "--output_dir" in argv and role == ("Master" if kind is PYTORCHJOB else "node")


def test_a_stages_configmap_mixing_job_apis_is_refused() -> None:
    cm = _configmap()
    cm["data"]["eval.yaml"] = yaml.safe_dump(
        stage_jobs(render_chart({"jobApi": "trainjob"}), "r1-grpo")["eval"]
    )
    with pytest.raises(ConfigError, match="all stages of a release use one job API"):
        parse_pipeline(cm, "r1-grpo")
    broken = stage_jobs(render_chart({"jobApi": "trainjob"}), "r1-grpo")["sft"]
    del broken["spec"]["runtimeRef"]
    cm = _configmap({"jobApi": "trainjob"})
    cm["data"]["sft.yaml"] = yaml.safe_dump(broken)
    with pytest.raises(ConfigError, match="sft.yaml: spec.runtimeRef.name is missing"):
        parse_pipeline(cm, "r1-grpo")


def _cond(kind: str, status: str = "True", message: str = "", at: str = "2026-12-07T03:00:00Z") -> dict:
    return {"type": kind, "status": status, "message": message, "lastTransitionTime": at}


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        ({}, "Submitted"),
        ({"conditions": [_cond("Suspended", message="TrainJob is suspended")]}, "Suspended"),
        (
            {"conditions": [_cond("Suspended", "False")], "jobsStatus": [{"name": "node", "active": 0}]},
            "Created",
        ),
        ({"jobsStatus": [{"name": "node", "active": 1, "ready": 1}]}, "Running"),
        ({"conditions": [_cond("Complete", message="jobset completed")]}, "Succeeded"),
        ({"conditions": [_cond("Complete"), _cond("Failed", message="jobset failed")]}, "Failed"),
    ],
)
def test_trainjob_status_maps_onto_the_controllers_phases(status: dict, phase: str) -> None:
    assert TRAINJOB.phase({"status": status})[0] == phase


def test_adapters_count_pods_and_find_them() -> None:
    assert TRAINJOB.replicas({"spec": {"trainer": {"numNodes": 3}}}) == 3
    assert (
        PYTORCHJOB.replicas(
            {"spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1}, "Worker": {"replicas": 2}}}}
        )
        == 3
    )
    assert TRAINJOB.pod_selector("r1-sft-2") == "jobset.sigs.k8s.io/jobset-name=r1-sft-2"
    assert PYTORCHJOB.pod_selector("r1-sft-2") == "training.kubeflow.org/job-name=r1-sft-2"
    assert kind_of({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob"}) is TRAINJOB
    assert kind_of({"apiVersion": "kubeflow.org/v1", "kind": "TFJob"}) is None


def test_workload_reasons() -> None:
    pending = {
        "status": {
            "conditions": [
                _cond(
                    "QuotaReserved",
                    "False",
                    "couldn't assign flavors to pod set node: insufficient quota for nvidia.com/gpu in flavor "
                    "default-flavor, previously considered podsets requests (0) + current podset request (8) > "
                    "maximum capacity (4)",
                )
            ]
        }
    }
    assert not workload_admitted(pending)
    assert "insufficient quota for nvidia.com/gpu" in workload_wait_reason(pending)
    evicted = {"status": {"conditions": [_cond("Evicted", message="Preempted to accommodate a workload")]}}
    assert workload_wait_reason(evicted) == "evicted: Preempted to accommodate a workload"
    assert workload_admitted({"status": {"conditions": [_cond("QuotaReserved"), _cond("Admitted")]}})


def test_an_item_with_its_own_timeout_is_reported_after_it() -> None:
    pipeline = parse_pipeline(_configmap(), "r1-grpo")
    config = ControllerConfig(
        "r1-grpo", "default", "r1-grpo-stages", "r1-grpo-status", pending_timeout_seconds=1800
    )
    item = PendingItem("job/r1-grpo-sft-1/no-kueue-workload", T0, "no Workload", timeout=120)
    world = World(T0 + timedelta(seconds=60), pipeline, {}, {}, (item,), {}, RunStatus("r1-grpo", "default"))
    assert _report_or_wait(world, config, "sft", (item,)) == Wait(T0 + timedelta(seconds=120))
    later = World(T0 + timedelta(seconds=121), pipeline, {}, {}, (item,), {}, RunStatus("r1-grpo", "default"))
    assert _report_or_wait(later, config, "sft", (item,)) == ReportPending("sft", (item,))
