"""A small, threaded, in-memory Kubernetes API server for tests.

It speaks enough of the real API for the `kubernetes` Python client to talk to it over HTTP unchanged:

- namespaced resources under ``/api/v1/namespaces/{ns}/{resource}`` and
  ``/apis/{group}/{version}/namespaces/{ns}/{resource}``; objects stored per group/version/namespace/resource;
- list / get / create / update (PUT) / patch / delete, plus the ``status`` subresource (PUT/PATCH) and
  ``pods/{name}/log``;
- patch with ``application/merge-patch+json`` (RFC 7386) and, for built-in resources only (as the real server),
  ``application/strategic-merge-patch+json`` (maps merge like a merge patch, lists replace; patch directives are
  refused with 400 rather than half-implemented); a ``metadata.resourceVersion`` in an update or patch is an
  optimistic-concurrency precondition (409 Conflict on mismatch);
- watch streams (``?watch=true``): chunked JSON-lines events, history replay from ``resourceVersion``,
  ``timeoutSeconds``, and an ``ERROR`` event with a 410 ``Status`` when the requested version has been compacted
  away or when a test breaks the open watches;
- label selectors (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``) and ``metadata.name`` /
  ``metadata.namespace`` field selectors;
- errors as ``Status`` objects with the real codes and reasons (400, 404, 405, 409, 410, 415).

Every request is recorded (HTTP method, path, RBAC verb, resource, user agent, response code) so tests can assert
on exactly what a client did. Tests play the other actors (the training operator, an admin) through the Python
API (``create`` / ``update`` / ``delete`` / ``set_pod_log`` / ``compact`` / ``break_watches``), which produces the
same watch events as HTTP writes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# Kinds of the resources this project touches; other resources work too, their kind is taken from the body.
KINDS: dict[tuple[str, str], str] = {
    ("", "configmaps"): "ConfigMap",
    ("", "pods"): "Pod",
    ("", "events"): "Event",
    ("", "persistentvolumeclaims"): "PersistentVolumeClaim",
    ("", "secrets"): "Secret",
    ("", "services"): "Service",
    ("kubeflow.org", "pytorchjobs"): "PyTorchJob",
}

MAX_WATCH_SECONDS = 600


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    verb: str  # the RBAC verb: get, list, watch, create, update, patch, delete, deletecollection
    group: str
    version: str
    namespace: str
    resource: str  # plural, with "/subresource" for subresources (RBAC style: "pods/log")
    name: str | None  # from the path, or for a create from the body (as in the audit log's objectRef)
    user_agent: str
    content_type: str | None
    code: int = 0


@dataclass
class _Event:
    rv: int
    type: str
    group: str
    version: str
    namespace: str
    resource: str
    obj: dict


class ApiError(Exception):
    """Raised inside the server to answer with a Status object."""

    REASONS = {
        400: "BadRequest",
        403: "Forbidden",
        404: "NotFound",
        405: "MethodNotAllowed",
        409: "AlreadyExists",
        410: "Expired",
        415: "UnsupportedMediaType",
        422: "Invalid",
        429: "TooManyRequests",
        500: "InternalError",
        503: "ServiceUnavailable",
    }

    def __init__(self, code: int, message: str, reason: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or self.REASONS.get(code, "InternalError")
        self.details = details or {}

    def status(self) -> dict:
        return status_object(self.code, self.reason, self.message, self.details)


def status_object(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success" if code < 400 else "Failure",
        "message": message,
        "reason": reason,
        "details": details or {},
        "code": code,
    }


# ---------------------------------------------------------------------------------------------- selectors


_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(selector: str) -> list[str]:
    """Split on commas that are not inside a set's parentheses."""
    parts, depth, cur = [], 0, []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(selector: str | None) -> Callable[[dict], bool]:
    """Compile a label selector string into a predicate over a label map (400 on syntax errors)."""
    if not selector:
        return lambda labels: True
    preds: list[Callable[[dict], bool]] = []
    for term in _split_selector(selector):
        m = _SET_RE.match(term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                preds.append(lambda lb, k=key, vs=values: lb.get(k) in vs)
            else:
                preds.append(lambda lb, k=key, vs=values: lb.get(k) not in vs)
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            preds.append(lambda lb, k=key, v=value: lb.get(k) != v)
        elif "==" in term or "=" in term:
            key, value = (s.strip() for s in re.split(r"==?", term, maxsplit=1))
            if not key:
                raise ApiError(400, f"unable to parse requirement {term!r} in label selector {selector!r}")
            preds.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif term.startswith("!"):
            preds.append(lambda lb, k=term[1:].strip(): k not in lb)
        elif re.fullmatch(r"[A-Za-z0-9_./-]+", term):
            preds.append(lambda lb, k=term: k in lb)
        else:
            raise ApiError(400, f"unable to parse requirement {term!r} in label selector {selector!r}")
    return lambda labels: all(p(labels) for p in preds)


def parse_field_selector(selector: str | None) -> Callable[[dict], bool]:
    if not selector:
        return lambda obj: True
    preds: list[Callable[[dict], bool]] = []
    for term in _split_selector(selector):
        negate = "!=" in term
        key, value = (s.strip() for s in re.split(r"!=|==?", term, maxsplit=1))
        if key not in ("metadata.name", "metadata.namespace", "involvedObject.uid", "involvedObject.name"):
            raise ApiError(400, f'field label not supported: "{key}"')
        top, attr = key.split(".", 1)
        preds.append(lambda o, t=top, a=attr, v=value, n=negate: (str(o.get(t, {}).get(a)) == v) != n)
    return lambda obj: all(p(obj) for p in preds)


# ---------------------------------------------------------------------------------------------- patches


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _reject_directives(patch: object, where: str = "") -> None:
    if isinstance(patch, dict):
        for key, value in patch.items():
            if key.startswith("$"):
                raise ApiError(
                    400,
                    f"strategic merge patch directive {key!r} at {where or '/'} is not supported "
                    "by the fake API server",
                )
            _reject_directives(value, f"{where}/{key}")
    elif isinstance(patch, list):
        for i, item in enumerate(patch):
            _reject_directives(item, f"{where}/{i}")


# ---------------------------------------------------------------------------------------------- the server


class FakeApiServer:
    """In-memory API server; use as a context manager or call start()/stop()."""

    def __init__(self, history_limit: int = 10_000):
        self._lock = threading.Condition()
        self._objects: dict[tuple[str, str, str, str], dict[str, dict]] = {}
        self._rv = 100  # resourceVersions are opaque strings to clients; ours are increasing integers
        self._history: list[_Event] = []
        self._history_limit = history_limit
        self._oldest_rv = self._rv  # a watch from before this version gets 410 Gone
        self._break_generation = 0
        self._closing = False
        self._open_watches = 0
        self._logs: dict[tuple[str, str], str] = {}
        self._hooks: list[Callable[[RecordedRequest], None]] = []
        self._failures: list[list] = []
        self.requests: list[RecordedRequest] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> FakeApiServer:
        server = self

        class Handler(_Handler):
            api = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self, namespace: str = "default") -> dict:
        """A kubeconfig document pointing at this server (no auth)."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
            ],
            "current-context": "fake",
        }

    # -- test-side API (the other actors); these produce watch events but are not recorded as requests
    def fail_next(
        self, verb: str, resource: str, code: int, count: int = 1, after_applying: bool = False
    ) -> None:
        """Answer the next `count` requests with this RBAC verb on this resource with an error Status.

        With `after_applying`, the request takes effect first and only its response is an error: a write whose
        answer got lost (a timeout or a 5xx from a proxy after etcd committed it)."""
        with self._lock:
            self._failures.append([verb, resource, code, count, after_applying])

    def add_hook(self, hook: Callable[[RecordedRequest], None]) -> None:
        """Call `hook(request)` before each HTTP request is handled (code is 0 at that point)."""
        self._hooks.append(hook)

    def create(self, resource: str, obj: dict, namespace: str, group: str = "", version: str = "v1") -> dict:
        with self._lock:
            return copy.deepcopy(self._create(group, version, namespace, resource, obj))

    def get(
        self, resource: str, name: str, namespace: str, group: str = "", version: str = "v1"
    ) -> dict | None:
        with self._lock:
            obj = self._objects.get((group, version, namespace, resource), {}).get(name)
            return copy.deepcopy(obj)

    def list(self, resource: str, namespace: str, group: str = "", version: str = "v1") -> list[dict]:
        with self._lock:
            bucket = self._objects.get((group, version, namespace, resource), {})
            return [copy.deepcopy(o) for _, o in sorted(bucket.items())]

    def update(
        self,
        resource: str,
        name: str,
        namespace: str,
        mutate: Callable[[dict], None],
        group: str = "",
        version: str = "v1",
    ) -> dict:
        """Apply `mutate` to a copy of the stored object and store it as a new version (MODIFIED event)."""
        with self._lock:
            current = self._objects.get((group, version, namespace, resource), {}).get(name)
            if current is None:
                raise KeyError(f"{resource} {namespace}/{name} does not exist")
            new = copy.deepcopy(current)
            mutate(new)
            return copy.deepcopy(self._store(group, version, namespace, resource, new, "MODIFIED"))

    def delete(self, resource: str, name: str, namespace: str, group: str = "", version: str = "v1") -> None:
        with self._lock:
            self._delete(group, version, namespace, resource, name)

    def set_pod_log(self, namespace: str, pod: str, text: str) -> None:
        with self._lock:
            self._logs[(namespace, pod)] = text

    def resource_version(self) -> int:
        """The newest resourceVersion handed out so far."""
        with self._lock:
            return self._rv

    def compact(self) -> None:
        """Forget all watch history: a watch from any version seen so far now gets 410 Gone."""
        with self._lock:
            self._rv += 1
            self._history.clear()
            self._oldest_rv = self._rv

    def break_watches(self) -> None:
        """End every open watch with an ERROR event carrying a 410 Status (as after an etcd compaction)."""
        with self._lock:
            self._break_generation += 1
            self._lock.notify_all()

    def open_watches(self) -> int:
        with self._lock:
            return self._open_watches

    # -- request log queries
    def recorded(self, user_agent_prefix: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            reqs = list(self.requests)
        if user_agent_prefix is None:
            return reqs
        return [r for r in reqs if r.user_agent.startswith(user_agent_prefix)]

    def verbs_used(self, user_agent_prefix: str | None = None) -> set[tuple[str, str, str]]:
        """{(api group, resource, verb)} over the recorded requests (optionally of one client)."""
        return {(r.group, r.resource, r.verb) for r in self.recorded(user_agent_prefix)}

    # -- internals (callers hold self._lock)
    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _store(self, group: str, version: str, namespace: str, resource: str, obj: dict, etype: str) -> dict:
        rv = self._next_rv()
        obj.setdefault("metadata", {})["resourceVersion"] = str(rv)
        self._objects.setdefault((group, version, namespace, resource), {})[obj["metadata"]["name"]] = obj
        self._record_event(_Event(rv, etype, group, version, namespace, resource, copy.deepcopy(obj)))
        return obj

    def _record_event(self, event: _Event) -> None:
        self._history.append(event)
        if len(self._history) > self._history_limit:
            dropped = self._history.pop(0)
            self._oldest_rv = dropped.rv
        self._lock.notify_all()

    def _create(self, group: str, version: str, namespace: str, resource: str, body: dict) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if meta.get("namespace") not in (None, namespace):
            raise ApiError(
                400,
                f"the namespace of the provided object ({meta['namespace']}) does not match the "
                f"namespace sent on the request ({namespace})",
            )
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            else:
                raise ApiError(422, f"{resource} must have metadata.name or metadata.generateName", "Invalid")
        name = meta["name"]
        bucket = self._objects.setdefault((group, version, namespace, resource), {})
        if name in bucket:
            qualified = f"{resource}.{group}" if group else resource
            raise ApiError(
                409,
                f'{qualified} "{name}" already exists',
                "AlreadyExists",
                {"name": name, "group": group, "kind": resource},
            )
        kind = KINDS.get((group, resource)) or obj.get("kind")
        if kind:
            obj["kind"] = kind
        obj["apiVersion"] = f"{group}/{version}" if group else version
        meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = meta.get("creationTimestamp") or now_rfc3339()
        meta["generation"] = 1
        meta.pop("resourceVersion", None)
        return self._store(group, version, namespace, resource, obj, "ADDED")

    def _existing(self, group: str, version: str, namespace: str, resource: str, name: str) -> dict:
        obj = self._objects.get((group, version, namespace, resource), {}).get(name)
        if obj is None:
            qualified = f"{resource}.{group}" if group else resource
            raise ApiError(
                404,
                f'{qualified} "{name}" not found',
                "NotFound",
                {"name": name, "group": group, "kind": resource},
            )
        return obj

    def _check_precondition(self, current: dict, body: dict) -> None:
        wanted = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            name = current["metadata"]["name"]
            raise ApiError(
                409,
                f'Operation cannot be fulfilled on "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                "Conflict",
            )

    def _replace(
        self,
        group: str,
        version: str,
        namespace: str,
        resource: str,
        name: str,
        body: dict,
        subresource: str | None,
    ) -> dict:
        current = self._existing(group, version, namespace, resource, name)
        self._check_precondition(current, body)
        if subresource == "status":
            new = copy.deepcopy(current)
            new["status"] = copy.deepcopy(body.get("status"))
        else:
            if (body.get("metadata") or {}).get("name") not in (None, name):
                raise ApiError(400, "the name of the object does not match the name on the URL")
            new = copy.deepcopy(body)
            new.setdefault("metadata", {})
            for key in ("uid", "creationTimestamp", "namespace", "name"):
                new["metadata"][key] = current["metadata"][key]
            new["kind"], new["apiVersion"] = current.get("kind"), current.get("apiVersion")
            if "status" in current:
                new["status"] = current["status"]  # the main resource does not write status
        return self._store(group, version, namespace, resource, new, "MODIFIED")

    def _patch(
        self,
        group: str,
        version: str,
        namespace: str,
        resource: str,
        name: str,
        body: object,
        content_type: str,
        subresource: str | None,
    ) -> dict:
        current = self._existing(group, version, namespace, resource, name)
        if content_type == "application/merge-patch+json":
            pass
        elif content_type == "application/strategic-merge-patch+json":
            if group:
                raise ApiError(
                    415,
                    f"the body of the request was in an unknown format - accepted media types "
                    f"include: application/json-patch+json, application/merge-patch+json, "
                    f"application/apply-patch+yaml (strategic merge patch is not supported "
                    f"for custom resource {resource}.{group})",
                )
            _reject_directives(body)
        else:
            raise ApiError(415, f"the fake API server does not implement patch type {content_type!r}")
        if not isinstance(body, dict):
            raise ApiError(400, "a merge patch must be a JSON object")
        self._check_precondition(current, body)
        if subresource == "status":
            body = {"status": body.get("status")}
        elif "status" in body and subresource is None and group:
            body = {k: v for k, v in body.items() if k != "status"}  # CRs with a status subresource ignore it
        new = merge_patch(current, body)
        for key in ("uid", "creationTimestamp", "namespace", "name"):
            new["metadata"][key] = current["metadata"][key]
        return self._store(group, version, namespace, resource, new, "MODIFIED")

    def _delete(self, group: str, version: str, namespace: str, resource: str, name: str) -> dict:
        obj = self._existing(group, version, namespace, resource, name)
        del self._objects[(group, version, namespace, resource)][name]
        rv = self._next_rv()
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(rv)
        self._record_event(_Event(rv, "DELETED", group, version, namespace, resource, gone))
        if resource == "pods":
            self._logs.pop((namespace, name), None)
        if resource == "pytorchjobs":  # the garbage collector removes the job's pods (at once, here)
            pods = self._objects.get(("", "v1", namespace, "pods"), {})
            for pod in [n for n, p in pods.items() if p["metadata"]["labels"].get(JOB_NAME_LABEL) == name]:
                self._delete("", "v1", namespace, "pods", pod)
        return gone

    def _list(
        self, group: str, version: str, namespace: str, resource: str, match: Callable[[dict], bool]
    ) -> dict:
        bucket = self._objects.get((group, version, namespace, resource), {})
        kind = KINDS.get((group, resource))
        if kind is None:
            kind = next((o.get("kind") for o in bucket.values() if o.get("kind")), resource.capitalize())
        return {
            "kind": f"{kind}List",
            "apiVersion": f"{group}/{version}" if group else version,
            "metadata": {"resourceVersion": str(self._rv)},
            "items": [copy.deepcopy(o) for _, o in sorted(bucket.items()) if match(o)],
        }


def _matcher(query: dict[str, str]) -> Callable[[dict], bool]:
    labels = parse_label_selector(query.get("labelSelector"))
    fields = parse_field_selector(query.get("fieldSelector"))
    return lambda obj: labels((obj.get("metadata") or {}).get("labels") or {}) and fields(obj)


# what Go's strconv.ParseBool accepts as true (the Python client sends "True")
_GO_TRUE = ("1", "t", "T", "true", "TRUE", "True")

_PATH_RE = re.compile(
    r"^/(?:api/(?P<core_version>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"/namespaces/(?P<namespace>[^/]+)/(?P<resource>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?/?$"
)


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked encoding for watches

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes; without this, Nagle + delayed ACK add ~40 ms a request
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt: str, *args: object) -> None:  # keep test output quiet
        pass

    # one entry point for all methods
    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _read_body(self) -> object:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None

    def _handle(self, method: str) -> None:
        api = self.api
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        body: object = None
        try:
            body = self._read_body()  # always drain the body so the connection stays usable
        except ApiError as err:
            body = err
        m = _PATH_RE.match(split.path)
        if m is None:
            rec = RecordedRequest(
                method,
                split.path,
                query,
                method.lower(),
                "",
                "",
                "",
                "",
                None,
                self.headers.get("User-Agent", ""),
                self.headers.get("Content-Type"),
            )
            self._record(rec, 404)
            self._send_json(
                404,
                status_object(
                    404,
                    "NotFound",
                    f"the server could not find the requested resource ({method} {split.path})",
                ),
            )
            return
        group = m.group("group") or ""
        version = m.group("version") or m.group("core_version")
        namespace, resource, name, sub = (
            m.group("namespace"),
            m.group("resource"),
            m.group("name"),
            m.group("sub"),
        )
        is_watch = query.get("watch") in _GO_TRUE
        verb = {
            "GET": "watch" if is_watch else ("get" if name else "list"),
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection",
        }[method]
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip() or None
        object_name = name
        if method == "POST" and isinstance(body, dict):
            object_name = (body.get("metadata") or {}).get("name")
        rec = RecordedRequest(
            method,
            split.path,
            query,
            verb,
            group,
            version,
            namespace,
            f"{resource}/{sub}" if sub else resource,
            object_name,
            self.headers.get("User-Agent", ""),
            content_type,
        )
        for hook in list(api._hooks):
            hook(rec)
        # injected failures hit real requests only, not the controller's start-up dry runs
        injected = None if query.get("dryRun") == "All" else self._injected_failure(verb, rec.resource)
        try:
            if injected is not None and not injected[1]:
                raise ApiError(injected[0], "injected failure")
            if isinstance(body, ApiError):
                raise body
            if is_watch and method == "GET" and not name:
                self._record(rec, 200)
                self._watch(group, version, namespace, resource, query)
                return
            code, payload = self._dispatch(
                method, group, version, namespace, resource, name, sub, query, body, content_type
            )
            if injected is not None:
                raise ApiError(injected[0], "injected failure after the request took effect")
        except ApiError as err:
            self._record(rec, err.code)
            self._send_json(err.code, err.status())
            return
        self._record(rec, code)
        if isinstance(payload, str):
            self._send(code, payload.encode(), "text/plain")
        else:
            self._send_json(code, payload)

    def _injected_failure(self, verb: str, resource: str) -> tuple[int, bool] | None:
        api = self.api
        with api._lock:
            for failure in api._failures:
                if failure[0] == verb and failure[1] == resource and failure[3] > 0:
                    failure[3] -= 1
                    return failure[2], failure[4]
        return None

    def _dispatch(
        self,
        method: str,
        group: str,
        version: str,
        namespace: str,
        resource: str,
        name: str | None,
        sub: str | None,
        query: dict[str, str],
        body: object,
        content_type: str | None,
    ) -> tuple[int, object]:
        api = self.api
        with api._lock:
            if sub not in (None, "status", "log") or (
                sub == "log" and (resource != "pods" or method != "GET")
            ):
                raise ApiError(404, f"the server could not find the requested resource ({resource}/{sub})")
            if method == "GET" and name is None:
                return 200, api._list(group, version, namespace, resource, _matcher(query))
            if method == "GET" and sub == "log":
                return 200, self._pod_log(namespace, name, query)
            if method == "GET":
                return 200, copy.deepcopy(api._existing(group, version, namespace, resource, name))
            if method == "POST" and name is None and query.get("dryRun") == "All":
                # the real server runs the whole create path but stores nothing (409 for a taken name)
                existing = api._objects.get((group, version, namespace, resource), {})
                if isinstance(body, dict) and (body.get("metadata") or {}).get("name") in existing:
                    raise ApiError(
                        409, f'{resource} "{body["metadata"]["name"]}" already exists', "AlreadyExists"
                    )
                return 201, copy.deepcopy(body)
            if method == "POST" and name is None:
                return 201, copy.deepcopy(api._create(group, version, namespace, resource, body))
            if method == "PUT" and name is not None:
                if not isinstance(body, dict):
                    raise ApiError(400, "the request body must be a JSON object")
                return 200, copy.deepcopy(api._replace(group, version, namespace, resource, name, body, sub))
            if method == "PATCH" and name is not None:
                return 200, copy.deepcopy(
                    api._patch(group, version, namespace, resource, name, body, content_type or "", sub)
                )
            if method == "DELETE" and name is not None and sub is None:
                gone = api._delete(group, version, namespace, resource, name)
                return 200, gone
        raise ApiError(405, f"{method} is not supported on this path", "MethodNotAllowed")

    def _pod_log(self, namespace: str, name: str, query: dict[str, str]) -> str:
        api = self.api
        pod = api._existing("", "v1", namespace, "pods", name)
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        container = query.get("container")
        if container and container not in containers:
            raise ApiError(400, f"container {container} is not valid for pod {name}")
        if not container and len(containers) > 1:
            raise ApiError(
                400, f"a container name must be specified for pod {name}, choose one of: {containers}"
            )
        text = api._logs.get((namespace, name), "")
        tail = query.get("tailLines")
        if tail:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail) :]) if int(tail) > 0 else ""
        return text

    # -- watch
    def _watch(self, group: str, version: str, namespace: str, resource: str, query: dict[str, str]) -> None:
        api = self.api
        match = _matcher(query)
        timeout = min(float(query.get("timeoutSeconds") or MAX_WATCH_SECONDS), MAX_WATCH_SECONDS)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + timeout
        rv_param = query.get("resourceVersion") or ""

        def relevant(ev: _Event) -> bool:
            return (ev.group, ev.version, ev.namespace, ev.resource) == (
                group,
                version,
                namespace,
                resource,
            ) and match(ev.obj)

        with api._lock:
            api._open_watches += 1
            generation = api._break_generation
            pending: list[dict] = []
            if rv_param in ("", "0"):
                # no version: synthetic ADDED events for the current state, then changes from now on
                for _, obj in sorted(api._objects.get((group, version, namespace, resource), {}).items()):
                    if match(obj):
                        pending.append({"type": "ADDED", "object": copy.deepcopy(obj)})
                since = api._rv
            else:
                try:
                    since = int(rv_param)
                except ValueError:
                    since = -1
                if since < api._oldest_rv:
                    pending.append(self._gone_event(rv_param))
                    since = None  # stream ends after the error
            if since is not None:
                pending.extend(
                    {"type": e.type, "object": copy.deepcopy(e.obj)}
                    for e in api._history
                    if e.rv > since and relevant(e)
                )
                if api._history:
                    since = max(since, api._history[-1].rv)
        try:
            if not self._write_events(pending) or since is None or pending and pending[-1]["type"] == "ERROR":
                return
            while True:
                with api._lock:
                    while True:
                        if api._closing:
                            return
                        if api._break_generation != generation:
                            events = [self._gone_event(str(since))]
                            break
                        fresh = [e for e in api._history if e.rv > since]
                        if fresh:
                            since = fresh[-1].rv
                            events = [
                                {"type": e.type, "object": copy.deepcopy(e.obj)} for e in fresh if relevant(e)
                            ]
                            if events:
                                break
                            continue
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            events = None
                            break
                        api._lock.wait(timeout=remaining)
                if events is None:
                    return
                if not self._write_events(events) or events[-1]["type"] == "ERROR":
                    return
        finally:
            with api._lock:
                api._open_watches -= 1
            try:
                self.wfile.write(b"0\r\n\r\n")  # a complete chunked body: the connection stays reusable
                self.wfile.flush()
            except OSError:
                self.close_connection = True

    @staticmethod
    def _gone_event(rv: str) -> dict:
        return {"type": "ERROR", "object": status_object(410, "Expired", f"too old resource version: {rv}")}

    def _write_events(self, events: Iterable[dict]) -> bool:
        try:
            for ev in events:
                data = (json.dumps(ev) + "\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            return True
        except OSError:  # client went away
            return False

    # -- plain responses
    def _record(self, rec: RecordedRequest, code: int) -> None:
        with self.api._lock:
            self.api.requests.append(_with_code(rec, code))

    def _send_json(self, code: int, payload: object) -> None:
        self._send(code, json.dumps(payload).encode(), "application/json")

    def _send(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _with_code(rec: RecordedRequest, code: int) -> RecordedRequest:
    return RecordedRequest(**{**rec.__dict__, "code": code})


# ================================================================================================ test actors
#
# The other half of a fake cluster: a stages ConfigMap as the chart renders it (docs/contract.md) and a
# stand-in for the Kubeflow training operator plus the trainer it would run. The operator reacts to
# PyTorchJobs appearing in the server (ADDED), creates their master pod, moves the job through its
# conditions and writes real stage outputs (checkpoint folders, weights, `r1_stage.json` via
# trainer.contract.output.write_manifest) into a temporary folder that plays the checkpoint volume.

TRAINING_STAGES = ("sft", "grpo")
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
PYTORCHJOBS = ("kubeflow.org", "v1", "pytorchjobs")


def stage_job(release: str, stage: str, output_dir: str, model_from: str, mount: str, claim: str) -> dict:
    labels = {
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/name": "r1-grpo",
        "r1-grpo.io/stage": stage,
        "r1-grpo.io/attempt": "1",
    }
    module = {"sft": "trainer.sft", "grpo": "trainer.grpo", "eval": "trainer.evaluate"}[stage]
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": f"{release}-{stage}-1", "labels": dict(labels)},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 0},
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "restartPolicy": "Never",
                    "template": {
                        "metadata": {"labels": dict(labels)},
                        "spec": {
                            "containers": [
                                {
                                    "name": "pytorch",
                                    "image": "r1-grpo:test",
                                    "command": ["torchrun"],
                                    "args": [
                                        "--nproc_per_node",
                                        "1",
                                        "-m",
                                        module,
                                        "--dataset_name",
                                        "builtin:arith",
                                        "--model_name_or_path",
                                        model_from,
                                        "--output_dir",
                                        output_dir,
                                    ],
                                    "volumeMounts": [{"name": "checkpoints", "mountPath": mount}],
                                }
                            ],
                            "volumes": [
                                {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}}
                            ],
                        },
                    },
                }
            },
        },
    }


def stages_configmap(
    release: str,
    stages: Iterable[str] = ("sft", "grpo", "eval"),
    mount: str = "/checkpoints",
    base_model: str = "builtin:tiny",
) -> dict:
    """ConfigMap `<release>-stages` in the contract's format."""
    import yaml

    claim = f"{release}-checkpoints"
    entries, data, previous_training = [], {}, None
    for stage in stages:
        output_dir = f"{mount}/{release}/{stage}"
        model_from = previous_training or base_model
        entries.append(
            {"name": stage, "outputDir": output_dir, "modelFrom": model_from, "job": f"{stage}.yaml"}
        )
        data[f"{stage}.yaml"] = yaml.safe_dump(
            stage_job(release, stage, output_dir, model_from, mount, claim)
        )
        if stage in TRAINING_STAGES:
            previous_training = output_dir
    data["pipeline.yaml"] = yaml.safe_dump({"release": release, "mountPath": mount, "stages": entries})
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{release}-stages", "labels": {"app.kubernetes.io/instance": release}},
        "data": data,
    }


