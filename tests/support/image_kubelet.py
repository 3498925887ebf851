"""HostKubelet's pods inside the built image, as a node would run them (`make image-e2e`).

With `R1_GRPO_E2E_IMAGE` naming an image that `make image` built, tests/support/host_kubelet.py's HostKubelet hands
each pod container here instead of running its command on this machine. The container runs in a fresh
container of that image (whatever image the pod names: the test chart's is not pullable), entered the way
`make image-test` enters it (tests/support/image.py `pod_argv`: the read-only root, user, groups, no
capabilities and no_new_privs the pod's securityContext asks), with:

- the pod's volumes at their mount paths: claim, emptyDir and secret folders bound from the host folders
  HostKubelet made for them (secrets read-only with their defaultMode, as the kubelet mounts them), an
  emptyDir of medium Memory as a tmpfs of its sizeLimit; the fsGroup applied to each bound folder as the
  kubelet applies it to a volume that supports ownership (group owner; claims and emptyDirs also setgid
  and group-writable), since a hostPath claim gets none;
- the image's environment under the container's env as HostKubelet resolved it (the same stand-ins:
  loopback rendezvous, one thread per process); command and args with the pod's own paths;
- the host's network as the pod network (new PID, mount, IPC and UTS namespaces, not a network one): what
  the pods reach as Services (the API server, the stand-in model hub) listens on this machine's loopback;
- a pod that mounts its ServiceAccount token gets HostKubelet's kubeconfig of that token at the token's
  mount path (KUBECONFIG), where a node would project the token itself.

What a node has and this has not: GPUs.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.image import Mount, buildah, image_config, image_env, pod_argv, tmpfs_size

if TYPE_CHECKING:
    from tests.support.host_kubelet import PodRun

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class ImagePod(subprocess.Popen):
    """A pod container's process; its image container is unmounted and removed once the process ended."""

    container: str | None = None
    _lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            ctr, self.container = self.container, None
        if ctr:
            _LIVE.discard(self)
            buildah("rm", ctr)  # unmounts it first

    def send_signal(self, sig: int) -> None:
        """To the container's first process, as a runtime signals a container (unshare, this process, ignores
        SIGTERM while it waits; as PID 1 of its namespace the first process gets what it has a handler for)."""
        try:
            first = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:  # unshare has exited
            first = []
        if first:
            os.kill(int(first[0]), sig)
        else:
            super().send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        code = super().wait(timeout)
        self.release()
        return code

    def poll(self) -> int | None:
        code = super().poll()
        if code is not None:
            self.release()
        return code


_LIVE: set[ImagePod] = set()


@atexit.register
def _end_all() -> None:
    """Containers of pods a failed test never waited for: killed and removed, not left in the storage."""
    for pod in list(_LIVE):
        if pod.poll() is None:
            os.killpg(pod.pid, signal.SIGKILL)
        pod.wait()


@functools.lru_cache(maxsize=4)
def _config(image: str) -> dict[str, Any]:
    return image_config(image)


def _apply_fs_group(folder: Path, fs_group: int) -> None:
    """What the kubelet does to a volume for the pod's fsGroup: the group owns it, can write it, and new
    files inherit the group (setgid folders)."""
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        os.chown(path, -1, fs_group)
        mode = path.stat().st_mode
        extra = 0o2070 if path.is_dir() else (0o060 | (0o010 if mode & 0o100 else 0))
        path.chmod((mode | extra) & 0o7777)


def _mounts(run: PodRun, fs_group: int | None) -> list[Mount]:
    volumes = {v["name"]: v for v in run.pod["spec"].get("volumes") or []}
    mounts = []
    for m in run.container.get("volumeMounts") or []:
        volume = volumes[m["name"]]
        if any("serviceAccountToken" in src for src in (volume.get("projected") or {}).get("sources") or []):
            continue  # the token: HostKubelet's kubeconfig of it is mounted there instead (start_in_image)
        empty_dir = volume.get("emptyDir")
        if empty_dir is not None and empty_dir.get("medium") == "Memory":
            mounts.append(Mount(m["mountPath"], None, size=tmpfs_size(empty_dir.get("sizeLimit") or "64Mi")))
            continue
        host = run.mounts[m["mountPath"]]
        if empty_dir is not None:
            host.chmod(0o777)  # an emptyDir is world-writable, as the kubelet makes it
        if fs_group is not None and "secret" in volume:
            for path in [host, *host.rglob("*")]:  # the files keep the volume's modes (defaultMode)
                os.chown(path, -1, fs_group)
        elif fs_group is not None:
            _apply_fs_group(host, fs_group)
        read_only = bool(m.get("readOnly")) or "secret" in volume
        mounts.append(Mount(m["mountPath"], host, read_only=read_only))
    return mounts


def start_in_image(image: str, run: PodRun, log_path: Path) -> ImagePod:
    """Start the pod's container inside `image`; its process group is the pod (SIGTERM, SIGKILL)."""
    spec = run.pod["spec"]
    config = _config(image)
    user = (config.get("User") or "0:0").split(":")
    pod_sec, sec = spec.get("securityContext") or {}, run.container.get("securityContext") or {}
    uid = int(sec.get("runAsUser", pod_sec.get("runAsUser", user[0])))
    gid = int(sec.get("runAsGroup", pod_sec.get("runAsGroup", user[-1])))
    fs_group = pod_sec.get("fsGroup")
    mounts = _mounts(run, fs_group)
    env = {**image_env(config), **run.pod_env}
    if "KUBECONFIG" in run.env:
        # The ServiceAccount token, which HostKubelet hands to a host process as a kubeconfig: read-only at
        # the token's own mount path, readable by the pod's user.
        folder = log_path.with_suffix(".serviceaccount")
        folder.mkdir(exist_ok=True)
        shutil.copyfile(run.env["KUBECONFIG"], folder / "kubeconfig")
        (folder / "kubeconfig").chmod(0o644)
        mounts.append(Mount(SERVICE_ACCOUNT_DIR, folder, read_only=True))
        env["KUBECONFIG"] = f"{SERVICE_ACCOUNT_DIR}/kubeconfig"
    ctr = buildah("from", "--pull=never", image)
    try:
        root = Path(buildah("mount", ctr))
        command = pod_argv(
            root,
            run.pod_argv,
            env=env,
            workdir=run.container.get("workingDir") or config.get("WorkingDir") or "/",
            mounts=mounts,
            uid=uid,
            gid=gid,
            fs_group=fs_group,
            read_only_root=bool(sec.get("readOnlyRootFilesystem")),
            hostname=run.name[:63],
            hosts=log_path.with_suffix(".hosts"),
            own_network=False,  # the host's network is the cluster's here: the API server, the stand-in hub
        )
        with open(log_path, "wb") as log:
            proc = ImagePod(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    except BaseException:
        buildah("rm", ctr)
        raise
    proc.container = ctr
    _LIVE.add(proc)
    return proc
