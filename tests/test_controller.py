"""The stage controller on a real control plane (tests/controlplane: kube-apiserver, etcd, controller
manager, scheduler, kwok nodes and the Kubeflow training operator v1.9.4).

Each scenario gets its own namespace with what `helm install` would have made there: the stages ConfigMap,
the checkpoint claim bound to a hostPath PersistentVolume (a temporary folder, which the controller reads
as its mounted volume), and the controller's ServiceAccount bound to a Role with exactly the contract's
rules; the controller runs in this process (or as `r1-grpo controller`) with that account's token, so the
real RBAC authorizes every call. The real operator creates the stage jobs' pods and kwok starts them;
tests/support/kubelet.py plays the trainer in them (checkpoints, stage output, the pod's log and exit code).
Nothing in the controller or the client is patched; the controller is "killed" by dropping it (and its
client), or with SIGKILL, and starting a fresh one. What the controller sent is read from the apiserver's
audit log.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import pytest
import yaml
from kubernetes.client.rest import ApiException

from tests.controlplane.cluster import ApiError
from tests.support.kubelet import NOT_FOR_THIS_OPERATOR, OOM_LINE, SimulatedTrainer, stages_configmap
from trainer.contract.output import complete_checkpoints, verify_stage_output
from trainer.executors.kubernetes.cli import status_main
from trainer.executors.kubernetes.cluster import Cluster, JobList, WatchExpired, load_api_client
from trainer.executors.kubernetes.controller import Controller, RunResult
from trainer.executors.kubernetes.decide import CreateJob, Finish, ReportPending, Wait, decide
from trainer.executors.kubernetes.spec import (
    COMPONENT,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_FORBIDDEN,
    EXIT_SIGTERM,
    EXIT_SUCCEEDED,
    ControllerConfig,
    job_manifest,
    parse_pipeline,
)
from trainer.executors.kubernetes.status import AttemptRecord, RunStatus, StageRecord
from trainer.executors.kubernetes.world import JobState, PendingItem, World

REPO = Path(__file__).resolve().parent.parent
RELEASE = "r1"
NS = "team"  # for the decide() unit tests, which need no cluster
JOBS = "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"
CONTROLLER_ACCOUNT = "r1-grpo-controller"
# The controller's Role from docs/contract.md, as (api group, resource, verb).
CONTRACT_ROLE = frozenset(
    {("kubeflow.org", "pytorchjobs", v) for v in ("get", "list", "watch", "create")}
    | {("", "configmaps", v) for v in ("get", "create", "patch")}
    | {
        ("", "events", "create"),
        ("", "events", "list"),
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods/log", "get"),
        ("", "persistentvolumeclaims", "get"),
    }
)
GPU_NODES = ("controller-gpu-0", "controller-gpu-1")

_namespaces = itertools.count()


@pytest.fixture(scope="module")
def cp(control_plane):
    """The session's control plane with this module's GPU nodes (8 nvidia.com/gpu each, tainted)."""
    for name in GPU_NODES:
        try:
            control_plane.create_gpu_node(name)
        except ApiError as e:
            if e.status != 409:
                raise
    return control_plane


def role_rules(rules: frozenset[tuple[str, str, str]]) -> list[dict]:
    by_resource: dict[tuple[str, str], list[str]] = {}
    for group, resource, verb in sorted(rules):
        by_resource.setdefault((group, resource), []).append(verb)
    return [{"apiGroups": [g], "resources": [r], "verbs": v} for (g, r), v in by_resource.items()]


class RecordingCluster(Cluster):
    """The controller's Cluster with test hooks around three calls (the requests themselves are unchanged).

    `before_create` callbacks run before a job create is sent; `calls` records the resourceVersion of each
    list and watch; `expire_next_watch` makes the next watch start from resourceVersion 1, which is older
    than anything the apiserver's watch cache holds, as a version the controller kept too long would be:
    the real server answers 410 Expired.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.before_create: list[Callable[[dict], None]] = []
        self.calls: list[tuple[str, str]] = []
        self.expire_next_watch = threading.Event()

    def list_jobs(self, label_selector: str) -> JobList:
        out = super().list_jobs(label_selector)
        self.calls.append(("list", out.resource_version))
        return out

    def create_job(self, body: dict, dry_run: bool = False):
        if not dry_run:  # the start-up dry runs of every stage store nothing: hooks are for real creates
            for hook in self.before_create:
                hook(body)
        return super().create_job(body, dry_run=dry_run)

    def watch_jobs(self, label_selector: str, resource_version: str, timeout_seconds: int) -> Iterator[dict]:
        if self.expire_next_watch.is_set():
            self.expire_next_watch.clear()
            resource_version = "1"
        self.calls.append(("watch", resource_version))
        try:
            yield from super().watch_jobs(label_selector, resource_version, timeout_seconds)
        except WatchExpired:
            self.calls.append(("expired", resource_version))
            raise


class WireFaults:
    """Errors between the controller's client and the real API server, injected in the client.

    The real server cannot be made to answer a chosen request with 503 or 429, or to lose the answer to a
    create it carried out; a proxy would have to, and this is that proxy, inside the client: a rule either
    answers instead of the server (`after_sending=False`) or sends the request and then replaces the
    server's answer with the error (`after_sending=True`). Server-side dry runs (`dryRun` in the query)
    store nothing and are never matched: a rule is for the request that changes the cluster.
    """

    def __init__(self, api):
        self.rules: list[list] = []  # [method, path fragment, code, after_sending, remaining]
        self.injected: list[tuple[str, str, str | None, int]] = []  # (method, url, body's name, code)
        real = api.rest_client.request

        def request(method, url, *args, **kwargs):
            query = kwargs.get("query_params") or (args[0] if args else None) or []
            sent = url + ("?" + urlencode(query) if query else "")  # as it goes on the wire
            rule = next(
                (r for r in self.rules if r[4] > 0 and r[0] == method and url.split("?")[0].endswith(r[1])),
                None,
            )
            if rule is None or "dryRun=" in sent:
                return real(method, url, *args, **kwargs)
            rule[4] -= 1
            if rule[3]:
                real(method, url, *args, **kwargs)
            body = kwargs.get("body")
            name = ((body or {}).get("metadata") or {}).get("name") if isinstance(body, dict) else None
            self.injected.append((method, sent, name, rule[2]))
            err = ApiException(status=rule[2], reason="injected on the wire")
            err.body = json.dumps(
                {"kind": "Status", "status": "Failure", "code": rule[2], "message": "injected on the wire"}
            )
            raise err

        api.rest_client.request = request

    def fail_next(self, method: str, path: str, code: int, count: int = 1, after_sending: bool = False):
        self.rules.append([method, path, code, after_sending, count])


