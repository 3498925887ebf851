"""A STAND-IN for the Hugging Face hub, served on loopback: the hub itself cannot be reached from here.

It implements only what `huggingface_hub.snapshot_download` (0.36) and `HfApi.repo_info` call, as the
hub answers them:

* `GET /api/{models|datasets}/<repo id>/revision/<revision>`: the repository's commit and file list
  (`siblings`, with sizes when asked `?blobs=True`);
* `HEAD` / `GET /<repo id>/resolve/<revision>/<path>` and `/datasets/<repo id>/resolve/<revision>/<path>`:
  a file, with `X-Repo-Commit`, `ETag` and `Content-Length` (plain HTTP; no Xet headers, so no Xet
  transfer);
* the hub's error answers: 404 with `X-Error-Code: RepoNotFound` / `RevisionNotFound` / `EntryNotFound`,
  and for a private repository asked without its token 401 with `X-Error-Code: RepoNotFound`, which
  huggingface_hub turns into the same errors as for the real hub.

Point a process at it with `HF_ENDPOINT=<hub.url>`. Every request is recorded (`hub.requests`), so a test
can say what was fetched and that a stage with the hub offline asked nothing.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]
    token: str | None = None  # private: readable only with this bearer token
    sha: str = ""
    truncate: set[str] = field(default_factory=set)  # files served short (a dropped connection)

    def __post_init__(self) -> None:
        if not self.sha:
            h = hashlib.sha1()
            for name in sorted(self.files):
                h.update(name.encode() + b"\0" + self.files[name])
            self.sha = h.hexdigest()


def folder_files(folder: Path) -> dict[str, bytes]:
    """A local folder's files as a repository's, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class StandinHub:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}  # (models|datasets, repo id) -> repo
        self.requests: list[tuple[float, str, str]] = []  # (time.time(), method, path)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet: the test reads hub.requests
                pass

            def do_GET(self) -> None:  # noqa: N802
                hub._serve(self, body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                hub._serve(self, body=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="standin-hub", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, kind: str, repo_id: str, repo: Repo) -> Repo:
        assert kind in ("models", "datasets")
        self.repos[(kind, repo_id)] = repo
        return repo

    def __enter__(self) -> StandinHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- answering
    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        self.requests.append((time.time(), h.command, h.path))
        m = re.fullmatch(r"/api/(models|datasets)/(.+)/revision/([^/]+)", path)
        if m:
            return self._info(h, m[1], m[2], m[3], "blobs" in parse_qs(url.query), body)
        m = re.fullmatch(r"/(datasets/)?(.+?)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._file(h, "datasets" if m[1] else "models", m[2], m[3], m[4], body)
        self._error(h, 404, "", "Not Found", body)

    def _repo(
        self, h: BaseHTTPRequestHandler, kind: str, repo_id: str, revision: str, body: bool
    ) -> Repo | None:
        repo = self.repos.get((kind, repo_id))
        auth = h.headers.get("Authorization", "")
        if repo is None or repo.token is not None and auth != f"Bearer {repo.token}":
            status = 404 if repo is None else 401
            self._error(h, status, "RepoNotFound", "Repository not found", body)
            return None
        if revision not in ("main", repo.sha):
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            return None
        return repo

    def _info(
        self, h: BaseHTTPRequestHandler, kind: str, repo_id: str, revision: str, blobs: bool, body: bool
    ) -> None:
        repo = self._repo(h, kind, repo_id, revision, body)
        if repo is None:
            return
        siblings = [
            {"rfilename": name, **({"size": len(data)} if blobs else {})}
            for name, data in sorted(repo.files.items())
        ]
        info = {"id": repo_id, "sha": repo.sha, "private": repo.token is not None, "siblings": siblings}
        if kind == "models":
            info["modelId"] = repo_id
        self._send(h, 200, "application/json", _json(info), body)

    def _file(
        self, h: BaseHTTPRequestHandler, kind: str, repo_id: str, revision: str, name: str, body: bool
    ) -> None:
        repo = self._repo(h, kind, repo_id, revision, body)
        if repo is None:
            return
        if name not in repo.files:
            self._error(h, 404, "EntryNotFound", f"{name} does not exist", body)
            return
        data = repo.files[name]
        etag = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"'}
        if name in repo.truncate and h.command == "GET":
            data = data[: len(data) // 2]  # announce the whole size, send half, close: a dropped download
            h.send_response(200)
            for k, v in {**headers, "Content-Length": str(len(repo.files[name]))}.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
            h.close_connection = True
            return
        self._send(h, 200, "application/octet-stream", data, body, headers)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str, body: bool) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message} if code else {}
        self._send(h, status, "application/json", _json({"error": message}), body, headers)

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler,
        status: int,
        ctype: str,
        data: bytes,
        body: bool,
        headers: dict | None = None,
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)


def _json(obj: object) -> bytes:
    import json

    return json.dumps(obj).encode()


# ---------------------------------------------------------------------------------------------------- repos

TOKEN = "hf_standin_token"
DATASET_CARD = b"""---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
---
# arithmetic, in the hub's layout: a config named in the card, parquet shards per split
"""


def parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def serve_tiny(hub: StandinHub, tiny_model_dir: Path) -> None:
    """`org/tiny`: the built-in tiny model's files, private (readable with TOKEN); `org/arith`: 64 train and
    16 test rows of the built-in task with worked solutions, as parquet shards of a config `main`."""
    from trainer.r1.builtin import builtin_rows

    hub.add("models", "org/tiny", Repo(folder_files(tiny_model_dir), token=TOKEN))
    files = {
        "README.md": DATASET_CARD,
        "main/train-00000-of-00001.parquet": parquet(builtin_rows("arith-teacher", "train")[:64]),
        "main/test-00000-of-00001.parquet": parquet(builtin_rows("arith-teacher", "test")[:16]),
    }
    hub.add("datasets", "org/arith", Repo(files))
