"""Health probes: HTTP (status and optional body match) and TCP, polled until healthy or out of time;
and the phased health of a model server (starting, ready, working) that an exclusive switch waits for.

Called by the applier after the steps that need verifying. A probe gives up
early when `still_starting` says the thing it waits for has died (a container
that exited or restarted), instead of waiting out the whole timeout.
"""

from __future__ import annotations

import enum
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

__all__ = [
    "ANSWER_LIMIT",
    "PHASES",
    "ModelServer",
    "Phase",
    "ProbeResult",
    "Progress",
    "ProgressSink",
    "check_completion",
    "check_models",
    "check_started",
    "endpoint_address",
    "ollama_load",
    "phased_health",
    "poll",
    "probe_http",
    "probe_tcp",
]


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


# ---- phased health of a model server ------------------------------------------------------------------

ANSWER_LIMIT = 1024 * 1024  # a health answer or a model list is a few KiB; more is hostile, not a server


class Phase(enum.StrEnum):
    """The phases a model server goes through after it starts, in order."""

    STARTING = "starting"  # refused connections, or 503 "loading": expected, waited for
    READY = "ready"  # /health answers 200 and /v1/models lists the served name
    WORKING = "working"  # a one-token completion answers


PHASES: tuple[Phase, ...] = (Phase.STARTING, Phase.READY, Phase.WORKING)


@dataclass(frozen=True, slots=True)
class Progress:
    """One live progress note of a long wait: what, which phase, how long so far."""

    subject: str
    phase: str
    elapsed: float
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        return {"subject": self.subject, "phase": self.phase, "elapsed": round(self.elapsed, 1), "detail": self.detail}


ProgressSink = Callable[[Progress], None]


@dataclass(frozen=True, slots=True)
class ModelServer:
    """Where a model server answers and what it must serve. `health_path` is the engine's liveness path."""

    base_url: str
    served_name: str
    health_path: str = "/health"


class _Answer:
    """A bounded HTTP answer: status, and the body when it is at most ANSWER_LIMIT bytes."""

    def __init__(self, status: int, body: bytes | None) -> None:
        self.status = status
        self.body = body

    def json(self) -> object:
        if self.body is None:
            raise ValueError(f"the answer is larger than {ANSWER_LIMIT} bytes")
        return json.loads(self.body)


def _fetch(url: str, *, data: dict[str, object] | None = None, timeout: float) -> _Answer:
    """GET (or POST `data` as JSON) and read at most ANSWER_LIMIT bytes; HTTP errors are answers too."""
    body = None if data is None else json.dumps(data).encode()
    headers = {"User-Agent": "reconciler-health", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read(ANSWER_LIMIT + 1)
            return _Answer(response.status, raw if len(raw) <= ANSWER_LIMIT else None)
    except urllib.error.HTTPError as exc:
        try:
            raw = exc.read(ANSWER_LIMIT + 1) if exc.fp is not None else b""
        except (OSError, ValueError, http.client.HTTPException):
            raw = b""
        finally:
            exc.close()
        return _Answer(exc.code, raw if len(raw) <= ANSWER_LIMIT else None)


def _unreachable(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc or type(exc).__name__)


def check_started(server: ModelServer, *, timeout: float = 5.0) -> tuple[Phase, ProbeResult]:
    """One look at the liveness path: STARTING (keep waiting), or READY's first half passed, or a failure.

    Refused or reset connections and 503 are STARTING. Any other status than 200 is a failure: a server
    that answers 404 or 500 on its health path is not going to come up by waiting.
    """
    url = server.base_url + server.health_path
    try:
        answer = _fetch(url, timeout=timeout)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        return Phase.STARTING, ProbeResult(False, f"GET {url}: {_unreachable(exc)}")
    if answer.status == 503:
        return Phase.STARTING, ProbeResult(False, f"GET {url}: 503, still loading")
    if answer.status != 200:
        return Phase.READY, ProbeResult(False, f"GET {url}: status {answer.status}, expected 200")
    return Phase.READY, ProbeResult(True, f"GET {url}: 200")


def check_models(server: ModelServer, *, timeout: float = 5.0) -> ProbeResult:
    """READY's second half: `/v1/models` is an OpenAI model list that names the served model."""
    url = server.base_url + "/v1/models"
    try:
        answer = _fetch(url, timeout=timeout)
        if answer.status != 200:
            return ProbeResult(False, f"GET {url}: status {answer.status}, expected 200")
        listing = answer.json()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        return ProbeResult(False, f"GET {url}: {_unreachable(exc)}")
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        return ProbeResult(False, f"GET {url}: not an OpenAI model list")
    names = [str(entry.get("id"))[:100] for entry in data[:1000] if isinstance(entry, dict)]
    if server.served_name not in names:
        shown = ", ".join(repr(n) for n in names[:5]) or "nothing"
        return ProbeResult(False, f"GET {url}: serves {shown}, not {server.served_name!r}")
    return ProbeResult(True, f"GET {url}: lists {server.served_name!r}")


def check_completion(server: ModelServer, *, timeout: float = 60.0) -> ProbeResult:
    """WORKING: a one-token chat completion of the served model answers with a choice."""
    url = server.base_url + "/v1/chat/completions"
    ask = {"model": server.served_name, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    try:
        answer = _fetch(url, data=ask, timeout=timeout)
        if answer.status != 200:
            return ProbeResult(False, f"POST {url}: status {answer.status}, expected 200")
        reply = answer.json()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        return ProbeResult(False, f"POST {url}: {_unreachable(exc)}")
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
        return ProbeResult(False, f"POST {url}: the answer holds no completion")
    return ProbeResult(True, f"POST {url}: one token completed")


def phased_health(
    server: ModelServer,
    *,
    timeout: float,
    interval: float,
    subject: str = "",
    still_starting: Callable[[], str | None] | None = None,
    progress: ProgressSink | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ProbeResult:
    """Wait through STARTING (bounded by `timeout`), then check READY and WORKING once each.

    The detail of a failure names the phase it failed in. `still_starting` returns a reason to give up
    now (the container exited); `progress` hears the phase and the elapsed time at every look.
    """
    start = clock()

    def note(phase: Phase, detail: str) -> None:
        if progress is not None:
            progress(Progress(subject or server.base_url, str(phase), clock() - start, detail))

    while True:
        dead = still_starting() if still_starting is not None else None
        if dead:
            return ProbeResult(False, f"{Phase.STARTING}: {dead}", clock() - start)
        phase, result = check_started(server, timeout=max(min(5.0, timeout), 0.1))
        note(phase, result.detail)
        if phase is Phase.READY:
            break
        if clock() - start + interval > timeout:
            return ProbeResult(
                False, f"{Phase.STARTING}: {result.detail} (gave up after {timeout:g}s)", clock() - start
            )
        sleep(interval)
    if not result.healthy:
        return ProbeResult(False, f"{Phase.READY}: {result.detail}", clock() - start)
    listed = check_models(server)
    note(Phase.READY, listed.detail)
    if not listed.healthy:
        return ProbeResult(False, f"{Phase.READY}: {listed.detail}", clock() - start)
    worked = check_completion(server, timeout=max(timeout - (clock() - start), 5.0))
    note(Phase.WORKING, worked.detail)
    if not worked.healthy:
        return ProbeResult(False, f"{Phase.WORKING}: {worked.detail}", clock() - start)
    return ProbeResult(True, f"{Phase.WORKING}: {server.served_name} answers", clock() - start)
