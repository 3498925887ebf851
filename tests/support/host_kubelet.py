"""The kubelet of the test cluster's fake nodes, played on this machine (tests/support/e2e.py has the release).

* `HostKubelet`: kwok runs no containers, so this stands in for the kubelet of one pod: it runs the pod's
  container command on this machine, with the pod's env (including what the training operator added), its
  args and working directory, paths under the pod's volume mounts translated to host directories, and
  then writes the container's exit code into the pod status (pods/status), which the training operator and
  the Job controller act on. What it cannot honour is said where it is done (rendezvous address, threads).
  With `R1_GRPO_E2E_IMAGE` naming a built image (`make image`), it runs them inside that image instead, as
  the node would (tests/support/image_kubelet.py; root, buildah and util-linux's unshare needed).
* `PodDriver`: a thread that gives every new Running pod of a namespace to a policy (run it, write its
  stage output directly, fail it, or leave it running).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.e2e import (
    JOB_NAME_LABEL,
    JOBSET_NAME_LABEL,
    Release,
    expand,
    free_port,
    host_env,
    now_rfc3339,
    resolve_env,
    service_account_kubeconfig,
)
from trainer.contract.output import write_manifest
from trainer.contract.stages import MODEL_STAGES

IMAGE_ENV = "R1_GRPO_E2E_IMAGE"  # names a built image: HostKubelet runs the pods' containers inside it


@dataclass
class PodRun:
    """One container of one pod, set up to run on this machine."""

    pod: dict
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    mounts: dict[str, Path]  # mountPath in the pod -> directory here
    container: dict  # the pod's container this runs
    pod_argv: list[str]  # command + args as the container sees them (pod paths)
    pod_env: dict[str, str]  # the container's env as it sees it (pod paths), stand-ins applied

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    def host_path(self, pod_path: str) -> Path:
        return Path(translate(pod_path, self.mounts))

    def arg(self, flag: str) -> str | None:
        """The value of `--flag value` among the container's args (host paths already translated)."""
        return self.argv[self.argv.index(flag) + 1] if flag in self.argv else None


def translate(value: str, mounts: dict[str, Path]) -> str:
    """A path (or `--flag=path`) under one of the pod's mount paths, as the same file on this machine."""
    prefix, sep, rest = value.partition("=") if value.startswith("--") else ("", "", value)
    for mount in sorted(mounts, key=len, reverse=True):
        if rest == mount or rest.startswith(mount.rstrip("/") + "/"):
            rest = str(mounts[mount]) + rest[len(mount.rstrip("/")) :]
            break
    return f"{prefix}{sep}{rest}"


class HostKubelet:
    """Runs pods' containers on this machine, the way the kubelet of their node would start them."""

    def __init__(self, cp: Any, namespace: str, workdir: Path):
        self.cp = cp
        self.namespace = namespace
        self.workdir = workdir

    def claim_dir(self, claim: str) -> Path:
        """The host directory behind a PVC: its bound PV's hostPath, as the API server records the binding."""
        pvc = self.cp.request("GET", f"/api/v1/namespaces/{self.namespace}/persistentvolumeclaims/{claim}")
        volume = (pvc.get("spec") or {}).get("volumeName")
        assert volume, f"PersistentVolumeClaim {claim} is not bound: {pvc.get('status')}"
        pv = self.cp.request("GET", f"/api/v1/persistentvolumes/{volume}")
        return Path(pv["spec"]["hostPath"]["path"])

    def secret_dir(self, namespace: str, source: dict, path: Path) -> Path:
        """A secret volume as the kubelet projects it: the Secret's keys (or the volume's `items`) as files."""
        secret = self.cp.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{source['secretName']}")
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        path.mkdir(parents=True, exist_ok=True)
        for item in source.get("items") or [{"key": k, "path": k} for k in data]:
            (path / item["path"]).write_bytes(data[item["key"]])
            (path / item["path"]).chmod(item.get("mode", source.get("defaultMode", 0o644)))
        return path

    def prepare(self, pod: dict, container: str | None = None) -> PodRun:
        spec = pod["spec"]
        c = next(c for c in spec["containers"] if container in (None, c["name"]))
        meta = pod["metadata"]
        scratch = self.workdir / "pods" / f"{meta['name']}-{meta['uid'][:8]}"
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: dict[str, Path] = {}
        for m in c.get("volumeMounts") or []:
            v = volumes[m["name"]]
            if "persistentVolumeClaim" in v:
                # subPath: the claim's folder (model.subPath); readOnly has no stand-in on the host
                claim_dir = self.claim_dir(v["persistentVolumeClaim"]["claimName"])
                mounts[m["mountPath"]] = claim_dir / m.get("subPath", "")
            elif "emptyDir" in v:
                path = scratch / m["name"]
                path.mkdir(parents=True, exist_ok=True)
                mounts[m["mountPath"]] = path
            elif "secret" in v:
                mounts[m["mountPath"]] = self.secret_dir(meta["namespace"], v["secret"], scratch / m["name"])
            elif any("serviceAccountToken" in src for src in (v.get("projected") or {}).get("sources") or []):
                continue  # the API token volume: given to the process as KUBECONFIG below
            else:
                raise NotImplementedError(
                    f"pod {meta['name']}: volume {m['name']} ({sorted(v)}) has no host stand-in"
                )
        env = resolve_env(
            c.get("env") or [],
            {
                "namespace": meta["namespace"],
                "name": meta["name"],
                "annotations": meta.get("annotations") or {},
                "labels": meta.get("labels") or {},
            },
        )
        # Stand-ins for what only a real node has: the Master's Service name does not resolve here (loopback
        # and a free port instead), and the shared 2-core test machine runs one thread per process.
        port = str(free_port())
        for name, value in (("MASTER_ADDR", "127.0.0.1"), ("PET_MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", port), ("PET_MASTER_PORT", port), ("OMP_NUM_THREADS", "1")):  # fmt: skip
            if name in env or name == "OMP_NUM_THREADS":
                env[name] = value
        pod_env = dict(env)
        pod_argv = [expand(a, pod_env) for a in [*(c.get("command") or []), *(c.get("args") or [])]]
        env = {k: translate(v, mounts) for k, v in env.items()}
        argv = [translate(a, mounts) for a in pod_argv]
        base = host_env()
        full_env = {
            **{
                k: base[k]
                for k in ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "R1_GRPO_CACHE", "TMPDIR")
                if k in base
            },
            **env,
        }
        if spec.get("automountServiceAccountToken", True):
            # the token a pod would find mounted, as a kubeconfig (no in-cluster paths on this machine)
            account = spec.get("serviceAccountName") or "default"
            full_env["KUBECONFIG"] = str(
                service_account_kubeconfig(self.cp, meta["namespace"], account, scratch / "kubeconfig")
            )
        executable = shutil.which(argv[0], path=full_env["PATH"])
        assert executable, f"pod {meta['name']}: command {argv[0]!r} not found on this machine"
        argv[0] = executable
        cwd = Path(translate(c.get("workingDir") or str(scratch), mounts))
        cwd.mkdir(parents=True, exist_ok=True)
        return PodRun(pod, argv, full_env, cwd, mounts, c, pod_argv, pod_env)

    def start(self, run: PodRun, log_path: Path) -> subprocess.Popen:
        image = os.environ.get(IMAGE_ENV)
        if image:
            from tests.support.image_kubelet import start_in_image  # buildah: only when asked for

            return start_in_image(image, run, log_path)
        log = open(log_path, "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            run.argv, env=run.env, cwd=run.cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return proc

    def run(self, run: PodRun, timeout: float = 900) -> tuple[int, str]:
        log_path = self.workdir / f"{run.name}-{time.monotonic_ns()}.log"
        proc = self.start(run, log_path)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(
                f"pod {run.name} ran longer than {timeout:.0f} s:\n{log_path.read_text()[-4000:]}"
            ) from None
        return code, log_path.read_text(errors="replace")

    def finish(self, pod: dict, exit_code: int, container: str | None = None) -> None:
        """Record the container's exit in the pod status, as the kubelet does: phase Succeeded or Failed."""
        meta = pod["metadata"]
        policy = pod["spec"].get("restartPolicy", "Always")
        if exit_code != 0 and policy != "Never":
            raise NotImplementedError(
                f"pod {meta['name']}: restartPolicy {policy} restarts a failed container in place (the pod "
                f"stays Running); this stand-in only ends pods, so use restartPolicy Never"
            )
        names = [c["name"] for c in pod["spec"]["containers"]]
        now = now_rfc3339()
        statuses = [
            {
                "name": n,
                "image": next(c["image"] for c in pod["spec"]["containers"] if c["name"] == n),
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {
                    "terminated": {
                        "exitCode": exit_code if container in (None, n) else 0,
                        "reason": "Completed" if exit_code == 0 else "Error",
                        "startedAt": (pod.get("status") or {}).get("startTime") or now,
                        "finishedAt": now,
                    }
                },
            }
            for n in names
        ]
        body = {
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": [
                    {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now},
                    {
                        "type": "ContainersReady",
                        "status": "False",
                        "reason": "PodCompleted",
                        "lastTransitionTime": now,
                    },
                ],
                "containerStatuses": statuses,
            }
        }
        self.cp.request(
            "PATCH",
            f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
            body,
            content_type="application/strategic-merge-patch+json",
        )


def write_stage_output(folder: Path, stage: str, *, steps: int = 1, note: str = "") -> None:
    """A complete stage output without training: a weight file for model stages and `r1_stage.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    if stage in MODEL_STAGES:
        (folder / "model.safetensors").write_bytes(os.urandom(256))
    metrics = {"accuracy": 0.5} if stage == "eval" else {"loss": 1.0}
    write_manifest(folder, stage, steps=steps, inputs={"note": note}, metrics=metrics)


def write_checkpoint(folder: Path, step: int) -> Path:
    """A complete checkpoint-<step>/ as far as the contract looks (its trainer_state.json written last)."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def pod_stage_attempt(pod: dict) -> tuple[str, int]:
    """(stage, attempt) of a training pod: its stage label and the number ending its job's name."""
    labels = pod["metadata"]["labels"]
    job = labels.get(JOB_NAME_LABEL) or labels[JOBSET_NAME_LABEL]
    return pod["metadata"]["labels"]["r1-grpo.io/stage"], int(job.rsplit("-", 1)[1])


Policy = Callable[[dict], str | None]


class PodDriver:
    """Hands each new Running pod of the namespace (selector: training pods) to `policy`, one at a time.

    The policy returns "run" (run the container here and record its exit code), "output" (write the
    stage's output directly, then succeed), "fail:<code>" (exit with that code), "hold" (leave it running;
    asked again next time) or None (leave it running, never ask again).
    """

    def __init__(self, release: Release, policy: Policy, selector: str = JOB_NAME_LABEL):
        self.release = release
        self.kubelet = HostKubelet(release.cp, release.namespace, release.workdir)
        self.policy = policy
        self.selector = selector
        self.handled: dict[str, str] = {}  # pod uid -> what was done
        self.runs: list[tuple[str, int, str]] = []  # (pod name, exit code, log) of "run" pods
        self.mounts: dict[str, dict[str, Path]] = {}  # pod name -> its mountPath -> folder here
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pod-driver", daemon=True)

    def __enter__(self) -> PodDriver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        if self.errors and exc[0] is None:
            raise self.errors[0]

    def host_path(self, pod: str, recorded: str) -> Path:
        """A path the pod's stage recorded (in its manifest) as the folder here: run on this machine, the pod
        saw host paths; run inside the image, its own mount paths."""
        return Path(translate(recorded, self.mounts[pod]) if os.environ.get(IMAGE_ENV) else recorded)

    def resumed_from(self, pod: str, log: str) -> tuple[Path, int] | None:
        """(checkpoint folder here, step) the pod's trainer says it resumed from in its log."""
        match = re.search(r"resumed from (\S+) \(step (\d+)\)", log)
        return (self.host_path(pod, match.group(1)), int(match.group(2))) if match else None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for pod in self.release.list("/api/v1", "pods", self.selector):
                    uid = pod["metadata"]["uid"]
                    if uid in self.handled or (pod.get("status") or {}).get("phase") != "Running":
                        continue
                    if pod["metadata"].get("deletionTimestamp"):
                        continue
                    self.handle(pod)
            except BaseException as e:  # noqa: BLE001 - raised again by __exit__
                traceback.print_exc()  # at once: the test may be stuck waiting for what this pod should do
                self.errors.append(e)
                return
            self._stop.wait(0.3)

    def handle(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        what = self.policy(pod)
        if what == "hold":
            return
        self.handled[uid] = what or "left"
        if what is None:
            return
        if what == "run":
            run = self.kubelet.prepare(pod)
            self.mounts[run.name] = run.mounts
            code, log = self.kubelet.run(run)
            self.runs.append((run.name, code, log))
            self.kubelet.finish(pod, code)
        elif what == "output":
            run = self.kubelet.prepare(pod)
            stage = pod["metadata"]["labels"]["r1-grpo.io/stage"]
            out = run.arg("--output_dir")
            assert out, f"pod {run.name} has no --output_dir"
            write_stage_output(Path(out), stage, note=f"written for pod {run.name}")
            self.kubelet.finish(pod, 0)
        elif what.startswith("fail:"):
            self.kubelet.finish(pod, int(what.split(":", 1)[1]))
        else:
            raise ValueError(f"policy answered {what!r}")
