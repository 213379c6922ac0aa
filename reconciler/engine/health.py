"""Health probes: HTTP (status and optional body match) and TCP, polled until healthy or out of time.

Called by the applier after the steps that need verifying. A probe gives up
early when `still_starting` says the thing it waits for has died (a container
that exited or restarted), instead of waiting out the whole timeout.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["ProbeResult", "endpoint_address", "poll", "probe_http", "probe_tcp"]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    healthy: bool
    detail: str
    elapsed: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {"healthy": self.healthy, "detail": self.detail, "elapsed": round(self.elapsed, 3)}


def endpoint_address(endpoint: str) -> str:
    """The address probes use for a Docker host: its ssh/tcp host name, or loopback for a local socket."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("tcp", "ssh", "http", "https") and parts.hostname:
        return parts.hostname
    return "127.0.0.1"


def probe_http(url: str, *, status: int = 200, body: str | None = None, timeout: float = 5.0) -> ProbeResult:
    request = urllib.request.Request(url, headers={"User-Agent": "reconciler-health"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            code = response.status
            text = response.read(65536).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        code, text = exc.code, ""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return ProbeResult(False, f"GET {url}: {reason}")
    if code != status:
        return ProbeResult(False, f"GET {url}: status {code}, expected {status}")
    if body is not None and not re.search(body, text):
        return ProbeResult(False, f"GET {url}: body does not match {body!r}")
    return ProbeResult(True, f"GET {url}: {code}")


def probe_tcp(address: str, *, timeout: float = 5.0) -> ProbeResult:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return ProbeResult(True, f"tcp {address}: open")
    except (OSError, ValueError) as exc:
        return ProbeResult(False, f"tcp {address}: {exc}")


def poll(
    check: Callable[[], ProbeResult],
    *,
    timeout: float,
    interval: float,
    still_starting: Callable[[], str | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ProbeResult:
    """Run `check` until it passes or `timeout` runs out. `still_starting` returns a reason to give up now."""
    start = clock()
    last = ProbeResult(False, "not checked")
    while True:
        if still_starting is not None:
            dead = still_starting()
            if dead:
                return ProbeResult(False, dead, clock() - start)
        last = check()
        elapsed = clock() - start
        if last.healthy:
            return ProbeResult(True, last.detail, elapsed)
        if elapsed + interval > timeout:
            return ProbeResult(False, f"{last.detail} (gave up after {elapsed:.0f}s)", elapsed)
        sleep(interval)