class StageCluster:
    """One scenario's namespace on the real control plane, set up as `helm install` would leave it."""

    def __init__(
        self,
        cp,
        root: Path,
        scripts: dict | None = None,
        stages: tuple[str, ...] = ("sft", "grpo", "eval"),
        configmap: dict | Callable[[str], dict] | None = None,
        pvc_phase: str = "Bound",
        operator: bool = True,
        trainer: bool = True,
        checkpoints_per_attempt: int = 4,
        release: str = RELEASE,
        role: frozenset = CONTRACT_ROLE,
        **job_options,
    ):
        self.cp = cp
        self.release = release
        self.ns = f"controller-{os.getpid() % 100000}-{next(_namespaces)}"
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.volume = root / "volume"
        self.volume.mkdir()
        cp.create_namespace(self.ns)
        if not operator:
            job_options["managed_by"] = NOT_FOR_THIS_OPERATOR
        if callable(configmap):
            configmap = configmap(self.ns)
        cm = configmap or stages_configmap(release, stages, **job_options)
        self.stages_cm = self.post("/api/v1/namespaces/{ns}/configmaps", cm)
        claim = f"{release}-checkpoints"
        self.pv = None
        if pvc_phase == "Bound":
            self.pv = f"{self.ns}-checkpoints"
            cp.create_hostpath_pv(self.pv, self.volume, claim=(self.ns, claim))
        self.post(
            "/api/v1/namespaces/{ns}/persistentvolumeclaims",
            {
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
        if self.pv:
            cp.wait_for(
                f"PVC {self.ns}/{claim} bound",
                lambda: (
                    self.get(f"/api/v1/namespaces/{{ns}}/persistentvolumeclaims/{claim}")["status"].get(
                        "phase"
                    )
                    == "Bound"
                ),
            )
        # the controller's identity: its ServiceAccount, bound to `role`
        self.post("/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": CONTROLLER_ACCOUNT}})
        rbac = "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}"
        self.post(f"{rbac}/roles", {"metadata": {"name": CONTROLLER_ACCOUNT}, "rules": role_rules(role)})
        self.post(
            f"{rbac}/rolebindings",
            {
                "metadata": {"name": CONTROLLER_ACCOUNT},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": CONTROLLER_ACCOUNT,
                },
                "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER_ACCOUNT, "namespace": self.ns}],
            },
        )
        self.user = f"system:serviceaccount:{self.ns}:{CONTROLLER_ACCOUNT}"
        token = cp.service_account_token(self.ns, CONTROLLER_ACCOUNT)
        self.kubeconfig = cp.write_token_kubeconfig(root / "kubeconfig", token, self.ns)
        self.trainer = SimulatedTrainer(
            cp, self.ns, self.volume, scripts=scripts, checkpoints_per_attempt=checkpoints_per_attempt
        )
        if trainer:
            self.trainer.start()
        self.clusters: list[RecordingCluster] = []

    # -- admin access (kubectl's part)
    def get(self, path: str) -> dict:
        return self.cp.request("GET", path.format(ns=self.ns))

    def post(self, path: str, body: dict) -> dict:
        return self.cp.request("POST", path.format(ns=self.ns), body)

    # -- the controller
    def config(self, **overrides) -> ControllerConfig:
        base = dict(
            release=self.release,
            namespace=self.ns,
            stages_configmap=f"{self.release}-stages",
            status_configmap=f"{self.release}-status",
            retries=2,
            keep_checkpoints=3,
            pending_timeout_seconds=1800.0,
            mount_path=str(self.volume),
            resync_seconds=1.0,
            error_backoff_seconds=0.05,
        )
        base.update(overrides)
        return ControllerConfig(**base)

    def api(self):
        return load_api_client(str(self.kubeconfig))

    def controller(self, max_writes: int | None = None, api=None, **overrides) -> Controller:
        # a fresh client and controller each time: nothing carries over except what is in the cluster
        cluster = RecordingCluster(api or self.api(), self.ns)
        self.clusters.append(cluster)
        return Controller(cluster, self.config(**overrides), max_writes=max_writes)

    def run(self, controller: Controller | None = None, timeout: float = 120.0, **overrides) -> RunResult:
        controller = controller or self.controller(**overrides)
        timer = threading.Timer(timeout, controller.stop)
        timer.start()
        try:
            result = controller.run()
        finally:
            timer.cancel()
        assert not self.trainer.errors, self.trainer.errors
        if not result.budget_spent:
            assert result.exit_code != EXIT_SIGTERM, f"the controller did not finish within {timeout}s"
        return result

    def run_in_thread(self, controller: Controller) -> tuple[threading.Thread, list[RunResult]]:
        out: list[RunResult] = []
        t = threading.Thread(target=lambda: out.append(controller.run()), daemon=True)
        t.start()
        return t, out

    def spawn(self, *extra: str) -> subprocess.Popen:
        """`r1-grpo controller` as a process, with the controller account's kubeconfig."""
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("KUBERNETES_SERVICE_HOST", None)
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trainer",
                "controller",
                "--release",
                self.release,
                "--namespace",
                self.ns,
                "--kubeconfig",
                str(self.kubeconfig),
                "--mount-path",
                str(self.volume),
                *extra,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # -- what the cluster says
    def status_cm(self) -> dict | None:
        try:
            return self.get(f"/api/v1/namespaces/{{ns}}/configmaps/{self.release}-status")
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def status(self) -> dict:
        cm = self.status_cm()
        assert cm is not None, "no status ConfigMap"
        return json.loads(cm["data"]["status.json"])

    def stage(self, name: str) -> dict:
        return next(s for s in self.status()["stages"] if s["name"] == name)

    def stage_message(self, name: str) -> str:
        """The stage's status message, or "" while there is no status yet (for polling)."""
        if self.status_cm() is None:
            return ""
        return next((s["message"] for s in self.status()["stages"] if s["name"] == name), "")

    def job(self, name: str) -> dict | None:
        try:
            return self.get(f"{JOBS}/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def job_phase(self, name: str) -> list[str]:
        conditions = ((self.job(name) or {}).get("status") or {}).get("conditions") or []
        return [c["type"] for c in conditions if c["status"] == "True"]

    def events(self) -> list[dict]:
        """The controller's Events (the operator and the scheduler record theirs in the namespace too)."""
        items = self.get("/api/v1/namespaces/{ns}/events")["items"]
        return [e for e in items if e.get("reportingComponent") == COMPONENT]

    def requests(self, stage: str = "ResponseComplete") -> list[dict]:
        """The controller's requests as the apiserver's audit log recorded them, oldest first."""
        return self.cp.audit_events(user=self.user, namespace=self.ns, stage=stage)

    def created(self, code: int = 201) -> list[str]:
        """Names of the PyTorchJobs the controller created and the server answered `code` for, in order."""
        return [
            e["objectRef"].get("name")
            for e in self.requests()
            if e["verb"] == "create"
            and e["objectRef"].get("resource") == "pytorchjobs"
            and "dryRun" not in e["requestURI"]
            and e["responseStatus"]["code"] == code
        ]

    def writes(self) -> list[tuple[str, str, str | None]]:
        return [
            (e["verb"], e["objectRef"].get("resource"), e["objectRef"].get("name"))
            for e in self.requests()
            if e["verb"] not in ("get", "list", "watch") and "dryRun" not in e["requestURI"]
        ]

    def verbs_used(self) -> set[tuple[str, str, str]]:
        out = set()
        for e in self.requests():
            ref = e["objectRef"]
            resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            out.add((ref.get("apiGroup", ""), resource, e["verb"]))
        return out

    def local(self, stage: str) -> Path:
        return self.volume / self.release / stage

    def steps(self, stage: str) -> list[int]:
        return [step for step, _ in complete_checkpoints(self.local(stage))]

    def close(self) -> None:
        self.trainer.stop()
        self.cp.delete_namespace(self.ns)
        if self.pv:
            with contextlib.suppress(ApiError):
                self.cp.request("DELETE", f"/api/v1/persistentvolumes/{self.pv}")


# (api group, resource, verb) the controller used, per scenario; the Role tests at the end compare the union.
VERBS_USED: dict[str, set[tuple[str, str, str]]] = {}
SCENARIOS: dict[str, Callable[[Callable[..., StageCluster]], None]] = {}


def scenario(fn: Callable[[Callable[..., StageCluster]], None]):
    """A scenario runs against namespaces made by `make`; the verbs its controllers use are recorded."""
    SCENARIOS[fn.__name__] = fn
    return fn


def run_scenario(name: str, root: Path, cp) -> None:
    made: list[StageCluster] = []

    def make(**kwargs) -> StageCluster:
        c = StageCluster(cp, root / f"cluster{len(made)}", **kwargs)
        made.append(c)
        return c

    try:
        SCENARIOS[name](make)
        for c in made:
            assert not c.trainer.errors, c.trainer.errors
    finally:
        used: set[tuple[str, str, str]] = set()
        for c in made:
            c.trainer.stop()
            used |= c.verbs_used()
            c.close()
        VERBS_USED[name] = used


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def idle_on_watch(c: StageCluster, quiet: float = 0.5) -> bool:
    """The controller has a watch open and has completed no other request for `quiet` seconds."""
    before = c.requests(stage=None)
    time.sleep(quiet)
    after = c.requests(stage=None)
    if len(after) != len(before) or not after:
        return False
    last = max(after, key=lambda e: e["stageTimestamp"])
    return last["verb"] == "watch" and last["stage"] == "ResponseStarted"


def manifest(c: StageCluster, stage: str) -> dict:
    return json.loads((c.local(stage) / "r1_stage.json").read_text())


def as_stored(c: StageCluster, job: dict) -> dict:
    """`job` as the server would store it (CRD defaults applied): a server-side dry-run create."""
    probe = json.loads(json.dumps(job))
    probe["metadata"]["name"] += "-dry-run"
    return c.cp.request("POST", f"{JOBS.format(ns=c.ns)}?dryRun=All", probe)


# ============================================================================================ scenarios


@scenario
def happy_path(make) -> None:
    c = make()
    # what the cluster looked like at each job creation: proves the hand-off order
    seen_at_create: dict[str, dict] = {}

    def snapshot(body: dict) -> None:
        jobs = c.get(JOBS)["items"]
        seen = {
            j["metadata"]["name"]: [
                x["type"] for x in (j.get("status") or {}).get("conditions", []) if x["status"] == "True"
            ][-1:]
            for j in jobs
        }
        seen["manifests"] = sorted(p.parent.name for p in c.volume.glob(f"{RELEASE}/*/r1_stage.json"))
        seen_at_create[body["metadata"]["name"]] = seen

    controller = c.controller()
    controller.cluster.before_create.append(snapshot)
    result = c.run(controller)
    assert result.exit_code == EXIT_SUCCEEDED, result.message
    assert c.created() == ["r1-sft-1", "r1-grpo-1", "r1-eval-1"]
    assert c.created(409) == []
    assert seen_at_create["r1-sft-1"] == {"manifests": []}
    assert seen_at_create["r1-grpo-1"] == {"r1-sft-1": ["Succeeded"], "manifests": ["sft"]}
    assert seen_at_create["r1-eval-1"] == {
        "r1-sft-1": ["Succeeded"],
        "r1-grpo-1": ["Succeeded"],
        "manifests": ["grpo", "sft"],
    }

    status = c.status()
    assert status["phase"] == "Succeeded" and status["finishedAt"] and status["startedAt"]
    lineage = {"sft": "builtin:tiny", "grpo": "/checkpoints/r1/sft", "eval": "/checkpoints/r1/grpo"}
    for stage, model_from in lineage.items():
        s = c.stage(stage)
        assert (s["phase"], s["attempt"], s["job"]) == ("Succeeded", 1, f"r1-{stage}-1"), s
        assert s["outputDir"] == f"/checkpoints/r1/{stage}" and s["modelFrom"] == model_from
        assert s["startTime"] and s["endTime"]
        m = manifest(c, stage)
        assert s["metrics"] == m["metrics"] and s["steps"] == m["steps"]
        # the trainer really was pointed at the previous stage's folder
        assert m["inputs"]["model_name_or_path"] == model_from
        verify_stage_output(c.local(stage), stage)

    # each created job is the ConfigMap's job as the server stores it: only name, attempt label and owner
    # differ (the server adds the CRD's defaults, the operator adds status)
    cm_uid = c.stages_cm["metadata"]["uid"]
    for stage in lineage:
        job = c.job(f"r1-{stage}-1")
        expected = yaml.safe_load(c.stages_cm["data"][f"{stage}.yaml"])
        assert job["spec"] == as_stored(c, expected)["spec"]
        assert job["metadata"]["labels"] == expected["metadata"]["labels"]
        assert job["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "r1-stages", "uid": cm_uid}
        ]

    # retention (keep 3 of the 4 checkpoints per training stage), final exports intact
    assert c.steps("sft") == [20, 30, 40] and c.steps("grpo") == [20, 30, 40]

    reasons = Counter(e["reason"] for e in c.events())
    assert reasons["JobCreated"] == 3 and reasons["RunSucceeded"] == 1 and reasons["CheckpointsPruned"] == 2
    assert reasons["StageSucceeded"] == 3
    assert {e["involvedObject"]["name"] for e in c.events()} == {"r1-status"}

    # a restarted controller finds the run finished: no writes at all, same exit code
    before = c.writes()
    assert c.run().exit_code == EXIT_SUCCEEDED
    assert c.writes() == before


def normalized(status: dict) -> dict:
    """A status without wall-clock times and what differs between namespaces, for comparing runs."""
    times = {"startedAt", "finishedAt", "updatedAt", "startTime", "endTime"}

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in times}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    out = strip(status)
    out.pop("stagesUid")  # each namespace has its own ConfigMap uid
    out.pop("namespace")
    return out


