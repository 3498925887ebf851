"""How the controller stops short of the end of a run, saying why in the status first: a configuration
error (exit 2), a refusal that does not pass (exit 3), a namespace being deleted (143). A mixin of the
Controller."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

import urllib3
from kubernetes.client.rest import ApiException

from trainer.executors.kubernetes.cluster import Cluster, api_error_summary, refused_rule
from trainer.executors.kubernetes.jsonlog import log
from trainer.executors.kubernetes.spec import (
    EXIT_CONFIG,
    EXIT_FORBIDDEN,
    EXIT_SIGTERM,
    FAILED,
    PENDING,
    STATUS_KEY,
    SUCCEEDED,
    ControllerConfig,
)
from trainer.executors.kubernetes.status import RunStatus, _duration, encode_status
from trainer.executors.kubernetes.world import _fmt


@dataclass
class RunResult:
    exit_code: int
    message: str = ""
    budget_spent: bool = False


class Stops:
    cluster: Cluster
    config: ControllerConfig
    clock: Callable[[], datetime]
    status: RunStatus | None
    _trouble_at: float | None
    _write: Callable[
        [str], None
    ]  # the Controller's: counts writes (and stops tests' controllers at a budget)

    def _refusal_may_pass(self, err: ApiException) -> bool:
        """Whether a 401/403 may be the API server's passing state rather than the Role or the token: the
        server allowed this very call before (401: any call), or the connection to it was lost (or it
        answered 5xx/429) within the grace period. A rule the Role never granted fails at once."""
        recent = (
            self._trouble_at is not None
            and time.monotonic() - self._trouble_at < self.config.refusal_grace_seconds
        )
        if err.status == 401:
            return recent or bool(self.cluster.allowed)
        return recent or refused_rule(err) in self.cluster.allowed

    def _give_up(self, err: ApiException, refused_for: float) -> RunResult:
        """Exit 3, saying why in the status first (if the server still lets us write it), so `r1-grpo status`
        does not show a running release whose controller is gone."""
        error = api_error_summary(err)
        log(
            "error",
            "the API server refused the controller's credentials or its Role lacks a permission",
            error=error,
            refused_for_seconds=round(refused_for),
        )
        why = (
            f"for {_duration(round(refused_for))} (longer than --refusal-grace-seconds "
            f"{_duration(self.config.refusal_grace_seconds)})"
            if refused_for > 0
            else "(its Role never allowed this call)"
        )
        running = [
            rec.job
            for rec in (self.status.stages if self.status else [])
            if rec.job and rec.phase not in (SUCCEEDED, FAILED, PENDING)
        ]
        message = (
            f"the controller stopped: the API server refused its calls {why}: {error}. Fix the "
            f"controller's Role or credentials, then start it again (helm upgrade, or reinstall)"
            + (
                f"; job {', '.join(running)} may still be running, but no later stage starts"
                if running
                else ""
            )
        )
        self._record_stop(FAILED, message)
        return RunResult(EXIT_FORBIDDEN, error)

    def _record_stop(self, phase: str, message: str) -> None:
        status = self.status or RunStatus(self.config.release, self.config.namespace)
        stopped = replace(status, phase=phase, message=message, updated_at=_fmt(self.clock()))
        self._write_final_status(stopped, "why the controller stopped")

    def _write_final_status(self, status: RunStatus, what: str) -> None:
        """Best effort on the way out: a status the server refuses is logged, the exit goes on."""
        try:
            self._write("patch status")
            self.cluster.patch_configmap_data(
                self.config.status_configmap, {STATUS_KEY: encode_status(status)}
            )
            self.status = status
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            log("warning", f"could not record {what} in the status", error=str(e))

    def _config_failure(self, message: str) -> RunResult:
        log("error", "configuration error", error=message)
        if self.status is not None and self.status.message != message:
            failed = replace(self.status, phase=FAILED, message=message, updated_at=_fmt(self.clock()))
            self._write_final_status(failed, "the configuration error")
        return RunResult(EXIT_CONFIG, message)

    def _namespace_terminating(self, error: str) -> RunResult:
        """The namespace is being deleted (creates are refused; updates of existing objects still work):
        nothing of the run can go on. Say so in the status if it still exists, and stop."""
        message = f"stopped: namespace {self.config.namespace} is being deleted ({error})"
        log("warning", "namespace is being deleted; stopping", error=error)
        if self.status is not None:
            stopped = replace(self.status, message=message, updated_at=_fmt(self.clock()))
            self._write_final_status(stopped, "the stop")
        return RunResult(EXIT_SIGTERM, message)
