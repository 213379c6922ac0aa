"""The planner's workload piece: each Workload against the container of its name on its Docker host.

Part of the planner composed by `planning.planner.make_plan`. A container that is missing is
created (on a host not yet observed, once its guest is created or started); one that differs in a
declared field is recreated; one the lab owns and the spec no longer names is deleted. Settings are
compared one by one (env per key, secrets only as set or not), so values Docker fills in never show
as drift. Its GPUs come from the GPU piece. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reconciler.planning.containers import DesiredContainer, desired_container, label_keys
from reconciler.planning.inventory import OLD_SUFFIX
from reconciler.planning.observed import DockerObservation, ObservedContainer
from reconciler.planning.ownership import LEGACY_OWNER, Claim
from reconciler.planning.plan import (
    SENSITIVE,
    Action,
    Backend,
    Change,
    FieldChange,
    Problem,
    Timing,
    fingerprint,
    is_hidden,
)
from reconciler.planning.plan_context import UNPROTECT
from reconciler.planning.plan_gpus import GpuPlanning
from reconciler.spec.models import PowerState, Workload

__all__ = ["WorkloadPlanning"]


class WorkloadPlanning(GpuPlanning):
    """Creates, replaces, starts, stops and deletes of Docker containers."""

    def plan_containers(self) -> None:
        workloads: list[Workload] = [w for w in self.desired.resources if isinstance(w, Workload)]
        resolved, problems = self.resolve_gpus()
        available = self.available_gpus()
        wanted: dict[str, set[str]] = {}
        for workload in workloads:
            names = self.gpus_for(workload, available, quiet=self.desired_power(workload) is PowerState.STOPPED)
            container = desired_container(
                workload, lab=self.lab, gpu_names=names, gpu_uuids=resolved, revision=self.desired.revision
            )
            for name in container.unresolved_gpus:
                self.blockers.append(
                    Problem(
                        workload.ref,
                        f"Gpu {name!r} could not be resolved to an NVML UUID: {problems[name]}",
                        "give the Gpu its 'uuid', or run where NVML sees it",
                    )
                )
            power = self.desired_power(workload)
            if power is not container.state:
                container = _with_state(container, power)
            wanted.setdefault(workload.host, set()).add(workload.name)
            self.plan_container(workload, container)
        for host, seen in sorted(self.observed.docker.items()):
            if not seen.reachable:
                continue
            for live in seen.containers:
                marks = self.ownership.of_labels(live.labels)
                if not marks.any or live.name in wanted.get(host, set()):
                    continue
                keys = label_keys(self.owner if marks.ours else LEGACY_OWNER)
                if live.labels.get(keys["host"], host) != host:
                    continue  # one engine serving two hosts of the spec: the other host's container
                if live.name.endswith(OLD_SUFFIX):
                    continue  # kept by an apply for its rollback; the apply removes it
                address = f"container/{host}/{live.name}"
                if address in self.inventory.protected:
                    self.warnings.append(
                        Problem(address, "owned but no longer in the spec; protected, so kept", UNPROTECT)
                    )
                    continue
                claim = self.ownership.claim(marks, recorded=address in self.inventory.owned)
                if claim is not Claim.MINE:
                    if claim is Claim.ORPHAN:
                        self.warnings.append(self.ownership.orphan(address, marks))
                    continue
                self.changes.append(
                    Change(
                        address,
                        Action.DELETE,
                        address,
                        Backend.DOCKER,
                        before=_container_view(live),
                        after=None,
                        reason="owned by this lab and no longer in the spec",
                    )
                )

    def plan_container(self, workload: Workload, container: DesiredContainer) -> None:
        host = self.observed.docker.get(workload.host)
        if host is None or not host.reachable:
            self.plan_container_unseen(workload, container, host)
            return
        host_label = label_keys(self.owner)["host"]
        live = next(
            (
                c
                for c in host.containers
                if c.name == container.name and c.labels.get(host_label, workload.host) == workload.host
            ),
            None,
        )
        if live is None:
            self.changes.append(
                Change(
                    container.address,
                    Action.CREATE,
                    workload.ref,
                    Backend.DOCKER,
                    before=None,
                    after=container.to_json(),
                    reason=f"{workload.ref} has no container on {workload.host!r}",
                )
            )
            return
        if self.container_usable(workload, container, live):
            self.update_container(workload, container, live)

    def plan_container_unseen(
        self, workload: Workload, container: DesiredContainer, host: DockerObservation | None
    ) -> None:
        """A container on a host not observed: created once its guest is, else the plan is blocked."""
        guest_change = self.guest_changes.get(workload.host)
        if guest_change is not None and guest_change.action in (Action.CREATE, Action.START):
            self.changes.append(
                Change(
                    container.address,
                    Action.CREATE,
                    workload.ref,
                    Backend.DOCKER,
                    before=None,
                    after=container.to_json(),
                    reason=f"its host {workload.host!r} is being created or started",
                )
            )
            return
        why = host.error if host is not None and host.error else "not observed"
        self.blockers.append(
            Problem(
                workload.ref,
                f"Docker host {workload.host!r} is unreachable: {why}",
                "check the host's docker endpoint",
            )
        )

    def container_usable(self, workload: Workload, container: DesiredContainer, live: ObservedContainer) -> bool:
        """Whether the lab may change the live container of that name; a conflict is recorded when not."""
        marks = self.ownership.of_labels(live.labels)
        owned = self.ownership.owns_named(marks, recorded=container.address in self.inventory.owned)
        if owned or workload.adopt:
            return True
        if marks.legacy:
            self.conflicts.append(self.ownership.orphan(workload.ref, marks, named=True))
            return False
        self.conflicts.append(
            Problem(
                workload.ref,
                f"container {live.name!r} on {workload.host!r} exists and is not managed by this lab",
                "set 'adopt: true' to replace it, or rename",
            )
        )
        return False

    def update_container(self, workload: Workload, container: DesiredContainer, live: ObservedContainer) -> None:
        """The change that brings a live container to its spec, if any: recreated when a field differs."""
        keys = label_keys(self.owner)
        fields = _container_fields(container, live, keys, ignored=set(workload.ignore))
        running = live.status in ("running", "restarting")
        want_running = container.state is PowerState.RUNNING
        drift = self.is_drift(workload)
        before = _container_view(live)
        after = container.to_json()
        if fields:
            why = ", ".join(sorted({f.path.split(".")[0] for f in fields}))
            change = Change(
                container.address,
                Action.REPLACE,
                workload.ref,
                Backend.DOCKER,
                before=before,
                after=after,
                fields=tuple(fields),
                reason=f"{'drift' if drift else 'spec'}: {why} (containers are recreated)",
                drift=drift,
            )
        elif want_running != running or (want_running and live.health == "unhealthy"):
            action = Action.START if want_running else Action.STOP
            reason = (
                f"is {live.status}" + (f" ({live.health})" if live.health else "") + f", should be {container.state}"
            )
            change = Change(
                container.address,
                action,
                workload.ref,
                Backend.DOCKER,
                before=before,
                after=after,
                reason=reason,
                drift=drift,
            )
        else:
            return
        self.keep(change, workload)


def _with_state(container: DesiredContainer, state: PowerState) -> DesiredContainer:
    from dataclasses import replace

    return replace(container, state=state)


def _container_view(live: ObservedContainer) -> dict[str, Any]:
    return {
        "host": live.host,
        "name": live.name,
        "id": live.id[:12],
        "image": live.image,
        "status": live.status,
        "health": live.health,
        "gpus": list(live.gpus),
    }


# Container settings compared as a whole: an item added to a list is shown with the whole list.
_WHOLE_FIELDS = frozenset({"command", "entrypoint", "ports", "volumes", "gpus", "devices"})


def _container_fields(
    desired: DesiredContainer, live: ObservedContainer, keys: Mapping[str, str], *, ignored: set[str]
) -> list[FieldChange]:
    """Field differences between the container wanted and the one running (declared fields only).

    Both sides become the same nested view, and deepdiff finds what differs, per env var and label.
    """
    before, after = _container_views(desired, live, keys)
    for name in ignored:
        before.pop(name, None)
        after.pop(name, None)
    if before == after:
        if live.labels.get(keys["spec_hash"]) != desired.labels.get(keys["spec_hash"]):
            # Nothing declared differs, yet the spec did (a health check, a removed setting).
            old, new = live.labels.get(keys["spec_hash"]), desired.labels.get(keys["spec_hash"])
            return [FieldChange("spec", old, new, Timing.REPLACE)]
        return []
    # Imported only when something differs: deepdiff brings numpy (~35 MB), which a steady daemon never needs.
    from deepdiff import DeepDiff

    changes: dict[str, FieldChange] = {}
    for levels in DeepDiff(before, after, ignore_order=True, view="tree").tree.values():
        for level in levels:
            path = [str(part) for part in level.path(output_format="list")]
            if path[0] in _WHOLE_FIELDS or len(path) == 1:
                key, old, new = path[0], before.get(path[0]), after.get(path[0])
            else:
                key, old, new = ".".join(path[:2]), before[path[0]].get(path[1]), after[path[0]].get(path[1])
            sensitive = path[0] == "env" and len(path) > 1 and (path[1] in desired.secret_env or is_hidden(old))
            changes.setdefault(key, FieldChange(key, old, new, Timing.REPLACE, sensitive))
    return [changes[key] for key in sorted(changes)]


def _container_views(
    desired: DesiredContainer, live: ObservedContainer, keys: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the spec declares of a container, from the spec and from the live container, side by side."""
    before: dict[str, Any] = {"image": live.image, "restart": live.restart or "no"}
    after: dict[str, Any] = {"image": desired.image, "restart": desired.restart}
    for name, wanted, seen in (
        ("command", desired.command, live.command),
        ("entrypoint", desired.entrypoint, live.entrypoint),
    ):
        if wanted is not None:
            before[name], after[name] = list(seen or ()), list(wanted)
    previous_keys = _label_list(live, keys["env_keys"])
    plain = sorted({*desired.env, *previous_keys} - set(desired.secret_env))
    before["env"] = {key: _live_env(desired, live, key, keys) for key in plain}
    after["env"] = {key: desired.env.get(key) for key in plain}
    for key in desired.secret_env:  # secret values are never read by the planner: only whether one is set
        before["env"][key], after["env"][key] = ("set" if key in live.env else None), "set"
    before["ports"] = sorted([p.bind, p.host, p.container, p.protocol] for p in live.ports)
    after["ports"] = sorted(list(p) for p in desired.ports)
    before["volumes"] = sorted([v.host, v.path, v.readonly] for v in live.volumes)
    after["volumes"] = sorted(list(v) for v in desired.volumes)
    before["gpus"], after["gpus"] = sorted(live.gpus), sorted(desired.gpus)
    before["devices"], after["devices"] = sorted(live.devices), sorted(desired.devices)
    optional: tuple[tuple[str, object, object], ...] = (
        ("shm_size", desired.shm_size, live.shm_size),
        ("ipc", desired.ipc, live.ipc),
        ("network_mode", desired.network_mode, live.network_mode),
    )
    for setting, wanted_value, seen_value in optional:
        if wanted_value is not None:
            before[setting], after[setting] = seen_value, wanted_value
    volatile = {keys["revision"], keys["spec_hash"], keys["env_keys"], keys["secret_env_keys"]}
    declared = [key for key in desired.labels if key not in volatile]
    before["labels"] = {key: live.labels.get(key) for key in declared}
    after["labels"] = {key: desired.labels[key] for key in declared}
    return before, after


def _label_list(live: ObservedContainer, label: str) -> set[str]:
    return {item for item in live.labels.get(label, "").split(",") if item}


def _live_env(desired: DesiredContainer, live: ObservedContainer, key: str, keys: Mapping[str, str]) -> str | None:
    """A live env value as the plan may hold it: never a secret, and never a value the spec does not declare.

    Equal to the spec: the spec's value (nothing to show). Listed as secret by the container's label (a
    secret once stays one, even when the spec no longer says so): SENSITIVE. Set by the reconciler from a
    plain spec value (the container says which keys it set, and which of those were secret): in clear.
    Anything else (a container made by hand or by an older reconciler, an adopted one): a fingerprint.
    """
    value = live.env.get(key)
    if value is None or value == desired.env.get(key):
        return value
    if key in _label_list(live, keys["secret_env_keys"]):
        return SENSITIVE
    if keys["secret_env_keys"] in live.labels and key in _label_list(live, keys["env_keys"]):
        return value
    return fingerprint(value, salt=f"{desired.address}/{key}")