def assert_same_run(c: StageCluster, reference: dict, what: object) -> None:
    assert c.created() == ["r1-sft-1", "r1-grpo-1", "r1-eval-1"], what  # never twice, never skipped
    assert c.created(409) == [], what
    assert normalized(c.status()) == reference, what
    assert c.steps("sft") == [20, 30, 40] and c.steps("grpo") == [20, 30, 40], what
    for stage in ("sft", "grpo", "eval"):
        verify_stage_output(c.local(stage), stage)


# Runs of sft -> grpo -> eval in the kill test: one reference, one per budget (every controller instance of
# the run is stopped before its budget+1-th write, so budget 1 restarts the controller at every write of
# the run), one timed `r1-grpo controller` process, then runs whose first process is killed by SIGKILL at a
# random moment within the timed run's length, until RANDOM_KILLS kills happened (a process that finishes
# before its kill time still has its run checked; MAX_RANDOM_RUNS bounds the loop).
WRITE_BUDGETS = (1, 2, 3)
RANDOM_KILLS = 16
MAX_RANDOM_RUNS = 48


@scenario
def killed_and_restarted(make) -> None:
    """Kill the controller before each of its writes in turn, and at random moments with SIGKILL (in the
    middle of a request or of pruning a checkpoint folder too): every run completes with the reference's
    status, each job created exactly once, and the outputs intact."""
    ref = make()
    assert ref.run().exit_code == EXIT_SUCCEEDED
    reference = normalized(ref.status())
    ref.close()
    for budget in WRITE_BUDGETS:
        c = make()
        # the first instance is stopped before any write at all
        killed = c.run(c.controller(max_writes=0))
        assert killed.budget_spent and c.status_cm() is None
        kill_points: list[list[str]] = []
        while True:
            doomed = c.controller(max_writes=budget)
            result = c.run(doomed)
            kill_points.append(doomed.write_log)
            if not result.budget_spent:
                assert result.exit_code == EXIT_SUCCEEDED, (budget, kill_points, result.message)
                break
            assert len(doomed.write_log) == budget and len(kill_points) < 100, kill_points
        assert_same_run(c, reference, (budget, kill_points))
        # kills came at least after the status ConfigMap, 3 creates, 2 prunes and a status patch per stage
        # (how many patches depends on the job states the controller happens to see; a kill right after a
        # patch loses that pass's Events, which are best effort, never a decision)
        assert (len(kill_points) - 1) * budget >= 9, kill_points
        c.close()

    def first_request(c: StageCluster, before: int, proc: subprocess.Popen) -> None:
        wait_for(
            lambda: len(c.requests(stage=None)) > before or proc.poll() is not None,
            what="the controller's first request",
        )

    # how long one controller process takes here, from its first request to its exit: kill times are drawn
    # within it, so the kills land mid-run on a fast machine as on a slow one
    c = make()
    before = len(c.requests(stage=None))
    proc = c.spawn("--resync-seconds", "1")
    first_request(c, before, proc)
    started = time.monotonic()
    _, err = proc.communicate(timeout=120)
    run_seconds = time.monotonic() - started
    assert proc.returncode == EXIT_SUCCEEDED, err[-3000:]
    assert_same_run(c, reference, "timed")
    c.close()

    rng = random.Random(12)
    kills = runs = 0
    while kills < RANDOM_KILLS:
        runs += 1
        assert runs <= MAX_RANDOM_RUNS, (kills, runs, run_seconds)
        c = make()
        before = len(c.requests(stage=None))
        proc = c.spawn("--resync-seconds", "1")
        first_request(c, before, proc)
        try:
            proc.wait(timeout=rng.uniform(0, run_seconds))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            kills += 1
            before = len(c.requests(stage=None))
            proc = c.spawn("--resync-seconds", "1")  # the restarted controller runs to the end
            first_request(c, before, proc)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_SUCCEEDED, err[-3000:]
        assert_same_run(c, reference, ("random", runs))
        c.close()


