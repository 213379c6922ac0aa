"""The Proxmox VE backend: one object the engine observes and changes a PVE cluster through.

Who calls it: the engine's observe step (`ProxmoxBackend.observe`, reads only) and its apply step
(create, update, power and delete calls, each waiting for the PVE task it starts);
`engine.connect` builds it from `settings_from` (in `proxmox_settings`: the Lab's `proxmox`
connection and the environment; the secret never leaves them).

Where each part lives, so that each is found in a minute:

- `proxmox_settings`: settings and secrets;
- `proxmox_transport`: the only module that imports proxmoxer: the session, one call with its
  errors translated by HTTP status, retries (reading `retryable` and `delay` from the error), task
  waiting;
- `proxmox_reads`: `observe` and `observe_guest`;
- `proxmox_writes` and `proxmox_power`: create, clone, update, resize, move, delete; start,
  shutdown, stop, reboot. Every write is idempotent by a state check and retried as a whole on a
  retryable error; not retried: a stale digest (ConfigChanged: the caller re-plans), a task that
  failed (TaskFailed) or is still running after its timeout.
"""

from __future__ import annotations

from reconciler.backends.proxmox_reads import NVIDIA_VENDOR, ProxmoxReads
from reconciler.backends.proxmox_settings import (
    ENV_CA,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_URL,
    ENV_USER,
    ENV_VERIFY_TLS,
    ProxmoxSettings,
    settings_from,
)
from reconciler.backends.proxmox_transport import ConfigChanged, ProxmoxTransport
from reconciler.backends.proxmox_writes import ProxmoxWrites

__all__ = [
    "ENV_CA",
    "ENV_PASSWORD",
    "ENV_TOKEN",
    "ENV_URL",
    "ENV_USER",
    "ENV_VERIFY_TLS",
    "NVIDIA_VENDOR",
    "ConfigChanged",
    "ProxmoxBackend",
    "ProxmoxSettings",
    "settings_from",
]


class ProxmoxBackend(ProxmoxReads, ProxmoxWrites):
    """A connection to one PVE cluster. Thread-safe; create one per pass or keep one, and `close()` it.

    `workers` bounds the concurrent reads of `observe`; `read_attempts`,
    `write_attempts` and `backoff` (seconds, doubled per attempt, with jitter)
    govern the retries of reads and of whole writes;
    `task_timeout` is how long a task may run before TemporaryError.
    No I/O happens until the first call.
    """

    def __init__(
        self,
        settings: ProxmoxSettings,
        *,
        workers: int = 16,
        read_attempts: int = 4,
        write_attempts: int = 4,
        backoff: float = 0.5,
        task_timeout: float = 600.0,
        poll_interval: float = 0.2,
    ) -> None:
        self._workers = max(1, workers)
        self._pve = ProxmoxTransport(
            settings,
            pool_size=self._workers,
            read_attempts=read_attempts,
            write_attempts=write_attempts,
            backoff=backoff,
            task_timeout=task_timeout,
            poll_interval=poll_interval,
        )

    def __repr__(self) -> str:
        return f"ProxmoxBackend({self.settings.url!r}, user={self.settings.user!r})"

    def __enter__(self) -> ProxmoxBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def settings(self) -> ProxmoxSettings:
        return self._pve.settings

    def close(self) -> None:
        """Close the HTTP connections. The backend reconnects if used again."""
        self._pve.close()

    def wait_for_task(self, upid: str, *, resource: str, timeout: float | None = None) -> None:
        """Wait for a task someone else started (TaskFailed unless it ends OK or with warnings)."""
        self._pve.wait(upid, resource=resource, timeout=timeout)
