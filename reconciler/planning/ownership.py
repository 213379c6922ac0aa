"""What this lab may treat as its own, and the guard rails every plan is checked against. Pure.

Called by the planner (`make_plan`), so that `plan` shows exactly what `apply`
would refuse or leave alone.

Ownership identifies the lab: guests carry the lab's owner tag and containers
its `<owner>.managed` label, where the owner is `Lab.owner_tag` or, by default,
`reconciler-<lab name>` (two labs sharing a cluster no longer share a tag). A
resource the spec no longer names is deleted only when this lab can prove it
is its own: the journal's inventory lists it (a guest by vmid, a container by
address) and it still carries this lab's mark or the old default one
(`reconciler`, which every lab had before). A mark alone proves nothing (a
fresh state directory, another lab left at the same tag): anything that
carries a mark but is not listed is an orphan, a warning that is never
deleted, until `--adopt-orphans` takes it over. A guest or container the spec
names is this lab's when it carries the lab's mark, or the old mark and the
inventory lists it (it is then re-tagged or recreated with this lab's label).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from reconciler.planning import pve
from reconciler.planning.observed import GuestKind
from reconciler.planning.plan import Action, Backend, Change, Problem
from reconciler.spec.state import DesiredState

__all__ = ["LEGACY_OWNER", "Claim", "Marks", "Ownership", "guard_rails", "volumes_lost"]

LEGACY_OWNER = "reconciler"
"""The owner tag and label prefix every lab had by default before the default named the lab."""


class Claim(enum.Enum):
    MINE = "mine"  # provably this lab's
    ORPHAN = "orphan"  # carries an owner mark, but this lab cannot prove it made it
    FOREIGN = "foreign"  # carries no mark of this lab: never touched


@dataclass(frozen=True, slots=True)
class Marks:
    """The ownership marks a live resource carries."""

    ours: bool  # this lab's owner tag or label
    legacy: bool  # the old default `reconciler` tag or label (when this lab's owner is another)

    @property
    def any(self) -> bool:
        return self.ours or self.legacy


@dataclass(frozen=True)
class Ownership:
    owner: str
    adopt_orphans: bool = False

    def of_tags(self, tags: Iterable[str]) -> Marks:
        held = set(pve.normalise_tags(";".join(tags)))
        return Marks(self.owner in held, self.owner != LEGACY_OWNER and LEGACY_OWNER in held)

    def of_labels(self, labels: Mapping[str, str]) -> Marks:
        return Marks(
            labels.get(f"{self.owner}.managed") == "true",
            self.owner != LEGACY_OWNER and labels.get(f"{LEGACY_OWNER}.managed") == "true",
        )

    def claim(self, marks: Marks, *, recorded: bool) -> Claim:
        """Whether a live resource the spec does not name may be deleted (MINE), is an orphan, or is foreign."""
        if not marks.any:
            return Claim.FOREIGN
        if recorded or self.adopt_orphans:
            return Claim.MINE
        return Claim.ORPHAN

    def owns_named(self, marks: Marks, *, recorded: bool) -> bool:
        """Whether a live resource the spec names is this lab's to change."""
        return marks.ours or (marks.legacy and (recorded or self.adopt_orphans))

    def orphan(self, address: str, marks: Marks, *, named: bool = False) -> Problem:
        mark = f"this lab's owner mark {self.owner!r}" if marks.ours else f"the old default owner mark {LEGACY_OWNER!r}"
        if named:
            return Problem(
                address,
                f"exists and carries {mark}, but this lab's journal does not list it; it is not changed",
                "pass --adopt-orphans to take it over, set 'adopt: true' on it, "
                f"or set the Lab's owner_tag to {LEGACY_OWNER!r} to keep the old default",
            )
        return Problem(
            address,
            f"carries {mark} and is not in the spec, but this lab's journal does not list it: it is not deleted",
            "pass --adopt-orphans to take it over (it is then deleted, being no longer in the spec), "
            "or remove the mark from it",
        )


def volumes_lost(kind: GuestKind, config: Mapping[str, str]) -> tuple[str, ...]:
    """What destroying a guest loses: each storage volume, as `rootfs local-lvm:vm-955-disk-0 (64G)`."""
    return tuple(
        f"{key} {volume}" + (f" ({size})" if size else "") for key, volume, size in pve.guest_volumes(kind, config)
    )


def guard_rails(changes: Iterable[Change], desired: DesiredState, *, allow_delete: bool) -> list[Problem]:
    """`max_deletes` and `protect`, as blockers: `plan` shows what `apply` would refuse."""
    problems: list[Problem] = []
    lab = desired.lab
    destructive = [
        c.address
        for c in changes
        if c.action is Action.DELETE or (c.action is Action.REPLACE and c.backend is Backend.PROXMOX)
    ]
    if len(destructive) > lab.max_deletes and not allow_delete:
        problems.append(
            Problem(
                lab.ref,
                f"the plan deletes or recreates {len(destructive)} resources ({', '.join(destructive)}); "
                f"the lab allows {lab.max_deletes} (max_deletes)",
                "review the plan, then pass --allow-delete",
            )
        )
    for change in changes:
        resource = desired.find(change.resource)
        if resource is None or not resource.protect or change.backend is not Backend.PROXMOX:
            continue
        if change.action in (Action.DELETE, Action.REPLACE):
            problems.append(
                Problem(
                    change.resource,
                    f"{change.address} is protected and the plan would recreate it, destroying its volumes",
                    "undo the spec edit that forces the replacement, or remove 'protect: true' first",
                )
            )
    return problems
