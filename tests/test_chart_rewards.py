"""rewards.files (GRPO's --reward_module files): one ConfigMap, mounted read-only into every stage pod at
rewards.mountPath, rendered by helm and checked strictly; the default rendering has neither."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.helmtool import HelmError, lint_chart, render_chart, stage_jobs
from tests.test_chart import helm, k8s_errors, rendered, sdk_errors  # noqa: F401 (helm: a fixture)
from trainer.contract.stage_args import check_stage_argv

SITE_REWARDS = "def brevity(response, ground_truth):\n    return 1.0 if len(response) < 2000 else 0.0\n"
VALUES = {
    "rewards": {"files": {"site_rewards.py": SITE_REWARDS, "helpers.py": "LIMIT = 2000\n"}},
    "stages": {
        "sft": {"nodes": 2},  # a Worker replica mounts it too
        "grpo": {
            "args": {
                "reward_module": ["/etc/r1-grpo/rewards/site_rewards.py:brevity"],
                "reward_funcs": ["r1", "brevity"],
                "reward_weights": [1.0, 0.2],
            }
        },
    },
}


def _replicas(docs: list[dict]) -> dict[str, dict]:
    return {
        f"{stage}/{replica}": spec["template"]["spec"]
        for stage, job in stage_jobs(docs).items()
        for replica, spec in job["spec"]["pytorchReplicaSpecs"].items()
    }


def test_reward_files_are_a_configmap_mounted_read_only_in_every_stage_pod() -> None:
    docs = rendered(VALUES)
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "r1-grpo-rewards"]
    assert len(maps) == 1 and maps[0]["data"] == VALUES["rewards"]["files"]
    replicas = _replicas(docs)
    assert set(replicas) == {"sft/Master", "sft/Worker", "grpo/Master", "eval/Master"}
    for name, pod in replicas.items():
        volume = next(v for v in pod["volumes"] if v["name"] == "rewards")
        assert volume["configMap"] == {"name": "r1-grpo-rewards", "defaultMode": 0o444}, name
        (container,) = pod["containers"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "rewards")
        assert mount == {"name": "rewards", "mountPath": "/etc/r1-grpo/rewards", "readOnly": True}, name
    errors = [e for doc in docs for e in k8s_errors(doc)]
    errors += [e for job in stage_jobs(docs).values() for e in sdk_errors(job)]
    assert not errors, "\n".join(errors)
    # The GRPO stage's flags pass the controller's check (the stage flag table knows --reward_module).
    (master,) = stage_jobs(docs)["grpo"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"
    ]
    argv = master["args"][master["args"].index("trainer.grpo") + 1 :]
    check_stage_argv("grpo", argv)
    assert argv[argv.index("--reward_module") + 1] == "/etc/r1-grpo/rewards/site_rewards.py:brevity"


def test_mount_path_is_a_value_and_default_renders_no_rewards() -> None:
    docs = rendered({**VALUES, "rewards": {**VALUES["rewards"], "mountPath": "/opt/rewards"}})
    for pod in _replicas(docs).values():
        assert {"name": "rewards", "mountPath": "/opt/rewards", "readOnly": True} in pod["containers"][0][
            "volumeMounts"
        ]
    default = rendered()
    assert not [d for d in default if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-rewards")]
    for pod in _replicas(default).values():
        assert "rewards" not in {v["name"] for v in pod["volumes"]}


def test_lint_strict_passes_with_reward_files(helm: Path) -> None:  # noqa: F811
    output = lint_chart(VALUES, helm=helm)
    assert "1 chart(s) linted, 0 chart(s) failed" in output and "[WARNING]" not in output


@pytest.mark.parametrize(
    ("rewards", "pattern"),
    [
        ({"files": {"my-rewards.py": "x = 1\n"}}, r"'my-rewards\.py' does not match pattern"),
        ({"files": {"rewards.txt": "x = 1\n"}}, r"'rewards\.txt' does not match pattern"),
        ({"files": {"r.py": ""}}, r"rewards[./]files[./]r\.py"),
        ({"files": {"r.py": 3}}, r"rewards[./]files[./]r\.py"),
        ({"mountPath": "rewards"}, r"rewards[./]mountPath"),
        ({"file": {"r.py": "x = 1\n"}}, r"file.*not allowed|additional properties"),
    ],
)
def test_bad_reward_values_fail_the_schema(rewards: dict, pattern: str) -> None:
    with pytest.raises(HelmError) as failure:
        render_chart({"rewards": rewards})
    assert re.search(pattern, failure.value.output, re.IGNORECASE), failure.value.output
