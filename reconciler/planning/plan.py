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
replace: it is moved with its data, in place (`GuestIntent.moves`).

A change's `before` and `after` are typed, frozen values: a guest's are
`planning.intents.GuestSeen` and `GuestIntent`, a container's
`planning.container_run.ContainerSeen` and `ContainerRun`, a GPU's settings
`planning.gpu_values.GpuValues`, a guest's provisioning `planning.provision_intent`'s
`ProvisionSeen` and `ProvisionIntent`. They become JSON only
in `to_json` / `from_json`, at the plan-file and journal boundary.

A saved plan (`plan --out`) carries its format, lab and revision; a plan of
another format is refused (`PlanFormatError`); `apply --plan` plans again and
executes only if the fresh plan equals the saved one in every field.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import assert_never, cast

from reconciler.planning.container_run import ContainerRun, ContainerSeen
from reconciler.planning.gpu_values import GpuValues
from reconciler.planning.intents import GuestIntent, GuestSeen
from reconciler.planning.provision_intent import ProvisionIntent, ProvisionSeen
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
    "JsonObject",
    "JsonValue",
    "Plan",
    "PlanFormatError",
    "Problem",
    "Timing",
    "fingerprint",
    "is_hidden",
]

PLAN_FORMAT = 3  # 2: `lab`, and `loses` on changes; 3: typed before/after (the JSON shape is unchanged)

JsonValue = str | int | float | bool | None | Sequence["JsonValue"] | Mapping[str, "JsonValue"]
JsonObject = dict[str, JsonValue]
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


def is_hidden(value: object) -> bool:
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
    """Who carries a change out: PVE for guests, a Docker engine for containers, NVML for GPU settings, SSH for
    what runs inside a guest."""

    PROXMOX = "proxmox"
    DOCKER = "docker"
    GPU = "gpu"
    SSH = "ssh"  # provisioning steps


class AddressKind(enum.StrEnum):
    LXC = "lxc"
    QEMU = "qemu"
    CONTAINER = "container"
    GPU = "gpu"  # `gpu/big`: a GPU's settings
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
            case AddressKind.LXC | AddressKind.QEMU | AddressKind.GPU | AddressKind.PROVISION:
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
            case AddressKind.GPU:
                return Backend.GPU
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
    before: JsonValue
    after: JsonValue
    timing: Timing = Timing.LIVE
    sensitive: bool = False

    def shown(self) -> tuple[JsonValue, JsonValue]:
        """(before, after) as they may be shown and saved: a sensitive field's values are stand-ins."""
        return self._shown(self.before), self._shown(self.after)

    def _shown(self, value: JsonValue) -> JsonValue:
        if not self.sensitive or value is None or is_hidden(value):
            return value
        return SENSITIVE

    def to_json(self) -> JsonObject:
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
    before: GuestSeen | ContainerSeen | GpuValues | ProvisionSeen | None
    after: GuestIntent | ContainerRun | GpuValues | ProvisionIntent | None
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

    def to_json(self) -> JsonObject:
        return {
            "address": self.address,
            "action": str(self.action),
            "resource": self.resource,
            "backend": str(self.backend),
            "before": self.before.to_json() if self.before is not None else None,
            "after": self.after.to_json() if self.after is not None else None,
            "fields": [f.to_json() for f in self.fields],
            "reason": self.reason,
            "depends_on": list(self.depends_on),
            "drift": self.drift,
            "loses": list(self.loses),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Change:
        """Read back from a plan file or a journal; a malformed one raises ValueError, KeyError or TypeError."""
        backend = Backend(_text(data["backend"]))
        fields = tuple(_field_from_json(_object(f)) for f in _array(data["fields"]))
        before, after = data["before"], data["after"]
        return cls(
            address=_text(data["address"]),
            action=Action(_text(data["action"])),
            resource=_text(data["resource"]),
            backend=backend,
            before=None if before is None else _seen_from_json(backend, _object(before)),
            after=None if after is None else _intent_from_json(backend, _object(after), [f.path for f in fields]),
            fields=fields,
            reason=_text(data["reason"]),
            depends_on=tuple(_text(item) for item in _array(data["depends_on"])),
            drift=_flag(data["drift"]),
            loses=tuple(_text(item) for item in _array(data.get("loses", []))),
        )


@dataclass(frozen=True, slots=True)
class Problem:
    """Something that stops an apply: a conflict or a blocker."""

    resource: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        return f"{self.resource}: {self.message}" + (f" ({self.hint})" if self.hint else "")

    def to_json(self) -> JsonObject:
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
    gpus: tuple[str, ...] = ()  # what each GPU will hold, declared or estimated (planning.gpuload)

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

    def to_json(self) -> JsonObject:
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
            "gpus": list(self.gpus),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Plan:
        """A saved plan read back. One of another format (an older reconciler's, or not a plan) is refused."""
        if data.get("format") != PLAN_FORMAT:
            raise PlanFormatError(data.get("format"))

        def problems(key: str) -> tuple[Problem, ...]:
            found = (_object(p) for p in _array(data.get(key, [])))
            return tuple(
                Problem(_text(p["resource"]), _text(p["message"]), _optional_text(p.get("hint"))) for p in found
            )

        return cls(
            changes=tuple(Change.from_json(_object(c)) for c in _array(data["changes"])),
            revision=_optional_text(data.get("revision")),
            conflicts=problems("conflicts"),
            blockers=problems("blockers"),
            warnings=problems("warnings"),
            observed_digest=_optional_text(data.get("observed_digest")),
            format=PLAN_FORMAT,
            lab=_optional_text(data.get("lab")),
            gpus=tuple(_text(line) for line in _array(data.get("gpus", []))),
        )


class PlanFormatError(ValueError):
    """A plan file of another format: an older reconciler's, or something else. Plans are not carried across."""

    def __init__(self, found: object) -> None:
        super().__init__(
            f"plan format {found!r} is not this reconciler's format {PLAN_FORMAT}: "
            "plans are not carried across versions; make one again with `reconciler plan --out`"
        )
        self.found = found


def _seen_from_json(
    backend: Backend, data: Mapping[str, object]
) -> GuestSeen | ContainerSeen | GpuValues | ProvisionSeen:
    match backend:
        case Backend.PROXMOX:
            return GuestSeen.from_json(data)
        case Backend.DOCKER:
            return ContainerSeen.from_json(data)
        case Backend.GPU:
            return GpuValues.from_json(data)
        case Backend.SSH:
            return ProvisionSeen.from_json(data)
        case _:
            assert_never(backend)


def _intent_from_json(
    backend: Backend, data: Mapping[str, object], paths: list[str]
) -> GuestIntent | ContainerRun | GpuValues | ProvisionIntent:
    match backend:
        case Backend.PROXMOX:
            return GuestIntent.from_json(data, paths=paths)
        case Backend.DOCKER:
            return ContainerRun.from_json(data)
        case Backend.GPU:
            return GpuValues.from_json(data)
        case Backend.SSH:
            return ProvisionIntent.from_json(data)
        case _:
            assert_never(backend)


def _field_from_json(data: Mapping[str, object]) -> FieldChange:
    # Values are whatever JSON holds: shown and compared, never acted on.
    before, after = cast(JsonValue, data["before"]), cast(JsonValue, data["after"])
    return FieldChange(_text(data["path"]), before, after, Timing(_text(data["timing"])), _flag(data["sensitive"]))


def _object(value: object) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected an object, got {type(value).__name__}")
    return value


def _array(value: object) -> list[object]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {type(value).__name__}")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {type(value).__name__}")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {type(value).__name__}")
    return value
