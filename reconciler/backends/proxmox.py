"""The Proxmox VE backend: the only module that imports proxmoxer and talks to the PVE API.

Who calls it: the engine's observe step (`ProxmoxBackend.observe`, reads only)
and its apply step (create, update, power and delete calls, each waiting for
the PVE task it starts). `settings_from` (in `proxmox_settings`) turns the Lab's `proxmox` connection
and the environment into `ProxmoxSettings`; the secret never leaves them.

Why it is shaped this way:

- One pass costs one inventory read (`/cluster/resources?type=vm`) plus one
  read per guest (`.../pending`, which lists every key with its current value,
  its pending value and pending deletes, and in real PVE the config `digest`),
  made concurrently, plus a fixed few (`/version`, `/nodes`, each online node's
  PCI devices, the cluster's PCI mappings).
- proxmoxer's errors are translated here, by HTTP status and exception type,
  never by message text: 400 -> PermanentError (with PVE's per-field errors),
  401 -> ConfigError (the credentials are wrong), 403 -> PermissionDenied,
  404/501 -> NotFoundError, 5xx -> TemporaryError (PVE reports lock timeouts,
  a lost quorum and a missing config file alike as 500), a dropped connection
  or a timeout -> TemporaryError, a TLS verification failure -> ConfigError.
  Reads are retried a few times with exponential backoff and jitter. So is
  every write as a whole (its state check, its call, its task), on a
  TemporaryError only: a dropped connection, a 5xx (a lock timeout), a guest
  locked for a moment. Each write is idempotent by its state check, so doing
  it again is safe; a create whose answer was lost finds its guest and waits
  for it. Not retried: a stale digest (ConfigChanged: the caller re-plans), a
  task that failed (TaskFailed) or is still running after its timeout.
- Every call that starts a task waits for its UPID; `OK` and `WARNINGS: N`
  are success, anything else is `TaskFailed` naming the guest.
- Operations are idempotent where PVE lets a state check decide: starting a
  running guest, stopping a stopped one, deleting a missing one do nothing.
  A guest holding a lock (backup, migrate, snapshot...) is refused before the
  call with a retryable TemporaryError, since PVE would fail inside the task.
- LXC `devN`, bind mounts and raw `hostpciN` addresses are refused up front
  unless the login is root@pam with a password: PVE checks the user name, so
  every API token fails (fakepve lets a root token through; PVE does not).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import requests
from proxmoxer import ProxmoxAPI
from proxmoxer.core import AuthenticationError, ResourceException

from reconciler import redact
from reconciler.backends.proxmox_settings import (
    ENV_CA,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_URL,
    ENV_USER,
    ENV_VERIFY_TLS,
    ProxmoxSettings,
    settings_from,
)
from reconciler.errors import (
    BackendError,
    ConfigError,
    NotFoundError,
    PermanentError,
    PermissionDenied,
    ReconcilerError,
    TaskFailed,
    TemporaryError,
)
from reconciler.planning import pve
from reconciler.planning.observed import (
    GuestKind,
    ObservedGuest,
    ObservedNode,
    ObservedPciDevice,
    PciMapping,
    ProxmoxObservation,
)
from reconciler.planning.pve_access import TemplateRow
from reconciler.spec.models import ProxmoxAuth

__all__ = [
    "ENV_CA",
    "ENV_PASSWORD",
    "ENV_TOKEN",
    "ENV_URL",
    "ENV_USER",
    "ENV_VERIFY_TLS",
    "NVIDIA_VENDOR",
    "ConfigChanged",
    "ProxmoxBackend",
    "ProxmoxSettings",
    "settings_from",
]


NVIDIA_VENDOR: Final = "0x10de"

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


class ConfigChanged(TemporaryError):
    """PVE refused a config update because the guest's config changed since it was read (stale digest).

    Retryable: the next pass reads the new config and plans again.
    """


class _TaskStillRunning(TemporaryError):
    """A task outlived the time allowed for it; starting the operation again would not help."""


# ---- the backend ----------------------------------------------------------------------


def _text(value: Any) -> str:
    """A config value as the string PVE stores (PVE's JSON sends some numbers as numbers)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _field_errors(errors: Any) -> str:
    if isinstance(errors, Mapping):
        return "; ".join(f"{name}: {str(text).strip()}" for name, text in sorted(errors.items()))
    return str(errors).strip() if errors else ""


def _translate(exc: Any, *, method: str, path: str, resource: str) -> ReconcilerError:
    """The project's error for a proxmoxer ResourceException, chosen by HTTP status only."""
    status = int(getattr(exc, "status_code", 0) or 0)
    # PVE's own words may echo what it was sent (an Authorization header): scrubbed before anything else.
    reason = redact.scrub(str(getattr(exc, "content", "") or getattr(exc, "status_message", "") or "").strip())
    details = redact.scrub(_field_errors(getattr(exc, "errors", None)))
    message = f"{method} /{path} failed: HTTP {status} {reason}".rstrip()
    if details:
        message += f" ({details})"
    if status == 400:
        return PermanentError(message, resource=resource)
    if status == 401:
        return ConfigError(message, resource=resource, hint="check the Proxmox token or password")
    if status == 403:
        return PermissionDenied(message, resource=resource)
    if status in (404, 501):
        return NotFoundError(message, resource=resource)
    if status >= 500:
        return TemporaryError(message, resource=resource)
    return PermanentError(message, resource=resource)


def _upid_node(upid: str) -> str:
    parts = upid.split(":")
    if len(parts) < 3 or parts[0] != "UPID" or not parts[1]:
        raise PermanentError(f"not a PVE task id: {upid!r}")
    return parts[1]


def _kind(guest_type: GuestKind) -> GuestKind:
    return GuestKind(guest_type)


def _ref(guest_type: GuestKind, vmid: int) -> str:
    return f"{_kind(guest_type).value}/{vmid}"


class ProxmoxBackend:
    """A connection to one PVE cluster. Thread-safe; create one per pass or keep one, and `close()` it.

    `workers` bounds the concurrent reads of `observe`; `read_attempts`,
    `write_attempts` and `backoff` (seconds, doubled per attempt, with jitter)
    govern the retries of reads and of whole writes;
    `task_timeout` is how long a task may run before TemporaryError.
    No I/O happens until the first call.
    """

    def __init__(
        self,
        settings: ProxmoxSettings,
        *,
        workers: int = 16,
        read_attempts: int = 4,
        write_attempts: int = 4,
        backoff: float = 0.5,
        task_timeout: float = 600.0,
        poll_interval: float = 0.2,
    ) -> None:
        self._settings = settings
        self._workers = max(1, workers)
        self._attempts = max(1, read_attempts)
        self._write_attempts = max(1, write_attempts)
        self._backoff = backoff
        self._task_timeout = task_timeout
        self._poll = poll_interval
        self._api: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ProxmoxBackend({self._settings.url!r}, user={self._settings.user!r})"

    def __enter__(self) -> ProxmoxBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def settings(self) -> ProxmoxSettings:
        return self._settings

    def close(self) -> None:
        """Close the HTTP connections. The backend reconnects if used again."""
        with self._lock:
            api, self._api = self._api, None
        if api is not None:
            session = _session_of(api)
            if session is not None:
                session.close()

    # ---- transport ----------------------------------------------------------------

    def _client(self) -> Any:
        with self._lock:
            if self._api is None:
                self._api = self._connect()
            return self._api

    def _connect(self) -> Any:
        s = self._settings
        parts = urlsplit(s.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        options: dict[str, Any] = {
            "host": f"{host}:{parts.port or 8006}",
            "verify_ssl": s.verify,
            "timeout": s.timeout,
            "service": "PVE",
            "user": s.user,
        }
        if parts.path.strip("/"):
            options["path_prefix"] = parts.path.strip("/")
        if s.auth is ProxmoxAuth.TOKEN:
            options.update(token_name=s.token_id, token_value=s.secret)
        else:
            options["password"] = s.secret
        try:
            api = ProxmoxAPI(**options)
        except AuthenticationError as exc:
            raise ConfigError(
                f"Proxmox refused the login of {s.user}", resource=s.url, hint="check the password"
            ) from exc
        except requests.RequestException as exc:
            raise _transport_error(exc, url=s.url, resource=None, method="POST", path="access/ticket") from exc
        except UnicodeError:
            raise _unsendable(s.user) from None
        redact.register(*api.get_tokens())  # a password login's ticket and CSRF token are secrets too
        session = _session_of(api)
        if session is not None:
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=self._workers)
            session.mount("https://", adapter)
        return api

    def _call(self, method: str, path: str, *, resource: str, params: Mapping[str, Any] | None = None) -> Any:
        """One API call, errors translated. `path` is relative to /api2/json, without a leading slash."""
        api = self._client()
        endpoint = api(path)
        values = dict(params or {})
        try:
            if method == "GET":
                return endpoint.get(**values)
            if method == "POST":
                return endpoint.post(**values)
            if method == "PUT":
                return endpoint.put(**values)
            if method == "DELETE":
                return endpoint.delete(**values)
        except ResourceException as exc:
            redact.register(*api.get_tokens())  # a ticket renewed since login may be what the error echoes
            raise _translate(exc, method=method, path=path, resource=resource) from exc
        except AuthenticationError as exc:
            raise ConfigError(
                f"Proxmox refused to renew the login of {self._settings.user}", resource=resource
            ) from exc
        except requests.RequestException as exc:
            raise _transport_error(exc, url=self._settings.url, resource=resource, method=method, path=path) from exc
        except UnicodeError:  # a header (the token) or the URL cannot be encoded; the text would show the secret
            raise _unsendable(self._settings.user, resource=resource) from None
        raise ValueError(f"unsupported method {method}")

    def _get(self, path: str, *, resource: str, params: Mapping[str, Any] | None = None) -> Any:
        """A read, retried on TemporaryError with exponential backoff and jitter."""
        return self._retried(
            lambda attempt: self._call("GET", path, resource=resource, params=params),
            attempts=self._attempts,
            what="read",
            context={"path": path, "resource": resource},
        )

    def _write(self, operation: Callable[[int], _T], *, resource: str, action: str) -> _T:
        """Run a whole write (state check, call, task) again on TemporaryError, with exponential backoff and jitter.

        `operation` gets the attempt number (0 first). What is not worth repeating is raised at once: a stale
        digest, a task still running after its timeout; TaskFailed and permanent errors are not temporary.
        """
        return self._retried(
            operation, attempts=self._write_attempts, what="write", context={"action": action, "resource": resource}
        )

    def _retried(self, operation: Callable[[int], _T], *, attempts: int, what: str, context: Mapping[str, Any]) -> _T:
        for attempt in range(attempts):
            try:
                return operation(attempt)
            except (ConfigChanged, _TaskStillRunning):
                raise  # retryable by a new pass, which reads and plans again, never by repeating this call
            except ReconcilerError as exc:
                if not exc.retryable or attempt + 1 >= attempts:
                    raise
                delay = min(30.0, self._backoff * 2**attempt) * random.uniform(0.5, 1.0)
                if exc.delay is not None and exc.delay > 0:
                    delay = max(delay, min(exc.delay, 30.0))
                extra = {**context, "attempt": attempt + 1, "delay": delay, "error": str(exc)}
                _log.info(f"proxmox {what} retried", extra=extra)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, upid: Any, *, resource: str, timeout: float | None = None) -> None:
        """Wait for a task to stop; raise TaskFailed unless it ended OK or with warnings."""
        if not isinstance(upid, str):
            raise PermanentError(f"PVE returned no task id ({upid!r})", resource=resource)
        node = _upid_node(upid)
        limit = self._task_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        interval = self._poll
        while True:
            status = self._get(f"nodes/{node}/tasks/{upid}/status", resource=resource)
            if isinstance(status, Mapping) and status.get("status") == "stopped":
                exitstatus = str(status.get("exitstatus") or "unknown")
                if exitstatus == "OK" or exitstatus.startswith("WARNINGS"):
                    _log.info("proxmox task done", extra={"upid": upid, "resource": resource, "exit": exitstatus})
                    return
                task = status.get("type", "task")
                raise TaskFailed(f"{task} task failed: {exitstatus}", resource=resource, upid=upid)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _TaskStillRunning(f"task {upid} still running after {limit:g}s", resource=resource)
            time.sleep(min(interval, remaining))
            interval = min(interval * 1.5, 2.0)

    # ---- observe ------------------------------------------------------------------

    def observe(self, *, nodes: Iterable[str] | None = None) -> ProxmoxObservation:
        """Read the cluster: version, nodes, every guest's config and pending changes, NVIDIA PCI devices, PCI mappings.

        `nodes` limits the nodes (and their guests) read; None reads all. Guests
        that are templates are left out. A guest on an offline node is listed with
        the inventory's status (`unknown`) and an empty config: it cannot be read,
        and the planner must leave it alone. Raises the first error of any read
        except PCI devices and mappings, which degrade to none (with a warning)
        when the credentials may not read them.
        """
        wanted = None if nodes is None else frozenset(nodes)
        version = self._get("version", resource="version")
        node_rows = self._get("nodes", resource="nodes")
        observed_nodes = tuple(
            ObservedNode(name=str(row["node"]), online=row.get("status") == "online")
            for row in sorted(node_rows, key=lambda r: str(r.get("node")))
            if wanted is None or row.get("node") in wanted
        )
        online = frozenset(n.name for n in observed_nodes if n.online)
        rows = [
            row
            for row in self._get("cluster/resources", resource="cluster/resources", params={"type": "vm"})
            if row.get("type") in ("lxc", "qemu")
            and not row.get("template")
            and (wanted is None or row.get("node") in wanted)
        ]
        with ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="pve-observe") as pool:
            try:
                guest_futures = [pool.submit(self._observe_row, row, online) for row in rows]
                pci_futures = [pool.submit(self._pci_devices, node) for node in sorted(online)]
                mappings_future: Future[tuple[PciMapping, ...]] = pool.submit(self._mappings)
                guests = [g for g in (f.result() for f in guest_futures) if g is not None]
                devices = [d for f in pci_futures for d in f.result()]
                mappings = mappings_future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return ProxmoxObservation(
            version=str(version.get("version")) if isinstance(version, Mapping) and version.get("version") else None,
            nodes=observed_nodes,
            guests=tuple(sorted(guests, key=lambda g: g.vmid)),
            pci_devices=tuple(sorted(devices, key=lambda d: (d.node, d.address))),
            mappings=mappings,
        )

    def observe_guest(self, guest_type: GuestKind, node: str, vmid: int) -> ObservedGuest:
        """One guest as `observe` sees it (two reads: status and pending config). NotFoundError if it is gone."""
        kind = _kind(guest_type)
        ref = _ref(kind, vmid)
        status = self._get(f"nodes/{node}/{kind.value}/{vmid}/status/current", resource=ref)
        items = self._get(f"nodes/{node}/{kind.value}/{vmid}/pending", resource=ref)
        return _guest(
            kind,
            vmid,
            node,
            name=str(status.get("name") or ""),
            status=str(status.get("status") or "unknown"),
            items=items,
            inventory_lock=status.get("lock"),
            inventory_tags=str(status.get("tags") or ""),
        )

    def _observe_row(self, row: Mapping[str, Any], online: frozenset[str]) -> ObservedGuest | None:
        kind = GuestKind(str(row["type"]))
        vmid = int(row["vmid"])
        node = str(row["node"])
        name = str(row.get("name") or "")
        status = str(row.get("status") or "unknown")
        if node not in online:
            return ObservedGuest(
                type=kind,
                vmid=vmid,
                node=node,
                name=name,
                status=status,
                tags=pve.normalise_tags(str(row.get("tags") or "")),
                config={},
                lock=row.get("lock") or None,
            )
        try:
            items = self._get(f"nodes/{node}/{kind.value}/{vmid}/pending", resource=_ref(kind, vmid))
        except NotFoundError:
            return None  # gone since the inventory was read
        return _guest(
            kind,
            vmid,
            node,
            name=name,
            status=status,
            items=items,
            inventory_lock=row.get("lock"),
            inventory_tags=str(row.get("tags") or ""),
        )

    def _pci_devices(self, node: str) -> list[ObservedPciDevice]:
        try:
            rows = self._get(f"nodes/{node}/hardware/pci", resource=f"node/{node}")
        except (PermissionDenied, NotFoundError) as exc:
            _log.warning("proxmox pci devices not readable", extra={"node": node, "error": str(exc)})
            return []
        devices = []
        for row in rows or ():
            vendor = str(row.get("vendor") or "").lower()
            if vendor != NVIDIA_VENDOR or not row.get("id"):
                continue
            group = row.get("iommugroup")
            devices.append(
                ObservedPciDevice(
                    node=node,
                    address=pve.pci_address_key(str(row["id"])),
                    vendor=vendor,
                    device=str(row.get("device") or "").lower(),
                    vendor_name=row.get("vendor_name") or None,
                    device_name=row.get("device_name") or None,
                    iommu_group=int(group) if group is not None and int(group) >= 0 else None,
                )
            )
        return devices

    def _mappings(self) -> tuple[PciMapping, ...]:
        try:
            rows = self._get("cluster/mapping/pci", resource="cluster/mapping/pci")
        except (PermissionDenied, NotFoundError) as exc:
            _log.warning("proxmox pci mappings not readable", extra={"error": str(exc)})
            return ()
        mappings = []
        for row in rows or ():
            if not isinstance(row, Mapping) or not row.get("id"):
                continue
            paths: dict[str, list[str]] = {}
            for entry in row.get("map") or ():
                try:
                    fields = pve.parse_property(str(entry), None)
                except ValueError:
                    continue
                if fields.get("node") and fields.get("path"):
                    addresses = [pve.pci_address_key(p) for p in fields["path"].split(";") if p]
                    paths.setdefault(fields["node"], []).extend(addresses)
            mappings.append(PciMapping(name=str(row["id"]), paths={n: tuple(a) for n, a in sorted(paths.items())}))
        return tuple(sorted(mappings, key=lambda m: m.name))

    # ---- write side ---------------------------------------------------------------

    def create_lxc(self, node: str, vmid: int, *, config: Mapping[str, str], timeout: float | None = None) -> None:
        """Create a container (POST /nodes/{node}/lxc) and wait for the task. `config` includes `ostemplate`.

        Raises PermanentError when the vmid is taken, PermissionDenied for root-only
        keys without a root@pam password login, TaskFailed if the task fails.
        """
        self._create(GuestKind.LXC, node, vmid, config, timeout)

    def create_vm(self, node: str, vmid: int, *, config: Mapping[str, str], timeout: float | None = None) -> None:
        """Create a VM (POST /nodes/{node}/qemu) and wait for the task; errors as `create_lxc`."""
        self._create(GuestKind.QEMU, node, vmid, config, timeout)

    def clone_vm(
        self, node: str, template: int, newid: int, *, params: Mapping[str, str], timeout: float | None = None
    ) -> None:
        """Clone VM `template` on `node` into `newid` (POST .../qemu/{template}/clone) and wait for the task.

        `params` are `pve_access.clone_params`' (name, full, target, storage). A retry after a lost
        answer finds the new VM locked by its clone and waits for it, as a create does; a vmid taken
        by anything else is a PermanentError.
        """
        ref = _ref(GuestKind.QEMU, newid)

        def clone(attempt: int) -> None:
            taken = self._inventory_row(newid)
            if taken is not None and attempt > 0 and taken.get("type") == GuestKind.QEMU.value:
                self._await_unlocked(GuestKind.QEMU, str(taken.get("node")), newid, lock="clone", timeout=timeout)
                return
            if taken is not None:
                raise PermanentError(
                    f"vmid {newid} is already taken by {taken.get('type')}/{newid} ({taken.get('name')})", resource=ref
                )
            path = f"nodes/{node}/qemu/{template}/clone"
            upid = self._call("POST", path, resource=ref, params={**params, "newid": newid})
            self._wait(upid, resource=ref, timeout=timeout)

        self._write(clone, resource=ref, action="clone")

    def _create(self, kind: GuestKind, node: str, vmid: int, config: Mapping[str, str], timeout: float | None) -> None:
        ref = _ref(kind, vmid)
        self._check_root_only(kind, config, resource=ref)

        def create(attempt: int) -> None:
            taken = self._inventory_row(vmid)
            if taken is not None and attempt > 0 and taken.get("type") == kind.value and taken.get("node") == node:
                # The vmid was free before our first try, whose answer was lost: the guest is ours, being made.
                self._await_unlocked(kind, node, vmid, lock="create", timeout=timeout)
                return
            if taken is not None:
                raise PermanentError(
                    f"vmid {vmid} is already taken by {taken.get('type')}/{vmid} ({taken.get('name')}) "
                    f"on {taken.get('node')}",
                    resource=ref,
                )
            params = {**config, "vmid": vmid}
            upid = self._call("POST", f"nodes/{node}/{kind.value}", resource=ref, params=params)
            self._wait(upid, resource=ref, timeout=timeout)

        self._write(create, resource=ref, action="create")

    def _await_unlocked(self, kind: GuestKind, node: str, vmid: int, *, lock: str, timeout: float | None) -> None:
        """Wait while the guest holds `lock` (its create task runs); NotFoundError if the guest goes away."""
        ref = _ref(kind, vmid)
        deadline = time.monotonic() + (self._task_timeout if timeout is None else timeout)
        while True:
            row = self._inventory_row(vmid)
            if row is None:
                raise TemporaryError(f"{ref} disappeared while it was being created", resource=ref)
            if row.get("lock") != lock:
                return
            if time.monotonic() >= deadline:
                raise _TaskStillRunning(f"{ref} is still locked ({lock})", resource=ref)
            time.sleep(self._poll)

    def update_config(
        self,
        guest_type: GuestKind,
        node: str,
        vmid: int,
        *,
        config: Mapping[str, str],
        delete: Sequence[str] = (),
        digest: str | None = None,
    ) -> None:
        """Set and delete config keys (PUT .../config, synchronous). Nothing to change: no call.

        Send only the keys that change, each as `planning.pve.update_value` renders
        it (a desired value sent as it is can re-allocate a volume or change a MAC).
        A create-only or replace key (`ostemplate`, `unprivileged`, `arch`) is
        refused with PermanentError before anything is sent.

        With `digest` (from the observation), PVE refuses the update if the config
        changed since: that raises ConfigChanged (retryable: re-plan). On a running
        guest some keys go pending until a restart (see `planning.pve.classify`).
        A TemporaryError (a lock timeout, a dropped connection) is retried while the
        digest still matches, so an update that did happen is never sent twice
        against a config it has changed.
        """
        kind = _kind(guest_type)
        ref = _ref(kind, vmid)
        if not config and not delete:
            return
        fixed = sorted(k for k in (*config, *delete) if k in pve.CREATE_ONLY[kind] or k in pve.REPLACE_KEYS[kind])
        if fixed:
            raise PermanentError(
                f"{', '.join(fixed)} cannot change on an existing guest", resource=ref, hint="recreate the guest"
            )
        self._check_root_only(kind, config, resource=ref)
        params: dict[str, Any] = dict(config)
        if delete:
            params["delete"] = ",".join(delete)
        if digest:
            params["digest"] = digest

        def put(attempt: int) -> None:
            try:
                self._call("PUT", f"nodes/{node}/{kind.value}/{vmid}/config", resource=ref, params=params)
            except TemporaryError as exc:
                if digest and self._digest_changed(kind, node, vmid, digest):
                    raise ConfigChanged(
                        "the config changed since it was read; update refused",
                        resource=ref,
                        hint="the next pass reads it again",
                    ) from exc
                raise

        self._write(put, resource=ref, action="update config")

    def start(self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float | None = None) -> None:
        """Start a guest and wait for it; nothing if it runs already.

        A locked guest is waited for (retried with backoff), then TemporaryError; NotFoundError if it does not exist.
        """
        kind = _kind(guest_type)
        ref = _ref(kind, vmid)

        def start(attempt: int) -> None:
            status = self._status(kind, node, vmid)
            if status.get("status") == "running":
                return
            self._refuse_locked(status, resource=ref, allowed=("suspended",) if kind is GuestKind.QEMU else ())
            upid = self._call("POST", f"nodes/{node}/{kind.value}/{vmid}/status/start", resource=ref)
            self._wait(upid, resource=ref, timeout=timeout)

        self._write(start, resource=ref, action="start")

    def shutdown(
        self,
        guest_type: GuestKind,
        node: str,
        vmid: int,
        *,
        timeout: float = 60.0,
        force_stop_after: bool = True,
    ) -> None:
        """Ask the guest OS to power off within `timeout` seconds; then stop it hard if `force_stop_after`.

        Nothing if it is stopped; NotFoundError if it does not exist. Without `force_stop_after`, a guest
        that does not power off in time makes the task fail (TaskFailed).
        """
        kind = _kind(guest_type)
        ref = _ref(kind, vmid)

        def shutdown(attempt: int) -> None:
            status = self._status(kind, node, vmid)
            if status.get("status") == "stopped":
                return
            self._refuse_locked(status, resource=ref)
            params = {"timeout": int(timeout), "forceStop": 1 if force_stop_after else 0}
            path = f"nodes/{node}/{kind.value}/{vmid}/status/shutdown"
            upid = self._call("POST", path, resource=ref, params=params)
            self._wait(upid, resource=ref, timeout=self._task_timeout + timeout)

        self._write(shutdown, resource=ref, action="shutdown")

    def stop(self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float | None = None) -> None:
        """Stop a guest at once (no clean shutdown); nothing if it is stopped."""
        kind = _kind(guest_type)
        ref = _ref(kind, vmid)

        self._write(lambda attempt: self._stop_once(kind, node, vmid, timeout), resource=ref, action="stop")

    def _stop_once(self, kind: GuestKind, node: str, vmid: int, timeout: float | None) -> None:
        ref = _ref(kind, vmid)
        status = self._status(kind, node, vmid)
        if status.get("status") == "stopped":
            return
        self._refuse_locked(status, resource=ref)
        upid = self._call("POST", f"nodes/{node}/{kind.value}/{vmid}/status/stop", resource=ref)
        self._wait(upid, resource=ref, timeout=timeout)

    def reboot(self, guest_type: GuestKind, node: str, vmid: int, *, timeout: float = 60.0) -> None:
        """Reboot a running guest (applies its pending changes); nothing if it is stopped (its next start will)."""
        kind = _kind(guest_type)
        ref = _ref(kind, vmid)

        def reboot(attempt: int) -> None:
            status = self._status(kind, node, vmid)
            if status.get("status") != "running":
                return
            self._refuse_locked(status, resource=ref)
            params = {"timeout": int(timeout)}
            path = f"nodes/{node}/{kind.value}/{vmid}/status/reboot"
            upid = self._call("POST", path, resource=ref, params=params)
            self._wait(upid, resource=ref, timeout=self._task_timeout + timeout)

        self._write(reboot, resource=ref, action="reboot")

    def resize(self, guest_type: GuestKind, node: str, vmid: int, *, disk: str, size: str) -> None:
        """Grow volume `disk` (`rootfs`, `mp0`, `scsi0`...) to `size` (`16G`); nothing if it is that big already.

        PVE refuses to shrink a disk; the planner never asks it to. A VM's resize
        answers with a task on PVE 8 and with nothing on older releases: both are fine.
        """
        kind = _kind(guest_type)
        ref = _ref(kind, vmid)
        wanted = pve.parse_pve_size(size)

        def resize(attempt: int) -> None:
            config = self._get(f"nodes/{node}/{kind.value}/{vmid}/config", resource=ref, params={"current": 1})
            value = config.get(disk) if isinstance(config, Mapping) else None
            default = pve.default_key_for(kind, disk)
            if not isinstance(value, str) or default is None:
                raise PermanentError(f"{ref} has no volume {disk}", resource=ref)
            current = pve.parse_property(value, default).get("size")
            if current is not None and pve.parse_pve_size(current) >= wanted:
                return
            params = {"disk": disk, "size": pve.format_pve_size(wanted)}
            answer = self._call("PUT", f"nodes/{node}/{kind.value}/{vmid}/resize", resource=ref, params=params)
            if isinstance(answer, str) and answer.startswith("UPID:"):
                self._wait(answer, resource=ref)

        self._write(resize, resource=ref, action="resize")

    def move_volume(self, guest_type: GuestKind, node: str, vmid: int, *, disk: str, storage: str) -> None:
        """Move volume `disk` (`rootfs`, `mp0`, `scsi0`...) with its data to `storage`; nothing if it is there.

        A CT's volume moves only while the CT is stopped (PVE refuses otherwise); a VM's disk
        moves online. The source volume is removed once copied (`delete=1`), as a move should.
        """
        kind = _kind(guest_type)
        ref = _ref(kind, vmid)

        def move(attempt: int) -> None:
            config = self._get(f"nodes/{node}/{kind.value}/{vmid}/config", resource=ref, params={"current": 1})
            value = config.get(disk) if isinstance(config, Mapping) else None
            if not isinstance(value, str) or pve.volume_storage(kind, disk, value) is None:
                raise PermanentError(f"{ref} has no volume {disk}", resource=ref)
            if pve.volume_storage(kind, disk, value) == storage:
                return
            if kind is GuestKind.LXC:
                path, params = "move_volume", {"volume": disk, "storage": storage, "delete": 1}
            else:
                path, params = "move_disk", {"disk": disk, "storage": storage, "delete": 1}
            upid = self._call("POST", f"nodes/{node}/{kind.value}/{vmid}/{path}", resource=ref, params=params)
            self._wait(upid, resource=ref)

        self._write(move, resource=ref, action="move volume")

    def delete(self, guest_type: GuestKind, node: str, vmid: int, *, purge: bool = True) -> None:
        """Destroy a guest and its disks, stopping it first; nothing if it does not exist.

        `purge` also removes it from backup jobs, replication and HA. The guest is
        looked up in the inventory, so a vmid on another node or of another type
        is refused (PermanentError) rather than deleted.
        """
        kind = _kind(guest_type)
        ref = _ref(kind, vmid)

        def delete(attempt: int) -> None:
            row = self._inventory_row(vmid)
            if row is None:
                return
            if row.get("type") != kind.value or row.get("node") != node:
                raise PermanentError(f"vmid {vmid} is {row.get('type')}/{vmid} on {row.get('node')}", resource=ref)
            if row.get("lock"):
                raise TemporaryError(
                    f"guest is locked ({row.get('lock')})", resource=ref, hint="retry when the lock is gone"
                )
            if row.get("status") == "running":
                self._stop_once(kind, node, vmid, None)
            params = {"purge": 1 if purge else 0, "destroy-unreferenced-disks": 1}
            upid = self._call("DELETE", f"nodes/{node}/{kind.value}/{vmid}", resource=ref, params=params)
            self._wait(upid, resource=ref)

        self._write(delete, resource=ref, action="delete")

    # ---- helpers ------------------------------------------------------------------

    def _status(self, kind: GuestKind, node: str, vmid: int) -> Mapping[str, Any]:
        """The guest's current status; NotFoundError when it does not exist there.

        PVE answers a missing guest with 500 (no config file), as it does a lock timeout: the
        inventory tells them apart.
        """
        ref = _ref(kind, vmid)
        path = f"nodes/{node}/{kind.value}/{vmid}/status/current"
        try:
            status = self._call("GET", path, resource=ref)
        except TemporaryError:
            row = self._inventory_row(vmid)
            if row is None or row.get("type") != kind.value or row.get("node") != node:
                raise NotFoundError(f"{ref} does not exist on {node}", resource=ref) from None
            status = self._get(path, resource=ref)
        return status if isinstance(status, Mapping) else {}

    def templates(self) -> list[TemplateRow]:
        """The VM templates (`/cluster/resources?type=vm` rows with template=1): where a clone comes from."""
        rows = self._get("cluster/resources", resource="cluster/resources", params={"type": "vm"})
        return [
            TemplateRow(int(row["vmid"]), row.get("name"), str(row.get("node")), True)
            for row in rows or ()
            if row.get("type") == GuestKind.QEMU.value and row.get("template") and row.get("vmid") is not None
        ]

    def _inventory_row(self, vmid: int) -> Mapping[str, Any] | None:
        rows = self._get("cluster/resources", resource="cluster/resources", params={"type": "vm"})
        return next((row for row in rows or () if int(row.get("vmid", -1)) == vmid), None)

    def _digest_changed(self, kind: GuestKind, node: str, vmid: int, digest: str) -> bool:
        try:
            current = self._call(
                "GET", f"nodes/{node}/{kind.value}/{vmid}/config", resource=_ref(kind, vmid), params={"current": 1}
            )
        except BackendError:
            return False
        return isinstance(current, Mapping) and bool(current.get("digest")) and current.get("digest") != digest

    @staticmethod
    def _refuse_locked(status: Mapping[str, Any], *, resource: str, allowed: Sequence[str] = ()) -> None:
        lock = status.get("lock")
        if lock and lock not in allowed:
            raise TemporaryError(f"guest is locked ({lock})", resource=resource, hint="retry when the lock is gone")

    def _check_root_only(self, kind: GuestKind, config: Mapping[str, str], *, resource: str) -> None:
        """Refuse what PVE allows only to a root@pam password login, before sending it."""
        if self._settings.is_root_pam:
            return
        refused = sorted(key for key, value in config.items() if _root_only(kind, key, value))
        if refused:
            raise PermissionDenied(
                f"only a root@pam password login may set {', '.join(refused)} (PVE refuses every API token)",
                resource=resource,
                hint="log in as root@pam with a password, or pass GPUs to VMs through a PCI mapping",
            )


