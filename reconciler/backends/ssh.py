"""SSH into a guest: connect as the spec says, check its host key, run a command, stream what it prints.

Who calls it: the provisioning engine (`engine/provision.py`), which runs a guest's steps over one
`SshSession`; and observe (`engine/observe.py`), which reads the heads of model files that sit on a
Docker host through `SshSession.files()` (SFTP, bounded reads: no shell sees a path).
This is the only module of the project that imports paramiko (the docker SDK uses it too, inside
itself); paramiko objects never leave it, and its errors are translated here, by type:

    HostKeyChanged (PermanentError)   the guest's host key differs from the one recorded: refuse
    SshUnreachable (TemporaryError)   no route, refused, DNS, connect timeout, dropped session
    SshAuthFailed (TemporaryError)    the key was refused: on a guest just made, cloud-init may
                                      not have installed it yet, so a later try can succeed
    CommandTimedOut (TemporaryError)  the command ran past its timeout; it was closed
    ConfigError                       no usable private key (RECONCILER_SSH_KEY, or an agent)

Host keys: trust on first use. The first key a guest shows is recorded in the state directory's
`known_hosts` (OpenSSH's format, `[host]:port` for a port other than 22); from then on a different
key is an error that says which line to remove when the guest was recreated on purpose.

The private key comes from an ssh agent (SSH_AUTH_SOCK) or from the file named by
RECONCILER_SSH_KEY (its passphrase, if any, from RECONCILER_SSH_KEY_PASSPHRASE); never from
~/.ssh by accident. Output may carry secrets: every line passes `_scrub` before it reaches a
callback or an error.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import socket
import stat
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import paramiko

from reconciler import redact
from reconciler.errors import ConfigError, PermanentError, TemporaryError
from reconciler.spec.access import SshTarget

__all__ = [
    "ENV_KEY",
    "ENV_PASSPHRASE",
    "CommandResult",
    "CommandTimedOut",
    "HostKeyChanged",
    "SftpFiles",
    "SshAuthFailed",
    "SshCredentials",
    "SshSession",
    "SshUnreachable",
    "connect",
    "credentials_from",
]

ENV_KEY: Final = "RECONCILER_SSH_KEY"
ENV_PASSPHRASE: Final = "RECONCILER_SSH_KEY_PASSPHRASE"
ENV_AGENT: Final = "SSH_AUTH_SOCK"
TAIL_LINES: Final = 20
_READ_CHUNK: Final = 32768
_POLL: Final = 0.05
_T = TypeVar("_T")
MAX_LINE: Final = 8192  # a longer line is cut: one line of output is never a memory problem


class HostKeyChanged(PermanentError):
    """The guest showed a host key other than the one recorded: maybe a new guest, maybe someone else."""


class SshUnreachable(TemporaryError):
    """The guest cannot be reached over SSH (yet)."""


class SshAuthFailed(TemporaryError):
    """The guest refused the key (on a new guest cloud-init may not have installed it yet)."""


class CommandTimedOut(TemporaryError):
    """A command ran longer than its timeout; `tail` holds its last output lines."""

    def __init__(self, message: str, *, resource: str | None = None, tail: tuple[str, ...] = ()) -> None:
        super().__init__(message, resource=resource)
        self.tail = tail


def _scrub(line: str, *, continues: bool = False) -> str:
    """The one place output leaves this module: every secret the process holds is taken out, and a line
    cut at MAX_LINE keeps no beginning of one (the rest of it is never read into another line)."""
    return redact.scrub_cut(line, MAX_LINE, continues=continues)


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    tail: tuple[str, ...]  # the last output lines (stdout and stderr together), scrubbed

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class SshCredentials:
    """Where the private key comes from. `key_file` is read at connect time; the agent is asked too."""

    key_file: Path | None = None
    passphrase: str | None = None
    use_agent: bool = True

    def __repr__(self) -> str:
        return f"SshCredentials(key_file={self.key_file}, agent={self.use_agent})"  # never the passphrase


def credentials_from(env: Mapping[str, str]) -> SshCredentials:
    """RECONCILER_SSH_KEY (a path) and/or an agent (SSH_AUTH_SOCK); ConfigError when there is neither."""
    key = env.get(ENV_KEY, "").strip()
    agent = bool(env.get(ENV_AGENT, "").strip())
    if not key and not agent:
        raise ConfigError(
            "no SSH private key for provisioning",
            hint=f"set {ENV_KEY} to a private key file, or run an ssh agent (SSH_AUTH_SOCK)",
        )
    return SshCredentials(Path(key) if key else None, env.get(ENV_PASSPHRASE) or None, agent)


def _load_key(credentials: SshCredentials) -> paramiko.PKey | None:
    if credentials.key_file is None:
        return None
    try:
        return paramiko.PKey.from_path(credentials.key_file, password=credentials.passphrase)
    except (paramiko.PasswordRequiredException, TypeError) as exc:
        if credentials.passphrase is not None or "password" not in str(exc).lower():
            raise ConfigError(f"cannot use the SSH key {credentials.key_file}: {type(exc).__name__}") from None
        raise ConfigError(
            f"the SSH key {credentials.key_file} is encrypted", hint=f"set {ENV_PASSPHRASE}, or use an ssh agent"
        ) from None
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise ConfigError(f"cannot use the SSH key {credentials.key_file}: {type(exc).__name__}") from None


def _host_entry(target: SshTarget) -> str:
    return target.host if target.port == 22 else f"[{target.host}]:{target.port}"


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Record a guest's first host key in our known_hosts file; paramiko refuses a changed one itself."""

    def __init__(self, known_hosts: Path) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="ascii") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # two passes never interleave their lines
            handle.write(line)
        client.get_host_keys().add(hostname, key.get_name(), key)


