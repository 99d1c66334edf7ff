"""A Hugging Face hub stand-in on loopback, for real HTTP in the hub tests: it answers the file
listing huggingface_hub asks for (GET /api/datasets/<repo>/tree/<revision>) the way the hub does,
including its error headers, and records every request it got."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """`repos`: {repo: [paths]}; `gated`: repos that need a token; `fail_first`: {repo: n} answers 503 n times first."""

    def __init__(self, repos: dict[str, list[str]], gated: set[str] | None = None, fail_first: dict | None = None):
        self.repos, self.gated, self.fail_first = repos, gated or set(), dict(fail_first or {})
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Authorization")))
                status, headers, body = hub.answer(self.path, self.headers.get("Authorization"))
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(json.dumps(body).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str, authorization: str | None) -> tuple[int, dict, object]:
        prefix = "/api/datasets/"
        if not path.startswith(prefix) or "/tree/" not in path:
            return 404, {"X-Error-Code": "EntryNotFound"}, {"error": "not found"}
        repo = path[len(prefix) :].split("/tree/")[0]
        if self.fail_first.get(repo, 0) > 0:
            self.fail_first[repo] -= 1
            return 503, {}, {"error": "Service Unavailable"}
        if repo not in self.repos:
            return 401, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"}
        if repo in self.gated and not authorization:
            return 401, {"X-Error-Code": "GatedRepo"}, {"error": "Access to this dataset is restricted."}
        return 200, {}, [{"type": "file", "path": p, "size": 1, "oid": "0" * 40} for p in self.repos[repo]]

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()
