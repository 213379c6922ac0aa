"""The project's error tree. Backends translate SDK errors into these at their boundary.

Every error says whether retrying can help, so the loop (not the pass) decides
what to do with it::

    ReconcilerError                 base; .retryable says if a later try may succeed, .delay how soon
    ├── SpecError                   the desired state is invalid (permanent until a new commit)
    ├── ConfigError                 connection settings or secrets are missing or wrong
    ├── BackendError                a backend call failed; .resource names what it touched
    │   ├── TemporaryError          retry later: timeouts, locks, dropped connections, 5xx
    │   ├── PermanentError          retrying the same call will fail the same way
    │   │   ├── NotFoundError       the object does not exist
    │   │   └── PermissionDenied    the credentials may not do this
    │   └── TaskFailed              a Proxmox task ended with an error
    ├── PlanError                   a saved plan cannot be used (stale, wrong version)
    └── StateError                  the state directory or its journal cannot be used (a person must look)

Who retries reads both: the Proxmox backend's own retry of one call
(`ProxmoxTransport._retried` in backends/proxmox_transport.py) and the loop's backoff between passes
(`loop.backoff.Backoff.delay_after`); `delay` is a lower bound on the wait.

Messages never carry secrets: callers pass resource names, never credentials, and
every error scrubs its message and hint of the secrets the process holds
(`reconciler.redact`) when it is made, whatever text a backend handed it.
"""

from __future__ import annotations

from reconciler import redact

__all__ = [
    "BackendError",
    "ConfigError",
    "NotFoundError",
    "PermanentError",
    "PermissionDenied",
    "PlanError",
    "ReconcilerError",
    "SpecError",
    "StateError",
    "TaskFailed",
    "TemporaryError",
]


class ReconcilerError(Exception):
    """Base of every error the project raises on purpose."""

    retryable: bool = False
    delay: float | None = None  # seconds to wait at least before retrying, when the cause says so

    def __init__(self, message: str, *, resource: str | None = None, hint: str | None = None) -> None:
        message = redact.scrub(message)
        super().__init__(message)
        self.message = message
        self.resource = redact.scrub(resource) if resource else resource
        self.hint = redact.scrub(hint) if hint else hint

    def __str__(self) -> str:
        text = f"{self.resource}: {self.message}" if self.resource else self.message
        return f"{text} ({self.hint})" if self.hint else text


class SpecError(ReconcilerError):
    """The spec tree is invalid; the diagnostics say where."""


class ConfigError(ReconcilerError):
    """A connection setting or secret is missing or malformed."""


class BackendError(ReconcilerError):
    """A call to Proxmox, Docker or NVML failed."""


class TemporaryError(BackendError):
    """Retrying later may succeed (timeout, lock, dropped connection, server error)."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        resource: str | None = None,
        hint: str | None = None,
        delay: float | None = None,
    ) -> None:
        super().__init__(message, resource=resource, hint=hint)
        if delay is not None:
            self.delay = delay


class PermanentError(BackendError):
    """Retrying the same call will fail the same way."""


class NotFoundError(PermanentError):
    """The object asked for does not exist."""


class PermissionDenied(PermanentError):
    """The credentials in use may not do this."""


class TaskFailed(BackendError):
    """A Proxmox task (UPID) ended with an error exit status."""

    def __init__(self, message: str, *, resource: str | None = None, upid: str | None = None) -> None:
        super().__init__(message, resource=resource)
        self.upid = upid


class PlanError(ReconcilerError):
    """A saved plan cannot be applied as it is."""


class StateError(ReconcilerError):
    """The state directory or its journal cannot be used: not a folder, not writable, not a journal.

    Permanent until a person fixes it; the message names the file and what to do. The journal is never
    deleted or replaced on its own: it is the record of what the reconciler owns.
    """
