"""A loopback HTTP server that answers the Hub API calls of an upload and records every request.

It speaks the endpoints huggingface_hub's upload client uses (huggingface_hub 2.4, ``hf_api.py``,
``_commit_api.py``, ``lfs.py``): ``POST /api/repos/create``, ``POST /api/validate-yaml`` (the README's metadata), ``POST /api/models/<repo>/branch/<rev>``,
``POST /api/models/<repo>/preupload/<rev>``, the git-LFS batch API ``POST /<repo>.git/info/lfs/objects/batch``
with ``PUT`` uploads and ``POST`` verify on this server, and ``POST /api/models/<repo>/commit/<rev>``
(NDJSON). Anything else is answered 404 and recorded, so a test sees unexpected calls.

``lfs_suffixes``: files whose names end so are answered ``uploadMode: lfs`` at preupload (the Hub
does so for large or binary files); the others ``regular`` (their bytes travel base64 in the commit).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]

    def committed_files(self) -> dict[str, dict[str, Any]]:
        """For a commit request: path → its NDJSON value, plus ``key`` ("file" or "lfsFile") and, for
        regular files, ``bytes`` (the decoded base64 content)."""
        files = {}
        for item in self.ndjson():
            if item["key"] in ("file", "lfsFile"):
                value = {"key": item["key"], **item["value"]}
                if item["key"] == "file":
                    value["bytes"] = base64.b64decode(value["content"])
                files[value["path"]] = value
        return files


@dataclass
class FakeHub:
    lfs_suffixes: tuple[str, ...] = (".safetensors",)
    requests: list[Request] = field(default_factory=list)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 → uploaded bytes
    refuse_commit: int | None = None  # answer commits with this status (e.g. 403: no write access)
    url: str = ""

    def calls(self, method: str, pattern: str) -> list[Request]:
        return [
            r for r in self.requests if r.method == method and re.fullmatch(pattern, r.path.split("?")[0])
        ]

    def unanswered(self) -> list[Request]:
        return [r for r in self.requests if getattr(r, "status", 200) == 404]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _reply(self, status: int, payload: Any = None, request: Request | None = None) -> None:
            body = b"" if payload is None else json.dumps(payload).encode()
            if request is not None:
                request.status = status  # type: ignore[attr-defined]
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                return self.rfile.read(length)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            return b""

        def _handle(self) -> None:
            request = Request(
                self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, self._body()
            )
            hub.requests.append(request)
            path = self.path.split("?")[0]
            if self.command == "POST" and path == "/api/repos/create":
                payload = request.json()
                repo = f"{payload.get('organization')}/{payload['name']}"
                return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo}, request)
            if self.command == "POST" and path == "/api/validate-yaml":
                # The Hub checks a README's metadata before an upload; here: YAML between --- lines, a mapping.
                content = request.json()["content"]
                try:
                    metadata = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
                except yaml.YAMLError as error:
                    return self._reply(400, {"errors": [{"message": str(error)}]}, request)
                if not isinstance(metadata, dict):
                    return self._reply(400, {"errors": [{"message": "no YAML metadata mapping"}]}, request)
                return self._reply(200, {"errors": [], "warnings": []}, request)
            if self.command == "POST" and re.fullmatch(r"/api/models/[^/]+/[^/]+/branch/[^/]+", path):
                return self._reply(200, {}, request)
            if self.command == "POST" and re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/[^/]+", path):
                files = request.json()["files"]
                modes = [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if f["path"].endswith(hub.lfs_suffixes) else "regular",
                        "shouldIgnore": False,
                        "oid": None,
                    }
                    for f in files
                ]
                return self._reply(200, {"files": modes}, request)
            if self.command == "POST" and re.fullmatch(r"/[^/]+/[^/]+\.git/info/lfs/objects/batch", path):
                objects = [
                    {
                        "oid": o["oid"],
                        "size": o["size"],
                        "actions": {
                            "upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"},
                            "verify": {"href": f"{hub.url}/lfs-verify"},
                        },
                    }
                    for o in request.json()["objects"]
                ]
                return self._reply(200, {"transfer": "basic", "objects": objects}, request)
            if self.command == "PUT" and path.startswith("/lfs-upload/"):
                oid = path.rsplit("/", 1)[1]
                if hashlib.sha256(request.body).hexdigest() != oid:
                    return self._reply(400, {"error": "sha256 mismatch"}, request)
                hub.lfs_objects[oid] = request.body
                return self._reply(200, None, request)
            if self.command == "POST" and path == "/lfs-verify":
                ok = request.json()["oid"] in hub.lfs_objects
                return self._reply(200 if ok else 404, {}, request)
            if self.command == "POST" and re.fullmatch(r"/api/models/[^/]+/[^/]+/commit/[^/]+", path):
                if hub.refuse_commit is not None:
                    return self._reply(
                        hub.refuse_commit, {"error": "You don't have the rights to write here"}, request
                    )
                oid = hashlib.sha1(request.body).hexdigest()
                repo = "/".join(path.split("/")[3:5])
                return self._reply(
                    200,
                    {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
                    request,
                )
            return self._reply(404, {"error": f"fake hub: no route for {self.command} {path}"}, request)

        do_GET = do_POST = do_PUT = do_HEAD = _handle

    return Handler


def serve(hub: FakeHub) -> tuple[ThreadingHTTPServer, threading.Thread]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread
