"""Where the Proxmox backend connects and with what: `ProxmoxSettings`, from the Lab and the environment.

Who calls it: `engine.connect` through `backends.proxmox.settings_from` (re-exported there). The
secret (a token or a password) is read here, from the environment or a file the environment names,
registered with `reconciler.redact` at once, and never leaves the settings: their repr hides it.
Kept apart from the transport and the reads and writes, so the secrets' handling is in one place.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from reconciler import redact
from reconciler.errors import ConfigError
from reconciler.planning import pve
from reconciler.spec.models import ProxmoxAuth, ProxmoxConnection

__all__ = [
    "DEFAULT_TIMEOUT",
    "ENV_CA",
    "ENV_PASSWORD",
    "ENV_TOKEN",
    "ENV_URL",
    "ENV_USER",
    "ENV_VERIFY_TLS",
    "ProxmoxSettings",
    "settings_from",
]

ENV_URL: Final = "RECONCILER_PROXMOX_URL"
ENV_TOKEN: Final = "RECONCILER_PROXMOX_TOKEN"
ENV_USER: Final = "RECONCILER_PROXMOX_USER"
ENV_PASSWORD: Final = "RECONCILER_PROXMOX_PASSWORD"
ENV_CA: Final = "RECONCILER_PROXMOX_CA"
ENV_VERIFY_TLS: Final = "RECONCILER_PROXMOX_VERIFY_TLS"
DEFAULT_TIMEOUT: Final = 30.0


# ---- settings -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxmoxSettings:
    """How to reach the PVE API. `secret` is the token secret or the password; repr masks it."""

    url: str
    auth: ProxmoxAuth
    user: str
    token_id: str | None = None
    secret: str
    verify_tls: bool = True
    ca_file: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def __repr__(self) -> str:
        return (
            f"ProxmoxSettings(url={self.url!r}, auth={self.auth.value!r}, user={self.user!r}, "
            f"token_id={self.token_id!r}, secret='***', verify_tls={self.verify_tls!r}, "
            f"ca_file={self.ca_file!r}, timeout={self.timeout!r})"
        )

    @property
    def is_root_pam(self) -> bool:
        """True for a root@pam password login, the only one PVE lets set LXC devN, bind mounts and raw hostpciN."""
        return self.auth is ProxmoxAuth.PASSWORD and self.user == "root@pam"

    @property
    def verify(self) -> bool | str:
        """What requests takes as `verify`: the CA bundle when given, else the flag."""
        if not self.verify_tls:
            return False
        return self.ca_file or True


def _token_parts(value: str) -> tuple[str, str, str] | None:
    """(user, token id, secret) of `user@realm!tokenid=secret`, or None for anything else."""
    head, eq, secret = value.partition("=")
    user, bang, token_id = head.partition("!")
    if not (eq and bang and secret and token_id) or user.count("@") != 1 or any(c.isspace() for c in value):
        return None
    return user, token_id, secret


_MAX_SECRET_FILE = 64 * 1024  # a password or token, not a file to read all of


def _read_secret_file(path: str) -> str:
    """The secret a file holds: a regular file of UTF-8 text (a device or a FIFO would never end, or block)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise ConfigError(f"the Proxmox secret file {path} is not a regular file")
            return handle.read(_MAX_SECRET_FILE).decode("utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the Proxmox secret file {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the Proxmox secret file {path} is not UTF-8 text") from None


def _check_ca_file(path: str | None) -> None:
    """A CA bundle must be a regular file: TLS would read a device or a FIFO for ever. Missing is said later."""
    try:
        mode = os.stat(path).st_mode if path else None
    except OSError:
        return
    if mode is not None and not stat.S_ISREG(mode):
        raise ConfigError(
            f"the Proxmox CA file {path} is not a regular file",
            hint="point RECONCILER_PROXMOX_CA or the Lab's proxmox.ca_file at a PEM bundle",
        )


def settings_from(connection: ProxmoxConnection | None, env: Mapping[str, str]) -> ProxmoxSettings:
    """Settings from the Lab's `proxmox` connection, overridden by the environment (see `_settings_from`).

    The secret is registered with `reconciler.redact` as soon as it is read, so no message shows it. A URL
    carrying credentials (`https://root:pass@host:8006`) is refused, and so is a token that an HTTP header
    cannot carry (anything but printable ASCII): both are ConfigErrors that show neither secret.
    """
    url = env.get(ENV_URL) or (connection.url if connection else "")
    redact.register_url(url)
    if "@" in urlsplit(url.strip()).netloc:
        raise ConfigError(
            f"the Proxmox API address {redact.without_userinfo(url.strip())!r} carries credentials",
            hint=f"give it as https://host[:port] and put the password in {ENV_PASSWORD} (or the token in {ENV_TOKEN})",
        )
    settings = _settings_from(connection, env)
    redact.register(settings.secret)
    if settings.auth is ProxmoxAuth.TOKEN:
        parts = (("user", settings.user), ("token id", settings.token_id or ""), ("secret", settings.secret))
        for what, value in parts:
            if not _header_safe(value):
                raise ConfigError(
                    f"the Proxmox API token's {what} holds a character an HTTP header cannot carry"
                    " (only printable ASCII can be sent)",
                    hint=f"check {ENV_TOKEN} (or the Lab's proxmox.secret_env / secret_file) for a mistyped character",
                )
    return settings


