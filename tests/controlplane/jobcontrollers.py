"""The job-API controllers on the test control plane: the JobSet controller, the Kubeflow Trainer v2
controller manager and Kueue, built by tests/controlplane-jobs/build.sh, run out of cluster like the training operator.

Each gets its CRDs and webhook configurations from its own module (that script copies them), with every
webhook's Service reference rewritten to a URL on 127.0.0.1 and a caBundle of one CA made per cache dir;
each serves TLS from its own certificate folder with that CA's certificate for 127.0.0.1, and its own
internal certificate management is off (it would want a Service and a Secret in its namespace). Kueue reads
a configuration file written here: which integrations it manages (`kueue_frameworks`), no leader election.

    ControlPlane(jobs=True, kueue_frameworks=("trainer.kubeflow.org/trainjob",))
"""

from __future__ import annotations

import base64
import fcntl
import json
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from tests.controlplane.cluster import ControlPlane

COMPONENTS = ("jobset-controller", "trainer-controller-manager", "kueue")
# What the webhooks of each component are registered under (kustomize adds these name prefixes upstream).
PREFIX = {"jobset-controller": "jobset-", "trainer-controller-manager": "trainer-", "kueue": "kueue-"}
WEBHOOK_MANIFESTS = {
    "jobset-controller": "jobset/webhook/manifests.yaml",
    "trainer-controller-manager": "trainer-v2/webhook/manifests.yaml",
    "kueue": "kueue/webhook/manifests.yaml",
}
CRD_FOLDERS = ("jobset/crd/bases", "trainer-v2/crds", "kueue/crd/bases")
# batch/job as in every Kueue install: its Job webhook (which the chart's controller Job passes) panics in
# Kueue v0.17 when the integration is off (a nil pointer in the no-op path).
DEFAULT_KUEUE_FRAMEWORKS = ("batch/job", "trainer.kubeflow.org/trainjob")
# Fixed by Kueue v0.17 (cmd/kueue/main.go): with its internal certificate management off it serves metrics
# with the certificate it finds here, and exits when there is none. Like the training operator's /tmp folder
# (cluster.py), one path per machine: every control plane writes the same test certificate there.
KUEUE_METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")


def _pki(jobs_dir: Path) -> Path:
    """One CA and one serving certificate for 127.0.0.1, shared by the three webhook servers."""
    from tests.controlplane.cluster import _make_ca, _make_cert

    d = jobs_dir / "webhook-pki"
    d.mkdir(exist_ok=True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / "tls.crt").exists():
            _make_ca(d, "ca", "r1-grpo-test-webhooks-ca")
            _make_cert(d, "tls.tmp", "ca", "/CN=127.0.0.1", san="IP:127.0.0.1,DNS:localhost")
            (d / "tls.tmp.key").rename(d / "tls.key")
            (d / "tls.tmp.crt").rename(d / "tls.crt")
    return d


def _webhook_configurations(manifest: Path, prefix: str, port: int, ca: bytes) -> list[dict]:
    out = []
    for doc in yaml.safe_load_all(manifest.read_text()):
        if not doc or doc.get("kind") not in (
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
        ):
            continue
        doc["metadata"] = {"name": prefix + doc["metadata"]["name"]}
        for hook in doc.get("webhooks") or []:
            path = (hook.get("clientConfig") or {}).get("service", {}).get("path", "/")
            hook["clientConfig"] = {
                "url": f"https://127.0.0.1:{port}{path}",
                "caBundle": base64.b64encode(ca).decode(),
            }
        out.append(doc)
    return out


