"""OpenMP threads of the training containers (OMP_NUM_THREADS): the pod's CPUs over its processes.

The chart used to set 4 for every stage: a CPU pod of 2 CPUs and 2 processes then ran 8 threads and trained
the built-in SFT at ~2 s per step inside the image, against ~0.25 s with 1 thread per process (measured
with `make image-test`, 2026-12-07). torchrun alone sets 1, which idles the CPUs of a large GPU pod.
"""

from __future__ import annotations

import pytest

from tests.support.helmtool import stage_jobs
from tests.test_chart import rendered


def _threads(values: dict) -> dict[str, list[str]]:
    """Every OMP_NUM_THREADS entry of each stage's training container (a list, to catch duplicates)."""
    out = {}
    for stage, job in stage_jobs(rendered(values)).items():
        (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
        out[stage] = [e["value"] for e in container["env"] if e["name"] == "OMP_NUM_THREADS"]
    return out


def test_defaults_give_each_process_its_share_of_the_pods_cpus() -> None:
    # sft and grpo: 32 CPUs, 8 GPUs -> 8 processes; eval: 8 CPUs, 1 GPU.
    assert _threads({}) == {"sft": ["4"], "grpo": ["4"], "eval": ["8"]}


@pytest.mark.parametrize(
    ("resources", "nproc", "expected"),
    [
        ({"gpu": 0, "cpu": "2"}, 2, "1"),  # the CPU pods of `make image-test`
        ({"gpu": 0, "cpu": "3"}, 2, "1"),  # rounded down: never more threads than CPUs
        ({"gpu": 0, "cpu": "1500m"}, 1, "1"),
        ({"gpu": 0, "cpu": "500m"}, 1, "1"),  # at least one
        ({"gpu": 0, "cpu": 16}, 4, "4"),  # a number, not a string
        ({"gpu": 8, "cpu": "96"}, None, "12"),  # processes follow the GPUs
        ({"gpu": 0, "cpu": "2.5"}, 1, "2"),
    ],
)
def test_threads_are_cpus_over_processes(resources: dict, nproc: int | None, expected: str) -> None:
    values = {"stages": {"sft": {"resources": {"memory": "8Gi", **resources}, "nprocPerNode": nproc}}}
    assert _threads(values)["sft"] == [expected]


def test_without_a_cpu_count_the_chart_leaves_it_to_torchrun() -> None:
    values = {"stages": {"sft": {"resources": {"gpu": 0, "cpu": None, "memory": "8Gi"}}}}
    assert _threads(values)["sft"] == []


def test_a_value_set_by_the_user_wins_and_is_not_duplicated() -> None:
    assert _threads({"env": {"OMP_NUM_THREADS": "7"}}) == {"sft": ["7"], "grpo": ["7"], "eval": ["7"]}
    stage_env = {"stages": {"grpo": {"env": [{"name": "OMP_NUM_THREADS", "value": "3"}]}}}
    assert _threads(stage_env) == {"sft": ["4"], "grpo": ["3"], "eval": ["8"]}
