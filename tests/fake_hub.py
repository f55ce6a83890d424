"""A loopback stand-in for the Hugging Face Hub's HTTP API, serving one small repository, for
testing hf:// initialization with the real huggingface_hub client (HF_ENDPOINT points here).

What it serves, as the Hub does (huggingface_hub 2.x reads exactly these), for a model repository
(a dataset repository: /api/datasets/... and /datasets/ORG/NAME/resolve/...):
  GET  /api/models/ORG/NAME[/revision/REV] repo info: {"id", "sha", "siblings"}; REV a branch, tag or commit
  GET  /api/models/ORG/NAME/tree/COMMIT    the file listing (recursive, one page)
  HEAD/GET /ORG/NAME/resolve/COMMIT/PATH   a file, with X-Repo-Commit, ETag and Content-Length
  errors as the Hub marks them: X-Error-Code RepoNotFound (404, also for a private repository
  without the right token: 401), RevisionNotFound (404), EntryNotFound (404).
What it does not cover: LFS/Xet transfers (files are served inline, as the Hub does for small
regular files; LFS pointers and the Xet CAS protocol are not emulated), redirects to a CDN,
pagination of long listings, spaces, rate limits, dataset viewer/parquet-conversion branches.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlparse


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    token: Optional[str] = None  # set: a private repository readable with this token only
    tags: dict[str, str] = field(default_factory=dict)  # tag -> commit
    repo_type: str = "model"  # or "dataset": served under /api/datasets/ and /datasets/

    @property
    def commit(self) -> str:
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + self.files[path])
        return digest.hexdigest()

    def resolve(self, revision: str) -> Optional[str]:
        if revision in ("main", self.commit):
            return self.commit
        return self.tags.get(revision)


class FakeHub:
    def __init__(self, repo: FakeRepo):
        self.repo = repo
        self.requests: list[str] = []  # "METHOD /path", for the tests to count
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _error(self, handler: BaseHTTPRequestHandler, status: int, code: str, body: bool) -> None:
        payload = json.dumps({"error": f"{code}: {handler.path}"}).encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if body:
            handler.wfile.write(payload)

    def _json(self, handler: BaseHTTPRequestHandler, data: object, body: bool) -> None:
        payload = json.dumps(data).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if body:
            handler.wfile.write(payload)

    def _serve(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        repo = self.repo
        parts = path.strip("/").split("/")
        api = parts[:2] == ["api", f"{repo.repo_type}s"]
        if repo.repo_type == "dataset" and not api:
            if parts[:1] != ["datasets"]:
                return self._error(handler, 404, "RepoNotFound", body)
            parts = parts[1:]  # files of a dataset: /datasets/ORG/NAME/resolve/...
        repo_parts = parts[2:4] if api else parts[0:2]
        if "/".join(repo_parts) != repo.repo_id:
            return self._error(handler, 404, "RepoNotFound", body)
        if repo.token is not None and handler.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(handler, 401, "RepoNotFound", body)  # the Hub hides private repos
        if api and (len(parts) == 4 or (len(parts) >= 6 and parts[4] in ("revision", "tree"))):
            if len(parts) == 4:
                parts = [*parts, "revision", "main"]  # no revision: the default branch
            revision = parts[5]
            commit = repo.resolve(revision)
            if commit is None:
                return self._error(handler, 404, "RevisionNotFound", body)
            if parts[4] == "revision":
                siblings = [{"rfilename": name} for name in sorted(repo.files)]
                return self._json(handler, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "siblings": siblings, "private": repo.token is not None}, body)
            tree = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in sorted(repo.files.items())
            ]
            return self._json(handler, tree, body)
        if not api and len(parts) >= 5 and parts[2] == "resolve":
            commit = repo.resolve(parts[3])
            if commit is None:
                return self._error(handler, 404, "RevisionNotFound", body)
            name = "/".join(parts[4:])
            if name not in repo.files:
                return self._error(handler, 404, "EntryNotFound", body)
            data = repo.files[name]
            handler.send_response(200)
            handler.send_header("X-Repo-Commit", commit)
            handler.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            handler.send_header("Content-Length", str(len(data)))
            handler.send_header("Content-Type", "application/octet-stream")
            handler.end_headers()
            if body:
                handler.wfile.write(data)
            return None
        return self._error(handler, 404, "EntryNotFound", body)
