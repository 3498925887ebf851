"""Chart values for running on a real cluster: upgrades of the controller Job, preemption grace, multi-node
networking (RDMA/EFA devices, IPC_LOCK), Volcano priority and Kueue for the controller (issue 13 items 6,
8, 10). Rendered with the real helm (tests/support/helmtool.py), in the style of tests/test_chart.py; the
cluster behaviour behind each is shown in tests/test_e2e_cluster.py."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.support.helmtool import render_chart, stage_jobs


def controller_job(values: dict[str, Any] | None = None, release: str = "r1-grpo") -> dict:
    (job,) = [d for d in render_chart(values, release=release) if d["kind"] == "Job"]
    return job


# ---- item 6: a new controller Job whenever its spec changes ------------------------------------------


def test_controller_job_name_is_the_release_and_a_hash_of_its_spec() -> None:
    job = controller_job()
    assert re.fullmatch(r"r1-grpo-controller-[0-9a-f]{8}", job["metadata"]["name"])
    longest = "r" * 40  # the longest release the chart accepts
    name = controller_job(release=longest)["metadata"]["name"]
    assert len(name) <= 63 and name.startswith(f"{longest}-controller-")
    # The ServiceAccount (and so the Role binding) keeps its plain name.
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "r1-grpo-controller"


@pytest.mark.parametrize(
    "change",
    [
        {"image": {"tag": "0.1.1"}},
        {"controller": {"retries": 3}},
        {"controller": {"pendingTimeoutSeconds": 600}},
        {"controller": {"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}},
        {"controller": {"backoffLimit": 2}},
    ],
    ids=["image", "retries", "pending-timeout", "resources", "backoff-limit"],
)
def test_a_changed_controller_spec_gets_a_new_job_name(change: dict) -> None:
    assert controller_job(change)["metadata"]["name"] != controller_job()["metadata"]["name"]


def test_stage_args_alone_keep_the_controller_job() -> None:
    """Stage settings live in the stages ConfigMap, which the running controller re-reads: no new Job."""
    change = {"stages": {"grpo": {"args": {"max_steps": 7}}, "sft": {"resources": {"gpu": 4}}}}
    assert controller_job(change)["metadata"]["name"] == controller_job()["metadata"]["name"]
    grpo = stage_jobs(render_chart(change))["grpo"]
    args = grpo["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--max_steps") + 1] == "7"
