"""A guest change's content, typed: what the planner saw (`GuestSeen`) and what it asks PVE for (`GuestIntent`).

The planner builds both (`planning.plan_guests`) as a `Change`'s `before` and `after`; the applier
(`engine.steps_proxmox`) sends the intent as it is. Which keys a config PUT sends is decided here, in
`send_keys`, when the planner builds the intent: the keys a field change names (a grown volume's size
goes through PVE's resize call instead; a moved volume's own options are set after its move), plus
the owner tag. They become JSON only at the plan-file and journal boundary (`to_json` / `from_json`);
a saved intent's `send` is decided again by the same function from the saved field changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from reconciler.planning.observed import GuestKind
from reconciler.spec.models import PowerState

if TYPE_CHECKING:
    from reconciler.planning.plan import Change, JsonObject

__all__ = ["CloneIntent", "GuestIntent", "GuestSeen", "send_keys"]


@dataclass(frozen=True, slots=True)
class GuestSeen:
    """A live guest as its change needs it: where it is, its status, and (for an update) the config it had.

    A delete's `before` names the guest (`name`) and holds no config; an update's holds the digest and the
    live values of the keys the spec sets or removes, which a rollback restores.
    """

    kind: GuestKind
    node: str
    vmid: int
    status: str
    name: str | None = None
    digest: str | None = None
    config: Mapping[str, str] | None = None  # None: a delete's before

    @property
    def running(self) -> bool:
        return self.status == "running"

    def to_json(self) -> JsonObject:
        head: JsonObject = {"type": str(self.kind), "node": self.node, "vmid": self.vmid}
        if self.config is None:
            return {**head, "name": self.name, "status": self.status}
        return {**head, "status": self.status, "digest": self.digest, "config": dict(self.config)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> GuestSeen:
        config = data.get("config")
        return cls(
            kind=GuestKind(str(data["type"])),
            node=str(data["node"]),
            vmid=_int(data["vmid"]),
            status=str(data["status"]),
            name=_text_or_none(data.get("name")),
            digest=_text_or_none(data.get("digest")),
            config=_strings(config) if "config" in data else None,
        )


@dataclass(frozen=True, slots=True)
class GuestIntent:
    """A guest change as PVE calls: what to create or send, delete, grow and move, and the power asked for.

    `create` is True for a create or replace (its `config` is the whole create-time config); an update
    sends `send`, a subset of `config` decided by `send_keys`.
    """

    kind: GuestKind
    node: str
    vmid: int
    state: PowerState
    config: Mapping[str, str] = field(default_factory=dict)  # the desired config (a create sends it all)
    create: bool = False
    send: Mapping[str, str] = field(default_factory=dict)  # what an update's config PUT sends
    delete: tuple[str, ...] = ()
    grow: Mapping[str, str] = field(default_factory=dict)  # volume -> size (PVE's resize call)
    moves: Mapping[str, str] = field(default_factory=dict)  # volume -> storage (moved with its data)
    # A create's access (planning.guest_access): the template cloned, the sizes its disks are grown to,
    # and the password parameters, each as the name of the variable holding it (never its value).
    clone: CloneIntent | None = None
    disk_sizes: Mapping[str, str] = field(default_factory=dict)
    secret_params: Mapping[str, str] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        """Whether the spec asks for the guest to run."""
        return self.state is PowerState.RUNNING

    @classmethod
    def of(cls, change: Change) -> GuestIntent:
        """The intent of a guest change; for a delete (which has no after), where its `before` is."""
        if isinstance(change.after, GuestIntent):
            return change.after
        seen = change.before
        assert isinstance(seen, GuestSeen), "a guest change has a guest before or after"
        return cls(seen.kind, seen.node, seen.vmid, PowerState.STOPPED)

    def to_json(self) -> JsonObject:
        data: JsonObject = {
            "type": str(self.kind),
            "node": self.node,
            "vmid": self.vmid,
            "state": str(self.state),
            "config": dict(sorted(self.config.items())),
        }
        if self.create:
            if self.clone is not None:
                data["clone"] = self.clone.to_json()
                data["disk_sizes"] = dict(self.disk_sizes)
            if self.secret_params:
                data["secret_params"] = dict(self.secret_params)
            return data
        data["delete"] = list(self.delete)
        if self.grow:
            data["resize"] = dict(self.grow)
        if self.moves:
            data["move"] = dict(self.moves)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, object], *, paths: Iterable[str]) -> GuestIntent:
        """Read back from a plan file or journal; `paths` are the change's field paths (they decide `send`)."""
        config = _strings(data.get("config"))
        grow = _strings(data.get("resize"))
        moves = _strings(data.get("move"))
        deletes = data.get("delete")
        if deletes is not None and not isinstance(deletes, list):
            raise ValueError("a guest intent's delete is a list")
        return cls(
            kind=GuestKind(str(data["type"])),
            node=str(data["node"]),
            vmid=_int(data["vmid"]),
            state=PowerState(str(data["state"])),
            config=config,
            create=deletes is None,
            send=send_keys(paths, config, grow=grow, moves=moves) if deletes is not None else {},
            delete=tuple(str(k) for k in deletes or ()),
            grow=grow,
            moves=moves,
            clone=CloneIntent.from_json(data["clone"]) if data.get("clone") is not None else None,
            disk_sizes=_strings(data.get("disk_sizes")),
            secret_params=_strings(data.get("secret_params")),
        )


@dataclass(frozen=True, slots=True)
class CloneIntent:
    """The template a VM is cloned from, as the spec names it (VMID or name), resolved when applied."""

    template: int | str
    node: str | None
    full: bool
    storage: str | None

    def to_json(self) -> JsonObject:
        return {"template": self.template, "node": self.node, "full": self.full, "storage": self.storage}

    @classmethod
    def from_json(cls, data: object) -> CloneIntent:
        if not isinstance(data, Mapping):
            raise ValueError("a clone is an object")
        template, full = data.get("template"), data.get("full", True)
        if isinstance(template, bool) or not isinstance(template, int | str):
            raise ValueError(f"a clone's template is a VMID or a name, got {template!r}")
        if not isinstance(full, bool):
            raise ValueError("a clone's full is true or false")
        return cls(template, _text_or_none(data.get("node")), full, _text_or_none(data.get("storage")))


def send_keys(
    paths: Iterable[str], config: Mapping[str, str], *, grow: Mapping[str, str], moves: Mapping[str, str]
) -> dict[str, str]:
    """What an update's config PUT sends: the keys its field changes name, minus what resize and move do.

    A grown volume's size goes through PVE's resize call; a moved volume's own options are set after the
    move, over its new id. The owner tag is sent when the tags change (an adopted guest gets it).
    """
    paths = list(paths)
    keys = {key for path in paths if (key := _config_key(path, grow))} & set(config) - set(moves)
    send = {k: config[k] for k in sorted(keys)}
    if "tags" in paths and "tags" in config:
        send["tags"] = config["tags"]
    return send


def _config_key(path: str, grow: Mapping[str, str]) -> str | None:
    """The config key a field change is sent under; None for a size that PVE's resize call changes instead."""
    key, _, sub = path.partition(".")
    return None if key in grow and sub == "size" else key


def _strings(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("expected an object of strings")
    return {str(k): str(v) for k, v in value.items()}


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)
