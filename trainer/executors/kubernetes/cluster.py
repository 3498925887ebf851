"""Kubernetes client plumbing for the stage controller and `r1-grpo status`.

`Cluster` is the controller's only door to the API server: one method per (verb, resource) pair of the
controller's Role in docs/contract.md, nothing more, so the RBAC surface is visible in one place:

    kubeflow.org pytorchjobs or trainer.kubeflow.org trainjobs (`job_kind`, jobkinds.py): get, list,
        watch, create (dry runs are creates too)
    kueue.x-k8s.io workloads: list; localqueues: get (only when a stage job carries a Kueue queue label)
    "" configmaps: get, create, patch
    "" events: create, list
    "" pods: get, list; pods/log: get
    "" persistentvolumeclaims: get

Objects come back as plain dicts in API (camelCase) form, whether the typed CoreV1Api or the untyped
CustomObjectsApi produced them, so the controller handles one shape. `classify_api_error` reads the
`Status` body of a failed call, because a 403 has several causes that call for different reactions.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from trainer.executors.kubernetes.jobkinds import PYTORCHJOB, JobKind

KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"
JOBS = "<jobs>"  # _rule's stand-in for the plural of the Cluster's job kind
USER_AGENT = "r1-grpo-controller/1"
T = TypeVar("T")
IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): relist and watch again from the new version."""


def load_api_client(
    kubeconfig: str | None = None, context: str | None = None, user_agent: str = USER_AGENT
) -> client.ApiClient:
    """An ApiClient from an explicit kubeconfig, the in-cluster service account, or the default kubeconfig.

    Each call builds its own Configuration (never the process-global default), so tests can run several
    clients against different servers in one process.
    """
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    elif os.environ.get("KUBERNETES_SERVICE_HOST") and not context:
        config.load_incluster_config(client_configuration=cfg)
    else:
        config.load_kube_config(context=context, client_configuration=cfg)
    api = client.ApiClient(cfg)
    api.user_agent = user_agent
    return api


