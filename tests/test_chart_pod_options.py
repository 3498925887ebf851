"""Pod escape hatches and the read-only weights volume (issue 25, items 1 and 4), rendered by helm.

podLabels, podAnnotations, extraVolumes, extraVolumeMounts, hostNetwork and dnsPolicy, global and per stage
(maps merge with the stage's key winning, lists append, scalars override), controller.podLabels /
podAnnotations, reserved keys refused at render time, and model.existingClaim + subPath mounted read-only
as the base model. Each is checked on the rendering, strictly against the Kubernetes schemas (the
training pods too, as Pods), the SDK models and the PyTorchJob CRD, and shown to leave the default
rendering untouched when off.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest

from tests.support.helmtool import (
    CHART_DIR,
    HelmError,
    find_doc,
    helm_binaries,
    lint_chart,
    render_chart_text,
    run_helm,
    stage_jobs,
)
from tests.test_chart import (
    DEFAULTS,
    _as_pods,
    controller_job,
    crd_errors,
    crd_validator,  # noqa: F401 (a fixture)
    helm,  # noqa: F401 (a fixture)
    k8s_errors,
    rendered,
    sdk_errors,
    sdk_round_trip,
    trainer_flags,
)
from trainer.contract.stages import STAGES, PipelineConfig, StageConfig, plan
from trainer.executors.kubernetes.spec import parse_pipeline

MULTUS = "k8s.v1.cni.cncf.io/networks"
DEV_IB = {"name": "devinf", "hostPath": {"path": "/dev/infiniband", "type": "Directory"}}
CA = {"name": "site-ca", "configMap": {"name": "site-ca-bundle", "defaultMode": 292}}

# Every new option at once: global values, and per-stage values that merge with, extend or override them.
ALL_ON = {
    "podLabels": {"team": "ml", "cost-center": "gpu"},
    "podAnnotations": {MULTUS: "rdma-net0", "sidecar.istio.io/inject": "false"},
    "extraVolumes": [CA],
    "extraVolumeMounts": [{"name": "site-ca", "mountPath": "/etc/site-ca", "readOnly": True}],
    "hostNetwork": True,
    "placement": {"priorityClassName": "training-high", "schedulerName": "site-scheduler"},
    "controller": {
        "podLabels": {"team": "platform"},
        "podAnnotations": {"sidecar.istio.io/inject": "false"},
        "priorityClassName": "system-jobs",
    },
    "stages": {
        "sft": {
            "nodes": 2,
            "podLabels": {"team": "sft-owners"},
            "extraVolumes": [DEV_IB],
            "extraVolumeMounts": [{"name": "devinf", "mountPath": "/dev/infiniband"}],
        },
        "grpo": {"podAnnotations": {MULTUS: "rdma-net0,rdma-net1"}, "dnsPolicy": "Default"},
        "eval": {"hostNetwork": False, "placement": {"priorityClassName": "eval-low"}},
    },
}

# The same options at their "off" values: what a user gets without setting any of them.
ALL_OFF = {
    "podLabels": {},
    "podAnnotations": {},
    "extraVolumes": [],
    "extraVolumeMounts": [],
    "hostNetwork": False,
    "dnsPolicy": "",
    "model": {"existingClaim": "", "subPath": "", "mountPath": "/model"},
    "controller": {"podLabels": {}, "podAnnotations": {}},
    "stages": {
        s: {
            "podLabels": {},
            "podAnnotations": {},
            "extraVolumes": [],
            "extraVolumeMounts": [],
            "hostNetwork": None,
            "dnsPolicy": None,
        }
        for s in STAGES
    },
}

WEIGHTS = {"model": {"nameOrPath": "", "existingClaim": "qwen-weights", "subPath": "Qwen2.5-7B-Instruct"}}


def _templates(job: dict) -> dict[str, dict]:
    return {name: spec["template"] for name, spec in job["spec"]["pytorchReplicaSpecs"].items()}


def _user_annotations(metadata: dict) -> dict[str, str]:
    return {k: v for k, v in metadata.get("annotations", {}).items() if not k.startswith("checkov.io/")}


def _model_flag(job: dict) -> str:
    _, _, flags = trainer_flags(job)
    return flags[flags.index("--model_name_or_path") + 1]


def test_labels_and_annotations_merge_global_and_stage_on_every_replica() -> None:
    jobs = stage_jobs(rendered(ALL_ON))
    assert set(_templates(jobs["sft"])) == {"Master", "Worker"}
    expected_labels = {
        "sft": {"team": "sft-owners", "cost-center": "gpu"},  # the stage's key wins, the rest merges
        "grpo": {"team": "ml", "cost-center": "gpu"},
        "eval": {"team": "ml", "cost-center": "gpu"},
    }
    expected_annotations = {
        "sft": {MULTUS: "rdma-net0", "sidecar.istio.io/inject": "false"},
        "grpo": {MULTUS: "rdma-net0,rdma-net1", "sidecar.istio.io/inject": "false"},
        "eval": {MULTUS: "rdma-net0", "sidecar.istio.io/inject": "false"},
    }
    for stage, job in jobs.items():
        for replica, template in _templates(job).items():
            labels = template["metadata"]["labels"]
            # The chart's own labels are all still there, unchanged.
            assert labels["app.kubernetes.io/component"] == "training" and labels["r1-grpo.io/stage"] == stage
            assert labels["app.kubernetes.io/instance"] == "r1-grpo"
            own = {k: v for k, v in labels.items() if "/" not in k}
            assert own == expected_labels[stage], (stage, replica)
            assert _user_annotations(template["metadata"]) == expected_annotations[stage], (stage, replica)
            # The chart's security-review annotations stay.
            assert "checkov.io/skip-liveness" in template["metadata"]["annotations"]


def test_volumes_and_mounts_append_stage_after_global() -> None:
    jobs = stage_jobs(rendered(ALL_ON))
    for stage, job in jobs.items():
        for replica, template in _templates(job).items():
            spec = template["spec"]
            names = [v["name"] for v in spec["volumes"]]
            (container,) = spec["containers"]
            mounts = [(m["name"], m["mountPath"]) for m in container["volumeMounts"]]
            chart_mounts = [("checkpoints", "/checkpoints"), ("dshm", "/dev/shm"), ("tmp", "/tmp")]
            if stage == "sft":
                assert names == ["checkpoints", "dshm", "tmp", "site-ca", "devinf"], replica
                assert mounts == [*chart_mounts, ("site-ca", "/etc/site-ca"), ("devinf", "/dev/infiniband")]
                assert spec["volumes"][-2:] == [CA, DEV_IB]
            else:
                assert names == ["checkpoints", "dshm", "tmp", "site-ca"], (stage, replica)
                assert mounts == [*chart_mounts, ("site-ca", "/etc/site-ca")], (stage, replica)
            assert {"name": "site-ca", "mountPath": "/etc/site-ca", "readOnly": True} in container[
                "volumeMounts"
            ]


def test_host_network_dns_policy_and_scheduling_override_per_stage() -> None:
    jobs = stage_jobs(rendered(ALL_ON))
    expected = {
        # hostNetwork without a dnsPolicy: ClusterFirstWithHostNet, so the Master's Service still resolves.
        "sft": (True, "ClusterFirstWithHostNet", "training-high"),
        "grpo": (True, "Default", "training-high"),
        "eval": (None, None, "eval-low"),  # the stage turns hostNetwork off: Kubernetes' defaults
    }
    for stage, job in jobs.items():
        for replica, template in _templates(job).items():
            spec = template["spec"]
            got = (spec.get("hostNetwork"), spec.get("dnsPolicy"), spec["priorityClassName"])
            assert got == expected[stage], (stage, replica)
            assert spec["schedulerName"] == "site-scheduler"
    # A global dnsPolicy applies without hostNetwork too; a stage's hostNetwork alone turns it on there.
    jobs = stage_jobs(rendered({"dnsPolicy": "ClusterFirst", "stages": {"grpo": {"hostNetwork": True}}}))
    spec = {stage: _templates(job)["Master"]["spec"] for stage, job in jobs.items()}
    assert [(s.get("hostNetwork"), s["dnsPolicy"]) for s in spec.values()] == [
        (None, "ClusterFirst"),
        (True, "ClusterFirst"),
        (None, "ClusterFirst"),
    ]


def test_controller_gets_only_its_own_labels_annotations_and_priority() -> None:
    docs = rendered(ALL_ON)
    controller = controller_job(docs)
    template = controller["spec"]["template"]
    assert template["metadata"]["labels"] == {
        "app.kubernetes.io/name": "r1-grpo",
        "app.kubernetes.io/instance": "r1-grpo",
        "app.kubernetes.io/component": "controller",
        "team": "platform",
    }
    assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    spec = template["spec"]
    assert spec["priorityClassName"] == "system-jobs"
    assert "hostNetwork" not in spec and "dnsPolicy" not in spec and "schedulerName" not in spec
    assert [v["name"] for v in spec["volumes"]] == ["checkpoints", "tmp"]
    # The helm test pod is not touched either.
    test_pod = next(d for d in docs if d["kind"] == "Pod")
    assert "hostNetwork" not in test_pod["spec"] and "team" not in test_pod["metadata"].get("labels", {})
    # A changed pod template is a new controller Job name (the template is immutable on upgrade).
    assert controller["metadata"]["name"] != controller_job(rendered())["metadata"]["name"]


def test_options_off_render_byte_identical_to_the_defaults() -> None:
    assert render_chart_text(ALL_OFF) == render_chart_text(None)


def test_all_options_on_validate_strictly_and_lint(
    crd_validator: jsonschema.protocols.Validator,  # noqa: F811
) -> None:
    for values in (ALL_ON, WEIGHTS, {**ALL_ON, **WEIGHTS}):
        docs = rendered(values)
        errors = [e for doc in docs for e in k8s_errors(doc)]
        for stage, job in stage_jobs(docs).items():
            errors += [e for pod in _as_pods(job) for e in k8s_errors(pod)]
            errors += [f"{stage} (SDK models): {e}" for e in sdk_errors(job)]
            errors += [f"{stage} (CRD): {e}" for e in crd_errors(crd_validator, job)]
            if sdk_round_trip(job) != job:
                errors.append(f"{stage}: the SDK round trip changed the job")
        assert not errors, "\n".join(errors)
    texts = {version: render_chart_text(ALL_ON, helm=path) for version, path in helm_binaries().items()}
    assert len(set(texts.values())) == 1, list(texts)
    for path in helm_binaries().values():
        output = lint_chart({**ALL_ON, **WEIGHTS}, helm=path)
        assert "0 chart(s) failed" in output and "[WARNING]" not in output


def test_validator_negative_control_sees_a_bad_extra_volume() -> None:
    """The strict Pod check above does look inside extraVolumes: a mistyped source is an error."""
    job = stage_jobs(rendered(ALL_ON))["sft"]
    pod = _as_pods(job)[0]
    next(v for v in pod["spec"]["volumes"] if v["name"] == "devinf")["hostPath"]["kind"] = "Directory"
    assert k8s_errors(pod)


# ---- model.existingClaim -----------------------------------------------------------------------------


def test_weights_claim_mounted_read_only_into_the_stage_that_starts_from_it() -> None:
    docs = rendered(WEIGHTS)
    jobs = stage_jobs(docs)
    assert _model_flag(jobs["sft"]) == "/model"
    for replica, template in _templates(jobs["sft"]).items():
        spec = template["spec"]
        assert {
            "name": "model",
            "persistentVolumeClaim": {"claimName": "qwen-weights", "readOnly": True},
        } in spec["volumes"], replica
        (container,) = spec["containers"]
        assert {
            "name": "model",
            "mountPath": "/model",
            "readOnly": True,
            "subPath": "Qwen2.5-7B-Instruct",
        } in container["volumeMounts"]
    # Later stages start from the previous stage's output and do not mount the weights.
    for stage in ("grpo", "eval"):
        spec = _templates(jobs[stage])["Master"]["spec"]
        assert "model" not in [v["name"] for v in spec["volumes"]], stage
    assert _model_flag(jobs["grpo"]) == "/checkpoints/r1-grpo/sft"
    pipeline = find_doc(docs, "ConfigMap", "r1-grpo-stages")
    pipeline["metadata"]["namespace"] = "default"
    parsed = parse_pipeline(pipeline, "r1-grpo")
    assert [s.model_from for s in parsed.stages] == [
        "/model",
        "/checkpoints/r1-grpo/sft",
        "/checkpoints/r1-grpo/grpo",
    ]


@pytest.mark.parametrize("enabled", [("grpo", "eval"), ("eval",), ("sft", "eval")], ids="+".join)
def test_weights_claim_follows_the_lineage_rule(enabled: tuple[str, ...]) -> None:
    """The stage that starts from the base model gets the mount; the chart's lineage equals the Python one."""
    values = {
        "model": {
            "nameOrPath": "/weights/qwen2.5-7b",
            "existingClaim": "team-models",
            "mountPath": "/weights",
        },
        "stages": {s: {"enabled": s in enabled} for s in STAGES},
    }
    jobs = stage_jobs(rendered(values))
    runs = plan(
        PipelineConfig(
            release="r1-grpo",
            root="/checkpoints",
            model="/weights/qwen2.5-7b",
            stages={s: StageConfig(enabled=s in enabled) for s in STAGES},
        )
    )
    assert list(jobs) == [run.name for run in runs] == list(enabled)
    for run in runs:
        job = jobs[run.name]
        assert _model_flag(job) == run.model_name_or_path
        spec = _templates(job)["Master"]["spec"]
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        if run.model_from_stage is None:
            assert mounts["model"] == {"name": "model", "mountPath": "/weights", "readOnly": True}, run.name
        else:
            assert "model" not in mounts, run.name