@scenario
def retry_once_then_succeed(make) -> None:
    c = make(scripts={("sft", 1): "fail"})
    result = c.run()
    assert result.exit_code == EXIT_SUCCEEDED, result.message
    assert c.created() == ["r1-sft-1", "r1-sft-2", "r1-grpo-1", "r1-eval-1"]
    sft = c.stage("sft")
    assert (sft["phase"], sft["attempt"], sft["job"]) == ("Succeeded", 2, "r1-sft-2")
    first, second = sft["attempts"]
    assert first["phase"] == "Failed"
    # the operator's words at backoffLimit 0: no cause in them, which is why the log tail is kept
    assert first["message"] == "Job r1-sft-1 has failed because it has reached the specified backoff limit"
    # the log comes through the real pods/log path (apiserver -> the node's kubelet API, here kwok)
    assert first["logTail"].rstrip().endswith(OOM_LINE)
    assert len(first["logTail"].splitlines()) == 50  # --log-tail-lines default
    # the retry runs in the same folder and resumes from the last complete checkpoint of attempt 1
    assert second["phase"] == "Succeeded" and second["resumeFrom"] == "/checkpoints/r1/sft/checkpoint-40"
    assert second["cause"].startswith("retry after attempt 1 failed: Job r1-sft-1 has failed")
    assert manifest(c, "sft")["metrics"]["attempt"] == 2 and c.steps("sft") == [60, 70, 80]
    assert Counter(e["reason"] for e in c.events())["JobRetried"] == 1


@scenario
def fail_past_retries(make) -> None:
    c = make(scripts={("grpo", 1): "fail", ("grpo", 2): "fail"})
    result = c.run(retries=1)
    assert result.exit_code == EXIT_FAILED
    assert c.created() == ["r1-sft-1", "r1-grpo-1", "r1-grpo-2"]  # eval never starts
    status = c.status()
    assert status["phase"] == "Failed" and status["stage"] == "grpo"
    assert "stage grpo failed on attempt 2 of 2" in status["message"]
    assert "Job r1-grpo-2 has failed because it has reached the specified backoff limit" in status["message"]
    assert "torch.OutOfMemoryError: CUDA out of memory" in status["logTail"]
    assert [c.stage(s)["phase"] for s in ("sft", "grpo", "eval")] == ["Succeeded", "Failed", "Pending"]
    assert Counter(e["reason"] for e in c.events())["RunFailed"] == 1
    # restarting does not retry again: the outcome is the same
    before = c.writes()
    assert c.run(retries=1).exit_code == EXIT_FAILED
    assert c.writes() == before


@scenario
def succeeded_with_bad_output(make) -> None:
    for behaviour, reason in (
        ("corrupt", "does not match r1_stage.json"),
        ("no-manifest", "/checkpoints/r1/sft/r1_stage.json: missing"),
    ):
        c = make(scripts={("sft", 1): behaviour}, stages=("sft", "grpo"))
        result = c.run(retries=0)
        assert result.exit_code == EXIT_FAILED, behaviour
        assert c.created() == ["r1-sft-1"], behaviour  # grpo never starts from an untrusted folder
        assert c.job_phase("r1-sft-1")[-1:] == ["Succeeded"]  # the operator's verdict
        sft = c.stage("sft")
        assert sft["phase"] == "Failed" and sft["attempts"][0]["phase"] == "Failed"
        assert "job r1-sft-1 succeeded but its output is not trustworthy" in sft["message"]
        assert reason in sft["message"], sft["message"]
        assert c.status()["phase"] == "Failed"
    # with a retry left, the stage runs again and the run succeeds
    c = make(scripts={("sft", 1): "corrupt"})
    assert c.run(retries=1).exit_code == EXIT_SUCCEEDED
    assert c.created() == ["r1-sft-1", "r1-sft-2", "r1-grpo-1", "r1-eval-1"]
    assert "sha256" in c.stage("sft")["attempts"][0]["message"]


@scenario
def watch_expired_410(make) -> None:
    c = make()
    gate = c.trainer.gates[("grpo", 1)] = threading.Event()
    controller = c.controller()
    thread, out = c.run_in_thread(controller)
    wait_for(lambda: "Running" in c.job_phase("r1-grpo-1"), what="grpo running")
    calls = controller.cluster.calls
    controller.cluster.expire_next_watch.set()
    wait_for(lambda: ("expired", "1") in calls, what="a watch from an expired resourceVersion")
    at = calls.index(("expired", "1"))
    wait_for(lambda: any(kind == "watch" for kind, _ in calls[at + 1 :]), what="a new watch")
    gate.set()
    thread.join(60)
    assert out and out[0].exit_code == EXIT_SUCCEEDED
    # the server said 410 Expired; the controller relisted before watching again, from the new list's version
    after = calls[at + 1 :]
    first_watch = next(i for i, (kind, _) in enumerate(after) if kind == "watch")
    assert after[0][0] == "list" and after[first_watch - 1][0] == "list", after
    assert after[first_watch][1] == after[first_watch - 1][1], after
    assert any(
        e["verb"] == "watch" and "resourceVersion=1&" in e["requestURI"] + "&" for e in c.requests()
    ), "the expired watch never reached the server"
    assert c.created() == ["r1-sft-1", "r1-grpo-1", "r1-eval-1"]


@scenario
def job_deleted_by_hand(make) -> None:
    """Documented choice: the current stage's job is recreated under the same attempt (no retry used up);
    a finished stage's job deleted later is not re-run."""
    c = make()
    gate = c.trainer.gates[("grpo", 1)] = threading.Event()
    thread, out = c.run_in_thread(c.controller())
    wait_for(lambda: 40 in c.steps("grpo"), what="grpo running (its last checkpoint written)")
    old_uid = c.job("r1-grpo-1")["metadata"]["uid"]
    c.cp.request("DELETE", f"{JOBS.format(ns=c.ns)}/r1-grpo-1")  # kubectl delete pytorchjob r1-grpo-1
    wait_for(
        lambda: (c.job("r1-grpo-1") or {}).get("metadata", {}).get("uid") not in (None, old_uid),
        what="the job recreated",
    )
    c.cp.request("DELETE", f"{JOBS.format(ns=c.ns)}/r1-sft-1")  # a finished stage's job
    gate.set()
    thread.join(120)
    assert out and out[0].exit_code == EXIT_SUCCEEDED, out
    assert c.created() == ["r1-sft-1", "r1-grpo-1", "r1-grpo-1", "r1-eval-1"]
    grpo = c.stage("grpo")
    assert (grpo["phase"], grpo["attempt"], len(grpo["attempts"])) == ("Succeeded", 1, 1)
    assert c.stage("sft")["phase"] == "Succeeded" and c.job("r1-sft-1") is None
    assert Counter(e["reason"] for e in c.events())["JobRecreated"] == 1


