"""The controller under faults and bad values (issue 22), on the real control plane where it matters.

* kube-apiserver killed (SIGKILL) and restarted on the same port and etcd at several moments of a run: the
  controller, on its ServiceAccount token and the chart's Role, rides out the lost connections and the
  403s a restarting server answers until its authorizer has loaded the RBAC objects; the run completes with
  one job per attempt and a true status.
* A 403 that does not pass: retried for --refusal-grace-seconds, then exit 3 with the reason in the status.
* A stage whose trainer exits 2 (bad input) fails the run on its first attempt, with the trainer's error
  line in the status; a preempted attempt (143) is retried as before.
* `helm install` (helm 3 and 4, against the cluster) refuses an unknown stage flag and a wrong type.
* `r1-grpo status` once the namespace is gone, and on a status whose controller has gone silent.

The decision and rendering rules behind them are also tested without a cluster (the first tests).
"""

from __future__ import annotations

import copy
import io
import json
import time
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.controlplane.cluster import ApiError, ControlPlane
from tests.support.helmtool import CHART_DIR, HelmError, find_doc, helm_binaries, run_helm
from tests.test_cluster_controller import NODE, RELEASE, Scenario, _token
from trainer.executors.kubernetes.cli import format_status, silent_for, status_main
from trainer.executors.kubernetes.cluster import Cluster
from trainer.executors.kubernetes.controller import Controller
from trainer.executors.kubernetes.decide import CreateJob, Finish, decide
from trainer.executors.kubernetes.spec import (
    EXIT_FAILED,
    EXIT_FORBIDDEN,
    EXIT_SUCCEEDED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    ControllerConfig,
    Pipeline,
    StageSpec,
)
from trainer.executors.kubernetes.status import AttemptRecord, RunStatus, StageRecord, render_status
from trainer.executors.kubernetes.world import JobState, OutputState, TrainerExit, World, trainer_exit

NS = "ns"
T0 = datetime(2026, 12, 1, tzinfo=UTC)
BAD_LINE = "r1-grpo sft: error: --dataset_name data.jsonl: row 3: no answer in column 'answer'"


# --------------------------------------------------------------------------------------------- decisions


def _config(**overrides) -> ControllerConfig:
    return ControllerConfig(release="r1", namespace=NS, stages_configmap="r1-stages", status_configmap="r1-status",
                            **overrides)  # fmt: skip


def _world(code: int | None, error: str = "", retries_seen: int = 1) -> World:
    spec = StageSpec("sft", "/checkpoints/r1/sft", "builtin:tiny", "sft.yaml", {})
    pipeline = Pipeline("r1", "/checkpoints", (spec,), "uid")
    job = JobState(f"r1-sft-{retries_seen}", "sft", retries_seen, FAILED,
                   f"PyTorchJob r1-sft-{retries_seen} is failed because 1 Master replica(s) failed.", T0, T0, T0)  # fmt: skip
    previous = RunStatus("r1", NS, stages=[StageRecord("sft", RUNNING, retries_seen, job.name,
                         attempts=[AttemptRecord(retries_seen, job.name)])])  # fmt: skip
    exits = {job.name: TrainerExit(code, error)} if code is not None else {}
    return World(T0, pipeline, {"sft": {retries_seen: job}}, {"sft": OutputState()}, (), {}, previous,
                 exits=exits)  # fmt: skip


def test_exit_2_fails_the_run_at_once_and_crashes_oom_kills_and_preemptions_are_retried() -> None:
    cfg = _config(retries=2)
    action = decide(_world(2, BAD_LINE), cfg)
    assert action == Finish(
        FAILED,
        "stage sft refused its input on attempt 1 (exit code 2, not retried: another attempt would fail the "
        f"same way): {BAD_LINE}",
        "sft",
        1,
    )
    status = render_status(_world(2, BAD_LINE), action, cfg)
    assert status.phase == FAILED and status.message == action.message
    assert status.stages[0].attempts[0].exit_code == 2 and status.stages[0].attempts[0].error == BAD_LINE
    # remembered: once the pods are gone the status still says it was bad input
    later = _world(None)
    later = World(later.now, later.pipeline, later.jobs, later.outputs, (), {}, status)
    assert isinstance(decide(later, cfg), Finish)
    for code in (1, 137, 143, None):  # a crash, an OOM kill, a preemption, pods gone before we looked
        assert decide(_world(code), cfg) == CreateJob(
            "sft", 2, "retry", "PyTorchJob r1-sft-1 is failed because 1 Master replica(s) failed."
        )