class SshSession:
    """One SSH connection to a guest. Use as a context manager; not shared between threads."""

    def __init__(self, client: paramiko.SSHClient, target: SshTarget) -> None:
        self._client = client
        self.target = target
        self.resource = f"ssh://{target}"

    def __enter__(self) -> SshSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def files(self, *, timeout: float = 30.0) -> SftpFiles:
        """Bounded reads of the host's files over SFTP (no shell parses a path); closed with the session."""
        try:
            sftp = self._client.open_sftp()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshUnreachable(f"the host offers no SFTP: {_reason(exc)}", resource=self.resource) from None
        channel = sftp.get_channel()
        if channel is not None:
            channel.settimeout(timeout)
        return SftpFiles(sftp, self.resource)

    def run(
        self,
        command: str,
        *,
        timeout: float,
        on_line: Callable[[str], None] | None = None,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        tail: int = TAIL_LINES,
    ) -> CommandResult:
        """Run `command` through the guest's shell; stdout and stderr together, line by line, to `on_line`.

        `env` is set for the command only (names must be shell identifiers; values are quoted).
        `stdin`, when given, is sent and then closed. Raises CommandTimedOut after `timeout` seconds
        and closes the channel; a command without a terminal may go on in the guest after that, so a
        long command should also run under the guest's own `timeout`. SshUnreachable when the
        connection drops.
        """
        text = _with_env(command, env or {})
        lines: deque[str] = deque(maxlen=tail)
        try:
            channel = self._open(text)
            try:
                if stdin is not None:
                    channel.sendall(stdin)
                channel.shutdown_write()
                code = self._pump(channel, timeout, lines, on_line)
            finally:
                channel.close()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshUnreachable(f"the SSH session dropped: {type(exc).__name__}", resource=self.resource) from None
        if code is None:
            raise CommandTimedOut(
                f"the command ran longer than {timeout:g}s", resource=self.resource, tail=tuple(lines)
            )
        return CommandResult(code, tuple(lines))

    def _open(self, command: str) -> paramiko.Channel:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SshUnreachable("the SSH connection is closed", resource=self.resource)
        channel = transport.open_session()
        channel.set_combine_stderr(True)
        channel.exec_command(command)
        return channel

    @staticmethod
    def _pump(
        channel: paramiko.Channel, timeout: float, lines: deque[str], on_line: Callable[[str], None] | None
    ) -> int | None:
        """Read until the command exits (its code) or the time is up (None)."""
        deadline = time.monotonic() + timeout
        pending = b""
        skipping = False  # the rest of a line already cut and emitted: dropped up to its newline

        def emit(raw: bytes, *, continues: bool = False) -> None:
            line = _scrub(raw.decode("utf-8", errors="replace").rstrip("\r"), continues=continues)
            lines.append(line)
            if on_line is not None:
                on_line(line)

        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            channel.settimeout(min(remaining, 1.0))
            try:
                chunk = channel.recv(_READ_CHUNK)
            except TimeoutError:
                continue
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            if skipping:
                if not complete:
                    pending = b""
                    continue
                complete, skipping = complete[1:], False
            for raw in complete:
                emit(raw)
            if len(pending) > MAX_LINE:
                emit(pending, continues=True)
                pending, skipping = b"", True
        if pending:
            emit(pending)
        while not channel.exit_status_ready():
            if time.monotonic() >= deadline:
                return None
            time.sleep(_POLL)
        return channel.recv_exit_status()


