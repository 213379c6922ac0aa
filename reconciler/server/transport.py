"""The HTTP transport: a stdlib threading server with limits, handing each request to the app.

Who calls it: `server.serve()`. Why the standard library: the API is six small endpoints on a
loopback port, requests are rare (a scrape, a webhook, a person), and a thread per connection with
hard limits is simpler to reason about than an event loop and adds no dependency. What the limits
give against slow or hostile clients (slowloris):

- at most `max_connections` at once; one more is answered 503 and closed at once;
- every socket read waits at most `idle_timeout`, and a whole request (headers, body, answer) at
  most `request_deadline`, after which a reaper thread shuts the socket;
- HTTP/1.0, one request per connection: no keep-alive for an idle client to hold;
- bodies only with a Content-Length, at most `max_body` bytes, read exactly and never beyond.

What they do not give: a client can still take every slot for `request_deadline`; exposed beyond
loopback, put a reverse proxy with its own limits in front.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from reconciler.logs import fields

__all__ = ["HttpError", "Limits", "Request", "Response", "Transport", "error_response"]

log = logging.getLogger(__name__)

_DIGITS = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True, slots=True)
class Limits:
    max_body: int = 1024 * 1024  # bytes
    idle_timeout: float = 10.0  # seconds per socket read or write
    request_deadline: float = 30.0  # seconds for a whole request
    max_connections: int = 64


class HttpError(Exception):
    """Answer the request with `status` and a JSON error; nothing else happens."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query string
    headers: Message
    client: str
    read_body: Callable[[bool], bytes]  # read_body(required): the bounded body; raises HttpError


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


App = Callable[[Request], Response]


class _Reaper:
    """Shuts the socket of any request still open past its deadline. One thread; sleeps when idle."""

    def __init__(self) -> None:
        self._deadlines: dict[socket.socket, float] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="http deadlines", daemon=True)
        self._thread.start()

    def track(self, sock: socket.socket, deadline: float) -> None:
        with self._wake:
            self._deadlines[sock] = deadline
            self._wake.notify()

    def forget(self, sock: socket.socket) -> None:
        with self._wake:
            self._deadlines.pop(sock, None)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(5)

    def _run(self) -> None:
        with self._wake:
            while not self._closed:
                now = time.monotonic()
                for sock in [s for s, deadline in self._deadlines.items() if deadline <= now]:
                    del self._deadlines[sock]
                    log.info("http request cut off", extra=fields(reason="deadline"))
                    with contextlib.suppress(OSError):  # already closed by its handler
                        sock.shutdown(socket.SHUT_RDWR)
                nearest = min(self._deadlines.values(), default=None)
                self._wake.wait(None if nearest is None else max(nearest - now, 0.01))


class Transport(ThreadingHTTPServer):
    """A ThreadingHTTPServer that bounds connections and time, and logs instead of printing."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], app: App, limits: Limits) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._reaper = _Reaper()
        try:
            super().__init__(address, _Handler)
        except BaseException:
            self._reaper.close()
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("http connection refused", extra=fields(reason="too many connections"))
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            self.shutdown_request(request)
            return
        self._reaper.track(request, time.monotonic() + self.limits.request_deadline)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: Any) -> None:
        self._reaper.forget(request)
        self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("http connection error", exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        self._reaper.close()


class _Handler(BaseHTTPRequestHandler):
    server: Transport
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"  # never answer in HTTP/0.9 (no status line)
    server_version = "reconciler"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.limits.idle_timeout)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        started = time.monotonic()
        try:
            path = urlsplit(self.path).path
        except ValueError:
            path = ""
        request = Request(self.command, path, self.headers, self.client_address[0], self._read_body)
        shown = path[:200]  # the path a client chose: bounded in the log
        try:
            response = self.server.app(request) if path else error_response(HttpError(400, "malformed request target"))
        except HttpError as exc:
            response = error_response(exc)
        except (TimeoutError, ConnectionError):
            self.close_connection = True
            log.info("http request abandoned", extra=fields(method=self.command, path=shown, client=request.client))
            return
        except Exception:
            log.exception("http request failed", extra=fields(method=self.command, path=shown))
            response = error_response(HttpError(500, "internal error; see the daemon's log"))
        self._write(response)
        seconds = round(time.monotonic() - started, 4)
        level = logging.DEBUG if response.status < 400 and self.command == "GET" else logging.INFO
        about = fields(method=self.command, path=shown, status=response.status, client=request.client, seconds=seconds)
        log.log(level, "http request", extra=about)

    def _read_body(self, required: bool) -> bytes:
        """The body, bounded by Content-Length and `max_body`; HttpError 400/411 otherwise."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise HttpError(411, "send the body with a Content-Length, not chunked")
        lengths = set(self.headers.get_all("Content-Length") or [])
        if not lengths:
            if required:
                raise HttpError(411, "a Content-Length is required")
            return b""
        length = lengths.pop().strip()
        if lengths or not _DIGITS.fullmatch(length):
            raise HttpError(400, "invalid Content-Length")
        if int(length) > self.server.limits.max_body:
            raise HttpError(400, f"body larger than {self.server.limits.max_body} bytes")
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            raise HttpError(400, "body shorter than its Content-Length")
        return body

    def _write(self, response: Response) -> None:
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
        except OSError:
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a bad request line, too many headers), in JSON like ours."""
        self.close_connection = True
        reason = message or self.responses.get(code, ("error",))[0]
        self._write(error_response(HttpError(code, reason)))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Requests are logged by `_dispatch`, with fields."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http protocol message", extra=fields(detail=(format % args)[:300]))


def error_response(exc: HttpError) -> Response:
    body = json.dumps({"error": exc.message, "status": exc.status}).encode()
    return Response(exc.status, body, headers=exc.headers)
