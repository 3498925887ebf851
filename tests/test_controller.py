"""The stage controller against a fake API server, through the real `kubernetes` client over HTTP.

A fake training operator (tests/support/fake_apiserver.py) reacts to the PyTorchJobs the controller creates: it
moves their conditions along and writes real stage outputs (checkpoints, weights, `r1_stage.json`) into a
temporary folder that plays the checkpoint volume. Nothing in the controller or the client is patched; the controller is
"killed" by dropping it (and its client) and starting a fresh one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.support.fake_apiserver import FakeApiServer, FakeTrainingOperator, stages_configmap
from trainer.contract.output import complete_checkpoints, verify_stage_output
from trainer.executors.kubernetes.cli import status_main
from trainer.executors.kubernetes.cluster import USER_AGENT, Cluster
from trainer.executors.kubernetes.controller import Controller, RunResult
from trainer.executors.kubernetes.decide import CreateJob, Finish, ReportPending, Wait, decide
from trainer.executors.kubernetes.spec import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_SIGTERM,
    EXIT_SUCCEEDED,
    ControllerConfig,
    parse_pipeline,
)
from trainer.executors.kubernetes.status import AttemptRecord, RunStatus, StageRecord
from trainer.executors.kubernetes.world import JobState, PendingItem, World

REPO = Path(__file__).resolve().parent.parent
RELEASE = "r1"
NS = "team"
JOBS = ("kubeflow.org", "v1")
# The controller's Role from docs/contract.md, as (api group, resource, verb).
CONTRACT_ROLE = (
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


class FakeCluster:
    """One scenario's cluster: API server, checkpoint volume (a temp folder), training operator."""

    def __init__(
        self,
        root: Path,
        scripts: dict | None = None,
        stages: tuple[str, ...] = ("sft", "grpo", "eval"),
        configmap: dict | None = None,
        pvc_phase: str = "Bound",
        operator: bool = True,
        checkpoints_per_attempt: int = 4,
        release: str = RELEASE,
    ):
        self.release = release
        self.server = FakeApiServer().start()
        self.volume = root / "volume"
        self.volume.mkdir(parents=True)
        # what `helm install` would have created
        self.stages_cm = self.server.create("configmaps", configmap or stages_configmap(release, stages), NS)
        self.server.create(
            "persistentvolumeclaims",
            {"metadata": {"name": f"{release}-checkpoints"}, "status": {"phase": pvc_phase}},
            NS,
        )
        self.operator = FakeTrainingOperator(
            self.server,
            NS,
            str(self.volume),
            scripts=scripts,
            checkpoints_per_attempt=checkpoints_per_attempt,
        )
        if operator:
            self.operator.start()

    def config(self, **overrides) -> ControllerConfig:
        base = dict(
            release=self.release,
            namespace=NS,
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

    def api(self, user_agent: str = USER_AGENT) -> client.ApiClient:
        api = client.ApiClient(client.Configuration(host=self.server.url))
        api.user_agent = user_agent
        return api

    def controller(self, max_writes: int | None = None, **overrides) -> Controller:
        # a fresh client and controller each time: nothing carries over except what is in the cluster
        return Controller(Cluster(self.api(), NS), self.config(**overrides), max_writes=max_writes)

    def run(self, controller: Controller | None = None, timeout: float = 30.0, **overrides) -> RunResult:
        controller = controller or self.controller(**overrides)
        timer = threading.Timer(timeout, controller.stop)
        timer.start()
        try:
            result = controller.run()
        finally:
            timer.cancel()
        assert not self.operator.errors, self.operator.errors
        if not result.budget_spent:
            assert result.exit_code != EXIT_SIGTERM, f"the controller did not finish within {timeout}s"
        return result

    def run_in_thread(self, controller: Controller) -> tuple[threading.Thread, list[RunResult]]:
        out: list[RunResult] = []
        t = threading.Thread(target=lambda: out.append(controller.run()), daemon=True)
        t.start()
        return t, out

    def status(self) -> dict:
        cm = self.server.get("configmaps", f"{self.release}-status", NS)
        assert cm is not None, "no status ConfigMap"
        return json.loads(cm["data"]["status.json"])

    def stage(self, name: str) -> dict:
        return next(s for s in self.status()["stages"] if s["name"] == name)

    def stage_message(self, name: str) -> str:
        """The stage's status message, or "" while there is no status yet (for polling)."""
        if self.server.get("configmaps", f"{self.release}-status", NS) is None:
            return ""
        return next((s["message"] for s in self.status()["stages"] if s["name"] == name), "")

    def created(self, code: int = 201) -> list[str]:
        """Names of the PyTorchJobs the controller POSTed and got `code` for, in order."""
        return [
            r.name
            for r in self.server.recorded(USER_AGENT)
            if r.verb == "create"
            and r.resource == "pytorchjobs"
            and r.code == code
            and r.query.get("dryRun") != "All"  # the start-up dry runs create nothing
        ]

    def writes(self) -> list[tuple[str, str, str | None]]:
        return [
            (r.verb, r.resource, r.name)
            for r in self.server.recorded(USER_AGENT)
            if r.verb not in ("get", "list", "watch") and r.query.get("dryRun") != "All"
        ]

    def events(self) -> list[dict]:
        return self.server.list("events", NS)

    def job(self, name: str) -> dict | None:
        return self.server.get("pytorchjobs", name, NS, *JOBS)

    def local(self, stage: str) -> Path:
        return self.volume / self.release / stage

    def steps(self, stage: str) -> list[int]:
        return [step for step, _ in complete_checkpoints(self.local(stage))]

    def close(self) -> None:
        self.operator.stop()
        self.server.stop()


# (api group, resource, verb) the controller used, per scenario; the Role tests at the end compare the union.
VERBS_USED: dict[str, set[tuple[str, str, str]]] = {}
SCENARIOS: dict[str, Callable[[Callable[..., FakeCluster]], None]] = {}


def scenario(fn: Callable[[Callable[..., FakeCluster]], None]):
    """A scenario runs against fake clusters made by `make`; the verbs its controllers use are recorded."""
    SCENARIOS[fn.__name__] = fn
    return fn


def run_scenario(name: str, root: Path) -> None:
    made: list[FakeCluster] = []

    def make(**kwargs) -> FakeCluster:
        c = FakeCluster(root / f"cluster{len(made)}", **kwargs)
        made.append(c)
        return c

    try:
        SCENARIOS[name](make)
        for c in made:
            assert not c.operator.errors, c.operator.errors
    finally:
        used: set[tuple[str, str, str]] = set()
        for c in made:
            c.close()
            used |= c.server.verbs_used(USER_AGENT)
        VERBS_USED[name] = used


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def idle_on_watch(c: FakeCluster, quiet: float = 0.2) -> bool:
    """The controller has a watch open and has sent nothing else for `quiet` seconds."""
    before = len(c.server.recorded(USER_AGENT))
    time.sleep(quiet)
    return c.server.open_watches() > 0 and len(c.server.recorded(USER_AGENT)) == before


def manifest(c: FakeCluster, stage: str) -> dict:
    return json.loads((c.local(stage) / "r1_stage.json").read_text())


# ============================================================================================ scenarios


@scenario
def happy_path(make) -> None:
    c = make()
    # what the cluster looked like at each job creation: proves the hand-off order
    seen_at_create: dict[str, dict[str, str]] = {}

    def snapshot(req) -> None:
        if req.verb == "create" and req.resource == "pytorchjobs" and req.user_agent == USER_AGENT:
            seen_at_create[req.name] = {
                j["metadata"]["name"]: [
                    x["type"] for x in (j.get("status") or {}).get("conditions", []) if x["status"] == "True"
                ][-1:]
                for j in c.server.list("pytorchjobs", NS, *JOBS)
            }
            seen_at_create[req.name]["manifests"] = sorted(
                p.parent.name for p in c.volume.glob(f"{RELEASE}/*/r1_stage.json")
            )

    c.server.add_hook(snapshot)
    result = c.run()
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

    # each created job is the ConfigMap's job: only name, attempt label and owner differ
    cm_uid = c.stages_cm["metadata"]["uid"]
    for stage in lineage:
        job = c.job(f"r1-{stage}-1")
        expected = yaml.safe_load(c.stages_cm["data"][f"{stage}.yaml"])
        assert job["spec"] == expected["spec"]
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
    """A status without wall-clock times, for comparing runs."""
    times = {"startedAt", "finishedAt", "updatedAt", "startTime", "endTime"}

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in times}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    out = strip(status)
    out.pop("stagesUid")  # each fake cluster has its own ConfigMap uid
    return out


