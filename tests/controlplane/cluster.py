"""A real Kubernetes control plane on 127.0.0.1 for tests, built from source by build.sh.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as local processes; kwok plays the
kubelet of fake nodes (their pods become Running without containers), and the Kubeflow training operator
runs out of cluster with its PyTorchJob CRD and validating webhook. Nothing listens on or contacts a
non-loopback address, except that the operator's webhook server binds all interfaces (v1.9.4 has no flag
for its host; its port is random and it serves TLS only).

    with ControlPlane() as cp:                      # ~30 s once the binaries are cached
        cp.create_gpu_node("gpu-0", gpus=8)
        core = kubernetes.client.CoreV1Api(cp.api_client())

    python tests/controlplane/cluster.py up         # for debugging: prints the kubeconfig, Ctrl-C stops

Only the standard library is needed to start it (api_client() needs the `kubernetes` package) plus the
`openssl` command for the certificates.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD_SH = HERE / "build.sh"
# The job-API controllers (JobSet, Kubeflow Trainer v2, Kueue): their own script and cache, so that only
# the tests that use them build or start them.
BUILD_JOBS_SH = HERE.parent / "controlplane-jobs" / "build.sh"

GPU_RESOURCE = "nvidia.com/gpu"
# The chart tolerates key nvidia.com/gpu (operator Exists, effect NoSchedule): charts/r1-grpo/values.yaml.
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
# kwok manages only the nodes carrying this annotation, so tests can also create nodes it leaves alone.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")

# Fixed by training-operator v1.9.4 (cmd/training-operator.v1, pkg/cert): the cert rotator reads the Secret
# below and checks its server cert for <service>.<namespace>.svc, and the webhook server reads tls.crt/key
# from this directory (controller-runtime's default with TMPDIR unset) which a pod would mount the Secret
# at. Out of cluster we write both ourselves, from one PKI shared by every ControlPlane on the machine, so
# that concurrent control planes write identical files there.
OPERATOR_NAMESPACE = "kubeflow"
OPERATOR_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
OPERATOR_SECRET = "training-operator-webhook-cert"
OPERATOR_SERVICE = "training-operator"
OPERATOR_WEBHOOK_CONFIG = "validator.training-operator.kubeflow.org"
OPERATOR_CA_NAME = "training-operator-ca"

# What the audit log records (log_dir/audit.log, JSON lines): every request made with a service account's
# token outside kube-system -- the identities tests give the code under test -- and the marker requests of
# audit_events(). The components (admin certificate, kube-system accounts) are left out to keep it small.
AUDIT_SYNC_PATH = "/livez/ping"
AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  nonResourceURLs: ["{AUDIT_SYNC_PATH}"]
- level: None
  userGroups: ["system:serviceaccounts:kube-system"]
- level: Metadata
  userGroups: ["system:serviceaccounts"]
- level: None
"""


def ensure_binaries() -> Path:
    """Builds what is missing (build.sh is a no-op once cached) and returns the cache dir."""
    out = subprocess.run(["bash", str(BUILD_SH)], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def ensure_job_binaries() -> Path:
    """Builds the JobSet, Trainer v2 and Kueue binaries and manifests when missing (tests/controlplane-jobs/build.sh) and
    returns their cache dir."""
    out = subprocess.run(["bash", str(BUILD_JOBS_SH)], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _genkey(d: Path, name: str) -> None:
    # PKCS#1 ("RSA PRIVATE KEY"): the operator's cert rotator parses its CA key only in that format, and
    # OpenSSL 3 writes PKCS#8 unless told otherwise (1.1 writes PKCS#1 and has no -traditional).
    _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=d)
    if (d / f"{name}.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----"):
        _openssl("rsa", "-in", f"{name}.key", "-traditional", "-out", f"{name}.key", cwd=d)


def _make_ca(d: Path, name: str, cn: str, san: str | None = None) -> None:
    ext = [
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,digitalSignature,keyEncipherment",
    ]
    if san:
        ext += ["-addext", f"subjectAltName={san}"]
    _genkey(d, name)
    _openssl(
        "req", "-x509", "-key", f"{name}.key", "-days", "3650", "-subj", f"/CN={cn}", "-out", f"{name}.crt",
        *ext, cwd=d,
    )  # fmt: skip


def _make_cert(
    d: Path, name: str, ca: str, subj: str, *, client: bool = False, san: str | None = None
) -> None:
    lines = [
        "basicConstraints=CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}",
    ]
    if san:
        lines.append(f"subjectAltName={san}")
    (d / f"{name}.ext").write_text("\n".join(lines) + "\n")
    _genkey(d, name)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subj, "-out", f"{name}.csr", cwd=d)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-set_serial",
        str(secrets.randbits(63) + 1),
        "-days",
        "3650",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=d,
    )


