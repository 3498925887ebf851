"""`make image-test`: the built image run the way the chart's pods run it, without a container engine.

Each run is a fresh container of the image (`buildah from` + `buildah mount`: its own writable layer, the
image untouched) entered through new mount, PID, network, IPC and UTS namespaces (`unshare`), with what a
kubelet gives the chart's training pod:

- the root filesystem remounted read-only (readOnlyRootFilesystem), /proc of the new PID namespace;
- /tmp a host folder (the emptyDir `tmp`), /dev/shm a tmpfs of shmSize (the emptyDir `dshm`, medium Memory),
  the checkpoint volume a host folder owned by the fsGroup, at storage.mountPath;
- /etc/hosts and the hostname of the pod, only loopback networking;
- the process as runAsUser / runAsGroup with fsGroup as supplementary group, no capabilities and
  no_new_privs (capabilities drop ALL, allowPrivilegeEscalation false), via the image's own setpriv;
- the image's environment (its config) under the container's `env`, plus what the training operator sets
  in a PyTorchJob pod (PET_*, MASTER_ADDR/PORT, WORLD_SIZE, RANK), `$(VAR)` expanded as Kubernetes does,
  and command + args replacing the image's ENTRYPOINT + CMD.

`buildah run` cannot do this: with chroot isolation (the only one without a runtime here) buildah 1.28 has
no read-only root, and shares the host's network and PID namespaces. docs/image.md lists the steps.

    python -m tests.support.image [--image localhost/r1-grpo:dev] [--work runs/image-test]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.helmtool import REPO_ROOT, render_chart, stage_jobs
from trainer.contract.output import verify_stage_output

DEFAULT_IMAGE = "localhost/r1-grpo:dev"
RELEASE = "r1-grpo"
MASTER_PORT = 23456  # the chart's pytorchjob-port
STORAGE_DRIVER = os.environ.get("STORAGE_DRIVER", "overlay")


def buildah(*args: str) -> str:
    proc = subprocess.run(
        ["buildah", "--storage-driver", STORAGE_DRIVER, *args], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def image_config(image: str) -> dict[str, Any]:
    """The OCI config of the image (Env, Entrypoint, Cmd, WorkingDir, User)."""
    return json.loads(buildah("inspect", "--type", "image", image))["OCIv1"]["config"]


@contextmanager
def container_root(image: str) -> Iterator[Path]:
    """A fresh container of the image, mounted: its root folder (a writable layer over the image)."""
    ctr = buildah("from", "--pull=never", image)
    try:
        yield Path(buildah("mount", ctr))
    finally:
        buildah("umount", ctr)
        buildah("rm", ctr)


def expand_k8s(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion of command/args: defined variables replaced, `$$` escapes, the
    rest left as written."""
    return re.sub(
        r"\$\$|\$\((\w+)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        text,
    )


def image_env(config: Mapping[str, Any]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config.get("Env") or [])