def _flag(container: dict, name: str) -> str | None:
    argv = list(container.get("command") or []) + list(container.get("args") or [])
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


class FakeTrainingOperator:
    """Plays the training operator and the trainer for every PyTorchJob in one namespace.

    `scripts[(stage, attempt)]` picks what a job does: "succeed" (default), "fail", "corrupt" (Succeeded, but a
    weight file changes after the manifest), "no-manifest" (Succeeded without `r1_stage.json`), "pending" (its
    pod never schedules), "hang" (stays Running). `gates[(stage, attempt)]` (a threading.Event) holds a job in
    Running after its checkpoints until set. Jobs are tracked by uid, so a job deleted and recreated under the
    same name runs again.
    """

    def __init__(
        self,
        server: FakeApiServer,
        namespace: str,
        volume: str,
        mount: str = "/checkpoints",
        scripts: dict[tuple[str, int], str] | None = None,
        checkpoints_per_attempt: int = 4,
        step_delay: float = 0.002,
        weight_bytes: int = 1024,
    ):
        self.server = server
        self.namespace = namespace
        self.volume = volume
        self.mount = mount
        self.scripts = dict(scripts or {})
        self.gates: dict[tuple[str, int], threading.Event] = {}
        self.checkpoints_per_attempt = checkpoints_per_attempt
        self.step_delay = step_delay
        self.weight_bytes = weight_bytes  # size of a training stage's final model.safetensors
        self.succeeded_at: dict[str, float] = {}  # job name -> time.monotonic() when Succeeded was set
        self.errors: list[BaseException] = []
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._loop, name="fake-operator", daemon=True)

    def start(self) -> FakeTrainingOperator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for gate in self.gates.values():
            gate.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)

    def local(self, job_path: str) -> str:
        import os

        rel = os.path.relpath(job_path, self.mount)
        return os.path.join(self.volume, rel)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for job in self.server.list("pytorchjobs", self.namespace, *PYTORCHJOBS[:2]):
                uid = job["metadata"]["uid"]
                if uid not in self._seen:
                    self._seen.add(uid)
                    t = threading.Thread(target=self._run_job, args=(job,), daemon=True)
                    self._threads.append(t)
                    t.start()
            self._stop.wait(0.002)

    # -- one job
    def _set(self, name: str, uid: str, mutate: Callable[[dict], None]) -> None:
        def guarded(obj: dict) -> None:
            if obj["metadata"]["uid"] != uid:
                raise _JobGone()
            mutate(obj)

        try:
            self.server.update("pytorchjobs", name, self.namespace, guarded, *PYTORCHJOBS[:2])
        except KeyError:
            raise _JobGone() from None

    def _condition(self, name: str, uid: str, ctype: str, message: str = "", reason: str = "") -> None:
        def mutate(obj: dict) -> None:
            status = obj.setdefault("status", {})
            conds = status.setdefault("conditions", [])
            if ctype in ("Succeeded", "Failed", "Restarting"):
                for c in conds:
                    if c["type"] == "Running":
                        c["status"] = "False"
            conds[:] = [c for c in conds if c["type"] != ctype]
            conds.append(
                {
                    "type": ctype,
                    "status": "True",
                    "reason": reason or f"PyTorchJob{ctype}",
                    "message": message or f"PyTorchJob {name} is {ctype.lower()}.",
                    "lastTransitionTime": now_rfc3339(),
                    "lastUpdateTime": now_rfc3339(),
                }
            )
            if ctype == "Running":
                status.setdefault("startTime", now_rfc3339())
            if ctype in ("Succeeded", "Failed"):
                status["completionTime"] = now_rfc3339()

        self._set(name, uid, mutate)

    def _alive(self, name: str, uid: str) -> None:
        """A deleted job's pods are killed: its script stops at the next step."""
        current = self.server.get("pytorchjobs", name, self.namespace, *PYTORCHJOBS[:2])
        if current is None or current["metadata"]["uid"] != uid:
            raise _JobGone()

    def _pod_phase(self, pod: str, phase: str) -> None:
        # KeyError: the job (and with it the pod) was deleted meanwhile
        with contextlib.suppress(KeyError):
            self.server.update("pods", pod, self.namespace, lambda p: p["status"].update(phase=phase))

    def _pod(self, job: dict, phase: str) -> str:
        name = f"{job['metadata']['name']}-master-0"
        template = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
        status: dict = {"phase": phase}
        if phase == "Pending":
            status["conditions"] = [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                }
            ]
        pod = {
            "metadata": {
                "name": name,
                "labels": {
                    "training.kubeflow.org/job-name": job["metadata"]["name"],
                    "training.kubeflow.org/replica-type": "master",
                    "training.kubeflow.org/replica-index": "0",
                },
            },
            "spec": {
                "containers": [{"name": c["name"]} for c in template["spec"]["containers"]],
                "volumes": template["spec"].get("volumes") or [],
            },
            "status": status,
        }
        if self.server.get("pods", name, self.namespace) is not None:  # a recreated job gets a fresh pod
            self.server.delete("pods", name, self.namespace)
        self.server.create("pods", pod, self.namespace)
        return name

    def _run_job(self, job: dict) -> None:
        try:
            self._script(job)
        except _JobGone:
            pass
        except BaseException as e:  # surfaced by tests through `errors`
            self.errors.append(e)

    def _script(self, job: dict) -> None:
        import os
        import time

        from trainer.contract.output import invalidate_manifest, write_manifest

        meta = job["metadata"]
        name, uid = meta["name"], meta["uid"]
        stage, attempt = meta["labels"]["r1-grpo.io/stage"], int(meta["labels"]["r1-grpo.io/attempt"])
        container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        output_dir = self.local(_flag(container, "--output_dir"))
        behaviour = self.scripts.get((stage, attempt), "succeed")
        pause = self.step_delay

        time.sleep(pause)
        self._condition(name, uid, "Created")
        pod = self._pod(job, "Pending" if behaviour == "pending" else "Running")
        if behaviour == "pending":
            return
        time.sleep(pause)
        self._condition(name, uid, "Running")
        # the trainer: a (re)started stage makes its folder untrusted, then resumes after the last checkpoint
        os.makedirs(output_dir, exist_ok=True)
        invalidate_manifest(output_dir)
        done = [
            int(n.split("-")[1])
            for n in os.listdir(output_dir)
            if n.startswith("checkpoint-") and n.split("-")[1].isdigit()
        ]
        step = max(done, default=0)
        if stage in TRAINING_STAGES:
            for _ in range(self.checkpoints_per_attempt):
                self._alive(name, uid)
                step += 10
                tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}-{uid[:8]}")
                os.makedirs(os.path.join(tmp, "model"), exist_ok=True)
                with open(os.path.join(tmp, "model", "model.safetensors"), "wb") as f:
                    f.write(os.urandom(256))
                with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                    json.dump({"step": step}, f)
                os.replace(tmp, os.path.join(output_dir, f"checkpoint-{step}"))
                time.sleep(pause)
        gate = self.gates.get((stage, attempt))
        if behaviour == "hang" or gate is not None:
            while not self._stop.is_set() and not (gate is not None and gate.is_set()):
                time.sleep(0.01)
            if behaviour == "hang" or self._stop.is_set():
                return
        self._alive(name, uid)
        if behaviour == "fail":
            lines = [f"[rank0] step {s}: loss 0.{s:03d}" for s in range(1, 80)]
            lines.append("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
            self.server.set_pod_log(self.namespace, pod, "\n".join(lines) + "\n")
            # restartPolicy Never: the failed trainer's pod stays, Failed (the controller waits for that)
            self._pod_phase(pod, "Failed")
            self._condition(
                name,
                uid,
                "Failed",
                f"PyTorchJob {name} is failed because 1 Master replica(s) failed.",
                "PyTorchJobFailed",
            )
            return
        if stage in TRAINING_STAGES:
            with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
                remaining = self.weight_bytes
                while remaining > 0:
                    f.write(os.urandom(min(remaining, 1 << 24)))
                    remaining -= 1 << 24
            with open(os.path.join(output_dir, "config.json"), "w") as f:
                json.dump({"model_type": "llama"}, f)
        else:
            with open(os.path.join(output_dir, "metrics.json"), "w") as f:
                json.dump({"accuracy": 0.5}, f)
        index = ("sft", "grpo", "eval").index(stage)
        write_manifest(
            output_dir,
            stage,
            steps=max(step, 1),
            inputs={"model_name_or_path": _flag(container, "--model_name_or_path")},
            metrics={"accuracy": 0.25 + 0.25 * index, "attempt": attempt},
        )
        if behaviour == "corrupt":
            with open(os.path.join(output_dir, "model.safetensors"), "r+b") as f:
                f.write(b"\x00" * 16)
        elif behaviour == "no-manifest":
            os.remove(os.path.join(output_dir, "r1_stage.json"))
        time.sleep(pause)
        self.server.set_pod_log(self.namespace, pod, f"{stage} finished\n")
        self._pod_phase(pod, "Succeeded")
        self._condition(name, uid, "Succeeded")
        self.succeeded_at[name] = time.monotonic()


class _JobGone(Exception):
    """The job this script plays was deleted (or replaced by a new one with the same name)."""
