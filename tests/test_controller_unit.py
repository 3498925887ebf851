"""Controller logic a real control plane cannot show, or shows only slowly, tested against recorded answers.

* Log tails: kwok runs no containers, so `pods/log` on the test cluster answers 500 (the apiserver cannot
  reach a kubelet). A small HTTP server stands in for the kubelet's log endpoint with its real semantics
  (k8s.io/cri-client@v0.36.3 pkg/logs/logs.go `ReadLogs`: start at the `tailLines`-th line from the end,
  then stop after `limitBytes` bytes), and the controller's tail is checked against it.
* The status size after many retries (rendering is pure, so 21 attempts take milliseconds).
* 401/403 classification, on `Status` bodies recorded from kube-apiserver v1.36.3 with training-operator
  v1.9.4 (tests/controlplane).
* Decisions while a failed attempt's pods are still stopping.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from trainer.executors.kubernetes.cli import format_status
from trainer.executors.kubernetes.cluster import (
    DENIED_ADMISSION,
    DENIED_QUOTA,
    DENIED_RBAC,
    DENIED_TERMINATING,
    Cluster,
    classify_api_error,
    decode_tail,
)
from trainer.executors.kubernetes.controller import Controller
from trainer.executors.kubernetes.decide import CreateJob, Finish, ReportPending, Wait, decide
from trainer.executors.kubernetes.spec import (
    ATTEMPTS_SHOWN,
    FAILED,
    LINGER_POLL_SECONDS,
    LOG_TAIL_MAX_BYTES,
    LOG_TAIL_MAX_CHARS,
    STATUS_MAX_BYTES,
    ControllerConfig,
    Pipeline,
    StageSpec,
)
from trainer.executors.kubernetes.status import (
    AttemptRecord,
    RunStatus,
    StageRecord,
    encode_status,
    render_status,
)
from trainer.executors.kubernetes.world import JobState, OutputState, PendingItem, World, tail_text

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NS = "team"

# ------------------------------------------------------------------------------------------ log tails


class _KubeletLogs(BaseHTTPRequestHandler):
    """GET pods/<name> and pods/<name>/log; the log endpoint applies tailLines, then limitBytes to the
    front of the selected tail, as the kubelet does."""

    logs: dict[str, bytes] = {}
    queries: list[dict[str, str]] = []

    def log_message(self, fmt: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        split = urlsplit(self.path)
        parts = split.path.strip("/").split("/")  # api v1 namespaces <ns> pods <name> [log]
        name = parts[5]
        if len(parts) == 6:
            pod = {"metadata": {"name": name}, "spec": {"containers": [{"name": "pytorch", "image": "x"}]}}
            self._send(200, json.dumps(pod).encode(), "application/json")
            return
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        type(self).queries.append(query)
        data = type(self).logs[name]
        if "tailLines" in query:
            parts = data.split(b"\n")  # the kubelet counts newlines only; a carriage return ends no line
            lines = [p + b"\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
            data = b"".join(lines[-int(query["tailLines"]) :])
        if "limitBytes" in query:
            data = data[: int(query["limitBytes"])]
        self._send(200, data, "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def kubelet():
    _KubeletLogs.logs, _KubeletLogs.queries = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KubeletLogs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}"))
    try:
        yield api, _KubeletLogs
    finally:
        server.shutdown()
        server.server_close()


def _config(**overrides) -> ControllerConfig:
    base = dict(
        release="r1",
        namespace=NS,
        stages_configmap="r1-stages",
        status_configmap="r1-status",
        retries=2,
        pending_timeout_seconds=60.0,
    )
    base.update(overrides)
    return ControllerConfig(**base)


def _crash_log() -> bytes:
    """A training log whose last lines are a traceback, after one 3 MB progress-bar "line" (tqdm redraws
    with carriage returns, so the whole epoch is one line to the kubelet)."""
    head = "".join(f"[rank0] step {s}: loss 0.{s:03d}\n" for s in range(1, 200))
    bar = "".join(
        f"\rEpoch 1: {p / 1000:5.1f}%|{'█' * (p // 500)}| {p}/100000 [00:{p % 60:02d}<12:00]"
        for p in range(0, 100000, 3)
    )
    trace = (
        "Traceback (most recent call last):\n"
        '  File "/app/trainer/grpo.py", line 412, in train_step\n'
        "    loss.backward()\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 3; 79.1 GiB total)\n"
    )
    return (head + bar + "\n" + trace).encode()


def test_log_tail_keeps_the_traceback_after_a_long_progress_bar_line(kubelet) -> None:
    api, server = kubelet
    log = _crash_log()
    assert len(log) > 3_000_000
    server.logs["r1-sft-1-master-0"] = log
    controller = Controller(Cluster(api, NS), _config(log_tail_lines=50))

    tail = controller.master_log_tail("r1-sft-1")

    assert tail.endswith(
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 3; 79.1 GiB total)\n"
    )
    assert "loss.backward()" in tail
    # the progress bar as a terminal shows it: its last redraw only
    bar_line = next(line for line in tail.splitlines() if line.startswith("Epoch 1:"))
    assert bar_line.startswith("Epoch 1: 100.0%|") and bar_line.endswith("99999/100000 [00:39<12:00]")
    assert len(tail) <= LOG_TAIL_MAX_CHARS and len(tail.encode()) <= LOG_TAIL_MAX_BYTES
    (query,) = server.queries
    assert query == {"tailLines": "50", "container": "pytorch"}  # no limitBytes

    # negative control: the earlier call (limitBytes 1 MiB) gets the front of the tail and loses the error
    old = Cluster(api, NS).core.read_namespaced_pod_log(
        "r1-sft-1-master-0", NS, tail_lines=50, limit_bytes=1 << 20, container="pytorch"
    )
    assert "OutOfMemoryError" not in old[-8000:]


def test_log_tail_decoding_at_a_cut_inside_a_character() -> None:
    text = "進捗 █▉ 🔥 done"
    data = text.encode()
    for cut in range(1, len(data)):
        tail = decode_tail(data[cut:])
        assert "\ufffd" not in tail, cut  # starts at the next whole character
        assert text.endswith(tail)
    # byte cap on a rendered tail never splits a character either
    assert tail_text("€" * 10, max_chars=100, max_bytes=10) == "€€€"
    assert tail_text("a\rb\r\nc\r", 100, 100) == "b\nc"


# ------------------------------------------------------------------------------------------ status size


def _pipeline(*stages: str) -> Pipeline:
    specs = tuple(
        StageSpec(
            s,
            f"/checkpoints/r1/{s}",
            "builtin:tiny" if s == "sft" else "/checkpoints/r1/sft",
            f"{s}.yaml",
            {},
        )
        for s in stages
    )
    return Pipeline("r1", "/checkpoints", specs, "stages-uid")


def _failed_job(attempt: int, at: datetime) -> JobState:
    return JobState(
        f"r1-sft-{attempt}",
        "sft",
        attempt,
        FAILED,
        f"PyTorchJob r1-sft-{attempt} is failed because 1 Master replica(s) failed.",
        at,
        at,
        at + timedelta(minutes=5),
        uid=f"uid-{attempt}",
    )


def _non_ascii_tail(attempt: int) -> str:
    # progress-bar glyphs, CJK and emoji: 3- and 4-byte UTF-8, 6- and 12-byte JSON escapes
    number = str(attempt).translate(str.maketrans("0123456789", "０１２３４５６７８９"))
    line = f"試行{number}█▉▊▋▌損失🔥🔥ステップ進捗\n"
    text = (line * (8000 // len(line) + 1))[-8000:]
    assert len(text) == 8000 and sum(c.isascii() and c != "\n" for c in text) < 8000 // 10
    return text


def _retry_until_failed(retries: int) -> tuple[RunStatus, dict[int, JobState], Pipeline, ControllerConfig]:
    """The statuses the controller writes while every attempt of sft fails, as the real passes make them:
    one pass creates an attempt, the next sees it failed (recording its log tail) and creates the next."""
    pipeline, cfg = _pipeline("sft"), _config(retries=retries)
    status, jobs = RunStatus("r1", NS), {}
    attempt = 1
    while True:
        now = T0 + timedelta(hours=attempt)
        world = World(now, pipeline, {"sft": dict(jobs)}, {"sft": OutputState()}, (), {}, status)
        if attempt == 1:
            action = decide(world, cfg)
            assert action == CreateJob("sft", 1, "start")
            status = render_status(world, action, cfg)
        jobs[attempt] = _failed_job(attempt, now)
        world = World(
            now,
            pipeline,
            {"sft": dict(jobs)},
            {"sft": OutputState()},
            (),
            # what master_log_tail makes of the log
            {jobs[attempt].name: tail_text(_non_ascii_tail(attempt), LOG_TAIL_MAX_CHARS, LOG_TAIL_MAX_BYTES)},
            status,
        )
        action = decide(world, cfg)
        status = render_status(world, action, cfg)
        if isinstance(action, Finish):
            return status, jobs, pipeline, cfg
        assert action == CreateJob("sft", attempt + 1, "retry", jobs[attempt].message)
        attempt += 1


def test_status_stays_small_after_20_retries_of_non_ascii_log_tails() -> None:
    status, jobs, pipeline, cfg = _retry_until_failed(retries=20)
    assert status.phase == FAILED and len(jobs) == 21

    encoded = encode_status(status)
    size = len(encoded.encode("utf-8"))
    assert size < 100 * 1024, size  # the object limit is 1 MiB
    # negative control: keeping every attempt's tail, escaped as json.dumps does by default, would not fit
    naive = json.dumps([_non_ascii_tail(a) for a in jobs])
    assert len(naive) > 1 << 20
    assert "\\u" not in encoded and "進捗" in encoded  # UTF-8 as is

    (sft,) = status.stages
    assert [a.attempt for a in sft.attempts] == [1, 18, 19, 20, 21] and len(sft.attempts) == ATTEMPTS_SHOWN
    assert sft.earlier_attempts["from"] == 2 and sft.earlier_attempts["to"] == 17
    assert sft.earlier_attempts["phases"] == {FAILED: 16}
    assert [a.attempt for a in sft.attempts if a.log_tail] == [20, 21]
    for a in sft.attempts[-2:]:
        assert _non_ascii_tail(a.attempt).endswith(a.log_tail)  # the end of the log, not its start
        assert len(a.log_tail.encode()) <= LOG_TAIL_MAX_BYTES
    assert status.log_tail == sft.attempts[-1].log_tail
    assert status.message.startswith("stage sft failed on attempt 21 of 21: PyTorchJob r1-sft-21 is failed")

    # a restarted controller reads it back; a pass over the same cluster (all 21 jobs still listed)
    # changes nothing: folded attempts are not counted twice
    reread = RunStatus.from_json(json.loads(encoded))
    world = World(
        T0 + timedelta(days=2), pipeline, {"sft": dict(jobs)}, {"sft": OutputState()}, (), {}, reread
    )
    again = render_status(world, decide(world, cfg), cfg)
    assert again.same_as(reread)

    shown = format_status(reread)
    assert "sft: attempts 2-17 not listed (16 Failed)" in shown
    assert "log tail of the failed attempt's master pod:" in shown and "試行２１" in shown


def test_status_encoding_guard_drops_log_tails_first() -> None:
    huge = "x" * 60_000
    attempts = [
        AttemptRecord(a, f"r1-sft-{a}", FAILED, message="m" * 60_000, log_tail=huge) for a in range(1, 6)
    ]
    status = RunStatus("r1", NS, stages=[StageRecord("sft", attempts=attempts)])  # bypasses render's caps
    assert len(json.dumps(status.to_json())) > STATUS_MAX_BYTES
    slim = RunStatus.from_json(json.loads(encode_status(status)))
    assert len(encode_status(status).encode()) < STATUS_MAX_BYTES
    assert all(a.log_tail is None for a in slim.stages[0].attempts)
    assert [a.attempt for a in slim.stages[0].attempts] == [1, 2, 3, 4, 5]


def test_status_shows_the_previous_attempts_log_tail_while_retrying() -> None:
    pipeline, cfg = _pipeline("sft", "grpo"), _config()
    status = RunStatus("r1", NS)
    world = World(T0, pipeline, {}, {"sft": OutputState()}, (), {}, status)
    status = render_status(world, decide(world, cfg), cfg)
    job = _failed_job(1, T0)
    tail = "step 40: loss 0.31\nRuntimeError: NCCL timeout on rank 3\n"
    world = World(T0, pipeline, {"sft": {1: job}}, {"sft": OutputState()}, (), {job.name: tail}, status)
    status = render_status(world, decide(world, cfg), cfg)
    shown = format_status(status)
    assert "sft    Submitted  2/3      r1-sft-2" in shown
    assert (
        "log tail of sft attempt 1 (failed: PyTorchJob r1-sft-1 is failed because 1 Master replica(s) failed.):"
        in shown
    )
    assert shown.endswith("  | RuntimeError: NCCL timeout on rank 3")


# ------------------------------------------------------------------------------------------ 401 / 403

# Status bodies recorded from kube-apiserver v1.36.3 (tests/controlplane), names shortened.
RECORDED = {
    DENIED_RBAC: {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'pytorchjobs.kubeflow.org is forbidden: User "system:serviceaccount:t:r1-controller" cannot '
        'create resource "pytorchjobs" in API group "kubeflow.org" in the namespace "t"',
        "reason": "Forbidden",
        "details": {"group": "kubeflow.org", "kind": "pytorchjobs"},
        "code": 403,
    },
    DENIED_QUOTA: {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'pytorchjobs.kubeflow.org "r1-sft-1" is forbidden: exceeded quota: jobs, requested: '
        "count/pytorchjobs.kubeflow.org=1, used: count/pytorchjobs.kubeflow.org=0, limited: "
        "count/pytorchjobs.kubeflow.org=0",
        "reason": "Forbidden",
        "details": {"name": "r1-sft-1", "group": "kubeflow.org", "kind": "pytorchjobs"},
        "code": 403,
    },
    DENIED_TERMINATING: {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'pytorchjobs.kubeflow.org "r1-sft-1" is forbidden: unable to create new content in namespace '
        "t because it is being terminated",
        "reason": "Forbidden",
        "details": {
            "name": "r1-sft-1",
            "group": "kubeflow.org",
            "kind": "pytorchjobs",
            "causes": [
                {
                    "reason": "NamespaceTerminating",
                    "message": "namespace t is being terminated",
                    "field": "metadata.namespace",
                }
            ],
        },
        "code": 403,
    },
    DENIED_ADMISSION: {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request: '
        "spec.pytorchReplicaSpecs[Master].replicas: Forbidden: must be 1",
        "reason": "Forbidden",
        "code": 403,
    },
}


def _api_exception(status: int, body: dict | str) -> ApiException:
    err = ApiException(status=status, reason="Forbidden" if status == 403 else "Error")
    err.body = body if isinstance(body, str) else json.dumps(body)
    return err


@pytest.mark.parametrize("kind", list(RECORDED))
def test_forbidden_is_classified_from_the_status_body(kind: str) -> None:
    assert classify_api_error(_api_exception(403, RECORDED[kind])) == kind


def test_other_refusals_are_classified() -> None:
    assert classify_api_error(_api_exception(401, {"message": "Unauthorized"})) == DENIED_RBAC
    policy = (
        "configmaps \"x\" is forbidden: ValidatingAdmissionPolicy 'p' with binding 'b' denied request: no"
    )
    assert classify_api_error(_api_exception(403, {"message": policy})) == DENIED_ADMISSION
    assert classify_api_error(_api_exception(403, {"message": "status unknown for quota: q"})) == DENIED_QUOTA
    assert classify_api_error(_api_exception(403, "not json")) == DENIED_RBAC  # never guess "retry"
    for status in (400, 404, 409, 422, 500):
        assert classify_api_error(_api_exception(status, {"message": "exceeded quota"})) is None


# ------------------------------------------------------------------------------------------ decisions


def _failed_world(
    lingering: tuple[PendingItem, ...], reported: tuple[str, ...] = (), now: datetime = T0
) -> World:
    pipeline = _pipeline("sft")
    job = _failed_job(1, T0 - timedelta(hours=1))
    attempt = AttemptRecord(1, job.name, FAILED, log_tail="tail")
    previous = RunStatus(
        "r1",
        NS,
        stages=[StageRecord("sft", FAILED, 1, job.name, attempts=[attempt], reported=list(reported))],
    )
    return World(now, pipeline, {"sft": {1: job}}, {"sft": OutputState()}, (), {}, previous, lingering)


def test_next_attempt_waits_until_the_failed_attempts_pods_have_stopped() -> None:
    cfg = _config(pending_timeout_seconds=60.0)
    worker = PendingItem(
        "pod/r1-sft-1-worker-0/abcd/stopping", T0, "pod r1-sft-1-worker-0 is still Running (being deleted)"
    )

    action = decide(_failed_world((worker,)), cfg)
    assert isinstance(action, Wait) and action.deadline == T0 + timedelta(seconds=LINGER_POLL_SECONDS)
    status = render_status(_failed_world((worker,)), action, cfg)
    assert status.stages[0].message.endswith(
        "attempt 2 starts once the pods of attempt 1 have stopped (one trainer per output folder): "
        "pod r1-sft-1-worker-0 is still Running (being deleted)"
    )

    late = _failed_world((worker,), now=T0 + timedelta(seconds=61))
    action = decide(late, cfg)
    assert action == ReportPending("sft", (worker,))
    assert render_status(late, action, cfg).stages[0].reported == [worker.key]
    assert isinstance(decide(_failed_world((worker,), (worker.key,), T0 + timedelta(seconds=62)), cfg), Wait)

    assert decide(_failed_world(()), cfg) == CreateJob("sft", 2, "retry", _failed_job(1, T0).message)
    # the last attempt: nothing will replace it, so its pods do not hold up the end of the run
    assert isinstance(decide(_failed_world((worker,)), _config(retries=0)), Finish)
