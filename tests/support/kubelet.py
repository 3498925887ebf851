"""The trainer's part of a stage job on the test control plane, where kwok plays the nodes.

The real training operator creates each stage PyTorchJob's pods and kwok makes them Running, but no
container runs. `SimulatedTrainer` does what the trainer in the master pod would: it writes checkpoints and
the stage output (`write_stage_output`: weights, `r1_stage.json` through trainer.contract.output) into the
folder that plays the checkpoint volume (the hostPath PersistentVolume's directory, which the controller
under test also reads), gives the pod a log, and ends the pod the way a kubelet reports an exited container
(`ControlPlane.finish_pod`), so the real operator moves the job to Succeeded or Failed.

`stages_configmap` builds a `<release>-stages` ConfigMap in the contract's format with small stage jobs
(one Master, restartPolicy Never, one GPU, the checkpoint claim mounted) for scenarios that do not need the
chart's full jobs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from tests.controlplane.cluster import ApiError
from trainer.contract.output import invalidate_manifest, write_manifest

TRAINING_STAGES = ("sft", "grpo")
STAGE_MODULES = {"sft": "trainer.sft", "grpo": "trainer.grpo", "eval": "trainer.evaluate"}
PYTORCHJOBS = "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# runPolicy.managedBy values the operator's webhook accepts; with this one, training-operator v1.9 leaves
# the job to MultiKueue and never touches it (the nearest real thing to "no operator watches this job").
NOT_FOR_THIS_OPERATOR = "kueue.x-k8s.io/multikueue"
OOM_LINE = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def stage_job(
    release: str,
    stage: str,
    output_dir: str,
    model_from: str,
    mount: str,
    claim: str,
    *,
    gpus: int = 1,
    managed_by: str | None = None,
) -> dict:
    labels = {
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/name": "r1-grpo",
        "r1-grpo.io/stage": stage,
        "r1-grpo.io/attempt": "1",
    }
    run_policy: dict = {"cleanPodPolicy": "None", "backoffLimit": 0}
    if managed_by:
        run_policy["managedBy"] = managed_by
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": f"{release}-{stage}-1", "labels": dict(labels)},
        "spec": {
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "restartPolicy": "Never",
                    "template": {
                        "metadata": {"labels": dict(labels)},
                        "spec": {
                            "tolerations": [GPU_TOLERATION],
                            "containers": [
                                {
                                    "name": "pytorch",
                                    "image": "r1-grpo:test",
                                    "command": ["torchrun"],
                                    "args": [
                                        "--nproc_per_node",
                                        "1",
                                        "-m",
                                        STAGE_MODULES[stage],
                                        "--dataset_name",
                                        "builtin:arith",
                                        "--model_name_or_path",
                                        model_from,
                                        "--output_dir",
                                        output_dir,
                                    ],
                                    "resources": {
                                        "limits": {"nvidia.com/gpu": str(gpus)},
                                        "requests": {"nvidia.com/gpu": str(gpus)},
                                    },
                                    "volumeMounts": [{"name": "checkpoints", "mountPath": mount}],
                                }
                            ],
                            "volumes": [
                                {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}}
                            ],
                        },
                    },
                }
            },
        },
    }


def stages_configmap(
    release: str,
    stages: Iterable[str] = ("sft", "grpo", "eval"),
    mount: str = "/checkpoints",
    base_model: str = "builtin:tiny",
    **job_options,
) -> dict:
    """ConfigMap `<release>-stages` in the contract's format; job_options go to stage_job."""
    import yaml

    claim = f"{release}-checkpoints"
    entries, data, previous_training = [], {}, None
    for stage in stages:
        output_dir = f"{mount}/{release}/{stage}"
        model_from = previous_training or base_model
        entries.append(
            {"name": stage, "outputDir": output_dir, "modelFrom": model_from, "job": f"{stage}.yaml"}
        )
        data[f"{stage}.yaml"] = yaml.safe_dump(
            stage_job(release, stage, output_dir, model_from, mount, claim, **job_options)
        )
        if stage in TRAINING_STAGES:
            previous_training = output_dir
    data["pipeline.yaml"] = yaml.safe_dump({"release": release, "mountPath": mount, "stages": entries})
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{release}-stages", "labels": {"app.kubernetes.io/instance": release}},
        "data": data,
    }


