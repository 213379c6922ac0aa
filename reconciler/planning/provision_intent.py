"""A provisioning change's content, typed: the step hashes recorded (`ProvisionSeen`) and what runs (`ProvisionIntent`).

Built by `planning.provision_plan` as a `provision/<guest>` change's `before` and `after`, run by
`engine.provision_apply`. The script text is never in them: the applier takes the scripts from the
same revision and checks each step's hash before it runs. JSON only at the plan-file and journal boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from reconciler.planning.provision import RunReason

if TYPE_CHECKING:
    from reconciler.planning.plan import JsonObject

__all__ = ["DueStep", "ProvisionIntent", "ProvisionSeen"]


@dataclass(frozen=True, slots=True)
class DueStep:
    """One step that runs: its key, where its script comes from, its hash, and why it runs."""

    step: str
    source: str  # `builtin:docker` or `script:provision/gpu.sh`
    hash: str
    reason: RunReason

    def to_json(self) -> JsonObject:
        return {"step": self.step, "source": self.source, "hash": self.hash, "reason": str(self.reason)}

    @classmethod
    def from_json(cls, data: object) -> DueStep:
        if not isinstance(data, Mapping):
            raise ValueError("a provisioning step is an object")
        return cls(_text(data["step"]), _text(data["source"]), _text(data["hash"]), RunReason(_text(data["reason"])))


@dataclass(frozen=True, slots=True)
class ProvisionIntent:
    """Where to connect and which steps run, with the inputs they read; `fresh`: the guest is new (or made
    again) in this plan, so every step runs and what was recorded for the old one is forgotten."""

    resource: str  # the spec resource, `Lxc/llm`
    ssh: str  # `user@host:port`, as the spec says
    steps: tuple[DueStep, ...]
    guest: str | None = None  # the guest's own change in the same plan, if any
    fresh: bool = False
    inputs: Mapping[str, str] = field(default_factory=dict)  # NVIDIA_DRIVER_VERSION=...
    timeouts: Mapping[str, float] = field(default_factory=dict)  # step -> seconds

    def to_json(self) -> JsonObject:
        return {
            "resource": self.resource,
            "ssh": self.ssh,
            "steps": [step.to_json() for step in self.steps],
            "guest": self.guest,
            "fresh": self.fresh,
            "inputs": dict(self.inputs),
            "timeouts": dict(self.timeouts),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ProvisionIntent:
        steps, fresh, guest = data.get("steps"), data.get("fresh", False), data.get("guest")
        if not isinstance(steps, list):
            raise ValueError("a provisioning change's steps are a list")
        if not isinstance(fresh, bool):
            raise ValueError("a provisioning change's fresh is true or false")
        timeouts = data.get("timeouts") or {}
        if not isinstance(timeouts, Mapping) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in timeouts.values()
        ):
            raise ValueError("a provisioning change's timeouts are numbers of seconds")
        return cls(
            resource=_text(data["resource"]),
            ssh=_text(data["ssh"]),
            steps=tuple(DueStep.from_json(item) for item in steps),
            guest=None if guest is None else _text(guest),
            fresh=fresh,
            inputs=_strings(data.get("inputs")),
            timeouts={str(k): float(v) for k, v in timeouts.items()},
        )


@dataclass(frozen=True, slots=True)
class ProvisionSeen:
    """The hashes the journal recorded for the guest's steps that succeeded, by step."""

    steps: Mapping[str, str]

    def to_json(self) -> JsonObject:
        return {"steps": dict(sorted(self.steps.items()))}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ProvisionSeen:
        return cls(_strings(data.get("steps")))


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {type(value).__name__}")
    return value


def _strings(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("expected an object of strings")
    return {str(k): v for k, v in value.items()}
