"""The stage controller against a fake API server, through the real `kubernetes` client over HTTP.

A fake training operator (tests/fake_apiserver.py) reacts to the PyTorchJobs the controller creates: it moves
their conditions along and writes real stage outputs (checkpoints, weights, `r1_stage.json`) into a temporary
folder that plays the checkpoint volume. Nothing in the controller or the client is patched.
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
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.fake_apiserver import FakeApiServer, FakeTrainingOperator, stages_configmap
from trainer.checkpoint import complete_checkpoints, verify_stage_output
from trainer.controller import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_SIGTERM,
    EXIT_SUCCEEDED,
    ConfigError,
    Controller,
    ControllerConfig,
    CreateJob,
    Finish,
    JobState,
    OutputState,
    PendingItem,
    PruneCheckpoints,
    ReportPending,
    RunResult,
    RunStatus,
    StageRecord,
    AttemptRecord,
    Wait,
    World,
    decide,
    parse_pipeline,
    status_main,
)
from trainer.k8s import USER_AGENT, Cluster

REPO = Path(__file__).resolve().parent.parent
RELEASE = "r1"
NS = "team"
JOBS = ("kubeflow.org", "v1")
# The controller's Role in docs/contract.md, as (api group, resource, verb).
CONTRACT_ROLE = {
    ("kubeflow.org", "pytorchjobs", v) for v in ("get", "list", "watch", "create")
} | {("", "configmaps", v) for v in ("get", "create", "patch")} | {
    ("", "events", "create"), ("", "pods", "get"), ("", "pods", "list"), ("", "pods/log", "get"),
    ("", "persistentvolumeclaims", "get"),
}

# (api group, resource, verb) the controller used, per scenario, for the Role tests at the end.
VERBS_BY_SCENARIO: dict[str, set[tuple[str, str, str]]] = {}


class Cluster_:
    """A fake cluster for one scenario: API server, checkpoint volume, training operator, controllers."""

    def __init__(self, tmp_path: Path, scenario: str, scripts: dict | None = None,
                 stages: tuple[str, ...] = ("sft", "grpo", "eval"), configmap: dict | None = None,
                 pvc_phase: str = "Bound", operator: bool = True, checkpoints_per_attempt: int = 4):
        self.scenario = scenario
        self.server = FakeApiServer().start()
        self.volume = tmp_path / "volume"
        self.volume.mkdir()
        # what Helm would have installed
        self.stages_cm = self.server.create("configmaps", configmap or stages_configmap(RELEASE, stages), NS)
        self.server.create("persistentvolumeclaims", {"metadata": {"name": f"{RELEASE}-checkpoints"},
                                                      "status": {"phase": pvc_phase}}, NS)
        self.operator = FakeTrainingOperator(self.server, NS, str(self.volume), scripts=scripts,
                                             checkpoints_per_attempt=checkpoints_per_attempt)
        if operator:
            self.operator.start()

    def config(self, **overrides) -> ControllerConfig:
        base = dict(release=RELEASE, namespace=NS, stages_configmap=f"{RELEASE}-stages",
                    status_configmap=f"{RELEASE}-status", retries=2, keep_checkpoints=3,
                    pending_timeout_seconds=1800, mount_path=str(self.volume), resync_seconds=1.0,
                    error_backoff_seconds=0.05)
        base.update(overrides)
        return ControllerConfig(**base)

    def api(self, user_agent: str = USER_AGENT) -> client.ApiClient:
        api = client.ApiClient(client.Configuration(host=self.server.url))
        api.user_agent = user_agent
        return api

    def controller(self, max_writes: int | None = None, **overrides) -> Controller:
        # a fresh client and controller every time: nothing carries over but what is in the cluster
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
            assert result.exit_code != EXIT_SIGTERM, f"controller did not finish within {timeout}s"
        return result

    def status(self) -> dict:
        cm = self.server.get("configmaps", f"{RELEASE}-status", NS)
        assert cm is not None, "no status ConfigMap"
        return json.loads(cm["data"]["status.json"])

    def stage(self, name: str) -> dict:
        return next(s for s in self.status()["stages"] if s["name"] == name)

    def creates(self, code: int | None = 201) -> list[str]:
        """Names of the PyTorchJobs the controller POSTed (with the given response code), in order."""
        return [json_name for r, json_name in self._job_posts() if code is None or r.code == code]

    def _job_posts(self):
        out = []
        for r in self.server.recorded(USER_AGENT):
            if r.verb == "create" and r.resource == "pytorchjobs":
                out.append((r, self._posted_name[r_id(r)] if r_id(r) in self._posted_name else None))
        return out

    def job_names(self) -> list[str]:
        return [j["metadata"]["name"] for j in self.server.list("pytorchjobs", NS, *JOBS)]

    def events(self) -> list[dict]:
        return self.server.list("events", NS)

    def local(self, stage: str) -> Path:
        return self.volume / RELEASE / stage

    def close(self) -> None:
        self.operator.stop()
        self.server.stop()
        VERBS_BY_SCENARIO.setdefault(self.scenario, set()).update(self.server.verbs_used(USER_AGENT))


def r_id(r) -> int:
    return id(r)


@pytest.fixture
def make_cluster(tmp_path, request):
    made: list[Cluster_] = []

    def make(**kwargs) -> Cluster_:
        c = Cluster_(tmp_path / f"c{len(made)}", request.node.name, **kwargs)
        made.append(c)
        return c

    (tmp_path).mkdir(exist_ok=True)
    yield lambda **kw: make(**kw) if (tmp_path / f"c{len(made)}").mkdir() is None else None
    for c in made:
        c.close()