def test_weights_claim_defaults_leave_the_model_chain_alone() -> None:
    """Without a claim the base model is nameOrPath as before, and no pod mounts a model volume."""
    jobs = stage_jobs(rendered({"model": {"nameOrPath": "/checkpoints/base/qwen"}}))
    assert _model_flag(jobs["sft"]) == "/checkpoints/base/qwen"
    for job in jobs.values():
        assert "model" not in [v["name"] for v in _templates(job)["Master"]["spec"]["volumes"]]
    assert DEFAULTS["model"] == {
        "nameOrPath": "Qwen/Qwen2.5-1.5B-Instruct",
        "existingClaim": "",
        "subPath": "",
        "mountPath": "/model",
    }


# ---- bad values --------------------------------------------------------------------------------------


def _with_weights(**model: str) -> dict:
    return {"model": {"existingClaim": "qwen-weights", **model}}


BAD = [
    # Reserved keys, global, per stage and on the controller.
    ({"podLabels": {"r1-grpo.io/stage": "x"}}, 'podLabels: "r1-grpo.io/stage" is reserved'),
    (
        {"podLabels": {"app.kubernetes.io/instance": "x"}},
        'podLabels: "app.kubernetes.io/instance" is reserved',
    ),
    (
        {"stages": {"grpo": {"podLabels": {"kueue.x-k8s.io/queue-name": "q"}}}},
        'stages.grpo.podLabels: "kueue.x-k8s.io/queue-name" is reserved',
    ),
    (
        {"stages": {"eval": {"podAnnotations": {"scheduling.k8s.io/group-name": "g"}}}},
        'stages.eval.podAnnotations: "scheduling.k8s.io/group-name" is reserved',
    ),
    (
        {"podAnnotations": {"checkov.io/skip-liveness": "x"}},
        'podAnnotations: "checkov.io/skip-liveness" is reserved',
    ),
    (
        {"controller": {"podLabels": {"app.kubernetes.io/component": "x"}}},
        'controller.podLabels: "app.kubernetes.io/component" is reserved',
    ),
    (
        {"controller": {"podAnnotations": {"training.kubeflow.org/job-name": "x"}}},
        'controller.podAnnotations: "training.kubeflow.org/job-name" is reserved',
    ),
    # Volumes and mounts that clash or dangle.
    ({"extraVolumes": [{"name": "tmp", "emptyDir": {}}]}, 'extraVolumes: volume name "tmp" is already used'),
    (
        {"extraVolumes": [CA], "stages": {"sft": {"extraVolumes": [CA]}}},
        'stages.sft.extraVolumes: volume name "site-ca" is already used',
    ),
    (
        {
            "rewards": {"files": {"brevity.py": "def brevity(r, g):\n    return 0.0\n"}},
            "extraVolumes": [{"name": "rewards", "emptyDir": {}}],
        },
        'extraVolumes: volume name "rewards" is already used',
    ),
    (
        {
            "rewards": {"files": {"brevity.py": "def brevity(r, g):\n    return 0.0\n"}},
            "extraVolumes": [CA],
            "extraVolumeMounts": [{"name": "site-ca", "mountPath": "/etc/r1-grpo/rewards"}],
        },
        'extraVolumeMounts: mountPath "/etc/r1-grpo/rewards" is already mounted',
    ),
    (
        {"extraVolumeMounts": [{"name": "nope", "mountPath": "/x"}]},
        'extraVolumeMounts: mount of "nope" names no volume',
    ),
    (
        {"extraVolumes": [CA], "extraVolumeMounts": [{"name": "site-ca", "mountPath": "/tmp"}]},
        'extraVolumeMounts: mountPath "/tmp" is already mounted in the stages.sft pods (volume tmp)',
    ),
    (
        {
            **WEIGHTS,
            "extraVolumes": [CA],
            "stages": {"sft": {"extraVolumeMounts": [{"name": "site-ca", "mountPath": "/model"}]}},
        },
        'stages.sft.extraVolumeMounts: mountPath "/model" is already mounted',
    ),
    # Schema: types, shapes and names.
    ({"hostNetwork": "yes"}, "hostNetwork"),
    ({"stages": {"sft": {"hostNetwork": 1}}}, "hostNetwork"),
    ({"dnsPolicy": "None"}, "dnsPolicy"),
    ({"podLabels": {"team": "not a label value"}}, "podLabels"),
    ({"podLabels": {"bad key!": "x"}}, "podLabels"),
    ({"podAnnotations": {"a": 1}}, "podAnnotations"),
    ({"extraVolumes": [{"emptyDir": {}}]}, "extraVolumes"),
    ({"extraVolumes": [{"name": "lonely"}]}, "extraVolumes"),
    ({"extraVolumeMounts": [{"name": "x", "mountPath": "/x", "readonly": True}]}, "readonly"),
    ({"extraVolumeMounts": [{"name": "x", "mountPath": "relative"}]}, "mountPath"),
    ({"stages": {"sft": {"podAnnotation": {}}}}, "podAnnotation"),
    ({"controller": {"hostNetwork": True}}, "hostNetwork"),
    # model.existingClaim combinations.
    (
        _with_weights(),
        'model.nameOrPath "Qwen/Qwen2.5-1.5B-Instruct" with model.existingClaim "qwen-weights"',
    ),
    (
        _with_weights(nameOrPath="/checkpoints/base"),
        'set nameOrPath to "" (the mount itself) or to a folder under /model/',
    ),
    ({"model": {"subPath": "qwen"}}, 'model.subPath "qwen" needs model.existingClaim'),
    (
        _with_weights(nameOrPath="", mountPath="/checkpoints/model"),
        'model.mountPath "/checkpoints/model" overlaps /checkpoints',
    ),
    (_with_weights(nameOrPath="", mountPath="/tmp"), 'model.mountPath "/tmp" overlaps /tmp'),
    (_with_weights(nameOrPath="", subPath="/abs"), "subPath"),
    ({"model": {"existingClaim": "Bad_Claim", "nameOrPath": ""}}, "existingClaim"),
    (
        {"model": {"nameOrPath": "/data/qwen"}},
        'model.nameOrPath "/data/qwen" is a path outside storage.mountPath',
    ),
]


@pytest.mark.parametrize(("values", "message"), BAD, ids=[m[:60] for _, m in BAD])
def test_bad_values_fail_with_the_field_named(helm: Path, values: dict, message: str) -> None:  # noqa: F811
    with pytest.raises(HelmError) as failure:
        run_helm(["template", "r1-grpo", str(CHART_DIR)], values=values, helm=helm)
    assert message in failure.value.output, failure.value.output


def test_schema_names_the_weights_claim_as_a_model_source(helm: Path) -> None:  # noqa: F811
    """Eval alone with neither a model nor a claim: the schema's message offers model.existingClaim."""
    values = {"model": {"nameOrPath": ""}, "stages": {"sft": {"enabled": False}, "grpo": {"enabled": False}}}
    with pytest.raises(HelmError) as failure:
        run_helm(["template", "r1-grpo", str(CHART_DIR)], values=values, helm=helm)
    assert "or model.existingClaim" in failure.value.output
    claim = copy.deepcopy(values)
    claim["model"]["existingClaim"] = "weights"
    run_helm(["template", "r1-grpo", str(CHART_DIR)], values=claim, helm=helm)
