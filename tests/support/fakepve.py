"""A fake Proxmox VE (the `fakepve` package) served in-process over HTTPS, for tests that drive the real proxmoxer.

Fixtures:

- `pve_pki` (session): a private CA and a server certificate for 127.0.0.1 signed by it, made with the
  `openssl` command (or, without it, fakepve's self-signed certificate, which needs `cryptography`).
  Clients trust `pve_pki.ca_file`, as they would a lab's own CA (`RECONCILER_PROXMOX_CA`).
- `pve_server` (function): a started `LabPve` on its own event loop in a background thread, listening
  on 127.0.0.1 with a port the system picks. It has the password login root@pam / `PASSWORD` and the
  API token `root@pam!reconciler=<uuid>`. `pve_server.env("token" | "password")` gives the
  RECONCILER_PROXMOX_* variables for `settings_from`; `pve_server.pve` is the FakePve to seed and fault
  (`add_ct`, `add_vm`, `add_gpu`, `add_pci_mapping`, `fail`, `snapshot_lock`, ...), between requests or
  through `pve_server.call(...)`; `pve_server.run(coro)` runs fakepve's async scenarios
  (`hold_config_lock`, `backup`) on the server's loop.
- Requests: fakepve records every request it sees (secrets redacted). `pve_server.requests` lists them as
  `(method, path)` with the `/api2/json` prefix removed, `pve_server.clear_requests()` starts a new count,
  `pve_server.writes()` lists the non-GET ones (a password login, POST /access/ticket, is not one).

`LabPve` adds to FakePve what these tests need and real PVE has:

- NVIDIA GPUs per node on `GET /nodes/{node}/hardware/pci` (`add_gpu`), next to an Intel NIC that is not
  a GPU; fakepve alone answers a placeholder device.
- PCI resource mappings on `GET /cluster/mapping/pci` (`add_pci_mapping`), in PVE's `map` entry format.
- The config `digest` as an item of `GET .../pending`, as real PVE lists it (PVE's
  config_with_pending_array walks every plain key of the parsed config, `digest` included). Stock
  fakepve leaves it out: `LabPve(pending_digest=False)` (or `pve_server.pve.pending_digest = False`)
  serves that behaviour.

- Issue 11's guest access, where stock fakepve 0.5 differs from PVE: `add_template` seeds a cloud-init
  template (`base-VMID-disk-0`, a `vm-VMID-cloudinit` drive); a VM resize grows the volume and the drive's
  `size=` and refuses to shrink; a clone gets a cloud-init drive of its own and is refused onto another node
  from local storage; `cipassword` reads back as `**********` from config and pending.

Register the fixtures for the whole suite with ``pytest_plugins = ["tests.support.fakepve"]`` in
tests/conftest.py, or import them into a test module. If fakepve cannot be imported, the fixtures call
`components.missing()`: the test skips locally and fails under CI.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support.components import missing

try:
    import fakepve as _fakepve
    from aiohttp import web as _web
except ImportError as _exc:  # pragma: no cover - depends on the environment
    _fakepve = None
    _web = None
    _IMPORT_ERROR = str(_exc)
else:
    _IMPORT_ERROR = ""

__all__ = [
    "HOST",
    "PASSWORD",
    "TOKEN_ID",
    "LabPve",
    "Pki",
    "PveServer",
    "pve_pki",
    "pve_server",
]

HOST = "127.0.0.1"
USER = "root@pam"
PASSWORD = "fake-root-password"
TOKEN_ID = "reconciler"
API_PREFIX = "/api2/json"
START_TIMEOUT = 30.0
NVIDIA = "0x10de"
CIPASSWORD_MASK = "**********"  # what PVE shows for a set cipassword
_T = TypeVar("_T")


@dataclass(frozen=True)
class Pki:
    ca_file: str  # what clients trust
    cert_file: str  # the server's certificate (and chain)
    key_file: str


def _openssl_pki(directory: Path) -> Pki:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it, with the openssl command."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=reconciler test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    run("req", "-new", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=fakepve")
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "server.ext")  # fmt: skip
    return Pki(str(directory / "ca.crt"), str(directory / "server.crt"), str(directory / "server.key"))


@pytest.fixture(scope="session")
def pve_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates for the fake's HTTPS: a private CA when openssl is there, else fakepve's self-signed one."""
    if _fakepve is None:
        missing("fakepve", _IMPORT_ERROR)
    directory = tmp_path_factory.mktemp("pve-pki")
    if shutil.which("openssl"):
        try:
            return _openssl_pki(directory)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            openssl_error = f"openssl failed: {exc}"
    else:
        openssl_error = "no openssl command"
    try:
        from fakepve.certs import make_cert
    except ImportError as exc:  # pragma: no cover
        missing("fakepve", f"{openssl_error}; fakepve.certs: {exc}")
    try:
        cert_file, key_file, _ = make_cert(str(directory), hosts=(HOST,))
    except ModuleNotFoundError as exc:
        missing("fakepve", f"{openssl_error}, and fakepve's certificates need cryptography ({exc})")
    return Pki(cert_file, cert_file, key_file)


