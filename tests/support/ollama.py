"""A stand-in for Ollama's HTTP API on loopback: what it holds is what the applier made it pull and load."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOllama:
    """`models` are on disk, `loaded` in memory; `pull_error` makes every pull fail with that message."""

    def __init__(self, models: set[str] | None = None, *, pull_error: str | None = None) -> None:
        self.models = {_name(m) for m in models or ()}
        self.loaded: set[str] = set()
        self.pull_error = pull_error
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path))
                if self.path == "/api/tags":
                    self._answer(200, [{"models": [{"name": m, "model": m} for m in sorted(fake.models)]}])
                else:
                    self._answer(404, [{"error": "not found"}])

            def do_POST(self) -> None:
                fake.requests.append(("POST", self.path))
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                model = _name(body.get("model", ""))
                if self.path == "/api/pull":
                    if fake.pull_error:
                        self._answer(200, [{"status": "pulling manifest"}, {"error": fake.pull_error}])
                        return
                    fake.models.add(model)
                    self._answer(200, [{"status": "pulling manifest"}, {"status": "success"}])
                elif self.path == "/api/generate":
                    if model not in fake.models:
                        self._answer(404, [{"error": f"model '{model}' not found"}])
                        return
                    fake.loaded.add(model)
                    self._answer(200, [{"model": model, "done": True, "done_reason": "load"}])
                else:
                    self._answer(404, [{"error": "not found"}])

            def _answer(self, status: int, lines: list[dict[str, Any]]) -> None:
                data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
                self.send_response(status)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    @contextmanager
    def running(self) -> Iterator[FakeOllama]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()


def _name(model: str) -> str:
    """As Ollama names models: a bare name is its `latest` tag."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"