@scenario
def pending_pod_reported(make) -> None:
    # the claim has no volume and the pod asks for more GPUs than a node has: the scheduler cannot place it
    c = make(scripts={("sft", 1): "pending"}, pvc_phase="Pending", gpus=64)
    controller = c.controller(pending_timeout_seconds=1.0)
    thread, out = c.run_in_thread(controller)
    # nothing changes on the job after its pod goes Pending: the report comes from the timeout alone
    wait_for(lambda: "pending for more than" in c.stage_message("sft"), what="the pending report")
    message = c.stage("sft")["message"]
    # the scheduler's own words ("0/N nodes are available: pod has unbound immediate PersistentVolumeClaims")
    assert message.startswith("pending for more than 1 s: pod r1-sft-1-master-0: Unschedulable: 0/"), message
    assert "unbound immediate PersistentVolumeClaims" in message
    assert "PersistentVolumeClaim r1-checkpoints is Pending" in message
    calls = controller.cluster.calls
    for i in range(3):  # more passes, each seeing a change to the job, must not report the same pod again
        poked = c.cp.request(
            "PATCH", f"{JOBS.format(ns=c.ns)}/r1-sft-1", {"metadata": {"annotations": {"poke": str(i)}}}
        )
        version = int(poked["metadata"]["resourceVersion"])
        # evidence that a whole pass ran on the changed job: it listed the jobs at or after the patch's
        # version, decided, acted, published, and went back to watching from there
        wait_for(
            lambda v=version: any(kind == "watch" and int(rv) >= v for kind, rv in calls),
            what=f"a pass that saw poke {i}",
        )
    assert c.stage("sft")["message"] == message  # stable across passes, not re-reported
    controller.stop()
    thread.join(30)
    assert out and out[0].exit_code == EXIT_SIGTERM
    pending_events = [e for e in c.events() if e["reason"] == "PendingTooLong"]
    assert len(pending_events) == 1 and pending_events[0]["type"] == "Warning"
    assert c.status()["phase"] == "Running"  # reported, not failed: capacity may still come

    # with the claim bound, the scheduler names the missing GPUs
    c = make(scripts={("sft", 1): "pending"}, stages=("sft",), gpus=64)
    controller = c.controller(pending_timeout_seconds=1.0)
    thread, out = c.run_in_thread(controller)
    wait_for(lambda: "pending for more than" in c.stage_message("sft"), what="the pending report")
    message = c.stage("sft")["message"]
    assert "Unschedulable: 0/" in message and "Insufficient nvidia.com/gpu" in message, message
    assert "PersistentVolumeClaim" not in message
    controller.stop()
    thread.join(30)


@scenario
def job_without_operator_reported(make) -> None:
    # runPolicy.managedBy names MultiKueue: the real operator leaves the job alone, it never gets a status
    c = make(operator=False)
    controller = c.controller(pending_timeout_seconds=1.0)
    thread, out = c.run_in_thread(controller)
    wait_for(lambda: "pending for more than" in c.stage_message("sft"), what="the report")
    assert (
        "job r1-sft-1 has no status yet: is the Kubeflow training operator running"
        in c.stage("sft")["message"]
    )
    assert c.job_phase("r1-sft-1") == []
    controller.stop()
    thread.join(30)
    assert out and out[0].exit_code == EXIT_SIGTERM


@scenario
def retention_keeps_exactly_n(make) -> None:
    c = make(checkpoints_per_attempt=5)
    gate = c.trainer.gates[("sft", 1)] = threading.Event()
    thread, out = c.run_in_thread(c.controller(keep_checkpoints=2))
    wait_for(lambda: 50 in c.steps("sft"), what="the fifth sft checkpoint")  # then the job waits at the gate
    partial = c.local("sft") / ".tmp-checkpoint-99"
    partial.mkdir()
    # pruned while the stage still runs (on a resync pass), never below the newest two
    wait_for(lambda: c.steps("sft") == [40, 50], what="pruning during the run")
    assert "Running" in c.job_phase("r1-sft-1")
    gate.set()
    thread.join(120)
    assert out and out[0].exit_code == EXIT_SUCCEEDED
    assert c.steps("sft") == [40, 50] and c.steps("grpo") == [40, 50]
    assert partial.is_dir()  # an in-progress save is the trainer's, not ours
    for stage in ("sft", "grpo", "eval"):
        verify_stage_output(c.local(stage), stage)  # the final export is never pruned
    assert c.stage("sft")["latestCheckpoint"] == "/checkpoints/r1/sft/checkpoint-50"


@scenario
def create_conflicts(make) -> None:
    # another controller instance creates the same job between our list and our create: 409 = success
    c = make()
    raced: list[bool] = []

    def race(body: dict) -> None:
        if body["metadata"]["name"] == "r1-grpo-1" and not raced:
            raced.append(True)
            stages = c.get(f"/api/v1/namespaces/{{ns}}/configmaps/{RELEASE}-stages")
            pipeline = parse_pipeline(stages, RELEASE)
            twin = job_manifest(pipeline, pipeline.stage("grpo"), 1, c.ns, f"{RELEASE}-stages")
            c.post(JOBS, twin)

    controller = c.controller()
    controller.cluster.before_create.append(race)
    assert c.run(controller).exit_code == EXIT_SUCCEEDED
    assert c.created() == ["r1-sft-1", "r1-eval-1"] and c.created(409) == ["r1-grpo-1"]
    assert c.stage("grpo")["phase"] == "Succeeded"

    # a job with our name that is not ours (other labels) is not adopted. Nobody plays its trainer: its
    # writes would race the controller's preparing the stage folder (moved aside), which is not under test.
    c = make(stages=("sft",), scripts={("sft", 1): "pending"})
    foreign = yaml.safe_load(c.stages_cm["data"]["sft.yaml"])
    foreign["metadata"]["labels"]["app.kubernetes.io/instance"] = "someone-else"
    c.post(JOBS, foreign)
    result = c.run()
    assert result.exit_code == EXIT_CONFIG
    assert f"PyTorchJob {c.ns}/r1-sft-1 already exists but is not this release's job" in c.status()["message"]


@scenario
def api_errors(make) -> None:
    # transient errors are retried with backoff; a create whose answer was lost is found by the next list
    c = make()
    api = c.api()
    faults = WireFaults(api)
    faults.fail_next("GET", "/pytorchjobs", 503, count=2)
    faults.fail_next("POST", "/pytorchjobs", 500, after_sending=True)
    faults.fail_next("PATCH", "/configmaps/r1-status", 429)
    assert c.run(c.controller(api=api)).exit_code == EXIT_SUCCEEDED
    assert [code for *_, code in faults.injected] == [503, 503, 500, 429]
    # the lost answer was the real create's (the start-up dry runs went through before it)
    posted = [(name, code) for method, _, name, code in faults.injected if method == "POST"]
    assert posted == [("r1-sft-1", 500)], faults.injected
    assert not any("dryRun" in url for _, url, *_ in faults.injected), faults.injected
    creates = [
        e for e in c.requests() if e["verb"] == "create" and e["objectRef"].get("resource") == "pytorchjobs"
    ]
    dry_runs = [e["objectRef"].get("name") for e in creates if "dryRun" in e["requestURI"]]
    assert "r1-sft-1" in dry_runs[:3], dry_runs
    # the server stored r1-sft-1 exactly once (201), and the controller never sent it again
    sft = [
        e["responseStatus"]["code"]
        for e in creates
        if e["objectRef"].get("name") == "r1-sft-1" and "dryRun" not in e["requestURI"]
    ]
    assert sft == [201], sft
    assert c.created() == ["r1-sft-1", "r1-grpo-1", "r1-eval-1"]  # r1-sft-1 once: not sent again
    assert c.created(409) == []
    assert c.status()["phase"] == "Succeeded"
    # a Role that lacks a verb is not retried forever: exit 3 with the server's message
    c = make(stages=("sft",), role=CONTRACT_ROLE - {("kubeflow.org", "pytorchjobs", "create")})
    result = c.run()
    assert result.exit_code == EXIT_FORBIDDEN
    assert result.message.startswith(
        f'403 Forbidden: pytorchjobs.kubeflow.org is forbidden: User "{c.user}" cannot create resource '
        f'"pytorchjobs" in API group "kubeflow.org" in the namespace "{c.ns}"'
    ), result.message
    assert c.created() == []