@scenario
def killed_and_restarted_at_every_write(make) -> None:
    """Stop the controller before each of its writes in turn, start a fresh one: same run, no duplicates."""
    ref = make()
    assert ref.run().exit_code == EXIT_SUCCEEDED
    reference = normalized(ref.status())
    ref.close()
    restarts = 0
    for k in range(100):
        c = make()
        doomed = c.controller(max_writes=k)
        killed = c.run(doomed)
        if not killed.budget_spent:  # k is past this run's last write: it simply finished
            assert killed.exit_code == EXIT_SUCCEEDED and doomed.writes <= k
            assert normalized(c.status()) == reference
            c.close()
            break
        # Events never feed back into decisions: a kill right after an Event leaves the same state as a kill
        # right before it, which an earlier k covered. (How many writes a run makes depends on which job
        # states the controller happens to see, so the kill points come from each run itself.)
        if k > 0 and doomed.write_log[-1].startswith("event"):
            c.close()
            continue
        restarts += 1
        result = c.run()
        assert result.exit_code == EXIT_SUCCEEDED, (k, doomed.write_log, result.message)
        assert c.created() == ["r1-sft-1", "r1-grpo-1", "r1-eval-1"], k  # never twice, never skipped
        assert c.created(409) == [], k
        assert normalized(c.status()) == reference, (k, doomed.write_log)
        assert c.steps("sft") == [20, 30, 40] and c.steps("grpo") == [20, 30, 40], k
        for stage in ("sft", "grpo", "eval"):
            verify_stage_output(c.local(stage), stage)
        c.close()
    else:
        raise AssertionError("the controller never finished within 100 writes")
    # at least: before the status ConfigMap, after it, after each of 3 job creates, 2 prunes and the status patches
    assert restarts >= 12, restarts