def flag(container: dict, name: str) -> str | None:
    """The value of `--name` in a container's command line."""
    argv = list(container.get("command") or []) + list(container.get("args") or [])
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------------------------- the trainer


def existing_steps(output_dir: str | Path) -> list[int]:
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(
        int(n.split("-")[1]) for n in names if n.startswith("checkpoint-") and n.split("-")[1].isdigit()
    )


def write_checkpoint(output_dir: str | Path, step: int, tag: str) -> None:
    """checkpoint-<step> with a model file and trainer_state.json, made under a temporary name first."""
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}-{tag}")
    os.makedirs(os.path.join(tmp, "model"), exist_ok=True)
    with open(os.path.join(tmp, "model", "model.safetensors"), "wb") as f:
        f.write(os.urandom(256))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump({"step": step}, f)
    os.replace(tmp, os.path.join(output_dir, f"checkpoint-{step}"))


def write_stage_output(
    output_dir: str | Path,
    stage: str,
    *,
    steps: int,
    model_from: str | None,
    metrics: dict,
    weight_bytes: int = 1024,
) -> None:
    """A finished stage's folder: final weights (training stages) or metrics (eval), then r1_stage.json."""
    if stage in TRAINING_STAGES:
        with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
            remaining = weight_bytes
            while remaining > 0:
                f.write(os.urandom(min(remaining, 1 << 24)))
                remaining -= 1 << 24
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            json.dump({"model_type": "llama"}, f)
    else:
        with open(os.path.join(output_dir, "metrics.json"), "w") as f:
            json.dump({"accuracy": 0.5}, f)
    write_manifest(output_dir, stage, steps=steps, inputs={"model_name_or_path": model_from}, metrics=metrics)


class _JobGone(Exception):
    """The job a script plays was deleted (or replaced by a new one with the same name)."""


