"""Chart options for preemption, multi-node fabrics and queues (issue 13, items 8 and 10), rendered by helm.

The training pods' grace period (global, per-stage override), extended resources for RDMA/InfiniBand/EFA
devices, the IPC_LOCK capability, Volcano's PodGroup priority and the controller Job's own Kueue queue.
Each option is checked on the rendering, strictly against the Kubernetes schemas and the PyTorchJob CRD
(where ../shared has it), and shown to leave the default rendering untouched when off.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.support.helmtool import HelmError, render_chart_text, run_helm, stage_jobs
from tests.test_chart import (
    DEFAULTS,
    GPU,
    controller_job,
    crd_errors,
    crd_validator,  # noqa: F401 (a fixture)
    helm,  # noqa: F401 (a fixture)
    k8s_errors,
    pod_specs,
    rendered,
    sdk_errors,
)

# Every new option switched on at once: a two-node SFT stage on an RDMA fabric, Volcano with priorities,
# the controller in its own LocalQueue.
ALL_ON = {
    "terminationGracePeriodSeconds": 900,
    "ipcLock": True,
    "volcano": {"enabled": True, "queue": "training"},
    "placement": {"priorityClassName": "training-high"},
    "controller": {"queueName": "controllers"},
    "stages": {
        "sft": {
            "nodes": 2,
            "terminationGracePeriodSeconds": 1800,
            "resources": {"extra": {"rdma/ib": 1, "vpc.amazonaws.com/efa": "4"}},
        },
        "eval": {"placement": {"priorityClassName": "eval-low"}},
    },
}

# The same options at their "off" values: what a user gets without setting any of them.
ALL_OFF = {
    "ipcLock": False,
    "controller": {"queueName": ""},
    "stages": {
        s: {"terminationGracePeriodSeconds": None, "resources": {"extra": {}}} for s in DEFAULTS["stages"]
    },
}


def _replicas(job: dict) -> dict[str, dict]:
    return {name: spec["template"]["spec"] for name, spec in job["spec"]["pytorchReplicaSpecs"].items()}


def _launcher_grace(spec: dict) -> int:
    """The grace period the pod's first process, `r1-grpo launch`, gives the trainers (trainer/launch.py)."""
    (container,) = spec["containers"]
    launcher, flag, end, torchrun = container["command"][:2], *container["command"][2:]
    assert [launcher, end, torchrun] == [["r1-grpo", "launch"], "--", "torchrun"], container["command"]
    name, _, value = flag.partition("=")
    assert name == "--termination-grace-period-seconds", flag
    return int(value)


def test_default_grace_period_is_on_every_training_pod_and_only_there() -> None:
    docs = rendered()
    specs = pod_specs(docs)
    training = {k: v for k, v in specs.items() if k.startswith("PyTorchJob/")}
    assert len(training) == 3, training.keys()
    for where, spec in training.items():
        assert spec["terminationGracePeriodSeconds"] == DEFAULTS["terminationGracePeriodSeconds"] == 600, (
            where
        )
        assert _launcher_grace(spec) == 600, where
    # The controller stops after its current step within Kubernetes' default 30 s; it keeps that.
    for where, spec in specs.items():
        if not where.startswith("PyTorchJob/"):
            assert "terminationGracePeriodSeconds" not in spec, where