@scenario
def retry_once_then_succeed(make) -> None:
    c = make(scripts={("sft", 1): "fail"})
    result = c.run()
    assert result.exit_code == EXIT_SUCCEEDED, result.message
    assert c.created() == ["r1-sft-1", "r1-sft-2", "r1-grpo-1", "r1-eval-1"]
    sft = c.stage("sft")
    assert (sft["phase"], sft["attempt"], sft["job"]) == ("Succeeded", 2, "r1-sft-2")
    first, second = sft["attempts"]
    assert first["phase"] == "Failed" and "1 Master replica(s) failed" in first["message"]
    assert first["logTail"].rstrip().endswith("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert len(first["logTail"].splitlines()) == 50  # --log-tail-lines default
    # the retry runs in the same folder and resumes from the last complete checkpoint of attempt 1
    assert second["phase"] == "Succeeded" and second["resumeFrom"] == "/checkpoints/r1/sft/checkpoint-40"
    assert second["cause"].startswith("retry after attempt 1 failed: PyTorchJob r1-sft-1 is failed")
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
    assert "PyTorchJob r1-grpo-2 is failed because 1 Master replica(s) failed" in status["message"]
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
        c = make(scripts={("sft", 1): behaviour})
        result = c.run(retries=0)
        assert result.exit_code == EXIT_FAILED, behaviour
        assert c.created() == ["r1-sft-1"], behaviour  # grpo never starts from an untrusted folder
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
def watch_broken_with_410(make) -> None:
    c = make()
    gate = c.operator.gates[("grpo", 1)] = threading.Event()
    thread, out = c.run_in_thread(c.controller())
    job_running = lambda: "Running" in str((c.job("r1-grpo-1") or {}).get("status"))  # noqa: E731
    wait_for(lambda: job_running() and idle_on_watch(c), what="the controller watching grpo")
    mark = len(c.server.recorded(USER_AGENT))
    c.server.compact()  # every resourceVersion the controller has seen is now too old
    compacted_at = c.server.resource_version()
    c.server.break_watches()  # the open watch gets an ERROR event with a 410 Status
    wait_for(
        lambda: c.server.open_watches() > 0 and len(c.server.recorded(USER_AGENT)) > mark + 2,
        what="a new watch",
    )
    gate.set()
    thread.join(30)
    assert out and out[0].exit_code == EXIT_SUCCEEDED
    after = c.server.recorded(USER_AGENT)[mark:]
    verbs = [r.verb for r in after]
    # relist before watching again, and never watch from a compacted version
    assert "list" in verbs and verbs.index("list") < verbs.index("watch")
    assert all(int(r.query["resourceVersion"]) >= compacted_at for r in after if r.verb == "watch")
    assert c.created() == ["r1-sft-1", "r1-grpo-1", "r1-eval-1"]


@scenario
def job_deleted_by_hand(make) -> None:
    """Documented choice: the current stage's job is recreated under the same attempt (no retry used up);
    a finished stage's job deleted later is not re-run."""
    c = make()
    gate = c.operator.gates[("grpo", 1)] = threading.Event()
    thread, out = c.run_in_thread(c.controller())
    wait_for(lambda: 40 in c.steps("grpo"), what="grpo running (its last checkpoint written)")
    old_uid = c.job("r1-grpo-1")["metadata"]["uid"]
    kubectl = client.CustomObjectsApi(c.api("kubectl/test"))
    kubectl.delete_namespaced_custom_object(*JOBS, NS, "pytorchjobs", "r1-grpo-1")
    wait_for(
        lambda: (c.job("r1-grpo-1") or {}).get("metadata", {}).get("uid") not in (None, old_uid),
        what="the job recreated",
    )
    kubectl.delete_namespaced_custom_object(*JOBS, NS, "pytorchjobs", "r1-sft-1")  # a finished stage's job
    gate.set()
    thread.join(30)
    assert out and out[0].exit_code == EXIT_SUCCEEDED, out
    assert c.created() == ["r1-sft-1", "r1-grpo-1", "r1-grpo-1", "r1-eval-1"]
    grpo = c.stage("grpo")
    assert (grpo["phase"], grpo["attempt"], len(grpo["attempts"])) == ("Succeeded", 1, 1)
    assert c.stage("sft")["phase"] == "Succeeded" and c.job("r1-sft-1") is None
    assert Counter(e["reason"] for e in c.events())["JobRecreated"] == 1


@scenario
def pending_pod_reported(make) -> None:
    c = make(scripts={("sft", 1): "pending"}, pvc_phase="Pending")
    controller = c.controller(pending_timeout_seconds=1.0)
    thread, out = c.run_in_thread(controller)
    # nothing changes on the job after its pod goes Pending: the report comes from the timeout alone
    wait_for(lambda: "pending for more than" in c.stage_message("sft"), what="the pending report")
    message = c.stage("sft")["message"]
    assert (
        "pod r1-sft-1-master-0: Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu"
        in message
    )
    assert "PersistentVolumeClaim r1-checkpoints is Pending" in message
    for i in range(3):  # more passes must not report the same pod again
        c.server.update(
            "pytorchjobs",
            "r1-sft-1",
            NS,
            lambda o, i=i: o["metadata"].setdefault("annotations", {}).update(poke=str(i)),
            *JOBS,
        )
        time.sleep(0.1)
    assert c.stage("sft")["message"] == message  # stable across passes, not re-reported
    assert message.startswith("pending for more than 1 s: ")
    controller.stop()
    thread.join(10)
    assert out and out[0].exit_code == EXIT_SIGTERM
    pending_events = [e for e in c.events() if e["reason"] == "PendingTooLong"]
    assert len(pending_events) == 1 and pending_events[0]["type"] == "Warning"
    assert c.status()["phase"] == "Running"  # reported, not failed: capacity may still come


@scenario
def job_without_operator_reported(make) -> None:
    c = make(operator=False)
    controller = c.controller(pending_timeout_seconds=1.0)
    thread, out = c.run_in_thread(controller)
    wait_for(lambda: "pending for more than" in c.stage_message("sft"), what="the report")
    assert (
        "job r1-sft-1 has no status yet: is the Kubeflow training operator running"
        in c.stage("sft")["message"]
    )
    controller.stop()
    thread.join(10)


@scenario
def retention_keeps_exactly_n(make) -> None:
    c = make(checkpoints_per_attempt=5)
    gate = c.operator.gates[("sft", 1)] = threading.Event()
    thread, out = c.run_in_thread(c.controller(keep_checkpoints=2))
    wait_for(lambda: 50 in c.steps("sft"), what="the fifth sft checkpoint")  # then the job waits at the gate
    partial = c.local("sft") / ".tmp-checkpoint-99"
    partial.mkdir()
    # pruned while the stage still runs (on a resync pass), never below the newest two
    wait_for(lambda: c.steps("sft") == [40, 50], what="pruning during the run")
    assert "Running" in str(c.job("r1-sft-1")["status"])
    gate.set()
    thread.join(30)
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
    base = yaml.safe_load(c.stages_cm["data"]["grpo.yaml"])
    owner = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "r1-stages",
        "uid": c.stages_cm["metadata"]["uid"],
    }
    base["metadata"]["ownerReferences"] = [owner]  # as the other controller instance makes it
    raced: list[bool] = []

    def race(req) -> None:
        dry = req.query.get("dryRun") == "All"
        if (
            req.verb == "create"
            and req.name == "r1-grpo-1"
            and req.user_agent == USER_AGENT
            and not raced
            and not dry
        ):
            raced.append(True)
            c.server.create("pytorchjobs", base, NS, *JOBS)

    c.server.add_hook(race)
    assert c.run().exit_code == EXIT_SUCCEEDED
    assert c.created() == ["r1-sft-1", "r1-eval-1"] and c.created(409) == ["r1-grpo-1"]
    assert c.stage("grpo")["phase"] == "Succeeded"

    # a job with our name that is not ours (other labels) is not adopted
    c = make(stages=("sft",))
    foreign = yaml.safe_load(c.stages_cm["data"]["sft.yaml"])
    foreign["metadata"]["labels"]["app.kubernetes.io/instance"] = "someone-else"
    c.server.create("pytorchjobs", foreign, NS, *JOBS)
    result = c.run()
    assert result.exit_code == EXIT_CONFIG
    assert "PyTorchJob team/r1-sft-1 already exists but is not this release's job" in c.status()["message"]


