"""charts/r1-grpo and manifests/, checked with the real helm 3 and 4 binaries (tests/support/helmtool.py).

Every rendered Kubernetes resource is validated strictly (kubernetes-validate), every PyTorchJob of the
stages ConfigMap strictly against the kubeflow-training SDK models and, when ../shared has it, the
PyTorchJob CRD schema. Bad values must fail with the schema's message; checkov reviews the rendering.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import jsonschema
import kubeflow.training.models as kf_models
import kubernetes.client.models as k8s_models
import kubernetes_validate
import pytest
import yaml
from kubeflow.training.api_client import ApiClient

from tests.support.helmtool import (
    CHART_DIR,
    MANIFESTS_DIR,
    REPO_ROOT,
    HelmError,
    checkov_report,
    find_doc,
    generate_manifests,
    helm_binaries,
    launches_torchrun,
    lint_chart,
    manifests_drift,
    render_chart,
    render_chart_text,
    run_helm,
    stage_jobs,
    write_manifests,
)
from trainer.contract.prepared import OFFLINE_ENV
from trainer.contract.stages import (
    STAGE_MODULES,
    STAGES,
    PipelineConfig,
    StageConfig,
    args_to_cli,
    model_sources,
    plan,
)
from trainer.executors.kubernetes.spec import ConfigError as SpecConfigError
from trainer.executors.kubernetes.spec import parse_pipeline

DEFAULTS: dict[str, Any] = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
GPU = "nvidia.com/gpu"
# The variables the training operator (v1.9) sets in every PyTorchJob pod that torchrun is pointed at.
OPERATOR_VARIABLES = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "MASTER_ADDR", "MASTER_PORT"}
# Kubernetes versions to validate against: the chart's kubeVersion floor and the newest known.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


def _gpus(n: int, cpu: str = "8", memory: str = "64Gi") -> dict:
    return {"resources": {"gpu": n, "cpu": cpu, "memory": memory}}


# The value sets a user is expected to use; each must lint, render and validate.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "single-gpu": {
        "stages": {"sft": _gpus(1), "grpo": _gpus(1), "eval": _gpus(1)},
        "storage": {"accessModes": ["ReadWriteOnce"], "storageClass": "standard-rwo", "size": "100Gi"},
    },
    "multi-node-2x8": {
        "stages": {
            "sft": {"nodes": 2, **_gpus(8, "64", "512Gi")},
            "grpo": {"nodes": 2, **_gpus(8, "64", "512Gi")},
        },
        "storage": {"storageClass": "nfs"},
    },
    "existing-claim": {"storage": {"existingClaim": "team-checkpoints", "mountPath": "/data"}},
    "kueue": {"kueue": {"enabled": True, "queueName": "gpu-queue", "priorityClass": "high"}},
    "volcano": {"volcano": {"enabled": True, "queue": "training"}, "stages": {"grpo": {"nodes": 4}}},
    "eval-disabled": {"stages": {"eval": {"enabled": False}}},
    "wandb": {
        "wandb": {"enabled": True, "existingSecret": "wandb-api", "entity": "my-team"},
        "hub": {"existingSecret": "hf-token"},
    },
    "grpo-only-from-volume": {
        "model": {"nameOrPath": "/checkpoints/base-models/qwen2.5-1.5b"},
        "stages": {"sft": {"enabled": False}, "eval": {"enabled": False}},
        "image": {"digest": "sha256:" + "ab" * 32, "pullPolicy": "Always", "pullSecrets": ["regcred"]},
        "serviceAccount": {"create": False, "name": "ml-workloads"},
        "networkPolicy": {"enabled": False},
        "tests": {"enabled": False},
    },
    "placement-and-cpu-only-eval": {
        "placement": {
            "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
            "priorityClassName": "training",
        },
        "stages": {
            "eval": {
                "resources": {"gpu": 0, "cpu": "16", "memory": "32Gi"},
                "placement": {"nodeSelector": {"pool": "cpu"}, "tolerations": []},
                "env": [{"name": "EVAL_TAG", "value": "nightly"}],
            }
        },
        "controller": {"nodeSelector": {"pool": "system"}},
    },
    # The day-one options together (issue 25): staging on a CPU pod, reward files, pod escape hatches.
    "prepare-rewards-pod-options": {
        "stages": {"prepare": {"enabled": True}},
        "hub": {"existingSecret": "hf-token"},
        "rewards": {"files": {"brevity.py": "def brevity(response, ground_truth):\n    return 0.0\n"}},
        "podLabels": {"team": "ml"},
        "podAnnotations": {"example.com/owner": "ml-platform"},
        "extraVolumes": [{"name": "site-ca", "configMap": {"name": "site-ca"}}],
        "extraVolumeMounts": [{"name": "site-ca", "mountPath": "/etc/site-ca", "readOnly": True}],
    },
}


def deep_merge(base: dict, override: dict) -> dict:
    """Helm's merge of user values over the defaults: maps merge, a null deletes, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="module", params=[3, 4], ids=["helm3", "helm4"])
def helm(request: pytest.FixtureRequest) -> Path:
    for version, path in helm_binaries().items():
        if version.startswith(f"{request.param}."):
            return path
    pytest.fail(f"no helm {request.param}.x among {helm_binaries()}")


_RENDERED: dict[str, list[dict]] = {}


