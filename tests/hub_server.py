"""A Hugging Face Hub-compatible file server on loopback, for download tests (huggingface_hub honours
HF_ENDPOINT). It answers the requests ``HfApi.model_info(files_metadata=True)`` and ``hf_hub_download`` make:

- ``GET /api/models/{repo}[/revision/{rev}]``: id, sha and siblings with sizes and, for LFS files, sha256;
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``: X-Repo-Commit, ETag (the sha256 for LFS files, the git blob
  sha1 otherwise), Content-Length, and HTTP Range for resume (206 + Content-Range);
- 401 with ``X-Error-Code: GatedRepo`` for a gated repository without its token, 404 with
  ``X-Error-Code: RepoNotFound`` / ``EntryNotFound`` otherwise.

``throttle`` slows weights down (bytes per second) so a test can watch progress, cancel, or cut the transfer.
Every request is logged (method, path, Range header) for tests to check what the client asked.
"""

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass
class Repo:
    """One model repository: file name -> bytes, a commit id, and the token it needs when gated."""

    files: dict[str, bytes]
    commit: str
    token: str | None = None


@dataclass
class HubServer:
    """The running server: its URL, repositories, request log and knobs."""

    url: str = ""
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    throttle: float | None = None  # bytes per second for LFS files; None: full speed
    drop_after: int | None = None  # close the connection after this many bytes of one LFS response, once

    def add_repo(self, repo_id: str, files: dict[str, bytes], token: str | None = None) -> Repo:
        """Serve a repository (a new commit id derived from its files)."""
        digest = hashlib.sha1(repo_id.encode() + b"".join(sorted(files.values()))).hexdigest()
        repo = Repo(files, digest, token)
        self.repos[repo_id] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, token: str | None = None, **extra: bytes) -> Repo:
        """Serve every file of a folder (plus ``extra`` files by name) as a repository."""
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        files.update({name.replace("__", "."): data for name, data in extra.items()})
        return self.add_repo(repo_id, files, token)


def _etag(name: str, data: bytes) -> str:
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(
                status,
                body,
                {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
            )

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if repo.token and self.headers.get("authorization") != f"Bearer {repo.token}":
                self._error(401, "GatedRepo", "Access to model is restricted. You must have access to it.")
                return None
            return repo

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            hub.requests.append((self.command, path, self.headers.get("range")))
            info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if info:
                return self._info(info.group(1))
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if resolve:
                return self._resolve(resolve.group(1), resolve.group(3))
            self._error(404, "EntryNotFound", "Not found")

        def _info(self, repo_id: str) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            siblings = []
            for name, data in repo.files.items():
                sibling: dict[str, Any] = {"rfilename": name, "size": len(data), "blobId": _etag(name, data)}
                if name.endswith(LFS_SUFFIXES):
                    sibling["lfs"] = {"size": len(data), "sha256": _etag(name, data), "pointerSize": 134}
                siblings.append(sibling)
            body = {
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.commit,
                "siblings": siblings,
                "gated": "auto" if repo.token else False,
                "private": False,
                "tags": [],
            }
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def _resolve(self, repo_id: str, name: str) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            if name not in repo.files:
                self._error(404, "EntryNotFound", "Entry not found")
                return
            data = repo.files[name]
            headers = {
                "X-Repo-Commit": repo.commit,
                "ETag": f'"{_etag(name, data)}"',
                "Accept-Ranges": "bytes",
            }
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("range") or "")
            if ranged and self.command == "GET":
                start = int(ranged.group(1))
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            lfs = name.endswith(LFS_SUFFIXES)
            if self.command == "HEAD" or not lfs or (hub.throttle is None and hub.drop_after is None):
                if self.command == "HEAD":
                    self.send_response(200)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return
                return self._send(206 if start else 200, body, headers)
            self.send_response(206 if start else 200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            chunk = 4096
            sent = 0
            for offset in range(0, len(body), chunk):
                if hub.drop_after is not None and sent >= hub.drop_after:
                    hub.drop_after = None  # once
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                try:
                    self.wfile.write(body[offset : offset + chunk])
                    self.wfile.flush()
                except OSError:
                    return
                sent += chunk
                if hub.throttle:
                    time.sleep(chunk / hub.throttle)

    return Handler


@contextmanager
def run_hub() -> Iterator[HubServer]:
    """Serve a Hub on a free loopback port until the block ends."""
    hub = HubServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
