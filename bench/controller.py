"""Stage hand-off latency and API cost of the controller, on the real test control plane.

The control plane is tests/controlplane (kube-apiserver, etcd, controller manager, scheduler, kwok nodes,
the Kubeflow training operator v1.9.4), built by `make controlplane` and started here once. Its launcher,
tests/controlplane/cluster.py, is loaded by file path: bench/ does not import the test package, and the
launcher needs nothing but the standard library. The controller runs in this process with its own client.

For each run of sft -> grpo -> eval in a fresh namespace, the real operator creates each stage job's pod and
kwok starts it; this script plays the trainer (writes the stage output with trainer.contract.output, then
ends the pod as a kubelet would report an exit code of 0), once the controller has been idle on its watch
for a moment, so every hand-off starts from the steady state of a real run, where a stage takes hours. It
measures, from one watch on the namespace's PyTorchJobs (so both ends see the same delivery delay):

* hand-off latency: the stage's job Succeeded -> the next stage's PyTorchJob created (for the last stage:
  the status ConfigMap saying the run Succeeded). This includes the controller's watch wake-up, its relist,
  verifying the stage output (sha256 of the weights: --weights-mb), pruning old checkpoints, the status
  patch and the create;
* the operator's part before it: pod exit reported -> the job Succeeded (not the controller's doing);
* API requests per hand-off: the controller's requests (counted in its client) from the pod's exit to the
  next job's creation, by verb and resource; and per stage, from its job's creation to the next one.

    python bench/controller.py [--runs 5] [--weights-mb 1] [--keep-checkpoints 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.contract.output import write_manifest  # noqa: E402
from trainer.contract.stages import STAGE_MODULES, STAGES, model_sources  # noqa: E402
from trainer.executors.kubernetes.cluster import Cluster, load_api_client  # noqa: E402
from trainer.executors.kubernetes.controller import Controller  # noqa: E402
from trainer.executors.kubernetes.spec import EXIT_SUCCEEDED, ControllerConfig  # noqa: E402

RELEASE, MOUNT, CHECKPOINTS = "bench", "/checkpoints", 4
JOBS = "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"


def load_launcher():
    spec = importlib.util.spec_from_file_location(
        "r1_grpo_controlplane", REPO / "tests" / "controlplane" / "cluster.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stages_configmap() -> dict:
    """The contract's stages ConfigMap with minimal stage jobs (one Master pod, one GPU, the claim)."""
    import yaml

    sources = model_sources(list(STAGES))
    data, entries = {}, []
    for stage in STAGES:
        out = f"{MOUNT}/{RELEASE}/{stage}"
        model_from = f"{MOUNT}/{RELEASE}/{sources[stage]}" if sources[stage] else "builtin:tiny"
        labels = {
            "app.kubernetes.io/instance": RELEASE,
            "r1-grpo.io/stage": stage,
            "r1-grpo.io/attempt": "1",
        }
        container = {
            "name": "pytorch",
            "image": "r1-grpo:bench",
            "args": ["-m", STAGE_MODULES[stage], "--model_name_or_path", model_from, "--output_dir", out],
            "resources": {"limits": {"nvidia.com/gpu": "1"}},
            "volumeMounts": [{"name": "checkpoints", "mountPath": MOUNT}],
        }
        pod = {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [container],
            "volumes": [
                {"name": "checkpoints", "persistentVolumeClaim": {"claimName": f"{RELEASE}-checkpoints"}}
            ],
        }
        job = {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "metadata": {"name": f"{RELEASE}-{stage}-1", "labels": labels},
            "spec": {
                "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 0},
                "pytorchReplicaSpecs": {
                    "Master": {"replicas": 1, "restartPolicy": "Never", "template": {"spec": pod}}
                },
            },
        }
        data[f"{stage}.yaml"] = yaml.safe_dump(job)
        entries.append({"name": stage, "outputDir": out, "modelFrom": model_from, "job": f"{stage}.yaml"})
    data["pipeline.yaml"] = yaml.safe_dump({"release": RELEASE, "mountPath": MOUNT, "stages": entries})
    return {"metadata": {"name": f"{RELEASE}-stages"}, "data": data}


class CountingClient:
    """Records (time, method, path) of every request the controller's client sends."""

    def __init__(self, api) -> None:
        self.log: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()
        real = api.rest_client.request

        def request(method, url, query_params=None, *args, **kwargs):
            watch = any(k == "watch" and v for k, v in (query_params or []))
            with self.lock:
                self.log.append((time.monotonic(), "WATCH" if watch else method, url.split("?")[0]))
            return real(method, url, query_params, *args, **kwargs)

        api.rest_client.request = request

    def idle(self, quiet: float) -> bool:
        """The last request was a watch (still open: the controller waits on it) and is `quiet` s old."""
        with self.lock:
            return (
                bool(self.log) and self.log[-1][1] == "WATCH" and time.monotonic() - self.log[-1][0] > quiet
            )


def _kind(method: str, path: str) -> str:
    parts = path.rstrip("/").split("/")
    if "namespaces" in parts:
        rest = parts[parts.index("namespaces") + 2 :]
    else:
        rest = parts[-1:]
    resource = rest[0] if rest else path
    if len(rest) >= 3:
        resource += "/" + rest[2]
    verb = {"GET": "get" if len(rest) >= 2 else "list", "POST": "create", "PATCH": "patch", "WATCH": "watch"}
    return f"{verb.get(method, method.lower())} {resource}"


def one_run(launcher, cp, root: Path, run: int, weights_mb: float, keep: int) -> list[tuple]:
    ns = f"bench-{os.getpid() % 100000}-{run}"
    volume = root / ns
    volume.mkdir(parents=True)
    cp.create_namespace(ns)
    cp.request("POST", f"/api/v1/namespaces/{ns}/configmaps", stages_configmap())
    claim = f"{RELEASE}-checkpoints"
    cp.create_hostpath_pv(f"{ns}-checkpoints", volume, claim=(ns, claim))  # first: then it binds at once
    cp.request(
        "POST",
        f"/api/v1/namespaces/{ns}/persistentvolumeclaims",
        {
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )

    seen: list[tuple[float, str, str, tuple]] = []  # (time, event type, job, True condition types)
    stop = threading.Event()

    def watch_jobs() -> None:
        from kubernetes import client, watch

        api = client.CustomObjectsApi(cp.api_client())
        w = watch.Watch()
        while not stop.is_set():
            for ev in w.stream(
                api.list_namespaced_custom_object, "kubeflow.org", "v1", ns, "pytorchjobs", timeout_seconds=2
            ):
                obj = ev["object"]
                conds = tuple(
                    c["type"]
                    for c in (obj.get("status") or {}).get("conditions") or []
                    if c["status"] == "True"
                )
                seen.append((time.monotonic(), ev["type"], obj["metadata"]["name"], conds))

    watcher = threading.Thread(target=watch_jobs, daemon=True)
    watcher.start()
    api = load_api_client(str(cp.kubeconfig_path))
    counter = CountingClient(api)
    config = ControllerConfig(
        release=RELEASE,
        namespace=ns,
        stages_configmap=f"{RELEASE}-stages",
        status_configmap=f"{RELEASE}-status",
        keep_checkpoints=keep,
        mount_path=str(volume),
        resync_seconds=300,
    )
    controller = Controller(Cluster(api, ns), config)
    result: list = []
    runner = threading.Thread(target=lambda: result.append(controller.run()), daemon=True)
    runner.start()
    exited: dict[str, float] = {}
    try:
        for stage in STAGES:
            job, pod = f"{RELEASE}-{stage}-1", f"{RELEASE}-{stage}-1-master-0"

            def running(pod=pod) -> bool:
                try:
                    return (
                        cp.request("GET", f"/api/v1/namespaces/{ns}/pods/{pod}")["status"].get("phase")
                        == "Running"
                    )
                except launcher.ApiError:
                    return False

            cp.wait_for(f"{ns}/{pod} running", running, 120)
            out = volume / RELEASE / stage
            out.mkdir(parents=True, exist_ok=True)
            if stage != "eval":
                for step in range(10, 10 * CHECKPOINTS + 1, 10):
                    tmp = (
                        out / f".tmp-checkpoint-{step}"
                    )  # complete before it gets its name, as the trainer's
                    (tmp / "model").mkdir(parents=True)
                    (tmp / "model" / "model.safetensors").write_bytes(os.urandom(256))
                    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
                    tmp.rename(out / f"checkpoint-{step}")
                (out / "model.safetensors").write_bytes(os.urandom(int(weights_mb * (1 << 20))))
                (out / "config.json").write_text("{}")
            else:
                (out / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))
            write_manifest(out, stage, steps=10 * CHECKPOINTS, inputs={}, metrics={})
            cp.wait_for(f"the controller idle on its watch ({stage})", lambda: counter.idle(0.3), 120)
            exited[job] = time.monotonic()
            cp.finish_pod(ns, pod, 0)
        runner.join(120)
        if not result or result[0].exit_code != EXIT_SUCCEEDED:
            raise RuntimeError(f"run did not succeed: {result}")
    finally:
        controller.stop()
        stop.set()
        watcher.join(10)
        cp.delete_namespace(ns)

    def first(pred) -> float:
        return next(t for t, *rest in seen if pred(*rest))

    # the controller's job creates, in stage order (one each: a bench run has no retries)
    creates = [t for t, m, p in counter.log if m == "POST" and p.endswith("/pytorchjobs")]
    assert len(creates) == len(STAGES), creates
    rows = []
    for i, stage in enumerate(STAGES):
        job = f"{RELEASE}-{stage}-1"
        succeeded = first(lambda typ, name, conds, job=job: name == job and "Succeeded" in conds)
        if i + 1 < len(STAGES):
            nxt = f"{RELEASE}-{STAGES[i + 1]}-1"
            end = first(lambda typ, name, conds, nxt=nxt: name == nxt)
            sent = creates[i + 1]  # the request, sent before the watch shows the job
            label = f"{stage} -> {STAGES[i + 1]}"
        else:
            end = sent = next(t for t, method, path in counter.log if t > succeeded and method == "PATCH")
            label = f"{stage} -> run Succeeded"
        hand_off = Counter(_kind(m, p) for t, m, p in counter.log if exited[job] <= t <= sent)
        whole = sum(1 for t, *_ in counter.log if creates[i] <= t <= sent)
        rows.append((label, end - succeeded, succeeded - exited[job], hand_off, whole))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument(
        "--weights-mb", type=float, default=1.0, help="size of each training stage's final weights"
    )
    p.add_argument(
        "--keep-checkpoints", type=int, default=3, help=f"each training stage writes {CHECKPOINTS}"
    )
    args = p.parse_args(argv)
    if args.runs < 1 or args.weights_mb < 0 or args.keep_checkpoints < 1:
        p.error("--runs and --keep-checkpoints must be >= 1, --weights-mb >= 0")

    launcher = load_launcher()
    by_transition: dict[str, list[tuple]] = {}
    with tempfile.TemporaryDirectory(prefix="r1-grpo-bench-") as tmp:
        start = time.monotonic()
        with launcher.ControlPlane(Path(tmp) / "controlplane") as cp:
            print(f"control plane up in {time.monotonic() - start:.1f} s", file=sys.stderr)
            cp.create_gpu_node("bench-gpu-0")
            for r in range(args.runs):
                for label, *sample in one_run(
                    launcher, cp, Path(tmp) / "volumes", r, args.weights_mb, args.keep_checkpoints
                ):
                    by_transition.setdefault(label, []).append(tuple(sample))

    n_hand_offs = sum(len(v) for v in by_transition.values())
    print(
        f"controller hand-off on the real control plane (tests/controlplane): {args.runs} runs, {n_hand_offs} "
        f"hand-offs, weights {args.weights_mb:g} MiB per training stage, keep {args.keep_checkpoints} of "
        f"{CHECKPOINTS} checkpoints"
    )
    header = (
        "transition",
        "p50 ms",
        "max ms",
        "operator p50 ms",
        "requests",
        "requests/stage",
        "hand-off requests by verb (mean)",
    )
    rows = []
    for label, samples in by_transition.items():
        times = [s[0] * 1000 for s in samples]
        operator = [s[1] * 1000 for s in samples]
        total: Counter = Counter()
        for s in samples:
            total.update(s[2])
        n = len(samples)
        verbs = ", ".join(f"{k} {v / n:.1f}" for k, v in sorted(total.items()))
        rows.append(
            (
                label,
                f"{statistics.median(times):.1f}",
                f"{max(times):.1f}",
                f"{statistics.median(operator):.1f}",
                f"{sum(total.values()) / n:.1f}",
                f"{statistics.mean(s[3] for s in samples):.1f}",
                verbs,
            )
        )
    # the hand-offs proper: a stage's job Succeeded -> the next stage's job created
    jobs = [s[0] * 1000 for label, samples in by_transition.items() if "run" not in label for s in samples]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    print(
        f"job -> next job over {len(jobs)} hand-offs: p50 {statistics.median(jobs):.1f} ms, max {max(jobs):.1f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
