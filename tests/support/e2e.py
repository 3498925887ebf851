"""The chart as a user runs it, on the real control plane of tests/controlplane.

* `Release`: `helm install|upgrade|uninstall|test` of charts/r1-grpo into a namespace of the control plane,
  with a hostPath PersistentVolume bound to the chart's claim. The PV's directory on this machine is the
  checkpoint volume.
* The controller runs as a host process: `r1-grpo controller` with the flags of the controller Job that Helm
  created (read back from the API server), authenticated with a token of the chart's own ServiceAccount
  (TokenRequest API), so the chart's Role decides every call. `--mount-path` points at the PV's directory.
* The pods' env as Kubernetes resolves it (`resolve_env`, `expand`), for the controller's command here and for
  the kubelet stand-in (tests/support/host_kubelet.py), which runs the training pods.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from tests.support.helmtool import CHART_DIR, default_helm

VENV_BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # a TrainJob's pods: its JobSet has the TrainJob's name
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"

# The values that point the chart at the test cluster: fake GPU nodes (1 GPU per stage, tolerated taint),
# the pre-bound hostPath volume ("-": no StorageClass), the built-in tiny model and task, and stage args
# small enough for CPU (the defaults' GPU-only flags dropped with null). restartPolicy Never: a failed
# container fails its pod and the attempt (HostKubelet does not restart containers in place).
TINY_VALUES: dict[str, Any] = {
    "image": {"repository": "r1-grpo-test", "tag": "dev"},
    "model": {"nameOrPath": "builtin:tiny"},
    "dataset": {"name": "builtin:arith", "config": ""},
    "storage": {"storageClass": "-", "size": "1Gi"},
    "stages": {
        "sft": {
            "resources": {"gpu": 1, "cpu": "1", "memory": "2Gi"},
            "restartPolicy": "Never",
            "args": {
                "num_train_epochs": None,
                "max_steps": 4,
                "per_device_train_batch_size": 8,
                "gradient_accumulation_steps": 1,
                "learning_rate": 0.003,
                "warmup_steps": 0,
                "logging_steps": 2,
                "save_steps": 2,
                "evaluation_strategy": "no",
                "eval_steps": None,
                "gradient_checkpointing": None,
                "bf16": None,
                "tf32": None,
                "plugin": "ddp",
            },
        },
        "grpo": {
            "resources": {"gpu": 1, "cpu": "1", "memory": "2Gi"},
            "restartPolicy": "Never",
            "args": {
                "num_train_epochs": None,
                "max_steps": 2,
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "learning_rate": 0.0003,
                "warmup_steps": 0,
                "logging_steps": 1,
                "save_steps": 1,
                "evaluation_strategy": "no",
                "eval_steps": None,
                "gradient_checkpointing": None,
                "bf16": None,
                "tf32": None,
                "plugin": "ddp",
                "num_generations": 2,
                "inference_batch_size": 4,
                "logits_forward_batch_size": 4,
                "beta": 0.0,
                "max_prompt_length": 64,
                "max_completion_length": 16,
            },
        },
        "eval": {
            "resources": {"gpu": 1, "cpu": "1", "memory": "2Gi"},
            "restartPolicy": "Never",
            "args": {
                "max_eval_samples": 4,
                "max_completion_length": 16,
                "inference_batch_size": 4,
                "bf16": None,
            },
        },
    },
}


def merge(base: dict, override: dict) -> dict:
    """Helm's merge of values: maps merge, anything else replaces (None stays: it deletes a chart default)."""
    out = json.loads(json.dumps(base))
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = json.loads(json.dumps(value))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.3) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` (and the last error) on timeout.

    The first polls come fast (from 0.02 s, growing 1.5x up to `interval`): short waits end soon after the
    condition holds, long ones (a stage training) poll no more often than before.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    pause = min(0.02, interval)
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - kept for the failure message
            last = e
        time.sleep(pause)
        pause = min(pause * 1.5, interval)
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})" if last else "")
    )


# --------------------------------------------------------------------------------------------- helm releases


class HelmFailed(AssertionError):
    def __init__(self, command: list[str], proc: subprocess.CompletedProcess):
        super().__init__(f"$ {' '.join(command)}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        self.returncode = proc.returncode
        self.output = proc.stdout + proc.stderr


@dataclass
class Release:
    """One Helm release of the chart in one namespace, with its checkpoint volume on this machine."""

    cp: Any  # tests.controlplane.cluster.ControlPlane
    namespace: str
    name: str
    workdir: Path
    values: dict = field(default_factory=lambda: json.loads(json.dumps(TINY_VALUES)))
    helm_binary: Path = field(default_factory=default_helm)

    def __post_init__(self) -> None:
        self.volume = self.workdir / "volume"
        self.volume.mkdir(parents=True, exist_ok=True)
        self.pv_name = f"{self.namespace}-{self.name}"[:63]
        self._helm_home = self.workdir / "helm-home"
        self.controllers: list[ControllerProcess] = []

    # -- the cluster side of the volume
    @property
    def claim(self) -> str:
        return f"{self.name}-checkpoints"

    def create_volume(self) -> None:
        """A hostPath PV pre-bound to the chart's claim (the chart asks for no StorageClass)."""
        self.cp.create_hostpath_pv(
            self.pv_name, self.volume, capacity="1Gi", claim=(self.namespace, self.claim)
        )

    def delete_volume(self) -> None:
        with contextlib.suppress(Exception):
            self.cp.request("DELETE", f"/api/v1/persistentvolumes/{self.pv_name}")

    # -- helm
    def helm(self, *args: str, values: dict | None = None, timeout: float = 180) -> str:
        command = [
            str(self.helm_binary),
            *args,
            "--namespace",
            self.namespace,
            "--kubeconfig",
            str(self.cp.kubeconfig_path),
        ]
        if values is not None:
            path = self.workdir / f"values-{time.monotonic_ns()}.yaml"
            path.write_text(yaml.safe_dump(values, sort_keys=True))
            command += ["--values", str(path)]
        env = {
            **os.environ,
            "HELM_CONFIG_HOME": str(self._helm_home / "config"),
            "HELM_CACHE_HOME": str(self._helm_home / "cache"),
            "HELM_DATA_HOME": str(self._helm_home / "data"),
        }
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise HelmFailed(command, proc)
        return proc.stdout

    def install(self, values: dict | None = None) -> str:
        if values is not None:
            self.values = values
        return self.helm("install", self.name, str(CHART_DIR), values=self.values)

    def upgrade(self, values: dict) -> str:
        self.values = values
        return self.helm("upgrade", self.name, str(CHART_DIR), values=values)

    def uninstall(self) -> str:
        return self.helm("uninstall", self.name)

    # -- reading objects back
    def get(self, path: str) -> dict:
        return self.cp.request("GET", f"/api/v1/namespaces/{self.namespace}/{path}")

    def list(self, api: str, resource: str, selector: str = "") -> list[dict]:
        query = f"?labelSelector={selector}" if selector else ""
        return (
            self.cp.request("GET", f"{api}/namespaces/{self.namespace}/{resource}{query}").get("items") or []
        )

    def jobs(self, api: str = "/apis/kubeflow.org/v1", resource: str = "pytorchjobs") -> dict[str, dict]:
        items = self.list(api, resource, f"app.kubernetes.io/instance={self.name}")
        return {j["metadata"]["name"]: j for j in items}

    def trainjobs(self) -> dict[str, dict]:
        return self.jobs("/apis/trainer.kubeflow.org/v1alpha1", "trainjobs")

    def controller_jobs(self) -> list[dict]:
        return self.list(
            "/apis/batch/v1",
            "jobs",
            f"app.kubernetes.io/instance={self.name},app.kubernetes.io/component=controller",
        )

    def controller_job(self) -> dict:
        (job,) = self.controller_jobs()
        return job

    def status(self) -> dict | None:
        try:
            cm = self.get(f"configmaps/{self.name}-status")
        except Exception:  # noqa: BLE001 - not written yet
            return None
        return json.loads((cm.get("data") or {}).get("status.json") or "null")

    def stage_dir(self, stage: str) -> Path:
        return self.volume / self.name / stage

    # -- the chart's ServiceAccount and the controller as a host process
    def service_account_kubeconfig(self, account: str) -> Path:
        return service_account_kubeconfig(
            self.cp, self.namespace, account, self.workdir / f"{account}.kubeconfig"
        )

    def controller_argv(self) -> list[str]:
        """The controller Job's container command and args, $(VAR) references resolved as the kubelet would."""
        job = self.controller_job()
        spec = job["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = resolve_env(container.get("env") or [], {"namespace": self.namespace, "name": "controller"})
        return [expand(a, env) for a in [*container["command"], *container.get("args", [])]]

    def start_controller(self, *extra: str, account: str | None = None) -> ControllerProcess:
        argv = self.controller_argv()
        account = account or self.controller_job()["spec"]["template"]["spec"]["serviceAccountName"]
        kubeconfig = self.service_account_kubeconfig(account)
        executable = shutil.which(argv[0], path=str(VENV_BIN))
        assert executable, f"{argv[0]} (the controller Job's command) is not installed in {VENV_BIN}"
        command = [
            executable,
            *argv[1:],
            "--kubeconfig",
            str(kubeconfig),
            "--mount-path",
            str(self.volume),
            *extra,
        ]
        process = ControllerProcess.start(
            command, self.workdir / f"controller-{time.monotonic_ns()}.log", self.workdir
        )
        self.controllers.append(process)
        return process

    def report(self) -> str:
        """The controllers' log tails and the status, for a failed test's output."""
        parts = [f"--- controller exit {c.proc.poll()}\n{c.log()[-4000:]}" for c in self.controllers]
        parts.append(f"--- status\n{json.dumps(self.status(), indent=1)[-4000:]}")
        return "\n".join(parts)

    def stop_controllers(self) -> None:
        for c in self.controllers:
            c.stop()

    def status_command(self, *args: str) -> subprocess.CompletedProcess:
        """`r1-grpo status` as the user runs it (their kubeconfig: the cluster admin's)."""
        return subprocess.run(
            [str(VENV_BIN / "r1-grpo"), "status", "--release", self.name, "--namespace", self.namespace,
             "--kubeconfig", str(self.cp.kubeconfig_path), *args],
            capture_output=True, text=True, timeout=120, env=host_env(), cwd=self.workdir,
        )  # fmt: skip


@dataclass
class ControllerProcess:
    proc: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, command: list[str], log_path: Path, cwd: Path) -> ControllerProcess:
        log = open(log_path, "wb")  # noqa: SIM115 - closed by the child's exit; the file stays for reading
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=host_env(), cwd=cwd)
        log.close()
        return cls(proc, log_path)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"controller still running after {timeout:.0f} s; log:\n{self.log()[-6000:]}"
            ) from None

    def stop(self) -> int | None:
        """SIGTERM, as the kubelet sends when the controller pod is deleted."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def records(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def service_account_kubeconfig(cp: Any, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig holding a fresh token of `account` (TokenRequest API): what a pod of that account has
    mounted, for a process on this machine."""
    from kubernetes import client

    core = client.CoreV1Api(cp.api_client())
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=7200)
    )
    token = core.create_namespaced_service_account_token(account, namespace, request).status.token
    config = json.loads(Path(cp.kubeconfig_path).read_text())
    cluster_name = config["clusters"][0]["name"]
    config["users"] = [{"name": account, "user": {"token": token}}]
    config["contexts"] = [
        {"name": account, "context": {"cluster": cluster_name, "user": account, "namespace": namespace}}
    ]
    config["current-context"] = account
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def host_env() -> dict[str, str]:
    """This interpreter's environment for host processes: the worktree first on PYTHONPATH, no KUBECONFIG."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        env.pop(name, None)
    return env


# --------------------------------------------------------------------------------------------- pods


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values: defined names expand, `$$` is `$`."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, text)


def resolve_env(entries: list[dict], pod_meta: dict[str, Any]) -> dict[str, str]:
    """A container's env as the kubelet builds it (values, $(VAR) of earlier entries, downward API fields:
    metadata.name, metadata.namespace and, when pod_meta has them, metadata.annotations['k'] / labels['k'],
    e.g. the node rank Kubeflow Trainer takes from a Job pod's completion-index annotation)."""
    env: dict[str, str] = {}
    for entry in entries:
        name = entry["name"]
        if "value" in entry:
            env[name] = expand(entry["value"], env)
        elif "valueFrom" in entry:
            path = (entry["valueFrom"].get("fieldRef") or {}).get("fieldPath") or ""
            keyed = re.fullmatch(r"metadata\.(annotations|labels)\['([^']+)'\]", path)
            if path in ("metadata.namespace", "metadata.name"):
                env[name] = pod_meta[path.split(".")[1]]
            elif keyed and keyed.group(2) in (pod_meta.get(keyed.group(1)) or {}):
                env[name] = pod_meta[keyed.group(1)][keyed.group(2)]
            else:
                raise NotImplementedError(
                    f"env {name}: fieldRef {path!r} is not supported here (metadata.name/namespace, and "
                    f"annotations/labels the pod has)"
                )
        else:
            env[name] = ""
    return env
