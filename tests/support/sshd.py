"""A real OpenSSH server for the tests: `/usr/sbin/sshd -D -f <config>` on a free loopback port.

The `sshd` fixture starts one per test, as the current user, with its own host key, one authorized
key made for the test (its private half in `sshd.client_key`, for RECONCILER_SSH_KEY), `PidFile`,
`StrictModes no` and password logins off, and stops it afterwards. `sshd.target` is the SshTarget
to connect to; `sshd.known_hosts` is a fresh path for the reconciler's trust-on-first-use file.

The server offers SFTP (`internal-sftp`, which needs no binary, even in a `ChrootDirectory` given
through `extra`). `sshd.restart(new_host_key=True)` starts it again on the same port with another host key: the
guest "recreated" or an impostor. `sshd.set_env` lines go into the config's `SetEnv`, which sets
variables in every session (the tests put stand-in `apt-get`, `dpkg`, `systemctl` first on PATH).

Running as root, sshd needs its privilege separation directory /run/sshd, which the Debian
package's service makes at boot; the fixture makes it when it is missing. When the sshd binary is
missing, the test skips locally and fails under CI (`.ci/run` installs openssh-server).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from reconciler.spec.access import SshTarget
from tests.support.components import missing

__all__ = ["SSHD", "Sshd", "sshd_fixture", "start_sshd", "write_keypair"]

SSHD = Path("/usr/sbin/sshd")
START_TIMEOUT = 15.0


def write_keypair(path: Path, comment: str = "reconciler-test") -> str:
    """An ed25519 key pair in OpenSSH's formats: private key at `path`, public at `path.pub`; returns the public line."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    path.write_bytes(private)
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = f"{public.decode()} {comment}"
    path.with_suffix(".pub").write_text(line + "\n")
    return line


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Sshd:
    directory: Path
    port: int
    client_key: Path
    known_hosts: Path
    set_env: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()  # more config lines, e.g. a ChrootDirectory
    process: subprocess.Popen[bytes] | None = None

    @property
    def user(self) -> str:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name

    @property
    def target(self) -> SshTarget:
        return SshTarget(user=self.user, host="127.0.0.1", port=self.port)

    @property
    def env(self) -> Mapping[str, str]:
        """What `credentials_from` reads: the test's key file, and no agent."""
        return {"RECONCILER_SSH_KEY": str(self.client_key)}

    def _config(self) -> Path:
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.directory / 'host_ed25519'}",
            f"PidFile {self.directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.directory / 'authorized_keys'}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "LogLevel ERROR",
            "Subsystem sftp internal-sftp",
        ]
        lines.extend(self.extra)
        if self.set_env:
            lines.append("SetEnv " + " ".join(f'"{name}={value}"' for name, value in self.set_env.items()))
        config = self.directory / "sshd_config"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self) -> None:
        if os.getuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with (self.directory / "sshd.log").open("ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self._config())], stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.directory / 'sshd.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as probe:
                    if probe.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not answer within the start timeout")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def restart(self, *, new_host_key: bool = False) -> None:
        self.stop()
        if new_host_key:
            write_keypair(self.directory / "host_ed25519", "host")
        self.start()

    def authorize(self, public_line: str) -> None:
        with (self.directory / "authorized_keys").open("a") as handle:
            handle.write(public_line + "\n")


def start_sshd(
    directory: Path, known_hosts: Path, *, set_env: Mapping[str, str] | None = None, extra: tuple[str, ...] = ()
) -> Sshd:
    """An sshd started in `directory` (made) that accepts a key made for it; the caller stops it."""
    if not SSHD.exists():
        missing("sshd", f"{SSHD} is not installed (Debian: openssh-server)")
    directory.mkdir(parents=True)
    write_keypair(directory / "host_ed25519", "host")
    server = Sshd(directory, _free_port(), directory / "client_ed25519", known_hosts, dict(set_env or {}), extra)
    server.authorize(write_keypair(server.client_key))
    server.start()
    return server


@pytest.fixture(name="sshd")
def sshd_fixture(tmp_path: Path) -> Iterator[Sshd]:
    """A started sshd on 127.0.0.1 that accepts the test's own key; stopped after the test."""
    server = start_sshd(tmp_path / "sshd", tmp_path / "state" / "known_hosts")
    try:
        yield server
    finally:
        server.stop()