def _container_env(container: Mapping[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" not in item:
            raise ValueError(f"env {item['name']}: only literal values can run here, not {item}")
        env[item["name"]] = expand_k8s(str(item["value"]), env)
    return env


def in_root(root: Path, path: str) -> Path:
    """`path` inside the container's root folder as the container resolves it: its symlinks (Debian's
    /var/run -> /run) lead within the root, never to the host's folders."""
    resolved, rest, hops = root, [p for p in path.split("/") if p], 0
    while rest:
        part = rest.pop(0)
        candidate = resolved / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise ValueError(f"{path}: too many symlinks under {root}")
            target = os.readlink(candidate)
            resolved = root if target.startswith("/") else resolved
            rest = [p for p in target.split("/") if p] + rest
        elif part == "..":
            resolved = resolved.parent if resolved != root else root
        elif part != ".":
            resolved = candidate
    return resolved


@dataclass(frozen=True)
class Mount:
    """One mount of a pod container: a host folder bound at `path`, or a tmpfs of `size` when host is None."""

    path: str
    host: Path | None
    read_only: bool = False
    size: str | None = None


def pod_argv(
    root: Path,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    workdir: str,
    mounts: Sequence[Mount],
    uid: int,
    gid: int,
    fs_group: int | None,
    read_only_root: bool,
    hostname: str,
    hosts: Path,
    own_network: bool = True,
) -> list[str]:
    """The host command that runs argv in the mounted container `root` as one pod container would run.

    own_network: a network namespace with loopback only; else the host's network stands for the pod network.
    """
    # Mount points the runtime would create in the container layer (the image stays unchanged).
    for sub in ["/tmp", "/dev", "/proc", "/dev/shm", *(m.path for m in mounts)]:
        in_root(root, sub).mkdir(parents=True, exist_ok=True)
    (root / "etc" / "hosts").touch()  # a mount point (images usually have none: runtimes provide it)
    hosts.write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.0.1\t{hostname}\n")
    q = shlex.quote
    setup = [
        "set -eu",
        "mount --make-rprivate /",
        f"mount --bind {q(str(root))} {q(str(root))}",
        f"mount -t proc proc {q(str(root / 'proc'))}",
        f"mount --rbind /dev {q(str(root / 'dev'))}",
        f"mount --bind {q(str(hosts))} {q(str(root / 'etc/hosts'))}",
        f"hostname {q(hostname)}",
        *(["ip link set lo up"] if own_network else []),
    ]
    for m in sorted(mounts, key=lambda m: m.path.count("/")):  # parents before what is mounted inside them
        target = q(str(in_root(root, m.path)))
        if m.host is None:
            setup.append(f"mount -t tmpfs -o size={q(m.size or '64m')},mode=1777,nosuid,nodev tmpfs {target}")
        else:
            setup.append(f"mount --bind {q(str(m.host))} {target}")
        if m.read_only:
            setup.append(f"mount -o remount,bind,ro {target}")
    if read_only_root:
        setup.append(f"mount -o remount,bind,ro {q(str(root))}")
    groups = ",".join(str(g) for g in sorted({gid, *([fs_group] if fs_group is not None else [])}))
    inner = [
        "chroot",
        str(root),
        "/usr/bin/setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        f"--groups={groups}",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
        "/usr/bin/env",
        "-i",
        f"--chdir={workdir}",
        *(f"{k}={v}" for k, v in env.items()),
        *argv,
    ]
    setup.append("exec " + shlex.join(inner))
    # unshare --fork ignores SIGTERM while it waits, so a pod's SIGTERM reaches only the container's PID 1
    # (as on a node); --kill-child ends the container when unshare itself is killed.
    namespaces = [
        "--mount",
        "--pid",
        *(["--net"] if own_network else []),
        "--ipc",
        "--uts",
        "--fork",
        "--kill-child",
    ]
    return ["unshare", *namespaces, "--", "bash", "-c", "\n".join(setup)]


def run_in_image(
    image: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    workdir: str,
    tmp_dir: Path,
    volume_dir: Path | None,
    volume_path: str | None,
    uid: int,
    gid: int,
    fs_group: int | None,
    read_only_root: bool,
    shm_size: str,
    hostname: str,
    log_path: Path,
    timeout: float,
) -> int:
    """Run argv in a fresh container of the image as one pod container; stdout+stderr to log_path."""
    mounts = [Mount("/tmp", tmp_dir), Mount("/dev/shm", None, size=shm_size)]
    if volume_dir is not None and volume_path:
        mounts.append(Mount(volume_path, volume_dir))
    with container_root(image) as root:
        command = pod_argv(
            root,
            argv,
            env=env,
            workdir=workdir,
            mounts=mounts,
            uid=uid,
            gid=gid,
            fs_group=fs_group,
            read_only_root=read_only_root,
            hostname=hostname,
            hosts=tmp_dir.parent / f"{hostname}.hosts",
        )
        with open(log_path, "w") as log:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        return proc.returncode


# ---- what make image-test runs ----------------------------------------------------------------------------


# `--main-job short`: the main job cut down for a loaded machine (the full one is 3 min on an idle 2-core
# VM, over 30 min at a load average of 10): one SFT epoch instead of six, 10 GRPO steps instead of 60,
# eval on 200 problems. Everything else is trainer/pipeline.yaml's.
SHORT_MAIN_JOB = {
    "sft": {"num_train_epochs": 1},
    "grpo": {"max_steps": 10, "eval_steps": 10, "save_steps": 10},
    "eval": {"max_eval_samples": 200},
}


# `--main-job smoke`: a few steps of each stage, for checking the pods' plumbing when even the short job
# does not fit (no accuracy to compare).
SMOKE_MAIN_JOB = {
    "sft": {"max_steps": 5, "save_steps": 5, "logging_steps": 1},
    "grpo": {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "max_eval_samples": 20},
    "eval": {"max_eval_samples": 20},
}


def main_job_config(scale: str = "full") -> dict[str, Any]:
    """trainer/pipeline.yaml (the main job `r1-grpo pipeline run` runs), or its short variant."""
    pipeline = yaml.safe_load((REPO_ROOT / "trainer" / "pipeline.yaml").read_text())
    overrides = {"full": {}, "short": SHORT_MAIN_JOB, "smoke": SMOKE_MAIN_JOB}
    if scale not in overrides:
        raise ValueError(f"--main-job {scale!r}: expected one of {sorted(overrides)}")
    for name, args in overrides[scale].items():
        pipeline["stages"][name].setdefault("args", {}).update(args)
    return pipeline


def tiny_chart_values(pipeline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The chart's defaults with the main job's model, data and stage arguments (trainer/pipeline.yaml):
    builtin:tiny on builtin:arith, CPU pods, each stage's args exactly the main job's (the chart's own
    default args nulled, so the rendered flags are the pipeline's)."""
    pipeline = pipeline or main_job_config()
    chart = yaml.safe_load((REPO_ROOT / "charts" / "r1-grpo" / "values.yaml").read_text())
    stages: dict[str, Any] = {}
    for name, stage in pipeline["stages"].items():
        args: dict[str, Any] = {key: None for key in chart["stages"][name].get("args") or {}}
        args.update(stage.get("args") or {})
        stages[name] = {
            "nprocPerNode": stage.get("nproc_per_node", 1),
            "resources": {"gpu": 0, "cpu": "2", "memory": "8Gi"},
            "args": args,
        }
    return {
        "model": {"nameOrPath": pipeline["model"]},
        "dataset": {"name": pipeline["dataset"], "config": ""},
        "shmSize": "1Gi",
        "stages": stages,
    }


def pod_of(job: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, training container) of the Master replica of a rendered stage PyTorchJob."""
    spec = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    container = next(c for c in spec["containers"] if c["name"] == "pytorch")
    return spec, container


def operator_env(job: Mapping[str, Any]) -> dict[str, str]:
    """What the training operator puts in the Master pod of a one-node PyTorchJob."""
    master = f"{job['metadata']['name']}-master-0"
    nproc = str(job["spec"].get("nprocPerNode", "1"))
    return {
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": nproc,
        "PET_NODE_RANK": "0",
        "MASTER_ADDR": master,
        "MASTER_PORT": str(MASTER_PORT),
        "WORLD_SIZE": "1",
        "RANK": "0",
        "PYTHONUNBUFFERED": "1",
    }


def tmpfs_size(value: str) -> str:
    """A Kubernetes memory quantity (1Gi) as tmpfs size (1g)."""
    match = re.fullmatch(r"(\d+)([KMGT])i?", str(value))
    if not match:
        raise ValueError(f"memory quantity {value!r}: expected one like 16Gi")
    return f"{match.group(1)}{match.group(2).lower()}"


def run_stage_pod(image: str, job: Mapping[str, Any], work: Path, volume: Path, shm: str) -> dict[str, Any]:
    spec, container = pod_of(job)
    pod_sec, sec = spec.get("securityContext") or {}, container.get("securityContext") or {}
    uid = int(sec.get("runAsUser", pod_sec.get("runAsUser", 0)))
    gid = int(sec.get("runAsGroup", pod_sec.get("runAsGroup", 0)))
    assert sec.get("allowPrivilegeEscalation") is False and sec["capabilities"]["drop"] == ["ALL"], sec
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["tmp"] == "/tmp" and mounts["dshm"] == "/dev/shm", mounts
    config = image_config(image)
    env = {**image_env(config), **operator_env(job), **_container_env(container)}
    argv = [expand_k8s(a, env) for a in [*container["command"], *container.get("args", [])]]
    stage = job["metadata"]["labels"]["r1-grpo.io/stage"]
    tmp = work / f"{stage}-tmp"  # a new emptyDir per pod
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tmp.chmod(0o1777)
    started = time.time()
    rc = run_in_image(
        image,
        argv,
        env=env,
        workdir=container.get("workingDir") or config.get("WorkingDir") or "/",
        tmp_dir=tmp,
        volume_dir=volume,
        volume_path=mounts["checkpoints"],
        uid=uid,
        gid=gid,
        fs_group=pod_sec.get("fsGroup"),
        read_only_root=bool(sec.get("readOnlyRootFilesystem")),
        shm_size=shm,
        hostname=str(operator_env(job)["MASTER_ADDR"]),
        log_path=work / f"{stage}.log",
        timeout=3600,
    )
    return {"stage": stage, "argv": argv, "rc": rc, "seconds": round(time.time() - started, 1)}


# The path Colossal-AI's CPU kernels (HybridAdam's cpu_adam) take: torch.utils.cpp_extension compiles a
# C++ extension with the image's g++ and ninja against torch's headers and Python.h, builds it under
# $HOME/.cache (the pod's /tmp) and imports it, as UID 10001 on the read-only root. The image has no nvcc
# (docs/image.md), so CUDA extensions are not tried.
JIT_CHECK = """
import torch
from torch.utils import cpp_extension
module = cpp_extension.load_inline(
    name="r1_grpo_image_check",
    cpp_sources="torch::Tensor twice(torch::Tensor x) { return x * 2; }",
    functions=["twice"],
)
assert module.twice(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]
print("compiled and imported", module.__file__)
"""

# What a GPU pod of this image gets for the offloading plugins: their fused CUDA Adam cannot be compiled (the
# image's CUDA_HOME has no nvcc), so the stage refuses them at its start (trainer/kernels.py), naming the fix.
KERNELS_CHECK = """
import os
from torch.utils.cpp_extension import CUDA_HOME
from trainer.kernels import fused_adam_problem
problem = fused_adam_problem("zero2_cpu", cuda=True, cuda_home=CUDA_HOME)
print("CUDA_HOME", CUDA_HOME, sorted(os.listdir(os.path.join(CUDA_HOME, "bin"))))
print(problem)
assert problem and os.path.join(CUDA_HOME, "bin", "nvcc") in problem
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.image", description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "runs" / "image-test")
    parser.add_argument("--seed", type=int, default=None, help="seed of the main job (default: its own)")
    parser.add_argument(
        "--main-job",
        choices=("full", "short", "smoke"),
        default="full",
        help="the main job and stage pods as trainer/pipeline.yaml has them, or cut down (SHORT_MAIN_JOB)",
    )
    parser.add_argument(
        "--skip-summary",
        action="store_true",
        help="the main job without its summary table (which re-evaluates the base, SFT and GRPO models)",
    )
    parser.add_argument(
        "--write-config", type=Path, help="only write the main job's pipeline YAML here (for a run outside)"
    )
    parser.add_argument(
        "--only",
        choices=("help", "jit", "pipeline", "stages"),
        action="append",
        help="run only these parts",
    )
    args = parser.parse_args(argv)
    pipeline = main_job_config(args.main_job)
    if args.write_config:
        args.write_config.write_text(yaml.safe_dump(pipeline, sort_keys=False))
        return 0
    parts = args.only or ["help", "jit", "pipeline", "stages"]
    work: Path = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report: dict[str, Any] = {
        "main_job": args.main_job,
        "image": args.image,
        "image_id": buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", args.image),
    }
    config = image_config(args.image)
    user = (config.get("User") or "0:0").split(":")
    uid, gid = int(user[0]), int(user[1] if len(user) > 1 else user[0])
    entrypoint = list(config.get("Entrypoint") or [])
    failures: list[str] = []

    def plain(name: str, cmd: list[str], timeout: float) -> int:
        tmp = work / f"{name}-tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        tmp.chmod(0o1777)
        started = time.time()
        rc = run_in_image(
            args.image,
            cmd,
            env={**image_env(config), "HOME": "/tmp"},
            workdir="/tmp",
            tmp_dir=tmp,
            volume_dir=None,
            volume_path=None,
            uid=uid,
            gid=gid,
            fs_group=gid,
            read_only_root=True,
            shm_size="1g",
            hostname=name,
            log_path=work / f"{name}.log",
            timeout=timeout,
        )
        report[name] = {"argv": cmd, "rc": rc, "seconds": round(time.time() - started, 1)}
        print(
            f"[{name}] {shlex.join(cmd)}: exit {rc} in {report[name]['seconds']}s (log {work / f'{name}.log'})",
            flush=True,
        )
        if rc != 0:
            failures.append(name)
        return rc

    if "help" in parts:
        plain("help", [*entrypoint, "--help"], 300)
        if "pipeline" not in (work / "help.log").read_text():
            failures.append("help: no `pipeline` command in r1-grpo --help")
    if "jit" in parts:
        plain("jit", ["python", "-c", JIT_CHECK], 1800)
        plain("kernels", ["python", "-c", KERNELS_CHECK], 300)
    if "pipeline" in parts:
        cmd = [*entrypoint, "pipeline", "run"] + (["--seed", str(args.seed)] if args.seed is not None else [])
        if args.skip_summary:
            cmd.append("--skip_summary")
        if args.main_job != "full":
            (work / "pipeline-tmp").mkdir(parents=True)
            (work / "pipeline-tmp" / "pipeline.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
            cmd += ["--config", "/tmp/pipeline.yaml"]
        if plain("pipeline", cmd, 3600) == 0:
            summary = work / "pipeline-tmp" / "runs" / "local" / "summary.json"
            report["pipeline"]["summary"] = json.loads(summary.read_text())
            for stage in ("sft", "grpo", "eval"):
                verify_stage_output(summary.parent / stage, stage)
    if "stages" in parts:
        values = tiny_chart_values(pipeline)
        (work / "values.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
        volume = work / "volume"
        volume.mkdir()
        chart_values = yaml.safe_load((REPO_ROOT / "charts" / "r1-grpo" / "values.yaml").read_text())
        fs_group = int(chart_values["podSecurityContext"]["fsGroup"])
        os.chown(volume, 0, fs_group)  # what the kubelet does to a volume for fsGroup
        volume.chmod(0o2775)
        jobs = stage_jobs(render_chart(values, release=RELEASE), release=RELEASE)
        report["stages"] = []
        for name, job in jobs.items():
            result = run_stage_pod(args.image, job, work, volume, tmpfs_size(values["shmSize"]))
            report["stages"].append(result)
            print(
                f"[{name} pod] {shlex.join(result['argv'])}: exit {result['rc']} in {result['seconds']}s",
                flush=True,
            )
            if result["rc"] != 0:
                failures.append(f"{name} pod")
                break
            folder = volume / RELEASE / name
            manifest = verify_stage_output(folder, name)  # what `r1-grpo status` and the controller check
            result["manifest"] = manifest.to_dict()
            if name == "eval":
                result["metrics"] = json.loads((folder / "metrics.json").read_text())
    report["failures"] = failures
    (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"report: {work / 'report.json'}")
    if failures:
        print(f"image-test: FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    print("image-test: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
