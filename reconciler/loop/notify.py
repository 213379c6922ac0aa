"""Notifications: tell a generic JSON webhook, an ntfy topic or a Discord channel what a pass did.

Who uses it: the daemon subscribes a `Notifier` to its loop (`control.subscribe(notifier)`) with the
Lab's `notifications:` list, and calls `configure` when a new revision changes that list. A
`Notifier` is a `PassListener`, called on the loop's thread: it only decides what to send and hands
it to one bounded queue and worker thread per target, so a receiver that is slow, hangs or is down
never blocks or slows reconciliation. A full queue drops the notification; drops and failures are
logged (with the target's kind and host, never its URL path or token: a Discord URL is a secret).

What is sent: a pass whose outcome is applied, rolled back or failed, or that found drift, to each
target that wants one of those events. The same notification twice in a row (the same events,
revision, outcome, drift and message: a retried error, drift left alone under `warn`) is sent once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, assert_never
from urllib.parse import urlsplit

import requests

from reconciler import redact
from reconciler.logs import fields
from reconciler.loop.events import Outcome, PassRecord
from reconciler.spec.models import Lab, Notification, NotifyEvent, NotifyKind, http_url_problem

__all__ = ["Notifier", "events_of", "notification_document"]

log = logging.getLogger(__name__)

QUEUE_SIZE = 32  # per target; a burst beyond it is dropped, never waited for
MAX_LISTED = 20  # changes and drift listed in a chat message
DISCORD_LIMIT = 2000  # characters in a Discord message
USER_AGENT = "reconciler-notify/1"


def events_of(record: PassRecord) -> frozenset[NotifyEvent]:
    """The notifiable events of a finished pass (none for a quiet one)."""
    found: set[NotifyEvent] = {NotifyEvent.DRIFT} if record.drift else set()
    match record.outcome:
        case Outcome.APPLIED:
            found.add(NotifyEvent.APPLIED)
        case Outcome.ROLLED_BACK:
            found.add(NotifyEvent.ROLLED_BACK)
        case Outcome.ROLLBACK_INCOMPLETE:
            found.update({NotifyEvent.ROLLED_BACK, NotifyEvent.FAILED})
        case Outcome.INVALID | Outcome.REFUSED | Outcome.ERROR:
            found.add(NotifyEvent.FAILED)
        case Outcome.NO_CHANGES | Outcome.SUSPENDED:
            pass
        case unreachable:
            assert_never(unreachable)
    return frozenset(found)


def notification_document(lab: str, record: PassRecord, events: frozenset[NotifyEvent]) -> dict[str, Any]:
    """The generic webhook's JSON body; the chat messages are rendered from it."""
    return {
        "lab": lab,
        "events": sorted(events),
        "pass": record.number,
        "trigger": str(record.trigger),
        "revision": record.revision,
        "outcome": str(record.outcome),
        "started": record.started,
        "duration": record.duration,
        "changes": list(record.changes),
        "drift": [
            {"address": d.address, "fields": list(d.fields), "policy": d.policy, "corrected": d.corrected}
            for d in record.drift
        ],
        "message": record.message,
        "diagnostics": list(record.diagnostics),
    }


def _summary(doc: Mapping[str, Any]) -> str:
    revision = (doc["revision"] or "no revision")[:12]
    return f"lab {doc['lab']}: {doc['outcome']} at {revision} ({doc['trigger']}, pass {doc['pass']})"


def _listed(lines: Sequence[str]) -> list[str]:
    shown = list(lines[:MAX_LISTED])
    return [*shown, f"... and {len(lines) - len(shown)} more"] if len(lines) > len(shown) else shown


def _text(doc: Mapping[str, Any]) -> str:
    lines = [_summary(doc)]
    lines += _listed(doc["changes"])
    drift = [
        f"drift: {d['address']} {', '.join(d['fields'])} ({'corrected' if d['corrected'] else d['policy']})"
        for d in doc["drift"]
    ]
    lines += _listed(drift)
    if doc["message"]:
        lines.append(doc["message"])
    return "\n".join(lines)


def _ascii_header(text: str) -> str:
    return "".join(char if " " <= char <= "~" else "?" for char in text)[:200]


@dataclass(frozen=True, slots=True)
class _Target:
    """A notification target with its secrets resolved from the environment."""

    kind: NotifyKind
    url: str = field(repr=False)
    token: str | None = field(repr=False)
    events: frozenset[NotifyEvent]
    timeout: float
    label: str  # kind and host: safe to log

    def request(self, doc: Mapping[str, Any]) -> tuple[dict[str, str], bytes]:
        headers = {"User-Agent": USER_AGENT}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        match self.kind:
            case NotifyKind.GENERIC:
                headers["Content-Type"] = "application/json"
                return headers, json.dumps(doc).encode()
            case NotifyKind.NTFY:
                failed = bool({"failed", "rolled-back"} & set(doc["events"]))
                headers["Title"] = _ascii_header(_summary(doc))
                headers["Priority"] = "high" if failed else "default"
                headers["Tags"] = "rotating_light" if failed else "white_check_mark"
                headers["Content-Type"] = "text/plain; charset=utf-8"
                return headers, _text(doc).encode()
            case NotifyKind.DISCORD:
                headers["Content-Type"] = "application/json"
                body = {"content": _text(doc)[:DISCORD_LIMIT], "allowed_mentions": {"parse": []}}
                return headers, json.dumps(body).encode()
            case unreachable:
                assert_never(unreachable)