def _root_only(kind: GuestKind, key: str, value: str) -> bool:
    if kind is GuestKind.LXC:
        if key.startswith("dev") and key[3:].isdigit():
            return True
        if key == "rootfs" or (key.startswith("mp") and key[2:].isdigit()):
            try:
                volume = pve.parse_property(value, "volume").get("volume", "")
            except ValueError:
                return False
            return volume.startswith("/")
        return False
    if key.startswith("hostpci") and key[7:].isdigit():
        try:
            return "mapping" not in pve.parse_property(value, "host")
        except ValueError:
            return True
    return False


_SECRET_KEYS = frozenset({"cipassword"})
_MASK = "**********"
"""Config keys PVE shows masked (`cipassword`: stored hashed, read as asterisks); masked here too, whatever
the server sends (fakepve sends it in clear), so a password never reaches an observation, a plan or a log."""


def _guest(
    kind: GuestKind,
    vmid: int,
    node: str,
    *,
    name: str,
    status: str,
    items: Any,
    inventory_lock: Any,
    inventory_tags: str,
) -> ObservedGuest:
    """An ObservedGuest from the `.../pending` list: value = current, pending = next start, delete = pending removal."""
    config: dict[str, str] = {}
    pending: dict[str, str] = {}
    deletes: set[str] = set()
    digest: str | None = None
    for item in items or ():
        key = str(item.get("key", ""))
        if not key:
            continue
        if key == "digest":  # real PVE lists the config digest as a key of its own
            digest = _text(item["value"]) if item.get("value") is not None else None
            continue
        if item.get("value") is not None:
            config[key] = _MASK if key in _SECRET_KEYS else _text(item["value"])
        if item.get("pending") is not None:
            pending[key] = _MASK if key in _SECRET_KEYS else _text(item["pending"])
        if item.get("delete"):
            deletes.add(key)
    lock = config.get("lock") or (str(inventory_lock) if inventory_lock else None)
    tags = config.get("tags", inventory_tags)
    return ObservedGuest(
        type=kind,
        vmid=vmid,
        node=node,
        name=name,
        status=status,
        tags=pve.normalise_tags(tags),
        config=config,
        pending=pending,
        pending_delete=frozenset(deletes),
        digest=digest,
        lock=lock,
    )


