"""A local stand-in for the few Hub endpoints an upload uses (create repo, preupload, commit; model and dataset
repos), on 127.0.0.1.

It lets the real `huggingface_hub` client code run end to end with no network: every file is accepted as a
regular (non-LFS) upload and kept in memory, with the request headers, for the test to inspect.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, payload: dict, status: int = 200):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(("POST", self.path, dict(self.headers)))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "validate-yaml"]:  # ModelCard.validate
                    return self._reply({"errors": [], "warnings": []})
                if parts[:3] == ["api", "repos", "create"]:
                    request = json.loads(body)
                    repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
                    hub.repos.setdefault(repo_id, {})
                    return self._reply({"url": f"{hub.url}/{repo_id}"})
                repo_kinds = (["api", "models"], ["api", "datasets"])
                if parts[:2] in repo_kinds and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                    )
                if parts[:2] in repo_kinds and parts[4] == "commit":
                    repo_id = f"{parts[2]}/{parts[3]}"
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            content = base64.b64decode(item["value"]["content"])
                            hub.repos.setdefault(repo_id, {})[item["value"]["path"]] = content
                    return self._reply({"commitUrl": f"{hub.url}/{repo_id}/commit/0123abcd", "commitOid": "0123abcd"})
                return self._reply({"error": f"not faked: {self.path}"}, status=404)

            def do_GET(self):
                hub.requests.append(("GET", self.path, dict(self.headers)))
                return self._reply({"error": f"not faked: {self.path}"}, status=404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