def _pod(name: str, code: int, message: str = "") -> dict:
    terminated = {"exitCode": code, **({"message": message} if message else {})}
    return {"metadata": {"name": name},
            "status": {"containerStatuses": [{"name": "pytorch", "state": {"terminated": terminated}}]}}  # fmt: skip


def test_the_trainer_exit_is_read_from_the_pods_termination_message_or_log() -> None:
    assert trainer_exit([_pod("r1-sft-1-master-0", 1), _pod("r1-sft-1-worker-0", 2, BAD_LINE)], None) == (
        TrainerExit(2, BAD_LINE)
    )
    tail = f"step 0\n{BAD_LINE}\n[rank0]: torch.distributed.elastic.multiprocessing.errors.ChildFailedError"
    assert trainer_exit([_pod("r1-sft-1-master-0", 2)], tail) == TrainerExit(2, BAD_LINE)
    assert trainer_exit([_pod("r1-sft-1-worker-0", 137), _pod("r1-sft-1-master-0", 143)], None) == (
        TrainerExit(143)
    )
    assert trainer_exit([], "anything") == TrainerExit(None)


def _forbidden(verb: str, resource: str) -> ApiException:
    err = ApiException(status=403, reason="Forbidden")
    err.body = json.dumps({"kind": "Status", "reason": "Forbidden", "code": 403, "message":
                           f'configmaps "r1-status" is forbidden: User "system:serviceaccount:ns:r1-controller" '
                           f'cannot {verb} resource "{resource}" in API group "" in the namespace "ns"'})  # fmt: skip
    return err


def test_a_refusal_may_pass_only_for_a_call_allowed_before_or_after_a_lost_connection() -> None:
    controller = Controller(Cluster(client.ApiClient(), NS), _config(refusal_grace_seconds=60))
    assert not controller._refusal_may_pass(_forbidden("get", "configmaps"))  # the Role never allowed it
    controller.cluster.allowed.add(("get", "configmaps"))
    assert controller._refusal_may_pass(_forbidden("get", "configmaps"))
    assert not controller._refusal_may_pass(_forbidden("create", "pytorchjobs"))
    controller._trouble_at = time.monotonic()  # the connection was just lost: anything may be the server's
    assert controller._refusal_may_pass(_forbidden("create", "pytorchjobs"))
    controller._trouble_at = time.monotonic() - 61
    assert not controller._refusal_may_pass(_forbidden("create", "pytorchjobs"))


def test_status_says_when_the_controller_has_gone_silent() -> None:
    status = RunStatus("r1", NS, phase=RUNNING, message="sft: Running", updated_at="2026-12-01T00:00:00Z",
                       settings={"retries": 2, "heartbeatSeconds": 60.0})  # fmt: skip
    assert silent_for(status, T0 + timedelta(minutes=5)) is None  # five heartbeats: not yet
    assert silent_for(status, T0 + timedelta(minutes=12)) == 720
    text = format_status(status, T0 + timedelta(minutes=12))
    assert text.splitlines()[:2] == [
        "release r1 (namespace ns): Running? (the controller has not written this status for 12 min) - sft: "
        "Running",
        "  the controller writes it every 1 min while it runs: it has stopped or cannot reach the API server. "
        "See `kubectl -n ns get job r1-controller` and its pod's log (by this machine's clock)",
    ]
    done = RunStatus("r1", NS, phase=SUCCEEDED, updated_at="2026-12-01T00:00:00Z", settings=status.settings)
    assert silent_for(done, T0 + timedelta(days=1)) is None  # a finished run has nothing more to write


def test_status_shows_eval_metrics_per_dataset() -> None:
    metrics = {"pass@1": 0.5, "num_problems": 40.0, "pass@1/math-ai/aime24": 0.25, "num_problems/math-ai/aime24": 30.0,
               "pass@1/amc23.jsonl": 1.0, "num_problems/amc23.jsonl": 10.0}  # fmt: skip
    status = RunStatus("r1", NS, phase=SUCCEEDED, stages=[StageRecord("eval", SUCCEEDED, metrics=metrics)])
    lines = [line for line in format_status(status).splitlines() if line.startswith("metrics")]
    assert lines == [
        "metrics eval: num_problems=40, pass@1=0.5",
        "metrics eval [amc23.jsonl]: num_problems=10, pass@1=1",
        "metrics eval [math-ai/aime24]: num_problems=30, pass@1=0.25",
    ]


# --------------------------------------------------------------------------------------------- the real cluster


@pytest.fixture
def scenario(control_plane: ControlPlane, k8s_namespace: str, tmp_path: Path):
    """tests/test_cluster_controller.py's Scenario (one release in a fresh namespace) on its fake GPU node."""
    try:
        control_plane.request("GET", f"/api/v1/nodes/{NODE}")
    except ApiError as e:
        if e.status != 404:
            raise
        control_plane.create_gpu_node(NODE)
    made: list[Scenario] = []

    def make(values: dict | None = None) -> Scenario:
        made.append(Scenario(control_plane, k8s_namespace, tmp_path / f"s{len(made)}", values))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _controller_account(s: Scenario, drop: tuple[str, str] | None = None) -> client.ApiClient:
    """The chart's controller ServiceAccount, Role and RoleBinding; an ApiClient on that account's token."""
    account = find_doc(s.docs, "ServiceAccount", f"{RELEASE}-controller")
    role = copy.deepcopy(find_doc(s.docs, "Role", f"{RELEASE}-controller"))
    binding = find_doc(s.docs, "RoleBinding", f"{RELEASE}-controller")
    for doc, plural in ((account, "serviceaccounts"), (role, "roles"), (binding, "rolebindings")):
        group = "/api/v1" if plural == "serviceaccounts" else "/apis/rbac.authorization.k8s.io/v1"
        s.post(f"{group}/namespaces/{s.ns}/{plural}", doc)
    cfg = client.Configuration(host=s.cp.server)
    cfg.ssl_ca_cert = str(s.cp.pki_dir / "ca.crt")
    cfg.api_key = {"authorization": f"Bearer {_token(s, account['metadata']['name'])}"}
    return client.ApiClient(cfg)


def _succeed(s: Scenario, stage: str, attempt: int = 1) -> None:
    pod = f"{RELEASE}-{stage}-{attempt}-master-0"
    s.running(pod)
    s.write_outputs(stage)
    s.exit(pod, 0)


def _restart(cp: ControlPlane, down_s: float) -> float:
    """Kill kube-apiserver, keep it down `down_s`, start it again; seconds until it was ready."""
    cp.kill_apiserver()
    time.sleep(down_s)
    start = time.monotonic()
    cp.start_apiserver()
    return time.monotonic() - start


def _refusals(cp: ControlPlane, ns: str) -> list[str]:
    user = f"system:serviceaccount:{ns}:{RELEASE}-controller"
    return [f"{e['verb']} {e['objectRef'].get('resource')}" for e in cp.audit_events(user=user, namespace=ns)
            if (e.get("responseStatus") or {}).get("code") in (401, 403)]  # fmt: skip