@scenario
def api_errors(make) -> None:
    # transient errors are retried with backoff; a create whose answer was lost is found by the next list
    c = make()
    c.server.fail_next("list", "pytorchjobs", 503, count=2)
    c.server.fail_next("create", "pytorchjobs", 500, after_applying=True)
    c.server.fail_next("patch", "configmaps", 429)
    assert c.run().exit_code == EXIT_SUCCEEDED
    assert c.created(500) == ["r1-sft-1"] and c.created(409) == []  # not sent again
    assert c.created() == ["r1-grpo-1", "r1-eval-1"]
    assert c.status()["phase"] == "Succeeded"
    # a Role that lacks a verb is not retried forever: exit 3 with the server's message
    c = make(stages=("sft",))
    c.server.fail_next("create", "pytorchjobs", 403)
    result = c.run()
    assert result.exit_code == 3 and result.message.startswith("403 Forbidden: injected failure")
    assert c.created() == []


@scenario
def bad_stages_configmap(make) -> None:
    cm = stages_configmap(RELEASE, ("sft", "grpo"))
    del cm["data"]["grpo.yaml"]
    c = make(configmap=cm, operator=False)
    result = c.run()
    assert result.exit_code == EXIT_CONFIG
    assert (
        "ConfigMap team/r1-stages: pipeline.yaml: stages[1].job: the ConfigMap has no key 'grpo.yaml'"
        in result.message
    )
    assert c.status()["message"] == result.message and c.status()["phase"] == "Failed"
    assert c.created() == []

    # the volume not mounted where the controller looks: refuse, rather than call every stage unverifiable
    c = make(operator=False)
    result = c.run(mount_path=str(c.volume / "not-mounted"))
    assert result.exit_code == EXIT_CONFIG
    assert result.message.startswith(f"the checkpoint volume is not mounted at {c.volume / 'not-mounted'}")
    assert c.created() == []