class SftpFiles:
    """A host's files, read in bounded pieces: only what a caller asks for is requested, and counted.

    A missing or unreadable file raises the OSError (FileNotFoundError, PermissionError) the server's
    status maps to; a dropped or silent connection raises SshUnreachable. Symlinks are followed.
    """

    def __init__(self, sftp: paramiko.SFTPClient, resource: str) -> None:
        self._sftp = sftp
        self.resource = resource
        self.bytes_read = 0  # what the reads returned, in total: the tests check the bound with it

    def size(self, path: str) -> int:
        """The size of the regular file at `path`; IsADirectoryError for anything else."""
        mode, size = self._stat(path)
        if not stat.S_ISREG(mode):
            raise IsADirectoryError(21, "not a regular file", path)
        return size

    def is_dir(self, path: str) -> bool:
        return stat.S_ISDIR(self._stat(path)[0])

    def listdir(self, path: str) -> list[str]:
        return self._call(lambda: self._sftp.listdir(path))

    def read(self, path: str, offset: int, length: int) -> bytes:
        """At most `length` bytes of `path` from `offset` (fewer at its end)."""

        def read() -> bytes:
            with self._sftp.open(path, "rb") as handle:
                wanted = min(length, max(0, int(handle.stat().st_size or 0) - offset))  # never past its end
                chunks = list(handle.readv([(offset, wanted)])) if wanted else []
            return b"".join(chunks)[:wanted]

        data = self._call(read) if length > 0 else b""
        self.bytes_read += len(data)
        return data

    def _stat(self, path: str) -> tuple[int, int]:
        found = self._call(lambda: self._sftp.stat(path))
        return int(found.st_mode or 0), int(found.st_size or 0)

    def _call(self, action: Callable[[], _T]) -> _T:
        try:
            return action()
        except OSError as exc:
            if isinstance(exc, TimeoutError | socket.timeout) or exc.errno is None:
                raise SshUnreachable(f"the SFTP session failed: {_reason(exc)}", resource=self.resource) from None
            raise
        except (paramiko.SSHException, EOFError) as exc:
            raise SshUnreachable(f"the SFTP session failed: {_reason(exc)}", resource=self.resource) from None


def _with_env(command: str, env: Mapping[str, str]) -> str:
    for name in env:
        if not name.isidentifier() or not name.isascii():
            raise ValueError(f"not an environment variable name: {name!r}")
    if not env:
        return command
    assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
    return f"export {assignments}; {command}"


def connect(target: SshTarget, *, credentials: SshCredentials, known_hosts: Path, timeout: float = 30.0) -> SshSession:
    """Open an SSH session to `target`, checking its host key against `known_hosts` (trust on first use)."""
    pkey = _load_key(credentials)
    client = paramiko.SSHClient()
    if known_hosts.exists():
        try:
            client.load_host_keys(str(known_hosts))
        except (OSError, paramiko.SSHException, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(
                f"cannot read {known_hosts}: {type(exc).__name__}", hint="fix or remove the file"
            ) from None
    client.set_missing_host_key_policy(_TrustOnFirstUse(known_hosts))
    resource = f"ssh://{target}"
    try:
        client.connect(
            target.host,
            port=target.port,
            username=target.user,
            pkey=pkey,
            allow_agent=credentials.use_agent,
            look_for_keys=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
        )
    except paramiko.BadHostKeyException:
        client.close()
        raise HostKeyChanged(
            "the guest's SSH host key is not the one recorded on first use",
            resource=resource,
            hint=f"if the guest was recreated, remove the line for {_host_entry(target)} from {known_hosts}; "
            "otherwise something else answers at this address",
        ) from None
    except paramiko.AuthenticationException:
        client.close()
        raise SshAuthFailed(
            f"the guest refused the key for {target.user}",
            resource=resource,
            hint=f"check the guest's authorized keys (ssh_keys / cloud_init) and {ENV_KEY} or the agent",
        ) from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        client.close()
        raise SshUnreachable(f"cannot reach the guest: {_reason(exc)}", resource=resource) from None
    return SshSession(client, target)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return "the name does not resolve"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError | ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__