if _fakepve is not None:

    class LabPve(_fakepve.FakePve):
        """FakePve with NVIDIA GPUs, PCI mappings and the pending digest of real PVE (see the module docstring)."""

        def __init__(self, *args: Any, pending_digest: bool = True, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.pending_digest = pending_digest
            # node -> PCI devices as GET /nodes/{node}/hardware/pci lists them (besides one Intel NIC per node)
            self.pci: dict[str, list[dict[str, Any]]] = {}
            # mapping id -> {"id", "description", "map": [...]} as GET /cluster/mapping/pci lists them
            self.pci_mappings: dict[str, dict[str, Any]] = {}
            # (method, path suffix) -> {"status", "retry_after", "times"}: see rate_limit
            self.rate_limits: dict[tuple[str, str], dict[str, Any]] = {}

        # ---- seeding ---------------------------------------------------------------

        def add_gpu(
            self,
            node: str,
            address: str,
            *,
            device: str = "0x2c05",
            name: str = "GB203 [GeForce RTX 5070 Ti]",
            iommu_group: int = 12,
            audio: bool = True,
        ) -> None:
            """Seed an NVIDIA GPU at `address` (`0000:01:00`) on `node`: function .0, and its audio function .1."""
            self.nodes.setdefault(node, {"online": True})
            slot = address if address.count(":") == 2 else "0000:" + address
            slot = slot.split(".")[0]
            devices = self.pci.setdefault(node, [])
            devices.append(
                {"id": f"{slot}.0", "class": "0x030000", "vendor": NVIDIA, "device": device,
                 "vendor_name": "NVIDIA Corporation", "device_name": name, "iommugroup": iommu_group,
                 "subsystem_vendor": "0x1458", "subsystem_device": "0x4191", "mdev": 0}
            )  # fmt: skip
            if audio:
                devices.append(
                    {"id": f"{slot}.1", "class": "0x040300", "vendor": NVIDIA, "device": "0x22e9",
                     "vendor_name": "NVIDIA Corporation", "device_name": "High Definition Audio Controller",
                     "iommugroup": iommu_group}
                )  # fmt: skip

        def add_pci_mapping(self, name: str, paths: Mapping[str, Sequence[str]], *, description: str = "") -> None:
            """Seed a cluster PCI mapping: node -> PCI addresses, one `map` entry per node (PVE's format)."""
            entries = [
                f"id=10de:2c05,iommugroup=12,node={node},path={';'.join(addresses)},subsystem-id=1458:4191"
                for node, addresses in sorted(paths.items())
            ]
            self.pci_mappings[name] = {"id": name, "description": description, "map": entries}

        def rate_limit(
            self, method: str, suffix: str, *, retry_after: str | None, status: int = 429, times: int = 1
        ) -> None:
            """Answer the next `times` logged-in requests whose path ends with `suffix` with `status` and a
            `Retry-After` header (None: without one), as a rate-limiting proxy before PVE does (pveproxy itself
            answers 503 when it has no worker free). Stock fakepve's `fail` cannot send a header."""
            self.rate_limits[(method, suffix)] = {"status": status, "retry_after": retry_after, "times": times}

        async def _answer(self, request: Any, handler: Any, generic: Any, path_node: Any) -> Any:
            for key, rule in list(self.rate_limits.items()):
                if request.method != key[0] or not request.path.endswith(key[1]):
                    continue
                rule["times"] -= 1
                if rule["times"] <= 0:
                    del self.rate_limits[key]
                response = _web.json_response(
                    {"data": None, "message": "too many requests\n"}, status=rule["status"], reason="Too Many Requests"
                )
                if rule["retry_after"] is not None:
                    response.headers["Retry-After"] = rule["retry_after"]
                return response
            return await super()._answer(request, handler, generic, path_node)

        def add_template(
            self, vmid: int, name: str, *, node: str = "pve1", storage: str = "local-lvm", disk_gib: int = 3
        ) -> None:
            """Seed a cloud-init VM template as `qm template` leaves one: a base disk (`base-VMID-disk-0`) of
            `disk_gib`, a cloud-init drive on ide2, a virtio NIC, a serial console, template=1."""
            from fakepve.qemu import join_drive

            self.nodes.setdefault(node, {"online": True})
            vm = self.add_vm(vmid, name, node=node, template=True)
            disk, _fmt = self._qm_alloc(storage, vmid, None, disk_gib * 1024**3)
            vm.config.update(
                {"scsihw": "virtio-scsi-pci", "scsi0": join_drive(self._qm_rename_volume(disk), {"size": f"{disk_gib}G"}),
                 "boot": "order=scsi0", "serial0": "socket", "vga": "serial0", "memory": "2048", "cores": "2",
                 "net0": "virtio=BC:24:11:AA:00:01,bridge=vmbr0", "template": 1}
            )  # fmt: skip
            vm.config["ide2"] = self._lab_cloudinit_drive(vmid, storage)

        def _lab_cloudinit_drive(self, vmid: int, storage: str) -> str:
            """A cloud-init drive as PVE names it (`vm-VMID-cloudinit`; fakepve's own is `vm-VMID-disk-N`)."""
            volid, _fmt = self._qm_alloc(storage, vmid, None, 4 * 1024**2)
            sid, _, name = volid.partition(":")
            volumes = self._volumes(sid)
            volumes[f"vm-{vmid}-cloudinit"] = volumes.pop(name)
            return f"{sid}:vm-{vmid}-cloudinit,media=cdrom"

        # ---- routes ----------------------------------------------------------------

        def _routes_reconciler_lab(self) -> list[tuple[str, str, Callable[..., Any]]]:
            return [
                ("GET", "/nodes/{node}/hardware/pci", self._lab_hardware_pci),
                ("GET", "/cluster/mapping/pci", self._lab_mapping_pci),
                ("POST", "/nodes/{node}/lxc/{vmid}/move_volume", self._lab_lxc_move_volume),
                ("POST", "/nodes/{node}/qemu/{vmid}/move_disk", self._lab_qemu_move_disk),
                ("PUT", "/nodes/{node}/qemu/{vmid}/resize", self._lab_qemu_resize),
            ]

        async def _lab_qemu_resize(self, values: Mapping[str, Any], user: str) -> Any:
            """PVE's qemu resize (API2/Qemu.pm): `size` absolute or `+N`, never smaller (PVE refuses to shrink),
            the volume and the drive's `size=` grown. Stock fakepve answers it without changing anything."""
            from fakepve.lxc import format_size, parse_size
            from fakepve.qemu import join_drive, split_drive, volume_ref

            vm = self.vm(int(values["vmid"]))
            if vm is None or vm.node != values["node"]:
                raise _fakepve.PveError(500, f"Configuration file 'nodes/{values['node']}/qemu-server/"
                                        f"{values['vmid']}.conf' does not exist")  # fmt: skip
            key, wanted = str(values["disk"]), str(values["size"])
            if vm.lock:
                raise _fakepve.PveError(500, f"VM is locked ({vm.lock})")
            if key not in vm.config:
                raise _fakepve.PveError(500, f"disk '{key}' does not exist")
            volume, props = split_drive(vm.config[key])
            current = parse_size(props.get("size", "")) or 0
            step = parse_size(wanted.lstrip("+"))
            if step is None:
                raise _fakepve.PveError(400, "Parameter verification failed.", errors={"size": "invalid format"})
            size = current + step if wanted.startswith("+") else step
            if size < current:
                raise _fakepve.PveError(500, "shrinking disks is not supported")

            async def body() -> None:
                sid, name = volume_ref(volume)
                stored = self._volumes(sid).get(name) if sid else None
                if stored is not None:
                    stored["size"] = size
                vm.config[key] = join_drive(volume, dict(props, size=format_size(size)))

            return await self.task(vm.node, "resize", vm.vmid, user, body, vm=vm)

        async def _qm_clone(self, v: Mapping[str, Any], user: str) -> Any:
            """A clone gets a cloud-init drive of its own, as PVE makes one (`vm-NEWID-cloudinit`) instead of
            pointing at the template's; stock fakepve copies the template's drive value. A clone onto another
            node from local storage is refused, as PVE does; stock fakepve makes it."""
            from fakepve.qemu import split_drive, volume_ref

            source = self.vm(int(v["vmid"]))
            target = v.get("target")
            if source is not None and target and target not in (v["node"], "localhost"):
                for value in source.config.values():
                    sid = volume_ref(split_drive(str(value))[0])[0]
                    if sid in self.storages and not self.storages[sid].get("shared"):
                        # PVE's clone_vm: a target node needs every volume on shared storage.
                        raise _fakepve.PveError(500, f"can't clone VM to node '{target}' (VM uses local storage)")
            upid = await super()._qm_clone(v, user)
            new = self.vm(int(v["newid"]))
            for key, value in list(new.config.items()) if new is not None else ():
                volume, _props = split_drive(str(value))
                sid = volume_ref(volume)[0]
                if sid is not None and volume.endswith("-cloudinit"):
                    new.config[key] = self._lab_cloudinit_drive(new.vmid, sid)
            return upid

        async def _config_get(self, request: Any) -> Any:
            """The config as PVE shows it: `cipassword` masked (PVE never returns it)."""
            response = await super()._config_get(request)
            return _masked(response)

        async def _lab_lxc_move_volume(self, values: Mapping[str, Any], user: str) -> Any:
            """PVE's move_volume to another storage (API2/LXC.pm): stopped CT only, a new volume, the old one
            removed (`delete=1`) or kept as unusedN. Stock fakepve answers it without moving anything."""
            from fakepve.lxc import mount_type, parse_mount, print_mount

            ct = self._find_ct(values["node"], int(values["vmid"]))
            key, sid = str(values["volume"]), str(values.get("storage") or "")
            self._ct_check_lock(ct)
            if ct.status == "running":
                raise _fakepve.PveError(500, "cannot move volumes of a running container")
            if values.get("digest") and values["digest"] != ct.digest():
                raise _fakepve.PveError(500, "detected modified configuration - file changed by other user? Try again.")
            value = ct.config.get(key)
            if value is None or mount_type(parse_mount(value).get("volume", "")) != "volume":
                raise _fakepve.PveError(500, f"cannot move volume '{key}' - not a storage volume")
            self._storage_for(sid, user, ct.vmid)

            async def body() -> None:
                mount = parse_mount(ct.config[key])
                old = mount["volume"]
                mount["volume"] = self._allocate(ct.vmid, sid, self._taken_volumes())
                ct.config[key] = print_mount(mount, key == "rootfs")
                if not int(values.get("delete", 0)):
                    ct.config[self._unused_key(ct.config)] = old

            return await self._ct_task(ct, "move_volume", user, body)

        async def _lab_qemu_move_disk(self, values: Mapping[str, Any], user: str) -> Any:
            """PVE's move_disk to another storage (API2/Qemu.pm), online or not: a new volume of the same size,
            the old one freed (`delete=1`) or kept as unusedN."""
            from fakepve.lxc import parse_size
            from fakepve.qemu import join_drive, split_drive

            vm = self.vm(int(values["vmid"]))
            if vm is None or vm.node != values["node"]:
                raise _fakepve.PveError(500, f"Configuration file 'nodes/{values['node']}/qemu-server/"
                                        f"{values['vmid']}.conf' does not exist")  # fmt: skip
            key, sid = str(values["disk"]), str(values.get("storage") or "")
            if vm.lock:
                raise _fakepve.PveError(500, f"VM is locked ({vm.lock})")
            value = vm.config.get(key)
            if value is None:
                raise _fakepve.PveError(500, f"disk '{key}' does not exist")
            self._qm_image_store(sid, user)

            async def body() -> None:
                volume, props = split_drive(vm.config[key])
                size = parse_size(props.get("size", "")) or 0
                new, _ = self._qm_alloc(sid, vm.vmid, None, size)
                vm.config[key] = join_drive(new, props)
                if int(values.get("delete", 0)):
                    self._qm_free(volume)
                else:
                    vm.config[f"unused{sum(1 for k in vm.config if k.startswith('unused'))}"] = volume

            return await self.task(vm.node, "qmmove", vm.vmid, user, body, vm=vm)

        async def _lab_hardware_pci(self, values: Mapping[str, Any], user: str) -> list[dict[str, Any]]:
            nic = {"id": "0000:00:1f.6", "class": "0x020000", "vendor": "0x8086", "device": "0x15fa",
                   "vendor_name": "Intel Corporation", "device_name": "Ethernet Connection (14) I219-V",
                   "iommugroup": 9}  # fmt: skip
            return [nic, *self.pci.get(values["node"], [])]

        async def _lab_mapping_pci(self, values: Mapping[str, Any], user: str) -> list[dict[str, Any]]:
            return [dict(entry) for _, entry in sorted(self.pci_mappings.items())]

        async def _lxc_pending(self, user: str, v: Mapping[str, Any]) -> Any:
            data = await super()._lxc_pending(user, v)
            if self.pending_digest:
                ct = self._find_ct(v["node"], v["vmid"])
                data.append({"key": "digest", "value": ct.digest()})
            return data

        async def _pending(self, request: Any) -> Any:
            response = await super()._pending(request)
            if response.status != 200:
                return response
            if not self.pending_digest:
                return _masked(response)
            vm = self._vm(request)
            body = json.loads(_masked(response).text)
            body["data"].append({"key": "digest", "value": vm.digest()})
            return _web.json_response(body)

    def _masked(response: Any) -> Any:
        """A config or pending answer with `cipassword` replaced by PVE's mask."""
        if response.status != 200:
            return response
        body = json.loads(response.text)
        data = body.get("data")
        if isinstance(data, dict) and "cipassword" in data:
            data["cipassword"] = CIPASSWORD_MASK
        elif isinstance(data, list):
            for item in data:
                for field in ("value", "pending"):
                    if item.get("key") == "cipassword" and field in item:
                        item[field] = CIPASSWORD_MASK
        return _web.json_response(body)

else:  # pragma: no cover
    LabPve = None


class PveServer:
    """A LabPve served on a private event loop in a daemon thread; see the module docstring."""

    def __init__(self, pve: Any, pki: Pki) -> None:
        self.pve = pve
        self.ca_file = pki.ca_file
        self.user = USER
        self.password = PASSWORD
        self.token_id = TOKEN_ID
        self.token_secret = str(uuid.uuid4())
        pve.apitokens[f"{USER}!{TOKEN_ID}"] = self.token_secret
        self._stopped = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="fakepve-server", daemon=True)
        self._thread.start()
        try:
            self.run(pve.start(pki.cert_file, pki.key_file))
        except BaseException:
            self._halt()
            raise

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @property
    def host(self) -> str:
        return str(self.pve.host)

    @property
    def port(self) -> int:
        return int(self.pve.port)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def token(self) -> str:
        """The full token, as RECONCILER_PROXMOX_TOKEN takes it: root@pam!reconciler=<secret>."""
        return f"{self.user}!{self.token_id}={self.token_secret}"

    def env(self, auth: str = "token") -> dict[str, str]:
        """RECONCILER_PROXMOX_* variables for `settings_from` (with no Lab connection): token or password login."""
        env = {"RECONCILER_PROXMOX_URL": self.url, "RECONCILER_PROXMOX_CA": self.ca_file}
        if auth == "token":
            env["RECONCILER_PROXMOX_TOKEN"] = self.token
        elif auth == "password":
            env.update(RECONCILER_PROXMOX_USER=self.user, RECONCILER_PROXMOX_PASSWORD=self.password)
        else:
            raise ValueError(f"auth is 'token' or 'password', not {auth!r}")
        return env

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = START_TIMEOUT) -> _T:
        """Run a coroutine (a fakepve scenario such as `pve.hold_config_lock(100, None)`) on the server's loop."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a plain function on the server's loop thread, so it cannot interleave with a request."""

        async def wrapper() -> _T:
            return fn(*args, **kwargs)

        return self.run(wrapper())

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Every request fakepve saw since the last `clear_requests()`, as (method, path below /api2/json)."""
        seen = []
        for method, path, _body in list(self.pve.requests):
            seen.append((str(method), str(path)[len(API_PREFIX) :] if str(path).startswith(API_PREFIX) else str(path)))
        return seen

    def writes(self) -> list[tuple[str, str]]:
        """The requests that were not GETs, except password logins (POST /access/ticket), which change nothing."""
        return [
            (method, path)
            for method, path in self.requests
            if method not in ("GET", "HEAD") and not (method == "POST" and path == "/access/ticket")
        ]

    def clear_requests(self) -> None:
        self.call(self.pve.requests.clear)

    def stop(self) -> None:
        """Stop serving (a test may do it early, to see what clients do without a server); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.run(_settle())
            self.run(self.pve.stop())
            self.run(_abort_lingering(self._loop))
        finally:
            self._halt()

    def _halt(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()


async def _settle() -> None:
    """Let spawned tasks and callbacks run."""
    for _ in range(3):
        await asyncio.sleep(0)


async def _abort_lingering(loop: asyncio.AbstractEventLoop) -> None:
    """Close the server side of connections the stopped server left open.

    After an error answer, aiohttp can leave a TLS connection half-closed: the client has gone, but asyncio's
    SSL layer waits for the application to read again, which never happens. Left alone, the socket is found
    unclosed when garbage collected (a ResourceWarning, an error under `filterwarnings = error`) during some
    later test. The selector loop keeps its transports in a private map; this is test support, so it looks.
    """
    transports = getattr(loop, "_transports", None)
    for transport in list(transports.values()) if transports is not None else ():
        if not transport.is_closing():
            transport.abort()
    await _settle()


@pytest.fixture
def pve_server(pve_pki: Pki) -> Iterator[PveServer]:
    """A started LabPve for one test (time_scale 0: tasks end before their request returns)."""
    if LabPve is None:
        missing("fakepve", _IMPORT_ERROR)
    pve = LabPve(user=USER, password=PASSWORD, host=HOST, port=0)
    pve.time_scale = 0
    server = PveServer(pve, pve_pki)
    try:
        yield server
    finally:
        server.stop()