def _write_if_changed(path: Path, data: bytes, mode: int = 0o600) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


def _operator_pki(cache_dir: Path) -> Path:
    """The webhook CA and serving cert, made once per cache dir (valid ten years, for 127.0.0.1 too)."""
    d = cache_dir / "operator-webhook-pki"
    d.mkdir(exist_ok=True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / "tls.crt").exists():
            # The rotator checks the CA against its own name and the server cert against the service name.
            _make_ca(d, "ca", OPERATOR_CA_NAME, san=f"DNS:{OPERATOR_CA_NAME}")
            svc = f"{OPERATOR_SERVICE}.{OPERATOR_NAMESPACE}.svc"
            _make_cert(d, "tls.tmp", "ca", f"/CN={svc}", san=f"DNS:{svc},IP:127.0.0.1")
            (d / "tls.tmp.key").rename(d / "tls.key")
            (d / "tls.tmp.crt").rename(d / "tls.crt")
    return d


def _die_with_parent() -> None:
    # Best effort: a killed test run must not leave etcd and friends behind (Linux only). SIGKILL, as
    # SIGTERM lets the apiserver hang in its graceful shutdown once etcd is gone too.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ApiError(RuntimeError):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


class ControlPlane:
    """Starts the control plane in start() (or `with`), stops it in stop(); logs stay in log_dir."""

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        operator: bool = True,
        kwok: bool = True,
        jobs: bool = False,
        kueue_frameworks: tuple[str, ...] | None = None,
        stop_timeout: float = 15.0,
    ):
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="r1-grpo-controlplane-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.workdir / "logs"
        self.pki_dir = self.workdir / "pki"
        self.kubeconfig_path = self.workdir / "kubeconfig"
        self.audit_log_path = self.log_dir / "audit.log"
        self.pod_log_dir = self.workdir / "pod-logs"
        self._audit: list[dict] = []
        self._audit_markers: set[str] = set()
        self._audit_offset = 0
        self._audit_lock = threading.Lock()
        self.with_operator = operator
        self.with_kwok = kwok
        # the JobSet controller, Kubeflow Trainer v2 and Kueue (jobcontrollers.py); Kueue manages the kinds
        # of kueue_frameworks (default: TrainJobs only; empty: no Kueue)
        self.with_jobs = jobs
        self.kueue_frameworks = kueue_frameworks
        self.stop_timeout = stop_timeout
        self.cache_dir: Path | None = None
        self.server = ""
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._apiserver_args: list[str] = []
        self._ssl: ssl.SSLContext | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> ControlPlane:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.cache_dir = ensure_binaries()
        self.log_dir.mkdir(exist_ok=True)
        self.pki_dir.mkdir(exist_ok=True)
        self._make_pki()

        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn(
            "etcd",
            [
                f"--data-dir={self.workdir / 'etcd'}",
                "--name=default",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",  # throwaway data: fsync only slows tests down
                "--log-level=warn",
            ],
        )
        self._wait("etcd", lambda: b'"health":"true"' in _http_get(f"{etcd_url}/health"), timeout)

        api_port = free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        p = self.pki_dir
        self._apiserver_args = [
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={api_port}",
            "--advertise-address=127.0.0.1",
            f"--tls-cert-file={p / 'apiserver.crt'}",
            f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=Node,RBAC",
            # The default reconciler keeps failing: Endpoints may not hold the loopback advertise address.
            "--endpoint-reconciler-type=none",
            # pods/log goes to the node's "kubelet" (kwok) at its InternalIP; node names do not resolve.
            "--kubelet-preferred-address-types=InternalIP",
            f"--audit-policy-file={self._write_audit_policy()}",
            f"--audit-log-path={self.audit_log_path}",
            "--audit-log-format=json",
            "--audit-log-mode=blocking",
        ]
        self._spawn("kube-apiserver", self._apiserver_args)
        self._write_kubeconfig()
        self._wait("kube-apiserver", lambda: self._get_raw("/readyz") == b"ok", timeout)

        kubeconfig = str(self.kubeconfig_path)
        auth = [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
        ]
        kcm_port = free_port()
        self._spawn(
            "kube-controller-manager",
            [
                *auth,
                f"--secure-port={kcm_port}",
                f"--service-account-private-key-file={p / 'sa.key'}",
                f"--root-ca-file={p / 'ca.crt'}",
                "--use-service-account-credentials",
                "--controllers=*",
                # A claim made before its pre-bound volume waits for this resync (default 15 s) to bind.
                "--pvclaimbinder-sync-period=2s",
            ],
        )
        sched_port = free_port()
        self._spawn("kube-scheduler", [*auth, f"--secure-port={sched_port}"])
        for name, port in (("kube-controller-manager", kcm_port), ("kube-scheduler", sched_port)):
            self._wait(name, lambda port=port: _https_get_insecure(port, "/healthz") == b"ok", timeout)

        if self.with_kwok:
            self._start_kwok(timeout)
        if self.with_operator:
            self._start_operator(timeout)
        if self.with_jobs:
            from tests.controlplane.jobcontrollers import DEFAULT_KUEUE_FRAMEWORKS, start_job_controllers

            frameworks = (
                self.kueue_frameworks if self.kueue_frameworks is not None else DEFAULT_KUEUE_FRAMEWORKS
            )
            start_job_controllers(self, ensure_job_binaries(), tuple(frameworks), timeout)

    def _start_kwok(self, timeout: float) -> None:
        assert self.cache_dir
        # kwok has no built-in stages; build.sh copies kwokctl's default ("fast") set from the kwok module.
        config = self.workdir / "kwok.yaml"
        stages = (self.cache_dir / "manifests" / "kwok-stages.yaml").read_text()
        if self.with_jobs:
            # A TrainJob's pods belong to (JobSet's) batch Jobs, which that set completes at once: leave the
            # chart's training pods (label r1-grpo.io/stage) to the test's kubelet stand-in instead.
            owner = "    - key: '.metadata.ownerReferences.[].kind'\n"
            assert stages.count(owner) == 1, "kwok's pod-complete stage changed; update this edit"
            stages = stages.replace(
                owner,
                "    - key: '.metadata.labels.\"r1-grpo.io/stage\"'\n      operator: 'DoesNotExist'\n"
                + owner,
            )
        config.write_text(stages)
        home = self.workdir / "kwok-home"  # so a ~/.kwok/kwok.yaml of the user is not merged in
        home.mkdir(exist_ok=True)
        # Pod logs: kwok serves a pod's log from the file its Logs object names (set_pod_log), through the
        # kubelet API the apiserver proxies pods/log to (HTTPS at the node's InternalIP and kubelet port).
        self.request(
            "POST",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            (self.cache_dir / "manifests" / "kwok-logs-crd.yaml").read_bytes(),
            content_type="application/yaml",
        )
        self._wait(
            "kwok Logs CRD",
            lambda: _condition(
                self.request(
                    "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/logs.kwok.x-k8s.io"
                ),
                "Established",
            ),
            timeout,
        )
        port = free_port()
        key, value = KWOK_NODE_ANNOTATION
        p = self.pki_dir
        self._spawn(
            "kwok",
            [
                f"--kubeconfig={self.kubeconfig_path}",
                f"--config={config}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={key}={value}",
                "--node-ip=127.0.0.1",
                "--cidr=10.244.0.0/16",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{port}",
                f"--node-port={port}",  # written into each node's status.daemonEndpoints
                f"--tls-cert-file={p / 'kwok.crt'}",
                f"--tls-private-key-file={p / 'kwok.key'}",
                "--enable-crds=Logs",
            ],
            env={"HOME": str(home)},
        )
        self._wait("kwok", lambda: _https_get_insecure(port, "/healthz") == b"ok", timeout)

    def _start_operator(self, timeout: float) -> None:
        assert self.cache_dir
        crd_path = self.cache_dir / "manifests" / "kubeflow.org_pytorchjobs.yaml"
        self.request(
            "POST",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            crd_path.read_bytes(),
            content_type="application/yaml",
        )
        pki = _operator_pki(self.cache_dir)
        files = {n: (pki / n).read_bytes() for n in ("ca.crt", "ca.key", "tls.crt", "tls.key")}
        OPERATOR_CERT_DIR.mkdir(parents=True, exist_ok=True)
        for n in ("tls.crt", "tls.key"):
            _write_if_changed(OPERATOR_CERT_DIR / n, files[n])
        self.create_namespace(OPERATOR_NAMESPACE, wait_service_account=False)
        self.request(
            "POST",
            f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": OPERATOR_SECRET, "namespace": OPERATOR_NAMESPACE},
                "data": {n: base64.b64encode(b).decode() for n, b in files.items()},
            },
        )
        webhook_port, probe_port = free_port(), free_port()
        # The upstream manifests point at the operator's Service; out of cluster the apiserver calls the
        # webhook server on loopback (the serving cert has IP 127.0.0.1 too). The rotator re-injects the same
        # caBundle into this configuration by name.
        self.request(
            "POST",
            "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations",
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingWebhookConfiguration",
                "metadata": {"name": OPERATOR_WEBHOOK_CONFIG},
                "webhooks": [
                    {
                        "name": "validator.pytorchjob.training-operator.kubeflow.org",
                        "admissionReviewVersions": ["v1"],
                        "clientConfig": {
                            "url": f"https://127.0.0.1:{webhook_port}/validate-kubeflow-org-v1-pytorchjob",
                            "caBundle": base64.b64encode(files["ca.crt"]).decode(),
                        },
                        "failurePolicy": "Fail",
                        "sideEffects": "None",
                        "rules": [
                            {
                                "apiGroups": ["kubeflow.org"],
                                "apiVersions": ["v1"],
                                "operations": ["CREATE", "UPDATE"],
                                "resources": ["pytorchjobs"],
                            }
                        ],
                    }
                ],
            },
        )
        self._wait(
            "PyTorchJob CRD",
            lambda: _condition(
                self.request(
                    "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/pytorchjobs.kubeflow.org"
                ),
                "Established",
            ),
            timeout,
        )
        # TMPDIR unset: the webhook server's cert dir must be the /tmp one the rotator was told about.
        env = {
            "KUBECONFIG": str(self.kubeconfig_path),
            "MY_POD_NAMESPACE": OPERATOR_NAMESPACE,
            "TMPDIR": None,
        }
        self._spawn(
            "training-operator",
            [
                "--enable-scheme=pytorchjob",  # the other schemes' CRDs are not installed
                f"--webhook-server-port={webhook_port}",
                "--metrics-bind-address=0",
                f"--health-probe-bind-address=127.0.0.1:{probe_port}",
                "--leader-elect=false",
            ],
            env=env,
        )
        self._wait(
            "training-operator", lambda: _http_get(f"http://127.0.0.1:{probe_port}/readyz") == b"ok", timeout
        )
        # End to end: a dry-run create goes through the webhook (failurePolicy Fail).
        self._wait(
            "training-operator webhook",
            lambda: (
                self.request(
                    "POST",
                    "/apis/kubeflow.org/v1/namespaces/default/pytorchjobs?dryRun=All",
                    _probe_pytorchjob(),
                )
                is not None
            ),
            timeout,
        )

    def kill_apiserver(self) -> None:
        """Kills kube-apiserver (SIGKILL, as a crash or an OOM kill would) and waits until it is gone; etcd
        and the other components stay up and keep retrying, as on a real control plane."""
        for name, proc in self._procs:
            if name == "kube-apiserver" and proc.poll() is None:
                proc.kill()
                proc.wait()

    def start_apiserver(self, timeout: float = 180.0) -> None:
        """Starts kube-apiserver again with the same flags: the same port, certificates and etcd (so the
        same objects, and the same tokens are valid). Returns once /readyz says ok."""
        index = next(i for i, (name, _) in enumerate(self._procs) if name == "kube-apiserver")
        if self._procs[index][1].poll() is None:
            raise RuntimeError("kube-apiserver is still running: kill_apiserver() first")
        self._spawn("kube-apiserver", self._apiserver_args)
        self._procs[index] = self._procs.pop()  # keep the start order, which stop() reverses
        self._wait("kube-apiserver (restarted)", lambda: self._get_raw("/readyz") == b"ok", timeout)

    def stop(self) -> None:
        """SIGTERM each process (newest first), SIGKILL it after stop_timeout; keeps workdir and logs."""
        while self._procs:
            name, proc = self._procs.pop()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)

    # -- processes and certificates -------------------------------------------------------------------

    def _spawn(
        self,
        name: str,
        args: list[str],
        env: dict[str, str | None] | None = None,
        bin_dir: Path | None = None,
    ) -> None:
        assert self.cache_dir
        full_env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = v
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [str((bin_dir or self.cache_dir / "bin") / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )
        self._procs.append((name, proc))

    def _wait(self, what: str, ready: Callable[[], Any], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        pause = 0.02  # most conditions hold within a few tenths: poll fast first, back off to 0.2 s
        while time.monotonic() < deadline:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                        f"{self.log_tail(name)}"
                    )
            try:
                if ready():
                    return
            except (OSError, ApiError, ValueError) as e:
                last = e
            time.sleep(pause)
            pause = min(pause * 1.5, 0.2)
        raise TimeoutError(
            f"{what} not ready after {timeout:.0f} s (last error: {last}); logs in {self.log_dir}"
        )

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _write_audit_policy(self) -> Path:
        path = self.workdir / "audit-policy.yaml"
        path.write_text(AUDIT_POLICY)
        return path

    def _make_pki(self) -> None:
        d = self.pki_dir
        _make_ca(d, "ca", "r1-grpo-test-ca")
        _make_cert(
            d,
            "apiserver",
            "ca",
            "/CN=kube-apiserver",
            san="DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,IP:127.0.0.1,IP:10.0.0.1",
        )
        _make_cert(d, "admin", "ca", "/O=system:masters/CN=admin", client=True)
        _make_cert(d, "kwok", "ca", "/CN=kwok", san="DNS:localhost,IP:127.0.0.1")
        _genkey(d, "sa")
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)

    def _write_kubeconfig(self) -> None:
        def b64(name: str) -> str:
            return base64.b64encode((self.pki_dir / name).read_bytes()).decode()

        # JSON is valid YAML; the credentials are inlined so the file can be copied around.
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "r1-grpo-test",
            "clusters": [
                {
                    "name": "r1-grpo-test",
                    "cluster": {"server": self.server, "certificate-authority-data": b64("ca.crt")},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64("admin.crt"),
                        "client-key-data": b64("admin.key"),
                    },
                }
            ],
            "contexts": [{"name": "r1-grpo-test", "context": {"cluster": "r1-grpo-test", "user": "admin"}}],
        }
        _write_if_changed(self.kubeconfig_path, json.dumps(config, indent=2).encode())

    # -- API helpers ------------------------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
            self._ssl.load_cert_chain(str(self.pki_dir / "admin.crt"), str(self.pki_dir / "admin.key"))
        return self._ssl

    def _get_raw(self, path: str) -> bytes:
        with urllib.request.urlopen(self.server + path, context=self._context(), timeout=10) as r:
            return r.read()

    def request(
        self,
        method: str,
        path: str,
        body: dict | bytes | None = None,
        *,
        content_type: str = "application/json",
    ) -> dict:
        """A raw API call as cluster admin; returns the decoded JSON, raises ApiError on HTTP errors."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        if method == "PATCH" and content_type == "application/json":
            content_type = "application/merge-patch+json"
        req = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type, "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, context=self._context(), timeout=30) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace")) from None

    def api_client(self):
        """A `kubernetes.client.ApiClient` for this cluster (the `kubernetes` package is imported lazily)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig_path))

    def create_namespace(
        self, name: str, *, wait_service_account: bool = True, timeout: float = 60.0
    ) -> None:
        """Creates a namespace; pods are rejected until the controller manager made its default account."""
        self.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )
        if wait_service_account:
            path = f"/api/v1/namespaces/{name}/serviceaccounts/default"
            self._wait(f"serviceaccount {name}/default", lambda: self.request("GET", path), timeout)

    def create_gpu_node(
        self,
        name: str,
        *,
        gpus: int = 8,
        cpu: str = "96",
        memory: str = "1Ti",
        labels: dict[str, str] | None = None,
        taint: bool = True,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> dict:
        """A fake node run by kwok with `gpus` nvidia.com/gpu, tainted like a GPU node pool."""
        key, value = KWOK_NODE_ANNOTATION
        resources = {
            "cpu": cpu,
            "memory": memory,
            "pods": "110",
            "ephemeral-storage": "1Ti",
            GPU_RESOURCE: str(gpus),
        }
        node = self.request(
            "POST",
            "/api/v1/nodes",
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        **(labels or {}),
                    },
                },
                "spec": {"taints": [GPU_TAINT] if taint else []},
                "status": {"capacity": resources, "allocatable": resources},
            },
        )
        if wait:
            # Ready from kwok, then the node lifecycle controller lifts the not-ready taint.
            def ready() -> bool:
                n = self.request("GET", f"/api/v1/nodes/{name}")
                taints = {t["key"] for t in n.get("spec", {}).get("taints") or []}
                return _condition(n, "Ready") and "node.kubernetes.io/not-ready" not in taints

            self._wait(f"node {name}", ready, timeout)
        return node

    def create_hostpath_pv(
        self,
        name: str,
        path: str | Path,
        *,
        capacity: str = "200Gi",
        access_modes: tuple[str, ...] = ("ReadWriteMany",),
        storage_class: str = "",
        claim: tuple[str, str] | None = None,
    ) -> dict:
        """A hostPath PersistentVolume; storage_class "" matches the chart's `storage.storageClass: "-"`.

        claim=(namespace, name) pre-binds it to that PVC; made before the claim, it binds at once (a claim
        made first waits for the binder's next resync). kwok runs no containers, so nothing is mounted:
        the path only matters to code that reads it from the test process.
        """
        spec: dict[str, Any] = {
            "capacity": {"storage": capacity},
            "accessModes": list(access_modes),
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": storage_class,
            "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
        }
        if claim:
            spec["claimRef"] = {"namespace": claim[0], "name": claim[1]}
        return self.request(
            "POST",
            "/api/v1/persistentvolumes",
            {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name}, "spec": spec},
        )

    def delete_namespace(self, name: str) -> None:
        """Starts deleting a namespace (the namespace controller removes its objects); does not wait."""
        with contextlib.suppress(ApiError):
            self.request("DELETE", f"/api/v1/namespaces/{name}")

    # -- identities: service-account tokens, as a pod's would be ------------------------------------------

    def service_account_token(self, namespace: str, account: str, *, seconds: int = 7200) -> str:
        """A bound token for an existing ServiceAccount (TokenRequest, as the kubelet asks for a pod)."""
        out = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds},
            },
        )
        return out["status"]["token"]

    def write_token_kubeconfig(self, path: str | Path, token: str, namespace: str) -> Path:
        """A kubeconfig that authenticates with `token`; its context's namespace is `namespace`."""
        ca = base64.b64encode((self.pki_dir / "ca.crt").read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "token",
            "clusters": [
                {"name": "r1-grpo-test", "cluster": {"server": self.server, "certificate-authority-data": ca}}
            ],
            "users": [{"name": "token", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "token",
                    "context": {"cluster": "r1-grpo-test", "user": "token", "namespace": namespace},
                }
            ],
        }
        path = Path(path)
        _write_if_changed(path, json.dumps(config, indent=2).encode())
        return path

    # -- the audit log ----------------------------------------------------------------------------------

    def audit_events(
        self,
        *,
        user: str | None = None,
        namespace: str | None = None,
        user_agent: str | None = None,
        stage: str | None = "ResponseComplete",
    ) -> list[dict]:
        """The audit log's events (service-account identities only, see AUDIT_POLICY), oldest first,
        filtered by user name, namespace, user-agent prefix and stage (None: also ResponseStarted, which a
        watch logs when it starts).

        A marker request is sent first and waited for, so every request answered before this call is in.
        """
        marker = f"audit-sync={secrets.token_hex(8)}"
        self._get_raw(f"{AUDIT_SYNC_PATH}?{marker}")
        deadline = time.monotonic() + 10
        while not self._read_audit_log(marker):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the audit log {self.audit_log_path} never showed marker {marker}")
            time.sleep(0.02)
        events = []
        for ev in self._audit:
            ref = ev.get("objectRef") or {}
            if (
                (stage is None or ev.get("stage") == stage)
                and (user is None or (ev.get("user") or {}).get("username") == user)
                and (namespace is None or ref.get("namespace") == namespace)
                and (user_agent is None or str(ev.get("userAgent", "")).startswith(user_agent))
            ):
                events.append(ev)
        return sorted(events, key=lambda e: (e["requestReceivedTimestamp"], e["stageTimestamp"]))

    def _read_audit_log(self, marker: str) -> bool:
        """Parses the lines added since the last call (complete lines only); True once `marker` was seen."""
        with self._audit_lock:
            if self.audit_log_path.exists():
                with open(self.audit_log_path, "rb") as f:
                    f.seek(self._audit_offset)
                    data = f.read()
                complete = data[: data.rfind(b"\n") + 1]
                self._audit_offset += len(complete)
                for line in complete.splitlines():
                    ev = json.loads(line)
                    uri = ev.get("requestURI", "")
                    if uri.startswith(AUDIT_SYNC_PATH):
                        self._audit_markers.add(uri.partition("?")[2])
                    else:
                        self._audit.append(ev)
            return marker in self._audit_markers

    # -- the kubelet's part, for fake nodes ---------------------------------------------------------------

    def finish_pod(self, namespace: str, name: str, exit_code: int, *, message: str = "") -> dict:
        """Ends a kwok pod as if its containers exited with `exit_code` (0: Succeeded, else Failed).

        kwok runs no containers, so the test plays the kubelet: the pod's status subresource gets terminal
        phase, conditions and terminated container states, as a kubelet would report them.
        """
        pod = self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        started = (
            next(
                (
                    ((cs.get("state") or {}).get("running") or {}).get("startedAt")
                    for cs in (pod.get("status") or {}).get("containerStatuses") or []
                ),
                None,
            )
            or now
        )
        reason = "Completed" if exit_code == 0 else "Error"
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": now}
        if message:
            terminated["message"] = message
        statuses = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "started": False,
                "state": {"terminated": terminated},
            }
            for c in pod["spec"]["containers"]
        ]
        conditions = [
            {
                "type": t,
                "status": v,
                "lastTransitionTime": now,
                **({"reason": "PodCompleted"} if v == "False" else {}),
            }
            for t, v in (
                ("PodScheduled", "True"),
                ("Initialized", "True"),
                ("Ready", "False"),
                ("ContainersReady", "False"),
            )
        ]
        patch = {
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": conditions,
                "containerStatuses": statuses,
            }
        }
        return self.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status", patch)

    def set_pod_log(self, namespace: str, name: str, text: str, *, container: str | None = None) -> None:
        """Gives a kwok pod's container the log `text` (what the kubelet serves for pods/log).

        The text is written as a CRI log file, which kwok reads with the kubelet's own log reader (so
        tailLines and limitBytes behave as on a node), and a kwok Logs object points the pod at it. Returns
        once the API serves the log's last line.
        """
        d = self.pod_log_dir / namespace
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{name}.{container or 'all'}.{secrets.token_hex(4)}.log"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
        lines = text.splitlines()
        path.write_text("".join(f"{stamp} stdout F {line}\n" for line in lines))
        body = {
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "Logs",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"logs": [{"containers": [container] if container else [], "logsFile": str(path)}]},
        }
        base = f"/apis/kwok.x-k8s.io/v1alpha1/namespaces/{namespace}/logs"
        try:
            self.request("POST", base, body)
        except ApiError as e:
            if e.status != 409:
                raise
            current = self.request("GET", f"{base}/{name}")
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            self.request("PUT", f"{base}/{name}", body)
        query = "tailLines=1" + (f"&container={container}" if container else "")
        want = lines[-1] if lines else ""

        def served() -> bool:
            try:
                return (
                    self._get_raw(f"/api/v1/namespaces/{namespace}/pods/{name}/log?{query}")
                    .decode()
                    .rstrip("\n")
                    == want
                )
            except urllib.error.HTTPError:
                return False

        self._wait(f"the log of pod {namespace}/{name}", served, 30)

    def wait_for(self, what: str, ready: Callable[[], Any], timeout: float = 60.0) -> None:
        """Polls ready() until truthy; fails early with the log tail if a component died."""
        self._wait(what, ready, timeout)


