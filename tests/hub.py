"""A Hugging Face Hub on 127.0.0.1: the endpoints huggingface_hub and lilmistral's downloader use.

GET /api/models/{repo}/revision/{rev}?blobs=true   model info with sizes, blob ids and LFS sha256
GET|HEAD /{repo}/resolve/{rev}/{file}             the file, with Range, ETag and X-Repo-Commit
Faults to inject: gated repos (401 + X-Error-Code: GatedRepo without the right token), a connection cut
after N bytes (once), a corrupted byte, a slow file.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Hub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cut_after: dict[str, int] = {}  # file -> bytes to send before dropping the connection (once)
        self.corrupt: set[str] = set()
        self.slow: dict[str, float] = {}  # file -> seconds to sleep per 64 KB
        self.token = "hf_test_secret_token"
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_repo(self, repo: str, folder: Path, gated: bool = False) -> None:
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        sha = hashlib.sha1(repo.encode() + b"".join(files.values())).hexdigest()
        self.repos[repo] = {"files": files, "gated": gated, "sha": sha}

    def file_requests(self, name: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if "/resolve/" in r[1] and r[1].endswith("/" + name)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _error(self, status: int, code: str, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _repo(self, repo: str) -> dict | None:
                entry = hub.repos.get(repo)
                if entry is None:
                    self._error(404, "RepoNotFound", "Repository not found")
                    return None
                if entry["gated"] and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._error(401, "GatedRepo", f"Access to model {repo} is restricted.")
                    return None
                return entry

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                path = self.path.split("?")[0]
                if m := re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?$", path):
                    return self._info(m.group(1))
                if m := re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):
                    return self._file(m.group(1), m.group(3))
                self._error(404, "EntryNotFound", "not found")

            def _info(self, repo: str) -> None:
                entry = self._repo(repo)
                if entry is None:
                    return
                siblings = []
                for name, data in entry["files"].items():
                    s = {"rfilename": name, "size": len(data),
                         "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                    if name.endswith(".safetensors"):
                        s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    siblings.append(s)
                body = json.dumps({"id": repo, "modelId": repo, "sha": entry["sha"], "siblings": siblings,
                                   "gated": "auto" if entry["gated"] else False, "private": False}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, repo: str, name: str) -> None:
                entry = self._repo(repo)
                if entry is None:
                    return
                data = entry["files"].get(name)
                if data is None:
                    return self._error(404, "EntryNotFound", f"{name} not found")
                etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else \
                    hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                if name in hub.corrupt:
                    data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
                start = 0
                if rng := self.headers.get("Range"):
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", entry["sha"])
                self.end_headers()
                if self.command == "HEAD":
                    return
                body = data[start:]
                cut = hub.cut_after.pop(name, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                step = 64 * 1024
                for i in range(0, len(body), step):
                    try:
                        self.wfile.write(body[i:i + step])
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    if name in hub.slow:
                        time.sleep(hub.slow[name])

        return Handler