# ============================================================================================ tests


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "killed_and_restarted_at_every_write"])
def test_scenario(name, tmp_path):
    run_scenario(name, tmp_path)


@pytest.mark.slow
def test_killed_and_restarted_at_every_write(tmp_path):
    run_scenario("killed_and_restarted_at_every_write", tmp_path)


def _kubeconfig(c: FakeCluster, tmp_path: Path) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(c.server.kubeconfig(NS)))
    return str(path)


def test_status_command(tmp_path, capsys):
    c = FakeCluster(tmp_path / "ok", stages=("sft", "eval"))
    try:
        assert c.run().exit_code == EXIT_SUCCEEDED
        kubeconfig = _kubeconfig(c, tmp_path)
        assert status_main(["--release", RELEASE, "--kubeconfig", kubeconfig]) == 0  # namespace from context
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert lines[0] == "release r1 (namespace team): Succeeded - all stages succeeded (sft, eval)"
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
            status_main(["--release", RELEASE, "--namespace", NS, "--kubeconfig", kubeconfig, "--json"]) == 0
        )
        assert json.loads(capsys.readouterr().out)["phase"] == "Succeeded"
        # a release that is not there
        assert status_main(["--release", "nope", "-n", NS, "--kubeconfig", kubeconfig]) == 2
        assert "ConfigMap team/nope-status not found" in capsys.readouterr().err
    finally:
        c.close()

    c = FakeCluster(tmp_path / "bad", stages=("sft",), scripts={("sft", 1): "fail"})
    try:
        assert c.run(retries=0).exit_code == EXIT_FAILED
        assert (
            status_main(["--release", RELEASE, "--namespace", NS, "--kubeconfig", _kubeconfig(c, tmp_path)])
            == 1
        )
        out = capsys.readouterr().out
        assert out.startswith("release r1 (namespace team): Failed - stage sft failed on attempt 1 of 1")
        assert "  | torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" in out
    finally:
        c.close()


