"""The Plan: what a pass would change, and why. One object is printed, saved as JSON and executed.

A Plan is a list of Changes in execution order. Each Change has one Action,
the state before and after (as the backend sees it, secrets replaced by
references), the per-field differences, and a reason for people (never used
for decisions). A Plan never holds a secret value, so printing, saving and
journaling it cannot leak one: a secret env var is a reference to the
variable that holds it, a live value known to be secret is SENSITIVE, and a
live value the spec does not declare is a fingerprint (see `fingerprint`).
Conflicts and blockers are problems that stop an apply: a conflict is a
resource the spec names but the reconciler does not own; a blocker is
something the planner could not decide (an unresolvable GPU, an unreachable
Docker host).

Actions:
    create          the resource does not exist; make it (and start it if it should run)
    update          change settings in place; applies live
    update-restart  change settings that take effect only after a restart (a VM's hostpciN, cores)
    replace         cannot change in place: remove and recreate (a container's image; an LXC's template)
    delete          owned, running or not, and no longer in the spec
    start / stop    only the power state differs

A guest's replace or delete destroys its volumes: `Change.loses` names each
(key, volume, size), the plan says their data is lost, and both count against
the Lab's `max_deletes`. A volume asked for on another storage is not a
replace: it is moved with its data, in place (`after["move"]`).

A saved plan (`plan --out`) carries its format, lab and revision; `apply
--plan` plans again and executes only if the fresh plan equals the saved one
in every field.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, assert_never

from reconciler.spec.models import Lxc, Resource, Vm, Workload

__all__ = [
    "PLAN_FORMAT",
    "SENSITIVE",
    "Action",
    "Address",
    "AddressKind",
    "Backend",
    "Change",
    "FieldChange",
    "Plan",
    "Problem",
    "Timing",
    "fingerprint",
    "is_hidden",
]

PLAN_FORMAT = 2  # 2: `lab`, and `loses` on changes
SENSITIVE = "(sensitive)"
_FINGERPRINT_ROUNDS = 20_000  # slow enough that a short secret cannot be guessed from its fingerprint cheaply


def fingerprint(value: str, *, salt: str) -> str:
    """A live value the spec does not declare, as it may be shown: `(sensitive, fingerprint 1a2b3c4d)`.

    The same value gives the same text in every plan, so a person sees whether it changed; the text
    tells nothing of the value. Salted by where the value lives (a container and key), and slow (PBKDF2),
    so a fingerprint cannot be matched against a list of likely secrets cheaply; 32 bits are shown.
    """
    digest = hashlib.pbkdf2_hmac("sha256", value.encode(), salt.encode(), _FINGERPRINT_ROUNDS)
    return f"{SENSITIVE[:-1]}, fingerprint {digest[:4].hex()})"


def is_hidden(value: Any) -> bool:
    """Whether a value is already a stand-in for a secret (SENSITIVE or a fingerprint)."""
    return isinstance(value, str) and value.startswith(SENSITIVE[:-1]) and value.endswith(")")


class Action(enum.StrEnum):
    CREATE = "create"
    UPDATE = "update"
    UPDATE_RESTART = "update-restart"
    REPLACE = "replace"
    DELETE = "delete"
    START = "start"
    STOP = "stop"


class Backend(enum.StrEnum):
    """Who carries a change out: PVE for guests, a Docker engine for containers, SSH for what runs inside a guest."""

    PROXMOX = "proxmox"
    DOCKER = "docker"
    SSH = "ssh"  # provisioning steps (issue 11)


class AddressKind(enum.StrEnum):
    LXC = "lxc"
    QEMU = "qemu"
    CONTAINER = "container"
    PROVISION = "provision"  # `provision/llm`: the provisioning steps run in guest or Docker host `llm`


@dataclass(frozen=True, slots=True)
class Address:
    """A change's address, parsed: `lxc/llm`, `qemu/win`, `container/llm/qwen-7b` (host, then name).

    A guest deleted without a name in the spec is addressed by vmid (`lxc/955`): `name` is then the vmid.
    """

    kind: AddressKind
    name: str
    host: str | None = None  # the Docker host of a container

    @classmethod
    def parse(cls, text: str) -> Address:
        head, _, rest = text.partition("/")
        kind = AddressKind(head)
        match kind:
            case AddressKind.CONTAINER:
                host, slash, name = rest.partition("/")
                if not slash or not host or not name:
                    raise ValueError(f"not a container address: {text!r}")
                return cls(kind, name, host)
            case AddressKind.LXC | AddressKind.QEMU | AddressKind.PROVISION:
                if not rest:
                    raise ValueError(f"not a guest address: {text!r}")
                return cls(kind, rest)
            case _:
                assert_never(kind)

    @classmethod
    def of(cls, resource: Resource) -> Address | None:
        """Where a spec resource lives once applied; None for what is not a guest or container (a Gpu...)."""
        if isinstance(resource, Lxc):
            return cls(AddressKind.LXC, resource.name)
        if isinstance(resource, Vm):
            return cls(AddressKind.QEMU, resource.name)
        if isinstance(resource, Workload):
            return cls(AddressKind.CONTAINER, resource.name, resource.host)
        return None

    @property
    def backend(self) -> Backend:
        match self.kind:
            case AddressKind.CONTAINER:
                return Backend.DOCKER
            case AddressKind.PROVISION:
                return Backend.SSH
            case AddressKind.LXC | AddressKind.QEMU:
                return Backend.PROXMOX
            case _:
                assert_never(self.kind)

    def __str__(self) -> str:
        return f"{self.kind}/{self.host}/{self.name}" if self.host is not None else f"{self.kind}/{self.name}"


class Timing(enum.StrEnum):
    """When a field change takes effect."""

    LIVE = "live"  # at once
    RESTART = "restart"  # after the guest or container restarts
    REPLACE = "replace"  # only by recreating the resource


@dataclass(frozen=True, slots=True)
class FieldChange:
    path: str  # "memory", "net0.bridge", "env.HF_TOKEN"
    before: Any
    after: Any
    timing: Timing = Timing.LIVE
    sensitive: bool = False

    def shown(self) -> tuple[Any, Any]:
        """(before, after) as they may be shown and saved: a sensitive field's values are stand-ins."""
        return self._shown(self.before), self._shown(self.after)

    def _shown(self, value: Any) -> Any:
        if not self.sensitive or value is None or is_hidden(value):
            return value
        return SENSITIVE

    def to_json(self) -> dict[str, Any]:
        before, after = self.shown()
        return {
            "path": self.path,
            "before": before,
            "after": after,
            "timing": str(self.timing),
            "sensitive": self.sensitive,
        }