def rendered(values: dict | None = None, release: str = "r1-grpo") -> list[dict]:
    """render_chart with the newest helm, cached (renders are identical across helm versions, tested)."""
    key = json.dumps([values, release], sort_keys=True)
    if key not in _RENDERED:
        _RENDERED[key] = render_chart(values or None, release=release)
    return copy.deepcopy(_RENDERED[key])


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Every pod spec the release creates: controller Job, helm-test Pod, each PyTorchJob replica."""
    out = {}
    for doc in docs:
        if doc["kind"] == "Job":
            out[f"Job/{doc['metadata']['name']}"] = doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            out[f"Pod/{doc['metadata']['name']}"] = doc["spec"]
    for job in stage_jobs(docs, release=_release_of(docs)).values():
        for replica, spec in job["spec"]["pytorchReplicaSpecs"].items():
            out[f"PyTorchJob/{job['metadata']['name']}/{replica}"] = spec["template"]["spec"]
    return out


def controller_job(docs: list[dict], release: str = "r1-grpo") -> dict:
    """The controller Job, `<release>-controller-<8 hex digits of its spec's hash>` (_controller-job.tpl)."""
    (job,) = [d for d in docs if d["kind"] == "Job"]
    assert re.fullmatch(rf"{release}-controller-[0-9a-f]{{8}}", job["metadata"]["name"]), job["metadata"][
        "name"
    ]
    return job


def _release_of(docs: list[dict]) -> str:
    return next(d for d in docs if d["kind"] == "ConfigMap")["metadata"]["labels"][
        "app.kubernetes.io/instance"
    ]


def trainer_flags(job: dict, replica: str = "Master") -> tuple[list[str], str, list[str]]:
    """(torchrun flags, module, the stage's own CLI flags) of a PyTorchJob's container."""
    container = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]
    args = container["args"]
    split = args.index("--module")
    return args[:split], args[split + 1], args[split + 2 :]


# ---- strict validators --------------------------------------------------------------------------------


def _sdk_model(name: str) -> type:
    model = getattr(kf_models, name, None) or getattr(k8s_models, name, None)
    if model is None:
        raise AssertionError(
            f"SDK type {name} is in neither kubeflow.training.models nor kubernetes.client.models"
        )
    return model


def sdk_errors(data: Any, type_name: str = "KubeflowOrgV1PyTorchJob", path: str = "") -> list[str]:
    """Every key checked against the SDK models' openapi_types / attribute_map: unknown keys are errors."""
    if data is None:
        return []
    if type_name.startswith("list["):
        if not isinstance(data, list):
            return [f"{path}: expected a list, got {type(data).__name__}"]
        return [e for i, item in enumerate(data) for e in sdk_errors(item, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith("dict("):
        inner = re.fullmatch(r"dict\(str, (.+)\)", type_name).group(1)
        if not isinstance(data, dict):
            return [f"{path}: expected a map, got {type(data).__name__}"]
        return [e for k, v in data.items() for e in sdk_errors(v, inner, f"{path}.{k}")]
    primitive = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str, "date": str}
    if type_name in primitive:
        ok = isinstance(data, primitive[type_name]) and not (type_name == "int" and isinstance(data, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {type(data).__name__} {data!r}"]
    if type_name == "object":
        return []
    model = _sdk_model(type_name)
    if not isinstance(data, dict):
        return [f"{path}: expected a {type_name} map, got {type(data).__name__}"]
    by_json_name = {json_name: attr for attr, json_name in model.attribute_map.items()}
    errors = []
    for key, value in data.items():
        if key not in by_json_name:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
        else:
            errors += sdk_errors(value, model.openapi_types[by_json_name[key]], f"{path}.{key}")
    return errors


def sdk_round_trip(job: dict) -> dict:
    """Deserialize with the SDK's ApiClient (model constructors check required fields) and serialize back."""
    client = ApiClient()
    model = client._ApiClient__deserialize(copy.deepcopy(job), "KubeflowOrgV1PyTorchJob")
    return client.sanitize_for_serialization(model)


def _strict(schema: Any) -> Any:
    """additionalProperties: false wherever properties are listed and unknown fields are not preserved."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in out
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validator(controlplane_build: Path) -> jsonschema.protocols.Validator:
    """The PyTorchJob CRD's v1 schema, made strict: the CRD the test control plane's operator installs,
    from the same pinned training-operator module (tests/controlplane/build.sh copies it)."""
    return _crd_validator(controlplane_build / "manifests" / "kubeflow.org_pytorchjobs.yaml")


@functools.cache
def _crd_validator(path: Path) -> jsonschema.protocols.Validator:
    # Built once per process for the four chart modules that use it: the CRD is 640 kB of YAML (6 s with
    # PyYAML's pure-Python loader on the CI machine, 1 s with libyaml's), the validator is stateless.
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(validator: jsonschema.protocols.Validator, job: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job)]


# kubernetes_validate reads and parses its JSON schema files (the definitions file is megabytes) on every
# validate() call: 0.14 s a document on the CI machine. The files are package data, so each is parsed once per
# process; what is validated, and how, is unchanged.
if not hasattr(kubernetes_validate.utils.schema_contents, "cache_info"):
    kubernetes_validate.utils.schema_contents = functools.cache(kubernetes_validate.utils.schema_contents)


def k8s_errors(doc: dict) -> list[str]:
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc.message}")
    return errors


# ---- helm lint / template with both helm versions -------------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_strict_passes(helm: Path, name: str) -> None:
    output = lint_chart(VALUE_SETS[name] or None, helm=helm)
    assert "1 chart(s) linted, 0 chart(s) failed" in output
    assert "[WARNING]" not in output and "[ERROR]" not in output


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm3_and_helm4_render_the_same(name: str) -> None:
    texts = {v: render_chart_text(VALUE_SETS[name] or None, helm=p) for v, p in helm_binaries().items()}
    assert len(texts) == 2, texts.keys()
    first, second = texts.values()
    assert first == second


def test_packages_with_both_helm_versions(helm: Path, tmp_path: Path) -> None:
    run_helm(["package", str(CHART_DIR), "--destination", str(tmp_path)], helm=helm)
    chart_meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    archive = tmp_path / f"r1-grpo-{chart_meta['version']}.tgz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"r1-grpo/Chart.yaml", "r1-grpo/values.yaml", "r1-grpo/values.schema.json"} <= names
    assert "r1-grpo/templates/stages-configmap.yaml" in names
    # The packaged chart is what users install: it must lint as well.
    lint = run_helm(["lint", "--strict", str(archive)], helm=helm)
    assert "0 chart(s) failed" in lint


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "r1-grpo"
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    # The image tag defaults to appVersion: keep it the package's version.
    assert re.search(rf'^version = "{re.escape(chart["appVersion"])}"$', pyproject, re.MULTILINE)


# ---- every rendered object is valid --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_resource_validates_strictly(name: str) -> None:
    """Kubernetes resources against the Kubernetes schemas, the stages' PyTorchJobs against the SDK models."""
    docs = rendered(VALUE_SETS[name])
    errors = [e for doc in docs for e in k8s_errors(doc)]
    jobs = stage_jobs(docs)
    assert jobs, "no stage rendered"
    for stage, job in jobs.items():
        errors += [f"{stage} (SDK models): {e}" for e in sdk_errors(job)]
        if sdk_round_trip(job) != job:
            errors.append(f"{stage}: the SDK round trip changed the job (a value of the wrong type?)")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_jobs_validate_against_the_crd_schema(
    crd_validator: jsonschema.protocols.Validator, name: str
) -> None:
    """The PyTorchJobs against the operator's CRD schema (that of the test control plane's operator)."""
    errors = [
        f"{stage}: {e}"
        for stage, job in stage_jobs(rendered(VALUE_SETS[name])).items()
        for e in crd_errors(crd_validator, job)
    ]
    assert not errors, "\n".join(errors)


def test_validators_reject_unknown_fields(crd_validator: jsonschema.protocols.Validator) -> None:
    """Negative control: the strict validators above do fail on an unknown or mistyped field."""
    job = stage_jobs(rendered())["sft"]
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    container["gpus"] = 8
    job["spec"]["runPolicy"]["backoffLimit"] = "three"
    sdk = sdk_errors(job)
    assert any(e.endswith(".gpus: unknown field of V1Container") for e in sdk), sdk
    assert any("backoffLimit: expected int" in e for e in sdk), sdk
    crd = crd_errors(crd_validator, job)
    assert any("gpus" in e for e in crd) and any("backoffLimit" in e for e in crd), crd
    controller = controller_job(rendered())
    controller["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    assert k8s_errors(controller)


def test_sdk_validator_requires_required_fields() -> None:
    job = stage_jobs(rendered())["eval"]
    del job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        sdk_round_trip(job)


# ---- bad values fail with the schema's (or the chart's) message ----------------------------------------

BAD_VALUES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "wrong type": ({"stages": {"sft": {"nodes": "two"}}}, [r"stages[./]sft[./]nodes", r"integer"]),
    "wrong type of a flag value": ({"stages": {"grpo": {"args": {"beta": {"value": 0.1}}}}}, [r"beta"]),
    "unknown top-level key": ({"replicas": 3}, [r"replicas", r"not allowed"]),
    "unknown stage key": ({"stages": {"grpo": {"gpus": 8}}}, [r"stages[./]grpo", r"gpus", r"not allowed"]),
    "grpo without a model source": (
        {"stages": {"sft": {"enabled": False}}, "model": {"nameOrPath": ""}},
        [r"model\.nameOrPath for GRPO to start from \(stages\.sft is disabled"],
    ),
    "eval alone without a model": (
        {"stages": {"sft": {"enabled": False}, "grpo": {"enabled": False}}, "model": {"nameOrPath": None}},
        [r"model\.nameOrPath for eval to evaluate"],
    ),
    "no stage enabled": (
        {"stages": {"sft": {"enabled": False}, "grpo": {"enabled": False}, "eval": {"enabled": False}}},
        [r"at least one enabled stage"],
    ),
    "wandb without a secret": (
        {"wandb": {"enabled": True}},
        [r"wandb\.existingSecret .*when wandb\.enabled is true"],
    ),
    "kueue without a queue": (
        {"kueue": {"enabled": True}},
        [r"kueue\.queueName .*when kueue\.enabled is true"],
    ),
    "kueue and volcano": (
        {"kueue": {"enabled": True, "queueName": "q"}, "volcano": {"enabled": True}},
        [r"only one of kueue\.enabled and volcano\.enabled"],
    ),
    "volcano with another scheduler": (
        {"volcano": {"enabled": True}, "placement": {"schedulerName": "kai-scheduler"}},
        [r"placement\.schedulerName empty or volcano"],
    ),
    "multi-node on ReadWriteOnce": (
        {"stages": {"grpo": {"nodes": 2}}, "storage": {"accessModes": ["ReadWriteOnce"]}},
        [r"storage\.accessModes \[ReadWriteMany\] for a stage with nodes > 1"],
    ),
    "ReadWriteOncePod": (
        {"storage": {"accessModes": ["ReadWriteOncePod"]}},
        [r"ReadWriteOncePod|accessModes"],
    ),
    "output_dir in args": (
        {"stages": {"sft": {"args": {"output_dir": "/tmp/x"}}}},
        [r"removal of output_dir and model_name_or_path from args"],
    ),
    "relative mount path": ({"storage": {"mountPath": "checkpoints"}}, [r"mountPath", r"pattern|match"]),
    "bad pull policy": ({"image": {"pullPolicy": "Sometimes"}}, [r"pullPolicy", r"Always"]),
    "nprocPerNode not the GPU count": (
        {"stages": {"grpo": {"nprocPerNode": 4}}},
        [r"stages\.grpo\.nprocPerNode \(4\) must equal stages\.grpo\.resources\.gpu \(8\)"],
    ),
    "local model outside the volume": (
        {"model": {"nameOrPath": "/models/qwen"}},
        [r'model\.nameOrPath "/models/qwen" is a path outside storage\.mountPath "/checkpoints"'],
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_fail_with_a_clear_message(helm: Path, case: str) -> None:
    values, patterns = BAD_VALUES[case]
    with pytest.raises(HelmError) as failure:
        render_chart(values, helm=helm)
    message = failure.value.output
    for pattern in patterns:
        assert re.search(pattern, message), f"{case}: /{pattern}/ not in:\n{message}"


def test_bad_values_fail_lint_too(helm: Path) -> None:
    values, patterns = BAD_VALUES["grpo without a model source"]
    with pytest.raises(HelmError) as failure:
        lint_chart(values, helm=helm)
    assert "1 chart(s) failed" in failure.value.output
    assert re.search(patterns[0], failure.value.output), failure.value.output


def test_release_name_too_long_for_pod_names() -> None:
    with pytest.raises(HelmError, match=r"release name \"a{41}\" is 41 characters; at most 40 fit"):
        render_chart(release="a" * 41)


# ---- what the chart renders ----------------------------------------------------------------------------


def test_stages_configmap_follows_the_contract() -> None:
    docs = rendered(release="exp7")
    configmap = find_doc(docs, "ConfigMap", "exp7-stages")
    pipeline = yaml.safe_load(configmap["data"]["pipeline.yaml"])
    assert pipeline == {
        "release": "exp7",
        "mountPath": "/checkpoints",
        "stages": [
            {
                "name": "sft",
                "outputDir": "/checkpoints/exp7/sft",
                "modelFrom": "Qwen/Qwen2.5-1.5B-Instruct",
                "job": "sft.yaml",
            },
            {
                "name": "grpo",
                "outputDir": "/checkpoints/exp7/grpo",
                "modelFrom": "/checkpoints/exp7/sft",
                "job": "grpo.yaml",
            },
            {
                "name": "eval",
                "outputDir": "/checkpoints/exp7/eval",
                "modelFrom": "/checkpoints/exp7/grpo",
                "job": "eval.yaml",
            },
        ],
    }
    assert set(configmap["data"]) == {"pipeline.yaml", "sft.yaml", "grpo.yaml", "eval.yaml"}
    for entry in pipeline["stages"]:
        stage = entry["name"]
        job = yaml.safe_load(configmap["data"][entry["job"]])
        assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
        assert job["metadata"]["name"] == f"exp7-{stage}-1"
        labels = job["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "exp7"
        assert labels["app.kubernetes.io/name"] == "r1-grpo"
        assert labels["r1-grpo.io/stage"] == stage and labels["r1-grpo.io/attempt"] == "1"
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch" and launches_torchrun(container), container["command"]
        _, module, flags = trainer_flags(job)
        assert module == STAGE_MODULES[stage]
        cli = dict(zip(flags[::2], flags[1::2], strict=False))
        assert cli["--output_dir"] == entry["outputDir"]
        assert cli["--model_name_or_path"] == entry["modelFrom"]
        assert cli["--dataset_name"] == "openai/gsm8k" and cli["--dataset_config"] == "main"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["checkpoints"] == "/checkpoints"
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims["checkpoints"] == "exp7-checkpoints"


def test_model_chain_follows_enabled_stages() -> None:
    no_grpo = rendered({"stages": {"grpo": {"enabled": False}}})
    assert [s for s in stage_jobs(no_grpo)] == ["sft", "eval"]
    _, _, flags = trainer_flags(stage_jobs(no_grpo)["eval"])
    assert flags[flags.index("--model_name_or_path") + 1] == "/checkpoints/r1-grpo/sft"

    no_sft = rendered({"stages": {"sft": {"enabled": False}}, "model": {"nameOrPath": "org/base-7b"}})
    jobs = stage_jobs(no_sft)
    assert list(jobs) == ["grpo", "eval"]
    _, _, grpo = trainer_flags(jobs["grpo"])
    _, _, evaluation = trainer_flags(jobs["eval"])
    assert grpo[grpo.index("--model_name_or_path") + 1] == "org/base-7b"
    assert evaluation[evaluation.index("--model_name_or_path") + 1] == "/checkpoints/r1-grpo/grpo"

    eval_only = rendered({"stages": {"sft": {"enabled": False}, "grpo": {"enabled": False}}})
    _, _, flags = trainer_flags(stage_jobs(eval_only)["eval"])
    assert flags[flags.index("--model_name_or_path") + 1] == "Qwen/Qwen2.5-1.5B-Instruct"


ENABLED_SUBSETS = [
    tuple(s for i, s in enumerate(STAGES) if mask >> i & 1) for mask in range(1, 2 ** len(STAGES))
]


@pytest.mark.parametrize("enabled", ENABLED_SUBSETS, ids="+".join)
def test_chart_copies_of_the_contract_equal_the_python_ones(enabled: tuple[str, ...]) -> None:
    """The chart's lineage rule (modelFrom) and stage->module map are copies (Helm cannot call Python):
    for every subset of enabled stages they must give what trainer.contract.stages gives, and the
    controller's parse_pipeline must accept the result."""
    base = "org/base-7b"
    # Datasets as the prepare stage's hand-off sees them (trainer/contract/prepared.py): a hub id, a
    # weighted mixture of hub ids (one with its own @config) and a file, one the prepare stage adds itself, a
    # built-in one.
    datasets = {
        "grpo": "openai/gsm8k@main:0.7, /checkpoints/data/x.jsonl:0.3,org/math:.5",
        "eval": "builtin:arith",
    }
    args = {s: {"dataset_name": datasets[s]} if s in datasets else {} for s in STAGES}
    args["prepare"] = {"dataset_name": "org/extra,openai/gsm8k"}
    docs = rendered(
        {
            "model": {"nameOrPath": base},
            "dataset": {"name": "openai/gsm8k", "config": None},
            "stages": {s: {"enabled": s in enabled, "args": args[s]} for s in STAGES},
        }
    )
    configmap = find_doc(docs, "ConfigMap", "r1-grpo-stages")
    entries = yaml.safe_load(configmap["data"]["pipeline.yaml"])["stages"]
    assert [entry["name"] for entry in entries] == list(enabled)
    runs = plan(
        PipelineConfig(
            release="r1-grpo",
            root="/checkpoints",
            model=base,
            dataset="openai/gsm8k",
            stages={s: StageConfig(enabled=s in enabled, args=dict(args[s])) for s in STAGES},
        )
    )
    sources = model_sources(enabled)
    for entry, run, (stage, job) in zip(entries, runs, stage_jobs(docs).items(), strict=True):
        _, module, flags = trainer_flags(job)
        assert module == STAGE_MODULES[stage]
        model = flags[flags.index("--model_name_or_path") + 1]
        expected = base if sources[stage] is None else f"/checkpoints/r1-grpo/{sources[stage]}"
        assert model == entry["modelFrom"] == run.model_name_or_path == expected, stage
        assert flags[flags.index("--output_dir") + 1] == entry["outputDir"] == str(run.output_dir)
        # The prepare stage's hand-off: the datasets it downloads, the later stages' rewritten names and
        # their offline environment.
        dataset = flags[flags.index("--dataset_name") + 1] if "--dataset_name" in flags else None
        assert dataset == run.args.get("dataset_name"), stage
        env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
        offline = {e["name"]: e["value"] for e in env if e["name"] in OFFLINE_ENV}
        assert offline == run.env, stage
    configmap["metadata"]["namespace"] = "default"
    pipeline = parse_pipeline(configmap, "r1-grpo")
    assert [(s.name, s.model_from) for s in pipeline.stages] == [(e["name"], e["modelFrom"]) for e in entries]
    # A ConfigMap that breaks the rule is refused by the controller, naming the stage.
    for i, entry in enumerate(entries):
        if sources[entry["name"]] is not None:
            broken = copy.deepcopy(configmap)
            wrong = copy.deepcopy(entries)
            wrong[i]["modelFrom"] = base
            broken["data"]["pipeline.yaml"] = yaml.safe_dump(
                {"release": "r1-grpo", "mountPath": "/checkpoints", "stages": wrong}
            )
            with pytest.raises(SpecConfigError, match=f"stage {entry['name']} has modelFrom '{base}'"):
                parse_pipeline(broken, "r1-grpo")


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_multi_node_layout_and_torchrun(nodes: int) -> None:
    values = {"stages": {"grpo": {"nodes": nodes, **_gpus(8, "64", "512Gi")}}}
    job = stage_jobs(rendered(values))["grpo"]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    if nodes == 1:
        assert "Worker" not in specs
    else:
        assert specs["Worker"]["replicas"] == nodes - 1
    for replica, spec in specs.items():
        (container,) = spec["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits[GPU] == requests[GPU] == "8"
        assert job["spec"]["nprocPerNode"] == limits[GPU], replica
        torchrun, module, _ = trainer_flags(job, replica)
        assert launches_torchrun(container) and module == "trainer.grpo"
        referenced = {m for flag in torchrun for m in re.findall(r"\$\(([A-Z_]+)\)", flag)}
        assert referenced == OPERATOR_VARIABLES
        assert {f.split("=")[0] for f in torchrun} == {
            "--nnodes",
            "--nproc-per-node",
            "--node-rank",
            "--master-addr",
            "--master-port",
        }
        # The operator sets these; a value from the chart would shadow the operator's.
        assert not OPERATOR_VARIABLES & {e["name"] for e in container["env"]}
        # MASTER_PORT comes from the container port the operator looks up by this name.
        assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in container["ports"]


def test_nproc_per_node_follows_gpus_and_defaults_to_one_without() -> None:
    docs = rendered(VALUE_SETS["placement-and-cpu-only-eval"])
    job = stage_jobs(docs)["eval"]
    assert job["spec"]["nprocPerNode"] == "1"
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert GPU not in container["resources"]["limits"]
    explicit = stage_jobs(rendered({"stages": {"sft": {"nprocPerNode": 8}}}))["sft"]
    assert explicit["spec"]["nprocPerNode"] == "8"


def test_stage_resources_env_and_restart_policy() -> None:
    values = {
        "stages": {
            "sft": {
                "resources": {"gpu": 4, "cpu": "24", "memory": "200Gi", "ephemeralStorage": "100Gi"},
                "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}],
                "restartPolicy": "ExitCode",
                "backoffLimit": 5,
            }
        },
        "env": {"NCCL_DEBUG": "INFO"},
        "shmSize": "64Gi",
    }
    job = stage_jobs(rendered(values))["sft"]
    spec = job["spec"]["pytorchReplicaSpecs"]["Master"]
    assert spec["restartPolicy"] == "ExitCode"
    assert job["spec"]["runPolicy"] == {"backoffLimit": 5, "cleanPodPolicy": "Running"}
    (container,) = spec["template"]["spec"]["containers"]
    assert container["resources"]["requests"] == {
        "cpu": "24",
        "memory": "200Gi",
        "ephemeral-storage": "100Gi",
        GPU: "4",
    }
    assert container["resources"]["limits"] == container["resources"]["requests"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NCCL_IB_HCA"] == "mlx5" and env["NCCL_DEBUG"] == "INFO"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["WANDB_MODE"] == "disabled"
    assert env["HF_HOME"] == "/checkpoints/.cache/huggingface"
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_placement_global_with_per_stage_override() -> None:
    values = VALUE_SETS["placement-and-cpu-only-eval"]
    docs = rendered(values)
    jobs = stage_jobs(docs)
    sft = jobs["sft"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert sft["nodeSelector"] == values["placement"]["nodeSelector"]
    assert sft["tolerations"] == DEFAULTS["placement"]["tolerations"]
    assert sft["priorityClassName"] == "training"
    evaluation = jobs["eval"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert evaluation["nodeSelector"] == {"pool": "cpu"}
    assert "tolerations" not in evaluation  # the stage's empty list replaces the global GPU toleration
    assert evaluation["priorityClassName"] == "training"
    controller = controller_job(docs)["spec"]["template"]["spec"]
    assert controller["nodeSelector"] == {"pool": "system"} and "tolerations" not in controller


def test_pvc_created_kept_or_existing() -> None:
    docs = rendered()
    pvc = find_doc(docs, "PersistentVolumeClaim", "r1-grpo-checkpoints")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert "storageClassName" not in pvc["spec"]
    static = find_doc(
        rendered({"storage": {"storageClass": "-"}}), "PersistentVolumeClaim", "r1-grpo-checkpoints"
    )
    assert static["spec"]["storageClassName"] == ""

    existing = rendered(VALUE_SETS["existing-claim"])
    assert not [d for d in existing if d["kind"] == "PersistentVolumeClaim"]
    for where, spec in pod_specs(existing).items():
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in spec.get("volumes", [])
            if "persistentVolumeClaim" in v
        ]
        if where.startswith("Pod/"):
            assert claims == [], where  # the helm test pod reads status only
        else:
            assert claims == ["team-checkpoints"], where
            mounts = [
                m["mountPath"]
                for c in spec["containers"]
                for m in c["volumeMounts"]
                if m["name"] == "checkpoints"
            ]
            assert mounts == ["/data"], where
    _, _, flags = trainer_flags(stage_jobs(existing)["grpo"])
    assert flags[flags.index("--output_dir") + 1] == "/data/r1-grpo/grpo"


def test_controller_job_runs_the_contract_command() -> None:
    docs = rendered(release="exp7")
    job = controller_job(docs, "exp7")
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["image"] == "ghcr.io/your-org/r1-grpo:0.1.0"
    assert container["command"] == ["r1-grpo"]
    assert container["args"] == [
        "controller",
        "--release",
        "exp7",
        "--namespace",
        "$(POD_NAMESPACE)",
        "--stages-configmap",
        "exp7-stages",
        "--retries",
        "2",
        "--keep-checkpoints",
        "3",
        "--pending-timeout-seconds",
        "1800",
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert {"name": "checkpoints", "mountPath": "/checkpoints"} in container["volumeMounts"]
    assert spec["serviceAccountName"] == "exp7-controller" and spec["automountServiceAccountToken"] is True
    binding = find_doc(docs, "RoleBinding", "exp7-controller")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "exp7-controller",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "exp7-controller"}]
    find_doc(docs, "ServiceAccount", "exp7-controller")
    custom = controller_job(
        rendered({"controller": {"retries": 5, "keepCheckpoints": 1, "pendingTimeoutSeconds": 600}})
    )
    args = custom["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--retries") + 1] == "5" and args[args.index("--keep-checkpoints") + 1] == "1"
    assert args[args.index("--pending-timeout-seconds") + 1] == "600"


def test_controller_job_fails_fast_on_terminal_exit_codes() -> None:
    from trainer.executors.kubernetes import spec as controller

    job = controller_job(rendered())
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert [r.get("onPodConditions") for r in rules if r["action"] == "FailJob"] == [[]]
    fail_job = [r["onExitCodes"] for r in rules if r["action"] == "FailJob"]
    assert fail_job == [
        {
            "containerName": "controller",
            "operator": "In",
            "values": [controller.EXIT_FAILED, controller.EXIT_CONFIG, controller.EXIT_FORBIDDEN],
        }
    ]
    # A crash or SIGTERM must stay retryable, and a preempted pod must not spend the backoff budget.
    assert (
        controller.EXIT_CRASH not in fail_job[0]["values"]
        and controller.EXIT_SIGTERM not in fail_job[0]["values"]
    )
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules


def _contract_role_rules() -> set[tuple[str, str, frozenset[str]]]:
    """The Role rules docs/contract.md lists under "The controller's Role"."""
    text = (REPO_ROOT / "docs" / "contract.md").read_text()
    section = text.split("The controller's Role", 1)[1]
    rules = set()
    for line in section.splitlines()[1:]:
        if not line.startswith("  - "):
            break
        group = re.match(r"\s+- `([^`]*)`", line).group(1).replace('""', "")
        for resource, verbs in re.findall(r"`([a-z/]+)`: ([a-z, ]+)", line):
            rules.add((group, resource, frozenset(v.strip() for v in verbs.split(","))))
    assert len(rules) >= 5, f"could not read the Role rules from docs/contract.md: {rules}"
    return rules


def test_role_is_exactly_the_contract() -> None:
    role = find_doc(rendered(), "Role", "r1-grpo-controller")
    rendered_rules = {
        (group, resource, frozenset(rule["verbs"]))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rendered_rules == _contract_role_rules()
    assert all("resourceNames" not in rule and "*" not in rule["verbs"] for rule in role["rules"])
    assert not [d for d in rendered() if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_kueue_labels_only_the_training_jobs() -> None:
    docs = rendered(VALUE_SETS["kueue"])
    for stage, job in stage_jobs(docs).items():
        labels = job["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue", stage
        assert labels["kueue.x-k8s.io/priority-class"] == "high", stage
        assert "suspend" not in job["spec"]["runPolicy"]  # Kueue's webhook suspends on creation
    controller = controller_job(docs)
    assert "kueue.x-k8s.io/queue-name" not in controller["metadata"]["labels"]
    plain = stage_jobs(rendered())["sft"]
    assert not [k for k in plain["metadata"]["labels"] if k.startswith("kueue.x-k8s.io/")]


def test_volcano_gang_schedules_each_stage() -> None:
    jobs = stage_jobs(rendered(VALUE_SETS["volcano"]))
    for job in jobs.values():
        nodes = sum(spec["replicas"] for spec in job["spec"]["pytorchReplicaSpecs"].values())
        assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": nodes, "queue": "training"}
        for spec in job["spec"]["pytorchReplicaSpecs"].values():
            assert spec["template"]["spec"]["schedulerName"] == "volcano"
    assert sum(s["replicas"] for s in jobs["grpo"]["spec"]["pytorchReplicaSpecs"].values()) == 4
    plain = stage_jobs(rendered())["sft"]
    assert "schedulingPolicy" not in plain["spec"]["runPolicy"]
    assert "schedulerName" not in plain["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


def test_wandb_and_hub_token_come_from_existing_secrets() -> None:
    docs = rendered(VALUE_SETS["wandb"])
    for stage, job in stage_jobs(docs).items():
        (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb-api", "key": "api-key"}}
        # The hub token is a file; the W&B key can only be an environment variable (justified for checkov).
        assert "HF_TOKEN" not in env and env["HF_TOKEN_PATH"]["value"] == "/var/run/secrets/huggingface/token"
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["hub-token"]["secret"] == {
            "secretName": "hf-token",
            "items": [{"key": "token", "path": "token"}],
            "defaultMode": 0o440,
        }
        assert {
            "name": "hub-token",
            "mountPath": "/var/run/secrets/huggingface",
            "readOnly": True,
        } in container["volumeMounts"]
        assert env["WANDB_PROJECT"]["value"] == "r1-grpo" and env["WANDB_ENTITY"]["value"] == "my-team"
        assert env["WANDB_RUN_GROUP"]["value"] == "r1-grpo" and env["WANDB_JOB_TYPE"]["value"] == stage
        assert "WANDB_MODE" not in env
        _, _, flags = trainer_flags(job)
        assert flags[flags.index("--report_to") + 1] == "wandb"
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_security_defaults_on_every_pod() -> None:
    for name in ("defaults", "wandb", "multi-node-2x8"):
        docs = rendered(VALUE_SETS[name])
        for where, spec in pod_specs(docs).items():
            pod_ctx = spec["securityContext"]
            assert pod_ctx["runAsNonRoot"] is True and pod_ctx["runAsUser"] >= 10000, where
            assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec), where
            assert not [v for v in spec.get("volumes", []) if "hostPath" in v], where
            for container in spec["containers"]:
                ctx = container["securityContext"]
                assert ctx["allowPrivilegeEscalation"] is False and ctx["privileged"] is False, where
                assert ctx["capabilities"] == {"drop": ["ALL"]}, where
                assert ctx["readOnlyRootFilesystem"] is True, where
                assert container["resources"]["limits"]["memory"], where
                # A read-only root filesystem needs a writable HOME / cache directory.
                assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], where
            if where.startswith("PyTorchJob/"):
                assert spec["automountServiceAccountToken"] is False, where
                assert spec["serviceAccountName"] == "r1-grpo-trainer", where


def test_image_reference_tag_digest_and_pull_secrets() -> None:
    docs = rendered(VALUE_SETS["grpo-only-from-volume"])
    for where, spec in pod_specs(docs).items():
        (container,) = spec["containers"]
        assert container["image"] == "ghcr.io/your-org/r1-grpo@sha256:" + "ab" * 32, where
        assert container["imagePullPolicy"] == "Always", where
        assert spec["imagePullSecrets"] == [{"name": "regcred"}], where
    tagged = controller_job(
        rendered({"image": {"repository": "registry.local:5000/ml/r1", "tag": "sha-abc1234"}})
    )
    assert (
        tagged["spec"]["template"]["spec"]["containers"][0]["image"]
        == "registry.local:5000/ml/r1:sha-abc1234"
    )


def test_optional_resources_follow_their_switches() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered()}
    assert {
        ("ServiceAccount", "r1-grpo-trainer"),
        ("NetworkPolicy", "r1-grpo-training"),
        ("NetworkPolicy", "r1-grpo-controller"),
        ("Pod", "r1-grpo-test-status"),
    } <= kinds
    minimal = {(d["kind"], d["metadata"]["name"]) for d in rendered(VALUE_SETS["grpo-only-from-volume"])}
    assert not [
        k for k in minimal if k[0] in ("NetworkPolicy", "Pod") or k == ("ServiceAccount", "r1-grpo-trainer")
    ]
    job = stage_jobs(rendered(VALUE_SETS["grpo-only-from-volume"]))["grpo"]
    assert (
        job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["serviceAccountName"]
        == "ml-workloads"
    )


def test_network_policy_admits_only_the_release_training_pods() -> None:
    docs = rendered()
    training = find_doc(docs, "NetworkPolicy", "r1-grpo-training")
    selector = training["spec"]["podSelector"]["matchLabels"]
    assert training["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
    for stage, job in stage_jobs(docs).items():
        labels = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), stage
    controller = find_doc(docs, "NetworkPolicy", "r1-grpo-controller")
    assert controller["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in controller["spec"]


def test_helm_test_pod_runs_status() -> None:
    pod = find_doc(rendered(release="exp7"), "Pod", "exp7-test-status")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["r1-grpo"]
    assert container["args"] == ["status", "--release", "exp7", "--namespace", "$(POD_NAMESPACE)"]
    assert pod["spec"]["serviceAccountName"] == "exp7-controller"


def test_notes_tell_how_to_watch_and_where_the_model_lands() -> None:
    helm4 = next(p for v, p in helm_binaries().items() if v.startswith("4."))
    out = run_helm(
        ["install", "exp7", str(CHART_DIR), "--namespace", "team-a", "--dry-run=client"], helm=helm4
    )
    notes = out.split("NOTES:", 1)[1]
    assert "r1-grpo status --release exp7 --namespace team-a" in notes
    assert "kubectl get pytorchjobs -n team-a -l app.kubernetes.io/instance=exp7" in notes
    assert "The trained model is /checkpoints/exp7/grpo/" in notes
    assert "/checkpoints/exp7/eval/metrics.json" in notes
    assert "kubectl delete pvc exp7-checkpoints -n team-a" in notes


# ---- args rendering: the contract, and the trainer's own renderer ------------------------------------


def chart_args_map(values: dict[str, Any], stage: str, release: str = "r1-grpo") -> dict[str, Any]:
    """The map the chart renders for a stage, built in Python from the same values (docs/contract.md)."""
    effective = deep_merge(DEFAULTS, values)
    args: dict[str, Any] = {"dataset_name": effective["dataset"]["name"]}
    for key, flag in (
        ("config", "dataset_config"),
        ("trainSplit", "dataset_train_split"),
        ("testSplit", "dataset_test_split"),
    ):
        if effective["dataset"].get(key):
            args[flag] = effective["dataset"][key]
    args["report_to"] = "wandb" if effective["wandb"]["enabled"] else "jsonl"
    args.update(effective["stages"][stage].get("args") or {})
    mount = effective["storage"]["mountPath"]
    enabled = [s for s in ("sft", "grpo", "eval") if effective["stages"][s]["enabled"]]
    previous = [s for s in ("sft", "grpo") if s in enabled and enabled.index(s) < enabled.index(stage)]
    args["model_name_or_path"] = (
        f"{mount}/{release}/{previous[-1]}" if previous else effective["model"]["nameOrPath"]
    )
    args["output_dir"] = f"{mount}/{release}/{stage}"
    return args


CUSTOM_ARGS = {
    "learning_rate": 3e-06,
    "beta": 0.0,
    "final_temperature": 0.65,
    "initial_temperature": 1.0,
    "max_steps": 1000000,
    "max_grad_norm": 1234567.5,
    "weight_decay": 1.5e-07,
    "top_p": 0.0001,
    "bf16": False,
    "reward_funcs": ["accuracy", "format"],
    "reward_weights": [1, 2.5],
    "plugin": "hybrid",
    "save_steps": None,
    "seed": 42,
    "run_name": "exp 7",
}


def test_args_render_by_the_contract_rules() -> None:
    values = {"stages": {"grpo": {"args": CUSTOM_ARGS}}}
    _, _, flags = trainer_flags(stage_jobs(rendered(values))["grpo"])
    keys = [f[2:] for f in flags if f.startswith("--")]
    assert keys == sorted(keys)
    assert "--save_steps" not in flags  # null drops the flag (here: a default one)

    def value_of(key: str, count: int = 1) -> list[str]:
        start = flags.index(f"--{key}") + 1
        return flags[start : start + count]

    assert value_of("learning_rate") == ["3e-06"]
    assert value_of("beta") == ["0"]
    assert value_of("final_temperature") == ["0.65"]
    assert value_of("initial_temperature") == ["1"]
    assert value_of("max_steps") == ["1000000"]
    assert value_of("max_grad_norm") == ["1.2345675e+06"]
    assert value_of("weight_decay") == ["1.5e-07"]
    assert value_of("top_p") == ["0.0001"]
    assert value_of("bf16") == ["false"] and value_of("gradient_checkpointing") == ["true"]
    # A list is its values one after another, up to the next flag.
    assert value_of("reward_funcs", 3) == ["accuracy", "format", "--reward_weights"]
    assert value_of("reward_weights", 3) == ["1", "2.5", "--run_name"]
    assert value_of("run_name") == ["exp 7"] and value_of("seed") == ["42"]


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"stages": {"grpo": {"args": CUSTOM_ARGS}}},
        VALUE_SETS["wandb"],
        VALUE_SETS["grpo-only-from-volume"],
    ],
    ids=["defaults", "custom-args", "wandb", "grpo-only"],
)
def test_rendered_flags_equal_trainer_args_to_cli(values: dict[str, Any]) -> None:
    """trainer.contract.stages.args_to_cli (the local pipeline's renderer) gives the chart's exact flags."""
    for stage, job in stage_jobs(rendered(values)).items():
        _, _, flags = trainer_flags(job)
        assert flags == args_to_cli(chart_args_map(values, stage)), stage


@pytest.mark.parametrize("name", ["defaults", "wandb", "grpo-only-from-volume", "multi-node-2x8"])
def test_rendered_flags_parse_with_the_trainer_stages(name: str) -> None:
    """The flags each PyTorchJob passes are accepted and validated by the stage's own parser."""
    from trainer.evaluate import EvalArgs
    from trainer.grpo import GRPOArgs
    from trainer.r1.data import DataArgs
    from trainer.runtime import parse_args
    from trainer.sft import SFTArgs

    classes = {"sft": SFTArgs, "grpo": GRPOArgs, "eval": EvalArgs}
    for stage, job in stage_jobs(rendered(VALUE_SETS[name])).items():
        _, module, flags = trainer_flags(job)
        assert module == f"trainer.{'evaluate' if stage == 'eval' else stage}"
        data_args, args = parse_args((DataArgs, classes[stage]), flags, prog=f"r1-grpo {stage}")
        args.validate()
        assert args.output_dir == f"/checkpoints/r1-grpo/{stage}"
        assert data_args.dataset_name == "openai/gsm8k" and data_args.dataset_config == "main"
        if stage != "eval":
            assert args.plugin == "zero2" and args.bf16 is True and args.gradient_checkpointing is True


# ---- security review -----------------------------------------------------------------------------------


def _as_pods(job: dict) -> list[dict]:
    """A PyTorchJob's replica templates as Pods, so checkov reviews the GPU pods the operator will create."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{job['metadata']['name']}-{replica.lower()}",
                **spec["template"]["metadata"],
            },
            "spec": spec["template"]["spec"],
        }
        for replica, spec in job["spec"]["pytorchReplicaSpecs"].items()
    ]


def test_checkov_finds_nothing_unjustified(tmp_path: Path) -> None:
    # The defaults, and every optional feature at once (secrets, Workers, queue labels, pinned image).
    everything = deep_merge(
        deep_merge(VALUE_SETS["multi-node-2x8"], VALUE_SETS["wandb"]),
        {**VALUE_SETS["kueue"], "image": {"digest": "sha256:" + "cd" * 32, "pullPolicy": "Always"}},
    )
    for name, values in (("defaults", {}), ("everything", everything)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "chart.yaml").write_text(render_chart_text(values or None))
        pods = [pod for job in stage_jobs(rendered(values)).values() for pod in _as_pods(job)]
        (folder / "training-pods.yaml").write_text(yaml.safe_dump_all(pods, sort_keys=False))
    report = checkov_report("--directory", str(tmp_path), "--framework", "kubernetes")
    failed = report["results"]["failed_checks"]
    assert not failed, "\n".join(
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})" for c in failed
    )
    assert report["summary"]["passed"] > 300 and report["summary"]["resource_count"] >= 25, report["summary"]
    for check in report["results"]["skipped_checks"]:
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason) > 20 and reason != "No comment provided", check["check_id"]


# ---- manifests/ ------------------------------------------------------------------------------------------


def test_manifests_are_in_sync_with_the_chart() -> None:
    problems = manifests_drift()
    assert not problems, "run `python -m tests.support.helmtool manifests`:\n" + "\n".join(problems)


def test_manifests_are_namespace_agnostic_and_complete() -> None:
    files = generate_manifests()
    assert "jobs/1-sft.yaml" in files and "jobs/3-eval.yaml" in files
    ordered = sorted(name for name in files if "/" not in name)
    kinds = [yaml.safe_load(files[name])["kind"] for name in ordered]
    assert kinds.index("PersistentVolumeClaim") < kinds.index("ConfigMap") < kinds.index("Job")
    assert kinds.index("RoleBinding") < kinds.index("Job")
    for name, content in files.items():
        for doc in yaml.safe_load_all(content):
            assert "namespace" not in doc["metadata"], name
            if doc["kind"] in ("TrainJob", "TrainingRuntime"):
                continue  # against the Trainer's CRDs in tests/test_chart_trainjob.py
            assert not k8s_errors(doc) if doc["kind"] != "PyTorchJob" else not sdk_errors(doc), name
    configmap = yaml.safe_load(files["60-stages-configmap.yaml"])
    for position, stage in enumerate(("sft", "grpo", "eval"), start=1):
        assert yaml.safe_load(files[f"jobs/{position}-{stage}.yaml"]) == yaml.safe_load(
            configmap["data"][f"{stage}.yaml"]
        )
    assert yaml.safe_load(files["trainjob/jobs/1-sft.yaml"])["kind"] == "TrainJob"
    assert "trainjob/55-trainingruntimes.yaml" in files
    readme = (MANIFESTS_DIR / "README.md").read_text()
    for name in ("10-pvc.yaml", "90-controller-job.yaml", "jobs/1-sft.yaml", "jobs/3-eval.yaml", "trainjob/"):
        assert name in readme, name


def test_manifests_drift_is_detected_and_regenerated(tmp_path: Path) -> None:
    copy_dir = tmp_path / "manifests"
    shutil.copytree(MANIFESTS_DIR, copy_dir)
    assert manifests_drift(copy_dir) == []
    job = copy_dir / "jobs" / "2-grpo.yaml"
    job.write_text(job.read_text().replace('"--beta"', '"--bogus"'))
    (copy_dir / "99-stale.yaml").write_text("kind: ConfigMap\n")
    (copy_dir / "10-pvc.yaml").unlink()
    problems = manifests_drift(copy_dir)
    assert any("2-grpo.yaml: differs" in p for p in problems), problems
    assert any("99-stale.yaml: not produced" in p for p in problems), problems
    assert any("10-pvc.yaml: missing" in p for p in problems), problems
    write_manifests(copy_dir)
    assert manifests_drift(copy_dir) == []
    assert (copy_dir / "README.md").is_file()
    cli = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "support" / "helmtool.py"), "manifests", "--check"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
