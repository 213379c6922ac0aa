"""The reconcile loop: one pass at a time, on triggers, with backoff; the `LoopControl` the server drives.

Who calls it: `reconciler run` (and the demo, and tests) build a `Controller`
around a `PassRunner` and call `serve(stop)` on their own thread, or
`run_once()`. The HTTP server and the CLI's `reconcile`/`suspend`/`resume`
reach it through `LoopControl` from other threads.

Triggers (a commit, a webhook, the drift interval, a request) go into a set:
any number that arrive while a pass runs coalesce into one next pass. After a
pass that ended in a temporary error, the next pass waits for the backoff
delay instead of the interval (a new trigger still starts one at once).
Suspension is kept in a file of the state directory, so it survives a restart:
a suspended lab is observed and reported, never written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from reconciler import redact
from reconciler.logs import fields
from reconciler.loop.backoff import Backoff
from reconciler.loop.events import LoopStatus, Outcome, PassListener, PassRecord, SourceInfo, Trigger
from reconciler.loop.passes import PassInterrupted, PassRunner
from reconciler.loop.report import resource_statuses

__all__ = ["Controller"]

log = logging.getLogger("reconciler.loop")

# When several triggers coalesce, the pass is named after the most telling one.
_PRECEDENCE = (Trigger.COMMIT, Trigger.WEBHOOK, Trigger.MANUAL, Trigger.START, Trigger.INTERVAL)


class Controller:
    """Runs passes one at a time; thread-safe for status, requests, suspend/resume and listeners."""

    def __init__(
        self,
        runner: PassRunner,
        *,
        source: SourceInfo,
        interval: float,
        suspend_file: Path | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.source = source
        self.interval = interval
        self.suspend_file = suspend_file
        self.backoff = backoff or Backoff()
        self.clock = clock
        self._cond = threading.Condition(threading.RLock())  # re-entrant: a signal handler may call stop()
        self._pending: set[Trigger] = set()
        self._stopping = threading.Event()
        self._suspended = suspend_file is not None and suspend_file.exists()
        self._busy = False
        self._due = clock()  # when the next interval (or retry) pass is due
        self._passes = 0
        self._last: PassRecord | None = None
        self._listeners: list[PassListener] = []

    # ---- LoopControl ----------------------------------------------------------------------

    def status(self) -> LoopStatus:
        with self._cond:
            runner, last = self.runner, self._last
            target = runner.last_good
            return LoopStatus(
                lab=target.lab.name if target is not None else "",
                source=self.source,
                suspended=self._suspended,
                busy=self._busy,
                head_revision=runner.head,
                applied_revision=target.revision if target is not None else None,
                attempted_revision=last.revision if last is not None else None,
                last_pass=last,
                resources=resource_statuses(target, runner.last_plan, last),
                gpus=runner.gpus,
                passes=self._passes,
                extra={
                    "interval": self.interval,
                    "next_pass_in": max(0.0, round(self._due - self.clock(), 3)),
                    "progress": runner.progress.to_json() if self._busy and runner.progress else None,
                },
            )

    def request_pass(self, trigger: Trigger, *, fetch: bool = False) -> None:
        """Queue a pass; a remote source is fetched before every pass, so `fetch` needs nothing more."""
        with self._cond:
            self._pending.add(trigger)
            self._cond.notify_all()

    def suspend(self) -> None:
        with self._cond:
            self._suspended = True
            if self.suspend_file is not None:
                self.suspend_file.parent.mkdir(parents=True, exist_ok=True)
                self.suspend_file.write_text("suspended by request\n", encoding="utf-8")
        log.info("loop suspended")

    def resume(self) -> None:
        with self._cond:
            self._suspended = False
            if self.suspend_file is not None:
                self.suspend_file.unlink(missing_ok=True)
        log.info("loop resumed")
        self.request_pass(Trigger.MANUAL)

    def subscribe(self, listener: PassListener) -> None:
        with self._cond:
            self._listeners.append(listener)

    # ---- running ------------------------------------------------------------------------------

    @property
    def suspended(self) -> bool:
        return self._suspended

    def stop(self) -> None:
        """Ask the loop to end: the pass in progress finishes its current step; no new pass starts."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run_once(self, trigger: Trigger = Trigger.START) -> PassRecord | None:
        """One pass now; None when a stop interrupted it (the journal keeps the run for the next start)."""
        with self._cond:
            self._busy = True
            number = self._passes + 1
            suspended = self._suspended
        try:
            record = self.runner.run(number, trigger, suspended=suspended, stopping=self._stopping.is_set)
        except PassInterrupted as stopped:
            log.info("pass interrupted", extra=fields(**{"pass": number}, detail=str(stopped)))
            return None
        except Exception as exc:  # a bug: the daemon reports it and keeps reconciling at the next trigger
            log.exception("pass failed unexpectedly", extra=fields(**{"pass": number}))
            self.runner.last_error = None
            message = redact.scrub(f"internal error: {exc!r}")  # it reaches /status, notifications, git notes
            record = PassRecord(number, trigger, self.runner.head, time.time(), 0.0, Outcome.ERROR, message=message)
        finally:
            with self._cond:
                self._busy = False
        self._finish(record)
        return record

    def serve(self, *, first: Trigger | None = Trigger.START) -> None:
        """Run passes until `stop()`: `first` at once (None: wait for the interval), then on triggers."""
        if first is not None:
            self.request_pass(first)
        while not self._stopping.is_set():
            trigger = self._next_trigger()
            if trigger is None:
                break
            self.run_once(trigger)

    def _next_trigger(self) -> Trigger | None:
        with self._cond:
            while not self._stopping.is_set():
                if self._pending:
                    chosen = next(t for t in _PRECEDENCE if t in self._pending)
                    self._pending.clear()
                    return chosen
                wait = self._due - self.clock()
                if wait <= 0:
                    return Trigger.INTERVAL
                self._cond.wait(timeout=wait)
        return None

    def _finish(self, record: PassRecord) -> None:
        with self._cond:
            self._passes = record.number
            self._last = record
            listeners = list(self._listeners)
            delay = None
            error = self.runner.last_error
            if record.outcome is Outcome.ERROR and error is not None:
                delay = self.backoff.delay_after(error)
            else:
                self.backoff.reset()
            self._due = self.clock() + (delay if delay is not None else self.interval)
        log.info("pass finished", extra=fields(**_pass_fields(record)))
        for listener in listeners:
            try:
                listener(record)
            except Exception:  # a watcher's bug must not stop reconciliation
                log.exception("pass listener failed", extra=fields(listener=repr(listener)))


def _pass_fields(record: PassRecord) -> dict[str, object]:
    """The "pass finished" event: what the terminal's pass line says, as fields (the JSON log's pass line)."""
    return {
        "pass": record.number,
        "trigger": str(record.trigger),
        "outcome": str(record.outcome),
        "revision": record.revision,
        "duration": round(record.duration, 3),
        "changes": list(record.changes),
        "drift": [
            {"address": d.address, "fields": list(d.fields), "policy": d.policy, "corrected": d.corrected}
            for d in record.drift
        ],
        "detail": record.message,  # `message` is the event's own key
        "diagnostics": list(record.diagnostics[:20]),
    }
