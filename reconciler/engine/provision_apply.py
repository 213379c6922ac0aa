"""Apply a provisioning change (`provision/llm`): connect over SSH and run the planned steps, in order.

Who calls it: the applier, for a change whose backend is SSH, after the guest's own change (created and
running) and before the containers on that host. The steps are taken from the same revision the plan
was made from (`DesiredState`: the spec's `provision:` and the attached scripts, and the built-in
scripts), and each one's hash must equal the one the plan shows, so what runs is what was planned.

- A guest created (or recreated) by this plan is `fresh`: what the journal recorded for the guest
  that stood there before is forgotten, and its `known_hosts` line too (a new guest has a new host key).
- A new guest may not answer SSH at once (booting, cloud-init installing the key): connecting is
  retried while the guest's error says retrying can help, up to `connect_timeout`.
- Every output line goes, scrubbed by the SSH backend, to `on_output` (the terminal) and to the log;
  each step's outcome and last lines go to the journal (`provision_steps`).
- A failing step raises `ProvisionFailed` with its last output lines: the applier rolls back what this
  apply did, which destroys a guest it created. Undoing a provisioning change forgets what was recorded
  for a fresh guest (it is destroyed with it); what a step installed in a guest that stays is not undone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from reconciler.backends import ssh
from reconciler.engine.journal import Journal
from reconciler.engine.provision import CommandRunner, provision_guest
from reconciler.errors import ConfigError, PermanentError, PlanError, TemporaryError
from reconciler.logs import fields
from reconciler.planning.observed import Observed
from reconciler.planning.plan import Address, AddressKind, Change, Plan
from reconciler.planning.provision import PlannedStep, StepInputMissing, plan_steps
from reconciler.planning.provision_intent import ProvisionIntent
from reconciler.planning.provision_plan import add_provisioning, provision_address, step_inputs
from reconciler.provision import builtin_scripts
from reconciler.spec.access import SshTarget
from reconciler.spec.models import DockerHost, Lxc, Vm
from reconciler.spec.state import DesiredState

__all__ = [
    "ENV_TARGET_PREFIX",
    "KNOWN_HOSTS",
    "ProvisionFailed",
    "Provisioner",
    "forget_guest_access",
    "forget_host_key",
    "with_provisioning",
]

KNOWN_HOSTS: Final = "known_hosts"  # in the state directory, beside the journal
ENV_TARGET_PREFIX: Final = "RECONCILER_SSH_HOST_"
log = logging.getLogger(__name__)

Connect = Callable[[SshTarget], CommandRunner]


class ProvisionFailed(PermanentError):
    """A provisioning step failed; the message ends with its last output lines."""


def forget_host_key(known_hosts: Path, target: SshTarget) -> bool:
    """Drop `target`'s line from our known_hosts: the guest there was recreated and has a new host key.
    Whether a line was dropped."""
    if not known_hosts.exists():
        return False
    entry = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
    lines = known_hosts.read_text(encoding="ascii", errors="replace").splitlines(keepends=True)
    kept = [line for line in lines if line.split(" ", 1)[0] not in (entry, f"{entry},")]
    if kept != lines:
        known_hosts.write_text("".join(kept), encoding="ascii")
    return kept != lines


def forget_guest_access(journal: Journal, address: str) -> list[str]:
    """For `reconciler forget`: what the journal and known_hosts keep of the guest at `address` (`lxc/llm`,
    `qemu/infer` or `provision/llm`): its provisioning records, and the host key of the SSH target its last
    provisioning used (from the journaled change). What was forgotten, as lines to print."""
    try:
        parsed = Address.parse(address.rstrip("/"))
    except ValueError:
        return []
    if parsed.kind not in (AddressKind.LXC, AddressKind.QEMU, AddressKind.PROVISION):
        return []
    provision = provision_address(parsed.name)
    forgotten = [provision] if journal.forget_provisioning(provision) else []
    text = journal.provision_target(provision)
    try:
        target = SshTarget.model_validate(text) if text is not None else None
    except ValueError:
        target = None
    if target is not None and forget_host_key(journal.path.parent / KNOWN_HOSTS, target):
        port = f":{target.port}" if target.port != 22 else ""
        forgotten.append(f"the host key of {target.host}{port} in {KNOWN_HOSTS}")
    return forgotten


@dataclass
class Provisioner:
    """Runs provisioning changes for one apply."""

    journal: Journal
    env: Mapping[str, str]
    desired: DesiredState
    connect: Connect | None = None  # default: paramiko with trust on first use (`backends.ssh.connect`)
    connect_timeout: float = 300.0
    retry_interval: float = 2.0
    on_output: Callable[[str, str, str], None] | None = None  # (address, step, line)
    sleep: Callable[[float], None] = time.sleep

    @property
    def known_hosts(self) -> Path:
        return self.journal.path.parent / KNOWN_HOSTS

    def run(self, change: Change, *, run_id: int | None = None) -> None:
        """Run the change's steps; ProvisionFailed when one fails, PlanError when one is not what was planned."""
        after = change.after
        if not isinstance(after, ProvisionIntent):
            raise PlanError("a provisioning change holds no provisioning steps", resource=change.address)
        steps = self._planned(change, after)
        target = self._target(change, after)
        if after.fresh:
            self.journal.forget_provisioning(change.address)
            forget_host_key(self.known_hosts, target)

        def output(step: str, line: str) -> None:
            log.info("provision output", extra=fields(address=change.address, step=step, line=line))
            if self.on_output is not None:
                self.on_output(change.address, step, line)

        session = self._connect(target, change.address)
        try:
            report = provision_guest(
                change.address, steps, session=session, journal=self.journal, run_id=run_id, on_line=output
            )
        finally:
            close = getattr(session, "close", None)
            if close is not None:
                close()
        failed = report.failed
        if failed is not None:
            tail = "\n".join(f"  | {line}" for line in failed.tail) or "  (no output)"
            raise ProvisionFailed(
                f"provisioning step {failed.key!r} failed ({failed.reason}); its last output lines:\n{tail}",
                resource=change.address,
                hint="fix the step (or the guest) and apply again",
            )

    def _target(self, change: Change, after: ProvisionIntent) -> SshTarget:
        """The plan's SSH target, unless RECONCILER_SSH_HOST_<NAME> overrides it (as RECONCILER_DOCKER_HOST_<NAME>
        does a Docker endpoint: the same lab reached another way, through a tunnel or a test's sshd)."""
        name = change.where.name
        override = self.env.get(f"{ENV_TARGET_PREFIX}{name.upper().replace('-', '_')}", "").strip()
        try:
            return SshTarget.model_validate(override or after.ssh)
        except ValueError:
            raise ConfigError(
                f"{ENV_TARGET_PREFIX}{name.upper()} is not user@host[:port]", resource=change.address
            ) from None

    def undo(self, change: Change) -> None:
        """A fresh guest is destroyed by the rollback: forget what ran in it. Nothing else can be undone."""
        if isinstance(change.after, ProvisionIntent) and change.after.fresh:
            self.journal.forget_provisioning(change.address)

    def _planned(self, change: Change, after: ProvisionIntent) -> list[PlannedStep]:
        resource = self._resource(change.resource)
        inputs = dict(after.inputs)
        wanted = {item.step for item in after.steps}
        due = [step for step in resource.provision if step.key in wanted]  # the inputs are those of these steps
        try:
            planned = plan_steps(due, files=self.desired.files, builtins=builtin_scripts(), observed=inputs)
        except StepInputMissing as exc:
            raise PlanError(str(exc), resource=change.address, hint="plan again") from None
        by_key = {step.key: step for step in planned}
        chosen: list[PlannedStep] = []
        for item in after.steps:
            step = by_key.get(item.step)
            if step is None or step.hash != item.hash:
                raise PlanError(
                    f"provisioning step {item.step!r} is not the one planned",
                    resource=change.address,
                    hint="plan again",
                )
            chosen.append(step)
        return chosen

    def _resource(self, ref: str) -> Lxc | Vm | DockerHost:
        for resource in self.desired.resources:
            if resource.ref == ref and isinstance(resource, Lxc | Vm | DockerHost):
                return resource
        raise PlanError(f"{ref} is not in the spec this plan was made from", resource=ref)

    def _connect(self, target: SshTarget, address: str) -> CommandRunner:
        """Connect, retrying while the guest may still be coming up (unreachable, key not installed yet)."""
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                if self.connect is not None:
                    return self.connect(target)
                credentials = ssh.credentials_from(self.env)
                return ssh.connect(target, credentials=credentials, known_hosts=self.known_hosts)
            except TemporaryError as exc:
                if time.monotonic() + self.retry_interval > deadline:
                    raise TemporaryError(f"cannot provision over SSH: {exc}", resource=address, hint=exc.hint) from None
                self.sleep(self.retry_interval)


def with_provisioning(plan: Plan, desired: DesiredState, observed: Observed, journal: Journal | None) -> Plan:
    """`plan` with its provisioning changes (`planning.provision_plan`): the journal's hashes, the host's inputs."""
    names = [r.name for r in desired.resources if isinstance(r, Lxc | Vm | DockerHost) and r.provision]
    if not names:
        return plan
    recorded = {
        address: journal.provision_hashes(address) if journal is not None else {}
        for address in map(provision_address, names)
    }
    driver = observed.nvml.driver_version if observed.nvml is not None and observed.nvml.available else None
    return add_provisioning(plan, desired, builtins=builtin_scripts(), inputs=step_inputs(driver), recorded=recorded)
