"""Health probes against real sockets: whatever answers (or does not), a probe returns a result, never raises."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from reconciler.engine.health import ollama_load, poll, probe_http, probe_tcp
from tests.support.ollama import FakeOllama


@contextmanager
def answering(reply: bytes) -> Iterator[int]:
    """A TCP server on loopback that answers every connection with `reply` and closes it."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()


def test_an_http_probe_checks_status_and_body() -> None:
    with FakeOllama({"a:1"}).running() as fake:
        assert probe_http(f"{fake.url}/api/tags", body=r'"a:1"').healthy
        wrong_body = probe_http(f"{fake.url}/api/tags", body="nothing-like-this")
        missing = probe_http(f"{fake.url}/nope")
    assert not wrong_body.healthy and "body does not match" in wrong_body.detail
    assert not missing.healthy and "status 404, expected 200" in missing.detail


@pytest.mark.parametrize(
    ("reply", "status_ok"),
    [
        (b"garbage\r\n\r\n", False),  # no status line
        (b"", False),  # closed without a word
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nshort", True),  # 200, body cut short
    ],
)
def test_a_broken_http_answer_is_a_result_not_an_exception(reply: bytes, status_ok: bool) -> None:
    with answering(reply) as port:
        result = probe_http(f"http://127.0.0.1:{port}/health")
        loaded = ollama_load(f"http://127.0.0.1:{port}", "m:1", timeout=2)
    assert result.healthy is status_ok, result.detail
    assert not loaded.healthy, "no model list can be read from it"


def test_a_bad_address_is_unhealthy_not_an_exception() -> None:
    assert not probe_http("http://127.0.0.1:None/health").healthy
    assert not ollama_load("http://127.0.0.1:None", "m:1", timeout=1).healthy
    assert not probe_tcp("127.0.0.1:notaport").healthy


def test_poll_gives_up_early_when_the_thing_died() -> None:
    calls: list[float] = []
    result = poll(
        lambda: probe_tcp("127.0.0.1:1"),
        timeout=60,
        interval=1,
        still_starting=lambda: "the container exited while starting" if calls else None,
        sleep=calls.append,
    )
    assert (result.healthy, result.detail, calls) == (False, "the container exited while starting", [1])