def test_grace_period_global_with_per_stage_override() -> None:
    jobs = stage_jobs(rendered(ALL_ON))
    for replica, spec in _replicas(jobs["sft"]).items():
        assert spec["terminationGracePeriodSeconds"] == _launcher_grace(spec) == 1800, replica
    assert set(_replicas(jobs["sft"])) == {"Master", "Worker"}
    for stage in ("grpo", "eval"):
        (spec,) = _replicas(jobs[stage]).values()
        assert spec["terminationGracePeriodSeconds"] == _launcher_grace(spec) == 900, stage
    # null globally: the field is left out (Kubernetes' 30 s), a stage can still set its own.
    jobs = stage_jobs(
        rendered(
            {"terminationGracePeriodSeconds": None, "stages": {"eval": {"terminationGracePeriodSeconds": 0}}}
        )
    )
    assert "terminationGracePeriodSeconds" not in _replicas(jobs["sft"])["Master"]
    assert (
        _launcher_grace(_replicas(jobs["sft"])["Master"]) == 30
    )  # Kubernetes' default, told to the launcher
    assert _replicas(jobs["eval"])["Master"]["terminationGracePeriodSeconds"] == 0
    assert _launcher_grace(_replicas(jobs["eval"])["Master"]) == 0


def test_extra_resources_in_requests_and_limits_of_every_pod() -> None:
    jobs = stage_jobs(rendered(ALL_ON))
    for replica, spec in _replicas(jobs["sft"]).items():
        (container,) = spec["containers"]
        expected = {"cpu": "32", "memory": "256Gi", GPU: "8", "rdma/ib": "1", "vpc.amazonaws.com/efa": "4"}
        assert container["resources"] == {"requests": expected, "limits": expected}, replica
    (grpo,) = _replicas(jobs["grpo"]).values()
    assert set(grpo["containers"][0]["resources"]["requests"]) == {"cpu", "memory", GPU}


def test_ipc_lock_adds_the_capability_and_keeps_drop_all() -> None:
    docs = rendered(ALL_ON)
    for where, spec in pod_specs(docs).items():
        (container,) = spec["containers"]
        caps = container["securityContext"]["capabilities"]
        if where.startswith("PyTorchJob/"):
            assert caps == {"drop": ["ALL"], "add": ["IPC_LOCK"]}, where
        else:  # the controller and the helm-test pod never get it
            assert caps == {"drop": ["ALL"]}, where
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["privileged"] is False, where
    # A capability the user already adds is kept, and IPC_LOCK is not doubled.
    own = copy.deepcopy(DEFAULTS["containerSecurityContext"])
    own["capabilities"]["add"] = ["IPC_LOCK", "NET_BIND_SERVICE"]
    job = stage_jobs(rendered({"ipcLock": True, "containerSecurityContext": own}))["sft"]
    caps = _replicas(job)["Master"]["containers"][0]["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["IPC_LOCK", "NET_BIND_SERVICE"]}


def test_volcano_pod_group_priority_follows_the_stage_priority_class() -> None:
    jobs = stage_jobs(rendered(ALL_ON))
    assert jobs["sft"]["spec"]["runPolicy"]["schedulingPolicy"] == {
        "minAvailable": 2,
        "queue": "training",
        "priorityClass": "training-high",
    }
    assert jobs["eval"]["spec"]["runPolicy"]["schedulingPolicy"]["priorityClass"] == "eval-low"
    assert _replicas(jobs["eval"])["Master"]["priorityClassName"] == "eval-low"
    # Without a priorityClassName the PodGroup has none; without Volcano there is no schedulingPolicy.
    plain = stage_jobs(rendered({"volcano": {"enabled": True}}))["sft"]
    assert plain["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 1}
    no_volcano = stage_jobs(rendered({"placement": {"priorityClassName": "training-high"}}))["sft"]
    assert "schedulingPolicy" not in no_volcano["spec"]["runPolicy"]


def test_controller_queue_label_only_on_the_controller_job() -> None:
    docs = rendered(ALL_ON)
    controller = controller_job(docs)
    assert controller["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "controllers"
    # Kueue reads the Job's label; the pod template (immutable on upgrade) is not touched.
    assert "kueue.x-k8s.io/queue-name" not in controller["spec"]["template"]["metadata"]["labels"]
    for stage, job in stage_jobs(docs).items():
        assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"], stage
    # Training jobs keep their own queue, independent of the controller's.
    both = rendered(
        {"kueue": {"enabled": True, "queueName": "gpu"}, "controller": {"queueName": "controllers"}}
    )
    assert controller_job(both)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "controllers"
    assert all(
        j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu" for j in stage_jobs(both).values()
    )


def test_all_options_on_validate_strictly(crd_validator: jsonschema.protocols.Validator) -> None:  # noqa: F811
    docs = rendered(ALL_ON)
    errors = [e for doc in docs for e in k8s_errors(doc)]
    for stage, job in stage_jobs(docs).items():
        errors += [f"{stage} (SDK models): {e}" for e in sdk_errors(job)]
        errors += [f"{stage} (CRD): {e}" for e in crd_errors(crd_validator, job)]
    assert not errors, "\n".join(errors)


def test_options_off_render_byte_identical_to_the_defaults() -> None:
    """Setting every new option to its off value changes nothing; the grace period is the only new default
    (the pods' field, and the launcher's flag, which says Kubernetes' 30 s without it)."""
    default = render_chart_text(None)
    assert render_chart_text(ALL_OFF) == default
    without_grace = render_chart_text({"terminationGracePeriodSeconds": None})
    added = [line for line in default.splitlines() if line not in without_grace.splitlines()]
    removed = [line for line in without_grace.splitlines() if line not in default.splitlines()]
    assert sorted(line.strip() for line in added) == sorted(
        ["- --termination-grace-period-seconds=600", "terminationGracePeriodSeconds: 600"] * 3
    ), added
    assert [line.strip() for line in removed] == ["- --termination-grace-period-seconds=30"] * 3, removed
    kept = [line for line in without_grace.splitlines() if line not in removed]
    assert sorted(default.splitlines()) == sorted(kept + added)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"terminationGracePeriodSeconds": -1}, "terminationGracePeriodSeconds"),
        ({"stages": {"sft": {"terminationGracePeriodSeconds": "10m"}}}, "terminationGracePeriodSeconds"),
        ({"ipcLock": "yes"}, "ipcLock"),
        ({"stages": {"sft": {"resources": {"extra": {"ib": 1}}}}}, "extra"),
        ({"stages": {"sft": {"resources": {"extra": {"rdma/ib": "one"}}}}}, "extra"),
        ({"stages": {"sft": {"resources": {"extra": {"rdma/ib": -1}}}}}, "extra"),
        (
            {"stages": {"sft": {"resources": {"extra": {GPU: 8}}}}},
            "stages.sft.resources.extra: nvidia.com/gpu",
        ),
        ({"controller": {"queueName": "Not A Queue"}}, "queueName"),
    ],
)
def test_bad_option_values_fail_with_the_field_named(
    helm: Path,  # noqa: F811
    values: dict,
    message: str,
) -> None:
    with pytest.raises(HelmError) as failure:
        run_helm(
            ["template", "r1-grpo", str(Path(__file__).parents[1] / "charts" / "r1-grpo")],
            values=values,
            helm=helm,
        )
    assert message in str(failure.value), str(failure.value)


def test_values_document_the_grace_period_arithmetic_and_pod_security_levels() -> None:
    """The reasons live in values.yaml; the numbers there must add up to the default."""
    text = (Path(__file__).parents[1] / "charts" / "r1-grpo" / "values.yaml").read_text()
    params = 1.54e9
    weights_gb, optimizer_gb = params * 2 / 1e9, params * 12 / 1e9
    assert f"= {weights_gb:.1f} GB" in text and f"= {optimizer_gb:.1f} GB" in text
    assert f"{weights_gb + optimizer_gb:.1f} GB / 100 MB/s" in text
    assert "needs a namespace at `privileged`" in text and "needs `baseline`" in text
    readme = (Path(__file__).parents[1] / "manifests" / "README.md").read_text()
    assert "baseline" in readme and "privileged" in readme and "restricted" in readme
    assert yaml.safe_load(text)["ipcLock"] is False
