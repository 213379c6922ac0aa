"""An in-memory `LoopControl` for the server and notifier tests: a real implementation of the seam.

It keeps what it was asked as state (requested passes, suspended) and, like the real loop, calls
its listeners on the caller's thread when a pass finishes (`finish_pass`). The real loop is wired
to the server by `reconciler run`; these tests need only the contract.
"""

from __future__ import annotations

import dataclasses
import threading

from reconciler.loop.events import (
    DriftReport,
    GpuStatus,
    LoopStatus,
    Outcome,
    PassListener,
    PassRecord,
    ResourceStatus,
    SourceInfo,
    Trigger,
)

__all__ = ["LoopDouble", "record"]


def record(
    number: int = 1,
    *,
    outcome: Outcome = Outcome.APPLIED,
    revision: str | None = "a" * 40,
    changes: tuple[str, ...] = ("update lxc/llm",),
    drift: tuple[DriftReport, ...] = (),
    message: str = "",
    duration: float = 1.5,
    trigger: Trigger = Trigger.COMMIT,
) -> PassRecord:
    return PassRecord(
        number=number,
        trigger=trigger,
        revision=revision,
        started=1_780_000_000.0 + number,
        duration=duration,
        outcome=outcome,
        changes=changes,
        drift=drift,
        message=message,
    )


class LoopDouble:
    """A loop that never runs a pass by itself: tests finish passes with `finish_pass`."""

    def __init__(self, *, lab: str = "homelab", branch: str = "main", gpus: tuple[GpuStatus, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._status = LoopStatus(
            lab=lab,
            source=SourceInfo(repository="/srv/lab.git", branch=branch, path="specs"),
            suspended=False,
            busy=False,
            gpus=gpus,
        )
        self.requests: list[tuple[Trigger, bool]] = []
        self.listeners: list[PassListener] = []
        self.fail_status = False  # status() raises, as a loop that is wedged might

    def status(self) -> LoopStatus:
        if self.fail_status:
            raise RuntimeError("status unavailable")
        with self._lock:
            return self._status

    def request_pass(self, trigger: Trigger, *, fetch: bool = False) -> None:
        with self._lock:
            self.requests.append((trigger, fetch))

    def suspend(self) -> None:
        self._update(suspended=True)

    def resume(self) -> None:
        self._update(suspended=False)

    def subscribe(self, listener: PassListener) -> None:
        with self._lock:
            self.listeners.append(listener)

    def set_status(self, **changes: object) -> None:
        self._update(**changes)

    def finish_pass(self, finished: PassRecord, *, resources: tuple[ResourceStatus, ...] = ()) -> None:
        """Record a pass as the loop does, call every listener, and return when they all returned."""
        applied = finished.revision if finished.outcome is Outcome.APPLIED else self._status.applied_revision
        self._update(
            last_pass=finished,
            passes=self._status.passes + 1,
            attempted_revision=finished.revision,
            applied_revision=applied,
            head_revision=finished.revision,
            resources=resources or self._status.resources,
        )
        with self._lock:
            listeners = list(self.listeners)
        for listener in listeners:
            listener(finished)

    def _update(self, **changes: object) -> None:
        with self._lock:
            self._status = dataclasses.replace(self._status, **changes)  # type: ignore[arg-type]