@dataclass(frozen=True, slots=True)
class Change:
    """One step of a plan. `address` names it (lxc/llm, container/llm/qwen-7b)."""

    address: str
    action: Action
    resource: str  # the spec resource it comes from: "Lxc/llm"; for deletes of unlisted things, the address
    backend: Backend
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    fields: tuple[FieldChange, ...] = ()
    reason: str = ""
    depends_on: tuple[str, ...] = ()
    drift: bool = False  # the live state moved away from an unchanged spec
    loses: tuple[str, ...] = ()  # what the change destroys for good: a guest's volumes, with their data

    @property
    def where(self) -> Address:
        """The address, parsed."""
        return Address.parse(self.address)

    @property
    def needs_restart(self) -> bool:
        return self.action is Action.UPDATE_RESTART

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "action": str(self.action),
            "resource": self.resource,
            "backend": str(self.backend),
            "before": _jsonable(self.before),
            "after": _jsonable(self.after),
            "fields": [f.to_json() for f in self.fields],
            "reason": self.reason,
            "depends_on": list(self.depends_on),
            "drift": self.drift,
            "loses": list(self.loses),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Change:
        return cls(
            address=data["address"],
            action=Action(data["action"]),
            resource=data["resource"],
            backend=Backend(data["backend"]),
            before=data["before"],
            after=data["after"],
            fields=tuple(
                FieldChange(f["path"], f["before"], f["after"], Timing(f["timing"]), f["sensitive"])
                for f in data["fields"]
            ),
            reason=data["reason"],
            depends_on=tuple(data["depends_on"]),
            drift=data["drift"],
            loses=tuple(str(item) for item in data.get("loses", ())),
        )


@dataclass(frozen=True, slots=True)
class Problem:
    """Something that stops an apply: a conflict or a blocker."""

    resource: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        return f"{self.resource}: {self.message}" + (f" ({self.hint})" if self.hint else "")

    def to_json(self) -> dict[str, Any]:
        return {"resource": self.resource, "message": self.message, "hint": self.hint}


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]
    revision: str | None = None
    conflicts: tuple[Problem, ...] = ()
    blockers: tuple[Problem, ...] = ()
    warnings: tuple[Problem, ...] = ()
    observed_digest: str | None = None  # fingerprint of what was observed, to refuse a stale saved plan
    format: int = field(default=PLAN_FORMAT)
    lab: str | None = None  # the Lab's name: a saved plan applies to this lab only
    # Drift left alone by a `warn` or `ignore` policy, for the loop's drift report. Not executed, not
    # serialised: a saved plan carries only what it would do.
    held_drift: tuple[Change, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.changes

    @property
    def applicable(self) -> bool:
        return not self.conflicts and not self.blockers

    def counts(self) -> Counter[Action]:
        return Counter(change.action for change in self.changes)

    def summary(self) -> str:
        """`Plan: 2 to create, 1 to change (1 needs restart), 0 to delete.` as Terraform says it."""
        if self.empty and not self.applicable:
            problems = [str(p) for p in (*self.conflicts, *self.blockers)]
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            return "Blocked, nothing will change: " + "; ".join(problems[:3]) + more
        if self.empty:
            return "No changes. The live state matches the spec."
        counts = self.counts()
        change = counts[Action.UPDATE] + counts[Action.UPDATE_RESTART]
        restart = f" ({counts[Action.UPDATE_RESTART]} needs restart)" if counts[Action.UPDATE_RESTART] else ""
        parts = [f"{counts[Action.CREATE]} to create", f"{change} to change{restart}"]
        if counts[Action.REPLACE]:
            parts.append(f"{counts[Action.REPLACE]} to replace")
        parts.append(f"{counts[Action.DELETE]} to delete")
        power = [f"{counts[a]} to {a}" for a in (Action.START, Action.STOP) if counts[a]]
        return "Plan: " + ", ".join(parts + power) + "."

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "lab": self.lab,
            "revision": self.revision,
            "observed_digest": self.observed_digest,
            "summary": self.summary(),
            "changes": [c.to_json() for c in self.changes],
            "conflicts": [p.to_json() for p in self.conflicts],
            "blockers": [p.to_json() for p in self.blockers],
            "warnings": [p.to_json() for p in self.warnings],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        def problems(key: str) -> tuple[Problem, ...]:
            return tuple(Problem(p["resource"], p["message"], p.get("hint")) for p in data.get(key, ()))

        return cls(
            changes=tuple(Change.from_json(c) for c in data["changes"]),
            revision=data.get("revision"),
            conflicts=problems("conflicts"),
            blockers=problems("blockers"),
            warnings=problems("warnings"),
            observed_digest=data.get("observed_digest"),
            format=data.get("format", PLAN_FORMAT),
            lab=data.get("lab"),
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    if isinstance(value, enum.Enum):
        return value.value
    return value