def _condition(obj: dict, type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True"
        for c in obj.get("status", {}).get("conditions") or []
    )


def _http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def _https_get_insecure(port: int, path: str) -> bytes:
    # The controller manager and scheduler serve with self-signed certs of their own.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx, timeout=5) as r:
        return r.read()


def _probe_pytorchjob() -> dict:
    pod = {"spec": {"containers": [{"name": "pytorch", "image": "busybox"}]}}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "webhook-probe"},
        "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": pod}}},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the binaries if needed and print the cache dir")
    up = sub.add_parser("up", help="start the control plane and keep it up until Ctrl-C")
    up.add_argument("--workdir", help="default: a new temporary directory")
    up.add_argument("--gpu-nodes", type=int, default=1, help="fake GPU nodes to create (default 1)")
    up.add_argument("--gpus", type=int, default=8, help="GPUs per fake node (default 8)")
    up.add_argument("--no-operator", action="store_true", help="skip the training operator")
    args = parser.parse_args(argv)

    if args.cmd == "build":
        print(ensure_binaries())
        return 0
    cp = ControlPlane(args.workdir, operator=not args.no_operator)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    start = time.monotonic()
    with cp:
        for i in range(args.gpu_nodes):
            cp.create_gpu_node(f"gpu-{i}", gpus=args.gpus)
        print(f"control plane up in {time.monotonic() - start:.1f} s; logs in {cp.log_dir}", file=sys.stderr)
        print(f"export KUBECONFIG={cp.kubeconfig_path}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