def _session_of(api: Any) -> requests.Session | None:
    store = getattr(api, "_store", None)
    session = store.get("session") if isinstance(store, dict) else None
    return session if isinstance(session, requests.Session) else None


def _transport_error(
    exc: requests.RequestException, *, url: str, resource: str | None, method: str, path: str
) -> ReconcilerError:
    """The project's error for a request that got no answer: it names the API address and the socket's reason."""
    if isinstance(exc, requests.exceptions.SSLError):
        return ConfigError(
            f"TLS verification of the Proxmox API at {url} failed ({type(exc).__name__})",
            resource=resource,
            hint=f"set {ENV_CA} to the CA bundle that signed its certificate",
        )
    if isinstance(exc, requests.Timeout):
        return TemporaryError(f"the Proxmox API at {url} did not answer {method} /{path} in time", resource=resource)
    return TemporaryError(
        f"cannot reach the Proxmox API at {url}: {method} /{path} failed ({_socket_reason(exc)})",
        resource=resource,
        hint=f"check {ENV_URL} or the Lab's proxmox.url, and that the node is up",
    )


def _unsendable(user: str, *, resource: str | None = None) -> ConfigError:
    """A request whose credentials or address cannot be encoded (the codec's error would quote them)."""
    return ConfigError(
        f"a request as {user} cannot be sent: its credentials or address hold a character HTTP cannot carry",
        resource=resource,
        hint=f"check {ENV_TOKEN} / {ENV_PASSWORD} and {ENV_URL} for a mistyped character",
    )


def _socket_reason(exc: BaseException) -> str:
    """The operating system's words for the deepest socket error under `exc` (never its text: it holds URLs)."""
    reason = type(exc).__name__
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and not isinstance(current, requests.RequestException) and current.strerror:
            reason = current.strerror
        nested = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = current.__cause__ or current.__context__ or nested
    return reason