def test_the_run_completes_across_api_server_restarts_at_several_moments(scenario, capsys) -> None:
    """Killed while the controller waits on a running stage (down 10 s, the issue's case), just after a
    stage's trainer ended (the controller's next writes land on the restarted server), and while the last
    stage runs (down 0 s: back as fast as it starts). One job per attempt, every stage Succeeded on attempt
    1, the status true."""
    s = scenario()
    s.install()
    api = _controller_account(s)
    controller = Controller(Cluster(api, s.ns), s.config(refusal_grace_seconds=240.0, heartbeat_seconds=5.0))
    s.threads.append((controller, *_start(controller)))
    restarts = []
    s.running(f"{RELEASE}-sft-1-master-0")
    s.wait("sft Running in the status", lambda: s.stage("sft").phase == "Running")
    restarts.append(_restart(s.cp, 10))
    _succeed(s, "sft")
    restarts.append(_restart(s.cp, 2))
    s.wait("grpo created", lambda: s.job(f"{RELEASE}-grpo-1"), timeout=300)
    _succeed(s, "grpo")
    s.running(f"{RELEASE}-eval-1-master-0")
    restarts.append(_restart(s.cp, 0))
    _succeed(s, "eval")
    result = s.finish(timeout=300)
    assert result.exit_code == EXIT_SUCCEEDED, result
    assert s.jobs() == [f"{RELEASE}-eval-1", f"{RELEASE}-grpo-1", f"{RELEASE}-sft-1"]
    status = s.status()
    assert status.phase == SUCCEEDED
    assert [(r.name, r.phase, r.attempt, len(r.attempts)) for r in status.stages] == [
        ("sft", SUCCEEDED, 1, 1), ("grpo", SUCCEEDED, 1, 1), ("eval", SUCCEEDED, 1, 1)]  # fmt: skip
    with capsys.disabled():
        print(f"\napiserver restarts ready after {[round(r, 1) for r in restarts]} s; refusals the "
              f"controller rode out: {_refusals(s.cp, s.ns)}")  # fmt: skip


def _start(controller: Controller):
    import threading

    out: list = []
    thread = threading.Thread(target=lambda: out.append(controller.run()), daemon=True)
    thread.start()
    return thread, out


def test_a_refusal_that_does_not_pass_stops_the_controller_with_the_reason_in_the_status(scenario) -> None:
    """The Role loses `list pods` mid-run: the controller retries for --refusal-grace-seconds (here 6 s), then
    exits 3 and, still allowed to patch its status, says why there; `r1-grpo status` shows it Failed."""
    s = scenario()
    s.install()
    api = _controller_account(s)
    controller = Controller(Cluster(api, s.ns), s.config(refusal_grace_seconds=6.0))
    s.threads.append((controller, *_start(controller)))
    s.running(f"{RELEASE}-sft-1-master-0")
    s.wait("sft Running in the status", lambda: s.stage("sft").phase == "Running")
    role = s.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{s.ns}/roles/{RELEASE}-controller")
    for rule in role["rules"]:
        if rule["resources"] == ["pods"]:
            rule["verbs"].remove("list")
    s.cp.request(
        "PUT", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{s.ns}/roles/{RELEASE}-controller", role
    )
    s.threads[-1][1].join(120)
    result = s.threads[-1][2][0]
    assert result.exit_code == EXIT_FORBIDDEN, result
    status = s.status()
    assert status.phase == FAILED
    assert status.message.startswith("the controller stopped: the API server refused its calls for ")
    assert f'cannot list resource "pods" in API group "" in the namespace "{s.ns}"' in status.message
    assert status.message.endswith(f"job {RELEASE}-sft-1 may still be running, but no later stage starts")
    code, out, _ = _status_cli(s.cp, s.ns)
    assert (
        code == EXIT_FAILED
        and f"release {RELEASE} (namespace {s.ns}): Failed - the controller stopped" in out
    )
    print(out)


