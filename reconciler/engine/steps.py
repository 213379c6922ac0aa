"""What the applier and its per-backend steps share: how long to wait, an applied step, a container's address.

`engine.apply.Applier` sequences, journals and rolls back; the steps of each backend
(`engine.steps_proxmox`, `engine.steps_docker`) do, undo and check one change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler.planning.plan import Change

__all__ = ["Done", "HealthPolicy", "host_and_name"]


@dataclass(frozen=True)
class HealthPolicy:
    """How long to wait. `max_timeout` caps every probe (tests and impatient people)."""

    guest_timeout: float = 300.0
    container_start_timeout: float = 60.0
    shutdown_timeout: float = 120.0
    max_timeout: float | None = None
    interval: float | None = None

    def cap(self, timeout: float) -> float:
        return min(timeout, self.max_timeout) if self.max_timeout is not None else timeout


@dataclass
class Done:
    """An applied step, with what its undo needs."""

    change: Change
    before: dict[str, Any] | None
    step_id: int | None = None
    failed: bool = False  # the step itself failed: its journal entry keeps saying so (and why)
    inherited: bool = False  # taken over from an interrupted run: how far it got is not known


def host_and_name(change: Change) -> tuple[str, str]:
    where = change.where
    assert where.host is not None, "a Docker change has a container address"
    return where.host, where.name
