"""Secrets out of every message: a process-wide registry of secret values, and `scrub(text)`.

Who registers: whoever reads a secret, at the moment it is read. The Proxmox
settings (the token secret or password, and the password of a URL that carries
one), the Docker endpoints (credentials in a `tcp://user:pass@host` URL), and
the applier, for each `secret_env` value it resolves. `register_environment`
takes every secret-looking `RECONCILER_*` variable at once.

Who scrubs: every `ReconcilerError` scrubs its own message and hint when it is
made, so an error cannot carry a registered secret whichever backend raised it;
the backends scrub the SDK's words as they translate them; the CLI scrubs
whatever it prints about an error, tracebacks included; the journal scrubs the
error texts it stores. A log formatter can call `scrub` the same way.

`scrub` replaces each registered value (and its percent-encoded form) with
`***`, hides the password of any `scheme://user:password@` URL, and hides the
credentials of the headers PVE and HTTP use (`Authorization`, `PVEAPIToken=`,
`PVEAuthCookie=`, `CSRFPreventionToken`), even when their value was never
registered (a ticket PVE handed out, say). Values shorter than
`MIN_SECRET_LENGTH` are not registered: replacing them would mangle ordinary
text, and a secret that short is not one anyway.

The API is two functions, `register(*values)` and `scrub(text) -> str`, plus
helpers that register what a URL or an environment holds. Thread-safe.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "MASK",
    "MIN_SECRET_LENGTH",
    "register",
    "register_environment",
    "register_url",
    "scrub",
    "scrub_cut",
    "without_userinfo",
]

MASK = "***"
MIN_SECRET_LENGTH = 4

# Variables of the reconciler's own environment whose values are secrets (RECONCILER_PROXMOX_TOKEN, ...).
_SECRET_NAME = re.compile(r"(TOKEN|PASSWORD|SECRET|KEY|PASS)(_|$)")
# scheme://user:password@host -> scheme://user:***@host (the user name stays: it says who, not how)
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/@:]*):[^\s/@]*@")
# Credentials of HTTP and PVE headers, however they reached the text (an error body echoing a request).
_HEADER_SECRETS = (
    re.compile(r"(?i)(\bauthorization\b[\"']?\s*[:=]\s*[\"']?)(?:(?:basic|bearer|pveapitoken)[ =])?[^\s\"',;]+"),
    re.compile(r"(?i)(\bPVEAPIToken[= ][^\s\"'!=]*![^\s\"'=]*=)[^\s\"',;]+"),
    re.compile(r"(?i)(\bPVEAuthCookie\s*[=:]\s*)[^\s\"',;]+"),
    re.compile(r"(?i)(\bCSRFPreventionToken[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]+"),
)


class _Registry:
    """The secret values known so far, and one pattern that finds any of them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: set[str] = set()
        self.pattern: re.Pattern[str] | None = None

    def add(self, fresh: set[str]) -> None:
        with self.lock:
            if fresh <= self.values:
                return
            self.values.update(fresh)
            # Longest first, so a secret that contains another is hidden whole.
            self.pattern = re.compile("|".join(re.escape(s) for s in sorted(self.values, key=len, reverse=True)))


_registry = _Registry()


def register(*values: str | None) -> None:
    """Remember secret values, so that `scrub` hides them from now on. Short or empty values are ignored."""
    _registry.add(
        {
            form
            for value in values
            if value and len(value) >= MIN_SECRET_LENGTH
            for form in (value, quote(value, safe=""), unquote(value))
            if len(form) >= MIN_SECRET_LENGTH
        }
    )


def register_url(url: str | None) -> None:
    """Register the password a URL carries (`tcp://user:password@host`), if it carries one."""
    if not url:
        return
    try:
        password = urlsplit(url).password
    except ValueError:  # a malformed port: the text after ':' may still be a password
        password = None
    register(password)


def register_environment(env: Mapping[str, str]) -> None:
    """Register every secret the reconciler's environment holds: `RECONCILER_*` tokens, passwords, keys,
    and the passwords of Docker endpoint URLs (`DOCKER_HOST`, `RECONCILER_DOCKER_HOST_*`)."""
    for name, value in env.items():
        if name.startswith("RECONCILER_") and _SECRET_NAME.search(name.removeprefix("RECONCILER_")):
            register(value.strip(), _token_secret(value.strip()))
        if name == "DOCKER_HOST" or name.startswith("RECONCILER_DOCKER_HOST_") or name.endswith("_URL"):
            register_url(value)


def _token_secret(value: str) -> str | None:
    """The secret of a PVE token `user@realm!id=secret`, which is what travels in headers."""
    _, eq, secret = value.partition("=")
    return secret if eq and "!" in value.partition("=")[0] else None


def scrub(text: str) -> str:
    """`text` with every registered secret, URL password and header credential replaced by `***`."""
    pattern = _registry.pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    text = _URL_PASSWORD.sub(rf"\1:{MASK}@", text)
    for header in _HEADER_SECRETS:
        text = header.sub(rf"\g<1>{MASK}", text)
    return text


def scrub_cut(text: str, limit: int, *, continues: bool = False) -> str:
    """`text` scrubbed, then cut to `limit` characters. When it is cut, or `continues` (the rest of the
    line is dropped unread), a beginning of a secret left at its end is cut too: scrubbing only finds
    whole secrets, and half a secret is not for showing either."""
    text = scrub(text)
    if len(text) <= limit and not continues:
        return text
    text = text[:limit]
    with _registry.lock:
        values = sorted(_registry.values, key=len, reverse=True)
    cut = max((k for value in values for k in range(1, len(value)) if text.endswith(value[:k])), default=0)
    return text[: len(text) - cut]


def without_userinfo(url: str) -> str:
    """A URL as it may be shown: `https://root:pass@host:8006` -> `https://host:8006` (nothing else changes)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return scrub(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
