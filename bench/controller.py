"""Stage hand-off latency and API cost of the controller, against the fake API server.

For each run of sft -> grpo -> eval (the fake training operator from tests/support/fake_apiserver.py plays
the operator and the trainer), it measures

* latency: from the moment the operator sets a job's Succeeded condition to the moment the controller's
  request creating the next stage's job reaches the API server (for the last stage: its status write saying
  the run Succeeded). This includes the watch wake-up, the relist, verifying the stage output (sha256 of the
  weights: see --weights-mb) and pruning old checkpoints;
* requests per transition: the controller's API requests in that interval, by verb;
* requests per stage: all its requests from creating a stage's job to creating the next one (the watch, the
  passes for the job's Created/Running updates, pod listing, status patches, events).

Each job is held in Running until the controller is idle on its watch, so every hand-off starts from the
steady state (controller waiting on the watch), as in a real run where a stage takes hours.

    python bench/controller.py [--runs 5] [--weights-mb 1] [--keep-checkpoints 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubernetes import client  # noqa: E402

from tests.support.fake_apiserver import FakeApiServer, FakeTrainingOperator, stages_configmap  # noqa: E402
from trainer.contract.stages import STAGES
from trainer.executors.kubernetes.cluster import USER_AGENT, Cluster
from trainer.executors.kubernetes.controller import Controller
from trainer.executors.kubernetes.spec import EXIT_SUCCEEDED, ControllerConfig

RELEASE, NS = "bench", "bench"


def one_run(root: Path, weights_mb: float, keep: int) -> list[tuple[str, float, Counter, int]]:
    """[(transition, seconds, requests by 'verb resource' in the hand-off, requests for the whole stage)]."""
    server = FakeApiServer().start()
    volume = root / "volume"
    volume.mkdir(parents=True)
    server.create("configmaps", stages_configmap(RELEASE, STAGES), NS)
    server.create(
        "persistentvolumeclaims",
        {"metadata": {"name": f"{RELEASE}-checkpoints"}, "status": {"phase": "Bound"}},
        NS,
    )
    operator = FakeTrainingOperator(server, NS, str(volume), weight_bytes=int(weights_mb * (1 << 20)))
    gates = {s: operator.gates.setdefault((s, 1), threading.Event()) for s in STAGES}

    log: list[tuple[float, str, str, str | None]] = []  # (time, verb, resource, name) of controller requests
    lock = threading.Lock()

    def record(req) -> None:
        if req.user_agent == USER_AGENT:
            with lock:
                log.append((time.monotonic(), req.verb, req.resource, req.name))

    server.add_hook(record)
    operator.start()
    api = client.ApiClient(client.Configuration(host=server.url))
    api.user_agent = USER_AGENT
    config = ControllerConfig(
        release=RELEASE,
        namespace=NS,
        stages_configmap=f"{RELEASE}-stages",
        status_configmap=f"{RELEASE}-status",
        keep_checkpoints=keep,
        mount_path=str(volume),
        resync_seconds=60,
    )
    controller = Controller(Cluster(api, NS), config)
    result: list = []
    runner = threading.Thread(target=lambda: result.append(controller.run()), daemon=True)
    runner.start()
    try:
        for stage in STAGES:
            # release the job only once the controller is idle on its watch
            deadline = time.monotonic() + 60
            while not (
                running(server, f"{RELEASE}-{stage}-1")
                and server.open_watches() > 0
                and not controller_busy(log, lock)
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{stage}: the controller never went idle")
                time.sleep(0.005)
            gates[stage].set()
        runner.join(60)
        if not result or result[0].exit_code != EXIT_SUCCEEDED:
            raise RuntimeError(f"run did not succeed: {result}")
    finally:
        controller.stop()
        operator.stop()
        server.stop()

    rows = []
    for i, stage in enumerate(STAGES):
        done = operator.succeeded_at[f"{RELEASE}-{stage}-1"]
        begin = next(
            t
            for t, verb, res, name in log
            if verb == "create" and res == "pytorchjobs" and name == f"{RELEASE}-{stage}-1"
        )
        if i + 1 < len(STAGES):
            target = f"{RELEASE}-{STAGES[i + 1]}-1"
            end = next(
                t
                for t, verb, res, name in log
                if verb == "create" and res == "pytorchjobs" and name == target
            )
            label = f"{stage} -> {STAGES[i + 1]}"
        else:
            end = next(
                t for t, verb, res, name in log if t > done and verb == "patch" and res == "configmaps"
            )
            label = f"{stage} -> run Succeeded"
        between = Counter(f"{verb} {res}" for t, verb, res, _ in log if done <= t <= end)
        rows.append((label, end - done, between, sum(1 for t, *_ in log if begin < t <= end)))
    return rows


def running(server: FakeApiServer, name: str) -> bool:
    job = server.get("pytorchjobs", name, NS, "kubeflow.org", "v1") or {}
    return any(
        c["type"] == "Running" and c["status"] == "True"
        for c in (job.get("status") or {}).get("conditions", [])
    )


def controller_busy(log: list, lock: threading.Lock, quiet: float = 0.05) -> bool:
    """True while the controller has sent a request in the last `quiet` seconds."""
    with lock:
        return bool(log) and time.monotonic() - log[-1][0] < quiet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument(
        "--weights-mb", type=float, default=1.0, help="size of each training stage's final weights"
    )
    p.add_argument("--keep-checkpoints", type=int, default=3, help="the operator writes 4 per training stage")
    args = p.parse_args(argv)
    if args.runs < 1 or args.weights_mb < 0 or args.keep_checkpoints < 1:
        p.error("--runs and --keep-checkpoints must be >= 1, --weights-mb >= 0")

    by_transition: dict[str, list[tuple[float, Counter, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.runs):
            for label, *sample in one_run(Path(tmp) / f"run{r}", args.weights_mb, args.keep_checkpoints):
                by_transition.setdefault(label, []).append(tuple(sample))

    print(
        f"controller hand-off: {args.runs} runs, weights {args.weights_mb:g} MiB per training stage, "
        f"keep {args.keep_checkpoints} of 4 checkpoints, fake API server on 127.0.0.1"
    )
    header = (
        "transition",
        "p50 ms",
        "max ms",
        "requests",
        "requests/stage",
        "hand-off requests by verb (mean)",
    )
    rows = []
    for label, samples in by_transition.items():
        times = [s * 1000 for s, _, _ in samples]
        total: Counter = Counter()
        for _, c, _ in samples:
            total.update(c)
        n = len(samples)
        verbs = ", ".join(f"{k} {v / n:.1f}" for k, v in sorted(total.items()))
        rows.append(
            (
                label,
                f"{statistics.median(times):.1f}",
                f"{max(times):.1f}",
                f"{sum(total.values()) / n:.1f}",
                f"{statistics.mean(x for _, _, x in samples):.1f}",
                verbs,
            )
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