def _status_cli(cp: ControlPlane, ns: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = status_main(["--release", RELEASE, "-n", ns, "--kubeconfig", str(cp.kubeconfig_path)])
    return code, out.getvalue(), err.getvalue()


def test_a_stage_that_exits_2_fails_the_run_on_that_attempt_and_a_preempted_one_is_retried(scenario) -> None:
    s = scenario()
    s.install()
    s.start()
    s.running(f"{RELEASE}-sft-1-master-0")
    s.exit(f"{RELEASE}-sft-1-master-0", 143)  # preempted: retried
    s.wait("attempt 2", lambda: s.job(f"{RELEASE}-sft-2"))
    s.running(f"{RELEASE}-sft-2-master-0")
    s.cp.finish_pod(s.ns, f"{RELEASE}-sft-2-master-0", 2, message=BAD_LINE)
    result = s.finish(timeout=120)
    assert result.exit_code == EXIT_FAILED, result
    assert s.jobs() == [f"{RELEASE}-sft-1", f"{RELEASE}-sft-2"]
    status = s.status()
    assert status.phase == FAILED and status.message == (
        "stage sft refused its input on attempt 2 (exit code 2, not retried: another attempt would fail the "
        f"same way): {BAD_LINE}"
    )
    sft = status.stage_record("sft")
    assert [(a.attempt, a.exit_code) for a in sft.attempts] == [(1, 143), (2, 2)]
    code, out, _ = _status_cli(s.cp, s.ns)
    assert code == EXIT_FAILED and status.message in out
    print(out)


def test_a_stage_that_exits_2_on_its_first_attempt_is_not_retried(scenario) -> None:
    s = scenario()
    s.install()
    s.start()
    s.running(f"{RELEASE}-sft-1-master-0")
    s.cp.finish_pod(s.ns, f"{RELEASE}-sft-1-master-0", 2, message=BAD_LINE)
    result = s.finish(timeout=120)
    assert result.exit_code == EXIT_FAILED and BAD_LINE in result.message, result
    assert s.jobs() == [f"{RELEASE}-sft-1"]
    assert s.status().stage_record("sft").attempt == 1


@pytest.mark.parametrize("major", ["3", "4"])
def test_helm_install_refuses_a_stage_flag_typo_and_a_wrong_type(control_plane, k8s_namespace, major) -> None:
    helm = next((p for v, p in helm_binaries().items() if v.startswith(f"{major}.")), None)
    assert helm is not None, f"no helm {major}.x among {helm_binaries()}"
    base = [
        "install",
        RELEASE,
        str(CHART_DIR),
        "-n",
        k8s_namespace,
        "--kubeconfig",
        str(control_plane.kubeconfig_path),
    ]
    for values, field in (
        ({"stages": {"grpo": {"args": {"learning_rat": 1e-6}}}}, "learning_rat"),
        ({"stages": {"sft": {"args": {"num_train_epochs": "three"}}}}, "num_train_epochs"),
    ):
        with pytest.raises(HelmError) as e:
            run_helm(base, values=values, helm=helm)
        assert (
            "values don't meet the specifications of the schema(s)" in e.value.output
            and field in e.value.output
        )
        print(e.value.output)
    releases = run_helm(
        ["list", "-n", k8s_namespace, "-q", "--kubeconfig", str(control_plane.kubeconfig_path)]
    )
    assert releases.strip() == ""  # nothing was installed
    configmaps = control_plane.request("GET", f"/api/v1/namespaces/{k8s_namespace}/configmaps")["items"]
    assert [c["metadata"]["name"] for c in configmaps] == ["kube-root-ca.crt"]


def test_status_after_the_namespace_is_deleted_says_so(control_plane, tmp_path: Path) -> None:
    ns = f"gone-{int(time.time() * 1000) % 10**8}"
    control_plane.create_namespace(ns)
    control_plane.delete_namespace(ns)

    def gone() -> bool:
        try:
            control_plane.request("GET", f"/api/v1/namespaces/{ns}")
        except Exception as e:  # ApiError 404
            return getattr(e, "status", None) == 404
        return False

    control_plane.wait_for(f"namespace {ns} gone", gone, timeout=120)
    code, out, err = _status_cli(control_plane, ns)
    assert code == 2 and out == ""
    assert err == (
        f"r1-grpo status: namespace '{ns}' does not exist: it was deleted, and the run of release '{RELEASE}' "
        f"and its status went with it (or it never existed; check -n/--namespace)\n"
    )
    print(err)