def _spawn_controller(c: FakeCluster, tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainer",
            "controller",
            "--release",
            RELEASE,
            "--namespace",
            NS,
            "--kubeconfig",
            _kubeconfig(c, tmp_path),
            "--mount-path",
            str(c.volume),
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_process_exit_codes_and_sigterm(tmp_path):
    # a run that fails: the process exits 1, logging JSON lines
    c = FakeCluster(tmp_path / "fail", stages=("sft",), scripts={("sft", 1): "fail"})
    try:
        proc = _spawn_controller(c, tmp_path, "--retries", "0")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == EXIT_FAILED, err
        records = [json.loads(line) for line in err.splitlines() if line.strip()]
        assert any(r["msg"] == "run finished" and r["phase"] == "Failed" for r in records)
    finally:
        c.close()

    # SIGTERM while waiting on the watch: stops at once, between actions, non-zero so the Job restarts it
    c = FakeCluster(tmp_path / "term", stages=("sft",), scripts={("sft", 1): "hang"})
    try:
        proc = _spawn_controller(c, tmp_path, "--resync-seconds", "300")
        # steady state: the job hangs in Running after its checkpoints, the controller waits on its watch
        wait_for(
            lambda: (40 in c.steps("sft") and idle_on_watch(c, 0.3)) or proc.poll() is not None,
            timeout=60,
            what="a watch",
        )
        assert proc.poll() is None, proc.communicate()
        writes = c.writes()
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == EXIT_SIGTERM, err
        assert time.monotonic() - start < 5
        assert c.writes() == writes  # nothing half done on the way out
        records = [json.loads(line) for line in err.splitlines() if line.strip()]
        assert any("SIGTERM" in r["msg"] for r in records)
    finally:
        c.close()


def test_runs_the_charts_stages_configmap(tmp_path):
    """The ConfigMap the real chart renders drives a run (contract check between chart and controller)."""
    if not (REPO / "charts" / "r1-grpo" / "templates" / "stages-configmap.yaml").exists():
        pytest.skip("charts/r1-grpo has no stages ConfigMap template yet")
    from tests.support.helmtool import find_doc, render_chart

    docs = render_chart(release=RELEASE, namespace=NS)
    cm = find_doc(docs, "ConfigMap", f"{RELEASE}-stages")
    cm["metadata"].pop("namespace", None)
    c = FakeCluster(tmp_path, configmap=cm)
    try:
        assert c.run().exit_code == EXIT_SUCCEEDED, c.status()["message"]
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


def _verbs_over_all_scenarios(tmp_path: Path) -> set[tuple[str, str, str]]:
    for name in SCENARIOS:  # normally all ran above; run what a -k selection skipped
        if name not in VERBS_USED and name != "killed_and_restarted_at_every_write":
            run_scenario(name, tmp_path / name)
    return set().union(*VERBS_USED.values())


def test_controller_uses_exactly_the_contract_role(tmp_path):
    assert _verbs_over_all_scenarios(tmp_path) == CONTRACT_ROLE


def test_chart_role_grants_exactly_what_the_controller_uses(tmp_path):
    if not (REPO / "charts" / "r1-grpo" / "Chart.yaml").exists():
        pytest.skip("charts/r1-grpo does not exist yet")
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
    assert granted == _verbs_over_all_scenarios(tmp_path)
