"""Provisioning steps as the plan sees them: what each runs, its content hash, and which must run now.

Pure: no I/O. Who calls it: the planner, with the spec's `provision:` list, the attached files
(`DesiredState.files`), the built-in scripts (`reconciler.provision.builtin_scripts()`, read by the
engine), the observed inputs (the host's NVIDIA driver version) and the hashes the journal recorded
for the guest; the provisioning engine runs the `PlannedStep`s it returns.

A step's hash covers what decides its effect: its script's bytes, the built-in's version, its inputs
(`NVIDIA_DRIVER_VERSION=580.105.08`) and its `creates`/`unless` check. A step runs when no success
is recorded for it or its recorded hash differs: a changed script runs that step again, and only that
step; an unchanged guest runs nothing. A guest created by this plan has no record, so all its steps run.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from reconciler.spec.access import BuiltinStep, ProvisionStep, SshTarget
from reconciler.spec.access_checks import ssh_target_of
from reconciler.spec.models import DockerHost, Lxc, Vm

__all__ = [
    "DRIVER_VERSION_INPUT",
    "BuiltinScript",
    "PlannedStep",
    "ProvisionChange",
    "RunReason",
    "StepInputMissing",
    "plan_provisioning",
    "plan_steps",
    "step_hash",
    "steps_to_run",
]

DRIVER_VERSION_INPUT: Final = "NVIDIA_DRIVER_VERSION"
_DRIVER_VERSION: Final = re.compile(r"^\d{1,4}(\.\d{1,4}){1,3}$")
_INPUTS: Final[Mapping[BuiltinStep, tuple[str, ...]]] = {
    BuiltinStep.DOCKER: (),
    BuiltinStep.NVIDIA_CONTAINER_TOOLKIT: (),
    BuiltinStep.NVIDIA_USERSPACE: (DRIVER_VERSION_INPUT,),
}


@dataclass(frozen=True, slots=True)
class BuiltinScript:
    step: BuiltinStep
    version: str
    content: bytes = field(repr=False)


class StepInputMissing(ValueError):
    """A built-in step needs an input the observation did not give (no NVML driver version on the host)."""


@dataclass(frozen=True, slots=True)
class PlannedStep:
    """One step to run in a guest, with everything that decides its effect."""

    key: str  # its identity in the journal (unique per guest)
    source: str  # `builtin:docker` or `script:provision/gpu.sh`, for the plan and the journal
    script: bytes = field(repr=False)
    inputs: Mapping[str, str]  # environment variables the script reads
    creates: str | None
    unless: str | None
    timeout: float
    hash: str


def step_hash(
    script: bytes, *, version: str | None, inputs: Mapping[str, str], creates: str | None, unless: str | None
) -> str:
    """A step's content hash: script bytes, built-in version, inputs and check, in one canonical form."""
    body = {
        "script": hashlib.sha256(script).hexdigest(),
        "version": version,
        "inputs": dict(sorted(inputs.items())),
        "creates": creates,
        "unless": unless,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _builtin_inputs(step: BuiltinStep, observed: Mapping[str, str]) -> dict[str, str]:
    inputs: dict[str, str] = {}
    for name in _INPUTS[step]:
        value = observed.get(name)
        if value is None:
            raise StepInputMissing(f"{step.value} needs the host's {name}, and the host's NVML did not report one")
        if name == DRIVER_VERSION_INPUT and not _DRIVER_VERSION.fullmatch(value):
            raise StepInputMissing(f"{step.value}: the host reports driver version {value!r}, which is not one")
        inputs[name] = value
    return inputs


def plan_steps(
    steps: Sequence[ProvisionStep],
    *,
    files: Mapping[str, bytes],
    builtins: Mapping[BuiltinStep, BuiltinScript],
    observed: Mapping[str, str],
) -> tuple[PlannedStep, ...]:
    """The steps a guest declares, each with its script, inputs and hash, in the declared order.

    `files` holds the scripts the spec names (the loader checked they are there), `observed` the
    inputs built-in steps read (`NVIDIA_DRIVER_VERSION`). Raises StepInputMissing for an input that
    is not there: the plan cannot say what that step would install.
    """
    planned: list[PlannedStep] = []
    for step in steps:
        if step.builtin is not None:
            builtin = builtins[step.builtin]
            script, version, source = builtin.content, builtin.version, f"builtin:{step.builtin.value}"
            inputs = _builtin_inputs(step.builtin, observed)
        else:
            assert step.script is not None
            script, version, source, inputs = files[step.script], None, f"script:{step.script}", {}
        digest = step_hash(script, version=version, inputs=inputs, creates=step.creates, unless=step.unless)
        planned.append(
            PlannedStep(
                step.key, source, script, MappingProxyType(inputs), step.creates, step.unless, step.timeout, digest
            )
        )
    return tuple(planned)


class RunReason(enum.StrEnum):
    """Why a step is in the plan (for the plan's text; the decision is the hash)."""

    NEW = "new"  # never succeeded in this guest (or the guest is new)
    CHANGED = "changed"  # its script, version, inputs or check changed since it last succeeded


def steps_to_run(
    steps: Sequence[PlannedStep], recorded: Mapping[str, str]
) -> tuple[tuple[PlannedStep, RunReason], ...]:
    """The steps whose hash differs from the one recorded at their last success, in order, with why."""
    due: list[tuple[PlannedStep, RunReason]] = []
    for step in steps:
        before = recorded.get(step.key)
        if before is None:
            due.append((step, RunReason.NEW))
        elif before != step.hash:
            due.append((step, RunReason.CHANGED))
    return tuple(due)


@dataclass(frozen=True, slots=True)
class ProvisionChange:
    """What a plan says about one guest's provisioning: where to connect and which steps run, and why."""

    ref: str  # the spec resource, `Lxc/llm`
    target: SshTarget
    due: tuple[tuple[PlannedStep, RunReason], ...]

    def describe(self) -> dict[str, object]:
        """The change as the plan's JSON shows it: no script text, no input that is not in the spec's hash."""
        return {
            "resource": self.ref,
            "ssh": str(self.target),
            "steps": [
                {"step": step.key, "source": step.source, "hash": step.hash, "reason": reason.value}
                for step, reason in self.due
            ],
        }


def plan_provisioning(
    resource: Lxc | Vm | DockerHost,
    *,
    files: Mapping[str, bytes],
    builtins: Mapping[BuiltinStep, BuiltinScript],
    observed: Mapping[str, str],
    recorded: Mapping[str, str],
) -> ProvisionChange | None:
    """The provisioning change for `resource`, or None when it declares no steps or none is due.

    `recorded` is the journal's `provision_hashes` for the guest: empty for a guest this plan
    creates (or recreates), so that every step runs. Raises StepInputMissing (see `plan_steps`).
    """
    if not resource.provision:
        return None
    target = ssh_target_of(resource)
    assert target is not None, "the validator requires an SSH target for provisioning"
    due = steps_to_run(plan_steps(resource.provision, files=files, builtins=builtins, observed=observed), recorded)
    return ProvisionChange(resource.ref, target, due) if due else None
