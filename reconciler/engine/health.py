"""Health probes: HTTP (status and optional body match) and TCP, polled until healthy or out of time.

Called by the applier after the steps that need verifying. A probe gives up
early when `still_starting` says the thing it waits for has died (a container
that exited or restarted), instead of waiting out the whole timeout.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["ProbeResult", "endpoint_address", "ollama_load", "poll", "probe_http", "probe_tcp"]


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
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
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


def ollama_load(base_url: str, model: str, *, timeout: float) -> ProbeResult:
    """Make an Ollama server hold `model` in memory: pull it unless it is there, then load it.

    A model already on disk is not pulled again (a lab may be offline). The pull
    streams its progress, so a large download is bounded by `timeout` as a whole
    rather than by one silent socket read; the load is a generate call without a
    prompt, which Ollama answers once the model sits on its GPUs.
    """
    clock = time.monotonic
    start = clock()
    try:
        with urllib.request.urlopen(f"{base_url}/api/tags", timeout=min(timeout, 30.0)) as response:
            tags = json.load(response)
        present = {_ollama_name(m.get("name") or m.get("model") or "") for m in tags.get("models", [])}
        if _ollama_name(model) not in present:
            for line in _post_lines(f"{base_url}/api/pull", {"model": model, "stream": True}, timeout=60.0):
                if "error" in line:
                    return ProbeResult(False, f"ollama pull {model}: {line['error']}", clock() - start)
                if clock() - start > timeout:
                    return ProbeResult(False, f"ollama pull {model}: not done after {timeout:.0f}s", clock() - start)
        remaining = max(1.0, timeout - (clock() - start))
        answer = next(_post_lines(f"{base_url}/api/generate", {"model": model, "keep_alive": -1}, timeout=remaining))
    except urllib.error.HTTPError as exc:
        return ProbeResult(False, f"ollama {model}: {_ollama_error(exc)}", clock() - start)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError, StopIteration) as exc:
        reason = getattr(exc, "reason", exc) or "no answer"
        return ProbeResult(False, f"ollama {model}: {reason}", clock() - start)
    if "error" in answer:
        return ProbeResult(False, f"ollama load {model}: {answer['error']}", clock() - start)
    return ProbeResult(True, f"ollama holds {model}", clock() - start)


def _ollama_name(name: str) -> str:
    """Ollama's name for a model: a bare name means its `latest` tag."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _post_lines(url: str, body: dict[str, object], *, timeout: float) -> Iterator[dict[str, object]]:
    """POST JSON and yield the JSON objects of the answer, one a line (Ollama streams them)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", "User-Agent": "reconciler"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            if raw.strip():
                item = json.loads(raw)
                yield item if isinstance(item, dict) else {"error": f"unexpected answer {raw[:200]!r}"}


def _ollama_error(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read(4096)).get("error") or f"status {exc.code}")
    except (ValueError, AttributeError, OSError):
        return f"status {exc.code}"


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