@scenario
def bad_stages_configmap(make) -> None:
    cm = stages_configmap(RELEASE, ("sft", "grpo"))
    del cm["data"]["grpo.yaml"]
    c = make(configmap=cm, trainer=False)
    result = c.run()
    assert result.exit_code == EXIT_CONFIG
    assert (
        f"ConfigMap {c.ns}/r1-stages: pipeline.yaml: stages[1].job: the ConfigMap has no key 'grpo.yaml'"
        in result.message
    )
    assert c.status()["message"] == result.message and c.status()["phase"] == "Failed"
    assert c.created() == []

    # the volume not mounted where the controller looks: refuse, rather than call every stage unverifiable
    c = make(trainer=False)
    result = c.run(mount_path=str(c.volume / "not-mounted"))
    assert result.exit_code == EXIT_CONFIG
    assert result.message.startswith(f"the checkpoint volume is not mounted at {c.volume / 'not-mounted'}")
    assert c.created() == []


# ============================================================================================ tests


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "killed_and_restarted"])
def test_scenario(name, tmp_path, cp):
    run_scenario(name, tmp_path, cp)


@pytest.mark.slow
def test_killed_and_restarted_at_every_write_and_at_random(tmp_path, cp):
    run_scenario("killed_and_restarted", tmp_path, cp)


def test_status_command(tmp_path, cp, capsys):
    c = StageCluster(cp, tmp_path / "ok", stages=("sft", "eval"))
    try:
        assert c.run().exit_code == EXIT_SUCCEEDED
        kubeconfig = str(c.kubeconfig)
        assert status_main(["--release", RELEASE, "--kubeconfig", kubeconfig]) == 0  # namespace from context
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert lines[0] == f"release r1 (namespace {c.ns}): Succeeded - all stages succeeded (sft, eval)"
        header = next(i for i, line in enumerate(lines) if line.startswith("STAGE"))
        assert lines[header].split() == [
            "STAGE",
            "PHASE",
            "ATTEMPT",
            "JOB",
            "STARTED",
            "FINISHED",
            "CHECKPOINT",
            "MESSAGE",
        ]
        sft = lines[header + 1].split()
        assert sft[:4] == ["sft", "Succeeded", "1/3", "r1-sft-1"] and sft[6] == "/checkpoints/r1/sft"
        assert "lineage: sft <- builtin:tiny; eval <- /checkpoints/r1/sft" in lines
        assert "metrics sft: accuracy=0.25, attempt=1" in lines
        assert (
            status_main(["--release", RELEASE, "--namespace", c.ns, "--kubeconfig", kubeconfig, "--json"])
            == 0
        )
        assert json.loads(capsys.readouterr().out)["phase"] == "Succeeded"
        # a release that is not there
        assert status_main(["--release", "nope", "-n", c.ns, "--kubeconfig", kubeconfig]) == 2
        assert f"ConfigMap {c.ns}/nope-status not found" in capsys.readouterr().err
        # a namespace the account may not read: the server's 403, exit 2
        assert status_main(["--release", RELEASE, "-n", "default", "--kubeconfig", kubeconfig]) == 2
        assert "cannot read ConfigMap r1-status: 403 Forbidden" in capsys.readouterr().err
    finally:
        c.close()

    c = StageCluster(cp, tmp_path / "bad", stages=("sft",), scripts={("sft", 1): "fail"})
    try:
        assert c.run(retries=0).exit_code == EXIT_FAILED
        assert status_main(["--release", RELEASE, "--kubeconfig", str(c.kubeconfig)]) == 1
        out = capsys.readouterr().out
        assert out.startswith(f"release r1 (namespace {c.ns}): Failed - stage sft failed on attempt 1 of 1")
        assert f"  | {OOM_LINE}" in out
    finally:
        c.close()


def test_process_exit_codes_and_sigterm(tmp_path, cp):
    # a run that fails: the process exits 1, logging JSON lines
    c = StageCluster(cp, tmp_path / "fail", stages=("sft",), scripts={("sft", 1): "fail"})
    try:
        proc = c.spawn("--retries", "0")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_FAILED, err
        records = [json.loads(line) for line in err.splitlines() if line.strip()]
        assert any(r["msg"] == "run finished" and r["phase"] == "Failed" for r in records)
    finally:
        c.close()

    # SIGTERM while waiting on the watch: stops at once, between actions, non-zero so the Job restarts it
    c = StageCluster(cp, tmp_path / "term", stages=("sft",), scripts={("sft", 1): "hang"})
    try:
        proc = c.spawn("--resync-seconds", "300")
        # steady state: the job hangs in Running after its checkpoints, the controller waits on its watch
        wait_for(
            lambda: (40 in c.steps("sft") and idle_on_watch(c)) or proc.poll() is not None,
            timeout=120,
            what="a watch",
        )
        assert proc.poll() is None, proc.communicate()
        writes = c.writes()
        proc.send_signal(signal.SIGTERM)
        # At once, not when its watch ends: with --resync-seconds 300 the watch runs 300 s, so a controller
        # that waited it out would miss this 120 s (a hang guard; an idle machine takes under a second).
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_SIGTERM, err
        assert c.writes() == writes  # nothing half done on the way out
        records = [json.loads(line) for line in err.splitlines() if line.strip()]
        assert any("SIGTERM" in r["msg"] for r in records)
        # it left the watch it was blocked in: the log says so, and no pass ran after the SIGTERM
        said = next(i for i, r in enumerate(records) if "SIGTERM" in r["msg"])
        assert not any(r["msg"] == "decided" for r in records[said:]), records[said:]
    finally:
        c.close()


