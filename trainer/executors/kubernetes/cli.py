"""The controller's two commands: `r1-grpo controller` (the run loop) and `r1-grpo status` (read a release's status)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from trainer.contract.stages import STAGES
from trainer.executors.kubernetes.cluster import (
    USER_AGENT,
    Cluster,
    api_error_summary,
    default_namespace,
    load_api_client,
)
from trainer.executors.kubernetes.controller import Controller, _StopRequested
from trainer.executors.kubernetes.jsonlog import log, logger, setup_json_logging
from trainer.executors.kubernetes.spec import (
    EXIT_CONFIG,
    EXIT_CRASH,
    EXIT_FAILED,
    FAILED,
    MAX_NAME_LEN,
    STALE_HEARTBEATS,
    STATUS_KEY,
    SUCCEEDED,
    ControllerConfig,
    job_name,
)
from trainer.executors.kubernetes.status import RunStatus, _duration
from trainer.executors.kubernetes.world import _ts

# --------------------------------------------------------------------------------------------- CLI


def _positive(kind: type, minimum: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="r1-grpo controller",
        allow_abbrev=False,
        description="Run a release's stage jobs (PyTorchJobs or TrainJobs) in order, in the cluster.",
    )
    p.add_argument(
        "--release", required=True, help="Helm release name (jobs are <release>-<stage>-<attempt>)"
    )
    p.add_argument(
        "-n", "--namespace", help="namespace (default: the pod's own, else the kubeconfig context's)"
    )
    p.add_argument(
        "--stages-configmap",
        help="ConfigMap with pipeline.yaml and the stage jobs (default <release>-stages)",
    )
    p.add_argument("--status-configmap", help="ConfigMap the status is written to (default <release>-status)")
    p.add_argument("--retries", type=_positive(int, 0), default=2, help="retries per stage after a failure")
    p.add_argument(
        "--keep-checkpoints",
        type=_positive(int, 1),
        default=3,
        help="complete checkpoint-* folders to keep per stage (the final export is never removed)",
    )
    p.add_argument(
        "--pending-timeout-seconds",
        type=_positive(float, 1),
        default=1800.0,
        help="report pods (or a job with no status) pending longer than this",
    )
    p.add_argument(
        "--kueue-workload-timeout-seconds",
        type=_positive(float, 1),
        default=120.0,
        help="report a stage job with a Kueue queue label that has no Kueue Workload after this long "
        "(Kueue does not manage its kind, so it runs outside the quota)",
    )
    p.add_argument(
        "--mount-path",
        help="where the checkpoint volume is mounted in this pod (default: pipeline.yaml's mountPath)",
    )
    p.add_argument(
        "--resync-seconds",
        type=_positive(float, 1),
        default=120.0,
        help="re-read everything at least this often even without watch events",
    )
    p.add_argument(
        "--refusal-grace-seconds",
        type=_positive(float, 0),
        default=300.0,
        help="retry a 401/403 this long when the API server allowed the same call before, or the connection "
        "to it was just lost (a restarting API server refuses until its authorizer is ready); then exit 3",
    )
    p.add_argument(
        "--log-tail-lines",
        type=_positive(int, 1),
        default=50,
        help="lines of the master pod's log kept for a failed attempt",
    )
    p.add_argument(
        "--kubeconfig", help="kubeconfig file (default: in-cluster service account, else ~/.kube/config)"
    )
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ControllerConfig:
    release = args.release
    longest = max(len(s) for s in STAGES)
    worst = f"{job_name(release, 'x' * longest, args.retries + 1)}-master-0"
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", release or ""):
        parser.error(
            f"--release {release!r}: must be a lowercase DNS label (a-z, 0-9, '-', starting with a letter)"
        )
    if len(worst) > MAX_NAME_LEN:
        parser.error(
            f"--release {release!r}: too long; pod/service names like {worst!r} would exceed "
            f"{MAX_NAME_LEN} characters"
        )
    if args.mount_path and not os.path.isdir(args.mount_path):
        parser.error(f"--mount-path {args.mount_path!r}: not a directory")
    namespace = args.namespace or default_namespace(args.kubeconfig, args.context)
    return ControllerConfig(
        release=release,
        namespace=namespace,
        stages_configmap=args.stages_configmap or f"{release}-stages",
        status_configmap=args.status_configmap or f"{release}-status",
        retries=args.retries,
        keep_checkpoints=args.keep_checkpoints,
        pending_timeout_seconds=args.pending_timeout_seconds,
        kueue_workload_timeout_seconds=args.kueue_workload_timeout_seconds,
        mount_path=args.mount_path,
        resync_seconds=args.resync_seconds,
        log_tail_lines=args.log_tail_lines,
        refusal_grace_seconds=args.refusal_grace_seconds,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_json_logging(args.log_level)
    cfg = config_from_args(args, parser)
    try:
        api = load_api_client(args.kubeconfig, args.context, USER_AGENT)
    except Exception as e:  # the kubernetes config loaders raise several unrelated types
        log("error", "cannot load Kubernetes credentials", kubeconfig=args.kubeconfig, error=str(e))
        return EXIT_CONFIG
    controller = Controller(Cluster(api, cfg.namespace), cfg)

    def on_sigterm(signum: int, frame: Any) -> None:
        log("info", "SIGTERM: stopping after the current step")
        controller.stop()
        if controller.in_wait:  # waits have no side effects: abandon them at once
            raise _StopRequested()

    signal.signal(signal.SIGTERM, on_sigterm)
    log(
        "info",
        "controller starting",
        release=cfg.release,
        namespace=cfg.namespace,
        retries=cfg.retries,
        keep_checkpoints=cfg.keep_checkpoints,
        pending_timeout_seconds=cfg.pending_timeout_seconds,
    )
    try:
        result = controller.run()
    except Exception:  # a bug: say so in the log and exit with a code that is not "the run failed"
        logger.exception("controller crashed", extra={"fields": {"release": cfg.release}})
        return EXIT_CRASH
    return result.exit_code


# --------------------------------------------------------------------------------------------- status CLI


def silent_for(status: RunStatus, now: datetime) -> float | None:
    """Seconds since the controller last wrote a status that is not finished, when that is longer than
    STALE_HEARTBEATS of its heartbeats; else None."""
    written = _ts(status.updated_at)
    if status.phase in (SUCCEEDED, FAILED) or written is None:
        return None
    heartbeat = float(status.settings.get("heartbeatSeconds") or 0)
    if heartbeat <= 0:  # written by a controller without a heartbeat: its silence means nothing
        return None
    age = (now - written).total_seconds()
    return age if age > STALE_HEARTBEATS * heartbeat else None


def format_status(status: RunStatus, now: datetime | None = None) -> str:
    """The status as a table a user reads in a terminal."""
    silent = silent_for(status, now or datetime.now(UTC))
    phase = status.phase
    if silent is not None:
        phase = f"{status.phase}? (the controller has not written this status for {_duration(round(silent))})"
    lines = [
        f"release {status.release} (namespace {status.namespace}): {phase}"
        + (f" - {status.message}" if status.message else "")
    ]
    if silent is not None:
        lines.append(
            f"  the controller writes it every {_duration(float(status.settings['heartbeatSeconds']))} while it "
            f"runs: it has stopped or cannot reach the API server. See `kubectl -n {status.namespace} get job "
            f"{status.release}-controller` and its pod's log (by this machine's clock)"
        )
    times = [
        f"started {status.started_at}" if status.started_at else "",
        f"finished {status.finished_at}" if status.finished_at else "",
        f"updated {status.updated_at}" if status.updated_at else "",
    ]
    if any(times):
        lines.append("  " + ", ".join(t for t in times if t))
    retries = int(status.settings.get("retries", 0))
    header = ("STAGE", "PHASE", "ATTEMPT", "JOB", "STARTED", "FINISHED", "CHECKPOINT", "MESSAGE")
    rows = [header]
    for s in status.stages:
        checkpoint = s.output_dir if s.phase == SUCCEEDED else (s.latest_checkpoint or "-")
        rows.append(
            (
                s.name,
                s.phase,
                f"{s.attempt}/{retries + 1}" if s.attempt else "-",
                s.job or "-",
                s.start_time or "-",
                s.end_time or "-",
                checkpoint,
                _one_line(s.message) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    lineage = [f"{s.name} <- {s.model_from}" for s in status.stages if s.model_from]
    if lineage:
        lines.append("lineage: " + "; ".join(lineage))
    for s in status.stages:
        for note in s.moved_aside:
            lines.append(f"moved aside {s.name}: {note}")
    for s in status.stages:
        lines.extend(_metrics_lines(s.name, s.metrics))
    for s in status.stages:
        folded = s.earlier_attempts
        if folded:
            phases = ", ".join(f"{n} {phase}" for phase, n in sorted((folded.get("phases") or {}).items()))
            lines.append(
                f"{s.name}: attempts {folded.get('from')}-{folded.get('to')} not listed ({phases})"
                + (
                    f"; the last of them: {_one_line(folded['lastMessage'])}"
                    if folded.get("lastMessage")
                    else ""
                )
            )
    if status.log_tail:
        lines.append("log tail of the failed attempt's master pod:")
        lines.extend("  | " + line for line in status.log_tail.rstrip("\n").splitlines())
    elif status.phase != SUCCEEDED:
        # a stage being retried: why its last attempt failed
        current = next((s for s in status.stages if s.name == status.stage), None)
        failed = [a for a in (current.attempts if current else []) if a.phase == FAILED and a.log_tail]
        if current is not None and failed:
            last = failed[-1]
            lines.append(
                f"log tail of {current.name} attempt {last.attempt} (failed: {_one_line(last.message)}):"
            )
            lines.extend("  | " + line for line in last.log_tail.rstrip("\n").splitlines())
    return "\n".join(lines)


def _metrics_lines(stage: str, metrics: dict) -> list[str]:
    """``metrics <stage>: k=v, ...``, then one line per dataset for the ``<metric>/<dataset>`` keys of an
    evaluation over several datasets (the metric name holds no ``/``; the dataset's may)."""
    overall: dict[str, Any] = {}
    per_dataset: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        metric, sep, dataset = key.partition("/")
        if sep:
            per_dataset.setdefault(dataset, {})[metric] = value
        else:
            overall[key] = value
    lines = []
    for label, group in [("", overall), *((f" [{d}]", per_dataset[d]) for d in sorted(per_dataset))]:
        if group:
            lines.append(
                f"metrics {stage}{label}: " + ", ".join(f"{k}={_num(v)}" for k, v in sorted(group.items()))
            )
    return lines


def _why_missing(api: Any, namespace: str, name: str, release: str) -> str:
    """Why the status ConfigMap is not there: the namespace is gone (the status went with it), or the
    release was never installed there (or its controller has not started)."""
    try:
        ns = client.CoreV1Api(api).read_namespace(namespace, _request_timeout=30)
    except ApiException as e:
        if e.status == 404:
            return (
                f"namespace {namespace!r} does not exist: it was deleted, and the run of release {release!r} "
                f"and its status went with it (or it never existed; check -n/--namespace)"
            )
        ns = None  # no permission to read namespaces (a namespaced Role): say what we know
    deleting = ns is not None and ns.metadata is not None and ns.metadata.deletion_timestamp is not None
    if deleting:
        return f"namespace {namespace!r} is being deleted, and the run of release {release!r} and its status with it"
    return (
        f"ConfigMap {namespace}/{name} not found: is release {release!r} installed in namespace "
        f"{namespace!r} and its controller started?"
    )


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def status_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="r1-grpo status",
        allow_abbrev=False,
        description="Print a release's run status; exit 1 if the run failed, 2 if it cannot be read.",
    )
    p.add_argument("--release", required=True)
    p.add_argument("-n", "--namespace", help="default: the kubeconfig context's namespace")
    p.add_argument("--status-configmap", help="default <release>-status")
    p.add_argument("--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument("--json", action="store_true", help="print status.json instead of a table")
    args = p.parse_args(argv)
    name = args.status_configmap or f"{args.release}-status"
    try:
        namespace = args.namespace or default_namespace(args.kubeconfig, args.context)
        api = load_api_client(args.kubeconfig, args.context, "r1-grpo-status/1")
        cm = Cluster(api, namespace).get_configmap(name)
    except ApiException as e:
        print(f"r1-grpo status: cannot read ConfigMap {name}: {api_error_summary(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # kubeconfig loading and connection errors come in many types
        print(f"r1-grpo status: cannot reach the cluster: {e}", file=sys.stderr)
        return 2
    if cm is None:
        print(f"r1-grpo status: {_why_missing(api, namespace, name, args.release)}", file=sys.stderr)
        return 2
    raw = (cm.get("data") or {}).get(STATUS_KEY)
    try:
        status = RunStatus.from_json(json.loads(raw or ""))
    except (ValueError, TypeError) as e:
        print(
            f"r1-grpo status: ConfigMap {namespace}/{name} key {STATUS_KEY}: unreadable: {e}", file=sys.stderr
        )
        return 2
    print(json.dumps(status.to_json(), indent=2) if args.json else format_status(status))
    return EXIT_FAILED if status.phase == FAILED else 0


if __name__ == "__main__":
    raise SystemExit(main())
