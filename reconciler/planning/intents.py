"""What a planned guest change asks PVE for, read once from the Change into a frozen, typed value.

The planner writes a guest's `Change.after` (its JSON, saved in plans and journals); the applier
reads it back here, so which keys a config PUT sends is decided in this one place, next to the
planner that wrote them: the keys a field change names (a grown volume's size goes through PVE's
resize call instead; a moved volume's own options are set after its move), plus the owner tag.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.planning.observed import GuestKind
from reconciler.planning.plan import Change

__all__ = ["GuestIntent"]


@dataclass(frozen=True, slots=True)
class GuestIntent:
    """A guest change as PVE calls: what to create or send, delete, grow and move, and the power asked for."""

    kind: GuestKind
    node: str
    vmid: int
    running: bool  # the power state the spec asks for
    config: Mapping[str, str] = field(default_factory=dict)  # the whole desired config (a create sends it all)
    send: Mapping[str, str] = field(default_factory=dict)  # what an update's config PUT sends
    delete: tuple[str, ...] = ()
    grow: Mapping[str, str] = field(default_factory=dict)  # volume -> size (PVE's resize call)
    moves: Mapping[str, str] = field(default_factory=dict)  # volume -> storage (moved with its data)

    @classmethod
    def of(cls, change: Change) -> GuestIntent:
        """The intent of a guest change: from `after`, or from `before` for a delete (which has no after)."""
        after, before = change.after or {}, change.before or {}
        side = after or before
        config = {str(k): str(v) for k, v in (after.get("config") or {}).items()}
        grow = {str(k): str(v) for k, v in (after.get("resize") or {}).items()}
        moves = {str(k): str(v) for k, v in (after.get("move") or {}).items()}
        keys = {key for f in change.fields if (key := _config_key(f.path, grow))} & set(config) - set(moves)
        send = {k: config[k] for k in sorted(keys)}
        if "tags" in {f.path for f in change.fields}:
            send["tags"] = config["tags"]
        return cls(
            kind=GuestKind(side["type"]),
            node=str(side["node"]),
            vmid=int(side["vmid"]),
            running=after.get("state") == "running",
            config=config,
            send=send,
            delete=tuple(str(k) for k in after.get("delete") or ()),
            grow=grow,
            moves=moves,
        )


def _config_key(path: str, grow: Mapping[str, str]) -> str | None:
    """The config key a field change is sent under; None for a size that PVE's resize call changes instead."""
    key, _, sub = path.partition(".")
    return None if key in grow and sub == "size" else key