def _resolve(index: int, spec: Notification, environ: Mapping[str, str]) -> _Target | None:
    """The target with its URL and token read from the environment; None (logged) when unusable."""
    url = spec.url if spec.url is not None else environ.get(spec.url_env or "", "")
    label = f"{spec.kind}#{index}"
    if spec.url_env:
        redact.register(url)  # a URL from the environment is a secret (a Discord webhook URL is its own key)
    if not url:
        log.error("notification target disabled", extra=fields(target=label, missing_variable=spec.url_env))
        return None
    if (problem := http_url_problem(url)) is not None:
        log.error("notification target disabled", extra=fields(target=label, variable=spec.url_env, problem=problem))
        return None
    token = environ.get(spec.token_env) if spec.token_env else None
    redact.register(token)
    if spec.token_env and not token:
        log.error("notification target disabled", extra=fields(target=label, missing_variable=spec.token_env))
        return None
    if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
        # An HTTP header carries printable ASCII only: anything else would kill the sending thread.
        problem = "the token is not printable ASCII without spaces"
        log.error("notification target disabled", extra=fields(target=label, variable=spec.token_env, problem=problem))
        return None
    host = urlsplit(url).hostname or "?"
    return _Target(spec.kind, url, token, frozenset(spec.events), spec.timeout, f"{label}@{host}")


class _Worker:
    """One target's bounded queue and sending thread."""

    def __init__(self, target: _Target, queue_size: int) -> None:
        self.target = target
        self.last_key: object = None
        self._queue: queue.Queue[Mapping[str, Any] | None] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._session = requests.Session()
        self._thread = threading.Thread(target=self._run, name=f"notify {target.label}", daemon=True)
        self._thread.start()

    def offer(self, doc: Mapping[str, Any]) -> bool:
        try:
            self._queue.put_nowait(doc)
        except queue.Full:
            return False
        return True

    def stop(self, timeout: float | None, *, drain: bool = False) -> None:
        """End the worker; with `drain`, what is queued is sent first (each send bounded by its timeout)."""
        if not drain:
            self._stop.set()
        try:
            if drain:
                self._queue.put(None, timeout=timeout)  # behind what is queued
            else:
                self._queue.put_nowait(None)
        except queue.Full:  # the worker sees the flag after its current send
            self._stop.set()
        if timeout is not None:
            self._thread.join(timeout)
            if drain and self._thread.is_alive():
                self._stop.set()  # the time is up: what is left is dropped

    def _run(self) -> None:
        while not self._stop.is_set():
            doc = self._queue.get()
            if doc is None or self._stop.is_set():
                break
            self._send(doc)
        self._session.close()

    def _send(self, doc: Mapping[str, Any]) -> None:
        headers, body = self.target.request(doc)
        where = fields(target=self.target.label, revision=doc["revision"], outcome=doc["outcome"])
        try:
            timeout = (self.target.timeout, self.target.timeout)
            response = self._session.post(
                self.target.url, data=body, headers=headers, timeout=timeout, allow_redirects=False, stream=True
            )
            response.close()
        except requests.RequestException as exc:
            # The exception text carries the URL, which may be the secret: log its type only.
            log.warning("notification failed", extra={"fields": {**where["fields"], "error": type(exc).__name__}})
            return
        if 200 <= response.status_code < 300:
            log.info("notification sent", extra=where)
        else:
            log.warning("notification refused", extra={"fields": {**where["fields"], "status": response.status_code}})


class Notifier:
    """A `PassListener` that notifies each configured target in the background; never blocks."""

    def __init__(
        self,
        lab: str,
        targets: Sequence[Notification],
        *,
        environ: Mapping[str, str] | None = None,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self._lock = threading.Lock()
        self._queue_size = queue_size
        self._lab = lab
        self._workers: list[_Worker] = []
        self._closed = False
        self.configure(lab, targets, environ=environ)

    @classmethod
    def from_lab(cls, lab: Lab, *, environ: Mapping[str, str] | None = None) -> Notifier:
        return cls(lab.name, lab.notifications, environ=environ)

    def configure(self, lab: str, targets: Sequence[Notification], *, environ: Mapping[str, str] | None = None) -> None:
        """Replace the targets (a new revision changed them); unchanged ones keep their queue."""
        env = os.environ if environ is None else environ
        resolved = [t for i, spec in enumerate(targets) if (t := _resolve(i, spec, env)) is not None]
        with self._lock:
            if self._closed:  # a pass finishing while the daemon stops starts no new worker
                return
            self._lab = lab
            keep = {w.target: w for w in self._workers}
            self._workers = [keep.pop(t) if t in keep else _Worker(t, self._queue_size) for t in resolved]
        for dropped in keep.values():
            dropped.stop(timeout=None)

    def __call__(self, record: PassRecord) -> None:
        events = events_of(record)
        with self._lock:
            lab, workers = self._lab, list(self._workers)
        doc = notification_document(lab, record, events) if events else None
        for worker in workers:
            wanted = events & worker.target.events
            key = _dedup_key(record, wanted) if wanted else None
            repeated, worker.last_key = key == worker.last_key, key
            if doc is None or key is None or repeated:
                continue
            if not worker.offer(doc):
                log.warning("notification dropped", extra=fields(target=worker.target.label, reason="queue full"))

    def close(self, timeout: float = 5.0, *, drain: bool = False) -> None:
        """Stop the workers within about `timeout` seconds in all; what is still queued is dropped,
        unless `drain`, which sends it first while the time allows (`run --once`, a daemon stopping)."""
        with self._lock:
            workers, self._workers, self._closed = self._workers, [], True
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.stop(timeout=max(0.0, deadline - time.monotonic()), drain=drain)


def _dedup_key(record: PassRecord, events: frozenset[NotifyEvent]) -> object:
    return (events, record.revision, record.outcome, record.drift, record.message)