def start_job_controllers(
    cp: ControlPlane, jobs_dir: Path, kueue_frameworks: tuple[str, ...], timeout: float
) -> None:
    """CRDs, webhooks and processes of the three; no Kueue at all when `kueue_frameworks` is empty."""
    from tests.controlplane.cluster import _http_get, free_port

    components = tuple(c for c in COMPONENTS if c != "kueue" or kueue_frameworks)
    crd_folders = tuple(f for f in CRD_FOLDERS if not f.startswith("kueue/") or kueue_frameworks)
    manifests = jobs_dir / "manifests"
    crd_names = []
    for folder in crd_folders:
        for path in sorted((manifests / folder).glob("*.yaml")):
            if path.name == "kustomization.yaml":
                continue
            crd = yaml.safe_load(path.read_text())
            cp.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
            crd_names.append(crd["metadata"]["name"])
    for name in crd_names:
        cp._wait(
            f"CRD {name}",
            lambda name=name: _established(
                cp.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            ),
            timeout,
        )
    pki = _pki(jobs_dir)
    ca = (pki / "ca.crt").read_bytes()
    ports = {c: (free_port(), free_port()) for c in components}  # webhook, health probe
    for component in components:
        cert_dir = cp.workdir / f"{component}-certs"
        cert_dir.mkdir(exist_ok=True)
        for n in ("tls.crt", "tls.key"):
            (cert_dir / n).write_bytes((pki / n).read_bytes())
        webhook_port, probe_port = ports[component]
        for config in _webhook_configurations(
            manifests / WEBHOOK_MANIFESTS[component], PREFIX[component], webhook_port, ca
        ):
            plural = (
                "mutatingwebhookconfigurations"
                if config["kind"].startswith("Mutating")
                else "validatingwebhookconfigurations"
            )
            cp.request("POST", f"/apis/admissionregistration.k8s.io/v1/{plural}", config)
        config_path = cp.workdir / f"{component}-config.yaml"
        config_path.write_text(
            json.dumps(_config(component, webhook_port, probe_port, cert_dir, kueue_frameworks))
        )
        # TMPDIR: controller-runtime's default certificate folder is $TMPDIR/k8s-webhook-server/serving-certs;
        # the Trainer has no setting for it, and the training operator uses the one under /tmp.
        tmp = cp.workdir / f"{component}-tmp"
        default_certs = tmp / "k8s-webhook-server" / "serving-certs"
        default_certs.mkdir(parents=True, exist_ok=True)
        for n in ("tls.crt", "tls.key"):
            (default_certs / n).write_bytes((pki / n).read_bytes())
        if component == "kueue":
            _install_kueue_metrics_cert(pki)
        args = [f"--config={config_path}"]
        if component == "jobset-controller":
            args += ["--metrics-bind-address=0", f"--health-probe-bind-address=127.0.0.1:{probe_port}"]
        cp._spawn(
            component,
            args,
            env={"KUBECONFIG": str(cp.kubeconfig_path), "TMPDIR": str(tmp), "POD_NAMESPACE": "kube-system"},
            bin_dir=jobs_dir / "bin",
        )
    for component in components:
        probe = ports[component][1]
        cp._wait(
            component, lambda probe=probe: _http_get(f"http://127.0.0.1:{probe}/readyz") == b"ok", timeout
        )


def _install_kueue_metrics_cert(pki: Path) -> None:
    from tests.controlplane.cluster import _write_if_changed

    try:
        KUEUE_METRICS_CERT_DIR.mkdir(parents=True, exist_ok=True)
        for n in ("tls.crt", "tls.key"):
            _write_if_changed(KUEUE_METRICS_CERT_DIR / n, (pki / n).read_bytes())
    except OSError as e:
        raise RuntimeError(
            f"Kueue v0.17 reads its metrics certificate only from {KUEUE_METRICS_CERT_DIR} when its internal "
            f"certificate management is off, and this user cannot write there ({e}); create the folder "
            f"writable for this user (or run the tests as root), or set R1_GRPO_SKIP_CLUSTER=1"
        ) from e


def _established(crd: dict) -> bool:
    return any(
        c.get("type") == "Established" and c.get("status") == "True"
        for c in (crd.get("status") or {}).get("conditions") or []
    )


def _config(
    component: str, webhook_port: int, probe_port: int, cert_dir: Path, frameworks: tuple[str, ...]
) -> dict:
    if component == "jobset-controller":
        return {
            "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
            "kind": "Configuration",
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{probe_port}"},
            "metrics": {"bindAddress": "0"},
        }
    if component == "trainer-controller-manager":
        return {
            "apiVersion": "config.trainer.kubeflow.org/v1alpha1",
            "kind": "Configuration",
            "leaderElection": {"leaderElect": False},
            "certManagement": {"enable": False},
            "webhook": {"port": webhook_port, "host": "127.0.0.1"},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{probe_port}"},
            "metrics": {"bindAddress": "0"},
        }
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kube-system",
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{probe_port}"},
        "metrics": {"bindAddress": "0"},
        "integrations": {"frameworks": list(frameworks)},
        # its extension API server (pending-workload listings) reads its certificate from /visibility only
        "featureGates": {"VisibilityOnDemand": False},
    }