class SimulatedTrainer:
    """Plays the trainer in the master pod of every PyTorchJob of one namespace on the test control plane.

    `scripts[(stage, attempt)]` picks what a job does: "succeed" (default), "fail" (exit 1 with an OOM
    traceback at the end of an 80-line log), "corrupt" (exit 0, but a weight file changes after the
    manifest), "no-manifest" (exit 0 without `r1_stage.json`), "pending" (nothing: the scenario keeps the
    pod from being scheduled), "hang" (stays Running). `gates[(stage, attempt)]` (a threading.Event) holds a
    job in Running after its checkpoints until set. Jobs are tracked by uid, so a job deleted and recreated
    under the same name runs again; a script stops when its job is gone.
    """

    def __init__(
        self,
        cp,
        namespace: str,
        volume: str | Path,
        mount: str = "/checkpoints",
        scripts: dict[tuple[str, int], str] | None = None,
        checkpoints_per_attempt: int = 4,
        weight_bytes: int = 1024,
        poll_seconds: float = 0.05,
    ):
        self.cp = cp
        self.namespace = namespace
        self.volume = Path(volume)
        self.mount = mount
        self.scripts = dict(scripts or {})
        self.gates: dict[tuple[str, int], threading.Event] = {}
        self.checkpoints_per_attempt = checkpoints_per_attempt
        self.weight_bytes = weight_bytes
        self.poll = poll_seconds
        self.finished_at: dict[str, float] = {}  # job name -> time.monotonic() when its pod was ended
        self.errors: list[BaseException] = []
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._loop, name=f"trainer-{namespace}", daemon=True)

    def start(self) -> SimulatedTrainer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for gate in self.gates.values():
            gate.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=10)
        for t in self._threads:
            t.join(timeout=10)

    def local(self, job_path: str) -> Path:
        return self.volume / PurePosixPath(job_path).relative_to(self.mount)

    def _jobs(self) -> list[dict]:
        return self.cp.request("GET", PYTORCHJOBS.format(ns=self.namespace)).get("items") or []

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for job in self._jobs():
                    uid = job["metadata"]["uid"]
                    if uid not in self._seen:
                        self._seen.add(uid)
                        t = threading.Thread(target=self._run_job, args=(job,), daemon=True)
                        self._threads.append(t)
                        t.start()
            except Exception as e:  # surfaced by tests through `errors`
                self.errors.append(e)
                return
            self._stop.wait(self.poll)

    def _run_job(self, job: dict) -> None:
        try:
            self._script(job)
        except _JobGone:
            pass
        except BaseException as e:
            if not self._stop.is_set():
                self.errors.append(e)

    def _alive(self, name: str, uid: str) -> None:
        try:
            current = self.cp.request("GET", f"{PYTORCHJOBS.format(ns=self.namespace)}/{name}")
        except ApiError as e:
            if e.status == 404:
                raise _JobGone() from None
            raise
        if current["metadata"]["uid"] != uid or current["metadata"].get("deletionTimestamp"):
            raise _JobGone()

    def _wait_running(self, name: str, uid: str) -> str:
        """The job's master pod (created by the operator, started by kwok) once it is Running."""
        pod = f"{name}-master-0"
        while not self._stop.is_set():
            self._alive(name, uid)
            try:
                obj = self.cp.request("GET", f"/api/v1/namespaces/{self.namespace}/pods/{pod}")
            except ApiError as e:
                if e.status != 404:
                    raise
                obj = None
            if obj is not None:
                owners = {o.get("uid") for o in obj["metadata"].get("ownerReferences") or []}
                if uid in owners and (obj.get("status") or {}).get("phase") == "Running":
                    return pod
            time.sleep(self.poll)
        raise _JobGone()

    def _finish(self, name: str, uid: str, pod: str, exit_code: int, log: str) -> None:
        self._alive(name, uid)
        try:
            self.cp.set_pod_log(self.namespace, pod, log, container="pytorch")
            self.cp.finish_pod(self.namespace, pod, exit_code)
        except ApiError as e:
            if e.status == 404:  # deleted with its job meanwhile
                raise _JobGone() from None
            raise
        self.finished_at[name] = time.monotonic()

    def _script(self, job: dict) -> None:
        meta = job["metadata"]
        name, uid = meta["name"], meta["uid"]
        stage, attempt = meta["labels"]["r1-grpo.io/stage"], int(meta["labels"]["r1-grpo.io/attempt"])
        container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        output_dir = self.local(flag(container, "--output_dir"))
        behaviour = self.scripts.get((stage, attempt), "succeed")
        if behaviour == "pending":
            return
        pod = self._wait_running(name, uid)
        # a (re)started stage makes its folder untrusted, then resumes after its last complete checkpoint
        os.makedirs(output_dir, exist_ok=True)
        invalidate_manifest(output_dir)
        step = max(existing_steps(output_dir), default=0)
        if stage in TRAINING_STAGES:
            for _ in range(self.checkpoints_per_attempt):
                self._alive(name, uid)
                step += 10
                write_checkpoint(output_dir, step, uid[:8])
        gate = self.gates.get((stage, attempt))
        if behaviour == "hang" or gate is not None:
            while not self._stop.is_set() and not (gate is not None and gate.is_set()):
                time.sleep(0.02)
            if behaviour == "hang" or self._stop.is_set():
                return
        if behaviour == "fail":
            lines = [f"[rank0] step {s}: loss 0.{s:03d}" for s in range(1, 80)]
            self._finish(name, uid, pod, 1, "\n".join([*lines, OOM_LINE]) + "\n")
            return
        self._alive(name, uid)
        write_stage_output(
            output_dir,
            stage,
            steps=max(step, 1),
            model_from=flag(container, "--model_name_or_path"),
            metrics={"accuracy": 0.25 + 0.25 * ("sft", "grpo", "eval").index(stage), "attempt": attempt},
            weight_bytes=self.weight_bytes,
        )
        if behaviour == "corrupt":
            with open(os.path.join(output_dir, "model.safetensors"), "r+b") as f:
                f.write(b"\x00" * 16)
        elif behaviour == "no-manifest":
            os.remove(os.path.join(output_dir, "r1_stage.json"))
        self._finish(name, uid, pod, 0, f"{stage} finished\n")