def _header_safe(value: str) -> bool:
    """Whether `value` can travel in an HTTP header as PVE reads it: printable ASCII, no spaces or controls."""
    return all("!" <= char <= "~" for char in value)


def _settings_from(connection: ProxmoxConnection | None, env: Mapping[str, str]) -> ProxmoxSettings:
    """Settings from the Lab's `proxmox` connection, overridden by the environment.

    Variables: `RECONCILER_PROXMOX_URL`; `RECONCILER_PROXMOX_TOKEN` (the full
    `user@realm!tokenid=secret`, or only the secret when the Lab gives `user` and
    `token_id`); `RECONCILER_PROXMOX_USER` with `RECONCILER_PROXMOX_PASSWORD` (a
    password login, which wins over a token); `RECONCILER_PROXMOX_CA` (a CA
    bundle); `RECONCILER_PROXMOX_VERIFY_TLS=0`. Without an override the secret
    comes from the variable the Lab's `secret_env` names, then its `secret_file`.
    Raises ConfigError naming what to set; the secret is never in a message.
    """
    url = (env.get(ENV_URL) or (connection.url if connection else "")).strip()
    if not url:
        raise ConfigError("no Proxmox API address", hint=f"set {ENV_URL} or the Lab's proxmox.url")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(
            f"the Proxmox API address must be https://host[:port], not {redact.without_userinfo(url)!r}",
            hint=f"fix {ENV_URL}",
        )
    verify_tls = connection.verify_tls if connection else True
    if env.get(ENV_VERIFY_TLS, "").strip():
        try:
            verify_tls = pve.parse_bool(env[ENV_VERIFY_TLS])
        except ValueError:
            raise ConfigError(f"{ENV_VERIFY_TLS} must be 1 or 0", hint=f"fix {ENV_VERIFY_TLS}") from None
    ca_file = env.get(ENV_CA) or (connection.ca_file if connection else None)
    _check_ca_file(ca_file)
    timeout = float(connection.timeout) if connection else DEFAULT_TIMEOUT
    common: dict[str, Any] = {"url": url, "verify_tls": verify_tls, "ca_file": ca_file or None, "timeout": timeout}
    user = env.get(ENV_USER) or (connection.user if connection else "root@pam")

    password = env.get(ENV_PASSWORD, "").strip()
    auth = connection.auth if connection else ProxmoxAuth.TOKEN
    if password or auth is ProxmoxAuth.PASSWORD:
        return _password_settings(connection, env, password=password, user=user, common=common)
    return _token_settings(connection, env, user=user, common=common)


def _password_settings(
    connection: ProxmoxConnection | None, env: Mapping[str, str], *, password: str, user: str, common: dict[str, Any]
) -> ProxmoxSettings:
    """A password login: the override, else the Lab's `secret_env`, else its `secret_file`."""
    if not password and connection is not None and connection.secret_env != ENV_TOKEN:
        password = env.get(connection.secret_env, "").strip()
    if not password and connection is not None and connection.secret_file:
        password = _read_secret_file(connection.secret_file)
    if not password:
        raise ConfigError(
            f"no Proxmox password for {user}",
            hint=f"set {ENV_PASSWORD}, or the variable the Lab's proxmox.secret_env names, or its secret_file",
        )
    return ProxmoxSettings(auth=ProxmoxAuth.PASSWORD, user=user, secret=password, **common)


def _token_settings(
    connection: ProxmoxConnection | None, env: Mapping[str, str], *, user: str, common: dict[str, Any]
) -> ProxmoxSettings:
    """A token login: the full token, or a bare secret with the Lab's `user` and `token_id`."""
    names = [ENV_TOKEN] + ([connection.secret_env] if connection and connection.secret_env != ENV_TOKEN else [])
    raw = next((env[name].strip() for name in names if env.get(name, "").strip()), "")
    if not raw and connection is not None and connection.secret_file:
        raw = _read_secret_file(connection.secret_file)
    if not raw:
        where = " or ".join(names)
        raise ConfigError("no Proxmox API token", hint=f"set {where} to user@realm!tokenid=secret")
    parsed = _token_parts(raw)
    if parsed is not None:
        token_user, token_id, secret = parsed
        return ProxmoxSettings(auth=ProxmoxAuth.TOKEN, user=token_user, token_id=token_id, secret=secret, **common)
    spec_token_id = connection.token_id if connection else None
    if spec_token_id is None:
        raise ConfigError(
            "the Proxmox token holds only a secret, and no token id is known",
            hint=f"write {names[-1]} as user@realm!tokenid=secret, or set the Lab's proxmox.token_id",
        )
    return ProxmoxSettings(auth=ProxmoxAuth.TOKEN, user=user, token_id=spec_token_id, secret=raw, **common)