def default_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace a user means when they give none: the pod's own, else the kubeconfig context's."""
    if (
        not kubeconfig
        and os.environ.get("KUBERNETES_SERVICE_HOST")
        and os.path.exists(IN_CLUSTER_NAMESPACE_FILE)
    ):
        with open(IN_CLUSTER_NAMESPACE_FILE, encoding="utf-8") as f:
            return f.read().strip() or "default"
    try:
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except (config.ConfigException, OSError):
        return "default"
    if context:
        contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)
        active = next((c for c in contexts if c.get("name") == context), active)
    return ((active or {}).get("context") or {}).get("namespace") or "default"


def api_error_body(err: ApiException) -> dict:
    """The `Status` object of a failed call ({} when the body is not one)."""
    try:
        body = json.loads(err.body) if err.body else {}
    except (ValueError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}


def api_error_summary(err: ApiException) -> str:
    """`409 AlreadyExists: pytorchjobs.kubeflow.org "x" already exists` from an ApiException."""
    message = err.reason or ""
    body = api_error_body(err)
    if body.get("message"):
        message = f"{body.get('reason') or err.reason}: {body['message']}"
    return f"{err.status} {message}".strip()


# What a refused call (401/403) means; the apiserver gives them all reason Forbidden, so the message and
# the causes decide.
DENIED_RBAC = "rbac"  # authentication or authorization: the credentials or the Role are wrong
DENIED_QUOTA = "quota"  # a ResourceQuota is full (or not computed yet): capacity may come, wait
DENIED_TERMINATING = "terminating"  # the namespace is being deleted: nothing here will run again
DENIED_ADMISSION = "admission"  # an admission webhook or policy rejected the object: a configuration error


def classify_api_error(err: ApiException) -> str | None:
    """One of the DENIED_* kinds for a 401/403, else None.

    Messages, as kube-apiserver 1.36 and controller-runtime write them:
      RBAC:        `... is forbidden: User "system:serviceaccount:ns:sa" cannot create resource "pytorchjobs"
                   in API group "kubeflow.org" in the namespace "ns"`
      quota:       `... is forbidden: exceeded quota: q, requested: ..., used: ..., limited: ...` (or
                   `status unknown for quota: q` before the quota controller has counted)
      terminating: `... is forbidden: unable to create new content in namespace ns because it is being
                   terminated`, cause reason NamespaceTerminating
      admission:   `admission webhook "name" denied the request: ...` (controller-runtime's Denied is a
                   403), or `ValidatingAdmissionPolicy 'p' with binding 'b' denied request: ...`
    Any other 403 counts as RBAC: refusing to guess is safer than retrying forever.
    """
    if err.status == 401:
        return DENIED_RBAC
    if err.status != 403:
        return None
    body = api_error_body(err)
    message = str(body.get("message") or err.reason or "")
    causes = (body.get("details") or {}).get("causes") or []
    if any(c.get("reason") == "NamespaceTerminating" for c in causes if isinstance(c, dict)) or (
        "because it is being terminated" in message
    ):
        return DENIED_TERMINATING
    if "exceeded quota" in message or "status unknown for quota" in message:
        return DENIED_QUOTA
    if re.search(r'admission webhook "[^"]*" denied the request', message) or re.search(
        r"ValidatingAdmissionPolicy '[^']*' with binding '[^']*' denied request", message
    ):
        return DENIED_ADMISSION
    return DENIED_RBAC


def role_lacks_rule(err: ApiException) -> bool:
    """Whether the authorizer itself refused the call (`cannot <verb> resource "<resource>"`): the Role
    lacks a rule. Unlike classify_api_error, which counts any unexplained 403 as RBAC, this needs the
    authorizer's own words; it decides that a best-effort call (an event, a log read) must not fail
    quietly, or a Role missing that rule would go unnoticed."""
    if err.status != 403:
        return False
    message = str(api_error_body(err).get("message") or err.reason or "")
    return re.search(r'cannot [a-z]+ resource "[^"]+"', message) is not None


def decode_tail(data: bytes) -> str:
    """UTF-8 text of the end of a byte stream that may start inside a character."""
    start = 0
    while start < min(len(data), 3) and (data[start] & 0xC0) == 0x80:  # continuation bytes
        start += 1
    return codecs.decode(data[start:], "utf-8", errors="replace")


def _rule(verb: str, resource: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Marks a Cluster method with the Role rule it needs, and records that the server allowed it."""

    def wrap(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def call(self: Cluster, *args: Any, **kwargs: Any) -> T:
            out = method(self, *args, **kwargs)
            self.allowed.add((verb, self.job_kind.plural if resource == JOBS else resource))
            return out

        return call

    return wrap


def refused_rule(err: ApiException) -> tuple[str, str] | None:
    """(verb, resource) from the authorizer's `cannot <verb> resource "<resource>"`, else None."""
    message = str(api_error_body(err).get("message") or err.reason or "")
    found = re.search(r'cannot ([a-z]+) resource "([^"]+)"', message)
    return (found.group(1), found.group(2)) if found else None


@dataclass(frozen=True)
class JobList:
    items: list[dict]
    resource_version: str


class Cluster:
    """Namespaced API calls used by the controller; every method maps to exactly one Role rule."""

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        request_timeout: float = 30.0,
        job_kind: JobKind = PYTORCHJOB,
    ):
        self.api_client = api_client
        self.job_kind = job_kind  # the stages' job API; the controller sets it from the stages ConfigMap
        self.namespace = namespace
        self.request_timeout = request_timeout
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        # (verb, resource) pairs the API server has allowed this process: a later 401/403 for one of them
        # is the server's, not the Role's (an API server restarting answers 403 until its authorizer has
        # loaded the RBAC objects)
        self.allowed: set[tuple[str, str]] = set()

    def _plain(self, obj: Any) -> Any:
        # typed models -> the API's JSON shape (camelCase keys), the same shape custom objects come in
        return self.api_client.sanitize_for_serialization(obj)

    def _job_api(self) -> tuple[str, str, str, str]:
        k = self.job_kind
        return k.group, k.version, self.namespace, k.plural

    # -- pytorchjobs or trainjobs: get, list, watch, create
    @_rule("list", JOBS)
    def list_jobs(self, label_selector: str) -> JobList:
        out = self.custom.list_namespaced_custom_object(
            *self._job_api(),
            label_selector=label_selector,
            _request_timeout=self.request_timeout,
        )
        return JobList(
            items=list(out.get("items") or []),
            resource_version=str((out.get("metadata") or {}).get("resourceVersion") or ""),
        )

    @_rule("get", JOBS)
    def get_job(self, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(
                *self._job_api(),
                name,
                _request_timeout=self.request_timeout,
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    @_rule("create", JOBS)
    def create_job(self, body: dict, dry_run: bool = False) -> tuple[bool, dict | None]:
        """Create-if-absent: (True, created) or (False, existing) when the name is taken (409).

        Strict field validation: an unknown or duplicate field is a 400 naming it, where the default (Warn)
        would prune it and only send a warning header the client never shows. The existing object is read
        back so the caller can check it really is the job it meant to create. `dry_run`: the server runs
        decoding, schema validation and admission (webhooks, quota) but stores nothing; a 409 then only
        says that the name is taken, and (False, None) comes back without a read.
        """
        try:
            created = self.custom.create_namespaced_custom_object(
                *self._job_api(),
                body,
                field_validation="Strict",
                _request_timeout=self.request_timeout,
                **({"dry_run": "All"} if dry_run else {}),
            )
            return True, created
        except ApiException as err:
            if err.status != 409:
                raise
        if dry_run:
            return False, None
        return False, self.get_job(body["metadata"]["name"])

    def watch_jobs(self, label_selector: str, resource_version: str, timeout_seconds: int) -> Iterator[dict]:
        """Yield watch events (dicts with `type` and `object`) from `resource_version` on.

        Ends when the server closes the stream (after `timeout_seconds`); raises WatchExpired on 410 Gone.
        """
        w = watch.Watch()
        stream = w.stream(
            self.custom.list_namespaced_custom_object,
            *self._job_api(),
            label_selector=label_selector,
            resource_version=resource_version,
            timeout_seconds=max(1, int(timeout_seconds)),
            # a little longer than the server-side timeout, so a silent dead connection cannot hang us
            _request_timeout=timeout_seconds + 15,
        )
        try:
            for event in stream:
                self.allowed.add(("watch", self.job_kind.plural))
                yield {"type": event["type"], "object": event["raw_object"]}
            self.allowed.add(("watch", self.job_kind.plural))
        except ApiException as err:
            if err.status == 410:
                raise WatchExpired(api_error_summary(err)) from err
            raise
        finally:
            w.stop()
            stream.close()

    # -- kueue.x-k8s.io workloads: list; localqueues: get
    @_rule("list", "workloads")
    def list_workloads(self, label_selector: str) -> list[dict]:
        out = self.custom.list_namespaced_custom_object(
            KUEUE_GROUP,
            KUEUE_VERSION,
            self.namespace,
            "workloads",
            label_selector=label_selector,
            _request_timeout=self.request_timeout,
        )
        return list(out.get("items") or [])

    @_rule("get", "localqueues")
    def get_localqueue(self, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(
                KUEUE_GROUP,
                KUEUE_VERSION,
                self.namespace,
                "localqueues",
                name,
                _request_timeout=self.request_timeout,
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    # -- configmaps: get, create, patch
    @_rule("get", "configmaps")
    def get_configmap(self, name: str) -> dict | None:
        try:
            return self._plain(
                self.core.read_namespaced_config_map(
                    name, self.namespace, _request_timeout=self.request_timeout
                )
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    @_rule("create", "configmaps")
    def create_configmap(self, body: dict) -> dict | None:
        """Create; None when it already exists (409)."""
        try:
            return self._plain(
                self.core.create_namespaced_config_map(
                    self.namespace, body, _request_timeout=self.request_timeout
                )
            )
        except ApiException as err:
            if err.status == 409:
                return None
            raise

    @_rule("patch", "configmaps")
    def patch_configmap_data(self, name: str, data: dict[str, str]) -> dict:
        # a dict body goes out as a strategic merge patch; for `data` that equals a JSON merge patch
        return self._plain(
            self.core.patch_namespaced_config_map(
                name, self.namespace, {"data": data}, _request_timeout=self.request_timeout
            )
        )

    # -- events: create
    @_rule("create", "events")
    def create_event(
        self, involved: dict, event_type: str, reason: str, message: str, component: str, instance: str
    ) -> None:
        now = datetime.now(UTC)
        meta = involved["metadata"]
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                name=f"{meta['name']}.{uuid.uuid4().hex[:16]}", namespace=self.namespace
            ),
            involved_object=client.V1ObjectReference(
                api_version=involved.get("apiVersion", "v1"),
                kind=involved.get("kind", "ConfigMap"),
                name=meta["name"],
                namespace=self.namespace,
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            type=event_type,
            reason=reason,
            message=message[:1024],  # the API server caps event messages
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component=component),
            reporting_component=component,
            reporting_instance=instance,
        )
        self.core.create_namespaced_event(self.namespace, body, _request_timeout=self.request_timeout)

    @_rule("list", "events")
    def list_events(self, involved_uid: str) -> list[dict]:
        """Events about one object (by uid, so a same-named object of an earlier install does not count)."""
        out = self.core.list_namespaced_event(
            self.namespace,
            field_selector=f"involvedObject.uid={involved_uid}",
            _request_timeout=self.request_timeout,
        )
        return list(self._plain(out).get("items") or [])

    # -- pods: get, list; pods/log: get
    @_rule("list", "pods")
    def list_pods(self, label_selector: str) -> list[dict]:
        out = self.core.list_namespaced_pod(
            self.namespace, label_selector=label_selector, _request_timeout=self.request_timeout
        )
        return list(self._plain(out).get("items") or [])

    @_rule("get", "pods")
    def get_pod(self, name: str) -> dict | None:
        try:
            return self._plain(
                self.core.read_namespaced_pod(name, self.namespace, _request_timeout=self.request_timeout)
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    @_rule("get", "pods/log")
    def read_pod_log(self, name: str, container: str | None, tail_lines: int, max_bytes: int) -> str:
        """The END of the last `tail_lines` lines, at most `max_bytes` of it.

        No `limitBytes`: the kubelet applies it to the front of the selected tail (it stops writing after
        N bytes), so one long progress-bar line would push the traceback out. The response is streamed
        instead and only its last `max_bytes` are kept, so memory stays bounded however long the lines.
        """
        kwargs: dict[str, Any] = {
            "tail_lines": tail_lines,
            "_preload_content": False,
            "_request_timeout": self.request_timeout,
        }
        if container:
            kwargs["container"] = container
        response = self.core.read_namespaced_pod_log(name, self.namespace, **kwargs)
        kept = bytearray()
        try:
            for chunk in response.stream(64 * 1024):
                kept += chunk
                if len(kept) > 2 * max_bytes:
                    del kept[: len(kept) - max_bytes]
        finally:
            response.release_conn()
        return decode_tail(bytes(kept[-max_bytes:]))

    # -- persistentvolumeclaims: get
    @_rule("get", "persistentvolumeclaims")
    def get_pvc(self, name: str) -> dict | None:
        try:
            return self._plain(
                self.core.read_namespaced_persistent_volume_claim(
                    name, self.namespace, _request_timeout=self.request_timeout
                )
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
