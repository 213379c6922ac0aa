"""What the loop tells its watchers: one record per pass, a status snapshot, and the control seam.

The loop owns these values; the HTTP server, the Prometheus collector and the notifiers only read
them. `LoopControl` is the whole contract between the loop and the server: a snapshot, a request
for a pass (coalesced with any already queued), suspend and resume, and a listener per finished pass.
Listeners run on the loop's thread, so they must return quickly (notifiers hand off to their own
bounded worker).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

__all__ = [
    "DriftReport",
    "GpuStatus",
    "LoopControl",
    "LoopStatus",
    "Outcome",
    "PassListener",
    "PassRecord",
    "ResourceStatus",
    "SourceInfo",
    "Trigger",
]


class Trigger(enum.StrEnum):
    """Why a pass ran. Triggers that arrive during a pass coalesce into one next pass."""

    START = "start"  # the daemon started (or `run --once`)
    COMMIT = "commit"  # the watched branch moved
    WEBHOOK = "webhook"  # a verified push event
    INTERVAL = "interval"  # the drift interval elapsed
    MANUAL = "manual"  # "reconcile now" from the CLI or the API


class Outcome(enum.StrEnum):
    """How a pass ended."""

    NO_CHANGES = "no-changes"  # the lab matched the spec (drift under `warn`/`ignore` aside)
    APPLIED = "applied"  # changes applied and healthy
    ROLLED_BACK = "rolled-back"  # a step or health check failed; every step was undone
    ROLLBACK_INCOMPLETE = "rollback-incomplete"  # a failure whose undo did not complete: a person must look
    INVALID = "invalid"  # the revision has spec errors; the last good revision stays in force
    REFUSED = "refused"  # blockers, guard rails, or a revision that failed before: waits for a new commit
    SUSPENDED = "suspended"  # observed and reported only; nothing written
    ERROR = "error"  # a temporary error (unreachable API, lock); retried with backoff


@dataclass(frozen=True, slots=True)
class DriftReport:
    """A difference between the live lab and the applied revision that nobody committed."""

    address: str  # lxc/llm, container/llm/vllm-qwen
    fields: tuple[str, ...]  # memory, env.HF_HOME
    policy: str  # correct | warn | ignore
    corrected: bool


@dataclass(frozen=True, slots=True)
class PassRecord:
    """One finished pass, as logged, served on /status, counted in /metrics and notified."""

    number: int
    trigger: Trigger
    revision: str | None
    started: float  # seconds since the epoch
    duration: float  # seconds
    outcome: Outcome
    changes: tuple[str, ...] = ()  # "update lxc/llm", in plan order
    drift: tuple[DriftReport, ...] = ()
    message: str = ""  # the failure, the refusal or the first diagnostic; never a secret
    diagnostics: tuple[str, ...] = ()  # spec errors of an invalid revision, one line each
    # The revision the lab was held to in this pass: `revision` itself, or the last good one when
    # `revision` was rejected (invalid, unsigned, failed before) and drift was corrected against that.
    reconciled_revision: str | None = None


@dataclass(frozen=True, slots=True)
class ResourceStatus:
    address: str
    state: str  # in-sync | drifted | changing | failed
    detail: str = ""


@dataclass(frozen=True, slots=True)
class GpuStatus:
    """One GPU as NVML reads it. None where the reading is not available."""

    name: str
    uuid: str | None
    memory_used: int | None = None  # bytes
    memory_total: int | None = None  # bytes
    utilization: float | None = None  # percent
    temperature: float | None = None  # degrees Celsius
    power: float | None = None  # watts


@dataclass(frozen=True, slots=True)
class SourceInfo:
    repository: str  # a local path or a URL with any credentials removed
    branch: str
    path: str  # the spec tree inside the repository


@dataclass(frozen=True, slots=True)
class LoopStatus:
    lab: str
    source: SourceInfo
    suspended: bool
    busy: bool  # a pass is running now
    head_revision: str | None = None  # the branch's commit as last seen
    applied_revision: str | None = None  # the last revision applied and healthy
    attempted_revision: str | None = None  # the last revision a pass tried
    last_pass: PassRecord | None = None
    resources: tuple[ResourceStatus, ...] = ()
    gpus: tuple[GpuStatus, ...] = ()
    passes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # interval (s), next_pass_in (s: the interval or a retry)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PassListener = Callable[[PassRecord], None]


class LoopControl(Protocol):
    """What the server (and the CLI's `reconcile`, `suspend`, `resume`) may ask of a running loop."""

    def status(self) -> LoopStatus: ...

    def request_pass(self, trigger: Trigger, *, fetch: bool = False) -> None:
        """Queue a pass (coalesced); with `fetch`, fetch the remote first (a webhook)."""
        ...

    def suspend(self) -> None: ...

    def resume(self) -> None: ...

    def subscribe(self, listener: PassListener) -> None: ...