def test_runs_the_charts_stages_configmap(tmp_path, cp):
    """The ConfigMap the real chart renders drives a run: its jobs pass the operator's webhook, their pods
    are admitted and scheduled on the GPU nodes (contract check between chart, operator and controller)."""
    from tests.support.helmtool import find_doc, render_chart

    rendered: list[dict] = []

    def chart_configmap(namespace: str) -> dict:
        rendered.extend(render_chart(release=RELEASE, namespace=namespace))
        return find_doc(rendered, "ConfigMap", f"{RELEASE}-stages")

    c = StageCluster(cp, tmp_path, configmap=chart_configmap)
    try:
        cm = c.stages_cm
        # the training pods run as the chart's trainer account
        c.post(
            "/api/v1/namespaces/{ns}/serviceaccounts",
            find_doc(rendered, "ServiceAccount", f"{RELEASE}-trainer"),
        )
        result = c.run(timeout=180)
        assert result.exit_code == EXIT_SUCCEEDED, c.status()["message"]
        pipeline = yaml.safe_load(cm["data"]["pipeline.yaml"])
        assert c.created() == [f"{RELEASE}-{s['name']}-1" for s in pipeline["stages"]]
    finally:
        c.close()


# ---------------------------------------------------------------------------------------- decide() directly


def _world(
    jobs: dict | None = None,
    stages=("sft", "grpo", "eval"),
    previous: RunStatus | None = None,
    pending=(),
    outputs=None,
    now=None,
) -> World:
    cm = stages_configmap(RELEASE, stages)
    cm["metadata"].update(namespace=NS, uid="uid-1")
    return World(
        now or datetime(2026, 1, 1, tzinfo=UTC),
        parse_pipeline(cm, RELEASE),
        jobs or {},
        outputs or {},
        tuple(pending),
        {},
        previous or RunStatus(RELEASE, NS),
    )


def _job(stage: str, attempt: int, phase: str, deleting: bool = False) -> dict:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    return {
        stage: {
            attempt: JobState(
                f"r1-{stage}-{attempt}", stage, attempt, phase, f"{phase} message", t, t, None, deleting
            )
        }
    }


def _config(**kw) -> ControllerConfig:
    return ControllerConfig(
        release=RELEASE, namespace=NS, stages_configmap="r1-stages", status_configmap="r1-status", **kw
    )


def test_decide_retry_budget_and_deletions():
    assert decide(_world(), _config()) == CreateJob("sft", 1, "start")
    assert decide(_world(_job("sft", 1, "Failed")), _config(retries=2)) == CreateJob(
        "sft", 2, "retry", "Failed message"
    )
    assert decide(_world(_job("sft", 3, "Failed")), _config(retries=2)) == Finish(
        "Failed", "stage sft failed on attempt 3 of 3: Failed message", "sft", 3
    )
    assert decide(_world(_job("sft", 1, "Failed")), _config(retries=0)).phase == "Failed"
    assert isinstance(decide(_world(_job("sft", 1, "Running", deleting=True)), _config()), Wait)
    # memory says attempt 2 was running; its job is gone: recreate the same attempt
    memory = RunStatus(
        RELEASE,
        NS,
        stages=[
            StageRecord("sft", phase="Running", attempt=2, attempts=[AttemptRecord(2, "r1-sft-2", "Running")])
        ],
    )
    action = decide(_world(previous=memory), _config())
    assert (type(action), action.stage, action.attempt, action.reason) == (CreateJob, "sft", 2, "recreate")
    # grpo has a job: sft is settled even though its job was deleted; nothing re-runs sft
    assert isinstance(decide(_world(_job("grpo", 1, "Running")), _config()), Wait)


def test_decide_pending_deadlines():
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    jobs = _job("sft", 1, "Created")
    young = PendingItem("pod/a/1", now - timedelta(seconds=10), "pod a: Unschedulable")
    old = PendingItem("pod/b/2", now - timedelta(seconds=31), "pod b: Unschedulable")
    assert decide(_world(jobs, pending=[young], now=now), _config(pending_timeout_seconds=30)) == Wait(
        now + timedelta(seconds=20)
    )
    assert decide(
        _world(jobs, pending=[young, old], now=now), _config(pending_timeout_seconds=30)
    ) == ReportPending("sft", (old,))
    reported = RunStatus(
        RELEASE, NS, stages=[StageRecord("sft", phase="Created", attempt=1, reported=["pod/b/2"])]
    )
    assert decide(
        _world(jobs, pending=[old], now=now, previous=reported), _config(pending_timeout_seconds=30)
    ) == Wait(None)


# ---------------------------------------------------------------------------------------- RBAC


def _verbs_over_all_scenarios(tmp_path: Path, cp) -> set[tuple[str, str, str]]:
    for name in SCENARIOS:  # normally all ran above; run what a -k selection skipped
        if name not in VERBS_USED and name != "killed_and_restarted":
            run_scenario(name, tmp_path / name, cp)
    return set().union(*VERBS_USED.values())


def test_controller_uses_exactly_the_contract_role(tmp_path, cp):
    # Every scenario's controller ran under a Role with exactly these rules, so nothing beyond them got
    # through; the audit log shows that together they used every one.
    assert _verbs_over_all_scenarios(tmp_path, cp) == CONTRACT_ROLE


def test_chart_role_grants_exactly_what_the_controller_uses(tmp_path, cp):
    from tests.support.helmtool import render_chart

    docs = render_chart(release=RELEASE, namespace=NS)
    # follow the controller Job's service account to its RoleBinding and Role
    job = next(
        d
        for d in docs
        if d.get("kind") == "Job"
        and "controller" in d["spec"]["template"]["spec"]["containers"][0].get("args", [])
    )
    account = job["spec"]["template"]["spec"]["serviceAccountName"]
    binding = next(
        d
        for d in docs
        if d.get("kind") == "RoleBinding"
        and any(s.get("kind") == "ServiceAccount" and s.get("name") == account for s in d["subjects"])
    )
    assert binding["roleRef"]["kind"] == "Role"
    role = next(
        d for d in docs if d.get("kind") == "Role" and d["metadata"]["name"] == binding["roleRef"]["name"]
    )
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }
    assert granted == _verbs_over_all_scenarios(tmp_path, cp)
